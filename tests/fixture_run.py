"""tests/fixtures/run_v1 (a tiny run: adapters, MoA, cells for sentiment, nli, qa) copied beside a
tiny model folder, and `full_evaluation.py` run on the copy as a user runs it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
TASKS = ["sentiment", "nli", "qa"]


def eval_command(*extra, eval_size: int = 3, batch_size: int = 4) -> list[str]:
    """`python full_evaluation.py ...` on RUN=run of the fixture's tasks with the tiny model
    (`[2:]` of it: the arguments, for `run_main(full_evaluation.main, ...)` in process)."""
    return [sys.executable, str(ROOT / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
            "--tasks", ",".join(TASKS), "--data", "sample", "--eval-size", str(eval_size),
            "--batch-size", str(batch_size), "--max-new-tokens", "3", "--max-prompt-len", "128",
            "--no-exclude-selection", *extra]


def fixture_run(where: Path, *fixed: str, **command):
    """(where/run, go): the fixture copied to where/run and a tiny model saved as where/tiny-qwen2;
    go(*extra) runs `eval_command(*fixed, *extra, **command)` in `where`, returns the CompletedProcess."""
    where = Path(where)
    shutil.copytree(FIXTURE, where / "run")
    save_tiny(where / "tiny-qwen2")

    def go(*extra):
        return subprocess.run(eval_command(*fixed, *extra, **command), cwd=where, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    return where / "run", go
