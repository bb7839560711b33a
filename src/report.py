"""The README's result tables from evaluated run folders: every method's multitask score with its
95% interval under both scoring protocols, the study's own numbers beside them, and the
per-task tables.

Usage:
    python -m src.report results/reference/7tasks results/reference/5tasks \
        [--zeroshot results/reference/zeroshot] [--without translation] [--pairs moa:arrow,moa:weight_sum] [--costs]
    python -m src.report --readme README.md [--check]   # regenerate (or check) its report blocks

Reads RUN/eval/summary.json (toolkit scoring) and RUN/eval/summary_study.json (the study's
scoring, from the same predictions); prints markdown. --without TASK adds each method's score
without that task (same resamples); --pairs A:B,... prints the paired bootstrap of each
difference A - B (src/paired.py), under both protocols and, with --without, without the task
too (from the run's cells or predictions).
"""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from src import compose, paired, systems  # noqa: F401 (systems: every method registered)
from src import evaluation as ev
from src.cli import command_parser
from src.errors import UserError, run_main
from src.evaluation import _fmt, results_rows
from src.runs import eval_dir, write_text_atomic

# The reference study's oracle-normalised multitask scores (its headline table).
STUDY = {
    "Qwen2-1.5B": {5: {"moa": 1.004, "weight_sum": 0.956, "concat": 0.955, "svd": 0.731, "base": 0.224},
                   7: {"moa": 1.002, "weight_sum": 0.790, "concat": 0.771, "svd": 0.704, "base": 0.242}},
    "Qwen2-0.5B": {5: {"moa": 0.999, "weight_sum": 0.613, "concat": 0.702, "svd": 0.681, "base": 0.223}},
}


def family(method: str) -> str:
    """The method's description in the table, from the registry (its summary, else its family)."""
    return compose.family(method) if method in compose.REGISTRY else "not in this version's registry"


def load(run: Path, protocol: str) -> dict:
    path = eval_dir(run) / ("summary.json" if protocol == "toolkit" else "summary_study.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); evaluate the run first") from None


def _score(entry: dict) -> str:
    if entry.get("multitask_score") is None:      # an oracle scored 0 on some task
        zero = ", ".join(entry.get("undefined_tasks") or ["a task"])
        d = entry.get("multitask_defined")
        if not d:
            return f"undefined (oracle 0 on {zero})"
        iv = d["interval"]
        return f"{_fmt(d['score'])} ({_fmt(iv[0])}-{_fmt(iv[1])}) without {zero}*" if iv else f"{_fmt(d['score'])} without {zero}*"
    iv = entry.get("multitask_interval")
    return f"{_fmt(entry['multitask_score'])} ({_fmt(iv[0])}-{_fmt(iv[1])})" if iv else _fmt(entry["multitask_score"])


def _without(entry: dict, task: str) -> str:
    w = (entry.get("without") or {}).get(task)
    if not w:
        return "n/a"
    iv = w["interval"]
    return f"{_fmt(w['score'])} ({_fmt(iv[0])}-{_fmt(iv[1])})" if iv else _fmt(w["score"])


