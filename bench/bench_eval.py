"""Benchmark: evaluation speed on SmolLM2-135M-Instruct (issue 4), side by side in one run.

Usage:
    python bench/bench_eval.py [--rounds 3] [--no-write]

On prompts from ../shared/data (the 5-task set, mixed), with random-init rank-8 LoRAs
(alpha 16, B non-zero) on the study's targets (q, k, v, gate, up, down) and a MoA with random
routers (so batches really mix experts):

 1. generation tokens/s of a merged adapter folded into the weights vs the base model (target >= 0.97x)
 2. MoA at batch 16 vs the base model at batch 16 (target >= 0.8x)
 3. MoA batched (batch 16, routed once per sequence from the prompt) vs the study's way
    (batch size 1, routers re-deciding at every decoding step) (target >= 5x)
 4. wall time of a whole 5-task evaluation matrix (full_evaluation.py: base, oracle, moa,
    concat, weight_sum, svd) at a small stated size, the model load included

Every generation is greedy with EOS suppressed until the token budget (equal work for every
method). Measurements 1 and 2 alternate the methods round by round after a warm-up round and
report each method's best round (the least disturbed by other processes on a shared machine)
and the median.
Writes the "Evaluation" section of bench/RESULTS.md (and only that section).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import full_evaluation  # noqa: E402
from src import evaluation as ev  # noqa: E402
from src import tasks as T  # noqa: E402
from src.lora import LoraConfig, add_lora, adapter_from_model, folded, save_adapter, unload_lora  # noqa: E402
from src.merging import merge_adapters  # noqa: E402
from src.models import load_base_model  # noqa: E402
from src.moa import MixtureOfLoRAs, MoAConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TASKS = list(T.PRESETS["5tasks"])
BATCH = 16
PROMPT_LEN = 64         # prompts truncated to their last 64 tokens for the speed measurements
NEW_TOKENS = 32
STUDY_PROMPTS = 8       # batch size 1 is slow; its tokens/s does not depend on how many prompts
MATRIX = dict(eval_size=8, max_new_tokens=32, batch_size=8)
STUDY = "moa batched / study's way"


def random_adapters(model, tasks, seed=0) -> dict:
    out = {}
    for i, t in enumerate(tasks):
        torch.manual_seed(seed + i)
        layers = add_lora(model, LoraConfig(rank=8, alpha=16))
        with torch.no_grad():
            for m in layers.values():
                m.lora_B.normal_(0, 0.02)
        out[t] = adapter_from_model(model, name=t)
        unload_lora(model)
    return out


def randomize_routers(moa, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in moa.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.05)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def tokens_per_s(model, tok, ids, batch_size, moa=None) -> tuple[float, list]:
    seconds, gen = timed(lambda: ev.generate(model, tok, ids, batch_size=batch_size, max_new_tokens=NEW_TOKENS,
                                             router=moa, min_new_tokens=NEW_TOKENS))
    n = sum(len(x) for x in gen.token_ids)
    return n / seconds, [r["routed_task"] for r in gen.routing] if gen.routing else None


def routed_tokens_per_s(model, tok, ids, make=None, batch_size: int = BATCH, new_tokens: int = 32) -> float:
    """Tokens/s of one greedy generation of exactly `new_tokens` per prompt (EOS suppressed until
    then: equal work), through the router `make()` injects (removed after); `make=None`: none."""
    router = make() if make is not None else None
    try:
        seconds, gen = timed(lambda: ev.generate(model, tok, ids, batch_size=batch_size, max_new_tokens=new_tokens,
                                                 router=router, min_new_tokens=new_tokens))
    finally:
        if router is not None:
            router.remove()
    return sum(len(x) for x in gen.token_ids) / seconds


def routing_setup(threads: int, tasks, n_prompts: int = BATCH, prompt_len: int = PROMPT_LEN):
    """The router benchmarks' common start: (its start time, the model's load seconds, model,
    tokenizer, mixed prompts of `tasks`, random-init adapters of the real adapters' shapes, one per task)."""
    start = time.perf_counter()
    load_s, model, tok = load_embedded(threads)
    print(f"model loaded in {load_s:.1f} s", flush=True)
    return start, load_s, model, tok, mixed_prompts(tok, tasks, n_prompts, prompt_len), random_adapters(model, tasks)


