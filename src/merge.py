"""Merge several LoRA adapters into one, without a router.

    python -m src.merge --method concat --out RUN/merged/concat RUN/adapters/[!_]*/   # every task (not _multitask)
    python -m src.merge --method weight_sum --weights 1 1 0.5 --out OUT A B C
    python -m src.merge --method svd --rank 16 --out OUT A B C
    python -m src.merge --method ties --density 0.2 --majority-sign total --out OUT A B C
    python -m src.merge --method dare_linear --density 0.5 --seed 1 --space delta --out OUT A B
    python -m src.merge --method knots --density 0.2 --merge-scale 0.8 --out OUT A B C
    python -m src.merge --method core_space --core-merge tsv --out OUT A B C
    python -m src.merge --method concat --out OUT --export-model MODEL_OUT --base BASE A B

Methods: concat, weight_sum, svd, task_arithmetic, ties, dare_linear, dare_ties, knots,
core_space, tsv, iso_c, and the variants svd_sum, svd_full, concat_unscaled, weight_avg,
core_space_tsv (see src/merging.py and docs/merging.md). --merge-scale auto needs a model and
training shots: it is an option of full_evaluation.py, not of this command.
Writes OUT/ (adapter_config.json, adapter_model.safetensors: a PEFT adapter) and
OUT/merge_info.json (method, options, weights, source adapters; the name evaluation's
merges use too); with --export-model,
also a plain Hugging Face model folder with the merged adapter folded into BASE's weights.
Bad input: one line `error: ...`, exit 2, nothing written. An output folder may not be,
hold or lie inside an input (even with --force).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from src import lorahub, merging, runs
from src.cli import build_parser, make_configs
from src.compose import Built, Env, Method, reuse_saved, static
from src.errors import UserError, run_main
from src.lora import Adapter, check_adapter_fits, export_merged_model, load_adapter, make_adapter, save_adapter
from src.lorahub import LoraHubConfig, ShotLoss
from src.merging import MERGES, VARIANTS, MergeConfig, merge_adapters, method_options
from src.models import load_base_model

METHODS = (*MERGES, *VARIANTS)


@dataclass
class MergeCommand:
    """What to merge and where (the method's options are MergeConfig's, shared with evaluation)."""

    method: str = field(default="", metadata={"help": "merge method: " + ", ".join(METHODS)})
    out: str = field(default="", metadata={"help": "output adapter folder"})
    seed: int | None = field(default=None, metadata={"help": "dare_linear/dare_ties: random seed; None: 0"})
    force: bool = field(default=False, metadata={"help": "replace existing output folders"})
    same_base: bool = field(default=False, metadata={
        "help": "the adapters name their base model differently but it is one model (e.g. a local copy of a hub "
                "model): merge them anyway (the merge records the first adapter's name)"})
    export_model: str | None = field(default=None, metadata={
        "help": "also write a plain HF model folder with the merge folded in (needs --base)"})
    base: str | None = field(default=None, metadata={"help": "base model for --export-model"})

    def __post_init__(self):
        if not self.method:
            raise UserError(f"--method is required (one of {', '.join(METHODS)})")
        if self.method not in METHODS:
            raise UserError(f"unknown merge method {self.method!r}; known: {', '.join(METHODS)}")
        if not self.out:
            raise UserError("--out is required")
        if (self.export_model is None) != (self.base is None):
            raise UserError("--export-model and --base go together")


def method_options_of(cmd: MergeCommand, opts: MergeConfig) -> dict:
    """The method options the user set (others keep the method's defaults)."""
    keys = ("rank", "density", "majority_sign", "space", "core_merge", "keep")
    out = {k: getattr(opts, k) for k in keys if getattr(opts, k) is not None}
    if opts.merge_scale == "auto":
        raise UserError("--merge-scale auto picks the scale on training shots with a model: use it with "
                        "full_evaluation.py; here give a number")
    if opts.merge_scale is not None:
        out["scale"] = float(opts.merge_scale)
    if cmd.seed is not None:
        out["seed"] = cmd.seed
    return out


def _free(folder: Path, force: bool, flag: str) -> None:
    if folder.exists() and not force:
        raise UserError(f"{flag} {folder} exists; pass --force to replace it")


def _apart(folder: Path, flag: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Refuse an output folder that is, holds or lies inside an input (resolved paths): writing
    it (with --force, replacing it) would destroy what is being read."""
    out = folder.resolve()
    for what, path in inputs:
        src = Path(path).resolve()
        if out == src:
            also = f" ({path})" if str(path) != str(folder) else ""
            raise UserError(f"{flag} {folder} is {what}{also}")
        if src in out.parents:
            raise UserError(f"{flag} {folder} lies inside {what}, {path}")
        if out in src.parents:
            raise UserError(f"{flag} {folder} contains {what}, {path}")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = build_parser("python -m src.merge", __doc__, MergeCommand, MergeConfig)
    parser.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="adapter folders to merge")
    ns = parser.parse_intermixed_args(argv)
    values = {k: v for k, v in vars(ns).items() if k not in ("debug", "adapters")}
    cfg, opts = make_configs(values, MergeCommand, MergeConfig)

    # ---- check everything before writing anything
    out = Path(cfg.out)
    inputs = [("one of the adapters being merged", d) for d in ns.adapters]
    if cfg.base and Path(cfg.base).exists():  # a local folder or file (not a hub id or alias)
        inputs.append(("the --base model", cfg.base))
    _apart(out, "--out", inputs)
    if cfg.export_model:
        _apart(Path(cfg.export_model), "--export-model", [*inputs, ("the --out folder", cfg.out)])
    _free(out, cfg.force, "--out")
    if cfg.export_model:
        _free(Path(cfg.export_model), cfg.force, "--export-model")
    for d in ns.adapters:
        if not Path(d).is_dir():
            raise UserError(f"adapter folder {d} does not exist")
    adapters = [load_adapter(d) for d in ns.adapters]
    if cfg.same_base:
        for a in adapters[1:]:
            a.config["base_model_name_or_path"] = adapters[0].base_model
    names = [a.name for a in adapters]
    for a, d in zip(adapters, ns.adapters):
        if names.count(a.name) > 1:   # two folders with the same last name: use the path
            a.name = str(d)
    method, options = method_options(cfg.method, **method_options_of(cfg, opts))

    # ---- merge
    merged = merge_adapters(adapters, cfg.method, list(opts.weights) if opts.weights else None,
                            **method_options_of(cfg, opts))
    base_model = None
    if cfg.export_model:
        base_model, tokenizer = load_base_model(cfg.base, device="cpu", dtype="auto")
        check_adapter_fits(base_model, merged)

    # ---- save
    record = {
        "method": cfg.method, "registry_method": method, "options": options,
        "weights": list(opts.weights) if opts.weights else [1.0] * len(adapters),
        "sources": [{"name": a.name, "path": str(Path(d).resolve()), "base_model": a.base_model,
                     "ranks": sorted(set(a.ranks.values())), "target_modules": a.target_modules}
                    for a, d in zip(adapters, ns.adapters)],
        "config": {**dataclasses.asdict(cfg), **dataclasses.asdict(opts)},
    }
    save_adapter(merged, out, extra_json={"merge_info.json": record})
    print(f"merged {len(adapters)} adapters with {cfg.method} -> {out}")
    if base_model is not None:
        export_merged_model(base_model, merged, cfg.export_model, tokenizer)
        print(f"exported merged model -> {cfg.export_model}")
    return out


# --------------------------------------------------------------------------- registry entries

def merge_options(method: str, options: dict) -> dict:
    """The subset of `options` (None = unset) that a merge method takes, its variant's preset
    included: --density means nothing to concat, so it is not passed to it (nor recorded
    in its fingerprint)."""
    name, resolved = merging.resolve_method(method, {})
    takes = set(merging.options_of(merging.MERGES[name]))
    if "generator" in takes:
        takes.add("seed")
    chosen = {k: v for k, v in options.items() if v is not None and k in takes}
    return {**resolved, **chosen}


class Merge(Method):
    """One router-free merge of src/merging.py over the evaluated tasks' adapters, folded (the
    registry holds one per method and variant of src/merging.py)."""

    configs = (MergeConfig,)

    def __init__(self, name: str):
        self.name = name
        self.groups = ("merges",) if name in merging.MERGES else ()
        base, preset = merging.resolve_method(name, {})
        if "scale" in merging.options_of(merging.MERGES[base]):
            self.configs = (MergeConfig, LoraHubConfig)    # --merge-scale auto scores on LoraHub's shots
        first = " ".join((merging.MERGES[base].__doc__ or "").strip().split("\n\n")[0].split())
        self.help = first.split(". ")[0].rstrip(".")       # the docstring's first sentence
        if name in merging.VARIANTS:
            self.help = f"{base} with {', '.join(f'{k}={v!r}' for k, v in preset.items())}"

    def options(self, env: Env) -> dict:
        c = env.opt(MergeConfig)
        scale = c.merge_scale if c.merge_scale in (None, "auto") else float(c.merge_scale)
        options = merge_options(self.name, {"density": c.density, "rank": c.rank, "seed": env.seed,
                                            "majority_sign": c.majority_sign, "space": c.space,
                                            "core_merge": c.core_merge, "keep": c.keep, "scale": scale})
        base = merging.resolve_method(self.name, {})[0]
        if "density" in merging.options_of(merging.MERGES[base]) and "density" not in options:
            options["density"] = merging.DENSITY      # the default, recorded (a changed default is a new cell)
        return options

    def scale_search(self, env: Env) -> dict | None:
        """What --merge-scale auto depends on (None when the scale is not searched)."""
        if self.options(env).get("scale") != "auto":
            return None
        hub = env.opt(LoraHubConfig)
        return {"grid": list(env.opt(MergeConfig).merge_scale_grid), "shots": hub.lorahub_shots,
                "max_len": hub.lorahub_max_len, "seed": env.seed, "model": env.model_name, "dtype": env.dtype,
                "shot_data": lorahub.shot_hash(env, env.tasks)}

    def check(self, env):
        super().check(env)
        w = env.opt(MergeConfig).weights
        if w is not None and len(w) != len(env.tasks):
            raise UserError(f"--weights has {len(w)} values for {len(env.tasks)} tasks")
        if self.options(env).get("scale") == "auto":
            env.shots(env.tasks, env.opt(LoraHubConfig).lorahub_shots)      # enough shots, before any build

    def fingerprint(self, env, task):
        fp = {"options": self.options(env), "weights": env.opt(MergeConfig).weights,
              "adapters": [env.digests[t] for t in env.tasks]}
        if (searched := self.scale_search(env)) is not None:
            fp["scale_search"] = searched
        return {"merge": fp}

    def build(self, env):
        """RUN/merged/<method>/ reused when made from the same adapters, options and weights."""
        weights = env.opt(MergeConfig).weights
        folder = runs.merged_dir(env.run_dir, self.name)
        recipe = {"method": self.name, "tasks": list(env.tasks), "options": self.options(env),
                  "weights": list(weights) if weights is not None else None,
                  "adapters": {t: env.digests[t] for t in env.tasks}}
        searched = self.scale_search(env)
        if searched is not None:
            recipe["scale_search"] = searched
        reused = reuse_saved(folder, recipe, env.force)
        if reused is not None:
            return Built(reused, True, where=folder)
        options = self.options(env)
        if searched is not None:
            options["scale"] = 1.0
        merged = merging.merge_adapters([env.adapters[t] for t in env.tasks], self.name,
                                        list(weights) if weights is not None else None, **options)
        record = {"recipe": recipe}
        if searched is not None:   # the coefficient from the grid, on training shots only
            model, tokenizer = env.model()
            check_adapter_fits(model, merged)
            shots = env.shots(env.tasks, searched["shots"])
            hub = env.opt(LoraHubConfig)
            loss = ShotLoss(model, tokenizer, [ex for t in env.tasks for ex in shots[t]], hub.lorahub_max_len,
                            hub.lorahub_batch_size)
            found = lorahub.scale_search(model, merged, loss, searched["grid"])
            merged = scaled(merged, found["chosen"])
            record["scale_search"] = {**found, "shot_ids": {t: [ex.id for ex in shots[t]] for t in env.tasks}}
            print(f"  {self.name}: --merge-scale auto chose {found['chosen']} (shot loss "
                  f"{min(found['losses']):.4f}; grid {found['grid']})", file=sys.stderr)

        def save():
            save_adapter(merged, folder, extra_json={"merge_info.json": record})
            return load_adapter(folder)   # exactly what a rerun will read
        return Built(merged, False, save, folder)

    def prepare(self, model, env, task):
        return static(model, env.built[self.name])


def scaled(adapter: Adapter, c: float) -> Adapter:
    """`adapter` with every delta multiplied by c (folded into A; ranks and scales kept)."""
    return make_adapter({n: (a * c, b) for n, (a, b) in adapter.factors.items()}, dict(adapter.scales),
                        adapter.base_model, name=adapter.name)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
