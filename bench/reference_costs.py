"""What the reference run cost, from its own records: training and evaluation throughput per
method, and each build step's wall time (bench/RESULTS.md "Reference run").

Usage:
    python bench/reference_costs.py runs/reference runs/reference-5tasks runs/reference-zeroshot

Reads each RUN's adapters/*/training_config.json, moa/ and compose/*/training_config.json (the
trained stages), eval/cells/*/*.json (one per evaluated method and task: its seconds, prompt and
generated tokens) and logs/*.log (the "<method>: built ... (S s)" lines of full_evaluation.py).
Cells taken from another run folder (--reuse-from) are counted once, where they were computed.
Prints markdown.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

BUILT = re.compile(r"^\s+(\S+): built (\S+) \(([\d.]+) s\)")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_rows(run: Path, seen: set) -> list[list[str]]:
    """Each trained stage once: an adapter or hypernetwork copied into another run folder (the
    5-task set's adapters, the hold-out run's) is counted where it was trained."""
    rows = []
    for path in sorted(run.glob("adapters/*/training_config.json")):
        d = _json(path) or {}
        if d.get("tokens") and d.get("elapsed_s") and ("adapter", d["task"], d["elapsed_s"]) not in seen:
            seen.add(("adapter", d["task"], d["elapsed_s"]))
            rows.append([f"adapter {d['task']}", str(d.get("steps")), f"{d['tokens']:,}", f"{d['elapsed_s']:.0f}",
                         f"{d['tokens'] / d['elapsed_s']:.0f}"])
    stages = [("moa", run / "moa" / "training_config.json")]
    stages += [(p.parent.name, p) for p in sorted(run.glob("compose/*/training_config.json"))]
    for name, path in stages:
        d = _json(path)
        if not d or not d.get("elapsed_s") or (name, d["elapsed_s"]) in seen:
            continue
        seen.add((name, d["elapsed_s"]))
        tokens = d.get("tokens")
        rows.append([name, str(d.get("steps")), f"{tokens:,}" if tokens else "-", f"{d['elapsed_s']:.0f}",
                     f"{tokens / d['elapsed_s']:.0f}" if tokens else "-"])
    return rows


def eval_totals(run: Path, seen: set) -> dict[str, dict]:
    out: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for path in sorted(run.glob("eval/cells/*/*.json")):
        cell = _json(path)
        if not cell:
            continue
        key = json.dumps(cell.get("fingerprint"), sort_keys=True)
        if key in seen:                      # the same cell, copied in from another run folder
            continue
        seen.add(key)
        t = out[cell["method"]]
        t["cells"] += 1
        t["n"] += cell["n"]
        t["seconds"] += cell["seconds"]
        t["prompt_tokens"] += sum(r.get("prompt_tokens", 0) for r in cell["records"])
        t["new_tokens"] += cell.get("new_tokens") or 0
    return out


def build_rows(runs: list[Path]) -> list[list[str]]:
    """The first build of each result (a later process regenerating a cheap one, e.g. t2l's
    adapters, or finding a hold-out hypernetwork cached, is left out), by time of the log."""
    rows, seen = [], set()
    logs = {p for run in runs for p in run.glob("logs/*.log")}
    for log in sorted(logs, key=lambda p: p.stat().st_mtime):
        for line in log.read_text(errors="replace").splitlines():
            m = BUILT.match(line)
            if m and m[2] not in seen:
                seen.add(m[2])
                rows.append([m[1], m[2], f"{float(m[3]):.1f}"])
    return rows


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    runs = [Path(a) for a in argv]
    for run in runs:
        if not run.is_dir():
            print(f"error: {run} is not a run folder", file=sys.stderr)
            sys.exit(2)
    seen: set = set()
    trained: set = set()
    for run in runs:
        print(f"### {run}\n")
        rows = training_rows(run, trained)
        if rows:
            print("Training (one process, one thread):\n")
            print(table(["stage", "steps", "tokens", "seconds", "tokens/s"], rows) + "\n")
        totals = eval_totals(run, seen)
        if totals:
            print("Evaluation (cells computed in this folder):\n")
            erows = []
            for method, t in sorted(totals.items(), key=lambda kv: -kv[1]["seconds"]):
                s = t["seconds"]
                erows.append([method, f"{t['cells']:.0f}", f"{t['n']:.0f}", f"{t['prompt_tokens']:,.0f}",
                              f"{t['new_tokens']:,.0f}", f"{s:.0f}", f"{t['prompt_tokens'] / s:.0f}",
                              f"{t['new_tokens'] / s:.1f}", f"{s / t['n']:.2f}"])
            print(table(["method", "cells", "examples", "prompt tokens", "generated tokens", "seconds",
                         "prompt tokens/s", "generated tokens/s", "s / example"], erows) + "\n")
    brows = build_rows(runs)
    if brows:
        print("### Build steps (each result's first build)\n")
        print(table(["method", "written to", "seconds"], brows) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
