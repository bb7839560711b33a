"""One expert layer under every router: E LoRA experts stacked in an existing nn.Linear.

    y = W0 x + sum_e g_e * s_e * B_e (A_e x)

The gates g come from the layer's router callback, `route(layer, x, keys)`, in one of three
forms:
  - `Selection`: one expert per sequence ([batch] expert indices; MoA). When the whole batch
    agrees, that expert's factors are used directly (the fast path: LoRALinear's own math);
    a mixed batch computes every expert's rank-r projection at once and keeps each
    sequence's own expert's columns.
  - a tensor [batch, E]: soft gates per sequence (all ones: the `concat` merge).
  - a tensor [batch, tokens, E]: gates per token (Arrow, LoRA-Mixer).
Factors are float32 (as LoRALinear), zero-padded to the largest rank, which changes nothing:
`lora_A` [E, r_max, in], `lora_B` [out, E, r_max], so `lora_A.flatten(0, 1)` and
`lora_B.flatten(1)` are all experts side by side (the concatenated LoRA).

A per-token router that scores tokens by a linear map of the layer's input (Arrow's
prototypes, a learned router) passes it as `keys` [K, in]: it is computed in the same
matmul as the experts' A projection, and the callback receives `x @ keys^T`. A router that
scores tokens by the experts' own A projection (SMILE: experts in SVD form, whose first rows
are the gate's singular directions) calls `layer.route_on_projection()`: the callback then
receives that projection, [..., E * r_max], and no extra column is computed.

Pure gate helpers: `topk_softmax`, `entropy`, `load_balance`. `TokenRouter` is the part every
per-token router shares (Arrow, LoRA-Mixer): the routing session and its records.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from src.errors import UserError
from src.lora import Adapter, check_adapter_fits, lora_layers, save_adapter, set_module
from src.runs import atomic_path, file_digest, write_json_atomic


# --------------------------------------------------------------------------- gates (pure)

def check_top_k(flag: str, k: int | None, experts: Sequence[str]) -> None:
    """A router's top-k (None: its default) must not exceed its experts: one line naming the flag."""
    if k is not None and k > len(experts):
        raise UserError(f"{flag} {k} is more than the {len(experts)} experts ({', '.join(experts)})")


