"""Evaluation: generate (or score labels) for one method on one task's examples, and keep
the results as resumable cells.

    with folded(model, adapter):                       # oracle / a merge, folded into W
        cell = evaluate_task(model, tokenizer, "sentiment", examples, settings)
    cell = evaluate_task(model, tokenizer, "sentiment", examples, settings, moa=moa)

Generation is greedy, batched with left padding and the KV cache (`model.generate`),
prompts left-truncated to `max_prompt_len` tokens exactly as training encodes them
(`tasks.encode_prompt`), stopping at EOS. Batches are formed from length-sorted prompts (less
padding, fewer wasted decode steps) and the original order is restored.

Methods:
- `base`: the model with no adapter (or its adapters disabled, `lora.disable_adapters`).
- `oracle` and every merge: the adapter is folded into the base weights for the cell
  (`folded`): no LoRA layer is left in the model, so a token costs what it costs the base.
  The original weights are copied back afterwards, bit for bit.
- `moa`: a `MixtureOfLoRAs` injected into the model; each batch runs inside
  `moa.session()`, so the routers decide once per sequence from the prompt and keep the
  decision for every decoding step; a batch may mix experts. The chosen expert of every
  example is recorded (the routing confusion matrix).

`score_by="likelihood"` (classification tasks only, `Task.labels`): instead of generating,
pick the label whose tokens (+ EOS) have the highest log-likelihood after the prompt.

A cell is one (method, task): predictions, per-example scores, the task's metrics and a
fingerprint of everything it depends on (model, data, adapters, options, generation
settings). `load_cell` returns a finished cell only if its fingerprint still matches.
"""
from __future__ import annotations

import csv
import inspect
import io
import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from src import merging
from src.runs import (adapter_dir, adapter_digest, cell_lock, cell_path, eval_dir, file_digest, file_lock,  # noqa: F401
                      find_cell, git_commit, load_cell, moa_digest, moa_dir, predictions_path, run_meta, save_cell,
                      write_json_atomic, write_predictions, write_text_atomic)
from src import tasks as task_registry
from src.errors import UserError
from src.metrics import multitask_score
from src.moa import MixtureOfLoRAs
from src.lora import Adapter, apply_adapter, check_adapter_fits, load_adapter, save_adapter, unload_lora

ROOT = Path(__file__).resolve().parent.parent
FIXED_METHODS = ("base", "oracle", "moa")
SCORE_BY = ("generate", "likelihood")


# ------------------------------------------------------------------------- methods

def merge_methods() -> list[str]:
    """Every merge name: the registry's methods, then its named variants."""
    return [*merging.MERGES, *merging.VARIANTS]


def known_methods() -> list[str]:
    return [*FIXED_METHODS, *merge_methods()]


