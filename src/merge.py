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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from src.cli import build_parser, make_configs
from src.compose import MergeConfig
from src.errors import UserError, run_main
from src.lora import check_adapter_fits, export_merged_model, load_adapter, save_adapter
from src.merging import MERGES, VARIANTS, merge_adapters, method_options
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


if __name__ == "__main__":
    raise SystemExit(run_main(main))