def topk_softmax(scores: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """Gates [..., E]: softmax(scores / T) over each row's k largest scores, 0 elsewhere.

    Equals softmax over the full row with the other scores at -inf (PEFT's Arrow); at most
    k non-zeros per row, summing to 1. k >= E is the plain softmax.
    """
    if temperature != 1.0:
        scores = scores / temperature
    if k >= scores.shape[-1]:
        return torch.softmax(scores, dim=-1)
    top, idx = scores.topk(k, dim=-1)                                  # [..., k]
    return torch.zeros_like(scores).scatter_(-1, idx, torch.softmax(top, dim=-1))


def entropy(probs: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy of each row of gates [..., E] (natural log): [...]."""
    return -(probs * (probs + eps).log()).sum(-1)


def load_balance(probs: torch.Tensor, assigned: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance E * sum_i pbar_i * fbar_i over the rows of [..., E].

    probs: soft gates; assigned: 0/1 (or counts) of the experts each row was routed to
    (e.g. its top-k). pbar_i is the mean soft score of expert i, fbar_i its share of the
    assignments. 1 when both are uniform.
    """
    e = probs.shape[-1]
    pbar = probs.reshape(-1, e).mean(0)
    fbar = assigned.reshape(-1, e).float()
    fbar = fbar.sum(0) / fbar.sum().clamp(min=1)
    return e * (pbar * fbar).sum()


class Selection:
    """One expert per sequence, plus the single expert when the whole batch agrees (fast path).

    `uniform` costs one device sync, once per decision, not once per layer or step.
    """

    _UNSET = object()

    def __init__(self, experts: torch.Tensor):
        self.experts = experts            # LongTensor [batch]
        self._uniform = self._UNSET
        self._cache: dict = {}

    @property
    def uniform(self) -> int | None:
        if self._uniform is self._UNSET:
            lo, hi = torch.stack((self.experts.min(), self.experts.max())).tolist()
            self._uniform = lo if lo == hi else None
        return self._uniform

    def gate(self, layer: "ExpertLinear", n: int, device: torch.device) -> torch.Tensor:
        """layer.column_gate for these experts, kept for the later forwards (decoding steps)."""
        key = ("gate", layer.index, n, device)
        if key not in self._cache:
            self._cache[key] = layer.column_gate(self.take(n, device))
        return self._cache[key]

    def take(self, n: int, device: torch.device) -> torch.Tensor:
        """The experts for a batch of n on `device`; n a multiple of the session batch (beams)."""
        key = (n, device)
        if key not in self._cache:
            e = self.experts
            if e.shape[0] != n:
                if n % e.shape[0]:
                    raise RuntimeError(f"a forward of {n} sequences in a routing session for {e.shape[0]}")
                e = e.repeat_interleave(n // e.shape[0])    # generate's beams / return sequences
            self._cache[key] = e.to(device)
        return self._cache[key]


# --------------------------------------------------------------------------- the layer

Route = Callable[["ExpertLinear", torch.Tensor, "torch.Tensor | None"], "Selection | torch.Tensor"]


class ExpertLinear(nn.Module):
    """An existing nn.Linear plus E LoRA experts; `route(self, x, keys_out)` gives the gates."""

    def __init__(self, linear: nn.Linear, factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 scales: Sequence[float], index: int, route: Route, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = linear
        self.index = index
        self.route = route
        self.ranks = [int(a.shape[0]) for a, _ in factors]
        self.scale_list = [float(s) for s in scales]
        n, r, dev = len(factors), max(self.ranks), linear.weight.device
        a_all = torch.zeros(n, r, linear.in_features, dtype=dtype)
        b_all = torch.zeros(linear.out_features, n, r, dtype=dtype)
        for e, (a, b) in enumerate(factors):
            a_all[e, : a.shape[0]] = a.to(dtype)
            b_all[:, e, : b.shape[1]] = b.to(dtype)
        self.lora_A = nn.Parameter(a_all.to(dev), requires_grad=False)
        self.lora_B = nn.Parameter(b_all.to(dev), requires_grad=False)
        # column j of the concatenated rank dimension belongs to expert j // r_max
        self.register_buffer("col_expert", torch.arange(n, device=dev).repeat_interleave(r), persistent=False)
        self.register_buffer("col_scale", torch.tensor(self.scale_list, dtype=dtype, device=dev)
                             .repeat_interleave(r), persistent=False)
        self.keys: torch.Tensor | None = None
        self.on_projection = False        # route(self, x, proj) instead of route(self, x, keys_out)
        self._fused: torch.Tensor | None = None
        self._b_scaled: torch.Tensor | None = None

    @property
    def n_experts(self) -> int:
        return len(self.ranks)

    def expert_factors(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's own (A [r, in], B [out, r]), padding dropped."""
        r = self.ranks[e]
        return self.lora_A[e, :r], self.lora_B[:, e, :r]

    def column_gate(self, experts: torch.Tensor) -> torch.Tensor:
        """[batch, E * r_max]: each sequence's expert's scale on its own rank columns, 0 elsewhere."""
        return (self.col_expert == experts[:, None]) * self.col_scale

    def set_keys(self, keys: torch.Tensor | None) -> None:
        """A router's linear map [K, in] of this layer's input, computed with the A projection.

        The fused [E * r_max + K, in] matrix is built once: set keys again after changing the
        experts' A (training) so that it is rebuilt.
        """
        self.keys = None if keys is None else keys.to(self.lora_A)
        self._fused = None

    def route_on_projection(self, on: bool = True) -> None:
        """The route callback receives the experts' A projection [..., E * r_max] (computed once,
        padded like the fused keys) in place of keys_out; the experts are frozen."""
        self.on_projection = on
        self._fused = None

    def _fused_weight(self) -> torch.Tensor:
        """[E*r + K (+ zero rows to a multiple of 16), in]: odd widths are markedly slower in the
        CPU matmul (63 rows cost about twice 64 here)."""
        if self._fused is None or self.lora_A.requires_grad or (self.keys is not None and self.keys.requires_grad):
            a = self.lora_A.flatten(0, 1)
            keys = self.keys if self.keys is not None else a.new_zeros(0, a.shape[1])
            pad = -(a.shape[0] + keys.shape[0]) % 16
            self._fused = torch.cat([a, keys, a.new_zeros(pad, a.shape[1])])
        return self._fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        h = x.to(self.lora_A.dtype)
        if self.keys is not None or self.on_projection:
            z = F.linear(h, self._fused_weight())                          # [..., E*r + K + pad]
            n_cols = self.lora_A.shape[0] * self.lora_A.shape[1]
            proj = z[..., :n_cols]
            if self.on_projection:
                gates = self.route(self, x, proj)
            else:
                gates = self.route(self, x, z[..., n_cols:n_cols + self.keys.shape[0]])
            return self._add_gated(y, proj, gates)
        gates = self.route(self, x, None)
        if isinstance(gates, Selection):
            e = gates.uniform
            if e is not None:                 # the whole batch on one expert: LoRALinear's own math
                a, b = self.expert_factors(e)
                return y + (F.linear(F.linear(h, a), b) * self.scale_list[e]).to(y.dtype)
            # A mixed batch: every expert's rank-r projection at once, then each sequence keeps only
            # its own expert's columns. Each factor is read once per layer (no per-sequence copies);
            # the extra work is n_experts * r columns, small beside the base layer.
            gate = gates.gate(self, x.shape[0], x.device)                   # [batch, E*r]
            h = F.linear(h, self.lora_A.flatten(0, 1))                      # [batch, ..., E*r]
            h = h * gate.view(x.shape[0], *([1] * (h.dim() - 2)), -1)
            return y + F.linear(h, self.lora_B.flatten(1)).to(y.dtype)      # [batch, ..., out]
        return self._add_gated(y, F.linear(h, self.lora_A.flatten(0, 1)), gates)

    def _add_gated(self, y: torch.Tensor, proj: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """y + sum_e g_e s_e B_e (A_e x), from the projection proj [..., E*r] and gates [b, E] or
        [b, t, E].

        The gates multiply each expert's r columns through a view (no gather); the scales are
        folded into B once (B s, cached while the experts are frozen); the B side is added into
        y in place by one addmm when the dtypes agree (no separate add, no new tensor).
        """
        n, r = self.lora_A.shape[:2]
        if gates.dtype != proj.dtype:
            gates = gates.to(proj.dtype)
        if gates.dim() == 2 and proj.dim() > 2:                                        # per sequence
            gates = gates.view(gates.shape[0], *([1] * (proj.dim() - 2)), n)
        h = (proj.unflatten(-1, (n, r)) * gates.unsqueeze(-1)).flatten(-2)             # [b, (t,) E*r]
        bt = self._scaled_bt()                                                         # [E*r, out]
        if y.dtype == bt.dtype and y.is_contiguous() and not (torch.is_grad_enabled() and y.requires_grad):
            y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), bt)
            return y
        return y + (h @ bt).to(y.dtype)

    def _scaled_bt(self) -> torch.Tensor:
        """[E * r_max, out]: every expert's B times its scale, transposed for addmm."""
        if self._b_scaled is None or self.lora_B.requires_grad:
            self._b_scaled = (self.lora_B.flatten(1) * self.col_scale).T.contiguous()
        return self._b_scaled

    def extra_repr(self) -> str:
        return f"experts={len(self.ranks)}, ranks={self.ranks}" + (
            f", keys={self.keys.shape[0]}" if self.keys is not None else "") + (
            ", routed on the projection" if self.on_projection else "")


# --------------------------------------------------------------------------- injection

def expert_order(adapters: dict[str, Adapter], tasks: Sequence[str] = ()) -> list[str]:
    """The experts' order: `tasks` (which must name exactly the adapters), else the adapters'."""
    if not adapters:
        raise UserError("a mixture of experts needs at least one adapter (got none)")
    if not tasks:
        return list(adapters)
    missing, extra = [t for t in tasks if t not in adapters], [t for t in adapters if t not in tasks]
    if missing or extra:
        raise UserError(f"tasks {list(tasks)} do not match the adapters {list(adapters)}"
                        + (f": no adapter for {', '.join(missing)}" if missing else "")
                        + (f": adapters not in tasks: {', '.join(extra)}" if extra else ""))
    return list(tasks)


def _few(names: Sequence[str], k: int = 3) -> str:
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def common_modules(adapters: dict[str, Adapter], tasks: Sequence[str], what: str = "MoA experts") -> list[str]:
    """The module names every adapter covers (all must cover the same), else UserError naming them."""
    for t in tasks:
        if not adapters[t].factors:
            raise UserError(f"adapter {t!r} has no LoRA modules")
    ref_task = tasks[0]
    ref = set(adapters[ref_task].factors)
    for t in tasks[1:]:
        mods = set(adapters[t].factors)
        if mods != ref:
            parts = []
            if ref - mods:
                parts.append(f"lacks {_few(sorted(ref - mods))}")
            if mods - ref:
                parts.append(f"has {_few(sorted(mods - ref))}")
            raise UserError(f"{what} must cover the same modules: adapter {t!r} "
                            f"{' and '.join(parts)}, unlike adapter {ref_task!r}")
    return sorted(ref)


def has_experts(model: nn.Module) -> bool:
    return any(isinstance(m, ExpertLinear) for m in model.modules())


def expert_modules(model: nn.Module, adapters: dict[str, Adapter], tasks: Sequence[str],
                   what: str = "MoA experts") -> list[str]:
    """The modules the experts will sit in, in model (execution) order, after every check:
    the adapters cover the same modules, fit the model, and the model has no LoRA or expert
    layers yet; else UserError."""
    modules = common_modules(adapters, tasks, what)
    if lora_layers(model) or has_experts(model):
        raise UserError("model already has LoRA or expert layers; remove them first")
    for t in tasks:
        check_adapter_fits(model, adapters[t])
    covered = set(modules)
    return [n for n, _ in model.named_modules() if n in covered]


def inject_experts(model: nn.Module, adapters: dict[str, Adapter], tasks: Sequence[str], route: Route,
                   what: str = "MoA experts") -> tuple[list[str], list[ExpertLinear]]:
    """Wrap every module the adapters cover in an ExpertLinear (experts in `tasks` order).

    Returns (module names in model order, layers). The model is frozen; undo with
    `remove_experts`. Nothing is changed when a check fails.
    """
    names = expert_modules(model, adapters, tasks, what)
    by_name = dict(model.named_modules())
    model.requires_grad_(False)
    layers = []
    for i, n in enumerate(names):
        layer = ExpertLinear(by_name[n], [adapters[t].factors[n] for t in tasks],
                             [adapters[t].scales[n] for t in tasks], i, route)
        set_module(model, n, layer)
        layers.append(layer)
    return names, layers


def remove_experts(model: nn.Module, names: Sequence[str], layers: Sequence[ExpertLinear]) -> nn.Module:
    """Put the plain nn.Linear layers back."""
    for name, layer in zip(names, layers):
        set_module(model, name, layer.linear)
    return model


# --------------------------------------------------------------------------- per-token routers

class TokenRouter(nn.Module):
    """What every per-token router shares: the evaluation protocol's session and records.

    A subclass sets `tasks`, `layer_names`, `layers` (its ExpertLinear layers), the model (as
    `self.__dict__["model"]`, not a submodule) and calls `self._record(layer, gates)` from its
    route callback. Inside `session()` the first forward (the prompt) records each expert's
    share of the gate mass over the prompt's tokens, per layer (`layer_shares`) and overall
    (`routing_records`).
    """

    kind = "token"
    what = "this router"

    def __init__(self):
        super().__init__()
        self._session: dict | None = None
        self._last: dict = {"mask": None, "shares": {}}

    def _record(self, layer: ExpertLinear, gates: torch.Tensor) -> None:
        """In a session, the first forward's mean gate per expert over the prompt's tokens."""
        s = self._session
        if s is not None and layer.index not in s["shares"] and gates.dim() == 3:
            mask = s["mask"]
            if mask is None or mask.shape != gates.shape[:2]:
                mask = torch.ones(gates.shape[:2], device=gates.device)
            mask = mask.to(device=gates.device, dtype=gates.dtype)
            s["shares"][layer.index] = ((gates * mask[..., None]).sum(1)
                                        / mask.sum(1, keepdim=True).clamp(min=1)).detach()  # [b, E]

    @contextmanager
    def session(self, experts=None, positions=None, prompt_mask: torch.Tensor | None = None
                ) -> Iterator["TokenRouter"]:
        """One batch: the first forward's gates over `prompt_mask`'s tokens ([batch, tokens];
        default all) are recorded. `experts` cannot be forced (every token routes itself);
        `positions` is not needed."""
        if experts is not None:
            raise UserError(f"{self.what} routes every token itself: experts cannot be forced")
        self._session = self._last = {"mask": prompt_mask, "shares": {}}
        try:
            yield self
        finally:
            self._session = None

    def layer_shares(self) -> torch.Tensor:
        """[n_layers, batch, E]: each expert's mean gate over the prompt tokens, per layer, in
        the current (or else the last) session."""
        shares = self._last["shares"]
        return torch.stack([shares[i].cpu() for i in sorted(shares)])

    def routing_records(self) -> list[dict]:
        """Per sequence of the last session: {"expert_share": {task: mean gate over prompt tokens and layers}}."""
        mean = self.layer_shares().double().mean(0)                        # [batch, E]
        return [{"expert_share": {t: round(float(v), 6) for t, v in zip(self.tasks, row)}} for row in mean]

    def remove(self) -> nn.Module:
        """Put the plain nn.Linear layers back; idempotent. Returns the model."""
        remove_experts(self.model, self.layer_names, self.layers)
        self.layers = nn.ModuleList()
        self.layer_names = []
        return self.model


# --------------------------------------------------------------------------- routers on disk (MoA, LoRA-Mixer)

ROUTERS_NAME = "routers.safetensors"
EXPERTS_DIR = "experts"


def expert_adapter(names: Sequence[str], layers: Sequence[ExpertLinear], e: int, config: dict, name: str) -> Adapter:
    """Expert `e` of the expert layers `layers` (at modules `names`) as an Adapter: CPU copies of its
    factors and its scales, with the PEFT `config` of the adapter it came from."""
    factors, scales = {}, {}
    for module, layer in zip(names, layers):
        a, b = layer.expert_factors(e)
        factors[module] = (a.detach().cpu().clone(), b.detach().cpu().clone())
        scales[module] = layer.scale_list[e]
    return Adapter(factors, scales, dict(config), name)


def save_routers(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config_name: str, meta: dict,
                 experts: dict[str, Adapter] | None = None) -> Path:
    """A trained router's folder, each file atomic: routers.safetensors, then experts/<task>/ (PEFT
    adapters, when given), then `config_name` last, `meta` with the routers file's sha256 set (at
    its key's place in `meta`, else last), so that a load notices a half-finished save. Other files
    in `folder` are left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ROUTERS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    for task, adapter in (experts or {}).items():
        save_adapter(adapter, folder / EXPERTS_DIR / task)
    write_json_atomic(folder / config_name, {**meta, "routers_sha256": file_digest(folder / ROUTERS_NAME)})
    return folder


def load_router_tensors(folder: str | os.PathLike, config_name: str, meta: dict,
                        require_digest: bool = False) -> dict[str, torch.Tensor]:
    """routers.safetensors of a saved router folder, checked against the sha256 its config records
    (a config without one passes unless `require_digest`: MoA folders saved before it was recorded)."""
    path = Path(folder) / ROUTERS_NAME
    if (require_digest or meta.get("routers_sha256")) and meta.get("routers_sha256") != file_digest(path):
        raise UserError(f"{path} does not match {config_name} (an interrupted save?)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable safetensors file ({e})") from None