def resolve_methods(spec: str | Sequence[str]) -> list[str]:
    """Method names from "moa,concat,svd" (or a list); "merges" = every registry method,
    "all" = every method. Returned in table order: oracle, the requested methods, base;
    `oracle` and `base` are always there (the score needs the oracle, the table shows the base).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if part == "all":
            names += known_methods()
        elif part == "merges":
            names += list(merging.MERGES)
        elif part:
            if part not in known_methods():
                raise UserError(f"unknown method '{part}'; known: {', '.join(known_methods())} "
                                f"(or 'merges', 'all')")
            names.append(part)
    rest = [m for m in dict.fromkeys(names) if m not in ("oracle", "base")]
    return ["oracle", *rest, "base"]


def merge_options(method: str, options: dict) -> dict:
    """The subset of `options` (None = unset) that a merge method takes, its variant's preset
    included: --density means nothing to concat, so it is not passed to it (nor recorded
    in its fingerprint)."""
    name, resolved = merging.resolve_method(method, {})
    params = inspect.signature(merging.MERGES[name]).parameters
    takes = {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY}
    if "generator" in takes:
        takes.add("seed")
    chosen = {k: v for k, v in options.items() if v is not None and k in takes}
    return {**resolved, **chosen}


# ------------------------------------------------------------------------- inputs

def check_inputs(run_dir: Path, tasks: Sequence[str], methods: Sequence[str]) -> None:
    """Every file a method needs exists, else one UserError naming what is missing.

    oracle and merges need RUN/adapters/<task>/ for every task; moa needs RUN/moa/, an
    expert for every evaluated task and, unless it saved its own (joint training), the
    adapters of all its experts.
    """
    run_dir = Path(run_dir)
    needs_adapters = [m for m in methods if m != "base"]
    if needs_adapters:
        missing = [t for t in tasks if not (adapter_dir(run_dir, t) / "adapter_config.json").is_file()]
        if missing:
            raise UserError(f"method {needs_adapters[0]} needs an adapter for every task: no adapter for "
                            f"task {', '.join(missing)} in {run_dir / 'adapters'} "
                            f"(train it with train_individual_loras.py)")
    if "moa" in methods:
        folder = moa_dir(run_dir)
        if not (folder / "moa_config.json").is_file():
            raise UserError(f"method moa needs a trained MoA: no {folder}/moa_config.json "
                            f"(train it with train_moa.py, or leave moa out of --methods)")
        if not (folder / "routers.safetensors").is_file():
            raise UserError(f"method moa: {folder} has no routers.safetensors (an unfinished train_moa.py?)")
        experts, saved = moa_experts(folder)
        absent = [t for t in tasks if t not in experts]
        if absent:
            raise UserError(f"method moa: {folder} has no expert for task {', '.join(absent)} "
                            f"(its experts: {', '.join(experts)})")
        missing = [t for t in experts if not saved and not (adapter_dir(run_dir, t) / "adapter_config.json").is_file()]
        if missing:
            raise UserError(f"method moa needs the adapters of its experts: no adapter for task "
                            f"{', '.join(missing)} in {run_dir / 'adapters'}")


def moa_experts(folder: Path) -> tuple[list[str], bool]:
    """(expert task names, whether the experts are saved inside the MoA folder) from moa_config.json."""
    path = Path(folder) / "moa_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg.get("tasks"), list):
        raise UserError(f"{path}: no 'tasks' list (not a saved MixtureOfLoRAs)")
    return list(cfg["tasks"]), bool(cfg.get("experts_saved"))


def moa_adapter_tasks(run_dir: Path) -> list[str]:
    """The tasks whose RUN/adapters the MoA needs (none if it saved its own experts)."""
    experts, saved = moa_experts(moa_dir(run_dir))
    return [] if saved else experts


def load_moa(model, run_dir: Path, adapters: dict[str, Adapter]):
    """RUN/moa injected into `model`, its experts from RUN/adapters (or its own saved experts)."""
    needed = moa_adapter_tasks(run_dir)
    return MixtureOfLoRAs.load(model, moa_dir(run_dir), {t: adapters[t] for t in needed} if needed else None)


def load_eval_data(tasks: Sequence[str], split: str, data: str, data_dir: str | None, size: int | None,
                   seed: int, hub_nli: str = "multi_nli") -> dict[str, list]:
    """Each task's evaluation examples: a seeded subset of `size` (all if None).

    Local files ("sample", "dir") hold what they hold: a larger size is capped at it, said
    on stderr (as training does); every task is loaded and validated before returning.
    """
    out = {}
    for task in task_registry.resolve_tasks(list(tasks)):
        n = size
        if data != "hub" and size is not None:
            available = len(task_registry.load_examples(task, split, data, data_dir, None, seed))
            if available < size:
                print(f"note: {data_dir or 'data/sample'} holds {available} {split} examples of task {task}; "
                      f"using them all (--eval-size {size})", file=sys.stderr)
            n = min(size, available)
        out[task] = task_registry.load_examples(task, split, data, data_dir, n, seed, hub_nli)
    return out


# ------------------------------------------------------------------------- merges

def build_merges(run_dir: Path, methods: Sequence[str], tasks: Sequence[str], adapters: dict[str, Adapter],
                 digests: dict[str, str], options: dict[str, dict], weights: Sequence[float] | None = None,
                 force: bool = False) -> dict[str, tuple[Adapter, bool]]:
    """{method: (merged adapter over `tasks`, reused)} for every merge method.

    A merge is reused from RUN/merged/<method>/ if it was built from the same adapters with
    the same options and weights; the others are merged in memory first, and saved only
    when all of them succeeded (a merge that cannot be built fails before anything is written).
    """
    out, new = {}, {}
    for method in methods:
        folder = Path(run_dir) / "merged" / method
        recipe = {"method": method, "tasks": list(tasks), "options": options[method],
                  "weights": list(weights) if weights is not None else None,
                  "adapters": {t: digests[t] for t in tasks}}
        info = folder / "merge_info.json"
        if not force and info.is_file():
            try:
                if json.loads(info.read_text()).get("recipe") == json.loads(json.dumps(recipe)):
                    out[method] = (load_adapter(folder), True)
                    continue
            except json.JSONDecodeError:
                pass
        merged = merging.merge_adapters([adapters[t] for t in tasks], method,
                                list(weights) if weights is not None else None, **options[method])
        new[method] = (merged, folder, recipe)
    for method, (merged, folder, recipe) in new.items():
        save_adapter(merged, folder, extra_json={"merge_info.json": {"recipe": recipe}})
        out[method] = (load_adapter(folder), False)   # exactly what a rerun will read
    return {m: out[m] for m in methods}


def load_run_adapters(run_dir: Path, tasks: Sequence[str]) -> tuple[dict[str, Adapter], dict[str, str]]:
    """({task: Adapter}, {task: sha256 of its files}) from RUN/adapters/<task>/."""
    adapters, digests = {}, {}
    for t in tasks:
        folder = adapter_dir(run_dir, t)
        adapters[t] = load_adapter(folder)
        adapters[t].name = t
        digests[t] = adapter_digest(folder)
    return adapters, digests


# ------------------------------------------------------------------------- model state

@contextmanager
def folded(model: torch.nn.Module, adapter: Adapter) -> Iterator[torch.nn.Module]:
    """The model with `adapter` folded into its weights (W <- W + s B A), no LoRA layer left.

    Inference then costs exactly what the base model costs. On exit the touched weights
    are restored from a CPU copy (exact, unlike subtracting the delta again in bf16; on a
    GPU the copy costs no GPU memory).
    """
    check_adapter_fits(model, adapter)
    backup = {n: model.get_submodule(n).weight.detach().to("cpu", copy=True) for n in adapter.factors}
    try:
        apply_adapter(model, adapter)
        unload_lora(model, merge=True)   # fold, then put the plain nn.Linear back
        yield model
    finally:
        unload_lora(model, merge=False)  # only if apply succeeded and unload did not
        with torch.no_grad():
            for n, w in backup.items():
                model.get_submodule(n).weight.copy_(w)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------- batching

def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory
    error shows in the first batch, not the last)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, max_len], padded on `side`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token")
    return pad


def _moa_session(moa, experts: torch.Tensor | None, idx: list[int], positions: torch.Tensor | None = None):
    if moa is None:
        return nullcontext()
    kw = {}
    if experts is not None:
        kw["experts"] = experts[idx]
    if positions is not None:
        kw["positions"] = positions
    return moa.session(**kw)


def _chosen(moa) -> list[int]:
    return [int(e) for e in moa.chosen_experts().reshape(-1).tolist()]


@dataclass
class Generated:
    """Per example, in the input order: generated token ids (up to and excluding EOS), raw
    text, and the routed expert index (MoA only, else None)."""
    token_ids: list[list[int]]
    texts: list[str]
    routed: list[int] | None


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], batch_size: int = 16,
             max_new_tokens: int = 128, moa=None, experts: torch.Tensor | None = None,
             progress=None, min_new_tokens: int = 0) -> Generated:
    """Greedy generation for already-encoded (and truncated) prompts.

    Args:
        prompt_ids: one token-id list per prompt.
        moa: a MixtureOfLoRAs injected into `model`; each batch is one routing session.
        experts: [n] forced expert per prompt (MoA oracle mode), or None to let it route.
        progress: optional callable(n_done) called after each batch.
        min_new_tokens: EOS is suppressed before this many tokens (benchmarks: equal work).
    """
    device = model_device(model)
    eos, pad = tokenizer.eos_token_id, _pad_id(tokenizer)
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                               eos_token_id=eos, pad_token_id=pad, use_cache=True,
                               min_new_tokens=min_new_tokens or None)
    n = len(prompt_ids)
    out_ids: list[list[int] | None] = [None] * n
    routed: list[int] | None = [0] * n if moa is not None else None
    for idx in length_sorted_batches([len(p) for p in prompt_ids], batch_size):
        ids, mask = pad_batch([prompt_ids[i] for i in idx], pad, "left", device)
        with _moa_session(moa, experts, idx):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            if moa is not None:
                for i, e in zip(idx, _chosen(moa)):
                    routed[i] = e
        new = out[:, ids.shape[1]:].tolist()              # [batch, <= max_new_tokens]
        for i, seq in zip(idx, new):
            out_ids[i] = seq[:seq.index(eos)] if eos in seq else seq
        if progress:
            progress(len(idx))
    texts = tokenizer.batch_decode(out_ids, skip_special_tokens=True)
    return Generated(out_ids, texts, routed)


def label_ids(tokenizer, label: str) -> list[int]:
    """A label's target tokens exactly as training sees them (tokens + EOS)."""
    ex = task_registry.tokenize_example(tokenizer, "", label, max_len=1024, max_target_len=512)
    return [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]


