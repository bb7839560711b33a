"""Property-based fuzzing of the loaders users feed files to: JSONL data, adapter folders
(config and safetensors), training checkpoints, evaluation cells and MoA configs.

Random truncations, byte flips, wrong types and missing keys must give a clean refusal
(UserError, one line) or a correct load, never another exception."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src import moa, runs, systems, tasks, training  # noqa: F401 (systems: every method registered)
from src.errors import UserError
from src.lora import load_adapter, save_adapter
from tiny import random_adapter, tiny_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=True)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@st.composite
def byte_damage(draw, data: bytes) -> bytes:
    """A truncation, a few flipped bytes, or both."""
    out = bytearray(data)
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    for _ in range(draw(st.integers(0 if len(out) else 0, 3))):
        if out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


@st.composite
def json_damage(draw, obj):
    """A JSON object with a key removed, a value replaced by any JSON value, or the whole
    document replaced by another type."""
    kind = draw(st.sampled_from(["drop", "replace", "nested", "whole"]))
    if kind == "whole" or not isinstance(obj, dict) or not obj:
        return draw(JSON_VALUES)
    obj = json.loads(json.dumps(obj))
    key = draw(st.sampled_from(sorted(obj)))
    if kind == "drop":
        del obj[key]
    elif kind == "replace" or not isinstance(obj[key], dict) or not obj[key]:
        obj[key] = draw(JSON_VALUES)
    else:
        inner = draw(st.sampled_from(sorted(obj[key])))
        obj[key][inner] = draw(JSON_VALUES)
    return obj


def _clean(fn):
    """fn() either succeeds or raises a one-line UserError."""
    try:
        return fn()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return None


# --------------------------------------------------------------------------- JSONL data

LINES = (SAMPLE / "qa" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:4]


@FUZZ
@given(st.data())
def test_jsonl_data(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("data")
    (root / "qa").mkdir()
    lines = list(LINES)
    i = data.draw(st.integers(0, len(lines) - 1))
    if data.draw(st.booleans()):
        lines[i] = json.dumps(data.draw(json_damage(json.loads(lines[i]))))
    else:
        lines[i] = data.draw(byte_damage(lines[i].encode())).decode("utf-8", "replace").replace("\n", " ")
    (root / "qa" / "train.jsonl").write_bytes("\n".join(lines).encode())
    got = _clean(lambda: tasks.load_examples("qa", "train", "dir", root))
    if got is not None:                            # a correct load: every example well formed
        for ex in got:
            assert isinstance(ex.id, str) and isinstance(ex.target, str) and ex.target.strip()
            assert all(isinstance(ex.input[f], str) for f in tasks.TASKS["qa"].fields)   # what the prompt reads
            tasks.TASKS["qa"].prompt(ex)


# --------------------------------------------------------------------------- adapter folders

@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "qa"
    save_adapter(random_adapter(tiny_model("qwen2"), 0, rank=4, name="qa"), folder)
    return folder


@FUZZ
@given(st.data())
def test_adapter_config(adapter_dir, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("ad") / "qa"
    shutil.copytree(adapter_dir, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if data.draw(st.booleans()):
        (folder / "adapter_config.json").write_text(json.dumps(data.draw(json_damage(cfg))))
    else:
        (folder / "adapter_config.json").write_bytes(data.draw(byte_damage(json.dumps(cfg).encode())))
    ad = _clean(lambda: load_adapter(folder))
    if ad is not None:
        for n, (a, b) in ad.factors.items():       # loaded: shapes and scales fit
            assert a.shape[0] == b.shape[1] and ad.scales[n] > 0


@FUZZ
@given(st.data())
def test_adapter_weights(adapter_dir, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("ad") / "qa"
    shutil.copytree(adapter_dir, folder)
    raw = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data.draw(byte_damage(raw)))
    ad = _clean(lambda: load_adapter(folder))
    if ad is not None:
        for a, b in ad.factors.values():
            assert a.dim() == b.dim() == 2 and a.shape[0] == b.shape[1]


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    training.save_checkpoint(folder, {"step": 3, "params": {"w": p.detach()}, "optimizer": opt.state_dict(),
                                      "rng": training.rng_state(), "best_val": None})
    return folder


@FUZZ
@given(st.data())
def test_checkpoint(checkpoint_dir, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("ck")
    shutil.copytree(checkpoint_dir, folder, dirs_exist_ok=True)
    target = data.draw(st.sampled_from(sorted(p.name for p in folder.iterdir())))
    raw = (folder / target).read_bytes()
    if target.endswith(".json") and data.draw(st.booleans()):
        (folder / target).write_text(json.dumps(data.draw(json_damage(json.loads(raw)))))
    else:
        (folder / target).write_bytes(data.draw(byte_damage(raw)))
    state = _clean(lambda: training.load_checkpoint(folder))
    assert state is None or isinstance(state, dict)


# --------------------------------------------------------------------------- run folders

@FUZZ
@given(st.data())
def test_evaluation_cell(tmp_path_factory, data):
    run = tmp_path_factory.mktemp("run")
    fp = {"method": "base", "task": "qa"}
    cell = {"method": "base", "task": "qa", "fingerprint": fp, "n": 1, "result": {"score": 1.0},
            "records": [{"id": "x", "prediction": "a"}], "meta": {}}
    path = runs.cell_path(run, "base", "qa")
    path.parent.mkdir(parents=True)
    if data.draw(st.booleans()):
        path.write_text(json.dumps(data.draw(json_damage(cell))))
    else:
        path.write_bytes(data.draw(byte_damage(json.dumps(cell).encode())))
    got = _clean(lambda: runs.load_cell(run, "base", "qa", fp))
    if got is not None:                            # reused only whole and with the same fingerprint
        assert got["fingerprint"] == fp and isinstance(got["records"], list) and isinstance(got["result"], dict)


@FUZZ
@given(st.data())
def test_moa_config(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("moa")
    cfg = {"tasks": ["qa", "nli"], "experts_saved": False, "router": "study"}
    path = folder / "moa_config.json"
    if data.draw(st.booleans()):
        path.write_text(json.dumps(data.draw(json_damage(cfg))))
    else:
        path.write_bytes(data.draw(byte_damage(json.dumps(cfg).encode())))
    got = _clean(lambda: moa.moa_experts(folder))
    if got is not None:
        experts, saved = got
        assert isinstance(experts, list) and all(isinstance(t, str) for t in experts) and isinstance(saved, bool)
