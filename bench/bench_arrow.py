"""Benchmark: Arrow routing at generation time, ours vs the base model vs PEFT's, in one run.

Usage:
    python bench/bench_arrow.py [--rounds 3] [--no-write]

SmolLM2-135M-Instruct (the embedded GGUF, float32, CPU), 16 prompts from ../shared/data
(validation, the 7-task set mixed, each truncated to its last 64 tokens), 32 new tokens per
prompt with EOS suppressed until then (equal work). Adapters: random-init LoRAs of the real
adapters' shapes (rank 8, alpha 16, B ~ N(0, 0.02), q/k/v/gate/up/down of all 30 layers),
5 and 7 of them, saved in PEFT's format; top-k 3, temperature 1. For each expert count:

  - our Arrow (src/arrow.py, PEFT's power-iteration prototypes and seed, so that the outputs
    are comparable) vs the base model at batch 16 (target >= 0.8x);
  - ours vs PEFT's `create_arrow_model` on the same adapters and prompts (target >= 1.5x),
    and whether the greedy outputs are the same.

Methods alternate round by round after a warm-up round; each method's best round is
reported (the least disturbed on a shared machine), the median ratio beside it.
Writes the "Arrow" section of bench/RESULTS.md (and only that section).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.bench_eval import (bench_parser, load_embedded, machine, mixed_prompts, random_adapters,  # noqa: E402
                              timed, write_section)
from src import evaluation as ev  # noqa: E402
from src import tasks as T  # noqa: E402
from src.arrow import ArrowConfig, ArrowRouter  # noqa: E402
from src.lora import save_adapter  # noqa: E402
from src.models import load_base_model  # noqa: E402

TASKS = list(T.PRESETS["7tasks"])
BATCH, PROMPT_LEN, NEW_TOKENS, TOP_K, SEED = 16, 64, 32, 3, 0


def generate(model, tok, ids, router=None):
    seconds, gen = timed(lambda: ev.generate(model, tok, ids, batch_size=BATCH, max_new_tokens=NEW_TOKENS,
                                             router=router, min_new_tokens=NEW_TOKENS))
    return sum(len(x) for x in gen.token_ids) / seconds, gen.token_ids


def profile_ours(model, tok, ids, adapters) -> str:
    """Where our Arrow's time goes: the top operators of one generation (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    router = ArrowRouter(model, adapters, ArrowConfig(arrow_top_k=TOP_K))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tok, ids, router)
    router.remove()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main(argv=None):
    p = bench_parser(__doc__, 3, "alternating rounds after a warm-up")
    p.add_argument("--profile", action="store_true", help="also print where our Arrow's time goes")
    args = p.parse_args(argv)
    import peft
    t_bench = time.perf_counter()
    load_s, model, tok = load_embedded(args.threads)
    peft_base, _ = load_base_model("smollm2-135m", "cpu", "float32")
    print(f"model loaded in {load_s:.1f} s (twice: one copy for PEFT)", flush=True)
    ids = mixed_prompts(tok, TASKS, BATCH, PROMPT_LEN)
    adapters = random_adapters(model, TASKS)
    cfg = ArrowConfig(arrow_top_k=TOP_K, arrow_prototypes="power", arrow_seed=SEED)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for t, ad in adapters.items():
            ad.config["base_model_name_or_path"] = None
            paths[t] = str(save_adapter(ad, Path(tmp) / t))
        for n in (5, 7):
            sub = {t: adapters[t] for t in TASKS[:n]}
            ref = peft.create_arrow_model(peft_base, [paths[t] for t in sub],
                                          peft.ArrowConfig(top_k=TOP_K, router_temperature=1.0, rng_seed=SEED))
            res = {"base": [], "ours": [], "peft": []}
            same = None
            for r in range(args.rounds + 1):
                res["base"].append(generate(model, tok, ids)[0])
                router = ArrowRouter(model, sub, cfg)
                speed, ours_ids = generate(model, tok, ids, router)
                router.remove()
                res["ours"].append(speed)
                speed, peft_ids = generate(ref, tok, ids)
                res["peft"].append(speed)
                same = ours_ids == peft_ids if same is None else same and ours_ids == peft_ids
                print(f"{n} experts, round {r}{' (warm-up)' if r == 0 else ''}: "
                      + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()), flush=True)
            ref.unload()            # the base model's own layers back, for the next expert count
            res = {k: v[1:] for k, v in res.items()}
            best = {k: max(v) for k, v in res.items()}
            med = {k: statistics.median(v) for k, v in res.items()}
            rows[n] = (best, med, same)
    prof = profile_ours(model, tok, ids, {t: adapters[t] for t in TASKS}) if args.profile else None

    total_s = time.perf_counter() - t_bench
    lines = [
        "## Arrow", "",
        "`python bench/bench_arrow.py` (bench/bench_arrow.py): greedy generation on SmolLM2-135M-Instruct "
        f"(the embedded GGUF, float32, CPU) with {BATCH} prompts from ../shared/data (validation, the 7-task set "
        f"mixed, each cut to its last {PROMPT_LEN} tokens), {NEW_TOKENS} new tokens each with EOS suppressed "
        "until then. Adapters: random-init LoRAs of the real adapters' shapes (rank 8, alpha 16, B ~ N(0, 0.02), "
        f"q/k/v/gate/up/down of all 30 layers), top-k {TOP_K}, temperature 1; both sides use PEFT's "
        f"power-iteration prototypes with rng_seed {SEED}, so their outputs can be compared token for token. "
        f"{args.rounds} alternating rounds after a warm-up; each method's best round, the median ratio in brackets. "
        f"peft {peft.__version__}.", "",
        f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; bench wall time {total_s:.0f} s.", "",
        "| experts | ours tokens/s | base tokens/s | ours / base (median) | target | PEFT tokens/s | "
        "ours / PEFT (median) | target | same greedy outputs as PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, (best, med, same) in rows.items():
        lines.append(f"| {n} | {best['ours']:.1f} | {best['base']:.1f} | {best['ours'] / best['base']:.3f}x "
                     f"({med['ours'] / med['base']:.3f}x) | >= 0.8x | {best['peft']:.1f} | "
                     f"{best['ours'] / best['peft']:.2f}x ({med['ours'] / med['peft']:.2f}x) | >= 1.5x | "
                     f"{'yes' if same else 'NO'} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if prof:
        print(prof)
    if not args.no_write:
        print(f"wrote {write_section(text, 'Arrow')}")


if __name__ == "__main__":
    main()
