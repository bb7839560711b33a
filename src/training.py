"""The reusable training pieces: data, batches, the target-only loss, and one loop.

    items   = encode_examples(tokenizer, examples, max_len, max_target_len)   # token ids + labels
    batches = global_batches(lengths, global_batch, seed, epoch)            # grouped by length
    batch   = collate(items, pad_id)                                          # dynamic padding
    loss    = target_only_loss(model, batch)                                  # LM head at targets only
    result  = fit(model, params, train_items, val_items, objective, cfg, ...) # the loop (_Trainer)

Why it is fast:
- The loss counts target tokens only, and the LM head runs only at the positions that
  predict one: the backbone's hidden states are gathered at those positions before the
  `[hidden, vocab]` projection (for SmolLM2 the vocabulary is 49k, so full logits of a
  512-token prompt cost more than several transformer blocks, and their fp32 softmax more
  memory than the rest of the step).
- Batches are grouped by length (shuffled, then sorted within mega-batches) and padded to
  their own longest sequence, never to a fixed 512.
- The frozen base has `requires_grad=False`: no weight gradients, no optimizer state.
- bf16 autocast on CUDA; gradient accumulation; data parallelism over torch.distributed.

Exactness: one optimizer step minimises sum_k w_k * (sum of term k over the GLOBAL batch) /
(count of term k over the global batch), whatever the split into micro-batches and
processes; so `--grad-accum` and several processes give the single-process step (up to
float summation order). Checkpoints hold trainable tensors, optimizer, scheduler, RNG
states and the data position, so a resumed run ends where an uninterrupted one does; they
are a safetensors file and a JSON file (no pickle), written atomically.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from src.errors import UserError
from src.runs import atomic_path, write_text_atomic
from src.tasks import TASKS, Example, pad_sequences, tokenize_example

IGNORE = -100
STATE_FILE = "state.json"          # a checkpoint's commit file; its tensors are in a .safetensors beside it
LEGACY_STATE_FILE = "state.pt"     # checkpoints of earlier versions (torch.save), still read
CHECKPOINT_FORMAT = 1


# ------------------------------------------------------------------------------ data

def load_data(cfg, tasks: Sequence[str], split: str) -> dict[str, list[Example]]:
    """Each task's `split` per a DataConfig: a seeded subset of train_size / eval_size examples,
    capped at what local files hold (`tasks.load_capped`).

    The validation examples chose checkpoints and routers, and evaluation leaves them out; so
    where --eval-size would take every validation example of a local file (the bundled sample
    holds 16 a task, the default asks 200), training takes half of them and leaves the other
    half to evaluate, with a note.
    """
    import sys

    from src.tasks import load_capped, load_examples

    size = cfg.train_size if split == "train" else cfg.eval_size
    if split != "train" and cfg.data != "hub":
        out = {}
        for task in tasks:
            available = len(load_examples(task, split, cfg.data, cfg.data_dir, None, cfg.seed))
            n = size
            if available > 1 and (size is None or size >= available):
                n = available // 2
                print(f"note: {cfg.data_dir or 'data/sample'} holds {available} {split} examples of task {task}; "
                      f"model selection takes {n} (--eval-size {size}) and leaves {available - n} to evaluate",
                      file=sys.stderr)
            out.update(load_capped([task], split, cfg.data, cfg.data_dir, n, cfg.seed, flag="--eval-size"))
        return out
    return load_capped(list(tasks), split, cfg.data, cfg.data_dir, size, cfg.seed,
                       flag="--train-size" if split == "train" else "--eval-size")


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int = 512, max_target_len: int = 128,
                    label: int | None = None) -> list[dict]:
    """Each example as {"input_ids", "labels", "prompt_len"} (+ "task_id" when `label` is given).

    `labels` is -100 on the prompt, the target ids (ending in EOS) after it.
    """
    items = []
    for ex in examples:
        enc = tokenize_example(tokenizer, TASKS[ex.task].prompt(ex), ex.target, max_len, max_target_len)
        item = {"input_ids": enc["input_ids"], "labels": enc["labels"],
                "prompt_len": sum(1 for t in enc["labels"] if t == IGNORE)}
        if label is not None:
            item["task_id"] = label
        items.append(item)
    return items


def global_batches(lengths: Sequence[int], batch: int, seed: int, epoch: int, mega: int = 32) -> list[list[int]]:
    """One epoch's batches of `batch` indices, grouped by length, in a seeded random order.

    Shuffle (seed, epoch), cut into mega-batches of `mega * batch`, sort each by length
    (longest first), cut into batches, shuffle the batch order. Sequences in a batch have
    similar lengths, so little padding; the order still changes every epoch. The last
    batch may be smaller.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    span = mega * batch
    out = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])
        out.extend(chunk[i:i + batch] for i in range(0, len(chunk), batch))
    perm = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in perm]


