"""Tiny random-init causal LMs and a tokenizer that needs no hub, for tests and the CI pipeline."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

_CORPUS = [
    "### Summarization:\n### Translation from English to German:\n### Context:\n### Question:\n",
    "### Answer:\n### Sentiment:\n### Premise:\n### Hypothesis:\n### Relationship:\n",
    "### Paraphrasing:\n### Solution 1:\n### Solution 2:\n### Correct Solution:\n",
    "positive negative entailment neutral contradiction the a of and to in is was for on that",
    "Der die das und ist nicht ein eine mit von zu den auf für sich dem",
] * 20


def tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the spot: encodes any text, left-pads, has EOS and PAD."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", padding_side="left")


def tiny_model(arch: str = "qwen2", vocab_size: int = 400, seed: int = 0, hidden: int = 32,
               layers: int = 2) -> torch.nn.Module:
    """A 2-layer random causal LM (Qwen2 or Llama) with q/k/v/o/gate/up/down projections."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, eos_token_id=0, pad_token_id=1, bos_token_id=None,
                  tie_word_embeddings=False)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def save_tiny(path: str | Path, arch: str = "qwen2", **kw) -> Path:
    """A Hugging Face model folder (config, weights, tokenizer) that `--model PATH` loads."""
    path = Path(path)
    tiny_model(arch, **kw).save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def trained_like_adapter(model: torch.nn.Module, seed: int, rank: int = 4, std: float = 0.3):
    """An Adapter as training would leave it: add_lora (Kaiming A), random B, read back, unload."""
    from src.lora import LoraConfig, adapter_from_model, add_lora, unload_lora
    torch.manual_seed(seed)
    layers = add_lora(model, LoraConfig(rank=rank, alpha=2.0 * rank))
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.normal_(0, std)
    adapter = adapter_from_model(model)
    unload_lora(model)
    return adapter


def random_adapter(model, seed, rank=4, alpha=8.0, targets=None, name="", std=0.3):
    """A LoRA with random A and B (B non-zero, so the expert changes the outputs)."""
    from src.lora import DEFAULT_TARGETS, make_adapter, matches
    targets = targets or DEFAULT_TARGETS
    g = torch.Generator().manual_seed(seed)
    factors, scales = {}, {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and matches(n, targets):
            factors[n] = (torch.randn(rank, m.in_features, generator=g) * 0.3,
                          torch.randn(m.out_features, rank, generator=g) * std)
            scales[n] = alpha / rank
    return make_adapter(factors, scales, None, name=name)


def save_tiny_run(root: str | Path, tasks=("sentiment", "nli"), targets=("q_proj", "v_proj"), seed: int = 20,
                  rank: int = 4) -> tuple[Path, Path]:
    """(model folder, run folder): a tiny Qwen2 model folder and RUN/adapters/<task> for each task,
    random rank-`rank` adapters with a training_config.json, as train_individual_loras.py leaves them."""
    import json

    from src.lora import save_adapter
    root = Path(root)
    model_dir = save_tiny(root / "qwen2")
    model = tiny_model("qwen2")
    run = root / "run"
    for i, t in enumerate(tasks):
        folder = run / "adapters" / t
        save_adapter(random_adapter(model, seed + i, rank=rank, targets=targets, name=t), folder)
        (folder / "training_config.json").write_text(json.dumps({"task": t}))
    return model_dir, run
