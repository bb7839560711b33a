"""LoraHub: one weight per adapter, searched without gradients on a few training examples.

Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition",
COLM 2024 (arXiv 2307.13269); reference code: sail-sg/lorahub (`lorahub/algorithm.py`).

The merged adapter for weights w is

    factor space (LoraHub's):  A = sum_i w_i A_i,  B = sum_i w_i B_i,  dW = s B A
                               (our `weight_sum` with weights; equal ranks and scales)
    delta space (an option):   dW = sum_i w_i s_i B_i A_i  (our `concat` with weights)

and the search minimises, over w in [lower, upper]^N starting from w = 0 (the base model),

    loss(w) = mean target-token cross-entropy of the merged model on the shots
              + l1 * mean_i |w_i|                                  (LoraHub's regulariser)

with nevergrad's NGOpt (LoraHub's optimizer) for `budget` candidates. The first candidate
is the start w = 0, and the result is the best candidate seen, so the search never returns
a loss worse than its start (LoraHub takes nevergrad's recommendation, which may differ).

Each candidate costs one forward pass over the shots and nothing else: the merge is applied
as a low-rank side path on the adapted layers (`SidePath`, injected once, its factors
overwritten per candidate and removed at the end), so no weight is re-loaded or re-folded.
The same shots and side path serve `--merge-scale auto` (`scale_search`), which picks a merge's
scaling coefficient from a small grid.

Its control, `random_merge` (`draw_weights`): the same merge with weights drawn uniformly from
the same bounds instead of searched (Liu et al., arXiv 2602.12323, find adaptive merges gain
little from which LoRAs they combine, even randomly initialised ones doing about as well).

Pure math and search first (`compose_factors`, `l1_penalty`, `search`, `draw_weights`), then the
model side (`ShotLoss`, `SidePath`, `scale_search`).
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from src import merging, runs
from src.cli import check_positive_ints
from src.compose import Built, Env, Method, reuse_saved, static
from src.errors import UserError
from src.lora import Adapter, LoRALinear, check_adapter_fits, load_adapter, save_adapter, set_module
from src.tasks import data_hash

SPACES = ("factor", "delta")
OPTIMIZERS = ("NGOpt", "OnePlusOne", "CMA", "TwoPointsDE", "RandomSearch")


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


@dataclass
class LoraHubConfig:
    """LoraHub search (lorahub, lorahub_task) and the shots --merge-scale auto reads."""

    lorahub_budget: int = field(default=40, metadata={"help": "candidates evaluated by the search (LoraHub: 40)"})
    lorahub_shots: int = field(default=5, metadata={
        "help": "training examples per task the search (and --merge-scale auto) scores on; never evaluation data"})
    lorahub_bounds: tuple[float, ...] = field(default=(-1.5, 1.5), metadata={
        "help": "lower and upper bound of every weight (LoraHub: -1.5 1.5); the search starts at 0 (clipped into them)"})
    lorahub_l1: float = field(default=0.05, metadata={"help": "weight of the L1 term l1 * mean|w| (LoraHub: 0.05)"})
    lorahub_space: str = field(default="factor", metadata={
        "help": "factor: A = sum w A_i, B = sum w B_i (LoraHub); delta: dW = sum w dW_i (concat with weights)",
        "choices": SPACES})
    lorahub_optimizer: str = field(default="NGOpt", metadata={
        "help": "nevergrad optimizer", "choices": OPTIMIZERS})
    lorahub_leave_out: bool = field(default=False, metadata={
        "help": "lorahub_task: leave the target task's own adapter out of the pool (LoraHub's unseen-task setting)"})
    lorahub_batch_size: int = field(default=8, metadata={"help": "shots per forward pass"})
    lorahub_max_len: int = field(default=320, metadata={"help": "most tokens per shot (prompt cut on the left)"})

    def __post_init__(self):
        self.lorahub_bounds = tuple(float(b) for b in self.lorahub_bounds)
        for name in ("lorahub_budget", "lorahub_shots", "lorahub_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lorahub_max_len < 8:
            raise UserError(f"--lorahub-max-len must be at least 8, got {self.lorahub_max_len}")
        if len(self.lorahub_bounds) != 2:
            raise UserError(f"--lorahub-bounds takes two numbers (lower upper), got {len(self.lorahub_bounds)}")
        for b in self.lorahub_bounds:
            _finite("lorahub_bounds", b)
        _finite("lorahub_l1", self.lorahub_l1)
        lo, hi = self.lorahub_bounds
        if not lo < hi:
            raise UserError(f"--lorahub-bounds: the lower bound must be below the upper, got {lo} {hi}")
        if self.lorahub_l1 < 0:
            raise UserError(f"--lorahub-l1 must be >= 0, got {self.lorahub_l1}")

    def recipe(self) -> dict:
        """What a search result depends on (besides adapters, model, shots and seed)."""
        return {"budget": self.lorahub_budget, "shots": self.lorahub_shots, "bounds": list(self.lorahub_bounds),
                "l1": self.lorahub_l1, "space": self.lorahub_space, "optimizer": self.lorahub_optimizer,
                "max_len": self.lorahub_max_len}


@dataclass
class RandomMergeConfig:
    """random_merge: LoraHub's control, merges with random weights from --lorahub-bounds."""

    title = "Random merge options"

    random_draws: int = field(default=5, metadata={
        "help": "random_merge: weight vectors drawn (seeded by --seed), each merge evaluated on every task; the "
                "table shows the mean over draws, summary.json each draw's score and their spread"})

    def __post_init__(self):
        if self.random_draws is None:
            raise UserError("--random-draws needs a value")
        check_positive_ints(self, "random_draws")


