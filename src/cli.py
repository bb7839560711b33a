"""Command lines generated from config dataclasses.

Each config concern is one dataclass whose fields carry their help text in
`field(metadata={"help": ...})`; a CLI is `parse_configs(argv, TrainConfig, LoraConfig)`.
Flags are the field names with dashes (`--batch-size`). Presets are named dicts of
field values applied under whatever the user typed, so `--preset demo --lr 1e-3`
keeps the user's lr.

`-h` shows the calling module's whole docstring (usage, examples) even when the caller
passes only its first paragraph, one group per dataclass titled by its `title` attribute
or its name ("EvalConfig" -> "Evaluation options") with its docstring's first line below,
and a field's default unless it is empty ("" or None: typically a required flag or
"decided later") or the help text already states it.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from typing import Any, Mapping, Sequence

from src.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2) instead of printing usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{self.prog}: {message}")


def command_parser(prog: str, description: str | None, debug: bool = True) -> _Parser:
    """The parser of a `python -m src.X` command: errors in one line (exit 2), the description as
    written, and --debug (full tracebacks; `errors.run_main` reads it) unless `debug` is False."""
    p = _Parser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if debug:
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def _unwrap(tp) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _show_default(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def field_help(f: dataclasses.Field) -> str:
    """A field's help text plus its default, for argparse (a literal % doubled).

    The default is left out when it is "" or None (a required flag, or one whose absence
    means something the help text says) and when the help text already mentions a default."""
    help_ = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = None
    if default not in ("", None, (), []) and not re.search(r"\bdefault\b", help_, re.IGNORECASE):
        help_ += f" (default: {_show_default(default)})"
    return help_.replace("%", "%%")


def _add_field(group, f: dataclasses.Field, hints: Mapping[str, Any]) -> None:
    tp, _ = _unwrap(hints[f.name])
    flag = "--" + f.name.replace("_", "-")
    help_ = field_help(f)
    kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
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


# Words of config class names spelled out in group titles ("EvalConfig" -> "Evaluation options").
_TITLE_WORDS = {"Eval": "Evaluation", "Train": "Training", "Lora": "LoRA", "LoraHub": "LoraHub",
                "Router": "MoA router", "MoA": "MoA"}


def group_title(cls: type) -> str:
    """The heading of a config's flags in -h: its `title` class attribute when it has one
    (not a field), else its name without "Config", words spelled out, + " options"."""
    title = cls.__dict__.get("title")
    if isinstance(title, str) and title.strip():
        return title.strip()
    stem = re.sub(r"(Config|Options)$", "", cls.__name__) or cls.__name__
    if stem in _TITLE_WORDS:
        return f"{_TITLE_WORDS[stem]} options"
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z][a-z0-9]*|[a-z0-9]+", stem) or [stem]
    words = [_TITLE_WORDS.get(w, w) for w in words]
    words = [words[0]] + [w if w.isupper() or w in _TITLE_WORDS.values() else w.lower() for w in words[1:]]
    return " ".join(words) + " options"


def full_description(description: str | None) -> str | None:
    """The calling module's whole docstring when `description` is its beginning.

    Commands pass `__doc__.split("\n\n")[0]` (a first line fit for a one-line summary); -h
    should show the usage and examples that follow it. The caller is the first frame
    outside this module; any other description is kept as it is."""
    if not description or not description.strip():
        return description
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    doc = frame.f_globals.get("__doc__") if frame is not None else None
    if isinstance(doc, str) and doc.strip().startswith(description.strip()):
        return doc.strip()
    return description


def build_parser(prog: str, description: str, *configs: type, presets: Mapping[str, Mapping] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with one group of flags per config dataclass.

    A description that is the beginning of the calling module's docstring is shown whole
    (`full_description`)."""
    parser = _Parser(prog=prog, description=full_description(description),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=argparse.SUPPRESS,
                            help="named set of defaults; explicit flags override it")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    for cls in configs:
        hints = typing.get_type_hints(cls)
        doc = (cls.__doc__ or "").strip()
        if doc.startswith(cls.__name__ + "("):   # the docstring dataclass writes for a class without one
            doc = ""
        group = parser.add_argument_group(group_title(cls), doc.splitlines()[0] if doc else None)
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
    parser = build_parser(prog, full_description(description), *configs, presets=presets)
    ns = parser.parse_args(argv)
    values = {k: v for k, v in vars(ns).items() if k not in ("preset", "debug")}
    preset = (presets or {}).get(getattr(ns, "preset", None), None)
    return make_configs(values, *configs, preset=preset), ns


def config_dict(*configs) -> dict:
    """JSON-ready dict of several config instances, keyed by class name."""
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}


def check_positive_ints(cfg, *names: str) -> None:
    """In a config's __post_init__: each field of `names` is None or an int >= 1 (not a bool), else
    one line naming its flag: "--smile-top-k must be a positive integer, got 0"."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
