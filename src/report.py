"""The README's result tables from evaluated run folders: every method's multitask score with its
95% interval under both scoring protocols, the study's own numbers beside them, and the
per-task tables.

Usage:
    python -m src.report results/reference/7tasks results/reference/5tasks \
        [--zeroshot results/reference/zeroshot]

Reads RUN/eval/summary.json (toolkit scoring) and RUN/eval/summary_study.json (the study's
scoring, from the same predictions); prints markdown.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from src import compose, systems  # noqa: F401 (systems: every method registered)
from src.cli import command_parser
from src.errors import UserError, run_main
from src.evaluation import _fmt, results_rows
from src.runs import eval_dir

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


def headline(run: Path) -> str:
    """Methods by toolkit score (oracle first, base last): family, both protocols, the study's rows."""
    toolkit, study = load(run, "toolkit"), load(run, "study")
    n = len(toolkit["tasks"])
    sources = [(model, sets[n]) for model, sets in STUDY.items() if n in sets]
    order = sorted(toolkit["methods"], key=lambda m: (m != "oracle", m == "base",
                                                      -(toolkit["methods"][m]["multitask_score"] or 0)))
    head = ["method", "kind", "toolkit scoring (95% interval)", "study's scoring (95% interval)",
            *[f"the study, {model}" for model, _ in sources]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in order:
        row = [f"`{m}`", family(m), _score(toolkit["methods"][m]),
               _score(study["methods"][m]) if m in study["methods"] else "n/a",
               *[f"{scores[m]:.3f}" if m in scores else "" for _, scores in sources]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_task(run: Path, protocol: str = "toolkit") -> str:
    header, rows = results_rows(load(run, protocol))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None):
    parser = command_parser("python -m src.report", __doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="evaluated run folder(s)")
    parser.add_argument("--zeroshot", default=None, metavar="RUN", help="the Text-to-LoRA hold-out run folder")
    args = parser.parse_args(argv)
    for r in args.runs:
        run = Path(r)
        n = len(load(run, "toolkit")["tasks"])
        print(f"### {n} tasks ({run})\n\n{headline(run)}\n\nPer task (toolkit scoring):\n\n{per_task(run)}\n")
    if args.zeroshot:
        run = Path(args.zeroshot)
        print(f"### Text-to-LoRA, held-out tasks ({run})\n\n{headline(run)}\n\nPer task (toolkit scoring):\n\n"
              f"{per_task(run)}\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
