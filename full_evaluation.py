"""Evaluate every method on every task: the study's table (SPEC sections 5 and 6).

Usage:
    python full_evaluation.py --model MODEL --output-dir RUN --tasks 5tasks \
        --methods moa,concat,weight_sum,svd [--data sample | --data hub | --data-dir DIR] \
        [--eval-size 500] [--batch-size 16] [--max-new-tokens 128] [--max-prompt-len 400] \
        [--score-by generate|likelihood] [--density 0.5] [--rank 8] [--seed 0] [--force]

Methods: base, oracle (each task's own adapter), moa (RUN/moa), every merge of
src/merging.py (concat, weight_sum, svd, task_arithmetic, ties, dare_linear, dare_ties) and
its named variants (svd_sum, svd_full, concat_unscaled, weight_avg); "merges" and "all"
expand. base and oracle are always evaluated (the score is relative to the oracle).

Reads RUN/adapters/<task>/ and RUN/moa/; writes
    RUN/merged/<method>/                 each merge, built once and reused
    RUN/eval/cells/<method>/<task>.json  one finished (method, task), reused on rerun
    RUN/eval/predictions/<method>/<task>.jsonl
    RUN/eval/summary.json, results.csv, results.md
A rerun recomputes only missing or stale cells (another model, data, adapter, option or
generation setting); --force recomputes everything. An interrupted run resumes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from src import evaluation as ev
from src import tasks as task_registry
from src.cli import config_dict, parse_configs
from src.errors import UserError, run_main
from src.lora import check_adapter_fits
from src.models import load_base_model, resolve_device, resolve_dtype


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
    score_by: str = field(default="generate", metadata={
        "help": "generate, or likelihood: classification tasks pick the most likely label", "choices": list(ev.SCORE_BY)})
    seed: int = field(default=0, metadata={"help": "seed of the data subset and of the random merges (dare)"})
    force: bool = field(default=False, metadata={"help": "recompute every cell and merge"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16"})

    def __post_init__(self):
        if not self.output_dir:
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


@dataclass
class MergeConfig:
    """Options of the merge methods; each method gets only those it takes."""

    density: float | None = field(default=None, metadata={"help": "ties / dare: share of entries kept"})
    rank: str | None = field(default=None, metadata={"help": "svd (and ties/dare in delta space): rank, or 'full'"})
    majority_sign: str | None = field(default=None, metadata={"help": "ties / dare_ties: total or frequency"})
    space: str | None = field(default=None, metadata={"help": "ties / dare: ab (PEFT) or delta"})
    weights: tuple[float, ...] | None = field(default=None, metadata={"help": "one weight per task (default 1 each)"})

    def __post_init__(self):
        if self.rank is not None and self.rank != "full":
            try:
                self.rank = int(self.rank)
            except ValueError:
                raise UserError(f"--rank must be a positive integer or 'full', got {self.rank!r}") from None
            if self.rank < 1:
                raise UserError(f"--rank must be a positive integer or 'full', got {self.rank}")
        if self.density is not None and not 0 < self.density <= 1:
            raise UserError(f"--density must be in (0, 1], got {self.density}")


def main(argv=None):
    (cfg, mcfg), _ = parse_configs(argv, "full_evaluation.py", __doc__.split("\n\n")[0], EvalConfig, MergeConfig)
    run_dir = Path(cfg.output_dir)
    t_start = time.perf_counter()

    # ------------------------------------------------------------------ inputs, checked first
    tasks = task_registry.resolve_tasks(cfg.tasks)
    methods = ev.resolve_methods(cfg.methods)
    if mcfg.weights is not None and len(mcfg.weights) != len(tasks):
        raise UserError(f"--weights has {len(mcfg.weights)} values for {len(tasks)} tasks")
    ev.check_inputs(run_dir, tasks, methods)
    data = ev.load_eval_data(tasks, cfg.split, cfg.data, cfg.data_dir, cfg.eval_size, cfg.seed, cfg.nli_source)
    needed = [*tasks, *(ev.moa_adapter_tasks(run_dir) if "moa" in methods else [])]   # oracle needs every task's
    adapters, digests = ev.load_run_adapters(run_dir, list(dict.fromkeys(needed)))
    merge_opts = {m: ev.merge_options(m, {"density": mcfg.density, "rank": mcfg.rank, "seed": cfg.seed,
                                          "majority_sign": mcfg.majority_sign, "space": mcfg.space})
                  for m in methods if m not in ev.FIXED_METHODS}
    config = config_dict(cfg, mcfg)
    sizes = sorted({len(v) for v in data.values()})
    per_task = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    config["data_desc"] = f"{cfg.data_dir or cfg.data} ({cfg.split}, {per_task} examples per task, seed {cfg.seed})"
    meta = ev.run_meta("full_evaluation.py", argv, config, cfg.seed, task_registry.data_hash(data))

    dtype = str(resolve_dtype(cfg.dtype, resolve_device(cfg.device))).removeprefix("torch.")

    def fingerprint(method: str, task: str) -> dict:
        fp = {"method": method, "task": task, "model": cfg.model, "dtype": dtype,
              "data_hash": task_registry.data_hash({task: data[task]}), **ev.Settings(
                  cfg.max_new_tokens, cfg.max_prompt_len, cfg.score_by).fingerprint()}
        if method == "oracle":
            fp["adapter"] = digests[task]
        elif method == "moa":
            fp["moa"] = {"files": ev.moa_digest(ev.moa_dir(run_dir)),
                         "adapters": [digests[t] for t in ev.moa_adapter_tasks(run_dir)]}
        elif method != "base":
            fp["merge"] = {"options": merge_opts[method], "weights": mcfg.weights,
                           "adapters": [digests[t] for t in tasks]}
        return fp

    cells: dict[tuple[str, str], dict] = {}
    pending: dict[str, list[str]] = {}
    for m in methods:
        for t in tasks:
            cell = None if cfg.force else ev.load_cell(run_dir, m, t, fingerprint(m, t))
            if cell is None:
                pending.setdefault(m, []).append(t)
            else:
                cells[(m, t)] = cell

    # ------------------------------------------------------------------ merges (before any generation:
    # a merge that cannot be built, e.g. ties without --density, fails the run here)
    merged = ev.build_merges(run_dir, [m for m in pending if m not in ev.FIXED_METHODS], tasks, adapters,
                             digests, merge_opts, mcfg.weights, force=cfg.force)
    n_todo = sum(len(v) for v in pending.values())
    print(f"evaluating {len(methods)} methods x {len(tasks)} tasks on {cfg.model}: "
          f"{len(cells)} cells reused, {n_todo} to compute", file=sys.stderr)
    for method, (_, reused) in merged.items():
        print(f"  merge {method}: {'reused' if reused else 'built'} {run_dir / 'merged' / method}", file=sys.stderr)

    # ------------------------------------------------------------------ model
    model = tokenizer = None
    if n_todo:
        model, tokenizer = load_base_model(cfg.model, cfg.device, cfg.dtype)
        for ad in adapters.values():
            check_adapter_fits(model, ad)   # a wrong base model fails here, before any generation
    settings = ev.Settings(cfg.max_new_tokens, cfg.max_prompt_len, cfg.score_by, cfg.batch_size)

    def run_cell(method: str, task: str, moa=None) -> None:
        bar = tqdm(total=len(data[task]), desc=f"{method}/{task}", unit="ex", leave=False,
                   disable=not sys.stderr.isatty())
        body = ev.evaluate_task(model, tokenizer, task, data[task], settings, moa=moa, progress=bar.update)
        bar.close()
        cells[(method, task)] = ev.save_cell(run_dir, method, task, fingerprint(method, task), body, meta)
        r = body["result"]
        speed = f", {body['tokens_per_s']:.0f} tok/s" if body["tokens_per_s"] else ""
        print(f"  {method:>16} / {task:<14} {r['primary']} {r['score']:.4f}  "
              f"({body['n']} ex, {body['seconds']:.1f} s{speed})", file=sys.stderr)

    # ------------------------------------------------------------------ run
    # moa goes last: it injects its layers into the model, the others need it plain.
    for method in sorted(pending, key=lambda m: m == "moa"):
        todo = pending[method]
        if method == "base":
            for task in todo:
                run_cell(method, task)
        elif method == "oracle":
            for task in todo:
                with ev.folded(model, adapters[task]):
                    run_cell(method, task)
        elif method == "moa":
            moa = ev.load_moa(model, run_dir, adapters)
            try:
                for task in todo:
                    run_cell(method, task, moa=moa)
            finally:
                moa.remove()
        else:
            with ev.folded(model, merged[method][0]):
                for task in todo:
                    run_cell(method, task)

    # ------------------------------------------------------------------ save
    meta["seconds"] = round(time.perf_counter() - t_start, 2)
    summary = ev.summarize(cfg.model, tasks, methods, cells, meta)
    paths = ev.write_results(run_dir, summary)
    print(ev.results_markdown(summary))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_main(main))