def split_batch(indices: list[int], micro: int, n_micro: int, rank: int, world: int) -> list[list[int]]:
    """A global batch -> this process's `n_micro` micro-batches (each `micro` long or shorter).

    Micro-batch j of the step is `indices[j*micro*world:(j+1)*micro*world]`; process r takes
    its r-th slice. A single process with batch `micro*world` sees the same sequences.
    """
    out = []
    for j in range(n_micro):
        chunk = indices[j * micro * world:(j + 1) * micro * world]
        out.append(chunk[rank * micro:(rank + 1) * micro])
    return out


def collate(items: Sequence[dict], pad_id: int, side: str = "right") -> dict:
    """Pad to the longest sequence in the batch (`pad_sequences`).

    Right padding (training): real tokens keep positions 0..n-1. Left padding (routing on
    prompts): every prompt ends at position -1. Returns input_ids, attention_mask, labels
    [batch, seq]; n_tokens (target tokens), n_seqs; positions [batch] (each sequence's last
    prompt token); task_ids [batch] if the items carry them.
    """
    ids, mask = pad_sequences([it["input_ids"] for it in items], pad_id, side)
    labels, _ = pad_sequences([it["labels"] for it in items], IGNORE, side)
    n = ids.shape[1]
    positions = torch.tensor([it["prompt_len"] - 1 if side == "right"
                              else n - 1 for it in items], dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "positions": positions,
           "n_tokens": int((labels != IGNORE).sum()), "n_seqs": len(items)}
    if "task_id" in items[0]:
        out["task_ids"] = torch.tensor([it["task_id"] for it in items], dtype=torch.long)
    return out


def prompt_items(items: Sequence[dict]) -> list[dict]:
    """The prompt part of each item (for router-only training: the router reads the prompt)."""
    return [{**it, "input_ids": it["input_ids"][:it["prompt_len"]], "labels": [IGNORE] * it["prompt_len"]}
            for it in items]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------ loss

def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (`model.model` for Llama/Qwen2 and most causal LMs)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if inner is None or inner is model:
        raise UserError(f"{type(model).__name__}: cannot find the backbone under the LM head")
    return inner


