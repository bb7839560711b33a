"""Arrow routing: zero-shot, per token and per layer, over the task adapters; nothing is trained.

Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs",
ICML 2024 (arXiv 2405.11157); reference implementation: HF PEFT `create_arrow_model`
(`peft/tuners/lora/arrow.py`).

In every adapted layer, expert e's prototype is the top right singular vector v_e of its
delta dW_e = B_e A_e (a direction of the layer's input space). A token's input x scores
s_e = |x . v_e| (sign-free; x is not normalised, as in PEFT and microsoft/mttl); the top k
experts are kept, weighted by c = softmax(s_topk / T), and the layer computes

    y = W x + sum_e c_e * scale_e * B_e A_e x.

Prototypes: exactly, from the factors (`top_right_singular_vector`: QR of B and of A^T, the
SVD of the small r x r core, no dense [out, in] matrix), or as PEFT finds them
(`power_prototype`: 15 power iterations on A^T (B^T B) A from a seeded random start), so that
results can be pinned to PEFT. GenKnowSub (Bhardwaj et al., arXiv 2505.10939): the mean A and
the mean B of some "general" adapters are subtracted from every task adapter's A and B before
the prototypes are built (and the purified experts are the ones applied, as in PEFT).

Pure math first (prototypes, GenKnowSub, gates), then `ArrowRouter`, which wires it into a
model through the shared expert layer (src/experts.py): the prototypes are computed in the
same matmul as the experts' A projection.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from src import merging, runs
from src.cli import check_positive_ints
from src.compose import Env, Method
from src.errors import UserError
from src.experts import Selection, TokenRouter, check_top_k, common_modules, inject_experts, topk_softmax
from src.lora import Adapter, check_adapter_fits, load_adapter

PROTOTYPES = ("exact", "power")


DEFAULT_TOP_K = 3   # PEFT's


@dataclass
class ArrowConfig:
    """Arrow routing (zero-shot, per token): top-k experts by |x . prototype|."""

    arrow_top_k: int | None = field(default=None, metadata={
        "help": "experts kept per token and layer; None: PEFT's default 3, capped at the number of experts "
                "(a value given above it is an error)"})
    arrow_temperature: float = field(default=1.0, metadata={"help": "softmax temperature over the top-k scores"})
    arrow_prototypes: str = field(default="exact", metadata={
        "help": "exact: top right singular vector from the factors; power: PEFT's seeded power iterations",
        "choices": PROTOTYPES})
    arrow_power_iters: int = field(default=15, metadata={"help": "power iterations (--arrow-prototypes power)"})
    arrow_seed: int = field(default=0, metadata={"help": "seed of the power iterations' start (PEFT's rng_seed)"})
    arrow_general: tuple[str, ...] | None = field(default=None, metadata={
        "help": "GenKnowSub: adapter folders of general adapters whose mean A and B are subtracted "
                "from every task adapter"})

    def __post_init__(self):
        if isinstance(self.arrow_general, str):
            self.arrow_general = (self.arrow_general,)
        if self.arrow_general is not None:
            self.arrow_general = tuple(self.arrow_general)
        check_positive_ints(self, "arrow_top_k")
        if not (isinstance(self.arrow_temperature, (int, float)) and math.isfinite(self.arrow_temperature)
                and self.arrow_temperature > 0):
            raise UserError(f"--arrow-temperature must be a finite number > 0, got {self.arrow_temperature}")
        if self.arrow_prototypes not in PROTOTYPES:
            raise UserError(f"--arrow-prototypes must be one of {', '.join(PROTOTYPES)}; got {self.arrow_prototypes!r}")
        if self.arrow_power_iters < 1:
            raise UserError(f"--arrow-power-iters must be a positive integer, got {self.arrow_power_iters}")

    def top_k(self, n_experts: int) -> int:
        """The experts kept per token: --arrow-top-k, or PEFT's 3 capped at the experts."""
        return self.arrow_top_k if self.arrow_top_k is not None else min(DEFAULT_TOP_K, n_experts)


# --------------------------------------------------------------------------- math (pure)

def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right singular vector of B @ A (A [r, in], B [out, r]) exactly, from the factors.

    B = Qb Rb and A^T = Qa Ra (thin QR), so B A = Qb (Rb Ra^T) Qa^T; with the SVD of the small
    core Rb Ra^T = U S V^T, the right singular vectors of B A are the columns of Qa V. float64
    throughout. Unique up to sign. Returns [in], float32.
    """
    qb, rb = torch.linalg.qr(b.double())            # qb: [out, r], rb: [r, r]
    qa, ra = torch.linalg.qr(a.double().T)          # qa: [in, r], ra: [r, r]
    _, _, vh = torch.linalg.svd(rb @ ra.T)          # core: [r, r]
    return (qa @ vh[0]).float()


def power_prototype(a: torch.Tensor, b: torch.Tensor, iters: int = 15, seed: int | None = 0,
                    eps: float = 1e-8) -> torch.Tensor:
    """PEFT's prototype: `iters` power iterations v <- A^T (B^T B) A v / norm, float32, from
    randn(in) drawn by a generator seeded with `seed` (None: the global RNG). Returns [in]."""
    a32, b32 = a.float(), b.float()
    c = b32.T @ b32                                                     # [r, r]
    gen = None
    if seed is not None:
        gen = torch.Generator(device=a32.device.type)
        gen.manual_seed(int(seed))
    v = torch.randn(a32.shape[1], dtype=a32.dtype, device=a32.device, generator=gen)
    v = v / (v.norm() + eps)
    for _ in range(iters):
        w = a32.T @ (c @ (a32 @ v))
        v = w / (w.norm() + eps)
    return v


def genknowsub(factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
               general: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GenKnowSub on one module: (A_i - mean_g A_g, B_i - mean_g B_g) for every task adapter i.

    Acts on A and B separately (not on the deltas), as PEFT does; the ranks must be equal.
    """
    mean_a = torch.stack([a.float() for a, _ in general]).mean(0)      # [r, in]
    mean_b = torch.stack([b.float() for _, b in general]).mean(0)      # [out, r]
    return [(a.float() - mean_a, b.float() - mean_b) for a, b in factors]


