"""Benchmark: LoRA-Mixer at generation time against the base model, and a router training step
against a single-LoRA training step, in one run.

Usage:
    python bench/bench_mixer.py [--rounds 3] [--no-write]

SmolLM2-135M-Instruct (the embedded GGUF, float32, CPU). Experts: random-init LoRAs of the
real adapters' shapes (rank 8, alpha 16, B ~ N(0, 0.02), q/k/v/gate/up/down of all 30
layers), 5 and 7 of them; the mixer routes in every projection they cover (the default,
--mixer-modules all), with random routers.

  1. Generation: 16 prompts from ../shared/data (validation, the 7-task set mixed, each cut
     to its last 64 tokens), 32 new tokens each with EOS suppressed until then; top-3
     LoRA-Mixer vs the base model at batch 16 (target >= 0.8x).
  2. Training: one optimizer step (forward, backward, AdamW) at batch 4 on sequences of 128
     tokens (the 7 tasks' training examples, target-only loss): LoRA-Mixer's routers over 7
     frozen experts (soft gates, the full routing loss) vs a single rank-8 LoRA on the same
     modules as the experts (target >= 0.8x the single LoRA's steps/s).

Rounds alternate after a warm-up; each side's best round is reported, the median ratio beside it.
Writes the "LoRA-Mixer" section of bench/RESULTS.md (and only that section).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_eval import (DATA, bench_parser, load_embedded, machine, mixed_prompts,  # noqa: E402
                              random_adapters, timed, write_section)
from src import evaluation as ev  # noqa: E402
from src import mixer as mx  # noqa: E402
from src import tasks as T  # noqa: E402
from src.lora import LoraConfig, add_lora, unload_lora  # noqa: E402
from src.training import LM_OBJECTIVE, collate, encode_examples  # noqa: E402

TASKS = list(T.PRESETS["7tasks"])
BATCH, PROMPT_LEN, NEW_TOKENS, TOP_K = 16, 64, 32, 3
TRAIN_BATCH, TRAIN_LEN, TRAIN_STEPS = 4, 128, 4


def generate(model, tok, ids, router=None) -> float:
    seconds, gen = timed(lambda: ev.generate(model, tok, ids, batch_size=BATCH, max_new_tokens=NEW_TOKENS,
                                             router=router, min_new_tokens=NEW_TOKENS))
    return sum(len(x) for x in gen.token_ids) / seconds


def randomize(mixer, seed=0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in mixer.routers:
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    mixer.routers.requires_grad_(False)
    mixer.refresh()


def steps_per_s(model, params, objective, batches) -> float:
    """Optimizer steps per second over `batches` (one step each), after the caller's warm-up."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    start = time.perf_counter()
    for b in batches:
        terms = objective.fn(model, b)
        loss = sum(w * terms[k] / max(b[key], 1) for k, (w, key) in objective.terms.items())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return len(batches) / (time.perf_counter() - start)


