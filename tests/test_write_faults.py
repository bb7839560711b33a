"""A full disk and a folder we may not write: one line naming the path, exit code 2, nothing
half-written, and a rerun after the fault continues (docs/faults.md lists every writer).

The faults are simulated where the bytes are written: safetensors' writer raising its own
"No space left on device (os error 28)" error, Python's file writes raising ENOSPC or EACCES
(tests run as root here, where chmod does not stop a write).
"""
from __future__ import annotations

import builtins
import errno
import json
from pathlib import Path

import pytest
from safetensors import SafetensorError
from tiny import random_adapter, save_tiny, tiny_model

import src.lora as lora
import src.runs as runs
import src.training as training
import train_individual_loras as train_loras
from src.errors import run_main, write_fault
from src.lora import save_adapter
from src.merge import main as merge_main

NO_SPACE = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_the_fault_lines():
    assert write_fault(OSError(errno.ENOSPC, "No space left on device", "/x/out")).startswith(
        "no space left on device while writing /x/out")
    assert write_fault(OSError(errno.EROFS, "Read-only file system", "/ro")).startswith("permission denied while writing /ro")
    assert write_fault(SafetensorError(NO_SPACE)).startswith("no space left on device")
    assert write_fault(OSError(errno.ENOENT, "No such file")) is None


@pytest.fixture
def adapters(tmp_path):
    model = tiny_model("qwen2")
    return [save_adapter(random_adapter(model, i, rank=2, targets=("q_proj", "v_proj"), name=f"t{i}"),
                         tmp_path / f"t{i}") for i in range(2)]