@torch.no_grad()
def label_logprobs(model, tokenizer, prompt_ids: Sequence[Sequence[int]], labels: Sequence[str],
                   batch_size: int = 16, moa=None, experts: torch.Tensor | None = None,
                   progress=None) -> tuple[list[list[float]], list[int] | None]:
    """log p(label tokens + EOS | prompt) for every prompt and label: ([n][n_labels], routed).

    Each (prompt, label) pair is one right-padded sequence (positions stay those of the
    unpadded sequence); the LM head runs only over the span of positions that predict a
    label token (`logits_to_keep`). MoA routes at each sequence's last prompt token.
    """
    device = model_device(model)
    pad = _pad_id(tokenizer)
    targets = [label_ids(tokenizer, lab) for lab in labels]
    n, k = len(prompt_ids), len(labels)
    rows = [(i, j) for i in range(n) for j in range(k)]
    seqs = [list(prompt_ids[i]) + targets[j] for i, j in rows]
    scores = [[0.0] * k for _ in range(n)]
    routed: list[int] | None = [0] * n if moa is not None else None
    row_experts = experts[[i for i, _ in rows]] if experts is not None else None
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_batch([seqs[r] for r in idx], pad, "right", device)
        plen = [len(prompt_ids[rows[r][0]]) for r in idx]
        positions = torch.tensor([p - 1 for p in plen], device=device)
        # positions whose logits predict a label token: [min prompt end, max sequence end)
        lo, hi = min(plen) - 1, max(len(seqs[r]) for r in idx) - 1
        with _moa_session(moa, row_experts, idx, positions if moa is not None else None):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                           logits_to_keep=torch.arange(lo, hi, device=device)).logits   # [b, hi-lo, vocab]
            if moa is not None:
                for r, e in zip(idx, _chosen(moa)):
                    routed[rows[r][0]] = e
        for b, r in enumerate(idx):
            i, j = rows[r]
            tgt = torch.tensor(targets[j], device=device)
            start = plen[b] - 1 - lo
            logp = F.log_softmax(logits[b, start:start + len(tgt)].float(), dim=-1)   # [len(label), vocab]
            scores[i][j] = float(logp.gather(1, tgt[:, None]).sum())
        if progress:
            progress(len(idx))
    return scores, routed