# --------------------------------------------------------------------------- pure math

def compose_factors(a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, w: torch.Tensor, space: str
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module's merged LoRA for weights `w` [N], from stacked factors.

    factor: a [N, r, in], b [N, out, r], one common scale -> (sum w_i A_i, sum w_i B_i, s), as
    `merging.weight_sum`. delta: a [sum r, in], b [out, sum r] (the adapters' factors stacked,
    `scales` [sum r] each row's s_i) -> rows scaled by w_i s_i, B as is, scale 1: the product
    sum_i w_i s_i B_i A_i of `merging.concat` (which splits the coefficient as sqrt on each side).
    """
    if space == "factor":
        return torch.einsum("n,nri->ri", w, a), torch.einsum("n,nor->or", w, b), float(scales[0])
    return a * scales[:, None], b, 1.0


def l1_penalty(w: Sequence[float], l1: float) -> float:
    """LoraHub's regulariser: l1 * mean_i |w_i|."""
    return l1 * sum(abs(x) for x in w) / len(w)


def draw_weights(n_draws: int, n: int, bounds: tuple[float, float], seed: int) -> list[list[float]]:
    """n_draws weight vectors of n weights, each uniform on [lower, upper], from Python's Mersenne
    Twister seeded by `seed` (the same numbers on every machine and version). Draw i does not depend
    on n_draws: more draws extend the list."""
    lo, hi = bounds
    rng = random.Random(seed)
    return [[rng.uniform(lo, hi) for _ in range(n)] for _ in range(n_draws)]


@dataclass
class SearchResult:
    weights: list[float]
    loss: float                      # best objective (loss + l1 term)
    start_loss: float                # objective at the start point
    trace: list[dict]                # per candidate: weights, loss, objective
    seconds: float
    seconds_in_loss: float           # of which inside the loss function (forward passes)


def search(loss_fn: Callable[[list[float]], float], n: int, budget: int, bounds: tuple[float, float],
           l1: float, seed: int, optimizer: str = "NGOpt", progress: Callable[[int, float], None] | None = None
           ) -> SearchResult:
    """Minimise loss_fn(w) + l1 * mean|w| over w in bounds^n with a nevergrad optimizer.

    Seeded (the parametrization's random state), so a seed gives the same candidates (NGOpt
    often picks a deterministic inner optimizer at this budget: then every seed does). The
    start is 0 clipped into the bounds, NGOpt's first candidate (scored once more if an
    optimizer's first candidate is another); returns the best seen, never worse than the start.
    """
    import numpy as np
    import nevergrad as ng

    lo, hi = bounds
    start = [min(max(0.0, lo), hi)] * n
    param = ng.p.Array(init=np.array(start), lower=lo, upper=hi)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget, num_workers=1)
    trace: list[dict] = []
    t0, in_loss = time.perf_counter(), 0.0

    def evaluate(w: list[float]) -> dict:
        nonlocal in_loss
        t = time.perf_counter()
        loss = float(loss_fn(w))
        in_loss += time.perf_counter() - t
        objective = loss + l1_penalty(w, l1)
        return {"weights": w, "loss": loss, "objective": objective if math.isfinite(objective) else float("inf")}

    with warnings.catch_warnings():          # nevergrad's inner scipy optimizers warn about their settings
        warnings.simplefilter("ignore")
        for _ in range(budget):
            cand = opt.ask()
            trace.append(evaluate([float(x) for x in cand.value]))
            opt.tell(cand, min(trace[-1]["objective"], 1e30))
            if progress is not None:
                progress(len(trace), min(r["objective"] for r in trace))
    # NGOpt's first candidate is the start; another optimizer's may not be: score the start too
    start_rec = trace[0] if trace[0]["weights"] == start else evaluate(start)
    pool = trace + ([] if start_rec is trace[0] else [start_rec])
    best = min(pool, key=lambda r: r["objective"])
    return SearchResult(best["weights"], best["objective"], start_rec["objective"], trace,
                        time.perf_counter() - t0, in_loss)


# --------------------------------------------------------------------------- the model side

class ShotLoss:
    """Mean target-token cross-entropy of a model on a fixed set of encoded shots.

    The shots are encoded once (prompt + target + EOS, the loss on the target only, as
    training), sorted by length and batched; each call is one forward pass over them.
    """

    def __init__(self, model: nn.Module, tokenizer, examples: Sequence, max_len: int = 320,
                 batch_size: int = 8):
        from src.training import collate, encode_examples

        if not examples:
            raise UserError("no shots to score on")
        self.model = model
        max_target = max(1, min(96, max_len // 2))
        items = encode_examples(tokenizer, examples, max_len=max_len, max_target_len=max_target)
        items.sort(key=lambda it: len(it["input_ids"]))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batches = [collate(items[i:i + batch_size], pad) for i in range(0, len(items), batch_size)]
        self.n_tokens = sum(b["n_tokens"] for b in self.batches)
        self.seconds = 0.0               # spent in forward passes, over all calls

    @torch.inference_mode()
    def __call__(self) -> float:
        from src.training import target_only_loss, to_device

        t0 = time.perf_counter()
        device = next(self.model.parameters()).device
        total = 0.0
        for batch in self.batches:
            total += float(target_only_loss(self.model, to_device(batch, device)))
        self.seconds += time.perf_counter() - t0
        return total / self.n_tokens


class SidePath:
    """LoRA side paths on `modules` of `model` whose factors are overwritten in place.

    `set(module, A, B, scale)` changes what a layer adds (any rank up to the one it was made
    with: the rest is zero); `remove()` puts the plain nn.Linear layers back. The model's own
    weights are never touched.
    """

    def __init__(self, model: nn.Module, shapes: dict[str, int]):
        self.model = model
        self.layers: dict[str, LoRALinear] = {}
        for name, rank in shapes.items():
            linear = model.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise UserError(f"module {name}: not an nn.Linear (is another adapter applied?)")
            a = torch.zeros(rank, linear.in_features)
            b = torch.zeros(linear.out_features, rank)
            layer = LoRALinear.from_factors(linear, a, b, 1.0).to(linear.weight.device)
            layer.requires_grad_(False)
            set_module(model, name, layer)
            self.layers[name] = layer

    @torch.no_grad()
    def set(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        layer = self.layers[name]
        r = a.shape[0]
        layer.lora_A[:r].copy_(a)
        layer.lora_B[:, :r].copy_(b)
        if r < layer.lora_A.shape[0]:
            layer.lora_A[r:].zero_()
            layer.lora_B[:, r:].zero_()
        layer.scale = float(scale)

    def set_adapter(self, adapter: Adapter, factor: float = 1.0) -> None:
        for n, (a, b) in adapter.factors.items():
            self.set(n, a, b, adapter.scales[n] * factor)

    def remove(self) -> None:
        for name, layer in self.layers.items():
            set_module(self.model, name, layer.linear)
        self.layers = {}


class Composer:
    """The merged adapter of `adapters` for any weight vector, written into a SidePath.

    Stacks every module's factors once; per candidate only the weighted sums are computed.
    """

    def __init__(self, adapters: Sequence[Adapter], space: str):
        from src.merging import check_compatible

        check_compatible(list(adapters))
        self.space = space
        self.modules = list(adapters[0].factors)
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for m in self.modules:
            fs = [ad.factors[m] for ad in adapters]
            ss = [ad.scales[m] for ad in adapters]
            ranks = [a.shape[0] for a, _ in fs]
            if space == "factor":
                if len(set(ranks)) > 1 or len({round(s, 12) for s in ss}) > 1:
                    what, vals = ("ranks", ranks) if len(set(ranks)) > 1 else ("scales", ss)
                    listed = ", ".join(f"{ad.name or f'adapter #{i + 1}'} ({v})" for i, (ad, v) in
                                       enumerate(zip(adapters, vals)))
                    raise UserError(f"lorahub in factor space needs adapters of equal {what}; module {m}: "
                                    f"{listed} (use --lorahub-space delta)")
                a = torch.stack([x.detach().float() for x, _ in fs])
                b = torch.stack([y.detach().float() for _, y in fs])
                self.stacked[m] = (a, b, torch.tensor(ss))
            else:
                a = torch.cat([x.detach().float() for x, _ in fs])
                b = torch.cat([y.detach().float() for _, y in fs], 1)
                self.stacked[m] = (a, b, torch.cat([torch.full((r,), s) for r, s in zip(ranks, ss)]))
        self.row_task = {m: torch.repeat_interleave(torch.arange(len(adapters)),
                                                    torch.tensor([ad.factors[m][0].shape[0] for ad in adapters]))
                         for m in self.modules} if space == "delta" else {}

    def ranks(self) -> dict[str, int]:
        return {m: (a.shape[1] if self.space == "factor" else a.shape[0]) for m, (a, _, _) in self.stacked.items()}

    def write(self, side: SidePath, w: Sequence[float]) -> None:
        wt = torch.tensor(list(w), dtype=torch.float32)
        for m, (a, b, s) in self.stacked.items():
            if self.space == "factor":
                ma, mb, scale = compose_factors(a, b, s, wt, "factor")
            else:
                ma, mb, scale = compose_factors(a, b, s * wt[self.row_task[m]], wt, "delta")
            side.set(m, ma, mb, scale)


def scale_search(model: nn.Module, adapter: Adapter, loss: ShotLoss, grid: Sequence[float]) -> dict:
    """The scaling coefficient c from `grid` minimising the shot loss of the model with c * dW
    (the merged adapter's deltas scaled by c). Returns {"grid", "losses", "chosen"}; ties
    go to the first grid point."""
    side = SidePath(model, {n: a.shape[0] for n, (a, _) in adapter.factors.items()})
    try:
        losses = []
        for c in grid:
            side.set_adapter(adapter, c)
            losses.append(loss())
    finally:
        side.remove()
    best = min(range(len(grid)), key=lambda i: losses[i])
    return {"grid": list(grid), "losses": losses, "chosen": grid[best]}


# --------------------------------------------------------------------------- registry entries

def shot_hash(env: Env, tasks: Sequence[str]) -> str:
    """The data hash of the shots of `tasks` (what a search on them depends on)."""
    return data_hash(env.shots(tasks, env.opt(LoraHubConfig).lorahub_shots))


class LoraHub(Method):
    """LoraHub (Huang et al., COLM 2024): one weight per adapter, searched by nevergrad on a few
    training examples; the merge is folded like any other (above)."""

    name = "lorahub"
    family, summary = "search", "few-shot search"
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
            Composer([env.adapters[t] for t in pool], cfg.lorahub_space)   # ranks fit the space
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
            reused = reuse_saved(folder, recipe, env.force)
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
        model, tokenizer = env.model()
        pool = [env.adapters[t] for t in self.pool(env, target)]
        for ad in pool:
            check_adapter_fits(model, ad)
        scored = list(env.tasks) if target is None else [target]
        shots = env.shots(scored, cfg.lorahub_shots)
        loss = ShotLoss(model, tokenizer, [ex for t in scored for ex in shots[t]], cfg.lorahub_max_len,
                        cfg.lorahub_batch_size)
        composer = Composer(pool, cfg.lorahub_space)
        bar = tqdm(total=cfg.lorahub_budget, desc=f"{self.name} {target or 'all tasks'}", unit="cand",
                   leave=False, disable=not sys.stderr.isatty())

        def progress(done: int, best: float) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{best:.4f}")

        side = SidePath(model, composer.ranks())
        try:
            found = search(lambda w: (composer.write(side, w), loss())[1], len(pool), cfg.lorahub_budget,
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
    summary = "few-shot search, per task"
    scope = "task"
    help = "LoraHub per task (its own setting): adapter weights searched on each task's training shots"


class RandomMerge(Method):
    """LoraHub's control: the same merge of every task's adapter with weights drawn uniformly from
    --lorahub-bounds instead of searched, --random-draws seeded draws, each cached in
    RUN/merged/random_merge/draw_<i>; a cell evaluates every draw and reports their mean."""

    name = "random_merge"
    family, summary = "baseline", "random weights, mean over draws (lorahub's control)"
    configs = (RandomMergeConfig, LoraHubConfig)
    help = ("control for lorahub: merges with weights drawn uniformly from --lorahub-bounds (--random-draws, "
            "seeded by --seed); the mean over draws")

    def check(self, env):
        super().check(env)
        env.load_adapters(env.tasks)
        Composer([env.adapters[t] for t in env.tasks], env.opt(LoraHubConfig).lorahub_space)  # ranks fit

    def weights(self, env: Env) -> list[dict[str, float]]:
        hub = env.opt(LoraHubConfig)
        drawn = draw_weights(env.opt(RandomMergeConfig).random_draws, len(env.tasks), hub.lorahub_bounds,
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
            adapter = reuse_saved(folder, recipe, env.force)
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