def test_a_merge_on_a_full_disk_is_one_line_and_leaves_nothing(adapters, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"

    def full(*a, **kw):
        raise SafetensorError(NO_SPACE)
    monkeypatch.setattr(lora, "save_file", full)
    before = _files(tmp_path)
    capsys.readouterr()
    rc = run_main(merge_main, ["--method", "concat", "--out", str(out), *map(str, adapters)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"no space left on device while writing {out}" in line, line
    assert _files(tmp_path) == before                     # no merged/, no temporary folder
    monkeypatch.undo()                                     # space freed: the rerun writes it
    assert run_main(merge_main, ["--method", "concat", "--out", str(out), *map(str, adapters)]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_a_merge_into_a_folder_we_may_not_write_is_one_line(adapters, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ro" / "merged"
    real_mkdtemp = runs.tempfile.mkdtemp

    def refused(*a, dir=None, **kw):
        if dir is not None and Path(dir) == out.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / "x"))
        return real_mkdtemp(*a, dir=dir, **kw)
    monkeypatch.setattr(runs.tempfile, "mkdtemp", refused)
    capsys.readouterr()
    rc = run_main(merge_main, ["--method", "concat", "--out", str(out), *map(str, adapters)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"permission denied while writing {out}" in line, line
    assert not out.exists()


def test_json_written_on_a_full_disk_names_the_file_not_its_temporary(tmp_path):
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if "w" in mode and ".summary.json." in str(path) else f
    target = tmp_path / "summary.json"
    builtins.open = opener
    try:
        with pytest.raises(OSError) as e:
            runs.write_json_atomic(target, {"a": 1})
    finally:
        builtins.open = real_open
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_training_on_a_full_disk_stops_in_one_line_and_resumes(tmp_path, monkeypatch, capsys):
    """The checkpoint write fails at step 2: one line, exit 2; --resume after it finishes the run."""
    model = save_tiny(tmp_path / "qwen2")
    run = tmp_path / "run"
    args = ["--model", str(model), "--tasks", "sentiment", "--data", "sample", "--output-dir", str(run),
            "--train-size", "8", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8", "--batch-size", "4",
            "--lr", "1e-2", "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--no-progress"]

    def full(*a, **kw):
        raise SafetensorError(NO_SPACE)
    monkeypatch.setattr(training, "save_file", full)
    capsys.readouterr()
    assert run_main(train_loras.main, args) == 2
    err = capsys.readouterr().err
    line = _one_line("\n".join(x for x in err.splitlines() if not x.startswith("Loading weights")))
    assert "no space left on device while writing" in line and "checkpoints" in line, line
    assert not (run / "adapters" / "sentiment").exists()
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and p.is_file()]
    assert leftovers == [], leftovers
    monkeypatch.undo()
    assert run_main(train_loras.main, [*args, "--resume"]) == 0
    info = json.loads((run / "adapters" / "sentiment" / "training_config.json").read_text())
    assert info["steps"] == 4


def test_evaluation_refuses_a_read_only_eval_folder_before_any_work(tmp_path, monkeypatch, capsys):
    """An existing run folder whose eval/cells/base is read-only: refused first, nothing written.
    (root writes anywhere, so the permission check itself is what the test patches.)"""
    import shutil

    import full_evaluation
    fixture = Path(__file__).parent / "fixtures" / "run_v1"
    shutil.copytree(fixture, tmp_path / "run")
    save_tiny(tmp_path / "tiny-qwen2")
    run = tmp_path / "run"
    ro = run / "eval" / "cells" / "base"
    assert ro.is_dir()
    real = runs.os.access
    monkeypatch.setattr(runs.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    rc = run_main(full_evaluation.main, ["--model", str(tmp_path / "tiny-qwen2"), "--output-dir", str(run),
                                         "--tasks", "sentiment,nli,qa", "--methods", "concat", "--data", "sample",
                                         "--eval-size", "2", "--no-exclude-selection", "--force"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"cannot write {ro}: no write permission in {ro}" in line, line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_adapters_recorded_for_another_base_model_get_a_note(tmp_path, capsys, monkeypatch):
    """Evaluating adapters whose config names another base model says so (a note, not an error)."""
    import shutil

    import full_evaluation
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_v1", tmp_path / "run")
    save_tiny(tmp_path / "tiny-qwen2")
    monkeypatch.chdir(tmp_path)                      # the fixture's adapters name "tiny-qwen2", relative
    model = "tiny-qwen2"
    cfg = tmp_path / "run" / "adapters" / "nli" / "adapter_config.json"
    doc = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**doc, "base_model_name_or_path": "Qwen/Qwen2-0.5B"}))
    capsys.readouterr()
    rc = run_main(full_evaluation.main, ["--model", str(model), "--output-dir", str(tmp_path / "run"),
                                         "--tasks", "sentiment,nli,qa", "--methods", "oracle", "--data", "sample",
                                         "--eval-size", "2", "--no-exclude-selection", "--build-only"])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [x for x in err.splitlines() if x.startswith("note: the ")]
    assert notes == [f"note: the nli adapter was trained on Qwen/Qwen2-0.5B; evaluating it on {model}"], err


def test_a_context_too_long_is_refused_before_a_merge_is_built(tmp_path, capsys):
    import shutil

    import full_evaluation
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_v1", tmp_path / "run")
    model = save_tiny(tmp_path / "tiny-qwen2")          # max_position_embeddings 1024
    capsys.readouterr()
    rc = run_main(full_evaluation.main, ["--model", str(model), "--output-dir", str(tmp_path / "run"),
                                         "--tasks", "sentiment,nli,qa", "--methods", "ties", "--data", "sample",
                                         "--eval-size", "2", "--no-exclude-selection", "--force",
                                         "--max-prompt-len", "1000", "--max-new-tokens", "64"])
    line = _one_line("\n".join(x for x in capsys.readouterr().err.splitlines() if not x.startswith("note:")))
    assert rc == 2 and "is more than the model's context of 1024" in line, line
    assert not (tmp_path / "run" / "merged" / "ties").exists()


@pytest.mark.parametrize("system", ["moa", "lora_mixer"])
def test_router_training_on_a_full_disk_is_one_line_and_leaves_no_stage(tmp_path, monkeypatch, capsys, system):
    """MoA's and LoRA-Mixer's routers: the routers file cannot be written; one line, exit 2, no stage."""
    import src.experts as experts
    import train_moa
    model = save_tiny(tmp_path / "qwen2")
    run = tmp_path / "run"
    common = ["--model", str(model), "--tasks", "sentiment,nli", "--data", "sample", "--output-dir", str(run),
              "--train-size", "8", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8",
              "--batch-size", "4", "--lr", "1e-2", "--max-steps", "2", "--eval-every", "2", "--save-every", "0",
              "--no-progress"]
    assert run_main(train_loras.main, common) == 0

    def full(*a, **kw):
        raise SafetensorError(NO_SPACE)
    monkeypatch.setattr(experts, "save_file", full)          # both save their routers through src/experts.py
    capsys.readouterr()
    extra = ["--mixer-top-k", "2"] if system == "lora_mixer" else []
    assert run_main(train_moa.main, [*common, "--system", system, *extra]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if not x.startswith(("Loading", "note:"))]
    line = _one_line("\n".join(err))
    assert "no space left on device while writing" in line and "routers.safetensors" in line, line
    assert not list(run.rglob("routers.safetensors"))            # no stage appeared
    assert not [p for p in run.rglob(".*") if p.is_file() or p.is_dir()], list(run.rglob(".*"))


def test_a_plot_on_a_full_disk_leaves_the_previous_one(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from src import analysis
    path = tmp_path / "plots" / "a.png"
    fig = plt.figure()
    analysis._save(fig, path)
    before = path.read_bytes()
    fig = plt.figure()
    fig.add_subplot().plot([1, 2])

    def full(self, fname, *a, **kw):
        Path(fname).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(type(fig), "savefig", full)
    with pytest.raises(OSError) as e:
        analysis._save(fig, path)
    assert e.value.filename == str(path) and path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]


# ------------------------------------------------------------------------ Text-to-LoRA: training and generation

def _t2l_args(model, run, *extra):
    return ["--model", str(model), "--tasks", "sentiment,nli", "--output-dir", str(run), "--encoder", "base",
            "--t2l-hidden", "16", "--t2l-embed", "8", "--batch-size", "6", "--lr", "3e-3", "--max-steps", "2",
            "--eval-every", "2", "--save-every", "0", "--patience", "0", "--no-progress", *extra]


def test_text_to_lora_training_on_a_full_disk_is_one_line_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    """The hypernetwork's weights cannot be written: one line, exit 2, no compose/t2l, no temporary file."""
    import src.t2l as t2l
    import train_text_to_lora
    from tiny import save_tiny_run
    model, run = save_tiny_run(tmp_path, targets=("q_proj", "v_proj"))
    before = _files(run)

    def full(*a, **kw):
        raise SafetensorError(NO_SPACE)
    monkeypatch.setattr(t2l, "save_file", full)
    capsys.readouterr()
    assert run_main(train_text_to_lora.main, _t2l_args(model, run)) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith(("Loading", "note:"))]
    line = _one_line("\n".join(err))
    assert "no space left on device while writing" in line and "t2l" in line, line
    assert not (run / "compose").exists()                         # no stage appeared
    assert [p for p in run.rglob(".*")] == []                     # no temporary file or folder
    assert set(_files(run)) - set(before) <= {"checkpoints", "checkpoints/t2l"} | {
        f"checkpoints/t2l/{p.name}" for p in (run / "checkpoints" / "t2l").glob("*")}, _files(run)
    monkeypatch.undo()                                             # space freed: --resume trains and publishes
    assert run_main(train_text_to_lora.main, [*_t2l_args(model, run), "--resume"]) == 0
    assert (run / "compose" / "t2l" / t2l.WEIGHTS_NAME).is_file()


def test_generating_an_adapter_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import src.t2l as t2l
    import train_text_to_lora
    from tiny import save_tiny_run
    model, run = save_tiny_run(tmp_path, targets=("q_proj", "v_proj"))
    assert run_main(train_text_to_lora.main, _t2l_args(model, run)) == 0
    out = tmp_path / "generated"
    gen = ["generate", "--run", str(run), "--description", "Tell whether a review likes the film.",
           "--out", str(out), "--model", str(model)]
    before = _files(tmp_path)

    def full(*a, **kw):
        raise SafetensorError(NO_SPACE)
    monkeypatch.setattr(lora, "save_file", full)
    capsys.readouterr()
    assert run_main(t2l.main, gen) == 2
    err = [x for x in capsys.readouterr().err.replace("\r", "\n").splitlines()
           if x.strip() and not x.startswith(("Loading", "Writing model", "note:"))]
    line = _one_line("\n".join(err))
    assert f"no space left on device while writing {out}" in line, line
    assert _files(tmp_path) == before
    monkeypatch.undo()
    assert run_main(t2l.main, gen) == 0 and (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------ training: the model's context

@pytest.mark.parametrize("script", ["adapters", "moa"])
def test_training_beyond_the_models_context_is_refused_before_anything_is_written(tmp_path, capsys, script):
    """--max-len above max_position_embeddings (a local folder: before its weights load): one line, exit 2."""
    import train_moa
    model = save_tiny(tmp_path / "qwen2")                          # max_position_embeddings 1024
    run = tmp_path / "run"
    common = ["--model", str(model), "--tasks", "sentiment,nli", "--data", "sample", "--output-dir", str(run),
              "--train-size", "8", "--eval-size", "4", "--max-target-len", "8", "--batch-size", "4",
              "--max-steps", "2", "--eval-every", "2", "--save-every", "0", "--no-progress"]
    if script == "moa":
        assert run_main(train_loras.main, [*common, "--max-len", "96"]) == 0
    before = _files(run) if run.exists() else []
    capsys.readouterr()
    main = train_loras.main if script == "adapters" else train_moa.main
    assert run_main(main, [*common, "--max-len", "2048"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith(("Loading", "note:"))]
    line = _one_line("\n".join(err))
    assert "--max-len 2048 tokens is more than the model's context of 1024 (max_position_embeddings)" in line, line
    assert (_files(run) if run.exists() else []) == before


def test_the_context_check_after_loading_covers_models_without_a_config_file():
    """A GGUF or hub model's context is known only once loaded: `check_max_len` on its config."""
    from types import SimpleNamespace

    from src.errors import UserError
    from src.models import check_max_len
    check_max_len(SimpleNamespace(max_position_embeddings=512), 512)
    check_max_len(SimpleNamespace(), 10 ** 6)                      # unknown context: nothing to check
    with pytest.raises(UserError, match=r"--max-len 513 tokens is more than the model's context of 512"):
        check_max_len(SimpleNamespace(max_position_embeddings=512), 513)


def test_build_seconds_are_recorded_for_the_cost_table(tmp_path, capsys, monkeypatch):
    """A build made by a process is recorded in RUN/eval/builds.json (its wall time); a rerun
    that reuses it leaves the record as the maker wrote it."""
    import shutil

    import full_evaluation
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_v1", tmp_path / "run")
    save_tiny(tmp_path / "tiny-qwen2")
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny-qwen2", "--output-dir", str(tmp_path / "run"), "--tasks", "sentiment,nli,qa",
            "--methods", "weight_sum,svd", "--data", "sample", "--eval-size", "2", "--no-exclude-selection",
            "--build-only"]
    assert run_main(full_evaluation.main, args) == 0, capsys.readouterr().err
    ledger = tmp_path / "run" / "eval" / "builds.json"
    first = json.loads(ledger.read_text())
    assert set(first) == {"weight_sum", "svd"}
    assert all(e["seconds"] > 0 and e["threads"] >= 1 and e["where"] for e in first.values()), first
    assert run_main(full_evaluation.main, args) == 0
    assert "weight_sum: reused" in capsys.readouterr().err
    assert json.loads(ledger.read_text()) == first
