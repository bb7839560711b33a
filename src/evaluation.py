"""Evaluation: generate (or score labels) for one method on one task's examples, and the tables.

    with lora.folded(model, adapter):                  # a static method: oracle, a merge
        body = evaluate_task(model, tokenizer, "sentiment", examples, settings)
    body = evaluate_task(model, tokenizer, "sentiment", examples, settings, router=moa)

How a method sets the model up is the method's business (src/compose.py); this module only
runs the model as it stands, with a dynamic method's router when there is one.

Generation is greedy, batched with left padding and the KV cache (`model.generate`),
prompts left-truncated to `max_prompt_len` tokens exactly as training encodes them
(`tasks.encode_prompt`), stopping at EOS. Batches are formed from length-sorted prompts (less
padding, fewer wasted decode steps) and the original order is restored. With a router each
batch is one routing session (`router.session(...)`); its record of every example (the
expert a per-sequence router chose, or each expert's share of a per-token router's gates
over the prompt) goes into the predictions, and `summarize` builds a routing table per
dynamic method from them.

`score_by="likelihood"` (classification tasks only, `Task.labels`): instead of generating,
pick the label whose tokens (+ EOS) have the highest log-likelihood after the prompt.

A cell is one (method, task): predictions, per-example scores, the task's metrics and a
fingerprint of everything it depends on (model, data, adapters, options, generation
settings); cells live in the run folder (src/runs.py: `save_cell`, `find_cell`). A method
with seeded draws (random_merge) pools one evaluation per draw into its cell (`pool_draws`):
the mean over draws is its result, each draw's score and their spread are kept beside it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from src import metrics, paired
from src import tasks as task_registry
from src.errors import UserError
from src.metrics import multitask_score
from src.runs import (cell_path, eval_dir, git_commit, predictions_path, summary_path, write_json_atomic,
                      write_text_atomic)

SCORE_BY = ("generate", "likelihood")


# ------------------------------------------------------------------------- model

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
    """(input_ids, attention_mask), both [batch, max_len], padded on `side`, on `device`."""
    ids, mask = task_registry.pad_sequences(seqs, pad_id, side)
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError("the tokenizer has neither a pad nor an EOS token")
    return pad


def _session(router, experts: torch.Tensor | None, idx: list[int], positions: torch.Tensor | None = None,
             prompt_mask: torch.Tensor | None = None):
    """One routing session per batch (a dynamic method's router), or nothing."""
    if router is None:
        return nullcontext()
    kw = {}
    if experts is not None:
        kw["experts"] = experts[idx]
    if positions is not None:
        kw["positions"] = positions
    if prompt_mask is not None:
        kw["prompt_mask"] = prompt_mask
    return router.session(**kw)


class _Routing:
    """Per example, in input order: the router's record and (token routers) its per-layer shares."""

    def __init__(self, router, n: int):
        self.router = router
        self.records: list[dict] | None = [{} for _ in range(n)] if router is not None else None
        self.layers: list | None = [None] * n if hasattr(router, "layer_shares") else None

    def take(self, rows: Sequence[int]) -> None:
        """After a batch's session: each row's record (rows[j] is the example of batch row j)."""
        if self.router is None:
            return
        for i, rec in zip(rows, self.router.routing_records()):
            self.records[i] = rec
        if self.layers is not None:
            shares = self.router.layer_shares()                   # [layers, batch, experts]
            for j, i in enumerate(rows):
                self.layers[i] = shares[:, j]


@dataclass
class Generated:
    """Per example, in the input order: generated token ids (up to and excluding EOS), raw
    text, and the router's record (dynamic methods only, else None: {"routed_task": ...} or
    {"expert_share": {...}}) and per-layer expert shares (token routers, else None)."""
    token_ids: list[list[int]]
    texts: list[str]
    routing: list[dict] | None = None
    layer_shares: list | None = None
    experts: list[str] | None = None       # what layer_shares' columns are, when no router is at hand
    layer_names: list[str] | None = None   # ... and its rows


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], batch_size: int = 16,
             max_new_tokens: int = 128, router=None, experts: torch.Tensor | None = None,
             progress=None, min_new_tokens: int = 0) -> Generated:
    """Greedy generation for already-encoded (and truncated) prompts.

    Args:
        prompt_ids: one token-id list per prompt.
        router: a dynamic method's router injected into `model` (MoA, Arrow); each batch is
            one routing session.
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
    routing = _Routing(router, n)
    for idx in length_sorted_batches([len(p) for p in prompt_ids], batch_size):
        ids, mask = pad_batch([prompt_ids[i] for i in idx], pad, "left", device)
        with _session(router, experts, idx, prompt_mask=mask):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            routing.take(idx)
        new = out[:, ids.shape[1]:].tolist()              # [batch, <= max_new_tokens]
        for i, seq in zip(idx, new):
            out_ids[i] = seq[:seq.index(eos)] if eos in seq else seq
        if progress:
            progress(len(idx))
    texts = tokenizer.batch_decode(out_ids, skip_special_tokens=True)
    return Generated(out_ids, texts, routing.records, routing.layers)


def label_ids(tokenizer, label: str) -> list[int]:
    """A label's target tokens exactly as training sees them (tokens + EOS)."""
    ex = task_registry.tokenize_example(tokenizer, "", label, max_len=1024, max_target_len=512)
    return [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]


