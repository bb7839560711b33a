"""Command lines generated from config dataclasses.

Each config concern is one dataclass whose fields carry their help text in
`field(metadata={"help": ...})`; a CLI is `parse_configs(argv, TrainConfig, LoraConfig)`.
Flags are the field names with dashes (`--batch-size`). Presets are named dicts of
field values applied under whatever the user typed, so `--preset demo --lr 1e-3`
keeps the user's lr.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

from src.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def _unwrap(tp) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _add_field(group, f: dataclasses.Field, hints: Mapping[str, Any]) -> None:
    tp, _ = _unwrap(hints[f.name])
    flag = "--" + f.name.replace("_", "-")
    help_ = f.metadata.get("help", "")
    kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
    if f.default is not dataclasses.MISSING:
        help_ += f" (default: {f.default})"
    if tp is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_, **kw)
        return
    if typing.get_origin(tp) in (tuple, list):
        inner = typing.get_args(tp)[0]
        group.add_argument(flag, nargs="+", type=inner, help=help_, **kw)
        return
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]
    group.add_argument(flag, type=tp, help=help_, metavar=f.name.upper(), **kw)


def build_parser(prog: str, description: str, *configs: type, presets: Mapping[str, Mapping] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one group of flags per config dataclass."""
    parser = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=argparse.SUPPRESS,
                            help="named set of defaults; explicit flags override it")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    for cls in configs:
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(cls):
            if f.init and not f.metadata.get("cli") is False:
                _add_field(group, f, hints)
    return parser


def make_configs(values: Mapping[str, Any], *configs: type, preset: Mapping[str, Any] | None = None) -> list:
    """Instantiate each config from `preset` overridden by `values` (unknown keys ignored)."""
    merged = {**(preset or {}), **values}
    out = []
    for cls in configs:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in merged.items() if k in names}
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        out.append(cls(**kwargs))
    return out


def parse_configs(argv: Sequence[str] | None, prog: str, description: str, *configs: type,
                  presets: Mapping[str, Mapping] | None = None):
    """Parse argv into one instance per config class; returns (instances, namespace)."""
    parser = build_parser(prog, description, *configs, presets=presets)
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k not in ("preset", "debug")}
    preset = (presets or {}).get(getattr(ns, "preset", None), None)
    return make_configs(values, *configs, preset=preset), ns


def config_dict(*configs) -> dict:
    """JSON-ready dict of several config instances, keyed by class name."""
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}
