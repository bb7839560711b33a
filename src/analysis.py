"""Analysis of run folders: the cosine similarity of the tasks' LoRA deltas, and the plots.

    python -m src.analysis RUN [RUN ...] [--out DIR]

For each RUN, writes RUN/analysis/cosine.json (from RUN/adapters/<task>) and, under RUN/plots/:
    cosine_overall.png      task x task cosine of the whole LoRA deltas (the study's heatmap)
    cosine_per_layer.png    the same per decoder layer, one row per task pair
    multitask_score.png     oracle-normalised multitask score per method (RUN/eval/summary.json)
    per_task_metrics.png    each task's raw primary metric per method
    routing_<method>.png    each dynamic method (MoA, Arrow): true task x expert, from summary.json's
                            routing table (every plot is drawn from summary.json, nothing recomputed)
    routing_<method>_per_layer.png   expert share per layer on the prompts (token routers: mean gate;
                                     MoA: the share of prompts on which each layer chose the expert)
With several RUNs (model sizes, task counts: the study's figures 3 and 4) also
    comparison_multitask.png, comparison_per_task.png   under --out (default: the first RUN/plots)

The cosine is computed from the factors, never forming a dense [out, in] delta:
    <s1 B1 A1, s2 B2 A2>_F = s1 s2 trace((B1^T B2)(A2 A1^T)) = s1 s2 sum((B1^T B2) * (A1 A2^T))
which costs O(r^2 (in + out)) per module. Sums over modules give the overall and per-layer
inner products and norms.

Plotting reads result files only (JSON), imports no torch, and is what the notebook
(visualize_lora.ipynb) calls: each plot_* function returns a matplotlib Figure.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt

from src.errors import UserError, run_main
from src.runs import adapters_dir, analysis_dir, atomic_path, plots_dir, summary_path

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# ------------------------------------------------------------------------- cosine (math)

def layer_of(module: str) -> int | None:
    """Decoder layer index of a module name (model.layers.3.self_attn.q_proj -> 3), or None."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def factor_inner(a1, b1, s1: float, a2, b2, s2: float) -> float:
    """<s1 B1 A1, s2 B2 A2>_F from the factors (A [r, in], B [out, r]), in float64.

    trace((B1^T B2)(A2 A1^T)) written as the sum of an elementwise product of two small
    [r1, r2] matrices.
    """
    a1, b1, a2, b2 = (t.double() for t in (a1, b1, a2, b2))
    return float(s1 * s2 * ((b1.T @ b2) * (a1 @ a2.T)).sum())


def cosine_matrices(adapters: Mapping[str, object]) -> dict:
    """Cosine similarity between every pair of adapters' deltas: overall, per layer, per module type.

    Args:
        adapters: {task: src.lora.Adapter}.
    Returns:
        {"tasks": [...], "overall": [[cos]], "per_layer": {layer: [[cos]]},
         "per_module_type": {"q_proj": [[cos]], ...}, "norms": {task: Frobenius norm}}.
        Inner products use the modules both adapters have; norms all of each one's modules.
    """
    tasks = list(adapters)
    groups: dict[str, dict] = {"overall": {}, "per_layer": {}, "per_module_type": {}}

    def keys(module: str):
        yield "overall", None
        layer = layer_of(module)
        if layer is not None:
            yield "per_layer", str(layer)
        yield "per_module_type", module.rsplit(".", 1)[-1]

    # inner[kind][key][i][j]
    acc: dict[str, dict[str, list[list[float]]]] = {k: {} for k in groups}
    n = len(tasks)
    for i, ti in enumerate(tasks):
        ai = adapters[ti]
        for j in range(i, n):
            aj = adapters[tasks[j]]
            for module in ai.factors:
                if module not in aj.factors:
                    continue
                (a1, b1), (a2, b2) = ai.factors[module], aj.factors[module]
                v = factor_inner(a1, b1, ai.scales[module], a2, b2, aj.scales[module])
                for kind, key in keys(module):
                    mat = acc[kind].setdefault(key, [[0.0] * n for _ in range(n)])
                    mat[i][j] += v
                    if i != j:
                        mat[j][i] += v

    def normalise(mat: list[list[float]]) -> list[list[float]]:
        d = [math.sqrt(max(mat[k][k], 0.0)) for k in range(n)]
        return [[mat[a][b] / (d[a] * d[b]) if d[a] > 0 and d[b] > 0 else float("nan")
                 for b in range(n)] for a in range(n)]

    overall = acc["overall"][None]
    return {
        "tasks": tasks,
        "overall": normalise(overall),
        "per_layer": {k: normalise(v) for k, v in sorted(acc["per_layer"].items(), key=lambda kv: int(kv[0]))},
        "per_module_type": {k: normalise(v) for k, v in sorted(acc["per_module_type"].items())},
        "norms": {t: math.sqrt(max(overall[k][k], 0.0)) for k, t in enumerate(tasks)},
    }


