"""The multitask baseline: train_individual_loras.py --multitask into RUN/adapters/_multitask, and
the static method multitask_lora, on tiny models (CPU)."""
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
from tiny import save_tiny
from trainutil import train_args

import train_individual_loras as train_loras
from src import analysis, compose, merging, multitask, runs, systems  # noqa: F401 (systems: every method registered)
from src.errors import UserError, run_main
from src.lora import load_adapter
from src.smile import SmileConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TASKS = ["sentiment", "nli"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "qwen2")


def _args(model, run, *extra, tasks="sentiment,nli"):
    return train_args(model, run, "--patience", "0", *extra, tasks=tasks)


def _info(run: Path) -> dict:
    return json.loads((runs.multitask_dir(run) / "training_config.json").read_text())


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """Two task adapters (4 steps each), then the multitask adapter with the same flags."""
    run = tmp_path_factory.mktemp("mt") / "run"
    assert run_main(train_loras.main, _args(tiny_dir, run)) == 0
    before = compose.selection_ids(run, TASKS)
    assert run_main(train_loras.main, _args(tiny_dir, run, "--multitask")) == 0
    return run, before


# ------------------------------------------------------------------ training

def test_it_trains_on_the_union_for_as_many_steps_as_the_task_adapters(trained):
    run, _ = trained
    folder = runs.multitask_dir(run)
    assert folder == run / "adapters" / "_multitask"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "training_config.json"]
    info = _info(run)
    assert info["tasks"] == TASKS and info["n_train"] == 32 and info["n_train_per_task"] == {"sentiment": 16, "nli": 16}
    assert info["planned_steps"] == info["steps"] == 8 and info["multitask_steps"] is None
    for t in TASKS:                                    # 4 + 4, read from the task adapters' records
        assert info["task_steps"][t]["steps"] == 4
        assert info["task_steps"][t]["from"].endswith(f"{t}/training_config.json")
    log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4, 6, 8]
    # the task adapters' rank, targets, scale and base model; its own tensors
    ours = json.loads((folder / "adapter_config.json").read_text())
    theirs = json.loads((run / "adapters" / "nli" / "adapter_config.json").read_text())
    assert {k: ours[k] for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")} == \
        {k: theirs[k] for k in ("r", "lora_alpha", "target_modules", "base_model_name_or_path")}
    mt, task = load_adapter(folder), load_adapter(run / "adapters" / "nli")
    assert mt.factors.keys() == task.factors.keys()
    assert all(not torch.equal(mt.factors[n][1], task.factors[n][1]) for n in mt.factors)
    assert any(mt.factors[n][1].abs().max() > 0 for n in mt.factors)              # B moved from 0
    assert info["config"]["TrainConfig"]["lr"] == 1e-2 and info["schedule"]["max_steps"] == 8


def test_it_chooses_its_checkpoint_on_the_task_adapters_validation_examples(trained):
    run, before = trained
    info = _info(run)
    for t in TASKS:
        adapter_ids = json.loads((run / "adapters" / t / "training_config.json").read_text())["selection_ids"]
        assert info["selection_ids"][t] == adapter_ids and len(adapter_ids) == 4
    assert compose.selection_ids(run, TASKS) == before          # the leave-out set does not grow
    # and its record is read: ids only it names are left out too
    doctored = dict(info, selection_ids={**info["selection_ids"], "nli": [*info["selection_ids"]["nli"], "extra"]})
    other = run.parent / "doctored"
    shutil.copytree(run, other)
    (runs.multitask_dir(other) / "training_config.json").write_text(json.dumps(doctored))
    assert "extra" in compose.selection_ids(other, TASKS)["nli"]


def test_it_is_never_one_of_the_tasks(trained):
    run, _ = trained
    assert runs.task_adapters(run) == ["nli", "sentiment"]
    assert set(analysis.run_cosines(run)["tasks"]) == set(TASKS)
    with pytest.raises(UserError, match="unknown task '_multitask'"):
        from src.tasks import resolve_tasks
        resolve_tasks("sentiment,_multitask")


def test_task_adapters_skip_reserved_and_hidden_folders(tmp_path):
    for name in ("sentiment", "_multitask", ".nli.tmp-x1", "qa"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
        if name != "qa":                                                   # qa: no adapter in it
            (tmp_path / "adapters" / name / "adapter_config.json").write_text("{}")
    assert runs.task_adapters(tmp_path) == ["sentiment"]
    assert runs.task_adapters(tmp_path / "nowhere") == []


def test_a_rerun_skips_it_and_other_steps_are_refused(trained, tiny_dir, capsys):
    run, _ = trained
    capsys.readouterr()
    assert run_main(train_loras.main, _args(tiny_dir, run, "--multitask")) == 0
    assert f"skip: {runs.multitask_dir(run)} is complete" in capsys.readouterr().out
    assert run_main(train_loras.main, _args(tiny_dir, run, "--multitask", "--multitask-steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was built from other inputs than now" in err[0] and "steps 8 -> 3" in err[0], err


def test_the_default_steps_are_planned_for_a_task_without_an_adapter(tmp_path):
    run = tmp_path / "run"
    folder = run / "adapters" / "nli"
    folder.mkdir(parents=True)
    (folder / "training_config.json").write_text(json.dumps({"task": "nli", "steps": 7}))
    got = multitask.task_steps(run, ["sentiment", "nli"], {"sentiment": 30, "nli": 30}, 4, 2.0, None)
    assert got["nli"]["steps"] == 7
    assert got["sentiment"] == {"steps": 16, "from": "planned: 30 examples, global batch 4"}      # 2 x ceil(30/4)
    assert multitask.task_steps(run, ["sentiment"], {"sentiment": 30}, 4, 2.0, 5)["sentiment"]["steps"] == 5
    (folder / "training_config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"nli/training_config.json: unreadable .*--multitask-steps"):
        multitask.task_steps(run, ["nli"], {"nli": 30}, 4, 2.0, None)


def test_multitask_steps_sets_the_total(tiny_dir, tmp_path):
    run = tmp_path / "run"
    assert run_main(train_loras.main, _args(tiny_dir, run, "--multitask", "--multitask-steps", "3")) == 0
    info = _info(run)
    assert info["steps"] == info["planned_steps"] == info["multitask_steps"] == 3
    assert info["task_steps"]["nli"]["from"].startswith("planned")        # no task adapter in this run
    assert not (run / "adapters" / "nli").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("bad, message", [
    (["--multitask", "--multitask-steps", "0"], "--multitask-steps must be a positive integer, got 0"),
    (["--multitask-steps", "3"], "--multitask-steps is the multitask adapter's: pass it with --multitask"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_dir, tmp_path, capsys, bad, message):
    run = tmp_path / "run"
    assert run_main(train_loras.main, _args(tiny_dir, run, *bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: {message}", err
    assert not run.exists()


# ------------------------------------------------------------------ a real kill, then --resume

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_individual_loras as m
import src.training as t
from src.errors import run_main
real = t.fit
def fit(*a, **k):
    def on_step(step):
        if step == 5:                     # after step 5, whose checkpoint (every 2) is not due
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k, on_step=on_step)
t.fit = fit
sys.exit(run_main(m.main, sys.argv[1:]))
"""


def _train(args, kill=False):
    cmd = [sys.executable, "-c", KILLER.format(root=str(ROOT))] if kill else [sys.executable, str(ROOT / "train_individual_loras.py")]
    return subprocess.run([*cmd, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_killed_run_resumes_to_the_same_bytes(tiny_dir, tmp_path):
    flags = ["--multitask", "--multitask-steps", "6"]
    whole = _train(_args(tiny_dir, tmp_path / "whole", *flags))
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = tmp_path / "cut"
    killed = _train(_args(tiny_dir, cut, *flags), kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not runs.multitask_dir(cut).exists()                           # nothing half-written is visible
    assert (cut / "checkpoints" / "_multitask" / "state.json").is_file()
    again = _train(_args(tiny_dir, cut, *flags))
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.strip().count("\n") == 0
    resumed = _train(_args(tiny_dir, cut, *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    name = "adapter_model.safetensors"
    assert (runs.multitask_dir(cut) / name).read_bytes() == (runs.multitask_dir(tmp_path / "whole") / name).read_bytes()
    steps = [json.loads(x)["step"] for x in (runs.multitask_dir(cut) / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (cut / "checkpoints").exists()


# ------------------------------------------------------------------ evaluation: multitask_lora

def test_the_fingerprint_follows_the_adapter_and_nothing_else(trained):
    run, _ = trained
    env = compose.Env(run, TASKS)
    compose.check_all(["multitask_lora"], env)
    fp = compose.fingerprint("multitask_lora", "nli", env, {})
    assert fp["multitask_lora"] == {"adapter": runs.adapter_digest(runs.multitask_dir(run))}
    assert json.loads(json.dumps(fp)) == fp
    env.options[SmileConfig] = SmileConfig(smile_top_k=2)                # another method's option
    env.options[merging.MergeConfig] = merging.MergeConfig(density=0.3)
    assert compose.fingerprint("multitask_lora", "nli", env, {}) == fp
    env.digests[runs.MULTITASK] = "retrained"
    assert compose.fingerprint("multitask_lora", "nli", env, {}) != fp


def test_the_method_refuses_an_adapter_trained_on_other_tasks(trained):
    run, _ = trained
    with pytest.raises(UserError, match=r"trained on sentiment, nli, not on qa \(retrain it with "
                                        r"train_individual_loras.py --multitask --tasks sentiment,qa --force\)"):
        compose.check_all(["multitask_lora"], compose.Env(run, ["sentiment", "qa"]))


def test_multitask_lora_through_full_evaluation_and_run_all_evaluation(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    model = save_tiny(tmp_path / "tiny-qwen2")
    run = tmp_path / "run"
    base = [sys.executable, str(ROOT / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
            "--tasks", "sentiment,nli,qa", "--data", "sample", "--eval-size", "2", "--batch-size", "4",
            "--max-new-tokens", "4", "--max-prompt-len", "128", "--no-exclude-selection"]

    def evaluate(*extra):
        return subprocess.run([*base, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)

    missing = evaluate("--methods", "multitask_lora,smile")
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: method multitask_lora needs the multitask adapter: no {Path('run') / 'adapters' / '_multitask'} "
        "(train it with train_individual_loras.py --multitask --tasks sentiment,nli,qa and the task adapters' "
        "flags, or leave multitask_lora out of --methods)"], missing.stderr
    assert not (run / "eval" / "cells" / "multitask_lora").exists() and not (run / "eval" / "cells" / "smile").exists()

    train = ["--model", str(model), "--tasks", "sentiment,nli,qa", "--data", "sample", "--output-dir", str(run),
             "--train-size", "8", "--eval-size", "2", "--max-len", "128", "--max-target-len", "8", "--batch-size", "4",
             "--lr", "1e-2", "--eval-every", "1", "--save-every", "1", "--no-progress", "--multitask",
             "--multitask-steps", "2"]
    assert run_main(train_loras.main, train) == 0
    out = evaluate("--methods", "multitask_lora,smile")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 cells reused, 6 to compute" in out.stderr                  # base and oracle from the fixture
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert {"multitask_lora", "smile"} <= set(summary["methods"])
    assert set(summary["routing"]["smile"]["share"]) == {"sentiment", "nli", "qa"}      # experts: the tasks only
    assert "3 to compute" in evaluate("--methods", "multitask_lora,smile", "--smile-top-k", "2").stderr

    drive = {**ENV, "MODEL": "tiny-qwen2", "TASKS": "sentiment,nli,qa", "RUN": "run", "DATA": "sample",
             "PYTHON": sys.executable, "MPLBACKEND": "Agg"}
    help_ = subprocess.run(["bash", str(ROOT / "run_all_evaluation.sh"), "-h"], cwd=tmp_path, env=drive,
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and ",multitask_lora" in help_.stdout     # joins the default list when present
    out = subprocess.run(["bash", str(ROOT / "run_all_evaluation.sh"), "--eval-size", "2", "--batch-size", "4",
                          "--max-new-tokens", "4", "--max-prompt-len", "128", "--no-exclude-selection"],
                         cwd=tmp_path, env={**drive, "METHODS": "multitask_lora,smile"}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "9 cells reused, 3 to compute" in out.stderr                  # smile at k = 1 again
    cos = json.loads((run / "analysis" / "cosine.json").read_text())
    assert set(cos["tasks"]) == {"sentiment", "nli", "qa"}