def backbone_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """The backbone's last hidden states [batch, seq, hidden], through the model's own forward.

    The outer model runs with `logits_to_keep=1` (the LM head sees one position per
    sequence) and a hook catches the backbone's output: wrappers that hook the outer
    forward (the Mixture-of-LoRAs session) see an ordinary call.
    """
    inner = backbone(model)
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        out = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    caught = []
    hook = inner.register_forward_hook(
        lambda mod, args, out: caught.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[-1]


def target_hidden(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states at the positions that predict a target token [n, hidden], their targets [n])."""
    hidden = backbone_forward(model, batch)  # [batch, seq, hidden]
    labels = batch["labels"]
    # position t predicts token t+1: select t where labels[t+1] is a target
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != IGNORE
    return hidden[select], labels[:, 1:][labels[:, 1:] != IGNORE]


def lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on gathered hidden states, in float32 (with Gemma-style soft-capping)."""
    logits = model.get_output_embeddings()(hidden).float()  # [n, vocab]
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_only_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's target tokens; the LM head sees only those."""
    hidden, targets = target_hidden(model, batch)
    return F.cross_entropy(lm_head_logits(model, hidden), targets, reduction="sum")


@dataclass
class Objective:
    """What one optimizer step minimises: sum_k weight_k * sum_k / count_k over the global batch.

    fn(model, batch) -> {term: sum over the micro-batch (a scalar tensor)}; terms maps each
    term to (weight, the batch key that counts its units: "n_tokens" or "n_seqs").
    """

    fn: Callable[[nn.Module, dict], dict[str, torch.Tensor]]
    terms: dict[str, tuple[float, str]] = field(default_factory=lambda: {"lm": (1.0, "n_tokens")})


LM_OBJECTIVE = Objective(lambda model, batch: {"lm": target_only_loss(model, batch)})


# ----------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the job that torchrun / accelerate launch started (WORLD_SIZE > 1), else Dist().

    Backend nccl on CUDA, gloo on CPU; each process takes GPU LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


def process_device(d: Dist, device: str) -> str:
    """The --device a process of a distributed job uses: its own GPU under torchrun."""
    if d.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return device


def _all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def finish_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# -------------------------------------------------------------------------- schedule

def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak lr, then linear decay to 0 at `total` (as transformers' default)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup else 1.0
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def planned_steps(n_examples: int, global_batch: int, epochs: float, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total steps): epochs * ceil(n / global batch), capped by max_steps."""
    per_epoch = max(1, math.ceil(n_examples / global_batch))
    total = max(1, math.ceil(epochs * per_epoch))
    return per_epoch, min(total, max_steps) if max_steps else total


# ------------------------------------------------------------------------ checkpoints
# A checkpoint is two files in its folder: the tensors in `state-<id>.safetensors` and
# everything else (numbers, strings, the nesting) in `state.json`, which names the tensors
# file. Both are written to a temporary file and renamed, the tensors first: `state.json`
# is the commit, so a kill at any moment leaves the previous checkpoint or the new one,
# whole. No pickle is written or read (LEGACY_STATE_FILE, from older versions, is still
# read with torch.load(weights_only=True), which unpickles tensors and plain values only).

# JSON has no tensors, tuples or non-string keys: they become one-key objects with these tags.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)
_PLAIN = (bool, int, float, str, type(None))


def _join(path: str, key) -> str:
    return f"{path}/{key}" if path else str(key)


def _flatten(value, path: str, tensors: dict[str, torch.Tensor]):
    """`value` as JSON; its tensors go into `tensors` under their path ("optimizer/state/0/exp_avg").

    Dicts keep their keys when all are strings (else a list of [key, value] pairs); tuples
    stay tuples; anything but tensors, dicts, lists, tuples and plain values is a TypeError.
    """
    if torch.is_tensor(value):
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[key] = value
        return {_TENSOR: key}
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, _join(path, i), tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(type(k) is str and k not in _TAGS for k in value):
            return {k: _flatten(v, _join(path, k), tensors) for k, v in value.items()}
        return {_ITEMS: [[_flatten(k, _join(path, f"key{i}"), tensors), _flatten(v, _join(path, k), tensors)]
                         for i, (k, v) in enumerate(value.items())]}
    raise TypeError(f"checkpoint value {path or '/'}: a {type(value).__name__} is neither a tensor "
                    f"nor a plain value (dict, list, tuple, number, string, None)")


def _unflatten(value, tensors: dict[str, torch.Tensor]):
    """The inverse of `_flatten`: JSON plus the tensors file -> the state that was saved."""
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        (tag, inner), = value.items()
        if tag == _TENSOR:
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_unflatten(v, tensors) for v in inner)
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in inner}
    return {k: _unflatten(v, tensors) for k, v in value.items()}


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses that)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write `state` (tensors and plain values, nested) as a checkpoint in `folder`, atomically.

    The tensors file first, then `state.json` naming it (the commit); then the files of the
    previous checkpoint go. A value that is neither a tensor nor plain is a TypeError, raised
    before anything is written.
    """
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": CHECKPOINT_FORMAT, "tensors": f"state-{uuid.uuid4().hex[:12]}.safetensors",
           "state": _flatten(state, "", tensors)}
    text = json.dumps(doc, indent=1) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / doc["tensors"]) as tmp:
        save_file(_cpu_tensors(tensors), tmp, metadata={"format": "pt"})
    write_text_atomic(folder / STATE_FILE, text)
    for old in [*folder.glob("state-*.safetensors"), folder / LEGACY_STATE_FILE]:
        if old.name != doc["tensors"]:
            old.unlink(missing_ok=True)


