"""kill -9 beyond training: during a merge build and during evaluation's summary write. The
process really dies (SIGKILL at the worst moment, from inside a patched writer); no partial
file is ever visible, and a rerun gives the uninterrupted result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.lora import load_adapter
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
ARGS = ["--model", "tiny-qwen2", "--output-dir", "run", "--tasks", "sentiment,nli,qa", "--methods", "concat,svd",
        "--data", "sample", "--eval-size", "2", "--batch-size", "4", "--max-new-tokens", "3",
        "--max-prompt-len", "128", "--no-exclude-selection"]

# Runs full_evaluation.main in a process that SIGKILLs itself at a chosen moment.
KILLER = """
import os, signal, sys
sys.argv = ["full_evaluation.py", *sys.argv[2:]]
where = sys.argv_where = {where!r}
import src.lora, src.runs
if where == "merge":                      # after the merged adapter's tensors hit the disk
    real = src.lora.save_file
    def save_file(*a, **k):
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    src.lora.save_file = save_file
else:                                     # the summary's temporary file written, not yet renamed
    real = os.replace
    def replace(src_, dst, *a, **k):
        if str(dst).endswith("summary.json"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src_, dst, *a, **k)
    os.replace = replace
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _folder(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    root.mkdir()
    shutil.copytree(FIXTURE, root / "run")
    shutil.rmtree(root / "run" / "eval")                 # every cell computed here
    save_tiny(root / "tiny-qwen2")
    return root


def _evaluate(root: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    if kill is None:
        cmd = [sys.executable, str(ROOT / "full_evaluation.py"), *ARGS]
    else:
        code = KILLER.format(where=kill, script=str(ROOT / "full_evaluation.py"))
        cmd = [sys.executable, "-c", code, "x", *ARGS]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=_env())


def _visible(run: Path) -> set[str]:
    """Every path under run that a reader could take for a result (hidden temp files excluded)."""
    return {str(p.relative_to(run)) for p in run.rglob("*") if not any(part.startswith(".") for part in p.parts)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = _folder(tmp_path_factory.mktemp("whole"), "r")
    out = _evaluate(root)
    assert out.returncode == 0, out.stderr[-2000:]
    return root / "run"


def _scores(run: Path) -> dict:
    summary = json.loads((run / "eval" / "summary.json").read_text())
    return {m: (r["multitask_score"], {t: c["score"] for t, c in r["per_task"].items()})
            for m, r in summary["methods"].items()}


@pytest.mark.parametrize("where", ["merge", "summary"])
def test_kill_then_rerun_gives_the_uninterrupted_result(where, tmp_path, uninterrupted):
    root = _folder(tmp_path, "r")
    run = root / "run"
    killed = _evaluate(root, kill=where)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    seen = _visible(run)
    if where == "merge":                 # the merge's tensors were written: no merged folder is visible
        assert not any(p.startswith("merged/concat") for p in seen), seen
        assert not (run / "eval").exists()
    else:                                # every cell was finished; the summary never half-written
        assert not (run / "eval" / "summary.json").exists()
        assert (run / "eval" / "cells" / "svd" / "qa.json").is_file()
    again = _evaluate(root)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _scores(run) == _scores(uninterrupted)
    for m in ("concat", "svd"):
        ours, want = load_adapter(run / "merged" / m), load_adapter(uninterrupted / "merged" / m)
        for n in want.factors:
            assert torch.equal(ours.delta(n), want.delta(n))
    if where == "summary":
        assert "cells reused, 0 to compute" in again.stderr
