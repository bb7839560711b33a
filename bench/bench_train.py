"""Training speed: our loop against transformers' Trainer + peft, side by side in one run.

Usage:
    python bench/bench_train.py                       # SmolLM2-135M, 7 tasks x 8 examples, ~10 min, 1 thread
    python bench/bench_train.py --per-task 4 --no-write

Both sides train the same LoRA (r 8, alpha 16, q/k/v/gate/up/down, no dropout) on the same
base weights and the same examples for one epoch: AdamW, the same lr with linear decay, batch
2, gradient clipping at 1.0, target-only loss. The baseline is the usual recipe:
`peft.get_peft_model` + `Trainer` with `DataCollatorForSeq2Seq` (dynamic padding to each random
batch's longest sequence, full-vocabulary logits at every position). Ours: length-grouped
batches, the LM head at target positions only (src/training.py).

Reported: examples/s of each (training only, model loading excluded; per process CPU second,
which on a shared machine leaves out the other jobs' share, and per wall second), the ratio,
the final training loss of both adapters on the same examples (one more pass, no gradients),
and our achieved FLOP/s as a fraction of this machine's float32 matmul peak, measured in the
same run with the same threads. Results go to the "Training" section of bench/RESULTS.md
(other sections are kept).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from src.config import TrainConfig  # noqa: E402
from src.lora import DEFAULT_TARGETS, LoraConfig, add_lora  # noqa: E402
from src.models import load_base_model  # noqa: E402
from src.tasks import TASKS, load_examples  # noqa: E402
from src.training import IGNORE, collate, encode_examples, fit, target_only_loss  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "RESULTS.md"


def matmul_peak(n: int = 2048, seconds: float = 6.0) -> float:
    """Best float32 FLOP/s of an n x n matmul over a few seconds (these threads; per CPU second)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.process_time()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / max(time.process_time() - t, 1e-9))
    return best


class Clock:
    """Wall and process CPU seconds of a block (CPU time leaves out other jobs on a shared machine)."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def training_flops(model, items) -> float:
    """FLOPs of one LoRA training pass over `items` with a frozen base.

    Forward: 2 * (non-embedding linear params) per token + causal attention 2 * layers * T^2 * d
    per sequence + the LM head 2 * d * vocab at each target position. Backward: the gradient
    w.r.t. activations costs the forward again; frozen weights get no weight gradient (the LoRA
    factors' own are negligible). So the total is 2 x forward.
    """
    cfg = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    head = cfg.hidden_size * cfg.vocab_size
    fwd = 0.0
    for it in items:
        t, targets = len(it["input_ids"]), sum(1 for x in it["labels"] if x != IGNORE)
        fwd += 2 * linear * t + 2 * cfg.num_hidden_layers * t * t * cfg.hidden_size + 2 * head * targets
    return 2 * fwd


@torch.no_grad()
def mean_target_loss(model, items, pad_id: int, batch: int = 4) -> float:
    """Mean cross-entropy per target token over `items` (right padding, the same for both sides)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch):
        b = collate(items[i:i + batch], pad_id)
        total += float(target_only_loss(model, b))
        count += b["n_tokens"]
    return total / count


def run_baseline(model, tokenizer, items, args) -> tuple[Clock, object]:
    """peft.get_peft_model + Trainer + DataCollatorForSeq2Seq; returns (training clock, peft model)."""
    import datasets
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(DEFAULT_TARGETS),
        task_type="CAUSAL_LM"))
    tokenizer.padding_side = "right"  # the usual choice for training; ours pads right too
    ds = datasets.Dataset.from_list([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])
    out = tempfile.mkdtemp(prefix="bench-trainer-")
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, learning_rate=args.lr,
                              num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                              max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                              report_to=[], use_cpu=True, seed=args.seed, dataloader_num_workers=0,
                              disable_tqdm=True)
    trainer = Trainer(model=peft_model, args=targs, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE))
    with Clock() as clock:
        trainer.train()
    tokenizer.padding_side = "left"
    return clock, peft_model