def checkpoint_file(folder: Path) -> Path | None:
    """The file that marks a checkpoint in `folder` (`state.json`, else a legacy `state.pt`)."""
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def load_checkpoint(folder: Path) -> dict | None:
    """The checkpoint in `folder`, or None when there is none.

    `state.json` and the tensors file it names; without them a legacy `state.pt`, loaded with
    torch.load(weights_only=True) (tensors and plain values only, no pickled code). A
    truncated, corrupt or incomplete checkpoint, or a legacy one that needs unpickling, is a
    UserError.
    """
    path = checkpoint_file(folder)
    if path is None:
        return None
    try:
        if path.name == LEGACY_STATE_FILE:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError("the state is not a mapping")
            return state
        doc = json.loads(path.read_text())
        if doc.get("format") != CHECKPOINT_FORMAT or Path(doc["tensors"]).name != doc["tensors"]:
            raise ValueError("not a checkpoint of this format")
        state = _unflatten(doc["state"], load_file(str(folder / doc["tensors"])))
        if not isinstance(state, dict):
            raise ValueError("the state is not a mapping")
        return state
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file is a user-facing condition
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}); delete it or use --force") from None


def remove_checkpoints(state_dir: Path, d: Dist = Dist()) -> None:
    """Delete a stage's checkpoint folder (rank 0)."""
    if d.main and state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)


def rng_state() -> dict:
    """torch's, python's and (on CUDA) every GPU's RNG state: tensors and python's tuple of ints."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the message names the task and the step."""


# ------------------------------------------------------------------------------ loop

@dataclass
class FitResult:
    steps: int
    best_val_loss: float | None
    best_step: int | None
    stopped_early: bool
    final_train_loss: float | None
    tokens: int
    elapsed_s: float
    params: dict[str, torch.Tensor]  # the chosen (best-validation, else last) trainable tensors


def evaluate_loss(model: nn.Module, items: Sequence[dict], objective: Objective, pad_id: int, device,
                  batch_size: int, d: Dist = Dist(), amp: bool = False, side: str = "right") -> float:
    """The objective on `items` (sharded across processes), with gradients off."""
    if not items:
        return float("nan")
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))[d.rank::d.world]
    sums = {k: 0.0 for k in objective.terms}
    counts = {k: 0 for k in objective.terms}
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(device, amp):
        for start in range(0, len(order), batch_size):
            batch = to_device(collate([items[i] for i in order[start:start + batch_size]], pad_id, side), device)
            for k, v in objective.fn(model, batch).items():
                sums[k] += float(v)
                counts[k] += batch[objective.terms[k][1]]
    model.train(was_training)
    flat = _all_reduce(torch.tensor([x for k in objective.terms for x in (sums[k], counts[k])],
                                    dtype=torch.float64), d).tolist()
    return sum(w * flat[2 * i] / max(flat[2 * i + 1], 1) for i, (w, _) in enumerate(objective.terms.values()))


def _autocast(device, amp: bool):
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def fit(model: nn.Module, params: dict[str, nn.Parameter], train: Sequence[dict], val: Sequence[dict], *,
        cfg, seed: int, name: str, pad_id: int, state_dir: Path, log_path: Path,
        objective: Objective = LM_OBJECTIVE, d: Dist = Dist(), amp: bool = False, side: str = "right",
        fingerprint: dict | None = None, on_step: Callable[[int], None] | None = None,
        group_lr: dict[str, float] | None = None) -> FitResult:
    """Train `params` (the only tensors that get gradients) on `train`; see the module docstring.

    group_lr: {name prefix: learning rate} for the params whose name starts with the prefix
    (e.g. a mixture's experts beside its routers); the others take cfg.lr. The schedule scales
    every group alike.

    cfg: a TrainConfig (epochs, max_steps, batch_size, grad_accum, lr, weight_decay,
    warmup_steps, max_grad_norm, eval_every, patience, save_every, log_every, resume, progress).
    state_dir: where resumable checkpoints go (`state.json` + tensors); log_path: the JSONL log (only
    rank 0 writes either). With cfg.resume and a checkpoint in state_dir, training
    continues from it; `fingerprint` (e.g. the resolved config) must then match the saved one.
    on_step(step) runs after every optimizer step (and its checkpoint): for progress hooks,
    benchmarks, and tests that interrupt a run.
    Raises TrainingDiverged on a NaN/inf loss, before the step is applied.
    """
    trainer = _Trainer(model, params, train, val, cfg=cfg, seed=seed, name=name, pad_id=pad_id,
                       state_dir=state_dir, log_path=log_path, objective=objective, d=d, amp=amp, side=side,
                       fingerprint=fingerprint, on_step=on_step, group_lr=group_lr)
    trainer.setup()
    return trainer.train()