@torch.no_grad()
def label_logprobs(model, tokenizer, prompt_ids: Sequence[Sequence[int]], labels: Sequence[str],
                   batch_size: int = 16, router=None, experts: torch.Tensor | None = None,
                   progress=None) -> tuple[list[list[float]], "_Routing"]:
    """log p(label tokens + EOS | prompt) for every prompt and label: ([n][n_labels], routing).

    Each (prompt, label) pair is one right-padded sequence (positions stay those of the
    unpadded sequence); the LM head runs only over the span of positions that predict a
    label token (`logits_to_keep`). A router routes at each sequence's last prompt token
    (per sequence) or on every token (per token); its record of each prompt is the one made
    with the first label.
    """
    device = model_device(model)
    pad = _pad_id(tokenizer)
    targets = [label_ids(tokenizer, lab) for lab in labels]
    n, k = len(prompt_ids), len(labels)
    rows = [(i, j) for i in range(n) for j in range(k)]
    seqs = [list(prompt_ids[i]) + targets[j] for i, j in rows]
    scores = [[0.0] * k for _ in range(n)]
    routing = _Routing(router, len(rows))
    row_experts = experts[[i for i, _ in rows]] if experts is not None else None
    for idx in length_sorted_batches([len(s) for s in seqs], batch_size):
        ids, mask = pad_batch([seqs[r] for r in idx], pad, "right", device)
        plen = [len(prompt_ids[rows[r][0]]) for r in idx]
        positions = torch.tensor([p - 1 for p in plen], device=device)
        prompt_mask = (torch.arange(ids.shape[1], device=device)[None] < torch.tensor(plen, device=device)[:, None])
        # positions whose logits predict a label token: [min prompt end, max sequence end)
        lo, hi = min(plen) - 1, max(len(seqs[r]) for r in idx) - 1
        with _session(router, row_experts, idx, positions if router is not None else None,
                      prompt_mask.long() if router is not None else None):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                           logits_to_keep=torch.arange(lo, hi, device=device)).logits   # [b, hi-lo, vocab]
            routing.take(idx)
        for b, r in enumerate(idx):
            i, j = rows[r]
            tgt = torch.tensor(targets[j], device=device)
            start = plen[b] - 1 - lo
            logp = F.log_softmax(logits[b, start:start + len(tgt)].float(), dim=-1)   # [len(label), vocab]
            scores[i][j] = float(logp.gather(1, tgt[:, None]).sum())
        if progress:
            progress(len(idx))
    first = [rows.index((i, 0)) for i in range(n)]
    if routing.records is not None:
        routing.records = [routing.records[r] for r in first]
    if routing.layers is not None:
        routing.layers = [routing.layers[r] for r in first]
    return scores, routing


# ------------------------------------------------------------------------- one cell

TRUNCATION = ("left", "right")


@dataclass
class Settings:
    """What a cell's predictions depend on besides method, model and data."""
    max_new_tokens: int = 128
    max_prompt_len: int = 400
    score_by: str = "generate"
    batch_size: int = 16
    truncation_side: str = "left"

    def fingerprint(self) -> dict:
        d = asdict(self)
        d.pop("batch_size")  # batching changes speed, not the (greedy) predictions
        if d["truncation_side"] == "left":
            d.pop("truncation_side")   # the default: fingerprints from before the option stay valid
        return d


# ------------------------------------------------------------------------- scoring protocols

def records_examples(task: str, records: Sequence[dict]) -> list:
    """The Examples a cell's records were scored against (id, reference, references)."""
    return [task_registry.Example(r["id"], task, {}, r["reference"], tuple(r.get("references") or [r["reference"]]))
            for r in records]


