r"""Evaluate every composition method on every task: the study's table, against the oracle.

Usage:
    python full_evaluation.py --model MODEL --output-dir RUN --tasks 5tasks \
        --methods moa,arrow,concat,weight_sum,svd [--data sample | --data hub | --data-dir DIR] \
        [--eval-size 500] [--batch-size 16] [--max-new-tokens 128] [--max-prompt-len 400] \
        [--score-by generate|likelihood] [--density 0.5] [--rank 8] [--seed 0] [--force] \
        [--arrow-top-k 3] [--arrow-temperature 1.0] [--arrow-general DIR ...] \
        [--smile-top-k 1] [--smile-gate-k 4] [--smile-gate-scale none|singular] [--smile-rank R] \
        [--retrieval-shots 16] [--retrieval-encoder minilm|base] [--retrieval-top-k 1] \
        [--random-draws 5] [--lorahub-bounds -1.5 1.5] \
        [--reuse-from OTHER_RUN ...] [--build-only]
    python full_evaluation.py --methods list        # every method, its kind and what it is

Methods come from the registry in src/compose.py: base, oracle (each task's own adapter),
moa (RUN/moa), arrow and smile (zero-shot per-token routing over RUN/adapters), retrieval (each
prompt to the experts of the tasks whose training prompts it resembles), every merge of src/merging.py
and its named variants, lorahub and its control random_merge (each of --random-draws seeded
draws evaluated, the cell their mean); "merges" and "all" expand. base and oracle are always
evaluated (the score is relative to the oracle). Each method's options are flags of their own
group.

Reads RUN/adapters/<task>/ and RUN/moa/; writes
    RUN/merged/<method>/                 each merge, built once and reused
    RUN/eval/cells/<method>/<task>.json  one finished (method, task), reused on rerun
    RUN/eval/predictions/<method>/<task>.jsonl
    RUN/eval/summary.json, results.csv, results.md
A rerun recomputes only missing or stale cells (another model, data, adapter, option or
generation setting); --force recomputes everything. An interrupted run resumes.
Several processes given the same command share the cells (a lock per cell); --reuse-from
takes matching finished cells from other run folders (the 5-task table's base and oracle
from the 7-task run on the same adapters).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tqdm.auto import tqdm

from src import compose, engines, models, runs, systems  # noqa: F401 (systems: registers every method)
from src import evaluation as ev
from src import tasks as task_registry
from src.cli import config_dict, parse_configs
from src.errors import UserError, run_main
from src.lora import check_adapter_fits
from src.models import load_base_model, local_config, resolve_device, resolve_dtype, same_model


# ----------------------------------------------------------------------------- config

@dataclass
class EvalConfig:
    """What to evaluate, on which data, and how to generate."""

    output_dir: str = field(default="", metadata={"help": "run folder (RUN): reads RUN/adapters, RUN/moa; writes RUN/eval"})
    model: str = field(default="smollm2-135m", metadata={"help": "base model: hub id, HF folder, .gguf file or alias"})
    tasks: str = field(default="5tasks", metadata={"help": "comma-separated task names or a preset (5tasks, 7tasks)"})
    methods: str = field(default="moa,concat,weight_sum,svd", metadata={
        "help": "comma-separated methods ('merges', 'all' expand); base and oracle are always added"})
    data: str = field(default="sample", metadata={"help": "evaluation data: sample (bundled), hub, or dir (with --data-dir)",
                                                  "choices": ["sample", "hub", "dir"]})
    data_dir: str | None = field(default=None, metadata={"help": "folder of <task>/<split>.jsonl (implies --data dir)"})
    split: str | None = field(default=None, metadata={"help": "split to evaluate on (default: test for the hub, "
                                                               "validation for local data)"})
    nli_source: str = field(default="multi_nli", metadata={"help": "hub dataset for nli: multi_nli or snli"})
    eval_size: int | None = field(default=None, metadata={
        "help": "examples per task (seeded subset; default all; the study: 500; local data: capped at what it holds)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per generation batch"})
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per example"})
    max_prompt_len: int = field(default=400, metadata={"help": "prompts keep their last N tokens"})
    scoring: str = field(default="toolkit", metadata={
        "help": "the protocol of the printed table: toolkit, or study (the reference study's metrics, raw "
                "generations); both are always written (summary.json, summary_study.json)",
        "choices": ["toolkit", "study"]})
    truncation_side: str = field(default="left", metadata={
        "help": "left: long prompts keep their last tokens (the task marker); right: their first (the "
                "study's tokenizer call most likely did this)", "choices": list(ev.TRUNCATION)})
    score_by: str = field(default="generate", metadata={
        "help": "generate, or likelihood: classification tasks pick the most likely label", "choices": list(ev.SCORE_BY)})
    seed: int = field(default=0, metadata={"help": "seed of the data subset and of the random merges (dare)"})
    reuse_from: tuple[str, ...] | None = field(default=None, metadata={
        "help": "other run folders whose finished cells are taken when their fingerprint matches "
                "(e.g. the 7-task run's base and oracle cells for a 5-task table on the same adapters)"})
    exclude_selection: bool = field(default=True, metadata={
        "help": "on the validation split, leave out the examples that chose the adapters' checkpoints and "
                "MoA's routers (recorded in their training_config.json); --no-exclude-selection takes the "
                "plain seeded subset, as runs before this option did"})
    force: bool = field(default=False, metadata={"help": "recompute every cell and merge"})
    build_only: bool = field(default=False, metadata={
        "help": "run the build steps (merges, searches, generated adapters) of the cells still to compute, "
                "evaluate nothing (run_reference.sh builds one task set while the other evaluates)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})

    def __post_init__(self):
        if not self.output_dir and self.methods != "list":
            raise UserError("--output-dir RUN is required")
        if self.data_dir is not None and self.data == "sample":
            self.data = "dir"  # --data-dir alone means local files from that folder
        if self.data != "dir" and self.data_dir is not None:
            raise UserError(f"--data-dir is only used with --data dir (got --data {self.data})")
        if self.data == "dir" and self.data_dir is None:
            raise UserError("--data dir needs --data-dir DIR")
        if self.split is None:
            self.split = "test" if self.data == "hub" else "validation"
        for name in ("batch_size", "max_new_tokens", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.eval_size is not None and self.eval_size < 1:
            raise UserError(f"--eval-size must be a positive integer, got {self.eval_size}")


def check_context(model, cfg) -> None:
    """A prompt of --max-prompt-len tokens plus --max-new-tokens must fit the model's context."""
    need = cfg.max_prompt_len + cfg.max_new_tokens
    models.check_context(model.config, need, f"--max-prompt-len {cfg.max_prompt_len} + --max-new-tokens "
                                             f"{cfg.max_new_tokens} = {need} tokens")