def fit_or_exit(model: nn.Module, params: dict[str, nn.Parameter], train: Sequence[dict], val: Sequence[dict],
                **kw) -> FitResult:
    """`fit`, then its chosen (best-validation, else last) tensors copied into `params`. A diverged
    run prints one error line and exits with code 1, its last good checkpoint kept for a --resume."""
    try:
        return fit_best(model, params, train, val, **kw)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def fit_best(model: nn.Module, params: dict[str, nn.Parameter], train: Sequence[dict], val: Sequence[dict],
             **kw) -> FitResult:
    """`fit`, then its chosen (best-validation, else last) tensors copied into `params`."""
    result = fit(model, params, train, val, **kw)
    with torch.no_grad():
        for k, v in result.params.items():
            params[k].copy_(v)
    return result


@dataclass
class _Progress:
    """Where a run stands: what a checkpoint saves beside the tensors, optimizer, scheduler and RNG."""

    step: int = 0                      # optimizer steps taken
    best_val: float | None = None      # the lowest validation loss so far
    best_step: int | None = None       # ... and its step
    bad_evals: int = 0                 # validations since the best one (for patience)
    tokens: int = 0                    # real (unpadded) tokens trained on, all processes together
    elapsed_s: float = 0.0             # training time of the processes before this one (resumed runs)
    best_params: dict[str, torch.Tensor] | None = None  # CPU copies of `params` at best_step


