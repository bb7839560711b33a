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
           "--density", "0.5", "--no-exclude-selection"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    n = len(V1_METHODS) * 3
    assert f"{n} cells reused, 0 to compute" in out.stderr, out.stderr[-3000:]
    assert (tmp_path / "run" / "eval" / "summary.json").is_file()


SYSTEMS = ROOT / "tests" / "fixtures" / "run_v1_systems"     # cells and build caches of the newer systems
SYSTEM_OPTIONS = ["--lorahub-budget", "3", "--lorahub-shots", "2", "--random-draws", "2", "--retrieval-shots", "4"]


def test_cells_of_the_routers_searches_and_controls_are_reused(tmp_path):
    """Arrow, SMILE, LoraHub, its random control and retrieval: their cells (and LoraHub's,
    random_merge's and retrieval's build caches), made by the code before the registry's split into
    one module per system, are reused whole; no search, draw or embedding is made again."""
    shutil.copytree(FIXTURE, tmp_path / "run")
    shutil.copytree(SYSTEMS, tmp_path / "run", dirs_exist_ok=True)
    methods = ["arrow", "smile", "lorahub", "random_merge", "retrieval"]
    cmd = [sys.executable, str(ROOT / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
           "--tasks", "sentiment,nli,qa", "--methods", ",".join(methods), "--data", "sample",
           "--eval-size", "2", "--batch-size", "4", "--max-new-tokens", "4", "--max-prompt-len", "128",
           "--density", "0.5", "--no-exclude-selection", *SYSTEM_OPTIONS]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{(len(methods) + 2) * 3} cells reused, 0 to compute" in out.stderr, out.stderr[-3000:]
    for m in ("lorahub", "random_merge", "retrieval"):   # their cells gone, their build caches still match
        shutil.rmtree(tmp_path / "run" / "eval" / "cells" / m)
    built = subprocess.run([*cmd, "--build-only"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr[-3000:]          # no model folder: nothing could be built anew
    for m in ("lorahub", "random_merge", "retrieval"):
        assert f"{m}: reused" in built.stderr, built.stderr[-3000:]


def test_arrow_through_full_evaluation(tmp_path):
    """`--methods arrow` evaluates, records each expert's share per example and per layer,
    reuses its cells on rerun, and a bad option fails with one line before anything is written."""
    import json
    from tiny import save_tiny
    shutil.copytree(FIXTURE, tmp_path / "run")
    save_tiny(tmp_path / "tiny-qwen2")
    base = [sys.executable, str(ROOT / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
            "--tasks", "sentiment,nli,qa", "--data", "sample", "--eval-size", "2", "--batch-size", "4",
            "--max-new-tokens", "4", "--max-prompt-len", "128", "--no-exclude-selection"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def run(*extra):
        return subprocess.run([*base, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)

    bad = run("--methods", "arrow", "--arrow-top-k", "4")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --arrow-top-k 4 is more than the 3 experts (sentiment, nli, qa)"]
    assert not (tmp_path / "run" / "eval" / "cells" / "arrow").exists()
    out = run("--methods", "arrow", "--arrow-top-k", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 cells reused, 3 to compute" in out.stderr            # base and oracle from the fixture
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    table = summary["routing"]["arrow"]
    assert table["kind"] == "token" and set(table["share"]) == {"sentiment", "nli", "qa"}
    assert len(table["per_layer"]["qa"]) == len(table["layers"]) == 12      # 2 blocks x 6 modules
    rec = json.loads((tmp_path / "run" / "eval" / "predictions" / "arrow" / "qa.jsonl").read_text().splitlines()[0])
    assert abs(sum(rec["expert_share"].values()) - 1) < 1e-4
    assert "0 to compute" in run("--methods", "arrow", "--arrow-top-k", "2").stderr
    assert "3 to compute" in run("--methods", "arrow", "--arrow-top-k", "1").stderr     # an option is in the fingerprint
    from src import analysis
    written = {p.name for p in analysis.plot_run(tmp_path / "run", cosines=False)}
    assert {"routing_arrow.png", "routing_arrow_per_layer.png"} <= written


def test_unknown_methods_name_the_known_ones():
    import pytest
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    from src.errors import UserError
    assert compose.resolve_methods("arrow,merges")[:3] == ["oracle", "arrow", "concat"]
    with pytest.raises(UserError, match="unknown method .nope.; known: base, oracle, moa, moa_study, arrow, lora_mixer, lora_mixer_finetune, lora_mixer_joint, lorahub, lorahub_task, t2l, t2l_zeroshot, concat"):
        compose.resolve_methods("nope")


def test_evaluation_leaves_out_the_examples_that_chose_checkpoints(tmp_path):
    """The fixture's adapters and MoA chose their checkpoints on 2 validation examples per task
    (recorded before selection ids were: rebuilt from their data config); evaluation skips them."""
    import json
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    from tiny import save_tiny
    shutil.copytree(FIXTURE, tmp_path / "run")
    save_tiny(tmp_path / "tiny-qwen2")
    chosen = compose.selection_ids(tmp_path / "run", ["sentiment", "nli", "qa"])
    assert all(len(v) == 2 for v in chosen.values())
    cmd = [sys.executable, str(ROOT / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
           "--tasks", "sentiment,nli,qa", "--methods", "base", "--data", "sample", "--eval-size", "4",
           "--batch-size", "4", "--max-new-tokens", "2", "--max-prompt-len", "128"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for extra in ([], ["--no-exclude-selection"]):
        out = subprocess.run([*cmd, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        for t, ids in chosen.items():
            pred = tmp_path / "run" / "eval" / "predictions" / "base" / f"{t}.jsonl"
            seen = {json.loads(x)["id"] for x in pred.read_text().splitlines()}
            assert len(seen) == 4
            assert bool(seen & set(ids)) == bool(extra), (t, extra)     # disjoint unless asked otherwise


def test_the_docs_example_method_is_one_module_and_one_line(tmp_path, monkeypatch):
    """docs/compose.md's worked example, run as written: its module's code plus the one line that
    registers it, then `--methods oracle_half` evaluates it beside the fixture's cells."""
    import json
    import re

    import full_evaluation
    from fixture_run import eval_command, fixture_run
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    from src.errors import run_main
    from src.report import family

    doc = (ROOT / "docs" / "compose.md").read_text()
    module = re.search(r"```python\n# src/half_oracle.py\n(.*?)```", doc, re.S).group(1)
    line = re.search(r"```python\n    (half_oracle\.HalfOracle\(\)),\n```", doc).group(1)
    namespace: dict = {}
    exec(compile(module, "src/half_oracle.py", "exec"), namespace)
    half_oracle = type(sys)("half_oracle")
    half_oracle.__dict__.update(namespace)
    compose.register(eval(line, {"half_oracle": half_oracle}))
    try:
        run, _ = fixture_run(tmp_path)
        monkeypatch.chdir(tmp_path)
        assert run_main(full_evaluation.main, eval_command("--methods", "oracle_half")[2:]) == 0
        assert family("oracle_half") == "each task's own adapter at half its scale"
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert "oracle_half" in summary["methods"]
        assert {p.name for p in (run / "eval" / "cells" / "oracle_half").glob("*.json")} == {
            "sentiment.json", "nli.json", "qa.json"}
    finally:
        compose.REGISTRY.pop("oracle_half", None)
