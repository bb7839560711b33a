"""Benchmark: SMILE routing at generation time, against the base model and our Arrow, in one run.

Usage:
    python bench/bench_smile.py [--rounds 3] [--top-k 3] [--no-write]

SmolLM2-135M-Instruct (the embedded GGUF, float32, CPU), 16 prompts from ../shared/data
(validation, the 7-task set mixed, each truncated to its last 64 tokens), 32 new tokens per
prompt with EOS suppressed until then (equal work). Adapters: random-init LoRAs of the real
adapters' shapes (rank 8, alpha 16, B ~ N(0, 0.02), q/k/v/gate/up/down of all 30 layers), 5 and
7 of them. For each expert count, side by side in alternating rounds after a warm-up:

  - the base model;
  - our Arrow (src/arrow.py, exact prototypes) at top-k K;
  - our SMILE (src/smile.py, its defaults: k_gate 4, no weighting, no normalisation, the whole
    LoRAs) at the same top-k K.

Targets: SMILE >= 0.8x the base model, and at least as fast as Arrow at the same k (>= 1.0x).
Each method's best round is reported (the least disturbed on a shared machine), the median ratio
beside it. Writes the "SMILE" section of bench/RESULTS.md (and only that section).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_eval import bench_parser, machine, routed_tokens_per_s, routing_setup, write_section  # noqa: E402
from src import tasks as T  # noqa: E402
from src.arrow import ArrowConfig, ArrowRouter  # noqa: E402
from src.smile import SmileConfig, SmileRouter  # noqa: E402

TASKS = list(T.PRESETS["7tasks"])
BATCH, PROMPT_LEN, NEW_TOKENS = 16, 64, 32


def main(argv=None):
    p = bench_parser(__doc__, 3, "alternating rounds after a warm-up")
    p.add_argument("--top-k", type=int, default=3, help="experts per token, both routers (default 3, Arrow's)")
    args = p.parse_args(argv)
    t_bench, load_s, model, tok, ids, adapters = routing_setup(args.threads, TASKS, BATCH, PROMPT_LEN)
    smile_cfg = SmileConfig(smile_top_k=args.top_k)
    arrow_cfg = ArrowConfig(arrow_top_k=args.top_k)

    rows = {}
    for n in (5, 7):
        sub = {t: adapters[t] for t in TASKS[:n]}
        res = {"base": [], "arrow": [], "smile": []}
        for r in range(args.rounds + 1):
            res["base"].append(routed_tokens_per_s(model, tok, ids))
            res["arrow"].append(routed_tokens_per_s(model, tok, ids, lambda: ArrowRouter(model, sub, arrow_cfg)))
            res["smile"].append(routed_tokens_per_s(model, tok, ids, lambda: SmileRouter(model, sub, smile_cfg)))
            print(f"{n} experts, round {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()), flush=True)
        res = {k: v[1:] for k, v in res.items()}
        rows[n] = ({k: max(v) for k, v in res.items()}, {k: statistics.median(v) for k, v in res.items()})

    total_s = time.perf_counter() - t_bench
    lines = [
        "## SMILE", "",
        "`python bench/bench_smile.py` (bench/bench_smile.py): greedy generation on SmolLM2-135M-Instruct "
        f"(the embedded GGUF, float32, CPU) with {BATCH} prompts from ../shared/data (validation, the 7-task set "
        f"mixed, each cut to its last {PROMPT_LEN} tokens), {NEW_TOKENS} new tokens each with EOS suppressed "
        "until then. Adapters: random-init LoRAs of the real adapters' shapes (rank 8, alpha 16, B ~ N(0, 0.02), "
        f"q/k/v/gate/up/down of all 30 layers); SMILE with its defaults (k_gate 4) and Arrow with exact "
        f"prototypes, both at top-k {args.top_k}. {args.rounds} alternating rounds after a warm-up; each method's "
        "best round, the median ratio in brackets.", "",
        f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; bench wall time {total_s:.0f} s.", "",
        "| experts | SMILE tokens/s | base tokens/s | SMILE / base (median) | target | Arrow tokens/s | "
        "SMILE / Arrow (median) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, (best, med) in rows.items():
        lines.append(f"| {n} | {best['smile']:.1f} | {best['base']:.1f} | {best['smile'] / best['base']:.3f}x "
                     f"({med['smile'] / med['base']:.3f}x) | >= 0.8x | {best['arrow']:.1f} | "
                     f"{best['smile'] / best['arrow']:.2f}x ({med['smile'] / med['arrow']:.2f}x) | >= 1.0x |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section(text, 'SMILE')}")


if __name__ == "__main__":
    main()