def headline(run: Path, without: str | None = None) -> str:
    """Methods by toolkit score (oracle first, base last): family, both protocols (and without a
    task, when asked and the run has it), the study's rows."""
    toolkit, study = load(run, "toolkit"), load(run, "study")
    without = without if without in toolkit["tasks"] else None
    n = len(toolkit["tasks"])
    sources = [(model, sets[n]) for model, sets in STUDY.items() if n in sets]
    order = sorted(toolkit["methods"], key=lambda m: (m != "oracle", m == "base",
                                                      -(toolkit["methods"][m]["multitask_score"] or 0)))
    head = ["method", "kind", "toolkit scoring (95% interval)", "study's scoring (95% interval)",
            *([f"toolkit, without {without}"] if without else []), *[f"the study, {model}" for model, _ in sources]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in order:
        row = [f"`{m}`", family(m), _score(toolkit["methods"][m]),
               _score(study["methods"][m]) if m in study["methods"] else "n/a",
               *([_without(toolkit["methods"][m], without)] if without else []),
               *[f"{scores[m]:.3f}" if m in scores else "" for _, scores in sources]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _difference(e: dict | None) -> str:
    if e is None:
        return "n/a"
    lo, hi = e["interval"]
    return f"{e['difference']:+.3f} ({lo:+.3f} to {hi:+.3f}; ahead in {100 * e['a_better']:.0f}%)"


def pair_differences(run: Path, pairs: list[tuple[str, str]], without: str, also=()) -> dict:
    """{(a, b): the paired difference a - b without `without` (toolkit scoring)}, on the same
    resamples as summary.json's (`paired.without_each`), from the run's cells or predictions."""
    summary, cells = ev.load_cells(run, also)
    tasks = summary["tasks"]
    rest = [t for t in tasks if t != without]
    if any(summary["methods"]["oracle"]["per_task"][t]["oracle_score"] == 0 for t in rest):
        raise UserError(f"{run}: an oracle scores 0 on a task other than {without}: no score without {without}")
    methods = list(dict.fromkeys(["oracle", *[m for p in pairs for m in p]]))
    stats = ev.resampled_cells(tasks, methods, cells, "toolkit")
    scores = {m: sum(summary["methods"][m]["per_task"][t]["relative"] for t in rest) / len(rest) for m in methods}
    diffs = paired.differences(stats, rest, methods, scores)
    return {(a, b): paired.difference(diffs, a, b) for a, b in pairs}


def pairs_table(run: Path, pairs: list[tuple[str, str]], without: str | None = None, also=()) -> str:
    """The paired bootstrap of each difference: score A - score B, its 95% interval and the share
    of resamples where A is ahead, under both protocols (and without a task, when asked)."""
    toolkit, study = load(run, "toolkit"), load(run, "study")
    check_pairs(run, pairs)
    without = without if without in toolkit["tasks"] else None
    dropped = pair_differences(run, pairs, without, also) if without else {}
    head = ["A - B", "toolkit scoring", "study's scoring", *([f"toolkit, without {without}"] if without else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b in pairs:
        row = [f"`{a}` - `{b}`", _difference(paired.difference(toolkit.get("paired", {}).get("pairs", {}), a, b)),
               _difference(paired.difference(study.get("paired", {}).get("pairs", {}), a, b)),
               *([_difference(dropped[(a, b)])] if without else [])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def check_pairs(run: Path, pairs: list[tuple[str, str]]) -> None:
    methods = load(run, "toolkit")["methods"]
    for m in (m for p in pairs for m in p):
        if m not in methods:
            raise UserError(f"--pairs: {m} is not in {run} (its methods: {', '.join(methods)})")


def parse_pairs(text: str | None) -> list[tuple[str, str]]:
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        a, sep, b = item.strip().partition(":")
        if not sep or not a or not b:
            raise UserError(f"--pairs: {item.strip()!r} is not A:B (e.g. moa:arrow)")
        pairs.append((a, b))
    return pairs


def stage_seconds(run: Path) -> dict[str, float]:
    """{stage folder relative to RUN: its training wall time} from every stage record of the run
    (RUN/adapters/*, RUN/moa, RUN/compose/*; src/stages.py)."""
    from src.stages import INFO_NAME
    out = {}
    for path in [*sorted(run.glob(f"adapters/*/{INFO_NAME}")), run / "moa" / INFO_NAME,
                 *sorted(run.glob(f"compose/*/{INFO_NAME}"))]:
        if path.is_file():
            try:
                info = json.loads(path.read_text())
            except ValueError as e:
                raise UserError(f"{path}: unreadable ({e})") from None
            if isinstance(info, dict) and isinstance(info.get("elapsed_s"), (int, float)):
                out[str(path.parent.relative_to(run))] = float(info["elapsed_s"])
    return out


def costs(run: Path) -> str:
    """The cost of each method on this run's machine: the training of the run's stages (once per
    run), each method's build step (RUN/eval/builds.json) and its evaluation, per cell and in all."""
    summary = load(run, "toolkit")
    trained = stage_seconds(run)
    path = eval_dir(run) / "builds.json"
    try:
        builds = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    tasks = {k: v for k, v in trained.items() if k.startswith("adapters/") and not k.startswith("adapters/_")}
    others = "".join(f"; {k} {v:.0f} s" for k, v in trained.items() if k not in tasks)
    lines = [f"Training (once per run): the {len(tasks)} task adapters {sum(tasks.values()):.0f} s{others}", "",
             "| method | build (s) | evaluation per cell (s) | evaluation (s) | examples per cell |",
             "|---|---|---|---|---|"]
    for m, entry in summary["methods"].items():
        cells = list(entry["per_task"].values())
        total = sum(c["seconds"] for c in cells)
        build = f"{builds[m]['seconds']:.1f}" if m in builds else "-"
        lines.append(f"| `{m}` | {build} | {total / len(cells):.1f} | {total:.0f} | {max(c['n'] for c in cells)} |")
    return "\n".join(lines)


def per_task(run: Path, protocol: str = "toolkit") -> str:
    header, rows = results_rows(load(run, protocol))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# A generated block of a markdown file: `<!-- report: KIND RUN [without=TASK] [pairs=A:B,...]
# [also=RUN,...] -->`, the table, `<!-- /report -->`; KIND is headline, per_task, pairs or costs, and
# RUN is relative to the file's folder. A new block may be left empty (opener, closer) for --readme to fill;
# an opener without its closer is an error, never skipped.
BLOCK = re.compile(r"<!-- report: (?P<args>[^>]*?) -->\n(?:\n(?P<body>.*?)\n\n|\n?)<!-- /report -->", re.S)
OPENER = re.compile(r"<!-- report:")


def render(args: str, root: Path) -> str:
    """The table a block's arguments name, from the results under `root`."""
    kind, run, *rest = shlex.split(args) + [""]
    opts = dict(x.split("=", 1) for x in rest if "=" in x)
    run = root / run
    if kind == "headline":
        return headline(run, opts.get("without"))
    if kind == "per_task":
        return per_task(run, opts.get("protocol", "toolkit"))
    if kind == "costs":
        return costs(run)
    if kind == "pairs":
        also = [root / x for x in opts.get("also", "").split(",") if x]
        return pairs_table(run, parse_pairs(opts.get("pairs")), opts.get("without"), also)
    raise UserError(f"<!-- report: {args} -->: unknown kind {kind!r} (known: headline, per_task, pairs, costs)")


def stale_blocks(path: Path) -> tuple[str, list[str]]:
    """(the file's text with every block regenerated, the arguments of the blocks that changed)."""
    text = path.read_text(encoding="utf-8")
    stale = []
    blocks = [m.start() for m in BLOCK.finditer(text)]
    for m in OPENER.finditer(text):       # an opener that no block starts with would be skipped
        if m.start() not in blocks:
            line = text.count("\n", 0, m.start()) + 1
            raise UserError(f"{path}:{line}: a <!-- report: ... --> opener without its <!-- /report --> "
                            "(the opener, a blank line, the table, a blank line, the closer)")

    def fresh(m: re.Match) -> str:
        body = render(m["args"], path.parent)
        if body != (m["body"] or ""):
            stale.append(m["args"])
        return f"<!-- report: {m['args']} -->\n\n{body}\n\n<!-- /report -->"
    return BLOCK.sub(fresh, text), stale


def main(argv=None):
    parser = command_parser("python -m src.report", __doc__)
    parser.add_argument("runs", nargs="*", metavar="RUN", help="evaluated run folder(s)")
    parser.add_argument("--readme", default=None, metavar="FILE",
                        help="regenerate the file's <!-- report: ... --> blocks in place instead of printing")
    parser.add_argument("--check", action="store_true", help="with --readme: only say which blocks are stale (exit 1)")
    parser.add_argument("--zeroshot", default=None, metavar="RUN", help="the Text-to-LoRA hold-out run folder")
    parser.add_argument("--without", default=None, metavar="TASK", help="also each score without this task")
    parser.add_argument("--pairs", default=None, metavar="A:B,...", help="paired differences A - B to print")
    parser.add_argument("--costs", action="store_true", help="also each method's training, build and evaluation seconds")
    args = parser.parse_args(argv)
    if args.readme:
        path = Path(args.readme)
        if not path.is_file():
            raise UserError(f"--readme {path}: no such file")
        text, stale = stale_blocks(path)
        if args.check:
            for a in stale:
                print(f"stale: <!-- report: {a} -->")
            if stale:
                raise SystemExit(1)
            return
        if stale:
            write_text_atomic(path, text)
        print(f"{path}: {len(stale)} block(s) regenerated")
        return
    if not args.runs:
        raise UserError("name evaluated run folders (RUN ...) or --readme FILE")
    pairs = parse_pairs(args.pairs)
    for r in args.runs:     # every input checked before anything is printed
        check_pairs(Path(r), pairs)
    for r in args.runs:
        run = Path(r)
        n = len(load(run, "toolkit")["tasks"])
        print(f"### {n} tasks ({run})\n\n{headline(run, args.without)}\n\nPer task (toolkit scoring):\n\n{per_task(run)}\n")
        if pairs:
            also = [Path(x) for x in args.runs if Path(x) != run]
            print(f"Paired differences ({run}):\n\n{pairs_table(run, pairs, args.without, also)}\n")
        if args.costs:
            print(f"Costs ({run}):\n\n{costs(run)}\n")
    if args.zeroshot:
        run = Path(args.zeroshot)
        print(f"### Text-to-LoRA, held-out tasks ({run})\n\n{headline(run)}\n\nPer task (toolkit scoring):\n\n"
              f"{per_task(run)}\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
