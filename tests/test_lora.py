"""LoRA invariants on tiny qwen2 and llama models, PEFT round trips both ways, bad adapter files."""
from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from src.errors import UserError
from src.lora import (DEFAULT_TARGETS, LoraConfig, adapter_from_model, add_lora, apply_adapter,
                      check_adapter_fits, disable_adapters, export_merged_model, load_adapter,
                      lora_layers, make_adapter, merge_lora, save_adapter, unload_lora,
                      unmerge_lora)
from tiny import tiny_model

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def ids(tokenizer):
    return tokenizer(["### Sentiment:\n the film was good", "### Premise:\n a b"],
                     return_tensors="pt", padding=True)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def randomize_b(model, std: float = 0.1, seed: int = 0) -> None:
    """Give every LoRA B random values so the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: m.linear.weight.detach().clone() for n, m in lora_layers(model).items()}


# --------------------------------------------------------------------------- invariants

def test_zero_init_b_changes_nothing(model, ids):
    base = logits(model, ids)
    layers = add_lora(model, LoraConfig())
    assert all(torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0 for m in layers.values())
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)


def test_only_lora_factors_train(model):
    add_lora(model, LoraConfig(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_merged_forward_equals_unmerged_and_merge_is_idempotent(model, ids):
    add_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    before, w0 = logits(model, ids), weights(model)
    merge_lora(model)
    after_one, w1 = logits(model, ids), weights(model)
    torch.testing.assert_close(after_one, before, **TOL)
    for n, m in lora_layers(model).items():   # W_after == W_before + delta
        torch.testing.assert_close(w1[n], w0[n] + m.delta_weight().detach(), atol=1e-6, rtol=0)
        assert m.merged
    merge_lora(model)                          # twice: nothing changes
    for n, w in weights(model).items():
        assert torch.equal(w, w1[n])
    torch.testing.assert_close(logits(model, ids), after_one, atol=0, rtol=0)


def test_unmerge_restores(model, ids):
    add_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    before, w0 = logits(model, ids), weights(model)
    merge_lora(model)
    unmerge_lora(model)
    unmerge_lora(model)                        # idempotent too
    for n, w in weights(model).items():
        torch.testing.assert_close(w, w0[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), before, **TOL)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_base_outputs_and_restores_state(model, ids, merged):
    base = logits(model, ids)
    add_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    if merged:
        merge_lora(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), base, **TOL)
    assert all(m.merged == merged and m.enabled for m in lora_layers(model).values())
    torch.testing.assert_close(logits(model, ids), adapted, **TOL)


def test_dropout_only_in_train_mode(model, ids):
    add_lora(model, LoraConfig(rank=4, alpha=8, dropout=0.5))
    randomize_b(model, std=0.5)
    model.eval()
    first = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), first, atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    train_a = logits(model, ids)
    train_b = logits(model, ids)
    assert not torch.allclose(train_a, train_b) and not torch.allclose(train_a, first)
    model.eval()
    torch.testing.assert_close(logits(model, ids), first, atol=0, rtol=0)


@pytest.mark.parametrize("targets,expected", [
    (DEFAULT_TARGETS, {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}),
    ((*DEFAULT_TARGETS, "o_proj"), {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (("q_proj", "v_proj"), {"q_proj", "v_proj"}),
    ("q_proj,v_proj", {"q_proj", "v_proj"}),
])
def test_target_modules_by_name(model, targets, expected):
    layers = add_lora(model, LoraConfig(target_modules=targets))
    assert {n.rsplit(".", 1)[-1] for n in layers} == expected
    assert len(layers) == 2 * len(expected)   # every block of the 2-layer model
    assert "lm_head" not in layers


def test_target_modules_by_regex(model):
    layers = add_lora(model, LoraConfig(target_modules=(r"model\.layers\.1\.self_attn\.(q|k)_proj",)))
    assert sorted(layers) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    unload_lora(model)
    with pytest.raises(UserError, match="no nn.Linear matches"):
        add_lora(model, LoraConfig(target_modules=("nothing_like_this",)))


def test_unload_puts_plain_linears_back(model, ids):
    base = logits(model, ids)
    add_lora(model, LoraConfig())
    randomize_b(model)
    unload_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)


# --------------------------------------------------------------------------- PEFT round trips

PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                     alpha_pattern={"v_proj": 32}),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"up_proj": 2}),
}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_peft_adapter_loads_with_identical_logits(arch, tmp_path, ids, kind):
    cfg = PeftLoraConfig(target_modules=list(DEFAULT_TARGETS), **PEFT_CONFIGS[kind])
    pm = get_peft_model(tiny_model(arch), cfg).eval()
    g = torch.Generator().manual_seed(1)
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            w = m.lora_B["default"].weight
            w.data = torch.randn(w.shape, generator=g) * 0.1
    want = logits(pm, ids)
    pm.save_pretrained(str(tmp_path))
    adapter = load_adapter(tmp_path)
    if kind == "patterns":
        assert adapter.ranks["model.layers.0.self_attn.q_proj"] == 2
        assert adapter.ranks["model.layers.1.mlp.down_proj"] == 6
        assert adapter.scales["model.layers.0.self_attn.v_proj"] == 8.0
    if kind == "rslora":
        assert adapter.scales["model.layers.0.self_attn.q_proj"] == pytest.approx(8 / 2)
        assert adapter.scales["model.layers.0.mlp.up_proj"] == pytest.approx(8 / 2 ** 0.5)
    model = tiny_model(arch)
    apply_adapter(model, adapter)
    torch.testing.assert_close(logits(model, ids), want, **TOL)


@pytest.mark.parametrize("kind", ["plain", "rslora", "mixed_ranks"])
def test_our_adapter_loads_in_peft_with_identical_logits(arch, tmp_path, ids, kind):
    model = tiny_model(arch)
    if kind == "mixed_ranks":   # rank/alpha patterns written by make_adapter
        g = torch.Generator().manual_seed(2)
        factors, scales = {}, {}
        for i, (n, lin) in enumerate((n, m) for n, m in model.named_modules() if n.endswith(DEFAULT_TARGETS)):
            r = (2, 4, 6)[i % 3]
            factors[n] = (torch.randn(r, lin.in_features, generator=g) * 0.1,
                          torch.randn(lin.out_features, r, generator=g) * 0.1)
            scales[n] = (2.0, 0.5, 1.0)[i % 3]
        adapter = make_adapter(factors, scales, "tiny", name="mixed")
        assert adapter.config["rank_pattern"] and adapter.config["alpha_pattern"]
        apply_adapter(model, adapter)
    else:
        add_lora(model, LoraConfig(rank=4, alpha=8, use_rslora=kind == "rslora"))
        randomize_b(model)
        adapter = adapter_from_model(model, "tiny")
    want = logits(model, ids)
    save_adapter(adapter, tmp_path / "ad", extra_json={"training_config.json": {"note": "x"}})
    pm = PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "ad")).eval()
    torch.testing.assert_close(logits(pm, ids), want, **TOL)
    back = load_adapter(tmp_path / "ad")    # and back into ours
    assert back.scales == pytest.approx(adapter.scales) and back.ranks == adapter.ranks


# --------------------------------------------------------------------------- bad input

def _small_adapter(model, seed=0):
    add_lora(model, LoraConfig(rank=2, target_modules=("q_proj",)))
    randomize_b(model, seed=seed)
    ad = adapter_from_model(model, "tiny", name="small")
    unload_lora(model)
    return ad


def test_adapter_that_does_not_fit(model):
    ad = _small_adapter(model)
    name = "model.layers.0.self_attn.q_proj"
    a, b = ad.factors[name]
    ad.factors[name] = (torch.zeros(2, 40), b)
    with pytest.raises(UserError) as e:
        apply_adapter(model, ad)
    assert str(e.value) == f"adapter small module {name}: lora_B @ lora_A is [32, 40] but the layer is [32, 32]"
    assert not lora_layers(model)             # nothing changed
    ad.factors = {"model.layers.0.self_attn.nope": (a, b)}
    with pytest.raises(UserError, match="module model.layers.0.self_attn.nope: no such nn.Linear"):
        check_adapter_fits(model, ad)


def test_bad_adapter_files(model, tmp_path):
    folder = save_adapter(_small_adapter(model), tmp_path / "ad")
    cfg_text = (folder / "adapter_config.json").read_text()

    (folder / "adapter_model.safetensors").rename(tmp_path / "w")
    with pytest.raises(UserError, match="missing adapter_model.safetensors"):
        load_adapter(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file at all")
    with pytest.raises(UserError, match="unreadable safetensors file"):
        load_adapter(folder)
    (tmp_path / "w").replace(folder / "adapter_model.safetensors")
    load_adapter(folder)

    (folder / "adapter_config.json").write_text(cfg_text[:-10])
    with pytest.raises(UserError, match="not valid JSON"):
        load_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**json.loads(cfg_text), "r": 3}))
    with pytest.raises(UserError, match="has rank 2 but the config says 3"):
        load_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(UserError, match="missing adapter_config.json"):
        load_adapter(folder)
    with pytest.raises(UserError, match="missing"):
        load_adapter(tmp_path / "no_such_folder")


def test_errors_are_one_line(model, tmp_path):
    folder = save_adapter(_small_adapter(model), tmp_path / "ad")
    (folder / "adapter_model.safetensors").write_bytes(b"{}garbage")
    with pytest.raises(UserError) as e:
        load_adapter(folder)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- export

def test_export_merged_model_is_a_plain_model_with_the_same_logits(arch, tmp_path, ids, tokenizer):
    model = tiny_model(arch)
    base = logits(model, ids)
    w0 = {n: p.detach().clone() for n, p in model.state_dict().items()}
    add_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    want = logits(model, ids)
    adapter = adapter_from_model(model)
    unload_lora(model)
    export_merged_model(model, adapter, tmp_path / "merged", tokenizer)
    # the in-memory model is back to its base weights, without LoRA layers
    assert not lora_layers(model)
    for n, p in model.state_dict().items():
        assert torch.equal(p, w0[n]), n
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, ids), want, **TOL)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_export_failure_restores_the_model_and_writes_nothing(model, tmp_path, monkeypatch):
    add_lora(model, LoraConfig(rank=4, alpha=8))
    randomize_b(model)
    adapter = adapter_from_model(model)
    unload_lora(model)
    w0 = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_merged_model(model, adapter, tmp_path / "merged")
    assert not lora_layers(model) and list(tmp_path.iterdir()) == []
    for n, p in model.state_dict().items():
        assert torch.equal(p, w0[n]), n


def test_atomic_writes_give_ordinary_file_permissions(tmp_path):
    from src.evaluation import write_text_atomic
    from src.runs import write_json_atomic
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_text_atomic(tmp_path / "b.txt", "y")
    finally:
        os.umask(old)
    for name in ("a.json", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644   # not mkstemp's private 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]


def test_safetensors_files_get_ordinary_permissions_too(tmp_path):
    """safetensors' writer makes its file private (0600); adapters, routers and checkpoints read like
    any other file (the umask's mode)."""
    from safetensors.torch import save_file

    from src.lora import save_adapter
    from src.runs import atomic_path
    from tiny import random_adapter, tiny_model
    old = os.umask(0o022)
    try:
        save_adapter(random_adapter(tiny_model("qwen2"), 0), tmp_path / "adapter")
        with atomic_path(tmp_path / "routers.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    files = [*(tmp_path / "adapter").iterdir(), tmp_path / "routers.safetensors"]
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, f
