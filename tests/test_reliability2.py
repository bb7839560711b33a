"""Training stages on a shared run folder: what RUN/moa was built from, locks, unwritable
outputs, broken model folders, one model under two spellings, and a kill during router training.

    1. a complete RUN/moa is reused only when its task list, settings, model and experts'
       sha256 match (else one line and --force); one without that record is kept, with a note;
    2. a second process on a task (or on the MoA) is refused by name: pid, host, lock file;
    3. an output folder that cannot be written is refused before the model is loaded;
    4. a corrupt .gguf, a folder with config.json only, a folder without a tokenizer: one line;
    5. `runs/../m`, `m` and a symlink to it are one model;
    6. a kill while the routers train (or while RUN/moa is saved) leaves no RUN/moa, and
       --resume gives the routers of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny

import src.runs as runs
import src.training as training
import train_individual_loras as train_loras
import train_moa
from src import models, stages
from src.errors import UserError, run_main

ROOT_USER = os.geteuid() == 0  # root ignores file permissions: chmod tests use a file as parent instead


def _args(model, run, *extra, tasks="sentiment,nli"):
    """test_train_scripts' arguments, smaller (later flags win)."""
    from test_train_scripts import _args as train_args
    return train_args(model, run, "--train-size", "8", "--max-steps", "2", *extra, tasks=tasks)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _no_loading(monkeypatch, *modules):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    for m in modules:
        monkeypatch.setattr(m, "load_base_model", refuse)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "qwen2")


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """RUN/adapters of sentiment, nli and qa on the tiny model (one step each)."""
    run = tmp_path_factory.mktemp("adapters") / "run"
    assert run_main(train_loras.main, _args(tiny_dir, run, "--max-steps", "1", "--eval-every", "0",
                                            tasks="sentiment,nli,qa")) == 0
    return run / "adapters"


@pytest.fixture
def run(adapters, tmp_path):
    """A fresh run folder holding copies of the three adapters."""
    folder = tmp_path / "run"
    shutil.copytree(adapters, folder / "adapters")
    return folder


def _routers(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "moa" / "routers.safetensors"))


# ------------------------------------------------------------------ 1. what RUN/moa was built from