class _Trainer:
    """fit in parts, in the shape of a torchtune recipe: `setup` (optimizer, schedule, restore
    from a checkpoint), `optimizer_step`, `validate`, `checkpoint`, and `train`, the loop that
    calls them. Only rank 0 writes the log and checkpoints; every process runs the rest.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], train: Sequence[dict],
                 val: Sequence[dict], *, cfg, seed: int, name: str, pad_id: int, state_dir: Path, log_path: Path,
                 objective: Objective, d: Dist, amp: bool, side: str, fingerprint: dict | None,
                 on_step: Callable[[int], None] | None, group_lr: dict[str, float] | None = None):
        self.model, self.params, self.train_items, self.val_items = model, params, train, val
        self.cfg, self.seed, self.name, self.pad_id = cfg, seed, name, pad_id
        self.state_dir, self.log_path, self.fingerprint, self.on_step = state_dir, log_path, fingerprint, on_step
        self.objective, self.d, self.amp, self.side = objective, d, amp, side
        self.group_lr = dict(group_lr or {})
        self.device = next(iter(params.values())).device
        self.global_batch = cfg.batch_size * cfg.grad_accum * d.world
        self.per_epoch, self.total = planned_steps(len(train), self.global_batch, cfg.epochs, cfg.max_steps)
        self.lengths = [len(it["input_ids"]) for it in train]
        self.progress = _Progress()
        self.last_eval: int | None = None   # the step of the latest validation
        self.last_loss: float | None = None
        self.stopped_early = False
        self.postfix = ""                   # the progress bar's text
        self.step_terms: dict[str, float] = {}  # the last step's terms, each over its own count

    # -------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Gradients for `params` only; AdamW and the linear schedule; with cfg.resume, the
        checkpoint's state (else a fresh log); the progress bar and the clocks."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = linear_schedule(self.optimizer, cfg.warmup_steps, self.total)
        # the log's window: loss, tokens and each term's unweighted value summed since the last train
        # line (a checkpoint keeps it, so the first line after a resume equals the uninterrupted run's)
        self.window_loss, self.window_tokens, self.window_t = 0.0, 0, time.perf_counter()
        self.window_terms: dict[str, float] = {}
        state = load_checkpoint(self.state_dir) if cfg.resume else None
        if state is not None:
            self._restore(state)
        elif self.d.main and self.log_path.exists():
            self.log_path.unlink()
        if self.d.main:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=self.total, initial=self.progress.step, desc=self.name, unit="step",
                        dynamic_ncols=True, disable=not (cfg.progress and self.d.main), leave=True)
        self.window_t = time.perf_counter()
        self.t0, self.start_step = time.perf_counter(), self.progress.step

    def _param_groups(self) -> list[dict]:
        """One AdamW group per learning rate: cfg.lr, and each `group_lr` prefix's own."""
        lrs = self.group_lr
        groups: dict[float, list[nn.Parameter]] = {}
        for name, p in self.params.items():
            lr = next((v for k, v in lrs.items() if name.startswith(k)), self.cfg.lr)
            groups.setdefault(lr, []).append(p)
        return [{"params": ps, "lr": lr} for lr, ps in groups.items()]

    def _restore(self, state: dict) -> None:
        """Continue from a checkpoint, which must come from the same settings (`fingerprint`)."""
        if self.fingerprint is not None and state.get("fingerprint") != self.fingerprint:
            old = state.get("fingerprint") or {}
            diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            raise UserError(f"task {self.name}: --resume with a different setting ({', '.join(diff)}) than "
                            f"the checkpoint in {self.state_dir}; use --force to restart")
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(state["params"][k])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.progress = _Progress(step=state["step"], best_val=state["best_val"], best_step=state["best_step"],
                                      bad_evals=state["bad_evals"], tokens=state["tokens"],
                                      elapsed_s=state["elapsed_s"], best_params=state["best_params"])
            offset = int(state["log_offset"])
            window = state.get("window") or {}          # absent in checkpoints of older versions
            self.window_loss, self.window_tokens = float(window.get("loss", 0.0)), int(window.get("tokens", 0))
            self.window_terms = {str(k): float(v) for k, v in (window.get("terms") or {}).items()}
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise UserError(f"task {self.name}: the checkpoint in {self.state_dir} is incomplete or damaged "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}); "
                            f"use --force to restart") from None
        if self.d.main and self.log_path.exists():  # drop log lines written after the checkpoint
            with open(self.log_path, "r+b") as f:
                f.truncate(offset)

    # --------------------------------------------------------------------- step

    def optimizer_step(self, indices: list[int]) -> tuple[float, int]:
        """One optimizer step on a global batch: (its loss, its real tokens over all processes).

        Raises TrainingDiverged on a NaN/inf loss, before the step is applied.
        """
        cfg, d, terms = self.cfg, self.d, self.objective.terms
        micro_batches = [to_device(collate([self.train_items[i] for i in idx], self.pad_id, self.side), self.device)
                         for idx in split_batch(indices, cfg.batch_size, cfg.grad_accum, d.rank, d.world) if idx]
        # global counts first: each micro-batch's loss is normalised by the whole step's
        counts = {k: sum(b[key] for b in micro_batches) for k, (_, key) in terms.items()}
        counts = dict(zip(counts, _all_reduce(torch.tensor(list(counts.values()), dtype=torch.float64),
                                              d).tolist()))
        sums = {k: 0.0 for k in terms}
        for batch in micro_batches:
            with _autocast(self.device, self.amp):
                values = self.objective.fn(self.model, batch)
            loss = sum(w * values[k] / max(counts[k], 1) for k, (w, _) in terms.items())
            loss.backward()
            for k in values:
                sums[k] += float(values[k].detach())
        real_tokens = float(sum(int(b["attention_mask"].sum()) for b in micro_batches))
        flat = _all_reduce(torch.tensor([sums[k] for k in terms] + [real_tokens], dtype=torch.float64), d).tolist()
        self.step_terms = {k: flat[i] / max(counts[k], 1) for i, k in enumerate(terms)}
        step_loss = sum(w * self.step_terms[k] for k, (w, _) in terms.items())
        if not math.isfinite(step_loss):
            self.bar.close()
            raise TrainingDiverged(
                f"task {self.name}: loss is {step_loss} at step {self.progress.step + 1}; stopped. "
                f"Last good checkpoint: {checkpoint_file(self.state_dir) or 'none'}")
        self._all_reduce_grads()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, int(flat[-1])

    def _all_reduce_grads(self) -> None:
        """Sum the gradients over processes: each share is already over the global counts, so
        the sum is the gradient of the step."""
        if self.d.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        flat = _all_reduce(torch.cat([g.reshape(-1) for g in grads]), self.d)
        for p, g in zip(self.params.values(), flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)

    def _count(self, loss: float, tokens: int) -> None:
        """Book a finished step; write a train line to the log every cfg.log_every steps and at the end."""
        pr, every = self.progress, self.cfg.log_every
        pr.step += 1
        pr.tokens += tokens
        self.last_loss = loss
        self.window_loss += loss
        self.window_tokens += tokens
        for k, v in self.step_terms.items():
            self.window_terms[k] = self.window_terms.get(k, 0.0) + v
        self.bar.update(1)
        if pr.step % every != 0 and pr.step != self.total:
            return
        now = time.perf_counter()
        n_steps = every if pr.step % every == 0 else (pr.step % every)
        tok_s = self.window_tokens / max(now - self.window_t, 1e-9)
        per_step = (now - self.t0) / max(pr.step - self.start_step, 1)
        self.postfix = f"loss {self.window_loss / n_steps:.4f} tok/s {tok_s:.0f}"
        self.bar.set_postfix_str(self.postfix)
        self.log({"step": pr.step, "epoch": round(pr.step / self.per_epoch, 4), "loss": self.window_loss / n_steps,
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tok_s,
                  "elapsed_s": self.elapsed(now), "eta_s": (self.total - pr.step) * per_step,
                  **({"terms": {k: v / n_steps for k, v in self.window_terms.items()}}
                     if len(self.objective.terms) > 1 else {})})
        self.window_loss, self.window_tokens, self.window_t, self.window_terms = 0.0, 0, now, {}

    # ----------------------------------------------------------------- validate

    def validate(self) -> bool:
        """Evaluate on `val`, keep the best tensors; True when patience is exhausted."""
        pr = self.progress
        self.last_eval = pr.step
        val_loss = evaluate_loss(self.model, self.val_items, self.objective, self.pad_id, self.device,
                                 self.cfg.batch_size * 2, self.d, self.amp, self.side)
        if pr.best_val is None or val_loss < pr.best_val:
            pr.best_val, pr.best_step, pr.bad_evals = val_loss, pr.step, 0
            pr.best_params = self._cpu_params()
        else:
            pr.bad_evals += 1
        self.log({"step": pr.step, "val_loss": val_loss, "best_val_loss": pr.best_val, "bad_evals": pr.bad_evals})
        self.bar.set_postfix_str(f"{self.postfix} val {val_loss:.4f}")
        return bool(self.cfg.patience) and pr.bad_evals >= self.cfg.patience

    # --------------------------------------------------------------- checkpoint

    def checkpoint(self) -> None:
        """Save what a resumed run needs (rank 0, with cfg.save_every); every process waits for it."""
        if self.d.main and self.cfg.save_every:
            pr = self.progress
            save_checkpoint(self.state_dir, {
                "params": self._cpu_params(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "step": pr.step, "epoch": pr.step // self.per_epoch, "batch_in_epoch": pr.step % self.per_epoch,
                "best_val": pr.best_val, "best_step": pr.best_step, "bad_evals": pr.bad_evals,
                "best_params": pr.best_params, "tokens": pr.tokens, "elapsed_s": self.elapsed(),
                "log_offset": self.log_path.stat().st_size if self.log_path.exists() else 0,
                "window": {"loss": self.window_loss, "tokens": self.window_tokens, "terms": dict(self.window_terms)},
                "fingerprint": self.fingerprint})
        barrier(self.d)

    # --------------------------------------------------------------------- loop

    def train(self) -> FitResult:
        """Steps until cfg's total or early stopping; the best-validation tensors (else the last)."""
        cfg, pr = self.cfg, self.progress
        self.model.train()
        while pr.step < self.total and not self.stopped_early:
            epoch, pos = divmod(pr.step, self.per_epoch)
            for indices in global_batches(self.lengths, self.global_batch, self.seed, epoch)[pos:]:
                if pr.step >= self.total:
                    break
                self._count(*self.optimizer_step(indices))
                if self.val_items and cfg.eval_every and pr.step % cfg.eval_every == 0 and self.validate():
                    self.stopped_early = True
                    self.log({"step": pr.step, "event": "early_stop", "best_step": pr.best_step})
                if cfg.save_every and pr.step % cfg.save_every == 0 and pr.step < self.total and not self.stopped_early:
                    self.checkpoint()
                if self.on_step is not None:
                    self.on_step(pr.step)
                if self.stopped_early:
                    break
        if self.val_items and self.last_eval != pr.step:
            self.validate()  # the end of training is a candidate too
        self.bar.close()
        chosen = pr.best_params if pr.best_params is not None else self._cpu_params()
        return FitResult(pr.step, pr.best_val, pr.best_step, self.stopped_early, self.last_loss, pr.tokens,
                         self.elapsed(), chosen)

    # ------------------------------------------------------------------ helpers

    def log(self, record: dict) -> None:
        if self.d.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"task": self.name, **record}) + "\n")

    def elapsed(self, now: float | None = None) -> float:
        """Training time in seconds, the runs before a resume included."""
        return self.progress.elapsed_s + (time.perf_counter() if now is None else now) - self.t0

    def _cpu_params(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in self.params.items()}