def note_other_base_models(adapters: dict, model: str) -> None:
    """A note (not an error: the shapes may well fit) for each adapter recorded for another base model."""
    for task, ad in adapters.items():
        base = ad.config.get("base_model_name_or_path") if isinstance(ad.config, dict) else None
        if base and not same_model(base, model):
            print(f"note: the {task} adapter was trained on {base}; evaluating it on {model}", file=sys.stderr)


def check_output_folders(run_dir: Path) -> None:
    """Every folder evaluation writes (eval/ and what is under it, merged/, plots/, analysis/) is
    writable, or can be created: UserError naming the first that is not."""
    tops = [runs.eval_dir(run_dir), run_dir / "merged", runs.plots_dir(run_dir), runs.analysis_dir(run_dir)]
    for top in tops:
        runs.check_writable(top)
        if top.is_dir():
            for sub in sorted(p for p in top.rglob("*") if p.is_dir()):
                runs.check_writable(sub)


def record_builds(run_dir: Path, built: dict) -> None:
    """RUN/eval/builds.json: each build step's wall time when it was made (the cost table reads
    it; a reused build keeps the time of the process that made it)."""
    import torch
    made = {m: b for m, b in built.items() if not b.reused}
    if not made:
        return
    path = runs.eval_dir(run_dir) / "builds.json"
    try:
        ledger = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); move it away to start a new one") from None
    for m, b in made.items():
        ledger[m] = {"seconds": round(b.seconds, 3), "where": str(b.where) if b.where else None,
                     "threads": torch.get_num_threads(), "git_commit": runs.git_commit(),
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    runs.write_json_atomic(path, ledger)


def main(argv=None):
    configs = compose.option_configs()
    (cfg, engine_cfg, *opts), _ = parse_configs(argv, "full_evaluation.py", __doc__.split("\n\n")[0], EvalConfig,
                                                 engines.EngineConfig, *configs)
    if cfg.methods == "list":
        print(compose.describe())
        return
    run_dir = Path(cfg.output_dir)
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ inputs, checked first
    tasks = task_registry.resolve_tasks(cfg.tasks)
    methods = compose.resolve_methods(cfg.methods)
    if engine_cfg.engine == "vllm" and cfg.score_by == "likelihood":
        raise UserError("--engine vllm generates; --score-by likelihood scores labels with the hf engine only")
    dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).removeprefix("torch.")
    env = compose.Env(run_dir, list(tasks), {type(o): o for o in opts}, cfg.seed, cfg.force,
                      model_name=cfg.model, dtype=dtype,
                      model_loader=lambda: load_base_model(cfg.model, cfg.device, cfg.dtype),
                      data={"data": cfg.data, "data_dir": cfg.data_dir, "hub_nli": cfg.nli_source})
    exclude = (compose.selection_ids(run_dir, tasks) if cfg.exclude_selection and cfg.split == "validation"
               and cfg.data != "hub" else {})
    data = task_registry.load_capped(tasks, cfg.split, cfg.data, cfg.data_dir, cfg.eval_size, cfg.seed,
                                     cfg.nli_source, exclude=exclude)
    env.eval_ids = {t: {ex.id for ex in exs} for t, exs in data.items()}   # shots never take an evaluated one
    compose.check_all(methods, env)        # every method's inputs; loads the adapters they read
    check_output_folders(run_dir)          # every folder it writes, before any work
    note_other_base_models(env.adapters, cfg.model)
    config = config_dict(cfg, engine_cfg, *opts)
    sizes = sorted({len(v) for v in data.values()})
    per_task = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    left_out = sum(len(v) for v in exclude.values())
    config["data_desc"] = (f"{cfg.data_dir or cfg.data} ({cfg.split}, {per_task} examples per task, seed {cfg.seed}"
                           + (f", the {left_out} that chose checkpoints left out" if left_out else "") + ")")
    config["selection_ids"] = exclude
    meta = runs.run_meta("full_evaluation.py", argv, config, cfg.seed, task_registry.data_hash(data))

    def on_vllm(method: str) -> bool:
        return engine_cfg.engine == "vllm" and compose.REGISTRY[method].on_vllm()

    def fingerprint(method: str, task: str) -> dict:
        common = {"model": cfg.model, "dtype": dtype, "data_hash": task_registry.data_hash({task: data[task]}),
                  **ev.Settings(cfg.max_new_tokens, cfg.max_prompt_len, cfg.score_by,
                                truncation_side=cfg.truncation_side).fingerprint()}
        if on_vllm(method):
            common["engine"] = "vllm"      # hf cells keep the fingerprints they always had
        return compose.fingerprint(method, task, env, common)

    reuse_from = [Path(p) for p in cfg.reuse_from or ()]
    for p in reuse_from:
        if not runs.eval_dir(p).is_dir():
            raise UserError(f"--reuse-from {p}: no evaluated run there (no {runs.eval_dir(p)})")

    def find(m: str, t: str) -> dict | None:
        return None if cfg.force else runs.find_cell(run_dir, m, t, fingerprint(m, t), reuse_from)

    cells: dict[tuple[str, str], dict] = {}
    pending: dict[str, list[str]] = {}
    for m in methods:
        for t in tasks:
            cell = find(m, t)
            if cell is None:
                pending.setdefault(m, []).append(t)
            else:
                cells[(m, t)] = cell

    # ------------------------------------------------------------------ build steps (before any
    # generation: a merge that cannot be built, e.g. ties with --rank in space ab, fails the run here)
    if pending:
        check_context(SimpleNamespace(config=local_config(cfg.model)), cfg)   # a local folder: before any build
    with runs.file_lock(run_dir):   # processes sharing RUN build each result once
        built = compose.build_all(list(pending), env)
        record_builds(run_dir, built)
    n_todo = sum(len(v) for v in pending.values())
    print(f"evaluating {len(methods)} methods x {len(tasks)} tasks on {cfg.model}: "
          f"{len(cells)} cells reused, {n_todo} to compute", file=sys.stderr)
    for method, b in built.items():
        took = "" if b.reused else f" ({b.seconds:.1f} s)"
        print(f"  {method}: {'reused' if b.reused else 'built'} {b.where or ''}".rstrip() + took, file=sys.stderr)
    if cfg.build_only:
        return

    # ------------------------------------------------------------------ model
    model = tokenizer = None
    if n_todo:
        model, tokenizer = env.model()     # loaded once: a search in the build step may have loaded it
        for ad in env.adapters.values():
            check_adapter_fits(model, ad)   # a wrong base model fails here, before any generation
        for m in pending:
            compose.REGISTRY[m].check_model(model, env)
        check_context(model, cfg)
    settings = ev.Settings(cfg.max_new_tokens, cfg.max_prompt_len, cfg.score_by, cfg.batch_size, cfg.truncation_side)

    def run_cell(method: str, task: str) -> None:
        m = compose.REGISTRY[method]
        draws = m.draws(env)               # None, or one evaluation per draw pooled into the cell (random_merge)
        bar = tqdm(total=len(data[task]) * len(draws or [None]), desc=f"{method}/{task}", unit="ex", leave=False,
                   disable=not sys.stderr.isatty())
        own = dataclasses.replace(settings, batch_size=min(settings.batch_size, m.max_batch or settings.batch_size))
        if on_vllm(method):
            bodies = [ev.evaluate_task(model, tokenizer, task, data[task], own, progress=bar.update,
                                       generator=served(method, task, draw))
                      for draw in (range(len(draws)) if draws is not None else [None])]
            body = bodies[0] if draws is None else ev.pool_draws(bodies, draws)
        elif draws is None:
            with m.prepare(model, env, task) as router:
                body = ev.evaluate_task(model, tokenizer, task, data[task], own, router=router, progress=bar.update)
        else:
            bodies = []
            for i in range(len(draws)):
                with m.prepare(model, env, task, draw=i) as router:
                    bodies.append(ev.evaluate_task(model, tokenizer, task, data[task], own, router=router,
                                                   progress=bar.update))
            body = ev.pool_draws(bodies, draws)
        bar.close()
        cells[(method, task)] = runs.save_cell(run_dir, method, task, fingerprint(method, task), body, meta)
        r = body["result"]
        speed = f", {body['tokens_per_s']:.0f} tok/s" if body["tokens_per_s"] else ""
        spread = (f", mean of {len(r['draws']['scores'])} draws {r['draws']['min']:.4f}-{r['draws']['max']:.4f}"
                  if "draws" in r else "")
        print(f"  {method:>16} / {task:<14} {r['primary']} {r['score']:.4f}  "
              f"({body['n']} ex, {body['seconds']:.1f} s{speed}{spread})", file=sys.stderr)

    def served(method: str, task: str, draw: int | None):
        """The vLLM engine's generation for one cell (src/engines.py): each prompt with its adapter."""
        def gen(ids, progress):
            s = compose.REGISTRY[method].served(model, tokenizer, env, task, ids, settings.batch_size, draw)
            names = [client.register(a, f"method {method}'s adapter for {task}") if a is not None
                     else engines.BASE_NAME for a in s.adapters]
            out = client.generate(ids, names, settings.max_new_tokens, tokenizer.eos_token_id,
                                  settings.batch_size, progress)
            return ev.Generated(out, tokenizer.batch_decode(out, skip_special_tokens=True), s.routing,
                                s.layer_shares, s.experts, s.layer_names)
        return gen

    # ------------------------------------------------------------------ run
    # Several processes may evaluate one run folder (one per GPU, or per CPU core): each
    # cell is claimed by a lock, a claimed cell is left to its holder and waited for at
    # the end, and a cell finished meanwhile is read, not recomputed. Each method's prepare()
    # restores the model on exit, so methods run in any order.
    def compute(method: str, todo: list[str], wait: bool) -> list[str]:
        """Evaluates `todo`'s cells of one method; returns the tasks another process holds."""
        held = []
        for task in todo:
            with runs.file_lock(runs.cell_lock(run_dir, method, task), wait) as mine:
                if not mine:
                    held.append(task)
                    continue
                cell = runs.find_cell(run_dir, method, task, fingerprint(method, task), reuse_from)
                if cell is not None and not cfg.force:
                    cells[(method, task)] = cell
                    continue
                run_cell(method, task)
        return held

    with contextlib.ExitStack() as stack:        # the vLLM server, when one is started, stops on leaving
        client = None
        if any(on_vllm(m) for m in pending):
            rank = engines.max_rank([*env.adapters.values(), *engines.adapters_in(built)])
            client = engines.connect(stack, engine_cfg, cfg.model, dtype, rank, runs.eval_dir(run_dir) / "vllm")
            meta["engine"] = {"engine": "vllm", "url": client.url, "vllm": engines.server_version(client.url)}
        held = {m: left for m in pending if (left := compute(m, pending[m], wait=False))}
        for method, todo in held.items():
            compute(method, todo, wait=True)

    # ------------------------------------------------------------------ save
    meta["seconds"] = round(time.perf_counter() - t_start, 2)
    paths = []
    for protocol in task_registry.SCORING:       # both protocols, from the same predictions
        summary = ev.summarize(cfg.model, tasks, methods, cells, meta, protocol)
        paths += ev.write_results(run_dir, summary)
        if protocol == cfg.scoring:
            printed = summary
    print(ev.results_markdown(printed))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main))
