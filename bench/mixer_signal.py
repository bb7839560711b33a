"""What the LM loss tells LoRA-Mixer's routers: does its gradient point to each task's own expert?

Usage:
    python bench/mixer_signal.py RUN [--tasks sentiment,nli,paraphrasing] [--routers DIR] [--batches 8]

On real training examples of the tasks (SmolLM2-135M-Instruct, the experts of RUN/adapters, every
covered module routed, soft gates as in training), for each batch of 4 it takes the gradient of
the routers under the target-only LM loss (what plug-and-play training follows, label-free) and
under the per-token task-label cross-entropy (the direction that makes routing task-aware), and
reports per routed module the cosine between the two descent directions, their norms, and the
share of modules where they agree (cosine > 0). Prompt and target tokens are measured apart: the
LM loss sits on the target tokens only, so on prompt tokens its gradient reaches the routers only
through attention. With --routers DIR, the routers of a trained RUN/compose/lora_mixer* start
instead of zero. Prints a table; nothing is written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src import mixer as mx  # noqa: E402
from src import runs  # noqa: E402
from src import tasks as T  # noqa: E402
from src.lora import load_adapter  # noqa: E402
from src.models import load_base_model  # noqa: E402
from src.training import IGNORE, collate, encode_examples, target_only_loss  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def router_grads(mixer, model, batch, where: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(LM-loss gradients, label-CE gradients) of every router; label CE on `where` tokens."""
    for w in mixer.routers:
        w.grad = None
    mixer.soft, mixer.collect = True, []
    lm = target_only_loss(model, batch) / max(batch["n_tokens"], 1)
    logits = mixer.collect
    mixer.collect = None
    g_lm = torch.autograd.grad(lm, list(mixer.routers), retain_graph=True)
    labels = batch["labels"]
    target = torch.zeros_like(labels, dtype=torch.bool)
    target[:, :-1] = labels[:, 1:] != IGNORE          # positions that predict a target token
    mask = batch["attention_mask"].bool() & (target if where == "target" else ~target)
    ce = torch.stack([mx.label_loss(z, mask, batch["task_ids"]) for z in logits]).mean()
    g_ce = torch.autograd.grad(ce, list(mixer.routers))
    return g_lm, g_ce


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--tasks", default="sentiment,nli,paraphrasing")
    p.add_argument("--routers", type=Path, default=None)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    model, tok = load_base_model("smollm2-135m", "cpu", "float32")
    adapters = {t: load_adapter(runs.adapter_dir(args.run, t)) for t in tasks}
    modules = mx.choose_modules(list(adapters[tasks[0]].factors), "all")
    mixer = mx.LoRAMixer(model, adapters, modules, len(tasks), tasks)
    if args.routers is not None:
        mixer.remove()
        mixer = mx.LoRAMixer.load(model, args.routers, adapters, len(tasks))
        mixer.routers.requires_grad_(True)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    mixer.routers.requires_grad_(True)
    examples = T.load_task_data(tasks, "train", "dir", DATA, size=2 * args.batches, seed=1)
    items = [it for i, t in enumerate(tasks) for it in encode_examples(tok, examples[t], 320, 96, label=i)]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [collate([items[j] for j in order[i:i + 4]], tok.pad_token_id) for i in range(0, 4 * args.batches, 4)]
    model.eval()
    with torch.no_grad():   # the target loss each routing gives: what the LM loss has to gain from task routing
        got = {}
        for name, soft, hard in (("these routers, soft gates", True, False),
                                 ("these routers, top-1 gates", False, False),
                                 ("each sequence on its own expert (labels)", False, True)):
            mixer.soft, total, count = soft, 0.0, 0
            saved_k, mixer.top_k = mixer.top_k, 1
            for batch in batches:
                mixer.hard_labels = batch["task_ids"] if hard else None
                total += float(target_only_loss(model, batch))
                count += batch["n_tokens"]
            mixer.hard_labels, mixer.top_k = None, saved_k
            got[name] = total / count
        print("target-token loss (nats/token): " + "; ".join(f"{k} {v:.3f}" for k, v in got.items()))
    model.train()
    for where in ("target", "prompt"):
        cos = [[] for _ in modules]
        n_lm, n_ce = [], []
        for batch in batches:
            g_lm, g_ce = router_grads(mixer, model, batch, where)
            for i, (a, b) in enumerate(zip(g_lm, g_ce)):
                cos[i].append(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)))
            n_lm.append(float(torch.stack([a.norm() for a in g_lm]).norm()))
            n_ce.append(float(torch.stack([b.norm() for b in g_ce]).norm()))
        per_module = [statistics.mean(c) for c in cos]
        by_type: dict[str, list[float]] = {}
        for m, c in zip(modules, per_module):
            by_type.setdefault(m.rsplit(".", 1)[-1], []).append(c)
        print(f"label CE on {where} tokens: cosine(LM descent, label descent) per module: mean "
              f"{statistics.mean(per_module):+.3f}, median {statistics.median(per_module):+.3f}, "
              f"share > 0: {sum(c > 0 for c in per_module) / len(per_module):.2f}; per batch, all modules "
              f"together: |grad LM| {statistics.mean(n_lm):.3g}, |grad label CE| {statistics.mean(n_ce):.3g}")
        print("  by module type: " + ", ".join(f"{k} {statistics.mean(v):+.3f}" for k, v in by_type.items()))
        depth = [statistics.mean(c for m, c in zip(modules, per_module) if f".layers.{i}." in m)
                 for i in range(len({m.split('.layers.')[1].split('.')[0] for m in modules}))]
        print("  by layer: " + " ".join(f"{c:+.2f}" for c in depth))


if __name__ == "__main__":
    main()