# ------------------------------------------------------------- Mixture-of-LoRAs routers

def moa_objective(moa, eta: float = 1.0, lm_loss: bool = False, teacher_forcing: bool = True) -> Objective:
    """L = L_LM + eta * L_cls for a MixtureOfLoRAs; teacher forcing: the gold task's LoRA is active.

    Without teacher forcing every layer runs the expert its router picks (hard top-1, as at
    inference); the routers' logits still get the cross-entropy.

    L_cls: the routers' cross-entropy against the task label, averaged over routers (the
    study), per sequence. L_LM: target-only LM loss per target token; under teacher forcing
    and hard routing it reaches only the LoRAs (train_moa.py --joint). Without L_LM the
    batches may hold the prompts alone: the routers read the last prompt token, which a
    causal model computes from the prompt only.
    """
    def fn(model, batch):
        labels = batch["task_ids"]
        with moa.session(experts=labels if teacher_forcing else None, positions=batch["positions"]):
            terms = {}
            if lm_loss:
                terms["lm"] = target_only_loss(model, batch)
            else:
                backbone_forward(model, batch)
            terms["cls"] = moa.router_loss(labels) * batch["n_seqs"]  # mean over routers, summed over sequences
        return terms
    terms = {"cls": (eta, "n_seqs")}
    if lm_loss:
        terms["lm"] = (1.0, "n_tokens")
    return Objective(fn, terms)