def train_batches(tok) -> list[dict]:
    examples = T.load_task_data(TASKS, "train", "dir", DATA, size=4, seed=0)
    items = [it for i, t in enumerate(TASKS) for it in encode_examples(tok, examples[t], TRAIN_LEN, 32, label=i)]
    items = [it for it in items if len(it["input_ids"]) >= TRAIN_LEN // 2]
    return [collate(items[i:i + TRAIN_BATCH], tok.pad_token_id)
            for i in range(0, TRAIN_BATCH * TRAIN_STEPS, TRAIN_BATCH)]


def main(argv=None):
    args = bench_parser(__doc__, 3, "alternating rounds after a warm-up").parse_args(argv)
    t_bench = time.perf_counter()
    load_s, model, tok = load_embedded(args.threads)
    print(f"model loaded in {load_s:.1f} s", flush=True)
    ids = mixed_prompts(tok, TASKS, BATCH, PROMPT_LEN)
    adapters = random_adapters(model, TASKS)
    modules = mx.choose_modules(list(adapters[TASKS[0]].factors), "all")
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})

    gen_rows = {}
    for n in (5, 7):
        sub = {t: adapters[t] for t in TASKS[:n]}
        res = {"base": [], "mixer": []}
        for r in range(args.rounds + 1):
            res["base"].append(generate(model, tok, ids))
            mixer = mx.LoRAMixer(model, sub, modules, TOP_K)
            randomize(mixer)
            res["mixer"].append(generate(model, tok, ids, mixer))
            mixer.remove()
            print(f"{n} experts, round {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()), flush=True)
        gen_rows[n] = {k: v[1:] for k, v in res.items()}

    batches = train_batches(tok)
    n_tok = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    cfg = mx.MixerConfig()
    train = {"single": [], "mixer": []}
    for r in range(args.rounds + 1):
        layers = add_lora(model, LoraConfig(rank=8, alpha=16, target_modules=tuple(short)))
        params = [p for m in layers.values() for p in (m.lora_A, m.lora_B)]
        train["single"].append(steps_per_s(model, params, LM_OBJECTIVE, batches))
        unload_lora(model)
        mixer = mx.LoRAMixer(model, adapters, modules, TOP_K, TASKS)
        params = list(mixer.routers)
        for p in params:
            p.requires_grad_(True)
        train["mixer"].append(steps_per_s(model, params, mx.objective(mixer, cfg), batches))
        mixer.remove()
        print(f"training round {r}{' (warm-up)' if r == 0 else ''}: "
              + ", ".join(f"{k} {v[-1]:.3f} steps/s" for k, v in train.items()), flush=True)
    train = {k: v[1:] for k, v in train.items()}

    total_s = time.perf_counter() - t_bench
    import transformers
    lines = [
        "## LoRA-Mixer", "",
        "`python bench/bench_mixer.py` (bench/bench_mixer.py) on SmolLM2-135M-Instruct (the embedded GGUF, "
        "float32, CPU, 1 torch thread). Experts: random-init LoRAs of the real adapters' shapes (rank 8, alpha 16, "
        "B ~ N(0, 0.02), q/k/v/gate/up/down of all 30 layers); the mixer routes in every projection they "
        f"cover ({', '.join(short)}, the default), random routers. {args.rounds} alternating rounds after a warm-up; "
        "each side's best round, the median ratio in brackets. "
        f"torch {torch.__version__}, transformers {transformers.__version__}.", "",
        f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; bench wall time {total_s:.0f} s.", "",
        f"Generation: {BATCH} prompts from ../shared/data (validation, 7 tasks mixed, last {PROMPT_LEN} tokens), "
        f"{NEW_TOKENS} new tokens each, top-{TOP_K}, batch {BATCH}.", "",
        "| experts | LoRA-Mixer tokens/s | base tokens/s | mixer / base (median) | target |",
        "|---|---|---|---|---|",
    ]
    for n, res in gen_rows.items():
        best = {k: max(v) for k, v in res.items()}
        med = {k: statistics.median(v) for k, v in res.items()}
        lines.append(f"| {n} | {best['mixer']:.1f} | {best['base']:.1f} | {best['mixer'] / best['base']:.3f}x "
                     f"({med['mixer'] / med['base']:.3f}x) | >= 0.8x |")
    best = {k: max(v) for k, v in train.items()}
    med = {k: statistics.median(v) for k, v in train.items()}
    lines += [
        "",
        f"Training step (forward, backward, AdamW) at batch {TRAIN_BATCH}, sequences of up to {TRAIN_LEN} tokens "
        f"({n_tok:.0f} real tokens per batch on average, the 7 tasks' training examples), {TRAIN_STEPS} steps per "
        "round: the routers of a 7-expert LoRA-Mixer (soft gates, L_task + balance + entropy) vs one rank-8 LoRA "
        f"on {', '.join(short)}.", "",
        "| LoRA-Mixer router steps/s | single-LoRA steps/s | mixer / single (median) | target |",
        "|---|---|---|---|",
        f"| {best['mixer']:.3f} | {best['single']:.3f} | {best['mixer'] / best['single']:.3f}x "
        f"({med['mixer'] / med['single']:.3f}x) | >= 0.8x |", "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section(text, 'LoRA-Mixer')}")


if __name__ == "__main__":
    main()