def run_cosines(run_dir: Path) -> dict:
    """cosine_matrices of RUN/adapters/<task> (every task folder holding an adapter; the multitask
    adapter, RUN/adapters/_multitask, is no task), saved to RUN/analysis/cosine.json."""
    from src.lora import load_adapter
    from src.runs import task_adapters, write_json_atomic

    folder = adapters_dir(run_dir)
    tasks = _task_order(run_dir, task_adapters(run_dir))
    if len(tasks) < 1:
        raise UserError(f"{folder}: no adapters to compare")
    adapters = {t: load_adapter(folder / t) for t in tasks}
    result = cosine_matrices(adapters)
    result.update(adapters_info(folder, adapters))
    write_json_atomic(analysis_dir(run_dir) / "cosine.json", result)
    return result


def adapters_info(folder: Path, adapters: Mapping[str, object]) -> dict:
    """What the compared adapters are, for the plots' titles: {"model": their base model(s),
    "rank": their LoRA rank(s), "train_examples": {task: training examples}} (keys that
    the adapters' configs and training_config.json do not give are left out)."""
    out: dict = {}
    models = sorted({str(a.base_model) for a in adapters.values() if getattr(a, "base_model", None)})
    if models:
        out["model"] = ", ".join(models)
    ranks = sorted({a.config["r"] for a in adapters.values() if isinstance(getattr(a, "config", None), dict)
                    and isinstance(a.config.get("r"), int)})
    if ranks:
        out["rank"] = "/".join(str(r) for r in ranks)
    n = {}
    for t in adapters:
        info = Path(folder) / t / "training_config.json"
        try:
            n_train = json.loads(info.read_text()).get("n_train") if info.is_file() else None
        except (OSError, json.JSONDecodeError):
            n_train = None
        if isinstance(n_train, int):
            n[t] = n_train
    if n:
        out["train_examples"] = n
    return out


def _task_order(run_dir: Path, names: list[str]) -> list[str]:
    """Tasks in the evaluation's order when there is one, else the registry's, else by name."""
    order: list[str] = []
    summary = summary_path(run_dir)
    if summary.is_file():
        order = json.loads(summary.read_text()).get("tasks", [])
    from src.tasks import TASKS
    order = [*order, *TASKS]
    rank = {t: i for i, t in enumerate(dict.fromkeys(order))}
    return sorted(names, key=lambda t: (rank.get(t, len(rank)), t))


# ------------------------------------------------------------------------- loading results

def load_summary(run_dir: Path) -> dict:
    path = summary_path(run_dir)
    if not path.is_file():
        raise UserError(f"{path} is missing: run full_evaluation.py --output-dir {run_dir} first")
    return json.loads(path.read_text())


def load_cosines(run_dir: Path) -> dict | None:
    path = analysis_dir(run_dir) / "cosine.json"
    return json.loads(path.read_text()) if path.is_file() else None


def routing_methods(summary: dict) -> list[str]:
    """The methods whose routing summary.json tabulates (the dynamic ones that route)."""
    return list(summary.get("routing") or {})


