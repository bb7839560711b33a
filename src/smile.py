"""SMILE routing: zero-shot, per token and per layer, from each expert's singular subspace.

Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models" (arXiv 2408.10174); reference implementation: tanganke/fusion_bench
(`fusion_bench/models/smile_moe/linear_from_module.py`: SmileGate, SmileMoELinear).

In every adapted layer, expert i's delta dW_i = s_i B_i A_i has the SVD U_i S_i V_i^T. A token's
input x gets, from every expert, the logit

    r_i = || V_i[:, :k_gate]^T x ||_2

the norm of its projection onto the expert's top-k_gate right singular vectors (the part of the
input space the expert acts on most). SMILE keeps the top k experts of softmax(r) and
renormalises them, which equals a softmax over the top k logits alone (`experts.topk_softmax`):

    y = W x + sum_{i in top k} g_i * dW_i x.

Arrow is the case k_gate = 1 (|v_i . x|). Nothing is trained and nothing is written.

How it is computed, without a dense [out, in] matrix: QR of B and of A^T and the SVD of the small
core Rb Ra^T give U = Qb U_c and V = Qa V_c (float64, `factor_svd`). Each expert is then stored
in SVD form, A' = V^T [r, in] and B' = U S [out, r] (B' A' = B A, the same LoRA scale): its A
projection A' x = V^T x holds the gate's coordinates in its first k_gate entries, so the gate
costs a norm over numbers the expert layer computes anyway (`ExpertLinear.route_on_projection`),
no extra matmul column. An expert truncated below k_gate keeps k_gate rows of A' (its B' columns
past the truncation are 0), so the gate reads the delta's top k_gate directions as SMILE's does,
whatever the experts keep. A single expert keeps its own factors (LoRALinear's math, bit for bit).

Our choices, each an option of `SmileConfig` (FusionBench's setting in brackets):
  - which singular vectors: the top right singular vectors of the LoRA delta itself (FusionBench
    `routing_use_diff: true`; its alternative, the SVD of the fine-tuned weight W0 + dW, needs
    the dense weight and is not offered);
  - how many: `--smile-gate-k` (4: the middle of the authors' sweep {2, 4, 8} for rank-16 LoRAs),
    capped at each expert's rank, the number of directions a LoRA has;
  - their weighting: none, ||V^T x|| (FusionBench), or singular, ||S V^T x|| (the variant
    FusionBench leaves commented out: the size of the expert's own output in those directions);
  - normalisation: none (FusionBench), or input, r_i / ||x|| (each logit the share of the token's
    norm inside the subspace, in [0, 1]);
  - temperature of the softmax (1, FusionBench has none) and top k (1, FusionBench's default);
  - the experts: the whole LoRA (FusionBench `k: -1`), or each truncated to its top
    `--smile-rank` singular triplets (SMILE's k).
The gates are computed in float32 on the layer's input (FusionBench: in the model's dtype).

Pure math first (`factor_svd`, `svd_form`, `smile_logits`, `smile_gates`), then `SmileRouter`,
which wires it into a model through the shared expert layer (src/experts.py).
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from src.cli import check_positive_ints
from src.compose import Env, Method
from src.errors import UserError
from src.experts import Selection, TokenRouter, check_top_k, common_modules, inject_experts, topk_softmax
from src.lora import Adapter, make_adapter

GATE_SCALES = ("none", "singular")
NORMALIZE = ("none", "input")


@dataclass
class SmileConfig:
    """SMILE routing (zero-shot, per token): top-k experts by the norm of x's projection on their singular vectors."""

    title = "SMILE options"

    smile_top_k: int = field(default=1, metadata={
        "help": "experts kept per token and layer (FusionBench's default 1); at most the number of experts"})
    smile_gate_k: int = field(default=4, metadata={
        "help": "k_gate: top right singular vectors of each expert's delta the gate projects on (default 4, the "
                "middle of the paper's LoRA sweep 2/4/8); capped at each expert's rank"})
    smile_gate_scale: str = field(default="none", metadata={
        "help": "none: logit ||V^T x|| (SMILE); singular: ||S V^T x||, each direction weighted by its singular "
                "value (LoRA scale included)", "choices": GATE_SCALES})
    smile_normalize: str = field(default="none", metadata={
        "help": "none: the logits as they are (SMILE); input: each divided by ||x||, the share of the token's norm "
                "inside the expert's subspace", "choices": NORMALIZE})
    smile_temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature over the top-k logits (SMILE: 1)"})
    smile_rank: int | None = field(default=None, metadata={
        "help": "each expert truncated to its top SMILE_RANK singular triplets (SMILE's k); None: the whole LoRA"})

    def __post_init__(self):
        if self.smile_top_k is None or self.smile_gate_k is None:
            raise UserError("--smile-top-k and --smile-gate-k need a value")
        check_positive_ints(self, "smile_top_k", "smile_gate_k", "smile_rank")
        t = self.smile_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise UserError(f"--smile-temperature must be a finite number > 0, got {t}")
        if self.smile_gate_scale not in GATE_SCALES:
            raise UserError(f"--smile-gate-scale must be one of {', '.join(GATE_SCALES)}; got {self.smile_gate_scale!r}")
        if self.smile_normalize not in NORMALIZE:
            raise UserError(f"--smile-normalize must be one of {', '.join(NORMALIZE)}; got {self.smile_normalize!r}")


# --------------------------------------------------------------------------- math (pure)