@torch.no_grad()
def routing_accuracy(moa, model: nn.Module, items: Sequence[dict], pad_id: int, batch_size: int = 16) -> dict:
    """How often the routers pick the item's own task, from the prompt alone (no forcing).

    Returns {"per_task": {task: accuracy}, "mean": mean over tasks, "n": {task: count},
    "per_router": mean accuracy of each router's own argmax (over all items)}.
    """
    device = moa.routers[0].weight.device
    hits, counts = [0] * len(moa.tasks), [0] * len(moa.tasks)
    router_hits, total = None, 0
    was_training = model.training
    model.eval()
    prompts = prompt_items(items)
    for start in range(0, len(prompts), batch_size):
        batch = to_device(collate(prompts[start:start + batch_size], pad_id), device)
        with moa.session(positions=batch["positions"]):
            backbone_forward(model, batch)
            chosen = moa.chosen_experts().to(device)        # [batch]
            per_router = moa.router_logits().argmax(-1)     # [n_routers, batch]
        gold = batch["task_ids"]
        for t, ok in zip(gold.tolist(), (chosen == gold).tolist()):
            counts[t] += 1
            hits[t] += int(ok)
        r = (per_router == gold.to(per_router.device)).sum(1).double().cpu()
        router_hits = r if router_hits is None else router_hits + r
        total += len(gold)
    model.train(was_training)
    per_task = {t: hits[i] / counts[i] for i, t in enumerate(moa.tasks) if counts[i]}
    return {"per_task": per_task, "mean": sum(per_task.values()) / max(len(per_task), 1),
            "n": {t: counts[i] for i, t in enumerate(moa.tasks) if counts[i]},
            "per_router": (router_hits / max(total, 1)).tolist() if router_hits is not None else []}
