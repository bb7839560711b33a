"""Bad input is refused by name, on one line, before anything is written; checkpoints need no pickle.

Adapters with PEFT features we do not implement (DoRA, biases, modules_to_save, ...), odd
adapter configs, `src.merge --out` over its own inputs, non-finite numbers in merge and
training flags, and the safetensors + JSON checkpoints (exact round trip, atomic, legacy
state.pt still read, kill and resume).
"""
from __future__ import annotations

import fractions
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from tiny import random_adapter, save_tiny, tiny_model

import src.training as training
import train_individual_loras as train_loras
from src.config import TrainConfig
from src.moa import RouterConfig
from src.errors import UserError, run_main
from src.lora import LoraConfig, load_adapter, save_adapter
from src.merge import main as merge_main
from src.training import (LEGACY_STATE_FILE, STATE_FILE, linear_schedule, load_checkpoint, rng_state,
                          save_checkpoint, set_rng_state)


def _snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256 of the bytes (or 'dir')} of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _merge(args, capsys) -> tuple[int, str]:
    rc = run_main(merge_main, [str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture
def plain(tmp_path) -> Path:
    """One of our plain LoRA adapters on tiny qwen2 (q_proj, v_proj, rank 2)."""
    model = tiny_model("qwen2")
    return save_adapter(random_adapter(model, 0, rank=2, targets=("q_proj", "v_proj"), name="plain"),
                        tmp_path / "plain")


def _peft_adapter(folder: Path, **kw) -> Path:
    """A real PEFT adapter on tiny qwen2 (LoraConfig(**kw) on q_proj and v_proj), saved."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    cfg = PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], **kw)
    get_peft_model(tiny_model("qwen2"), cfg).save_pretrained(str(folder))
    return folder


def _edit_config(folder: Path, **fields) -> Path:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return path


# ------------------------------------------------------------------ 1. unsupported PEFT features

@pytest.mark.parametrize("feature, message", [
    (dict(use_dora=True), "use_dora is true: DoRA adapters are not supported (only plain LoRA)"),
    (dict(lora_bias=True), "lora_bias is true: a bias on lora_B is not supported (only plain LoRA)"),
])
def test_real_peft_dora_and_lora_bias_adapters_are_refused(tmp_path, plain, capsys, feature, message):
    peft_dir = _peft_adapter(tmp_path / "peft", **feature)
    before = _snapshot(tmp_path)
    rc, err = _merge(["--method", "concat", "--out", tmp_path / "out", peft_dir, plain], capsys)
    assert rc == 2
    assert _one_error_line(err) == f"error: {peft_dir / 'adapter_config.json'}: {message}"
    assert _snapshot(tmp_path) == before  # no output folder, no temp leftovers, inputs untouched


@pytest.mark.parametrize("feature, flag, key, what", [
    (dict(use_dora=True), "use_dora", "model.layers.0.self_attn.q_proj.lora_magnitude_vector",
     "a DoRA magnitude vector"),
    (dict(lora_bias=True), "lora_bias", "model.layers.0.self_attn.q_proj.lora_B.bias", "a bias"),
    (dict(bias="all"), "bias", "model.layers.0.self_attn.k_proj.bias", "a bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save", "lm_head.weight", "not a LoRA factor"),
])
def test_tensors_that_are_not_lora_factors_are_refused_by_key(tmp_path, plain, capsys, feature, flag, key, what):
    """Even when the config does not say so (here: the flag switched off by hand)."""
    peft_dir = _peft_adapter(tmp_path / "peft", **feature)
    _edit_config(peft_dir, **{flag: {"bias": "none", "modules_to_save": None}.get(flag, False)})
    before = _snapshot(tmp_path)
    rc, err = _merge(["--method", "concat", "--out", tmp_path / "out", peft_dir, plain], capsys)
    assert rc == 2
    assert _one_error_line(err) == (f"error: {peft_dir / 'adapter_model.safetensors'}: tensor base_model.model.{key} "
                                    f"is {what}: only plain LoRA (<module>.lora_A.weight / lora_B.weight) is supported")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("field, value, message", [
    ("use_dora", True, "use_dora is true: DoRA"),
    ("lora_bias", True, "lora_bias is true"),
    ("modules_to_save", ["lm_head"], 'modules_to_save is ["lm_head"]'),
    ("layer_replication", [[0, 1], [0, 2]], "layer_replication is [[0, 1], [0, 2]]"),
    ("megatron_config", {"tensor_model_parallel_size": 2}, "megatron_config is {"),
    ("bias", "all", 'bias is "all"'),
    ("bias", "lora_only", 'bias is "lora_only"'),
    ("fan_in_fan_out", True, "fan_in_fan_out is true"),
    ("target_parameters", ["mlp.experts.down_proj"], "target_parameters is"),
    ("alora_invocation_tokens", [5, 6], "alora_invocation_tokens is [5, 6]"),
    ("trainable_token_indices", [3], "trainable_token_indices is [3]"),
    ("init_lora_weights", "pissa_niter_4", 'init_lora_weights is "pissa_niter_4"'),
    ("peft_type", "LOHA", "peft_type 'LOHA' is not LORA"),
])
def test_unsupported_config_fields_are_refused_by_name(plain, capsys, field, value, message):
    cfg_path = _edit_config(plain, **{field: value})
    before = _snapshot(plain.parent)
    rc, err = _merge(["--method", "concat", "--out", plain.parent / "out", plain, plain], capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {cfg_path}: {message}"), line
    assert _snapshot(plain.parent) == before


def test_plain_lora_settings_of_peft_still_load(plain):
    """Defaults PEFT writes into every config, and inits that end in a plain LoRA."""
    _edit_config(plain, megatron_core="megatron.core", megatron_config=None, layer_replication=None,
                 target_parameters=None, alora_invocation_tokens=None, use_dora=False, lora_bias=False,
                 modules_to_save=None, init_lora_weights="gaussian", use_qalora=False, loftq_config={})
    assert len(load_adapter(plain).factors) == 4
    peft_plain = _peft_adapter(plain.parent / "peft", init_lora_weights="gaussian")
    assert load_adapter(peft_plain).ranks == {n: 2 for n in load_adapter(peft_plain).factors}


# ------------------------------------------------------------------ 2. odd adapter configs

@pytest.mark.parametrize("text, message", [
    ("[]", "not a JSON object (got list)"),
    ("3", "not a JSON object (got int)"),
    ('"r"', "not a JSON object (got str)"),
    ("null", "not a JSON object (got NoneType)"),
])
def test_config_that_is_json_but_not_an_object(plain, capsys, text, message):
    cfg_path = plain / "adapter_config.json"
    cfg_path.write_text(text)
    before = _snapshot(plain.parent)
    rc, err = _merge(["--method", "concat", "--out", plain.parent / "out", plain, plain], capsys)
    assert rc == 2 and _one_error_line(err) == f"error: {cfg_path}: {message}"
    assert _snapshot(plain.parent) == before


@pytest.mark.parametrize("fields, message", [
    ({"r": "2"}, 'r must be a positive integer, got "2"'),
    ({"r": 2.5}, "r must be a positive integer, got 2.5"),
    ({"r": 0}, "r must be a positive integer, got 0"),
    ({"r": -2}, "r must be a positive integer, got -2"),
    ({"r": True}, "r must be a positive integer, got true"),
    ({"r": None}, "r must be a positive integer, got null"),
    ({"lora_alpha": "8"}, 'lora_alpha must be positive and finite, got "8"'),
    ({"lora_alpha": 0}, "lora_alpha must be positive and finite, got 0"),
    ({"lora_alpha": -8.0}, "lora_alpha must be positive and finite, got -8.0"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be positive and finite, got NaN"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be positive and finite, got Infinity"),
    ({"lora_alpha": [8]}, "lora_alpha must be positive and finite, got [8]"),
    ({"use_rslora": "yes"}, 'use_rslora must be true or false, got "yes"'),
    ({"rank_pattern": ["q_proj"]}, 'rank_pattern must be an object, got ["q_proj"]'),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer, got 0"),
    ({"alpha_pattern": {"v_proj": float("nan")}}, "alpha_pattern['v_proj'] must be positive and finite, got NaN"),
    ({"rank_pattern": {"q_proj(": 2}}, ("rank_pattern key 'q_proj(' is not a valid regex (missing ), "
                                        "unterminated subpattern at position 6)")),
])
def test_rank_and_alpha_of_the_wrong_type_or_value(plain, fields, message):
    cfg_path = _edit_config(plain, **fields)  # json.dumps writes nan / inf as NaN / Infinity
    before = _snapshot(plain)
    with pytest.raises(UserError) as e:
        load_adapter(plain)
    assert str(e.value) == f"{cfg_path}: {message}" and "\n" not in str(e.value)
    assert _snapshot(plain) == before


# ------------------------------------------------------------------ 3. merge --out over its inputs

@pytest.fixture
def two(tmp_path) -> tuple[Path, Path]:
    model = tiny_model("qwen2")
    return tuple(save_adapter(random_adapter(model, s, rank=2, targets=("q_proj",), name=n), tmp_path / "ads" / n)
                 for s, n in ((0, "a"), (1, "b")))


def _refused(args, root: Path, capsys) -> str:
    before = _snapshot(root)
    rc, err = _merge(args, capsys)
    assert rc == 2
    line = _one_error_line(err)
    assert _snapshot(root) == before  # nothing written, nothing replaced
    return line


def test_merge_out_equal_to_an_input_is_refused_even_with_force(two, tmp_path, capsys):
    a, b = two
    line = _refused(["--method", "concat", "--force", "--out", a, a, b], tmp_path, capsys)
    assert line == f"error: --out {a} is one of the adapters being merged"
    line = _refused(["--method", "concat", "--force", "--out", b, a, tmp_path / "ads" / ".." / "ads" / "b"],
                    tmp_path, capsys)
    assert line == f"error: --out {b} is one of the adapters being merged ({tmp_path / 'ads' / '..' / 'ads' / 'b'})"


def test_merge_out_through_a_symlink_is_compared_resolved(two, tmp_path, capsys):
    a, b = two
    (tmp_path / "link").symlink_to(a, target_is_directory=True)
    line = _refused(["--method", "concat", "--force", "--out", tmp_path / "link", a, b], tmp_path, capsys)
    assert line == f"error: --out {tmp_path / 'link'} is one of the adapters being merged ({a})"


def test_merge_out_inside_or_around_an_input_is_refused(two, tmp_path, capsys):
    a, b = two
    line = _refused(["--method", "concat", "--force", "--out", a / "merged", a, b], tmp_path, capsys)
    assert line == f"error: --out {a / 'merged'} lies inside one of the adapters being merged, {a}"
    line = _refused(["--method", "concat", "--force", "--out", tmp_path / "ads", a, b], tmp_path, capsys)
    assert line == f"error: --out {tmp_path / 'ads'} contains one of the adapters being merged, {a}"


def test_merge_export_model_over_an_input_or_the_out_folder_is_refused(two, tmp_path, capsys):
    a, b = two
    base = save_tiny(tmp_path / "base")
    capsys.readouterr()  # save_pretrained's progress bar
    common = ["--method", "concat", "--force", "--base", base]
    line = _refused([*common, "--out", tmp_path / "m", "--export-model", b, a, b], tmp_path, capsys)
    assert line == f"error: --export-model {b} is one of the adapters being merged"
    line = _refused([*common, "--out", tmp_path / "m", "--export-model", tmp_path / "m", a, b], tmp_path, capsys)
    assert line == f"error: --export-model {tmp_path / 'm'} is the --out folder"
    line = _refused([*common, "--out", base, "--export-model", tmp_path / "x", a, b], tmp_path, capsys)
    assert line == f"error: --out {base} is the --base model"


# ------------------------------------------------------------------ 4. non-finite numbers

@pytest.mark.parametrize("args, message", [
    (["--method", "concat", "--weights", "nan", "1"], "--weights must be finite numbers, got nan"),
    (["--method", "concat", "--weights", "1", "inf"], "--weights must be finite numbers, got inf"),
    (["--method", "ties", "--density", "nan"], "--density must be in (0, 1], got nan"),
    (["--method", "knots", "--merge-scale", "nan"], "--merge-scale must be a finite number or 'auto', got nan"),
])
def test_merge_refuses_non_finite_numbers(two, tmp_path, capsys, args, message):
    a, b = two
    line = _refused([*args, "--out", tmp_path / "out", a, b], tmp_path, capsys)
    assert line == f"error: {message}"


TRAIN_BAD = [
    ("--lr", "nan", "--lr must be positive and finite, got nan"),
    ("--lr", "inf", "--lr must be positive and finite, got inf"),
    ("--alpha", "nan", "--alpha must be positive and finite, got nan"),
    ("--alpha", "inf", "--alpha must be positive and finite, got inf"),
    ("--alpha", "-16", "--alpha must be positive and finite, got -16.0"),
    ("--max-grad-norm", "nan", "--max-grad-norm must be finite and not negative, got nan"),
    ("--max-grad-norm", "inf", "--max-grad-norm must be finite and not negative, got inf"),
    ("--epochs", "nan", "--epochs must be positive and finite, got nan"),
    ("--epochs", "inf", "--epochs must be positive and finite, got inf"),
    ("--weight-decay", "nan", "--weight-decay must be finite and not negative, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be finite and not negative, got inf"),
    ("--dropout", "nan", "--dropout must be in [0, 1), got nan"),
]


@pytest.mark.parametrize("flag, value, message", TRAIN_BAD, ids=[f"{f}={v}" for f, v, _ in TRAIN_BAD])
def test_training_refuses_non_finite_numbers(tmp_path, capsys, flag, value, message):
    run = tmp_path / "run"
    argv = ["--preset", "demo", "--output-dir", str(run), "--no-progress", flag, value]
    assert run_main(train_loras.main, argv) == 2
    assert _one_error_line(capsys.readouterr().err) == f"error: {message}"
    assert not run.exists() and list(tmp_path.iterdir()) == []  # no run folder, no checkpoint


def test_config_classes_refuse_non_finite_numbers_directly():
    nan, inf = float("nan"), float("inf")
    for kw in (dict(lr=nan), dict(lr=inf), dict(epochs=nan), dict(max_grad_norm=nan), dict(weight_decay=inf)):
        with pytest.raises(UserError, match="finite"):
            TrainConfig(**kw)
    for kw in (dict(alpha=nan), dict(alpha=0.0), dict(dropout=nan), dict(rank=2.0)):
        with pytest.raises(UserError):
            LoraConfig(**kw)
    with pytest.raises(UserError, match="--eta must be finite"):
        RouterConfig(eta=nan, lm_loss=True)


# ------------------------------------------------------------------ 5. checkpoints without pickle

def _same(a, b, path="state") -> None:
    """Equal values of the same types (tuple is not list, int is not float), tensors bit for bit."""
    assert type(a) is type(b), (path, type(a), type(b))
    if torch.is_tensor(a):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def _trainer_like_state() -> tuple[dict, torch.optim.Optimizer, dict[str, torch.nn.Parameter]]:
    """What _Trainer.checkpoint saves, after two AdamW steps on two parameters."""
    torch.manual_seed(0)
    params = {"l0.lora_A": torch.nn.Parameter(torch.randn(2, 5)),
              "l0.lora_B": torch.nn.Parameter(torch.randn(5, 2))}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    scheduler = linear_schedule(optimizer, 1, 10)
    for _ in range(2):
        sum((p ** 2).sum() for p in params.values()).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    cpu = {k: p.detach().clone() for k, p in params.items()}
    dtypes = {"bf16": torch.randn(3).bfloat16(), "i64": torch.arange(4), "scalar": torch.tensor(7.5),
              "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]), "view": cpu["l0.lora_A"][1]}
    random.random()
    state = {"params": cpu, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "step": 2, "epoch": 0, "batch_in_epoch": 2, "best_val": 0.1 + 0.2,
             "best_step": 2, "bad_evals": 0, "best_params": {k: v * 3 for k, v in cpu.items()}, "tokens": 123,
             "elapsed_s": 1.25, "log_offset": 0, "nothing": None, "nan": float("nan"), "neg_zero": -0.0,
             "fingerprint": {"LoraConfig.target_modules": ("q_proj", "v_proj"), "TrainConfig.lr": 1e-2,
                             "DataConfig.train_size": None, "nested": [{"a": (1, [2.5, "x"])}, True]},
             "odd_keys": {1: "int", (2, "t"): "tuple", "__tensor__": "a tag as a key"},
             "tag_key": {"__tuple__": [1]}, "dtypes": dtypes}
    return state, optimizer, params


def test_checkpoint_round_trips_exactly_without_pickle(tmp_path):
    state, optimizer, params = _trainer_like_state()
    save_checkpoint(tmp_path, state)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[1] == STATE_FILE and files[0].startswith("state-") \
        and files[0].endswith(".safetensors")
    doc = json.loads((tmp_path / STATE_FILE).read_text())  # plain JSON, plus a safetensors file
    assert doc["tensors"] == files[0] and doc["state"]["step"] == 2
    back = load_checkpoint(tmp_path)
    _same(state, back)

    # the restored optimizer, scheduler and RNG continue exactly as the saved ones
    twin = [torch.nn.Parameter(back["params"][k].clone()) for k in params]
    opt2 = torch.optim.AdamW(twin, lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(back["optimizer"])
    for opt, ps in ((optimizer, list(params.values())), (opt2, twin)):
        sum((p ** 2).sum() for p in ps).backward()
        opt.step()
    for p, q in zip(params.values(), twin):
        assert torch.equal(p, q)
    draws = (random.random(), torch.rand(3))
    set_rng_state(back["rng"])
    assert random.random() == draws[0] and torch.equal(torch.rand(3), draws[1])


def test_a_new_checkpoint_replaces_the_old_and_a_kill_before_the_commit_keeps_it(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    save_checkpoint(tmp_path, {"step": 2, "w": torch.full((2,), 2.0)})
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 1 and load_checkpoint(tmp_path)["step"] == 2

    def killed(*a, **k):
        raise KeyboardInterrupt  # after the new tensors file, before state.json is replaced
    monkeypatch.setattr(training, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"step": 3, "w": torch.full((2,), 3.0)})
    back = load_checkpoint(tmp_path)
    assert back["step"] == 2 and torch.equal(back["w"], torch.full((2,), 2.0))


def test_a_value_that_is_not_plain_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint value fingerprint/x: a Fraction is neither a tensor"):
        save_checkpoint(tmp_path / "ck", {"step": 1, "fingerprint": {"x": fractions.Fraction(1, 3)}})
    assert not (tmp_path / "ck").exists()


def test_legacy_state_pt_still_loads_and_is_replaced_by_the_next_save(tmp_path):
    state, _, _ = _trainer_like_state()
    torch.save(state, tmp_path / LEGACY_STATE_FILE)
    _same(state, load_checkpoint(tmp_path))
    save_checkpoint(tmp_path, state)
    assert not (tmp_path / LEGACY_STATE_FILE).exists()
    _same(state, load_checkpoint(tmp_path))


@pytest.mark.parametrize("damage", ["json", "missing_tensors", "truncated_tensors", "format"])
def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, damage):
    save_checkpoint(tmp_path, {"step": 1, "w": torch.ones(64)})
    tensors = next(tmp_path.glob("state-*.safetensors"))
    if damage == "json":
        (tmp_path / STATE_FILE).write_text('{"format": 1, "tens')
    elif damage == "missing_tensors":
        tensors.unlink()
    elif damage == "truncated_tensors":
        tensors.write_bytes(tensors.read_bytes()[:-40])
    else:
        _edit = json.loads((tmp_path / STATE_FILE).read_text())
        (tmp_path / STATE_FILE).write_text(json.dumps({**_edit, "tensors": "../elsewhere.safetensors"}))
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / STATE_FILE}: unreadable checkpoint (") and "\n" not in msg
    assert msg.endswith("); delete it or use --force")


# ------------------------------------------------------------------ kill and resume, end to end

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "qwen2")


def _train_args(model, run, *extra):
    return ["--model", str(model), "--tasks", "sentiment", "--data", "sample", "--output-dir", str(run),
            "--train-size", "16", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8",
            "--batch-size", "4", "--lr", "1e-2", "--max-steps", "6", "--eval-every", "2", "--save-every", "2",
            "--log-every", "1", "--no-progress", *extra]


def _factors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{n}.{i}": t for n, ab in load_adapter(folder).factors.items() for i, t in enumerate(ab)}


def test_kill_and_resume_from_the_new_and_from_a_legacy_checkpoint(tiny_dir, tmp_path, monkeypatch):
    assert run_main(train_loras.main, _train_args(tiny_dir, tmp_path / "full")) == 0
    want = _factors(tmp_path / "full" / "adapters" / "sentiment")

    real_fit = training.fit

    def killed_at_step_5(*a, **kw):
        def on_step(step):
            if step == 5:
                raise KeyboardInterrupt  # step 4's checkpoint stays, step 5 is lost
        return real_fit(*a, **kw, on_step=on_step)
    monkeypatch.setattr(training, "fit", killed_at_step_5)
    cut = tmp_path / "cut"
    assert run_main(train_loras.main, _train_args(tiny_dir, cut)) == 130
    monkeypatch.setattr(training, "fit", real_fit)
    ckpt = cut / "checkpoints" / "sentiment"
    assert not (ckpt / LEGACY_STATE_FILE).exists() and load_checkpoint(ckpt)["step"] == 4

    # the same checkpoint as an older version wrote it: one state.pt from torch.save
    legacy = tmp_path / "legacy"
    shutil.copytree(cut, legacy)
    old = legacy / "checkpoints" / "sentiment"
    torch.save(load_checkpoint(old), old / LEGACY_STATE_FILE)
    for p in [old / STATE_FILE, *old.glob("state-*.safetensors")]:
        p.unlink()

    steps = []

    def recording(*a, **kw):
        return real_fit(*a, **kw, on_step=steps.append)
    monkeypatch.setattr(training, "fit", recording)
    for run in (cut, legacy):
        steps.clear()
        assert run_main(train_loras.main, _train_args(tiny_dir, run, "--resume")) == 0
        assert steps == [5, 6], run.name  # continued from step 4, not retrained
        got = _factors(run / "adapters" / "sentiment")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), run.name  # bit-identical
        assert not (run / "checkpoints").exists()