def run_ours(model, tokenizer, items, args) -> tuple[Clock, object]:
    torch.manual_seed(args.seed)
    add_lora(model, LoraConfig(rank=args.rank, alpha=args.alpha))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(batch_size=args.batch, lr=args.lr, epochs=1.0, eval_every=0, patience=0, save_every=0,
                      log_every=1, progress=False, max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        with Clock() as clock:
            result = fit(model, params, items, [], cfg=cfg, seed=args.seed, name="bench",
                         pad_id=tokenizer.pad_token_id, state_dir=Path(tmp) / "state", log_path=Path(tmp) / "log.jsonl")
    with torch.no_grad():
        for k, v in result.params.items():
            params[k].copy_(v)
    return clock, model


def write_section(text: str) -> None:
    """Replace (or append) the '## Training' section of bench/RESULTS.md; other sections stay."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Training\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, RESULTS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--per-task", type=int, default=8, help="training examples per task (7 tasks)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-target-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared CPU, per-process CPU time then measures the work "
                        "without the other jobs' share)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()[0]
    peak = matmul_peak()
    print(f"matmul peak (float32, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s", flush=True)

    base, tokenizer = load_base_model(args.model, device="cpu", dtype="float32")
    examples = [ex for task in TASKS for ex in load_examples(task, "train", "dir", DATA, args.per_task, args.seed)]
    random.Random(args.seed).shuffle(examples)
    items = encode_examples(tokenizer, examples, args.max_len, args.max_target_len)
    n_tok = sum(len(it["input_ids"]) for it in items)
    n_tgt = sum(sum(1 for x in it["labels"] if x != IGNORE) for it in items)
    print(f"{len(items)} examples ({len(TASKS)} tasks), {n_tok} tokens, {n_tgt} target tokens", flush=True)
    pad = tokenizer.pad_token_id
    loss_before = mean_target_loss(base, items, pad)

    c_base, peft_model = run_baseline(copy.deepcopy(base), tokenizer, items, args)
    loss_base = mean_target_loss(peft_model.get_base_model(), items, pad)  # LoRA layers injected in place
    del peft_model
    n = len(items)
    print(f"baseline: {c_base.cpu:.1f} CPU s ({c_base.wall:.1f} s wall), {n / c_base.cpu:.3f} examples per CPU s, "
          f"final loss {loss_base:.4f}", flush=True)

    c_ours, ours = run_ours(base, tokenizer, items, args)
    loss_ours = mean_target_loss(ours, items, pad)
    print(f"ours:     {c_ours.cpu:.1f} CPU s ({c_ours.wall:.1f} s wall), {n / c_ours.cpu:.3f} examples per CPU s, "
          f"final loss {loss_ours:.4f}", flush=True)

    flops = training_flops(ours, items)
    achieved = flops / c_ours.cpu
    speedup, speedup_wall = c_base.cpu / c_ours.cpu, c_base.wall / c_ours.wall
    loss_gap = (loss_ours - loss_base) / loss_base
    load_end = os.getloadavg()[0]
    print(f"speed-up {speedup:.2f}x (CPU time), {speedup_wall:.2f}x (wall); final loss ours vs baseline "
          f"{100 * loss_gap:+.2f}%; achieved {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.1f}% of the "
          f"matmul peak")

    import peft
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    shared = max(load_start, load_end) > 1.5
    text = f"""## Training

`python bench/bench_train.py` (one run, both sides in the same process, one after the other,
{args.threads} torch thread{'s' if args.threads > 1 else ''}).

| | transformers Trainer + peft | ours (src/training.py) |
|---|---|---|
| training, process CPU time | {c_base.cpu:.1f} s | {c_ours.cpu:.1f} s |
| training, wall time | {c_base.wall:.1f} s | {c_ours.wall:.1f} s |
| examples/s (per CPU second) | {n / c_base.cpu:.3f} | {n / c_ours.cpu:.3f} |
| examples/s (wall) | {n / c_base.wall:.3f} | {n / c_ours.wall:.3f} |
| final training loss (mean per target token, all {n} examples) | {loss_base:.4f} | {loss_ours:.4f} |

- **Speed-up: {speedup:.2f}x** examples per CPU second ({speedup_wall:.2f}x in wall time; target: at
  least 1.5x). Final loss of ours vs the baseline after the same {-(-n // args.batch)} steps:
  **{100 * loss_gap:+.2f}%** (target: within 2%); the base model's loss on the same examples before
  training: {loss_before:.4f}.
- Achieved: {achieved / 1e9:.1f} GFLOP/s per CPU second = **{100 * achieved / peak:.1f}% of the measured
  float32 matmul peak** ({peak / 1e9:.1f} GFLOP/s: best 2048x2048 `torch.mm`, same run, same threads).
  FLOPs counted as 2 x forward (frozen base: the backward computes activation gradients only);
  forward = 2 x non-embedding linear parameters per token + causal attention + the LM head at
  target positions only (what our loop computes).
- Setting: model {args.model} (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32), CPU.
  {n} training examples, {args.per_task} from each of the {len(TASKS)} tasks of ../shared/data (seeded,
  shuffled), {n_tok} tokens ({n_tgt} target); max length {args.max_len}, max target {args.max_target_len};
  LoRA r {args.rank}, alpha {args.alpha:g}, q/k/v/gate/up/down, dropout 0; AdamW lr {args.lr:g}, linear
  decay, batch {args.batch}, gradient clipping 1.0, one epoch.
- Machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__},
  transformers {transformers.__version__}, peft {peft.__version__}. Load average {load_start:.1f} at the start,
  {load_end:.1f} at the end{": the CPU was shared with other jobs, so wall times are noisy; per-process CPU time (one thread) is the figure that compares" if shared else ""}.
"""
    if not args.no_write:
        write_section(text)
        print(f"wrote the Training section of {RESULTS}")


if __name__ == "__main__":
    main()