def arrow_gates(keys_out: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """Gates [..., E] from x . v_e [..., E]: top-k of |x . v_e|, softmax(s / T) over them, 0 elsewhere."""
    return topk_softmax(keys_out.abs(), top_k, temperature)


# --------------------------------------------------------------------------- checks

def check_arrow_adapters(adapters: dict[str, Adapter], general: Sequence[Adapter] = ()) -> None:
    """Arrow's experts (and general adapters) must share one rank and one module set (as PEFT asks)."""
    every = [(name, ad) for name, ad in adapters.items()] + [(f"general {ad.name or f'#{i + 1}'}", ad)
                                                              for i, ad in enumerate(general)]
    ranks = {name: sorted(set(ad.ranks.values())) for name, ad in every}
    if any(len(r) != 1 for r in ranks.values()) or len({r[0] for r in ranks.values()}) > 1:
        listed = ", ".join(f"{n} (rank {'/'.join(map(str, r))})" for n, r in ranks.items())
        raise UserError(f"Arrow needs adapters of one rank (as PEFT's create_arrow_model); got {listed}")
    names = [n for n, _ in every]
    common_modules(dict(every), names, what="Arrow's adapters")


# --------------------------------------------------------------------------- the router

class ArrowRouter(TokenRouter):
    """Arrow over `adapters` injected into `model` in place (undo with `remove()`).

    A per-token router: nothing to train, no state between forwards. Inside `session()` the
    first forward (the prompt) records each expert's share of the gate mass over the prompt's
    tokens, per layer and overall (`routing_records`, `layer_shares`).
    """

    what = "Arrow"

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter], cfg: ArrowConfig | None = None,
                 general: Sequence[Adapter] = ()):
        super().__init__()
        cfg = cfg or ArrowConfig()
        tasks = list(adapters)
        if not tasks:
            raise UserError("Arrow needs at least one adapter")
        check_top_k("--arrow-top-k", cfg.arrow_top_k, tasks)
        self.top_k = cfg.top_k(len(tasks))
        check_arrow_adapters(adapters, general)
        if general:
            modules = list(adapters[tasks[0]].factors)
            purified = {t: Adapter({}, dict(adapters[t].scales), adapters[t].config, t) for t in tasks}
            for n in modules:
                new = genknowsub([adapters[t].factors[n] for t in tasks], [g.factors[n] for g in general])
                for t, ab in zip(tasks, new):
                    purified[t].factors[n] = ab
            adapters = purified
        self.cfg = cfg
        self.tasks = tasks
        self.__dict__["model"] = model            # not a submodule
        names, layers = inject_experts(model, adapters, tasks, self._route, what="Arrow's adapters")
        self.layer_names = names
        self.layers = nn.ModuleList(layers)
        if len(tasks) > 1:   # one expert: its gate is 1 everywhere, LoRALinear's own math (no prototypes)
            for layer in layers:
                layer.set_keys(self.prototypes(layer))

    @torch.no_grad()
    def prototypes(self, layer) -> torch.Tensor:
        """[E, in] the layer's expert prototypes (float32)."""
        protos = []
        for e in range(layer.n_experts):
            a, b = layer.expert_factors(e)
            if self.cfg.arrow_prototypes == "power":
                protos.append(power_prototype(a, b, self.cfg.arrow_power_iters, self.cfg.arrow_seed))
            else:
                protos.append(top_right_singular_vector(a, b).to(a.device))
        return torch.stack(protos)

    def _route(self, layer, x: torch.Tensor, keys_out: torch.Tensor | None) -> torch.Tensor | Selection:
        if keys_out is None:                 # a single expert
            self._record(layer, torch.ones(*x.shape[:-1], 1, device=x.device))
            return Selection(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        gates = arrow_gates(keys_out, self.top_k, self.cfg.arrow_temperature)  # [b, t, E]
        self._record(layer, gates)
        return gates


# --------------------------------------------------------------------------- registry entries

class Arrow(Method):
    name, kind = "arrow", "dynamic"
    family, summary = "zero-shot router", "zero-shot router, per token"
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
