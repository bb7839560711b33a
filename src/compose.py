"""Every way of combining the task adapters, as one registry that evaluation loops over.

This module is the protocol only: it names no system. Each system's entries live in its own
module (src/moa.py, src/arrow.py, src/merge.py, ...), and src/systems.py is the one list that
registers them; import it (or anything that does, as full_evaluation.py) to see every method.

A method is one `Method` entry. It declares
  - `family`: what kind of system it is, for tables and drivers (FAMILIES), and `summary`, its
    one-line description in the README's table;
  - `kind`: "none" (the base model), "static" (one adapter folded into the weights: the
    oracle, every merge, later searches and generated adapters) or "dynamic" (a router over
    the experts: MoA, Arrow, SMILE, LoRA-Mixer, retrieval);
  - `configs`: the option dataclasses it reads (the evaluation CLI is generated from them);
  - `check(env)`: what it needs from the run folder, as one UserError naming what is missing;
  - `adapter_tasks(env)`: the tasks whose RUN/adapters/<task> it reads;
  - `fingerprint(env, task)`: what its result on `task` depends on, beyond the model, data and
    generation settings every cell records (a cell is reused only when this matches);
  - `build(env)`: work done once and cached in the run folder (a merge), returned as `Built`;
  - `draws(env)`: None, or one entry per seeded draw (random_merge): the cell then pools one
    evaluation per draw, each prepared with `prepare(model, env, task, draw=i)`;
  - `prepare(model, env, task)`: a context that sets the model up for `task` and restores it
    on exit, yielding a router for dynamic methods (None otherwise).

Adding a method is one module (its math, then its `Method` subclass) and one line in
src/systems.py: see docs/compose.md for a worked example. Routers yielded by dynamic methods follow one protocol:
`session(experts=None, positions=None, prompt_mask=None)` (a context per batch),
`routing_records()` (per sequence: {"routed_task": ...} or {"expert_share": {...}}), `kind`
("sequence" or "token"), optionally `layer_shares()` ([layers, batch, experts]) and `remove()`.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from src import runs, stages
from src.errors import UserError
from src.lora import Adapter, folded, load_adapter
from src.tasks import load_capped, load_examples, shuffled

KINDS = ("none", "static", "dynamic")
FAMILIES = ("baseline", "trained router", "zero-shot router", "search", "merge", "generated")


# --------------------------------------------------------------------------- the environment

@dataclass
class Env:
    """What a method sees: the run folder, the evaluated tasks, the options, the adapters."""

    run_dir: Path
    tasks: list[str]
    options: dict[type, object] = field(default_factory=dict)   # config class -> instance
    seed: int = 0
    force: bool = False
    adapters: dict[str, Adapter] = field(default_factory=dict)   # task -> RUN/adapters/<task>
    digests: dict[str, str] = field(default_factory=dict)        # task -> sha256 of its files
    built: dict[str, object] = field(default_factory=dict)       # method -> what build() made
    model_name: str = ""                                         # what the model was given as
    dtype: str = ""
    model_loader: Callable[[], tuple] | None = None              # () -> (model, tokenizer), called once
    data: dict = field(default_factory=dict)                     # tasks.load_capped's data, data_dir, hub_nli
    eval_ids: dict[str, set] = field(default_factory=dict)       # task -> ids evaluated (shots never take them)
    _model: tuple | None = field(default=None, repr=False)
    _shots: dict = field(default_factory=dict, repr=False)

    def model(self) -> tuple:
        """(model, tokenizer), loaded on first use (a build step that needs it, or evaluation)."""
        if self._model is None:
            if self.model_loader is None:
                raise UserError("this step needs the base model, and none was given")
            self._model = self.model_loader()
        return self._model

    def shots(self, tasks: Sequence[str], n: int, flag: str = "--lorahub-shots") -> dict[str, list]:
        """{task: n training examples}: the seeded subset (seed `self.seed`) of the training split,
        never an evaluated example; the few examples LoraHub searches on, --merge-scale auto
        scores on and retrieval embeds (a smaller n takes a prefix of a larger one). More than the
        split holds is an error naming `flag`, the option that asked for n."""
        key = (tuple(tasks), n)
        if key not in self._shots:
            spec = {"data": "sample", "data_dir": None, "hub_nli": "multi_nli", **self.data}
            got = {}
            for t in tasks:
                if spec["data"] == "hub":    # the hub's train split is never evaluated on
                    got[t] = load_examples(t, "train", "hub", None, n, self.seed, spec["hub_nli"])
                    continue
                every = load_examples(t, "train", spec["data"], spec["data_dir"], None, self.seed)
                skip = self.eval_ids.get(t, set())
                left = [every[i] for i in shuffled(len(every), self.seed) if every[i].id not in skip]
                if len(left) < n:
                    raise UserError(f"{flag} {n}: the training split of task {t} holds only {len(left)} "
                                    f"examples that are not evaluated")
                got[t] = left[:n]
            self._shots[key] = got
        return self._shots[key]

    def opt(self, cls: type):
        if cls not in self.options:
            self.options[cls] = cls()
        return self.options[cls]

    def load_adapters(self, tasks: Sequence[str]) -> None:
        """RUN/adapters/<task> for every task not loaded yet, with its digest."""
        for t in tasks:
            if t not in self.adapters:
                folder = runs.adapter_dir(self.run_dir, t)
                self.adapters[t] = load_adapter(folder)
                self.adapters[t].name = t
                self.digests[t] = runs.adapter_digest(folder)


@dataclass
class Built:
    """The result of a build step: `value` for prepare(); `save` writes it (None when reused)."""

    value: object
    reused: bool
    save: Callable[[], object] | None = None
    where: Path | None = None
    seconds: float = 0.0          # the build step's wall time (search, generation, merge), saving included


# --------------------------------------------------------------------------- model selection

def selection_ids(run_dir: Path, tasks: Sequence[str]) -> dict[str, list[str]]:
    """{task: ids of the validation examples that chose a checkpoint}: every stage's record
    (`stages.selection_ids`: the adapters', the routers', the hypernetworks', the multitask
    adapter's `selection_ids`). Evaluation on the validation split leaves them out."""
    return stages.selection_ids(run_dir, tasks, _rebuilt_selection)


def _rebuilt_selection(info: dict) -> dict | None:
    """The ids of a record from before `selection_ids` was recorded: adapters and routers chose
    their checkpoints on the seeded validation subset of their data config, rebuilt here.
    (Hypernetwork and multitask records of that time either name theirs or used no example.)"""
    config = info.get("config") or {}
    if "T2LConfig" in config or "MultitaskConfig" in config:
        return None
    dc = config.get("DataConfig") or {}
    trained = [info["task"]] if "task" in info else list(info.get("tasks") or [])
    if not trained or dc.get("data") in (None, "hub"):
        return None
    data = load_capped(trained, "validation", dc["data"], dc.get("data_dir"), dc.get("eval_size"),
                       int(dc.get("seed", 0)), flag="(training) --eval-size")
    return {t: [ex.id for ex in exs] for t, exs in data.items()}


# --------------------------------------------------------------------------- the interface

class Method:
    name: str = ""
    kind: str = "static"
    family: str = "merge"                 # one of FAMILIES
    summary: str = ""                     # the README table's description; "" : the family
    vllm: bool | None = None              # the vLLM engine serves it; None: static kinds and base do
    groups: tuple[str, ...] = ()          # names that expand to this method in --methods
    configs: tuple[type, ...] = ()
    help: str = ""
    max_batch: int | None = None          # a method that must run at a smaller batch (the study's MoA: 1)

    def check(self, env: Env) -> None:
        missing = [t for t in self.adapter_tasks(env) if not runs.has_adapter(env.run_dir, t)]
        if missing:
            raise UserError(f"method {self.name} needs an adapter for every task: no adapter for "
                            f"task {', '.join(missing)} in {runs.adapters_dir(env.run_dir)} "
                            f"(train it with train_individual_loras.py)")

    def adapter_tasks(self, env: Env) -> list[str]:
        return list(env.tasks)

    def fingerprint(self, env: Env, task: str) -> dict:
        return {}

    def build(self, env: Env) -> Built | None:
        return None

    def check_model(self, model, env: Env) -> None:
        """Before any generation: what this method applies fits the loaded model."""

    def draws(self, env: Env) -> list[dict] | None:
        """None: a cell is one evaluation. A list: the cell pools one evaluation per draw (what
        each draw is, e.g. its weights), each set up by `prepare(model, env, task, draw=i)`; its
        result is their mean (`evaluation.pool_draws`), its records every draw's."""
        return None

    def prepare(self, model, env: Env, task: str) -> ContextManager:
        return nullcontext()

    def on_vllm(self) -> bool:
        """Whether the vLLM engine serves this method's cells (else they stay on the hf engine)."""
        return self.kind in ("static", "none") if self.vllm is None else self.vllm

    def served(self, model, tokenizer, env: Env, task: str, prompt_ids: Sequence[Sequence[int]],
               batch_size: int, draw: int | None = None) -> Served:
        """The vLLM engine's cell: a static method's adapter for every prompt (what `prepare` would fold
        in), the base model for base; a sequence router overrides this (MoA: src/moa.py)."""
        n = len(prompt_ids)
        if self.kind == "none":
            return Served([None] * n)
        ctx = self.prepare(model, env, task) if draw is None else self.prepare(model, env, task, draw=draw)
        if not isinstance(ctx, Static):
            raise UserError(f"method {self.name}: the vLLM engine serves static adapters; its prepare() gives none")
        return Served([ctx.adapter] * n)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name}: kind {method.kind!r} is not one of {KINDS}")
    if method.family not in FAMILIES:
        raise ValueError(f"method {method.name}: family {method.family!r} is not one of {FAMILIES}")
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def known_methods() -> list[str]:
    return list(REGISTRY)


