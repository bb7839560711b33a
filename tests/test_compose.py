"""The composition registry: every method through one interface, with unchanged results."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
V1_METHODS = ["oracle", "moa", "concat", "weight_sum", "svd", "task_arithmetic", "ties", "dare_linear",
              "dare_ties", "svd_sum", "svd_full", "concat_unscaled", "weight_avg", "base"]


def test_cells_made_before_the_registry_are_reused(tmp_path):
    """Fingerprints of base, oracle, every merge and MoA are byte-identical to the old code's:
    a run folder evaluated before the refactor is reused whole (its model is not even present)."""
    shutil.copytree(FIXTURE, tmp_path / "run")
    cmd = [sys.executable, str(ROOT / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
           "--tasks", "sentiment,nli,qa", "--methods", ",".join(V1_METHODS), "--data", "sample",
           "--eval-size", "2", "--batch-size", "4", "--max-new-tokens", "4", "--max-prompt-len", "128",
           "--density", "0.5"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    n = len(V1_METHODS) * 3
    assert f"{n} cells reused, 0 to compute" in out.stderr, out.stderr[-3000:]
    assert (tmp_path / "run" / "eval" / "summary.json").is_file()
