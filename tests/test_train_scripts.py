"""train_individual_loras.py, train_moa.py and their shell drivers, end to end on tiny models (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import save_tiny
from trainutil import train_args

import src.training as training
import train_individual_loras as train_loras
import train_moa
from src.errors import run_main
from src.lora import load_adapter

ROOT = Path(__file__).resolve().parents[1]
# Tiny models run many small ops: one thread is faster, above all on a shared machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "qwen2")


_args = train_args


def _tensors(folder: Path) -> dict:
    a = load_adapter(folder)
    return {f"{n}.{i}": t for n, ab in a.factors.items() for i, t in enumerate(ab)}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------ train_individual_loras.py

def test_trains_each_task_skips_finished_ones_and_force_retrains(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(train_loras.main, _args(tiny_dir, run)) == 0
    for task in ("sentiment", "nli"):
        folder = run / "adapters" / task
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "training_config.json"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(tiny_dir)
        info = json.loads((folder / "training_config.json").read_text())
        assert info["task"] == task and info["steps"] == 4 and len(info["data_hash"]["train"]) == 64
        assert info["config"]["TrainConfig"]["lr"] == 1e-2 and "git_commit" in info
        log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
        assert all(r["tokens_per_s"] > 0 and r["eta_s"] >= 0 for r in log if "loss" in r)
    assert not (run / "checkpoints").exists()
    first = _tensors(run / "adapters" / "nli")
    mtime = (run / "adapters" / "nli" / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    assert run_main(train_loras.main, _args(tiny_dir, run)) == 0
    assert "skip sentiment" in capsys.readouterr().out
    assert (run / "adapters" / "nli" / "adapter_model.safetensors").stat().st_mtime_ns == mtime

    assert run_main(train_loras.main, _args(tiny_dir, run, "--force", tasks="nli")) == 0
    assert (run / "adapters" / "nli" / "adapter_model.safetensors").stat().st_mtime_ns != mtime
    assert _max_diff(first, _tensors(run / "adapters" / "nli")) == 0.0  # same seed, same adapter

    import peft  # the ecosystem reads what we wrote
    from transformers import AutoModelForCausalLM
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                                                str(run / "adapters" / "nli"))
    assert peft_model.peft_config["default"].r == 8


@pytest.mark.parametrize("shared", [False, True])
def test_each_task_starts_from_its_own_init_unless_shared(tiny_dir, tmp_path, shared):
    run = tmp_path / "run"
    extra = ["--lr", "1e-6", "--max-steps", "1"] + (["--shared-init"] if shared else [])
    assert run_main(train_loras.main, _args(tiny_dir, run, *extra)) == 0
    a1 = load_adapter(run / "adapters" / "sentiment").factors
    a2 = load_adapter(run / "adapters" / "nli").factors
    cos = [float(torch.nn.functional.cosine_similarity(a1[n][0].flatten(), a2[n][0].flatten(), dim=0)) for n in a1]
    if shared:
        assert min(cos) > 0.99
    else:
        assert max(abs(c) for c in cos) < 0.5


def test_kill_and_resume_gives_the_uninterrupted_adapter(tiny_dir, tmp_path, monkeypatch, capsys):
    args = ["--max-steps", "6", "--tasks", "sentiment"]
    assert run_main(train_loras.main, _args(tiny_dir, tmp_path / "full", *args)) == 0

    real_fit = training.fit

    def killed_at_step_5(*a, **kw):
        def on_step(step):
            if step == 5:
                raise KeyboardInterrupt  # as a kill: after step 5, whose checkpoint (every 2) is not due
        return real_fit(*a, **kw, on_step=on_step)
    monkeypatch.setattr(training, "fit", killed_at_step_5)
    cut = tmp_path / "cut"
    assert run_main(train_loras.main, _args(tiny_dir, cut, *args)) == 130
    assert not (cut / "adapters" / "sentiment").exists()  # nothing half-written is visible
    assert training.load_checkpoint(cut / "checkpoints" / "sentiment")["step"] == 4
    monkeypatch.setattr(training, "fit", real_fit)

    capsys.readouterr()
    assert run_main(train_loras.main, _args(tiny_dir, cut, *args)) == 2  # neither --resume nor --force
    assert "--resume" in capsys.readouterr().err
    assert run_main(train_loras.main, _args(tiny_dir, cut, *args, "--resume")) == 0
    assert _max_diff(_tensors(tmp_path / "full" / "adapters" / "sentiment"),
                     _tensors(cut / "adapters" / "sentiment")) <= 1e-6
    steps = [json.loads(x)["step"] for x in (cut / "adapters" / "sentiment" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("bad, message", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--rank", "0"], "--rank must be a positive integer"),
    (["--model", "/no/such/model"], "--model"),
    (["--model", "smollm2-9000m"], "--model"),
    (["--tasks", "sentiment,poetry"], "unknown task 'poetry'"),
    (["--data", "dir", "--data-dir", "/no/such/dir"], "no data folder"),
    (["--lr", "abc"], "invalid float value"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_dir, tmp_path, capsys, bad, message):
    run = tmp_path / "run"
    args = _args(tiny_dir, run)
    for i in range(0, len(bad), 2):  # replace the flag's value where _args already sets it
        if bad[i] in args:
            args[args.index(bad[i]) + 1] = bad[i + 1]
        else:
            args += bad[i:i + 2]
    if bad[0] == "--data":
        args[args.index("--data") + 1] = "dir"
    assert run_main(train_loras.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not run.exists()


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "train_individual_loras.py", "--batch-size", "0",
                          "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "batch-size" in out.stderr
    assert not (tmp_path / "run").exists()


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tiny_dir, tmp_path):
    one = tmp_path / "one"
    assert run_main(train_loras.main, _args(tiny_dir, one, "--tasks", "sentiment", "--batch-size", "4")) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "train_individual_loras.py", *_args(tiny_dir, two, "--tasks", "sentiment", "--batch-size", "2",
                                               "--device", "cpu")]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "global batch 4 (2 processes)" in out.stdout
    info = json.loads((two / "adapters" / "sentiment" / "training_config.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 4
    assert _max_diff(_tensors(one / "adapters" / "sentiment"), _tensors(two / "adapters" / "sentiment")) <= 1e-5


# ------------------------------------------------------------------------------ train_moa.py

@pytest.fixture(scope="module")
def moa_run(tmp_path_factory):
    """Three task LoRAs on a 4-layer tiny model (deep enough for its routers to tell prompts apart)."""
    root = tmp_path_factory.mktemp("moa")
    model = save_tiny(root / "qwen2-64x4", hidden=64, layers=4)
    run = root / "run"
    args = _args(model, run, "--lr", "1e-3", "--max-steps", "2", "--eval-every", "0", tasks="sentiment,nli,qa")
    assert run_main(train_loras.main, args) == 0
    return model, run


def test_moa_routers_learn_to_route_the_sample_tasks(moa_run, capsys):
    model, run = moa_run
    args = ["--model", str(model), "--tasks", "sentiment,nli,qa", "--data", "sample", "--output-dir", str(run),
            "--batch-size", "16", "--lr", "1e-1", "--epochs", "10", "--eval-every", "40", "--save-every", "0",
            "--no-progress"]
    assert run_main(train_moa.main, args) == 0
    out = capsys.readouterr().out
    assert "routing accuracy on validation" in out and "qa" in out
    moa_dir = run / "moa"
    assert {"moa_config.json", "routers.safetensors", "routing_accuracy.json", "training_config.json",
            "log.jsonl"} <= {p.name for p in moa_dir.iterdir()}
    acc = json.loads((moa_dir / "routing_accuracy.json").read_text())
    assert acc["mean"] >= 0.8 and min(acc["per_task"].values()) >= 0.6, acc
    # the saved mixture loads back onto a fresh model and routes as reported
    from src.models import load_base_model
    from src.moa import MixtureOfLoRAs
    from src.config import DataConfig
    base, tok = load_base_model(str(model), device="cpu")
    moa = MixtureOfLoRAs.load(base, moa_dir)
    # the validation examples training reported on (the default --eval-size: half the sample's, test_training.py)
    val = training.load_data(DataConfig(tasks="sentiment,nli,qa", data="sample"), ["sentiment", "nli", "qa"],
                             "validation")
    items = [it for i, t in enumerate(moa.tasks) for it in training.encode_examples(tok, val[t], 512, 128, label=i)]
    assert training.routing_accuracy(moa, base, items, tok.pad_token_id)["per_task"] == acc["per_task"]

    capsys.readouterr()
    assert run_main(train_moa.main, args) == 0
    assert "skip" in capsys.readouterr().out


def test_moa_joint_training_with_lm_loss_tunes_the_experts(moa_run, tmp_path):
    model, run = moa_run
    import shutil
    shutil.copytree(run / "adapters", tmp_path / "adapters")
    args = ["--model", str(model), "--tasks", "sentiment,nli", "--data", "sample", "--output-dir", str(tmp_path),
            "--batch-size", "8", "--lr", "1e-2", "--max-steps", "3", "--eval-every", "0", "--no-progress",
            "--joint", "--lm-loss", "--eta", "0.5", "--router", "block", "--train-size", "8", "--eval-size", "4",
            "--log-every", "1"]
    assert run_main(train_moa.main, args) == 0
    saved = tmp_path / "moa" / "experts" / "nli"
    assert _max_diff(_tensors(saved), _tensors(run / "adapters" / "nli")) > 0
    log = [json.loads(x) for x in (tmp_path / "moa" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]


def test_moa_without_the_adapters_names_the_missing_tasks(moa_run, tmp_path, capsys):
    model, run = moa_run
    args = ["--model", str(model), "--tasks", "sentiment,translation,summarization", "--output-dir", str(run)]
    assert run_main(train_moa.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert "translation, summarization" in err and err.count("\n") == 0
    assert not (run / "moa").exists() or (run / "moa" / "routers.safetensors").is_file()


# ------------------------------------------------------------------------------ drivers

def test_shell_drivers_run_end_to_end(tiny_dir, tmp_path):
    run = tmp_path / "run"
    env = {**ENV, "MODEL": str(tiny_dir), "TASKS": "sentiment,nli", "RUN": str(run), "DATA": "sample",
           "PYTHON": sys.executable}
    flags = ["--train-size", "8", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8",
             "--batch-size", "4", "--max-steps", "2", "--eval-every", "0", "--no-progress"]
    out = subprocess.run(["bash", str(ROOT / "train_all_tasks.sh"), *flags], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert {p.name for p in (run / "adapters").iterdir()} == {"sentiment", "nli"}
    out = subprocess.run(["bash", str(ROOT / "train_moa.sh"), *flags, "--lr", "1e-2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "moa" / "routing_accuracy.json").is_file() and "routing accuracy" in out.stdout
    for script in ("train_all_tasks.sh", "train_moa.sh"):
        help_ = subprocess.run(["bash", str(ROOT / script), "-h"], capture_output=True, text=True)
        assert help_.returncode == 0 and "Usage" in help_.stdout and "MODEL" in help_.stdout


def test_a_finished_adapter_built_with_other_settings_is_refused_not_skipped(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(train_loras.main, _args(tiny_dir, run, "--max-steps", "2", tasks="nli")) == 0
    capsys.readouterr()
    assert run_main(train_loras.main, _args(tiny_dir, run, "--max-steps", "2", "--lr", "5e-3", tasks="nli")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was built from other inputs than now (--lr 0.01 -> 0.005)" in err[0], err
    assert run_main(train_loras.main, _args(tiny_dir, run, "--max-steps", "2", tasks="sentiment,nli")) == 0
    assert "skip nli" in capsys.readouterr().out            # another task list is not another setting