def save_random_run(run: Path, model, adapters: dict) -> None:
    """A run folder of `adapters` (RUN/adapters/<task>) and a MoA over them with random routers (RUN/moa)."""
    for t, ad in adapters.items():
        save_adapter(ad, run / "adapters" / t)
    moa = MixtureOfLoRAs(model, adapters)
    randomize_routers(moa)
    moa.save(run / "moa")
    moa.remove()


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    n = torch.get_num_threads()
    why = ": on this shared machine 2 threads ran 10-20x slower whenever another process took a core" if n == 1 else ""
    return (f"{cpu or 'unknown CPU'}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({n} thread{'s' if n > 1 else ''}{why}), Python {platform.python_version()}")


def write_section(text: str, title: str = "Evaluation") -> Path:
    """Replace (or append) the `## {title}` section of bench/RESULTS.md with `text`."""
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
    return path


def mixed_prompts(tok, tasks, n: int, prompt_len: int) -> list[list[int]]:
    """n validation prompts from ../shared/data, the tasks interleaved, each cut to its last
    `prompt_len` tokens."""
    examples = T.load_task_data(tasks, "validation", "dir", DATA, size=n // len(tasks) + 1, seed=0)
    mixed = [ex for i in range(n) for t in tasks for ex in examples[t][i:i + 1]][:n]
    return [T.encode_prompt(tok, T.TASKS[ex.task].prompt(ex), prompt_len) for ex in mixed]


def bench_parser(doc: str, rounds: int, rounds_help: str) -> argparse.ArgumentParser:
    """The flags every generation benchmark takes: --rounds, --threads, --no-write."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                   "machine 2 threads run 10-20x slower whenever another process takes a core)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return p


def load_embedded(threads: int):
    """(load seconds, model, tokenizer): the embedded SmolLM2-135M in float32 on the CPU, with
    `threads` torch threads; exits when ../shared/data (the prompts) is missing."""
    torch.set_num_threads(threads)
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} is missing (the benchmark reads real prompts from ../shared/data)")
    load_s, (model, tok) = timed(lambda: load_base_model("smollm2-135m", "cpu", "float32"))
    return load_s, model, tok


def main(argv=None):
    args = bench_parser(__doc__, 5, "alternating rounds for measurements 1 and 2").parse_args(argv)
    t_bench = time.perf_counter()
    load_s, model, tok = load_embedded(args.threads)
    print(f"model loaded in {load_s:.1f} s", flush=True)
    ids = mixed_prompts(tok, TASKS, BATCH, PROMPT_LEN)
    adapters = random_adapters(model, TASKS)
    merged = merge_adapters(list(adapters.values()), "concat")

    # 1 + 2: base, folded merge, MoA, at batch 16, alternating; round 0 is a warm-up
    res = {"base": [], "folded": [], "moa": []}
    moa_routed = None
    for r in range(args.rounds + 1):
        res["base"].append(tokens_per_s(model, tok, ids, BATCH)[0])
        with folded(model, merged):
            res["folded"].append(tokens_per_s(model, tok, ids, BATCH)[0])
        moa = MixtureOfLoRAs(model, adapters)
        randomize_routers(moa)
        speed, moa_routed = tokens_per_s(model, tok, ids, BATCH, moa)
        res["moa"].append(speed)
        moa.remove()
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: "
              + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in res.items()), flush=True)
    res = {k: v[1:] for k, v in res.items()}
    best = {k: max(v) for k, v in res.items()}
    med = {k: statistics.median(v) for k, v in res.items()}

    # 3: the study's way, batch 1 with routers re-deciding every step, same prompts and routers
    study = MixtureOfLoRAs(model, adapters, MoAConfig(redecide_every_step=True))
    randomize_routers(study)
    study_speed, _ = tokens_per_s(model, tok, ids[:STUDY_PROMPTS], 1, study)
    study.remove()
    print(f"study's way (batch 1, re-deciding): {study_speed:.1f} tok/s", flush=True)

    # 4: the whole 5-task matrix through full_evaluation.py
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        save_random_run(run, model, adapters)
        del model
        argv = ["--model", "smollm2-135m", "--output-dir", str(run), "--tasks", "5tasks",
                "--methods", "moa,concat,weight_sum,svd", "--data-dir", str(DATA), "--device", "cpu",
                "--eval-size", str(MATRIX["eval_size"]), "--max-new-tokens", str(MATRIX["max_new_tokens"]),
                "--batch-size", str(MATRIX["batch_size"])]
        matrix_s, _ = timed(lambda: full_evaluation.main(argv))
        summary = json.loads((run / "eval" / "summary.json").read_text())
        cell_s = sum(c["seconds"] for m in summary["methods"].values() for c in m["per_task"].values())
        n_cells = sum(len(m["per_task"]) for m in summary["methods"].values())

    ratios = {"folded / base": best["folded"] / best["base"], "moa / base (batch 16)": best["moa"] / best["base"],
              STUDY: best["moa"] / study_speed}
    med_ratios = {"folded / base": med["folded"] / med["base"], "moa / base (batch 16)": med["moa"] / med["base"],
                  STUDY: med["moa"] / study_speed}
    targets = {"folded / base": 0.97, "moa / base (batch 16)": 0.8, STUDY: 5.0}
    mix = {t: moa_routed.count(t) for t in TASKS} if moa_routed else {}
    total_s = time.perf_counter() - t_bench
    lines = [
        "## Evaluation", "",
        "`python bench/bench_eval.py` (bench/bench_eval.py): greedy generation on SmolLM2-135M-Instruct "
        "(the embedded GGUF, dequantised to float32, CPU) with prompts from ../shared/data (validation, the 5-task "
        f"set mixed: {BATCH} prompts, each truncated to its last {PROMPT_LEN} tokens), {NEW_TOKENS} new tokens per "
        "prompt with EOS suppressed until then (equal work for every method). Adapters: 5 random-init LoRAs, "
        "rank 8, alpha 16, B ~ N(0, 0.02), on q/k/v/gate/up/down of all 30 layers; the merged adapter is their "
        "`concat` merge folded into the weights; MoA has random routers, so its batches mix experts "
        f"(routing of the {BATCH} prompts: {', '.join(f'{t} {n}' for t, n in mix.items())}). "
        f"Measurements 1 and 2: {args.rounds} alternating rounds after a warm-up; the table gives each "
        "method's best round (least disturbed by other processes), the median ratio follows in brackets. "
        f"Measurement 3: batch 1 on {STUDY_PROMPTS} of the prompts, one pass.", "",
        f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; bench wall time {total_s:.0f} s "
        f"(model load {load_s:.0f} s).", "",
        "| measurement | tokens/s | vs | tokens/s | ratio (median) | target |",
        "|---|---|---|---|---|---|",
        f"| 1. merged adapter folded into W, batch {BATCH} | {best['folded']:.1f} | base model, batch {BATCH} | "
        f"{best['base']:.1f} | {ratios['folded / base']:.3f}x ({med_ratios['folded / base']:.3f}x) | >= 0.97x |",
        f"| 2. MoA (routed once per sequence), batch {BATCH} | {best['moa']:.1f} | base model, batch {BATCH} | "
        f"{best['base']:.1f} | {ratios['moa / base (batch 16)']:.3f}x ({med_ratios['moa / base (batch 16)']:.3f}x) "
        "| >= 0.8x |",
        f"| 3. MoA batched, batch {BATCH} | {best['moa']:.1f} | the study's way: batch 1, routers re-decide "
        f"every step | {study_speed:.1f} | {ratios[STUDY]:.2f}x ({med_ratios[STUDY]:.2f}x) | >= 5x |",
        "",
        f"4. Whole 5-task evaluation matrix (`full_evaluation.py --tasks 5tasks --methods moa,concat,weight_sum,svd`, "
        f"so 6 methods with base and oracle: {n_cells} cells; {MATRIX['eval_size']} examples per task, prompts up to "
        f"400 tokens, at most {MATRIX['max_new_tokens']} new tokens, batch {MATRIX['batch_size']}, the three merges "
        f"built on the way): **{matrix_s:.0f} s** wall time including the model load; "
        f"{cell_s:.0f} s of it generating and scoring.", "",
    ]
    text = "\n".join(lines)
    print(text)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}x (target >= {targets[k]}x) {'OK' if v >= targets[k] else 'BELOW TARGET'}")
    if not args.no_write:
        print(f"wrote {write_section(text)}")


if __name__ == "__main__":
    main()