# ------------------------------------------------------------------------- one cell

@dataclass
class Settings:
    """What a cell's predictions depend on besides method, model and data."""
    max_new_tokens: int = 128
    max_prompt_len: int = 400
    score_by: str = "generate"
    batch_size: int = 16

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")  # batching changes speed, not the (greedy) predictions
        return d


def evaluate_task(model, tokenizer, task: str, examples: Sequence, settings: Settings, moa=None,
                  experts: torch.Tensor | None = None, progress=None) -> dict:
    """Predict and score one task's examples with the model as it is set up now.

    Returns a cell body: {"task", "n", "result" (Task.score minus per_example), "records"
    (one per example: id, prompt, prediction, raw, reference, references, score, and
    routed_task / label_logprobs where they apply), "seconds", "new_tokens",
    "tokens_per_s"}.
    """
    t = task_registry.get_task(task)
    prompts = [t.prompt(ex) for ex in examples]
    ids = [task_registry.encode_prompt(tokenizer, p, settings.max_prompt_len) for p in prompts]
    start = time.perf_counter()
    extra: list[dict] = [{} for _ in examples]
    if settings.score_by == "likelihood" and t.labels is not None:
        lp, routed = label_logprobs(model, tokenizer, ids, t.labels, settings.batch_size, moa, experts, progress)
        raw = [t.labels[max(range(len(row)), key=row.__getitem__)] for row in lp]
        for e, row in zip(extra, lp):
            e["label_logprobs"] = dict(zip(t.labels, row))
        new_tokens = 0
    else:
        gen = generate(model, tokenizer, ids, settings.batch_size, settings.max_new_tokens, moa, experts, progress)
        raw, routed = gen.texts, gen.routed
        new_tokens = sum(len(x) for x in gen.token_ids)
    seconds = time.perf_counter() - start
    predictions = [task_registry.clean_prediction(t, r) for r in raw]
    scored = t.score(predictions, list(examples))
    per_example = scored.pop("per_example")
    moa_names = list(moa.tasks) if moa is not None else None
    records = []
    for i, ex in enumerate(examples):
        rec = {"id": ex.id, "task": t.name, "prompt": prompts[i], "prompt_tokens": len(ids[i]),
               "prediction": predictions[i], "raw": raw[i], "reference": ex.target,
               "metric": t.primary,
               "score": float(per_example[i])}
        if len(ex.references) > 1 or ex.references[0] != ex.target:
            rec["references"] = list(ex.references)
        if routed is not None:
            rec["routed_task"] = moa_names[routed[i]]
        rec.update(extra[i])
        records.append(rec)
    return {"task": t.name, "n": len(examples), "result": scored, "records": records,
            "seconds": seconds, "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / seconds if seconds > 0 and new_tokens else None}


# ------------------------------------------------------------------------- cells on disk

# ------------------------------------------------------------------------- summary

def summarize(model: str, tasks: Sequence[str], methods: Sequence[str], cells: dict[tuple[str, str], dict],
              meta: dict) -> dict:
    """summary.json: per method the multitask score and, per task, the primary metric, the
    oracle's, their ratio and every metric; the MoA routing counts; the run's meta.

    A multitask score whose oracle metric is 0 on some task is undefined: it is null, and
    `undefined_tasks` names the tasks.
    """
    oracle = {t: cells[("oracle", t)]["result"]["score"] for t in tasks}
    zero = [t for t in tasks if oracle[t] == 0]
    out_methods = {}
    for m in methods:
        per_task = {}
        for t in tasks:
            c = cells[(m, t)]
            r = c["result"]
            per_task[t] = {"primary": r["primary"], "score": r["score"], "oracle_score": oracle[t],
                           "relative": r["score"] / oracle[t] if oracle[t] else None,
                           "metrics": r["metrics"], "n": c["n"], "seconds": round(c["seconds"], 3),
                           "tokens_per_s": c.get("tokens_per_s")}
        scores = {t: per_task[t]["score"] for t in tasks}
        entry = {"multitask_score": None if zero else multitask_score(scores, oracle), "per_task": per_task}
        if zero:
            entry["undefined_tasks"] = zero
        out_methods[m] = entry
    summary = {"model": model, "tasks": list(tasks), "methods": out_methods}
    if "moa" in methods:
        summary["routing"] = routing_summary(tasks, [cells[("moa", t)]["records"] for t in tasks])
    summary["meta"] = meta
    return summary


def routing_summary(tasks: Sequence[str], records_per_task: Sequence[Sequence[dict]]) -> dict:
    """{"confusion": {true task: {routed task: count}}, "accuracy": share routed to the own task}."""
    confusion: dict[str, dict[str, int]] = {}
    hits = total = 0
    for t, records in zip(tasks, records_per_task):
        row = confusion.setdefault(t, {})
        for r in records:
            row[r["routed_task"]] = row.get(r["routed_task"], 0) + 1
            hits += r["routed_task"] == t
            total += 1
    return {"confusion": confusion, "accuracy": hits / total if total else None}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def results_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the study's table: methods x tasks' raw primary metric + multitask score."""
    tasks = summary["tasks"]
    first = summary["methods"][next(iter(summary["methods"]))]["per_task"]
    header = ["method", *[f"{t} ({first[t]['primary']})" for t in tasks], "multitask score"]
    rows = []
    for m, entry in summary["methods"].items():
        rows.append([m, *[_fmt(entry["per_task"][t]["score"]) for t in tasks], _fmt(entry["multitask_score"])])
    return header, rows


def _meta_lines(summary: dict) -> list[str]:
    meta = summary["meta"]
    cfg = meta.get("config", {})
    return [f"model: {summary['model']}",
            f"data: {cfg.get('data_desc', '')}",
            f"seed: {meta['seed']}  git commit: {meta['git_commit']}  data hash: {meta['data_hash'][:16]}",
            f"command: {meta['command']}"]


def results_markdown(summary: dict) -> str:
    header, rows = results_rows(summary)
    lines = ["# Evaluation results", ""]
    lines += [f"- {x}" for x in _meta_lines(summary)]
    lines += ["", "Raw primary metric per task (ROUGE and accuracy in 0..1, BLEU and SQuAD F1 in 0..100); "
              "multitask score = mean over tasks of method / oracle.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    zero = {t for e in summary["methods"].values() for t in e.get("undefined_tasks", [])}
    if zero:
        lines += ["", f"The oracle scores 0 on {', '.join(sorted(zero))}: the multitask score is undefined (n/a)."]
    if "routing" in summary:
        lines += ["", f"MoA routing accuracy (share of examples routed to their own task's expert): "
                      f"{_fmt(summary['routing']['accuracy'])}"]
    lines += ["", f"<!-- config: {json.dumps(summary['meta']['config'], sort_keys=True)} -->", ""]
    return "\n".join(lines)


def results_csv(summary: dict) -> str:
    """The table as CSV (raw numbers); `#` comment lines first carry the run's meta."""
    buf = io.StringIO()
    for line in _meta_lines(summary):
        buf.write(f"# {line}\n")
    buf.write(f"# config: {json.dumps(summary['meta']['config'], sort_keys=True)}\n")
    tasks = summary["tasks"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *tasks, "multitask_score"])
    for m, entry in summary["methods"].items():
        w.writerow([m, *[entry["per_task"][t]["score"] for t in tasks],
                    "" if entry["multitask_score"] is None else entry["multitask_score"]])
    return buf.getvalue()


def write_results(run_dir: Path, summary: dict) -> list[Path]:
    """summary.json, results.csv, results.md under RUN/eval/ (each written atomically)."""
    d = eval_dir(run_dir)
    write_json_atomic(d / "summary.json", summary)
    write_text_atomic(d / "results.csv", results_csv(summary))
    write_text_atomic(d / "results.md", results_markdown(summary))
    return [d / "summary.json", d / "results.csv", d / "results.md"]
