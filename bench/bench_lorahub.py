"""Benchmark: LoraHub's search on the embedded model, ours next to LoraHub's own way of scoring
a candidate, in one run.

    python bench/bench_lorahub.py                 # budget 40, 5 shots x 5 tasks; updates bench/RESULTS.md
    python bench/bench_lorahub.py --budget 4 --no-write

SmolLM2-135M-Instruct (float32, CPU), five random rank-8 adapters (alpha 16) on the study's six
projections, 5 training shots of each of 5 tasks from ../shared/data (at most 320 tokens).

  * ours (src/lorahub.py): the whole search, `--budget` candidates with NGOpt. Per candidate the
    weighted sums of the stacked factors are written into low-rank side paths, then one forward
    pass over the shots (the LM head on target tokens only). Reported: seconds per candidate,
    for the whole budget, and the share of the search outside the forward passes (target < 10%).
  * LoraHub's way (sail-sg/lorahub `get_score`): per candidate, the weighted sum of every adapter's
    PEFT state dict, `set_peft_model_state_dict` into a PEFT model, and the loss from the model's
    own `outputs.loss` (full-sequence logits, labels -100 on the prompt), batch by batch. Timed on
    `--reference-candidates` candidates (the same weights as ours), per candidate.

Both score the same shots with the same weights: the losses must agree (1e-4 relative).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_eval import DATA, bench_parser, load_embedded, machine, random_adapters, write_section  # noqa: E402
from src import tasks as T  # noqa: E402
from src.lorahub import Composer, ShotLoss, SidePath, search  # noqa: E402
from src.training import collate, encode_examples  # noqa: E402

TASKS = ["summarization", "translation", "qa", "sentiment", "nli"]


def reference_scorer(model, tok, adapters, shots, max_len, batch_size):
    """LoraHub's get_score without the regulariser: (set weights, score) closures on a PeftModel."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    first = adapters[0]
    targets = sorted({n.rsplit(".", 1)[-1] for n in first.factors})
    pm = get_peft_model(model, PeftLoraConfig(r=8, lora_alpha=16, target_modules=targets))
    states = []
    for ad in adapters:
        sd = {}
        for n, (a, b) in ad.factors.items():
            sd[f"base_model.model.{n}.lora_A.weight"] = a
            sd[f"base_model.model.{n}.lora_B.weight"] = b
        states.append(sd)
    keys = list(get_peft_model_state_dict(pm))
    assert set(keys) == set(states[0]), "PEFT keys differ from ours"
    items = encode_examples(tok, shots, max_len=max_len, max_target_len=min(96, max_len // 2))
    items.sort(key=lambda it: len(it["input_ids"]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batches = [collate(items[i:i + batch_size], pad) for i in range(0, len(items), batch_size)]
    n_tokens = sum(b["n_tokens"] for b in batches)

    @torch.inference_mode()
    def score(w):
        merged = {k: sum(wi * sd[k] for wi, sd in zip(w, states)) for k in keys}
        set_peft_model_state_dict(pm, merged)
        total = 0.0
        for b in batches:
            out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            # outputs.loss is the mean over the batch's target tokens: back to a sum, as ours
            total += float(out.loss) * b["n_tokens"]
        return total / n_tokens

    def unload():
        pm.unload()
    return score, unload


def main(argv=None):
    p = bench_parser(__doc__, 1, "unused")
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--reference-candidates", type=int, default=5)
    args = p.parse_args(argv)
    t_bench = time.perf_counter()
    load_s, model, tok = load_embedded(args.threads)
    adapters = list(random_adapters(model, TASKS).values())
    shots = [ex for t in TASKS for ex in T.load_examples(t, "train", "dir", DATA, args.shots, 0)]
    loss = ShotLoss(model, tok, shots, max_len=320, batch_size=8)

    composer = Composer(adapters, "factor")
    side = SidePath(model, composer.ranks())
    t0 = time.perf_counter()
    found = search(lambda w: (composer.write(side, w), loss())[1], len(adapters), args.budget, (-1.5, 1.5),
                   0.05, seed=0)
    total = time.perf_counter() - t0
    outside = 1 - loss.seconds / total
    ours_per = total / args.budget
    ours_losses = {tuple(t["weights"]): t["loss"] for t in found.trace}
    side.remove()
    print(f"ours: {args.budget} candidates in {total:.1f} s ({ours_per:.2f} s each), {outside:.1%} outside "
          f"the forward passes; objective {found.start_loss:.4f} -> {found.loss:.4f}", file=sys.stderr)

    score, unload = reference_scorer(model, tok, adapters, shots, 320, 8)
    cands = [t["weights"] for t in found.trace[:args.reference_candidates]]
    times, worst = [], 0.0
    for w in cands:
        t0 = time.perf_counter()
        ref = score(w)
        times.append(time.perf_counter() - t0)
        worst = max(worst, abs(ref - ours_losses[tuple(w)]) / abs(ref))
    unload()
    ref_per = statistics.median(times)
    print(f"LoraHub's way: {ref_per:.2f} s per candidate (median of {len(cands)}); loss agreement {worst:.1e}",
          file=sys.stderr)
    ok = outside < 0.10 and worst < 1e-4
    wall = time.perf_counter() - t_bench
    lines = [
        "## LoraHub",
        "",
        "`python bench/bench_lorahub.py` (bench/bench_lorahub.py): LoraHub's search on SmolLM2-135M-Instruct "
        f"(float32, CPU), {len(adapters)} random rank-8 adapters on q/k/v/gate/up/down, {args.shots} training "
        f"shots of each of {len(TASKS)} tasks from ../shared/data ({loss.n_tokens} target tokens, prompts cut "
        f"to 320 tokens), NGOpt, budget {args.budget}, seed 0. Ours: the weighted factors written into side "
        "paths, one forward pass per candidate (LM head on target tokens only). LoraHub's way "
        "(sail-sg/lorahub `get_score`): the weighted sum of the adapters' PEFT state dicts, "
        "`set_peft_model_state_dict`, the model's `outputs.loss` over full-sequence logits; timed on the "
        f"first {len(cands)} of the same candidates.",
        "",
        f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; model load {load_s:.0f} s; bench wall time "
        f"{wall:.0f} s.",
        "",
        "| | seconds per candidate | whole budget (s) | outside the forward passes |",
        "|---|---|---|---|",
        f"| ours | {ours_per:.2f} | {total:.1f} | {outside:.1%} (target < 10%) |",
        f"| LoraHub's way | {ref_per:.2f} | {ref_per * args.budget:.1f} (estimated) | |",
        "",
        f"Ours is {ref_per / ours_per:.2f}x LoraHub's speed per candidate; the two losses agree to {worst:.1e} "
        f"(relative). The search went from objective {found.start_loss:.4f} (w = 0, the base model) to "
        f"{found.loss:.4f}. {'OK' if ok else 'FAIL'}.",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("\n".join(lines) + "\n", title="LoraHub")
        print("updated bench/RESULTS.md (section LoraHub)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