def factor_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of B @ A (A [r, in], B [out, r]) from the factors: (U [out, k], S [k], V [in, k]),
    k = min(r, out, in), singular values descending, float64.

    B = Qb Rb and A^T = Qa Ra (thin QR), so B A = Qb (Rb Ra^T) Qa^T; with the SVD of the small core
    Rb Ra^T = Uc S Vc^T, U = Qb Uc and V = Qa Vc. No [out, in] matrix is formed.
    """
    qb, rb = torch.linalg.qr(b.double())            # qb: [out, r'], rb: [r', r]
    qa, ra = torch.linalg.qr(a.double().T)          # qa: [in, r''], ra: [r'', r]
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)   # core: [r', r'']
    return qb @ uc, s, qa @ vch.T


def svd_form(a: torch.Tensor, b: torch.Tensor, rank: int | None = None, rows: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B A in SVD form: (A' = V^T [m, in], B' = U S [out, m], S [m]), float32.

    B' A' is the rank-`rank` truncation of B A (every triplet when None or larger). A' keeps
    m = max(rank, rows) right singular vectors (at most B A's k), so that a gate can read more
    directions than the expert keeps; B''s columns past `rank` are 0. Acts on the delta, not on A
    and B separately; the LoRA scale is left to the caller (unchanged).
    """
    u, s, v = factor_svd(a, b)
    k = s.shape[0]
    keep = k if rank is None else min(rank, k)
    m = min(k, max(keep, rows))
    b2 = u[:, :m] * s[:m]
    b2[:, keep:] = 0
    return v[:, :m].T.float().contiguous(), b2.float().contiguous(), s[:m].float()


def smile_logits(proj: torch.Tensor, n_experts: int, gate_k: int, weights: torch.Tensor | None = None,
                 x_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [..., E] from experts in SVD form: proj [..., E * r] = every expert's V^T x side by side.

    r_i = || w_i * (V_i^T x)[:gate_k] ||_2 (weights [E, gate_k], e.g. the singular values; None: 1),
    divided by x_norm [...] when given.
    """
    coords = proj.unflatten(-1, (n_experts, -1))[..., :gate_k]           # [..., E, gate_k]
    if weights is not None:
        coords = coords * weights
    logits = torch.linalg.vector_norm(coords, dim=-1)                    # [..., E]
    if x_norm is not None:
        logits = logits / x_norm.clamp_min(torch.finfo(logits.dtype).tiny).unsqueeze(-1)
    return logits


def smile_gates(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """Gates [..., E]: SMILE's softmax, top-k, renormalise, which is softmax(r / T) over the top k."""
    return topk_softmax(logits, top_k, temperature)


# --------------------------------------------------------------------------- the router

class SmileRouter(TokenRouter):
    """SMILE over `adapters` injected into `model` in place (undo with `remove()`).

    A per-token router: nothing to train, no state between forwards. Inside `session()` the first
    forward (the prompt) records each expert's share of the gate mass over the prompt's tokens,
    per layer and overall (`routing_records`, `layer_shares`). Any ranks; one module set.
    """

    what = "SMILE"

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter], cfg: SmileConfig | None = None):
        super().__init__()
        cfg = cfg or SmileConfig()
        tasks = list(adapters)
        if not tasks:
            raise UserError("SMILE needs at least one adapter")
        check_top_k("--smile-top-k", cfg.smile_top_k, tasks)
        modules = common_modules(adapters, tasks, what="SMILE's adapters")
        self.cfg, self.tasks, self.top_k = cfg, tasks, cfg.smile_top_k
        experts, singular = dict(adapters), {}
        if len(tasks) > 1 or cfg.smile_rank is not None:     # one whole expert: its own factors
            experts = {}
            for t in tasks:
                ad, factors = adapters[t], {}
                for n in modules:
                    a2, b2, s = svd_form(*ad.factors[n], cfg.smile_rank, rows=cfg.smile_gate_k)
                    factors[n] = (a2, b2)
                    singular[t, n] = s * abs(ad.scales[n])
                experts[t] = make_adapter(factors, dict(ad.scales), ad.base_model, name=ad.name)
        self.__dict__["model"] = model            # not a submodule
        names, layers = inject_experts(model, experts, tasks, self._route, what="SMILE's adapters")
        self.layer_names = names
        self.layers = nn.ModuleList(layers)
        self.gate_k = min(cfg.smile_gate_k, max(max(layer.ranks) for layer in layers))
        self._weights: dict[int, torch.Tensor] = {}
        if len(tasks) > 1:
            for name, layer in zip(names, layers):
                layer.route_on_projection()
                if cfg.smile_gate_scale == "singular":
                    w = torch.zeros(len(tasks), min(self.gate_k, max(layer.ranks)))   # [E, gate_k]
                    for e, t in enumerate(tasks):
                        s = singular[t, name][: w.shape[1]]
                        w[e, : s.shape[0]] = s
                    self._weights[layer.index] = w.to(layer.lora_A)

    def _route(self, layer, x: torch.Tensor, proj: torch.Tensor | None) -> torch.Tensor | Selection:
        if proj is None:                     # a single expert
            self._record(layer, torch.ones(*x.shape[:-1], 1, device=x.device))
            return Selection(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        x_norm = torch.linalg.vector_norm(x.to(proj.dtype), dim=-1) if self.cfg.smile_normalize == "input" else None
        logits = smile_logits(proj, layer.n_experts, self.gate_k, self._weights.get(layer.index), x_norm)
        gates = smile_gates(logits, self.top_k, self.cfg.smile_temperature)        # [b, t, E]
        self._record(layer, gates)
        return gates


# --------------------------------------------------------------------------- registry entries

class Smile(Method):
    """SMILE (src/smile.py): each token to the experts whose top singular directions hold most of it."""

    name, kind = "smile", "dynamic"
    family, summary = "zero-shot router", "zero-shot router, per token (the experts' subspaces)"
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