def family(method: str) -> str:
    """The method's one-line description in tables: its summary, else its family."""
    m = REGISTRY[method]
    return m.summary or m.family


def groups() -> dict[str, list[str]]:
    """{"merges": [...], "all": every method, ...}: names that expand in --methods."""
    out: dict[str, list[str]] = {}
    for name, m in REGISTRY.items():
        for g in m.groups:
            out.setdefault(g, []).append(name)
    out["all"] = known_methods()
    return out


def resolve_methods(spec: str | Sequence[str]) -> list[str]:
    """Method names from "moa,concat,svd" (or a list), groups expanded. Returned in table
    order: oracle, the requested methods, base; `oracle` and `base` are always there (the
    score needs the oracle, the table shows the base)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    expand = groups()
    names: list[str] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if part in expand:
            names += expand[part]
        elif part:
            if part not in REGISTRY:
                raise UserError(f"unknown method '{part}'; known: {', '.join(known_methods())} "
                                f"(or {', '.join(repr(g) for g in expand)})")
            names.append(part)
    rest = [m for m in dict.fromkeys(names) if m not in ("oracle", "base")]
    return ["oracle", *rest, "base"]


def describe() -> str:
    """The registry as a table: name, kind, groups, what it is."""
    width = max(map(len, REGISTRY))
    lines = [f"{'method':<{width}}  {'kind':<7}  what it is"]
    for name, m in REGISTRY.items():
        lines.append(f"{name:<{width}}  {m.kind:<7}  {m.help}" + (f" [{', '.join(m.groups)}]" if m.groups else ""))
    lines.append("groups: " + "; ".join(f"{g} = {', '.join(ms)}" for g, ms in groups().items() if g != "all")
                 + "; all = every method")
    return "\n".join(lines)


def option_configs(methods: Sequence[str] | None = None) -> list[type]:
    """The option dataclasses of `methods` (default: every method), each once, in registry order."""
    out: list[type] = []
    for name in methods or known_methods():
        for cls in REGISTRY[name].configs:
            if cls not in out:
                out.append(cls)
    return out


def check_all(methods: Sequence[str], env: Env) -> None:
    """Every method's inputs exist, then every adapter they read is loaded (and digested)."""
    for m in methods:
        REGISTRY[m].check(env)
    env.load_adapters(list(dict.fromkeys(t for m in methods for t in REGISTRY[m].adapter_tasks(env))))