def test_moa_is_reused_only_when_built_from_the_same_inputs(tiny_dir, run, capsys):
    assert run_main(train_moa.main, _args(tiny_dir, run)) == 0
    info = json.loads((run / "moa" / "training_config.json").read_text())
    built = info["built_from"]
    assert built["tasks"] == ["sentiment", "nli"] and built["RouterConfig.router"] == "study"
    assert built["model"] == str(tiny_dir.resolve())
    assert built["adapters"] == {t: runs.adapter_digest(run / "adapters" / t) for t in ("sentiment", "nli")}
    before = _routers(run)
    mtime = (run / "moa" / "routers.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    assert run_main(train_moa.main, _args(tiny_dir, run)) == 0  # same inputs: skipped
    assert "skip" in capsys.readouterr().out

    cases = [
        (_args(tiny_dir, run, tasks="sentiment,nli,qa"), "tasks sentiment,nli -> sentiment,nli,qa"),
        (_args(tiny_dir, run, "--router", "block"), "--router study -> block"),
        (_args(tiny_dir, run, "--eta", "0.5"), "--eta 1.0 -> 0.5"),
        (_args(tiny_dir, run, "--train-size", "4"), "--train-size 8 -> 4"),
    ]
    for args, what in cases:
        assert run_main(train_moa.main, args) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(run / "moa") in line and what in line and "--force" in line, line
    assert (run / "moa" / "routers.safetensors").stat().st_mtime_ns == mtime  # refusals write nothing

    # the nli expert is retrained with another learning rate: its digest changes
    assert run_main(train_loras.main, _args(tiny_dir, run, "--force", "--max-steps", "1", "--eval-every", "0",
                                            "--lr", "5e-3", tasks="nli")) == 0
    capsys.readouterr()
    assert run_main(train_moa.main, _args(tiny_dir, run)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "adapter of nli was retrained" in line and "--force" in line, line

    assert run_main(train_moa.main, _args(tiny_dir, run, "--force")) == 0
    info = json.loads((run / "moa" / "training_config.json").read_text())
    assert info["built_from"]["adapters"]["nli"] == runs.adapter_digest(run / "adapters" / "nli")
    assert set(_routers(run)) == set(before)
    capsys.readouterr()
    assert run_main(train_moa.main, _args(tiny_dir, run)) == 0
    assert "skip" in capsys.readouterr().out


def test_an_older_moa_without_the_record_is_kept_with_a_note(tiny_dir, run, capsys):
    assert run_main(train_moa.main, _args(tiny_dir, run)) == 0
    path = run / "moa" / "training_config.json"
    info = json.loads(path.read_text())
    del info["built_from"]
    path.write_text(json.dumps(info))
    capsys.readouterr()
    assert run_main(train_moa.main, _args(tiny_dir, run, tasks="sentiment,nli,qa")) == 0
    out = capsys.readouterr().out.splitlines()
    notes = [x for x in out if x.startswith("note: ") and "--force" in x]
    assert len(notes) == 1 and str(run / "moa") in notes[0] and any(x.startswith("skip") for x in out), out


def test_changes_are_said_in_words():
    old = {"tasks": ["a", "b"], "RouterConfig.router": "study", "adapters": {"a": "1", "b": "2"}}
    new = {"tasks": ["a", "b", "c"], "RouterConfig.router": "study", "adapters": {"a": "1", "b": "3", "c": "4"}}
    assert stages.changes(old, new) == ["tasks a,b -> a,b,c", "the adapter of b was retrained since"]
    assert stages.changes(old, dict(old)) == []
    assert stages.changes({}, {"DataConfig.max_len": 96}) == ["--max-len (not recorded) -> 96"]


# ------------------------------------------------------------------------------------ 2. locks

def test_a_task_being_trained_elsewhere_is_refused_by_its_holder(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    lock = runs.OwnedLock(out / "checkpoints" / "nli.lock")
    assert lock.acquire()  # as another trainer of nli would
    try:
        _no_loading(monkeypatch, train_loras)
        assert run_main(train_loras.main, _args(tiny_dir, out)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert (f"task nli in {out} is being trained by process {os.getpid()} on host {socket.gethostname()} "
                f"(lock {out / 'checkpoints' / 'nli.lock'})") in line, line
        # nothing of the refused run: no log, no checkpoint, and the lock file is the holder's
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["nli.lock"]
        assert json.loads((out / "checkpoints" / "nli.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert list(out.rglob("*")) == [out / "checkpoints"]  # the holder's lock file went with it


def test_a_lock_without_a_record_still_refuses(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with runs.file_lock(out / "checkpoints" / "sentiment.lock", wait=False) as got:
        assert got
        _no_loading(monkeypatch, train_loras)
        assert run_main(train_loras.main, _args(tiny_dir, out)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "task sentiment" in line and "another process" in line, line


def test_the_moa_being_trained_elsewhere_is_refused(tiny_dir, run, monkeypatch, capsys):
    lock = runs.OwnedLock(run / "checkpoints" / "moa.lock")
    assert lock.acquire()
    try:
        _no_loading(monkeypatch, train_moa)
        assert run_main(train_moa.main, _args(tiny_dir, run)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"{run / 'moa'} is being trained by process {os.getpid()}" in line and "moa.lock" in line, line
        assert not (run / "moa").exists() and not (run / "checkpoints" / "moa").exists()
    finally:
        lock.release()


def test_a_process_in_the_middle_of_training_is_not_taken_for_a_killed_one(tiny_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """While a task trains, its checkpoint exists: a second process must hear 'being trained', not
    'interrupted run: pass --resume' (which would make the two interleave)."""
    out = tmp_path / "run"
    second = {}
    real_fit = training.fit

    def start_a_second_run(*a, **kw):
        def on_step(step):
            if step == 2 and not second:
                capsys.readouterr()
                second["rc"] = run_main(train_loras.main, _args(tiny_dir, out, "--resume", tasks="sentiment"))
                second["err"] = capsys.readouterr().err
        return real_fit(*a, **kw, on_step=on_step)
    monkeypatch.setattr(training, "fit", start_a_second_run)
    assert run_main(train_loras.main, _args(tiny_dir, out, "--max-steps", "3", tasks="sentiment")) == 0
    assert second["rc"] == 2 and "is being trained by process" in _one_error_line(second["err"])
    assert (out / "adapters" / "sentiment").is_dir() and not (out / "checkpoints").exists()
    steps = [json.loads(x)["step"] for x in (out / "adapters" / "sentiment" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3]


def test_owned_lock_names_its_holder_and_a_dead_holders_file_is_taken_over(tmp_path):
    path = tmp_path / "x" / "t.lock"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": 999999, "host": "gone"}))  # left by a killed holder
    a, b = runs.OwnedLock(path), runs.OwnedLock(path)
    assert a.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not b.acquire() and b.holder() == f"process {os.getpid()} on host {socket.gethostname()}"
    a.release()
    assert not path.exists()
    assert b.acquire()
    b.release()


# --------------------------------------------------------------------------- 3. unwritable output

def _deny_writing_in(monkeypatch, folder: Path) -> None:
    """os.access says no for `folder`, as it would to a non-root user for a read-only folder."""
    real = os.access
    monkeypatch.setattr(runs.os, "access", lambda p, mode, **kw: Path(p) != folder and real(p, mode, **kw))


@pytest.mark.parametrize("how", ["file_parent", "read_only", "access_denied"])
def test_an_unwritable_output_dir_is_refused_before_loading(tiny_dir, tmp_path, monkeypatch, capsys, how):
    if how == "read_only" and ROOT_USER:
        pytest.skip("root ignores file permissions (the file_parent case covers root)")
    if how == "file_parent":
        parent = tmp_path / "a_file"
        parent.write_text("not a folder")
        expected = "is a file, not a folder"
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        if how == "read_only":
            parent.chmod(0o555)
        else:
            _deny_writing_in(monkeypatch, parent)
        expected = "no write permission"
    before = sorted(p.name for p in tmp_path.iterdir())
    _no_loading(monkeypatch, train_loras)
    try:
        assert run_main(train_loras.main, _args(tiny_dir, parent / "run")) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert expected in line and str(parent) in line, line
    finally:
        if how == "read_only":
            parent.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (parent / "run").exists()


@pytest.mark.parametrize("how", ["checkpoints_is_a_file", "moa_is_a_file", "read_only", "access_denied"])
def test_an_unwritable_moa_output_is_refused_before_loading(tiny_dir, run, monkeypatch, capsys, how):
    if how == "read_only" and ROOT_USER:
        pytest.skip("root ignores file permissions (the file cases cover root)")
    if how == "checkpoints_is_a_file":
        (run / "checkpoints").write_text("")
        expected = f"{run / 'checkpoints'}: it is a file, not a folder"
    elif how == "moa_is_a_file":
        (run / "moa").write_text("")
        expected = f"{run / 'moa'}: it is a file, not a folder"
    elif how == "read_only":
        run.chmod(0o555)
        expected = "no write permission"
    else:
        _deny_writing_in(monkeypatch, run)
        expected = f"no write permission in {run}"
    _no_loading(monkeypatch, train_moa)
    try:
        assert run_main(train_moa.main, _args(tiny_dir, run)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert expected in line, line
    finally:
        run.chmod(0o755)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["adapters"] + (["checkpoints"] if how == "checkpoints_is_a_file" else [])
        + (["moa"] if how == "moa_is_a_file" else []))


def test_bad_input_found_after_the_lock_still_leaves_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(tiny_dir, out)
    args[args.index("--data") + 1] = "dir"
    assert run_main(train_loras.main, args + ["--data-dir", str(tmp_path / "no_such_dir")]) == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists()


# ------------------------------------------------------------------------------ 4. broken models

@pytest.fixture(scope="module")
def broken(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    (root / "random.gguf").write_bytes(os.urandom(4096))
    (root / "truncated.gguf").write_bytes(b"GGUF" + os.urandom(64))
    (root / "config_only").mkdir()
    shutil.copy(tiny_dir / "config.json", root / "config_only")
    (root / "no_tokenizer").mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / f, root / "no_tokenizer")
    (root / "bad_weights").mkdir()
    for f in tiny_dir.iterdir():
        shutil.copy(f, root / "bad_weights")
    (root / "bad_weights" / "model.safetensors").write_bytes(os.urandom(512))
    return root


@pytest.mark.parametrize("name, missing", [
    ("random.gguf", "is not a GGUF file"),
    ("truncated.gguf", "cannot load"),
    ("config_only", "has config.json but no weights (model.safetensors"),
    ("no_tokenizer", "has no usable tokenizer"),
    ("bad_weights", "cannot load the weights"),
])
def test_a_broken_model_is_one_line_naming_the_path_and_what_is_missing(broken, name, missing):
    with pytest.raises(UserError) as e:
        models.load_base_model(str(broken / name), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and str(broken / name) in msg and missing in msg, msg
    if name == "config_only":
        assert "no tokenizer" in msg


def test_a_broken_model_stops_the_training_script_in_one_line(tiny_dir, broken, tmp_path, capsys):
    assert run_main(train_loras.main, _args(broken / "no_tokenizer", tmp_path / "run")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no usable tokenizer" in line and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 5. one model, two names

def test_one_model_under_two_spellings_is_the_same_model(tiny_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny_dir, target_is_directory=True)
    dotted = str(tiny_dir.parent / ".." / tiny_dir.parent.name / tiny_dir.name)
    assert models.same_model(str(tiny_dir), dotted) and models.same_model(str(link), str(tiny_dir))
    assert models.model_identity(dotted) == str(tiny_dir.resolve())
    assert models.same_model("Qwen/Qwen2-1.5B", "Qwen/Qwen2-1.5B")
    assert not models.same_model("Qwen/Qwen2-1.5B", "Qwen/Qwen2-0.5B")
    assert not models.same_model(str(tiny_dir), "Qwen/Qwen2-1.5B")
    try:
        folder, fname = models.resolve_model_path("smollm2-135m")
    except UserError:
        return
    assert models.same_model("smollm2-135m", str(Path(folder) / fname))


def test_moa_over_adapters_trained_under_another_spelling_of_the_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cwd = os.getcwd()
    os.chdir(tiny_dir.parent)
    try:  # a relative spelling with '..' for the adapters ...
        dotted = os.path.join("..", tiny_dir.parent.name, tiny_dir.name)
        assert run_main(train_loras.main, _args(dotted, out, "--max-steps", "1", "--eval-every", "0")) == 0
    finally:
        os.chdir(cwd)
    cfg = json.loads((out / "adapters" / "nli" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir.resolve())  # recorded resolved, not as typed
    link = tmp_path / "link"
    link.symlink_to(tiny_dir, target_is_directory=True)
    capsys.readouterr()
    # ... a symlink for the MoA: the same model, no "trained on another model" note
    assert run_main(train_moa.main, _args(link, out)) == 0
    text = capsys.readouterr().out
    assert "the adapters were trained on" not in text, text
    # and a rerun under a third spelling is the same input: skipped, not refused
    assert run_main(train_moa.main, _args(tiny_dir, out)) == 0
    assert "skip" in capsys.readouterr().out


# ------------------------------------------------------------------------ 6. kill during router training

def test_kill_during_router_training_then_resume_gives_the_uninterrupted_routers(tiny_dir, adapters, tmp_path,
                                                                                monkeypatch, capsys):
    extra = ["--max-steps", "6", "--router", "block"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for folder in (full, cut):
        shutil.copytree(adapters, folder / "adapters")
    assert run_main(train_moa.main, _args(tiny_dir, full, *extra)) == 0

    real_fit = training.fit
    seen = []

    def killed_at_step_5(*a, **kw):
        def on_step(step):
            seen.append((cut / "moa").exists())  # never a partial RUN/moa while training
            if step == 5:
                raise KeyboardInterrupt  # as a kill: after step 5, whose checkpoint (every 2) is not due
        return real_fit(*a, **kw, on_step=on_step)
    monkeypatch.setattr(training, "fit", killed_at_step_5)
    assert run_main(train_moa.main, _args(tiny_dir, cut, *extra)) == 130
    assert seen == [False] * 5 and not (cut / "moa").exists()
    assert training.load_checkpoint(cut / "checkpoints" / "moa")["step"] == 4
    assert not (cut / "checkpoints" / "moa.lock").exists()  # the killed run's lock went with it
    monkeypatch.setattr(training, "fit", real_fit)

    capsys.readouterr()
    assert run_main(train_moa.main, _args(tiny_dir, cut, *extra)) == 2  # neither --resume nor --force
    assert "--resume" in _one_error_line(capsys.readouterr().err)
    assert run_main(train_moa.main, _args(tiny_dir, cut, *extra, "--resume")) == 0
    a, b = _routers(full), _routers(cut)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    steps = [json.loads(x)["step"] for x in (cut / "moa" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (cut / "checkpoints").exists()


def test_kill_while_saving_the_moa_leaves_no_partial_folder(tiny_dir, adapters, tmp_path, monkeypatch):
    extra = ["--max-steps", "4"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    for folder in (full, cut):
        shutil.copytree(adapters, folder / "adapters")
    assert run_main(train_moa.main, _args(tiny_dir, full, *extra)) == 0

    real_write = runs.write_json_atomic

    def killed_at_the_last_file(path, obj):
        if Path(path).name == "training_config.json":
            raise KeyboardInterrupt  # routers, moa_config and routing_accuracy are written by now
        return real_write(path, obj)
    monkeypatch.setattr(runs, "write_json_atomic", killed_at_the_last_file)
    assert run_main(train_moa.main, _args(tiny_dir, cut, *extra)) == 130
    assert not (cut / "moa").exists()
    assert (cut / "checkpoints" / "moa" / "final" / "routers.safetensors").is_file()  # staged, not visible
    monkeypatch.setattr(runs, "write_json_atomic", real_write)

    assert run_main(train_moa.main, _args(tiny_dir, cut, *extra, "--resume")) == 0
    a, b = _routers(full), _routers(cut)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert sorted(p.name for p in (cut / "moa").iterdir()) == sorted(p.name for p in (full / "moa").iterdir())
    assert not (cut / "checkpoints").exists()
