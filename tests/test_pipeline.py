"""The whole pipeline as a user runs it, on a tiny random model and real data.

train_all_tasks.sh -> train_moa.sh -> run_all_evaluation.sh (every merge, plots) -> the
notebook, all seven tasks, a handful of examples each from ../shared/data. Also checks
that the README's commands are the ones CI and the demo run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
TASKS = "7tasks"
SEVEN = ["summarization", "translation", "qa", "sentiment", "nli", "paraphrasing", "commonsense"]


def _run(cmd, env, cwd, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd[:3]} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("pipeline")
    model = save_tiny(tmp / "tiny-qwen2", "qwen2")
    run = tmp / "run"
    env = dict(os.environ, MODEL=str(model), TASKS=TASKS, RUN=str(run), DATA=str(shared_data),
               PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               METHODS="all", MPLBACKEND="Agg")
    small = ["--train-size", "4", "--eval-size", "2", "--max-len", "160", "--max-target-len", "24",
             "--batch-size", "2", "--no-progress"]
    _run(["bash", str(ROOT / "train_all_tasks.sh"), *small, "--max-steps", "2", "--lr", "1e-3",
          "--eval-every", "1", "--save-every", "1"], env, tmp)
    _run(["bash", str(ROOT / "train_all_tasks.sh"), *small, "--max-steps", "2", "--lr", "1e-3",   # multitask_lora's
          "--eval-every", "1", "--save-every", "1", "--multitask", "--multitask-steps", "3"], env, tmp)
    _run(["bash", str(ROOT / "train_moa.sh"), *small, "--max-steps", "3", "--lr", "1e-2",
          "--eval-every", "3", "--save-every", "3"], env, tmp)
    for regime in ("plug", "finetune", "joint"):   # lora_mixer, lora_mixer_finetune, lora_mixer_joint
        _run(["bash", str(ROOT / "train_moa.sh"), *small, "--max-steps", "2", "--lr", "1e-2",
              "--eval-every", "2", "--save-every", "2", "--mixer-regime", regime], {**env, "SYSTEM": "lora_mixer"}, tmp)
    _run([sys.executable, str(ROOT / "train_text_to_lora.py"), "--model", str(model), "--tasks", TASKS,
          "--output-dir", str(run), "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--no-progress",
          "--hold-out-each"], env, tmp)                  # t2l and t2l_zeroshot's hypernetworks: evaluation trains none
    _run(["bash", str(ROOT / "run_all_evaluation.sh"), "--eval-size", "2", "--batch-size", "4",
          "--max-new-tokens", "4", "--max-prompt-len", "128"], env, tmp)
    return run


def test_training_writes_a_peft_adapter_per_task(pipeline):
    for task in SEVEN:
        folder = pipeline / "adapters" / task
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "training_config.json"} <= names
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    assert not any((pipeline / "checkpoints").glob("*/*")), "finished tasks leave no checkpoint behind"
    multi = json.loads((pipeline / "adapters" / "_multitask" / "training_config.json").read_text())
    assert multi["tasks"] == SEVEN and multi["steps"] == 3                      # train_all_tasks.sh --multitask
    moa = json.loads((pipeline / "moa" / "moa_config.json").read_text())
    assert set(moa["tasks"]) == set(SEVEN)
    assert (pipeline / "moa" / "routing_accuracy.json").is_file()
    assert (pipeline / "compose" / "lora_mixer" / "routing.json").is_file()     # SYSTEM=lora_mixer train_moa.sh
    assert (pipeline / "compose" / "t2l" / "hypernet.safetensors").is_file()   # train_text_to_lora.py


def test_every_method_is_scored_on_every_task(pipeline):
    from src import systems  # noqa: F401 (every method registered)
    from src.compose import known_methods
    from src.merging import MERGES, VARIANTS
    summary = json.loads((pipeline / "eval" / "summary.json").read_text())
    expected = set(known_methods())
    assert {"base", "oracle", "moa", "arrow", *MERGES, *VARIANTS} <= expected
    assert set(summary["methods"]) == expected
    assert summary["tasks"] == SEVEN
    for method, res in summary["methods"].items():
        assert set(res["per_task"]) == set(SEVEN), method
        for task, cell in res["per_task"].items():
            assert isinstance(cell["score"], float) and cell["primary"], (method, task)
            preds = pipeline / "eval" / "predictions" / method / f"{task}.jsonl"
            draws = len(cell["draws"]["scores"]) if "draws" in cell else 1      # random_merge: every draw's
            assert len(preds.read_text().splitlines()) == 2 * draws, (method, task)
    for name in [*MERGES, *VARIANTS]:
        assert (pipeline / "merged" / name / "adapter_model.safetensors").is_file(), name
    table = (pipeline / "eval" / "results.md").read_text()
    assert all(m in table for m in expected)
    assert summary["meta"]["data_hash"] and "git_commit" in summary["meta"]
    for task in SEVEN:       # evaluation never sees the examples that chose a checkpoint
        chosen = set(json.loads((pipeline / "adapters" / task / "training_config.json").read_text())["selection_ids"])
        chosen |= set(json.loads((pipeline / "adapters" / "_multitask" / "training_config.json").read_text())
                      ["selection_ids"][task])
        chosen |= set(json.loads((pipeline / "moa" / "training_config.json").read_text())["selection_ids"][task])
        seen = {json.loads(x)["id"] for x in (pipeline / "eval" / "predictions" / "base" / f"{task}.jsonl")
                .read_text().splitlines()}
        assert chosen and seen and not chosen & seen, task


def test_plots_and_the_notebook(pipeline):
    pngs = {p.name for p in (pipeline / "plots").glob("*.png")}
    assert any("cosine" in p for p in pngs) and any("multitask" in p for p in pngs), pngs
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(ROOT / "visualize_lora.ipynb", as_version=4)
    os.environ["RUN_DIR"] = str(pipeline)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["RUN_DIR"]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def _readme_block(heading: str) -> list[str]:
    """The commands in the first ```bash block after a README heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_commands_exist_and_ci_runs_them():
    quick = _readme_block("## Quick start")
    assert "bash setup.sh" in quick and "bash run_demo.sh" in quick
    test_cmd = next(c for c in _readme_block("## Tests") if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash setup.sh" in ci and test_cmd in ci, test_cmd
    for script in ("setup.sh", "run_demo.sh", "train_all_tasks.sh", "train_moa.sh", "run_all_evaluation.sh"):
        assert (ROOT / script).is_file(), script
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0, script


def test_reference_script_shares_cells_between_workers_and_reuses_base_and_oracle(tmp_path, shared_data):
    """run_reference.sh end to end on a tiny model: two workers, each cell computed once."""
    model = save_tiny(tmp_path / "tiny-qwen2", "qwen2")
    run, published = tmp_path / "ref", tmp_path / "published"
    env = dict(os.environ, MODEL=str(model), RUN=str(run), REF=str(published), DATA=str(shared_data),
               PYTHON=sys.executable, TRAIN_SIZE="4", EVAL_SIZE="2", WORKERS="2", METHODS="moa,concat,svd", HELDOUT="", MPLBACKEND="Agg")
    _run(["bash", str(ROOT / "run_reference.sh")], env, tmp_path, timeout=900)
    five = run.parent / "ref-5tasks"
    for folder, tasks in ((run, SEVEN), (five, SEVEN[:5])):
        summary = json.loads((folder / "eval" / "summary.json").read_text())
        assert summary["tasks"] == tasks and list(summary["methods"]) == ["oracle", "moa", "concat", "svd", "base"]
        logs = "".join(p.read_text() for p in (folder / "logs").glob("eval.*.log"))
        done = re.findall(r"^\s+(\w+) / (\w+)\s", logs, flags=re.M)
        computed = {"oracle", "moa", "concat", "svd", "base"} if folder == run else {"moa", "concat", "svd"}
        assert sorted(done) == sorted((m, t) for m in computed for t in tasks)   # each cell once, by one worker
        if folder == run:   # 35 cells: both workers get some
            assert re.search(r"^\s+\w+ / \w+\s", (folder / "logs" / "eval.2.log").read_text(), flags=re.M)
        assert (folder / "plots" / "multitask_score.png").is_file()
    for part in ("7tasks", "5tasks"):   # published to REF, never to the repository's results/reference
        assert (published / part / "eval" / "summary.json").is_file(), part
        assert not list((published / part).rglob("*.safetensors")), part
    seven = json.loads((run / "eval" / "summary.json").read_text())["methods"]
    for m in ("base", "oracle"):
        for t in SEVEN[:5]:
            assert summary["methods"][m]["per_task"][t]["metrics"] == seven[m]["per_task"][t]["metrics"]
    bad = subprocess.run(["bash", str(ROOT / "run_reference.sh")], env=dict(env, DATA=str(tmp_path / "nope")),
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "DATA=" in bad.stderr


def _table_rows(text: str, first_cell: str = "oracle") -> dict[str, list[str]]:
    """{method: its cells} of the first markdown table whose rows start with `| first_cell |`."""
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"| {first_cell} |"))
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_readmes_demo_table_is_the_committed_demo_run():
    """README "What the demo prints" shows results/demo's table (the interval column left out)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### What the demo prints"):readme.index("## Tests")]
    shown = _table_rows(section)
    committed = _table_rows((ROOT / "results" / "demo" / "eval" / "results.md").read_text())
    assert list(shown) == list(committed)
    for method, cells in shown.items():
        assert cells == committed[method][:len(cells)], method
    summary = json.loads((ROOT / "results" / "demo" / "eval" / "summary.json").read_text())
    for method, cells in shown.items():
        assert f"{summary['methods'][method]['multitask_score']:.3f}" == cells[-1], method