def routing_confusion(summary: dict, method: str) -> dict | None:
    """How `method` routed each task's examples, from summary.json's routing table (what evaluation
    wrote from the cells' records: `evaluation.routing_summary`).

    Per-sequence routers: {"true", "routed", "counts": [[n]]}. Per-token routers: {"true", "routed"
    (the experts), "share": [[mean share]], "counts": [[examples]]}. None when the method did not route.
    """
    table = (summary.get("routing") or {}).get(method)
    if not table:
        return None
    token = table["kind"] == "token"
    rows = {t: r for t, r in (table["share"] if token else table["confusion"]).items() if r}
    if not rows:
        return None
    tasks = summary.get("tasks") or []
    true = [t for t in tasks if t in rows] + sorted(t for t in rows if t not in tasks)
    routed = list(dict.fromkeys([*[t for t in true if any(t in r for r in rows.values())],
                                 *sorted({r for row in rows.values() for r in row})]))
    out = {"method": method, "true": true, "routed": routed, "model": summary.get("model")}
    if token:
        n = {t: summary["methods"][method]["per_task"][t]["n"] for t in true}
        out["share"] = [[rows[t].get(r, 0.0) for r in routed] for t in true]
        out["counts"] = [[n[t]] * len(routed) for t in true]
    else:
        out["counts"] = [[int(rows[t].get(r, 0)) for r in routed] for t in true]
    return out


def _model_name(model) -> str:
    return str(model or "?").rstrip("/").split("/")[-1]


def _size_range(sizes) -> str | None:
    """"12" or "12-100" from a collection of sizes (None when there is none)."""
    sizes = sorted({int(n) for n in sizes if n})
    if not sizes:
        return None
    return f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def examples_per_task(summary: dict) -> str | None:
    """Evaluated examples per task ("12", or "12-100" when tasks differ) from summary.json."""
    return _size_range(c.get("n") for e in summary.get("methods", {}).values()
                       for c in (e.get("per_task") or {}).values())


def run_label(summary: dict) -> str:
    """"SmolLM2-135M, 7 tasks, 100 examples per task, toolkit scoring": what a plot of this
    summary shows."""
    parts = [_model_name(summary.get("model")), f"{len(summary.get('tasks', []))} tasks"]
    n = examples_per_task(summary)
    if n:
        parts.append(f"{n} examples per task")
    parts.append(f"{summary.get('scoring', 'toolkit')} scoring")
    return ", ".join(parts)


def cosine_label(cos: dict) -> str:
    """"smollm2-135m LoRAs (r 8), 5 tasks, 32 training examples per task": what a cosine
    plot shows (cosine.json written before these keys existed gives just the tasks)."""
    parts = []
    if cos.get("model"):
        parts.append(f"{_model_name(cos['model'])} LoRAs" + (f" (r {cos['rank']})" if cos.get("rank") else ""))
    parts.append(f"{len(cos.get('tasks', []))} tasks")
    n = _size_range((cos.get("train_examples") or {}).values())
    if n:
        parts.append(f"{n} training examples per task")
    return ", ".join(parts)


# ------------------------------------------------------------------------- plots

def _colors(methods: Sequence[str]) -> list:
    """Oracle dark grey, base light grey, the other methods tab10's colours without its grey."""
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]
    special = {"oracle": "0.25", "base": "0.7"}
    out, k = [], 0
    for m in methods:
        if m in special:
            out.append(special[m])
        else:
            out.append(palette[k % len(palette)])
            k += 1
    return out