def build_all(methods: Sequence[str], env: Env) -> dict[str, Built]:
    """Each method's build step; new results are saved only when every build succeeded (a
    method that cannot be built fails before anything is written)."""
    built = {}
    for m in methods:
        t0 = time.perf_counter()
        if (b := REGISTRY[m].build(env)) is not None:
            b.seconds = time.perf_counter() - t0
            built[m] = b
    for b in built.values():
        if b.save is not None:
            t0 = time.perf_counter()
            b.value = b.save()
            b.seconds += time.perf_counter() - t0
    env.built.update({m: b.value for m, b in built.items()})
    return built


def fingerprint(method: str, task: str, env: Env, common: dict) -> dict:
    """A cell's fingerprint: method, task, what every cell depends on, and the method's own part."""
    return {"method": method, "task": task, **common, **REGISTRY[method].fingerprint(env, task)}


# --------------------------------------------------------------------------- base and oracle

class Static:
    """A static method's prepare: `adapter` folded into the weights for the block, no router. The
    vLLM engine reads `adapter` without entering it (`Method.served`)."""

    def __init__(self, model, adapter: Adapter):
        self.model, self.adapter, self._folded = model, adapter, None

    def __enter__(self):
        self._folded = folded(self.model, self.adapter)
        self._folded.__enter__()
        return None

    def __exit__(self, *exc):
        return self._folded.__exit__(*exc)


def static(model, adapter: Adapter) -> Static:
    return Static(model, adapter)


@dataclass
class Served:
    """How the vLLM engine serves a cell's prompts (src/engines.py): per prompt the one adapter it
    goes with (None: the base model), and the router's records and per-layer shares where a router
    chose them (as `evaluation.Generated` holds them)."""

    adapters: list
    routing: list[dict] | None = None
    layer_shares: list | None = None
    experts: list[str] | None = None       # layer_shares' columns
    layer_names: list[str] | None = None   # ... and rows


def reuse_saved(folder: Path, recipe: dict, force: bool) -> Adapter | None:
    """The adapter saved in `folder` when its merge_info.json records the same recipe (a merge,
    a search or a draw made before from the same inputs), else None."""
    info = folder / "merge_info.json"
    if force or not info.is_file():
        return None
    try:
        if json.loads(info.read_text()).get("recipe") == json.loads(json.dumps(recipe)):
            return load_adapter(folder)
    except json.JSONDecodeError:
        pass
    return None


class Base(Method):
    name, kind = "base", "none"
    family, summary = "baseline", "no adapter"
    help = "the base model, no adapter"

    def adapter_tasks(self, env):
        return []


class Oracle(Method):
    name = "oracle"
    family, summary = "baseline", "each task's own adapter"
    help = "each task's own adapter, folded into the weights (the score's reference)"

    def fingerprint(self, env, task):
        return {"adapter": env.digests[task]}

    def prepare(self, model, env, task):
        return static(model, env.adapters[task])