def score_records(task: str, records: Sequence[dict], protocol: str) -> dict:
    """A cell's result under a scoring protocol (`tasks.SCORING`), from its saved raw
    predictions: no generation. {"primary", "score", "metrics", "per_example"}."""
    t = task_registry.get_task(task)
    predictions = [task_registry.scored_prediction(t, r["raw"], protocol) for r in records]
    return t.score(predictions, records_examples(t.name, records), protocol)


def cell_result(cell: dict, protocol: str = "toolkit") -> dict:
    """The cell's result under `protocol`: stored when the cell has it, else rescored from
    its records (cells made before the study protocol existed)."""
    stored = (cell.get("results") or {}).get(protocol)
    if stored is not None:
        return stored
    if protocol == "toolkit":
        return cell["result"]
    scored = score_records(cell["task"], cell["records"], protocol)
    scored.pop("per_example")
    return scored


def evaluate_task(model, tokenizer, task: str, examples: Sequence, settings: Settings, router=None,
                  experts: torch.Tensor | None = None, progress=None, generator=None) -> dict:
    """Predict and score one task's examples with the model as it is set up now.

    router: a dynamic method's router (src/compose.py), or None for a model as it stands.
    generator: generator(prompt_ids, progress) -> Generated instead of `generate` with the model
        (another engine: src/engines.py); the cell then records "engine": "vllm".
    Returns a cell body: {"task", "n", "result" (Task.score minus per_example), "records"
    (one per example: id, prompt, prediction, raw, reference, references, score, and
    the router's record / label_logprobs where they apply), "seconds", "new_tokens",
    "tokens_per_s", and for token routers "routing_per_layer" (each expert's mean share per
    layer over the task's prompts)}.
    """
    t = task_registry.get_task(task)
    prompts = [t.prompt(ex) for ex in examples]
    ids = [task_registry.encode_prompt(tokenizer, p, settings.max_prompt_len, settings.truncation_side)
           for p in prompts]
    start = time.perf_counter()
    extra: list[dict] = [{} for _ in examples]
    if settings.score_by == "likelihood" and t.labels is not None:
        lp, routing = label_logprobs(model, tokenizer, ids, t.labels, settings.batch_size, router, experts, progress)
        raw = [t.labels[max(range(len(row)), key=row.__getitem__)] for row in lp]
        for e, row in zip(extra, lp):
            e["label_logprobs"] = dict(zip(t.labels, row))
        records_routing, layers = routing.records, routing.layers
        new_tokens = 0
    else:
        gen = (generator(ids, progress) if generator is not None else
               generate(model, tokenizer, ids, settings.batch_size, settings.max_new_tokens, router, experts, progress))
        raw, records_routing, layers = gen.texts, gen.routing, gen.layer_shares
        new_tokens = sum(len(x) for x in gen.token_ids)
    seconds = time.perf_counter() - start
    predictions = [task_registry.clean_prediction(t, r) for r in raw]
    scored = t.score(predictions, list(examples))
    per_example = scored.pop("per_example")
    records = []
    for i, ex in enumerate(examples):
        rec = {"id": ex.id, "task": t.name, "prompt": prompts[i], "prompt_tokens": len(ids[i]),
               "prediction": predictions[i], "raw": raw[i], "reference": ex.target,
               "metric": t.primary,
               "score": float(per_example[i])}
        if len(ex.references) > 1 or ex.references[0] != ex.target:
            rec["references"] = list(ex.references)
        if records_routing is not None:
            rec.update(records_routing[i])
        rec.update(extra[i])
        records.append(rec)
    study = score_records(t.name, records, "study")
    study_per_example = study.pop("per_example")
    for rec, v in zip(records, study_per_example):
        rec["score_study"] = float(v)
    body = {"task": t.name, "n": len(examples), "result": scored, "results": {"toolkit": scored, "study": study},
            "records": records,
            "seconds": seconds, "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / seconds if seconds > 0 and new_tokens else None}
    if generator is not None:
        body["engine"] = "vllm"
    if layers:
        mean = torch.stack(layers).double().mean(0)                        # [layers, experts]
        experts, names = (router.tasks, router.layer_names) if router is not None else (gen.experts, gen.layer_names)
        body["routing_per_layer"] = {"experts": list(experts), "layers": list(names),
                                     "share": [[round(float(v), 6) for v in row] for row in mean]}
    return body


# ------------------------------------------------------------------------- draws

def spread(values: Sequence[float]) -> dict:
    """{"scores", "std" (sample standard deviation; 0 for one value), "min", "max"} of values."""
    values = [float(v) for v in values]
    return {"scores": values, "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def mean_result(results: Sequence[dict]) -> dict:
    """One result from several draws' results: the mean score and the mean of every numeric metric
    (another metric is kept when every draw agrees on it, else None), and under "draws" each draw's
    score with their spread."""
    metrics_out = {}
    for k, v in results[0]["metrics"].items():
        vals = [r["metrics"].get(k) for r in results]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals)
        metrics_out[k] = statistics.fmean(vals) if numeric else (v if all(x == v for x in vals) else None)
    scores = [r["score"] for r in results]
    return {"primary": results[0]["primary"], "score": statistics.fmean(scores), "metrics": metrics_out,
            "draws": spread(scores)}


def pool_draws(bodies: Sequence[dict], draws: Sequence[dict]) -> dict:
    """One cell body from the evaluations of a method's draws (`evaluate_task` bodies on the same
    examples; `draws` says what each draw is). Per protocol the result is `mean_result` of the
    draws'; the records are every draw's, each with its "draw" index; "draws" keeps each draw's own
    results; "n" is the examples per draw."""
    results = {p: mean_result([b["results"][p] for b in bodies]) for p in bodies[0]["results"]}
    seconds = sum(b["seconds"] for b in bodies)
    new_tokens = sum(b["new_tokens"] for b in bodies)
    return {"task": bodies[0]["task"], "n": bodies[0]["n"], "result": results["toolkit"], "results": results,
            "records": [{**r, "draw": i} for i, b in enumerate(bodies) for r in b["records"]],
            "draws": [{"draw": i, **d, "results": b["results"], "seconds": b["seconds"]}
                      for i, (d, b) in enumerate(zip(draws, bodies))],
            "seconds": seconds, "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / seconds if seconds > 0 and new_tokens else None,
            **({"engine": bodies[0]["engine"]} if "engine" in bodies[0] else {})}


def draw_groups(records: Sequence[dict]) -> list[list[dict]]:
    """A cell's records per draw, in draw order; records without draws are one group."""
    if not records or "draw" not in records[0]:
        return [list(records)]
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(r["draw"], []).append(r)
    return [groups[d] for d in sorted(groups)]


def rescored_cell(task: str, records: Sequence[dict], seconds: float = 0.0, tokens_per_s=None) -> dict:
    """A cell rebuilt from its saved records, without generating: every protocol's result (pooled
    over the draws when the records carry them)."""
    groups = draw_groups(records)
    per = [{p: score_records(task, g, p) for p in task_registry.SCORING} for g in groups]
    for res in per:
        for r in res.values():
            r.pop("per_example")
    results = per[0] if len(per) == 1 else {p: mean_result([x[p] for x in per]) for p in task_registry.SCORING}
    return {"task": task, "n": len(groups[0]), "records": list(records), "seconds": seconds,
            "tokens_per_s": tokens_per_s, "result": results["toolkit"], "results": results}


# ------------------------------------------------------------------------- summary

# ------------------------------------------------------------------------- intervals

BOOTSTRAP = {"samples": 1000, "seed": 0, "level": 0.95}


def example_values(cell: dict, protocol: str):
    """What a cell's primary metric is a function of, per example: BLEU's sufficient statistics
    [n, 11] (corpus BLEU is not a mean), else the per-example scores [n] whose mean it is."""
    import numpy as np
    task = task_registry.get_task(cell["task"])
    records = cell["records"]
    if task.primary == "bleu":
        refs = [r.get("references") or [r["reference"]] for r in records]
        preds = [task_registry.scored_prediction(task, r["raw"], protocol) for r in records]
        return np.array([metrics.bleu_stats(p, rf) for p, rf in zip(preds, refs)])
    key = "score" if protocol == "toolkit" else "score_study"
    if all(key in r for r in records):
        return np.array([r[key] for r in records], dtype=float)
    return np.array(score_records(task.name, records, protocol)["per_example"], dtype=float)


def cell_resampled(cell: dict, idx, protocol: str):
    """The cell's primary metric on each resample -> [samples]; a cell of several draws: the mean
    over its draws, each scored on the same resampled examples."""
    import numpy as np
    groups = draw_groups(cell["records"])
    if len(groups) == 1:
        return resampled(example_values(cell, protocol), idx, protocol)
    return np.mean([resampled(example_values({"task": cell["task"], "records": g}, protocol), idx, protocol)
                    for g in groups], axis=0)


def resampled(values, idx, protocol: str):
    """The primary metric on each resample (rows of idx [samples, n]) -> [samples]."""
    import numpy as np
    if values.ndim == 1:
        return values[idx].mean(1)
    sums = values[idx].sum(1)                                           # [samples, 11]
    fn = metrics.bleu_from_stats if protocol == "study" else metrics.sacrebleu_from_stats
    return np.array([fn(row) for row in sums])


def resampled_cells(tasks: Sequence[str], methods: Sequence[str], cells: dict, protocol: str) -> dict:
    """{(method, task): the cell's primary metric on each of the task's bootstrap resamples}
    [samples]. Paired: a task's examples are drawn once (seeded by the task's position) and
    every method, the oracle included, is scored on the same draws."""
    stats = {}
    for k, t in enumerate(tasks):
        idx = metrics.bootstrap(cells[("oracle", t)]["n"], BOOTSTRAP["samples"], BOOTSTRAP["seed"] + k)
        for m in methods:
            if cells[(m, t)]["n"] != idx.shape[1]:
                raise UserError(f"method {m} has {cells[(m, t)]['n']} examples of task {t}, the oracle "
                                f"{idx.shape[1]}: the paired bootstrap needs the same examples")
            stats[(m, t)] = cell_resampled(cells[(m, t)], idx, protocol)
    return stats


def intervals(tasks: Sequence[str], methods: Sequence[str], cells: dict, protocol: str,
              stats: dict | None = None) -> tuple[dict, dict]:
    """Bootstrap 95% intervals, seeded: ({(method, task): [lo, hi]} of each cell's primary
    metric, {method: [lo, hi]} of its multitask score). The multitask resamples are paired
    (`resampled_cells`, or `stats` when given); resamples where an oracle scores 0 are left out."""
    import numpy as np
    stats = resampled_cells(tasks, methods, cells, protocol) if stats is None else stats
    per_cell = {(m, t): paired.percentiles(stats[(m, t)]) for t in tasks for m in methods}
    ratios = paired.ratio_resamples(stats, tasks, methods)
    return per_cell, {m: paired.percentiles(r) if np.size(r) else None for m, r in ratios.items()}


def summarize(model: str, tasks: Sequence[str], methods: Sequence[str], cells: dict[tuple[str, str], dict],
              meta: dict, scoring: str = "toolkit") -> dict:
    """summary.json: per method the multitask score and, per task, the primary metric, the
    oracle's, their ratio and every metric; a routing table per dynamic method; the run's meta.

    A multitask score whose oracle metric is 0 on some task is undefined: it is null, and
    `undefined_tasks` names the tasks; `multitask_defined` then gives the score and interval
    over the other tasks ({"tasks", "score", "interval"}; e.g. the study's unsmoothed BLEU is
    0 on a few dozen weak translations).
    """
    oracle = {t: cell_result(cells[("oracle", t)], scoring)["score"] for t in tasks}
    stats = resampled_cells(tasks, methods, cells, scoring)
    cell_iv, method_iv = intervals(tasks, methods, cells, scoring, stats)
    zero = [t for t in tasks if oracle[t] == 0]
    defined = [t for t in tasks if oracle[t] != 0]
    defined_iv = intervals(defined, methods, cells, scoring)[1] if zero and defined else {}
    out_methods = {}
    routing = {}
    for m in methods:
        per_task = {}
        for t in tasks:
            c = cells[(m, t)]
            r = cell_result(c, scoring)
            per_task[t] = {"primary": r["primary"], "score": r["score"], "oracle_score": oracle[t],
                           "relative": r["score"] / oracle[t] if oracle[t] else None,
                           "interval": cell_iv[(m, t)],
                           "metrics": r["metrics"], "n": c["n"], "seconds": round(c["seconds"], 3),
                           "tokens_per_s": c.get("tokens_per_s"), "engine": c.get("engine", "hf")}
            if "draws" in r:
                per_task[t]["draws"] = r["draws"]
        scores = {t: per_task[t]["score"] for t in tasks}
        entry = {"multitask_score": None if zero else multitask_score(scores, oracle),
                 "multitask_interval": None if zero else method_iv[m], "per_task": per_task}
        if zero:
            entry["undefined_tasks"] = zero
            if defined:
                entry["multitask_defined"] = {"tasks": defined, "interval": defined_iv[m], "score": multitask_score(
                    {t: scores[t] for t in defined}, {t: oracle[t] for t in defined})}
        if len(defined) > 2:
            entry["without"] = paired.without_each(stats, defined, m, scores, oracle)
        drawn = draws_summary(per_task, defined)
        if drawn is not None:
            entry["draws"] = drawn
        out_methods[m] = entry
        table = routing_summary(tasks, [cells[(m, t)] for t in tasks])
        if table is not None:
            routing[m] = table
    summary = {"model": model, "tasks": list(tasks), "scoring": scoring, "bootstrap": dict(BOOTSTRAP),
               "methods": out_methods}
    if routing:
        summary["routing"] = routing
    if defined and len(methods) > 1:
        scored = {m: multitask_score({t: out_methods[m]["per_task"][t]["score"] for t in defined},
                                     {t: oracle[t] for t in defined}) for m in methods}
        summary["paired"] = {"tasks": defined, "pairs": paired.differences(stats, defined, methods, scored)}
    summary["meta"] = meta
    return summary


def draws_summary(per_task: dict, tasks: Sequence[str]) -> dict | None:
    """A method with draws: {"n", "tasks", "multitask_scores" (each draw's multitask score over
    `tasks`, those whose oracle is not 0), "std", "min", "max"}; None for any other method."""
    drawn = [per_task[t].get("draws") for t in per_task]
    if not drawn or any(d is None for d in drawn) or len({len(d["scores"]) for d in drawn}) != 1:
        return None
    n = len(drawn[0]["scores"])
    if not tasks:                                     # every oracle scores 0: no multitask score to spread
        return {"n": n, "tasks": [], "multitask_scores": None, "std": None, "min": None, "max": None}
    each = [multitask_score({t: per_task[t]["draws"]["scores"][i] for t in tasks},
                            {t: per_task[t]["oracle_score"] for t in tasks}) for i in range(n)]
    s = spread(each)
    return {"n": n, "tasks": list(tasks), "multitask_scores": s["scores"], "std": s["std"], "min": s["min"],
            "max": s["max"]}


def routing_summary(tasks: Sequence[str], cells: Sequence[dict]) -> dict | None:
    """A dynamic method's routing table from its cells, None for a method that does not route.

    Per-sequence routers ("routed_task" records): {"kind": "sequence", "confusion": {true task:
    {routed task: count}}, "accuracy": share routed to the own task, and, when the cells hold
    it, "per_layer" / "layers" / "experts" as below: each layer's choice on the prompt}. Per-token routers
    ("expert_share" records): {"kind": "token", "share": {true task: {expert: mean share}},
    "accuracy": mean share of the own task's expert (when experts are tasks), "per_layer":
    {true task: [[share per expert] per layer]}, "layers": [...], "experts": [...]}.
    """
    records = [r for c in cells for r in c["records"]]
    if records and all("routed_task" in r for r in records):
        confusion: dict[str, dict[str, int]] = {}
        hits = 0
        for t, c in zip(tasks, cells):
            row = confusion.setdefault(t, {})
            for r in c["records"]:
                row[r["routed_task"]] = row.get(r["routed_task"], 0) + 1
                hits += r["routed_task"] == t
        out = {"kind": "sequence", "confusion": confusion, "accuracy": hits / len(records)}
        layered = [c.get("routing_per_layer") for c in cells]
        if all(layered):             # each layer's expert on the prompt (MoA's per-layer routers)
            out.update(experts=layered[0]["experts"], layers=layered[0]["layers"],
                       per_layer={t: lay["share"] for t, lay in zip(tasks, layered)})
        return out
    if records and all("expert_share" in r for r in records):
        share, own = {}, []
        for t, c in zip(tasks, cells):
            experts = list(c["records"][0]["expert_share"])
            share[t] = {e: sum(r["expert_share"][e] for r in c["records"]) / len(c["records"]) for e in experts}
            if t in share[t]:
                own.append(share[t][t])
        out = {"kind": "token", "share": share, "accuracy": sum(own) / len(own) if own else None}
        layered = [c.get("routing_per_layer") for c in cells]
        if all(layered):
            out.update(experts=layered[0]["experts"], layers=layered[0]["layers"],
                       per_layer={t: lay["share"] for t, lay in zip(tasks, layered)})
        return out
    return None


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def results_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the study's table: methods x tasks' raw primary metric + multitask score."""
    tasks = summary["tasks"]
    first = summary["methods"][next(iter(summary["methods"]))]["per_task"]
    header = ["method", *[f"{t} ({first[t]['primary']})" for t in tasks], "multitask score", "95% interval"]
    rows = []
    for m, entry in summary["methods"].items():
        iv = entry.get("multitask_interval")
        rows.append([m, *[_fmt(entry["per_task"][t]["score"]) for t in tasks], _fmt(entry["multitask_score"]),
                     f"{_fmt(iv[0])}-{_fmt(iv[1])}" if iv else "n/a"])
    return header, rows


def _meta_lines(summary: dict) -> list[str]:
    meta = summary["meta"]
    cfg = meta.get("config", {})
    scoring = summary.get("scoring", "toolkit")
    return [f"model: {summary['model']}",
            f"scoring: {scoring} ({PROTOCOLS[scoring]})",
            f"data: {cfg.get('data_desc', '')}",
            f"seed: {meta['seed']}  git commit: {meta['git_commit']}  data hash: {meta['data_hash'][:16]}",
            f"command: {meta['command']}"]


def results_markdown(summary: dict) -> str:
    header, rows = results_rows(summary)
    lines = ["# Evaluation results", ""]
    lines += [f"- {x}" for x in _meta_lines(summary)]
    lines += ["", "Raw primary metric per task (ROUGE and accuracy in 0..1, BLEU and SQuAD F1 in 0..100); "
              "multitask score = mean over tasks of method / oracle, with its bootstrap 95% interval "
              "(1,000 paired resamples of each task's examples, seeded; per-task intervals in summary.json).", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    on_vllm = [m for m, e in summary["methods"].items() if any(c.get("engine") == "vllm" for c in e["per_task"].values())]
    if on_vllm:
        rest = [m for m in summary["methods"] if m not in on_vllm]
        lines += ["", f"Engine: vLLM for {', '.join(on_vllm)}" + (f"; transformers (hf) for {', '.join(rest)}" if rest
                                                                  else "") + " (each cell's engine: summary.json)."]
    zero = {t for e in summary["methods"].values() for t in e.get("undefined_tasks", [])}
    if zero:
        lines += ["", f"The oracle scores 0 on {', '.join(sorted(zero))}: the multitask score is undefined (n/a)."]
    for m, table in summary.get("routing", {}).items():
        if table.get("kind") == "token":
            lines += ["", f"{m} routing: mean share of the own task's expert over the prompts' tokens and "
                          f"layers: {_fmt(table['accuracy'])}"]
        else:
            lines += ["", f"{m} routing accuracy (share of examples routed to their own task's expert): "
                          f"{_fmt(table['accuracy'])}"]
    for m, entry in summary["methods"].items():
        d = entry.get("draws")
        if d and d["tasks"]:
            over = "" if d["tasks"] == summary["tasks"] else f" (over {', '.join(d['tasks'])})"
            lines += ["", f"{m}: the mean over {d['n']} seeded draws; each draw's multitask score{over} "
                          f"{_fmt(d['min'])}-{_fmt(d['max'])}, standard deviation {_fmt(d['std'])}"]
        elif d:
            lines += ["", f"{m}: the mean over {d['n']} seeded draws (each draw's scores: summary.json)"]
    lines += ["", f"<!-- config: {json.dumps(summary['meta']['config'], sort_keys=True)} -->", ""]
    return "\n".join(lines)


def results_csv(summary: dict) -> str:
    """The table as CSV (raw numbers): a header, then one row per method, nothing else, so
    `pandas.read_csv(path)` and `csv.DictReader` read it as it is. The run's provenance
    (model, data, seed, commit, command, config) is summary.json's "meta" and the head of
    results.md."""
    buf = io.StringIO()
    tasks = summary["tasks"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *tasks, "multitask_score", "multitask_lo", "multitask_hi"])
    for m, entry in summary["methods"].items():
        iv = entry.get("multitask_interval") or ["", ""]
        w.writerow([m, *[entry["per_task"][t]["score"] for t in tasks],
                    "" if entry["multitask_score"] is None else entry["multitask_score"], *iv])
    return buf.getvalue()


PROTOCOLS = {
    "toolkit": "sacreBLEU; ROUGE with stemming, exact mean; SQuAD against every gold answer; "
               "generations cut at the next ### and, for labels, at the first line",
    "study": "the reference study's: evaluate's bleu (nmt corpus BLEU, no smoothing); ROUGE without "
             "stemming, bootstrap median; SQuAD against the first gold answer; raw generations",
}


def result_names(scoring: str = "toolkit") -> tuple[str, str, str]:
    """The summary, CSV and markdown file names of a protocol: summary.json, results.csv,
    results.md for the toolkit's; summary_study.json, ... for the study's."""
    suffix = "" if scoring == "toolkit" else f"_{scoring}"
    return f"summary{suffix}.json", f"results{suffix}.csv", f"results{suffix}.md"


def write_results(run_dir: Path, summary: dict) -> list[Path]:
    """The protocol's summary, CSV and markdown table under RUN/eval/ (each written atomically)."""
    d = eval_dir(run_dir)
    names = [d / n for n in result_names(summary.get("scoring", "toolkit"))]
    write_json_atomic(names[0], summary)
    write_text_atomic(names[1], results_csv(summary))
    write_text_atomic(names[2], results_markdown(summary))
    return names


def load_cells(run_dir: Path, also: Sequence[Path] = ()) -> tuple[dict, dict]:
    """(RUN/eval/summary.json, {(method, task): cell}) of an evaluated run folder.

    A folder of committed results keeps predictions, not cells: then the predictions are
    read (from RUN, else from the folders in `also`, e.g. the 7-task results whose base and
    oracle a 5-task table reused) and each rescored toolkit metric must equal the one the
    summary holds, so a prediction file that does not belong to it is refused.
    """
    path = summary_path(run_dir)
    if not path.is_file():
        raise UserError(f"{path} is missing: evaluate the run first (full_evaluation.py --output-dir {run_dir})")
    old = json.loads(path.read_text())
    tasks, methods = old["tasks"], list(old["methods"])
    cells = {}
    for m in methods:
        for t in tasks:
            cp = cell_path(run_dir, m, t)
            if cp.is_file():
                cells[(m, t)] = json.loads(cp.read_text())
            else:        # a committed result folder keeps predictions, not cells
                found = [pp for r in (run_dir, *also) if (pp := predictions_path(r, m, t)).is_file()]
                if not found:
                    raise UserError(f"{run_dir}: no cell or predictions of method {m} on task {t} "
                                    f"(looked in {', '.join(str(r) for r in (run_dir, *also))})")
                records = [json.loads(x) for x in found[0].read_text(encoding="utf-8").splitlines() if x.strip()]
                per = old["methods"][m]["per_task"][t]
                cell = rescored_cell(t, records, per["seconds"], per.get("tokens_per_s"))
                result = cell["result"]
                if not math.isclose(result["score"], per["score"], rel_tol=1e-9, abs_tol=1e-12):
                    raise UserError(f"{found[0]}: rescored {per['primary']} {result['score']} is not the "
                                    f"summary's {per['score']} (predictions of another run?)")
                cells[(m, t)] = cell
    return old, cells


def rescore(run_dir: Path, protocols: Sequence[str] = ("toolkit", "study"), also: Sequence[Path] = ()) -> list[Path]:
    """Every protocol's tables of a run folder from its cells' saved predictions, without
    generating: the methods, tasks and meta of RUN/eval/summary.json, each cell rescored
    (`load_cells`: a committed folder's predictions must reproduce its summary)."""
    import copy
    old, cells = load_cells(run_dir, also)
    tasks, methods = old["tasks"], list(old["methods"])
    written = []
    for protocol in protocols:
        meta = copy.deepcopy(old["meta"])
        meta["rescored"] = {"by": "python -m src.evaluation rescore", "git_commit": git_commit(),
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        written += write_results(run_dir, summarize(old["model"], tasks, methods, cells, meta, protocol))
    return written


def main(argv=None) -> None:
    """python -m src.evaluation rescore RUN [RUN ...] [--scoring toolkit study]"""
    from src.cli import command_parser
    p = command_parser("python -m src.evaluation", "Rescore evaluated run folders from their saved predictions, "
                       "without generating.", debug=False)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rescore", help="write each protocol's summary and tables from the saved predictions")
    r.add_argument("runs", nargs="+", metavar="RUN")
    r.add_argument("--scoring", nargs="+", default=list(task_registry.SCORING), choices=task_registry.SCORING)
    r.add_argument("--also", nargs="+", default=[], metavar="OTHER_RUN",
                   help="folders whose predictions fill in cells a run reused (e.g. its base and oracle)")
    r.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    for run in args.runs:
        for path in rescore(Path(run), args.scoring, [Path(a) for a in args.also]):
            print(f"wrote {path}")


if __name__ == "__main__":
    from src.errors import run_main
    sys.exit(run_main(main))