def _heatmap(ax, mat, labels_y, labels_x, vmin, vmax, cmap="RdBu_r", fmt="{:.2f}", annotate=True):
    import numpy as np

    arr = np.array(mat, dtype=float)
    im = ax.imshow(arr, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=45, ha="right")
    ax.set_yticks(range(len(labels_y)), labels_y)
    if annotate:
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                if not np.isnan(arr[i, j]):
                    ax.text(j, i, fmt.format(arr[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if abs(arr[i, j]) > 0.6 * max(abs(vmin), abs(vmax)) else "black")
    return im


def _off_diagonal_max(mat) -> float | None:
    """The largest |value| off the diagonal (NaN skipped), None when there is none."""
    vals = [abs(v) for i, row in enumerate(mat) for j, v in enumerate(row) if i != j and not math.isnan(v)]
    return max(vals) if vals else None


def plot_cosine(cos: dict, title: str = "Cosine similarity of the tasks' LoRA deltas", label: str | None = None):
    """Task x task cosine of the whole deltas. The colour range is the largest |cos| off the
    diagonal (as in the per-layer plot): near-orthogonal deltas would all be white on a
    +-1 scale; the diagonal (1) lies beyond it."""
    tasks = cos["tasks"]
    off = _off_diagonal_max(cos["overall"])
    vmax = max(off, 1e-6) if off is not None else 1.0
    mat = [[float("nan") if i == j else v for j, v in enumerate(row)] for i, row in enumerate(cos["overall"])]
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")   # the diagonal (1 by definition): grey
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(tasks), 1.8 + 0.75 * len(tasks)))
    im = _heatmap(ax, mat, tasks, tasks, -vmax, vmax, cmap=cmap, fmt="{:.3f}" if vmax < 0.1 else "{:.2f}")
    for i in range(len(tasks)):
        ax.text(i, i, "1", ha="center", va="center", fontsize=8, color="0.3")
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine")
    ax.set_title(f"{title}\n{label or cosine_label(cos)}\n(colour range \u00b1{vmax:.3f} off the diagonal)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_cosine_per_layer(cos: dict, label: str | None = None):
    """Rows: task pairs; columns: layers; colour scaled to the largest |cos| off the diagonal."""
    tasks, layers = cos["tasks"], list(cos["per_layer"])
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    if not pairs or not layers:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.text(0.5, 0.5, "needs at least two tasks and layered module names", ha="center", va="center")
        ax.axis("off")
        return fig
    mat = [[cos["per_layer"][layer][i][j] for layer in layers] for i, j in pairs]
    vmax = max([abs(v) for row in mat for v in row if not math.isnan(v)] + [1e-6])
    fig, ax = plt.subplots(figsize=(min(max(6.0, 3 + 0.45 * len(layers)), 16), max(2.4, 1.5 + 0.35 * len(pairs))))
    im = _heatmap(ax, mat, [f"{tasks[i]} / {tasks[j]}" for i, j in pairs], layers, -vmax, vmax,
                  fmt="{:.3f}", annotate=len(layers) <= 12)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine")
    ax.set_title(f"Cosine similarity per layer: {label or cosine_label(cos)}\n(colour range \u00b1{vmax:.3f})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_multitask(summary: dict, title: str | None = None):
    methods = list(summary["methods"])
    vals = [summary["methods"][m]["multitask_score"] for m in methods]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.8 * len(methods)), 4.0))
    heights = [v if v is not None else 0.0 for v in vals]
    ivs = [summary["methods"][m].get("multitask_interval") for m in methods]
    err = None
    if any(ivs):   # bootstrap 95% intervals as error bars
        err = [[h - iv[0] if iv else 0.0 for h, iv in zip(heights, ivs)],
               [iv[1] - h if iv else 0.0 for h, iv in zip(heights, ivs)]]
    if err:
        err = [[max(x, 0.0) for x in side] for side in err]   # a bootstrap interval need not hold the point
    bars = ax.bar(methods, heights, color=_colors(methods), yerr=err, capsize=3 if err else 0,
                  error_kw={"elinewidth": 0.8, "ecolor": "0.2"})
    tops = [h + (err[1][i] if err else 0.0) for i, h in enumerate(heights)]
    for b, v, top in zip(bars, vals, tops):
        ax.text(b.get_x() + b.get_width() / 2, top, "n/a" if v is None else f"{v:.3f}",
                ha="center", va="bottom", fontsize=9)
    ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_ylim(0, max(tops + [1.0]) * 1.12)
    ax.set_ylabel("multitask score (vs oracle)", fontsize=10)
    ax.set_title(title or f"Multitask score (mean of method / oracle over tasks)\n{run_label(summary)}",
                 fontsize=11)
    ax.tick_params(axis="x", rotation=30, labelsize=9)
    fig.tight_layout()
    return fig


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) for n panels, rows filled as evenly as possible (5 -> 2 x 3, 7 -> 2 x 4)."""
    rows = max(1, math.ceil(n / max_cols))
    return rows, max(1, math.ceil(n / rows))


def _value(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def plot_per_task(summary: dict):
    """One panel per task (the metrics' scales differ): raw primary metric per method, its
    value on each bar (a score of 0 gets its label and a mark on the axis)."""
    tasks, methods = summary["tasks"], list(summary["methods"])
    rows, cols = _grid(len(tasks), 4 if len(methods) <= 8 else 2)
    fig, axes = plt.subplots(rows, cols, figsize=(0.5 + (0.55 * len(methods) + 1.0) * cols, 0.6 + 3.6 * rows),
                             squeeze=False)
    colors = _colors(methods)
    vertical = len(methods) > 6        # value labels upright once they would overlap side by side
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        cells = [summary["methods"][m]["per_task"][t] for m in methods]
        vals = [c["score"] for c in cells]
        err = None
        if all(c.get("interval") for c in cells):   # bootstrap 95% intervals
            err = [[v - c["interval"][0] for v, c in zip(vals, cells)], [c["interval"][1] - v for v, c in zip(vals, cells)]]
            err = [[max(x, 0.0) for x in side] for side in err]
        xs = list(range(len(methods)))
        ax.bar(xs, vals, color=colors, yerr=err, capsize=2 if err else 0,
               error_kw={"elinewidth": 0.7, "ecolor": "0.2"})
        tops = [v + (err[1][i] if err else 0.0) for i, v in enumerate(vals)]
        for i, (v, top) in enumerate(zip(vals, tops)):
            if v == 0:      # no bar to see: mark the zero on the axis
                ax.plot(i, 0, marker="_", markersize=12, markeredgewidth=3, color=colors[i], clip_on=False, zorder=3)
            ax.text(i, max(top, 0.0), " " + _value(v) if vertical else _value(v), ha="center", va="bottom",
                    fontsize=8.5, rotation=90 if vertical else 0)
        top = max(tops + [0.0])
        ax.set_ylim(0, (top if top > 0 else 1.0) * (1.4 if vertical else 1.15))
        ax.set_xticks(xs, methods, rotation=60, ha="right", fontsize=9)
        ax.tick_params(axis="y", labelsize=9)
        ax.set_title(f"{t} ({cells[0]['primary']}, n={cells[0].get('n', '?')})", fontsize=11)
    for k in range(len(tasks), rows * cols):     # no empty panels
        fig.delaxes(axes[k // cols][k % cols])
    fig.suptitle(f"Raw primary metric per task and method: {run_label(summary)}", fontsize=12)
    fig.tight_layout()
    return fig


def plot_routing(conf: dict, label: str | None = None):
    """Rows: the true task; columns: the experts. A per-sequence router's share of examples
    routed to each expert, or a per-token router's mean gate share over the prompts' tokens.
    `label` (default: the model, when known) and the examples per task go in the title."""
    import numpy as np

    counts = np.array(conf["counts"], dtype=float)
    token = "share" in conf
    share = np.array(conf["share"]) if token else counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(4.5, 2.5 + 0.8 * len(conf["routed"])), max(3.0, 1.6 + 0.6 * len(conf["true"]))))
    im = _heatmap(ax, share, conf["true"], conf["routed"], 0, 1, cmap="Blues", annotate=False)
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            cell = f"{share[i, j]:.2f}" if token else f"{share[i, j]:.2f}\n({int(counts[i, j])})"
            ax.text(j, i, cell, ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xlabel("expert (mean gate share over prompt tokens and layers)" if token else "routed to expert")
    ax.set_ylabel("true task")
    own = [share[i, conf["routed"].index(t)] for i, t in enumerate(conf["true"]) if t in conf["routed"]]
    name = conf.get("method", "router")
    what = "mean own-expert share" if token else "accuracy"
    n = _size_range(row[0] if token else sum(row) for row in conf["counts"])
    about = label or ", ".join(x for x in (_model_name(conf["model"]) if conf.get("model") else None,
                                           f"{len(conf['true'])} tasks",
                                           f"{n} examples per task" if n else None) if x)
    ax.set_title(f"{name} routing ({what} {np.mean(own) if own else float('nan'):.3f})\n{about}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the row")
    fig.tight_layout()
    return fig


def plot_routing_per_layer(table: dict, method: str = "router", label: str | None = None):
    """A router's expert share per layer (mean gate of a token router; share of prompts of MoA):
    one panel per true task (layers x experts),
    from summary.json's routing table."""
    import numpy as np

    tasks = list(table["per_layer"])
    experts, layers = table["experts"], table["layers"]
    cols = min(len(tasks), 4)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.5 + (0.45 * len(experts) + 1.2) * cols,
                                                  0.8 + (0.09 * len(layers) + 0.8) * rows), squeeze=False)
    short = [layer_label(n) for n in layers]
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        arr = np.array(table["per_layer"][t], dtype=float)                # [layers, experts]
        im = ax.imshow(arr, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
        step = max(1, len(layers) // 12)
        ax.set_yticks(range(0, len(layers), step), short[::step], fontsize=6)
        ax.set_title(t, fontsize=9)
    for k in range(len(tasks), rows * cols):
        fig.delaxes(axes[k // cols][k % cols])
    sequence = table.get("kind") == "sequence"      # MoA: each layer's choice on the prompt
    fig.colorbar(im, ax=list(fig.axes), fraction=0.02,
                 label="share of prompts on which the layer chose the expert" if sequence else "mean gate share")
    what = "the layer's choice on each prompt" if sequence else "prompt tokens"
    fig.suptitle(f"{method}: expert share per layer ({what})" + (f"\n{label}" if label else ""), fontsize=10)
    return fig


def layer_label(module: str) -> str:
    """model.layers.3.self_attn.q_proj -> 3.q_proj"""
    layer = layer_of(module)
    return f"{layer}.{module.rsplit('.', 1)[-1]}" if layer is not None else module


def plot_comparison(summaries: Sequence[dict], labels: Sequence[str] | None = None):
    """Multitask score per method, one bar per run (the study's figures 3 and 4)."""
    labels = list(labels or [run_label(s) for s in summaries])
    methods = list(dict.fromkeys(m for s in summaries for m in s["methods"]))
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(methods) * max(1, len(summaries) / 2), 3.8))
    for k, (s, lab) in enumerate(zip(summaries, labels)):
        xs = [i + (k - (len(summaries) - 1) / 2) * width for i in range(len(methods))]
        vals = [(s["methods"].get(m) or {}).get("multitask_score") for m in methods]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=lab)
    ax.set_xticks(range(len(methods)), methods, rotation=30)
    ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_ylabel("multitask score")
    ax.set_title("Multitask score across runs", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_comparison_per_task(summaries: Sequence[dict], labels: Sequence[str] | None = None):
    """Per task, each method's score relative to the oracle, one bar per run."""
    labels = list(labels or [run_label(s) for s in summaries])
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"]))
    methods = [m for m in dict.fromkeys(m for s in summaries for m in s["methods"]) if m != "oracle"]
    cols = min(len(tasks), 4)
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1 + (0.5 * len(methods) + 1) * cols, 3.2 * rows), squeeze=False)
    width = 0.8 / len(summaries)
    for n, t in enumerate(tasks):
        ax = axes[n // cols][n % cols]
        for k, (s, lab) in enumerate(zip(summaries, labels)):
            xs = [i + (k - (len(summaries) - 1) / 2) * width for i in range(len(methods))]
            vals = [((s["methods"].get(m) or {}).get("per_task", {}).get(t) or {}).get("relative") for m in methods]
            ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=lab)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
        ax.set_title(f"{t}: method / oracle", fontsize=9)
    for n in range(len(tasks), rows * cols):
        fig.delaxes(axes[n // cols][n % cols])
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Each task's score relative to its oracle, across runs (legend: model, tasks, examples per task)",
                 fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------- the command

def search_records(run_dir: Path, methods: Sequence[str] | None = None) -> list[dict]:
    """The searches of a run's build steps, from RUN/merged/*/merge_info.json (only the methods
    of its summary when `methods` is given): LoraHub's weight searches
    ({"method", "target", "weights", "trace", ...}) and --merge-scale auto's scale searches
    ({"method", "grid", "losses", "chosen"})."""
    root = Path(run_dir) / "merged"
    out = []
    for info in sorted(root.glob("**/merge_info.json")) if root.is_dir() else []:
        method = info.relative_to(root).parts[0]
        if methods is not None and method not in methods:
            continue
        try:
            rec = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        target = (rec.get("recipe") or {}).get("target")
        if isinstance(rec.get("search"), dict) and "trace" in rec["search"]:
            out.append({"method": method, "target": target, "kind": "weights", **rec["search"]})
        if isinstance(rec.get("scale_search"), dict):
            out.append({"method": method, "target": None, "kind": "scale", **rec["scale_search"]})
    return out


def plot_searches(records: Sequence[dict], label: str | None = None):
    """Left: each LoraHub search's objective per candidate and its best so far; right: the
    weights it found per adapter (and the scale searches' loss per grid point)."""
    weights = [r for r in records if r["kind"] == "weights"]
    scales = [r for r in records if r["kind"] == "scale"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in weights:
        obj = [t["objective"] for t in r["trace"]]
        best = [min(obj[:i + 1]) for i in range(len(obj))]
        label = r["method"] + (f" ({r['target']})" if r["target"] else "")
        axes[0].plot(range(1, len(obj) + 1), obj, ".", alpha=0.4)
        axes[0].plot(range(1, len(obj) + 1), best, label=label)
    axes[0].set(xlabel="candidate", ylabel="shot loss + L1", title="LoraHub search (best so far)")
    if weights:
        axes[0].legend(fontsize=8)
        names = list(weights[0]["weights"])
        width = 0.8 / len(weights)
        for i, r in enumerate(weights):
            axes[1].bar([j + i * width for j in range(len(names))], [r["weights"].get(n, 0.0) for n in names],
                        width, label=r["method"] + (f" ({r['target']})" if r["target"] else ""))
        axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30)
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].set(title="weights found per adapter")
    for r in scales:
        axes[2].plot(r["grid"], r["losses"], marker="o", label=f"{r['method']} (chose {r['chosen']:g})")
    axes[2].set(xlabel="scaling coefficient", ylabel="shot loss", title="--merge-scale auto")
    if scales:
        axes[2].legend(fontsize=8)
    else:                                   # no --merge-scale auto in this run: no empty panel
        fig.delaxes(axes[2])
    if not weights:
        fig.delaxes(axes[0])
        fig.delaxes(axes[1])
    if label:
        fig.suptitle(f"Searches of the build steps: {label}", fontsize=10)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    """The figure as a PNG, written atomically (a full disk leaves the previous plot, not half a new one)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_run(run_dir: Path, cosines: bool = True) -> list[Path]:
    """Every plot of one run folder whose inputs exist; returns the PNG paths."""
    run_dir = Path(run_dir)
    out = plots_dir(run_dir)
    written = []
    if cosines and adapters_dir(run_dir).is_dir():
        cos = run_cosines(run_dir)
        written.append(_save(plot_cosine(cos), out / "cosine_overall.png"))
        written.append(_save(plot_cosine_per_layer(cos), out / "cosine_per_layer.png"))
    if summary_path(run_dir).is_file():
        summary = load_summary(run_dir)
        written.append(_save(plot_multitask(summary), out / "multitask_score.png"))
        written.append(_save(plot_per_task(summary), out / "per_task_metrics.png"))
        for method in routing_methods(summary):
            conf = routing_confusion(summary, method)
            if conf:
                written.append(_save(plot_routing(conf, run_label(summary)), out / f"routing_{method}.png"))
            table = summary.get("routing", {}).get(method, {})
            if table.get("per_layer"):
                written.append(_save(plot_routing_per_layer(table, method, run_label(summary)),
                                     out / f"routing_{method}_per_layer.png"))
        searches = search_records(run_dir, summary["methods"])
        if searches:
            written.append(_save(plot_searches(searches, run_label(summary)), out / "searches.png"))
    return written


def main(argv=None):
    from src.cli import command_parser
    parser = command_parser("python -m src.analysis", __doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    parser.add_argument("--out", default=None, help="folder for the comparison plots (default: the first RUN/plots)")
    parser.add_argument("--no-cosine", action="store_true", help="skip the cosine analysis (needs torch)")
    args = parser.parse_args(argv)
    plt.switch_backend("Agg")  # files only; the notebook keeps its inline backend
    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not r.is_dir():
            raise UserError(f"run folder {r} does not exist")
        if not summary_path(r).is_file() and not adapters_dir(r).is_dir():
            raise UserError(f"{r}: neither RUN/eval/summary.json nor RUN/adapters/: nothing to analyse")
    for r in runs:
        for p in plot_run(r, cosines=not args.no_cosine):
            print(p)
    if len(runs) > 1:
        summaries = [load_summary(r) for r in runs]
        out = Path(args.out) if args.out else plots_dir(runs[0])
        print(_save(plot_comparison(summaries), out / "comparison_multitask.png"))
        print(_save(plot_comparison_per_task(summaries), out / "comparison_per_task.png"))


if __name__ == "__main__":
    sys.exit(run_main(main))
