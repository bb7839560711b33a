"""LoRA-Mixer: the task LoRAs as experts routed per token inside the projection layers.

Li et al., "LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing",
arXiv 2507.00029 (ICLR 2026). No public code exists; every choice the paper leaves open is
an option of `MixerConfig`, with the default named in docs/lora_mixer.md.

Every adapted projection W of the chosen modules gets a router, a linear map of that
layer's own input token x to E logits s(x) = R x, and computes

    y = W x + sum_e g_e(x) * scale_e * B_e A_e x.

Training fuses the experts softly (g = softmax(s), every expert, differentiable); inference
keeps each token's top k (default 3) and renormalises (k = E: the soft mixture). The router
is computed in the same matmul as the experts' A projection (the shared expert layer's
`keys`, src/experts.py): the experts' factors are stacked, never looped over per token.

The loss (`rsl_terms`, `preservation`):
    L = L_task + a * E * sum_i pbar_i * fbar_i  +  l * sign * mean_x H(p(x))  +  b * sum_{i in C} ||theta_i - theta_i(0)||^2
pbar_i: the mean soft score of expert i over the batch's real tokens; fbar_i: the share of
top-k assignments that went to i (Switch-Transformer balance, 1 at uniform use, E when one
expert takes every token with k = 1); H the per-token routing entropy. sign = +1 sharpens the
routing (the paper's text); the paper's formula writes -l * H, which rewards flat routing:
`--mixer-entropy-sign paper` gives it. Optionally eta * CE(s(x), task label) per token
supervises the routers with the task labels (as MoA's L_cls).

Three regimes (the paper's): `plug` (experts frozen, routers trained: the default), `finetune`
(routers and the experts of C trained, the preservation term keeping those near their start)
and `joint` (fresh experts, routed hard by the task label while training; the routers learn
the labels and route per token at inference).

Pure math first (losses), then `LoRAMixer`, then save and load.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from src import runs
from src.cli import check_positive_ints
from src.compose import Env, Method
from src.errors import UserError
from src.experts import (EXPERTS_DIR, ROUTERS_NAME, TokenRouter, check_top_k, entropy, expert_adapter, expert_order,
                         inject_experts, load_balance, load_router_tensors, save_routers, topk_softmax)
from src.lora import Adapter, load_adapter
from src.runs import read_saved_config
from src.training import Objective, backbone_forward, collate, prompt_items, target_only_loss, to_device

REGIMES = ("plug", "finetune", "joint")
ENTROPY_SIGNS = ("sharpen", "paper")
ROUTER_INITS = ("zero", "linear")
DEFAULT_REGIME = "plug"
CONFIG_NAME = "mixer_config.json"
FILES = (CONFIG_NAME, ROUTERS_NAME)
FORMAT_VERSION = 1


def method_name(regime: str) -> str:
    """The method (and RUN/compose folder) of a regime: lora_mixer for the default, else lora_mixer_<regime>."""
    return "lora_mixer" if regime == DEFAULT_REGIME else f"lora_mixer_{regime}"


# --------------------------------------------------------------------------- options

@dataclass
class MixerConfig:
    """train_moa.py --system lora_mixer: modules, top-k, the routing loss, the regime."""

    title = "LoRA-Mixer options (--system lora_mixer)"

    mixer_modules: str = field(default="all", metadata={
        "help": "the projections that get routers: all (every module the experts cover), attention (the attention "
                "projections only, the paper's placement for experts trained there), or names such as q_proj,v_proj; "
                "a set that leaves out covered modules needs --mixer-drop-uncovered"})
    mixer_drop_uncovered: bool = field(default=False, metadata={
        "help": "accept a --mixer-modules set that leaves out modules the experts cover (those run the base "
                "weights only, without their experts)"})
    mixer_router_init: str = field(default="zero", metadata={
        "help": "zero: routers start at 0 (exactly uniform gates); linear: nn.Linear's init (uniform in "
                "+-1/sqrt(in), seeded)", "choices": ROUTER_INITS})
    mixer_top_k: int = field(default=3, metadata={
        "help": "experts kept per token at inference, renormalised (the paper's 3; the number of experts: the "
                "soft mixture); more than the experts is an error"})
    mixer_balance: float = field(default=0.01, metadata={
        "help": "a: weight of the balance term a * E * sum_i pbar_i * fbar_i (Switch Transformer's 0.01; the paper "
                "gives none)"})
    mixer_entropy: float = field(default=0.01, metadata={"help": "l: weight of the per-token routing entropy term"})
    mixer_entropy_sign: str = field(default="sharpen", metadata={
        "help": "sharpen: + l * H (low entropy, the paper's stated aim); paper: - l * H as its formula is written "
                "(rewards flat routing)", "choices": ENTROPY_SIGNS})
    mixer_regime: str = field(default="plug", metadata={
        "help": "plug: routers over frozen RUN/adapters; finetune: routers and the experts of --mixer-tune; joint: "
                "fresh experts routed hard by the task label while training", "choices": REGIMES})
    mixer_tune: str | None = field(default=None, metadata={
        "help": "finetune: the experts that may move (C), comma-separated task names; None: every expert"})
    mixer_expert_lr: float = field(default=3e-4, metadata={
        "help": "learning rate of the experts that train (finetune, joint), beside the routers' --lr: the task "
                "adapters' own (3e-4 in the reference recipe); the routers' 1e-2 makes LoRA factors diverge"})
    mixer_preserve: float = field(default=1.0, metadata={
        "help": "b: weight of the preservation term sum_{i in C} ||theta_i - theta_i(0)||^2 (finetune)"})
    mixer_label_weight: float | None = field(default=None, metadata={
        "help": "eta: weight of the routers' per-token cross-entropy against the task label; None: 0, "
                "or 1 in the joint regime (which needs it)"})
    routing_size: int | None = field(default=None, metadata={
        "help": "routing examples per task (capped further by --train-size); None: 2000 in total, the paper's, "
                "split evenly over the tasks"})

    def __post_init__(self):
        check_positive_ints(self, "mixer_top_k")
        lr = self.mixer_expert_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"--mixer-expert-lr must be a finite number above 0, got {lr}")
        for name in ("mixer_balance", "mixer_entropy", "mixer_preserve", "mixer_label_weight"):
            v = getattr(self, name)
            if v is None and name == "mixer_label_weight":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"--{name.replace('_', '-')} must be finite and not negative, got {v}")
        if self.mixer_entropy_sign not in ENTROPY_SIGNS:
            raise UserError(f"--mixer-entropy-sign must be one of {', '.join(ENTROPY_SIGNS)}, "
                            f"got {self.mixer_entropy_sign!r}")
        if self.mixer_router_init not in ROUTER_INITS:
            raise UserError(f"--mixer-router-init must be one of {', '.join(ROUTER_INITS)}, "
                            f"got {self.mixer_router_init!r}")
        if self.mixer_regime not in REGIMES:
            raise UserError(f"--mixer-regime must be one of {', '.join(REGIMES)}, got {self.mixer_regime!r}")
        if self.mixer_tune is not None and self.mixer_regime != "finetune":
            raise UserError(f"--mixer-tune is for --mixer-regime finetune (got {self.mixer_regime})")
        if self.mixer_regime == "joint" and self.mixer_label_weight == 0:
            raise UserError("--mixer-regime joint trains the routers on the task labels: --mixer-label-weight "
                            "must be above 0")
        check_positive_ints(self, "routing_size")

    @property
    def label_weight(self) -> float:
        if self.mixer_label_weight is not None:
            return float(self.mixer_label_weight)
        return 1.0 if self.mixer_regime == "joint" else 0.0

    def routing_cap(self, n_tasks: int) -> int:
        return self.routing_size if self.routing_size is not None else max(1, 2000 // n_tasks)


# --------------------------------------------------------------------------- math (pure)

def rsl_terms(logits: torch.Tensor, mask: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance, mean entropy) of one layer's router logits [b, t, E] over the real tokens.

    balance = E * sum_i pbar_i * fbar_i with fbar from each token's top-k assignment (1 at
    uniform use); entropy: the mean of each token's H(softmax(s)). mask [b, t] (1 = real token).
    """
    e = logits.shape[-1]
    flat = logits.reshape(-1, e)
    if mask is not None:
        flat = flat[mask.reshape(-1).bool()]
    probs = torch.softmax(flat.float(), dim=-1)
    assigned = torch.zeros_like(probs).scatter_(-1, flat.topk(min(k, e), dim=-1).indices, 1.0)
    return load_balance(probs, assigned), entropy(probs).mean()


def label_loss(logits: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-token cross-entropy of router logits [b, t, E] against each sequence's label [b]."""
    target = labels[:, None].expand(logits.shape[:2])
    flat, tgt = logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        flat, tgt = flat[keep], tgt[keep]
    return F.cross_entropy(flat, tgt)


def preservation(current: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum ||theta - theta(0)||^2 over the given tensors (the experts allowed to move)."""
    return sum(((c - s) ** 2).sum() for c, s in zip(current, start))


# --------------------------------------------------------------------------- module choice

def _is_attention(module: str) -> bool:
    return any(p in ("self_attn", "attn", "attention", "self_attention") for p in module.split(".")[:-1])


def choose_modules(adapted: Sequence[str], spec: str, drop_uncovered: bool = False) -> list[str]:
    """The adapted modules that get routers: `all`, `attention`, or short names (q_proj,v_proj).

    A set that leaves out modules the experts cover is refused unless `drop_uncovered`: there
    the experts would be missing (the model runs the base weights), so even perfect routing
    could not reproduce an expert."""
    chosen = _chosen(list(adapted), spec)
    left_out = sorted({m.rsplit(".", 1)[-1] for m in adapted} - {m.rsplit(".", 1)[-1] for m in chosen})
    if left_out and not drop_uncovered:
        raise UserError(f"--mixer-modules {spec} leaves out {', '.join(left_out)}, which the experts cover: there "
                        "they would run without their experts; use --mixer-modules all, or --mixer-drop-uncovered "
                        "to accept it")
    return chosen


def _chosen(adapted: list[str], spec: str) -> list[str]:
    if spec == "all":
        return adapted
    if spec == "attention":
        got = [m for m in adapted if _is_attention(m)]
        if not got:
            raise UserError("--mixer-modules attention: the adapters cover no attention projection "
                            f"(they cover {', '.join(sorted({m.rsplit('.', 1)[-1] for m in adapted}))}); "
                            "pass --mixer-modules all or names")
        return got
    names = [n.strip() for n in spec.split(",") if n.strip()]
    short = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    unknown = [n for n in names if n not in short]
    if unknown or not names:
        raise UserError(f"--mixer-modules: unknown module {', '.join(unknown) or repr(spec)}; the adapters cover "
                        f"{', '.join(short)} (or use attention, all)")
    return [m for m in adapted if m.rsplit(".", 1)[-1] in names]


def restrict(adapter: Adapter, modules: Sequence[str]) -> Adapter:
    """The adapter on `modules` only."""
    return Adapter({m: adapter.factors[m] for m in modules}, {m: adapter.scales[m] for m in modules},
                   dict(adapter.config), adapter.name)


def fresh_expert(adapter: Adapter, seed: int) -> Adapter:
    """An untrained LoRA of the adapter's shapes and scales (A Kaiming-uniform as nn.Linear, B = 0)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m, (a, b) in adapter.factors.items():
        bound = 1 / math.sqrt(a.shape[1])       # kaiming_uniform_(a=sqrt(5)) on [r, in], as LoRALinear
        factors[m] = ((torch.rand(a.shape, generator=g) * 2 - 1) * bound, torch.zeros_like(b))
    return Adapter(factors, dict(adapter.scales), dict(adapter.config), adapter.name)


# --------------------------------------------------------------------------- the mixture

class LoRAMixer(TokenRouter):
    """Per-token routers over the task experts in `modules`, injected into `model` in place.

    `top_k` gates at inference; `mixer.soft = True` (training) fuses all experts by the
    softmax; `mixer.hard_labels = labels` ([batch] expert indices) routes each sequence to its
    label's expert (the joint regime's training, or a test's oracle). `mixer.collect = []`
    gathers (logits [b, t, E]) of every routed layer for the loss.
    """

    what = "LoRA-Mixer"

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter], modules: Sequence[str], top_k: int = 3,
                 tasks: Sequence[str] = (), seed: int = 0, router_init: str = "zero"):
        super().__init__()
        tasks = expert_order(adapters, tasks)
        if len(tasks) < 2:
            raise UserError(f"a LoRA-Mixer needs at least two experts, got {', '.join(tasks)}")
        if not 1 <= top_k <= len(tasks):
            raise UserError(f"--mixer-top-k {top_k}: must be between 1 and the {len(tasks)} experts "
                            f"({', '.join(tasks)})")
        self.tasks, self.top_k = list(tasks), int(top_k)
        self.__dict__["model"] = model            # not a submodule
        self._configs = {t: dict(adapters[t].config) for t in tasks}
        experts = {t: restrict(adapters[t], modules) for t in tasks}
        names, layers = inject_experts(model, experts, tasks, self._route, what="LoRA-Mixer's experts")
        self.layer_names, self.layers = names, nn.ModuleList(layers)
        if router_init not in ROUTER_INITS:
            raise UserError(f"router init {router_init!r}: one of {', '.join(ROUTER_INITS)}")
        g = torch.Generator().manual_seed(seed)
        self.routers = nn.ParameterList()
        for layer in layers:                      # bias-free; zero: exactly uniform gates at the start
            bound = 1 / math.sqrt(layer.linear.in_features)
            w = (torch.rand(len(tasks), layer.linear.in_features, generator=g) * 2 - 1) * bound
            if router_init == "zero":
                w = torch.zeros_like(w)
            self.routers.append(nn.Parameter(w.to(layer.lora_A.device)))
        self.refresh()
        self.soft = False
        self.hard_labels: torch.Tensor | None = None
        self.collect: list | None = None

    def refresh(self) -> None:
        """Hand each layer its router as keys (again after loading weights or moving experts)."""
        for layer, w in zip(self.layers, self.routers):
            layer.set_keys(w)
            layer._b_scaled = None

    def _route(self, layer, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.collect is not None:
            self.collect.append(logits)
        if self.hard_labels is not None:
            gates = F.one_hot(self.hard_labels.to(x.device), len(self.tasks)).to(logits.dtype)   # [b, E]
            self._record(layer, gates[:, None, :].expand(*logits.shape))
            return gates
        gates = torch.softmax(logits, dim=-1) if self.soft else topk_softmax(logits, self.top_k)
        self._record(layer, gates)
        return gates

    # ----------------------------------------------------------------- training

    def expert_params(self, tasks: Sequence[str]) -> list[nn.Parameter]:
        """The stacked factors, made trainable, with gradients kept for the experts of `tasks` only."""
        keep = torch.tensor([t in tasks for t in self.tasks])
        out = []
        for layer in self.layers:
            for p, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
                p.requires_grad_(True)
                shape = [1] * p.dim()
                shape[dim] = len(self.tasks)
                mask = keep.view(shape).to(p)
                if not bool(keep.all()):
                    p.register_hook(lambda grad, m=mask: grad * m)
                out.append(p)
        return out

    def expert_adapter(self, task: str) -> Adapter:
        """Task's expert (on the mixer's modules) as an Adapter (CPU copies)."""
        return expert_adapter(self.layer_names, self.layers, self.tasks.index(task), self._configs[task], task)

    # ----------------------------------------------------------------- I/O

    def save(self, folder: str | os.PathLike, extra: dict | None = None, save_experts: bool = False,
             sources: dict[str, str] | None = None) -> Path:
        """mixer_config.json + routers.safetensors (+ experts/<task>/ PEFT adapters), atomically; the
        config, written last, records the routers file's sha256 (`experts.save_routers`)."""
        meta = {"format": "lora_mixer", "version": FORMAT_VERSION, "tasks": self.tasks, "modules": self.layer_names,
                "top_k": self.top_k, "experts_saved": bool(save_experts), "sources": sources or {},
                "routers_sha256": None, **(extra or {})}
        experts = {t: self.expert_adapter(t) for t in self.tasks} if save_experts else None
        return save_routers(folder, dict(zip(self.layer_names, self.routers)), CONFIG_NAME, meta, experts)

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike, adapters: dict[str, Adapter] | None = None,
             top_k: int | None = None) -> "LoRAMixer":
        """A saved mixer on `model`; adapters: the experts (default: experts/<task>/ when saved)."""
        folder = Path(folder)
        meta = read_config(folder)
        w_path = folder / ROUTERS_NAME
        tensors = load_router_tensors(folder, CONFIG_NAME, meta, require_digest=True)
        tasks = meta["tasks"]
        if meta.get("experts_saved"):
            adapters = {t: load_adapter(folder / EXPERTS_DIR / t) for t in tasks}
        elif adapters is None or any(t not in adapters for t in tasks):
            missing = [t for t in tasks if adapters is None or t not in adapters]
            raise UserError(f"{folder}: no adapter given for expert {', '.join(missing)}")
        mixer = cls(model, {t: adapters[t] for t in tasks}, meta["modules"], top_k or meta["top_k"], tasks)
        try:
            if mixer.layer_names != meta["modules"] or set(tensors) != set(meta["modules"]):
                raise UserError(f"{folder}: its routers do not match the model's modules")
            with torch.no_grad():
                for n, w in zip(mixer.layer_names, mixer.routers):
                    if tensors[n].shape != w.shape:
                        raise UserError(f"{w_path}: router {n} is {list(tensors[n].shape)}, the model needs "
                                        f"{list(w.shape)}")
                    w.copy_(tensors[n])
            mixer.routers.requires_grad_(False)
            mixer.refresh()
        except BaseException:
            mixer.remove()
            raise
        return mixer


def read_config(folder: Path) -> dict:
    """mixer_config.json, checked: tasks, modules, top_k."""
    path = Path(folder) / CONFIG_NAME
    meta = read_saved_config(folder, CONFIG_NAME, ROUTERS_NAME,
                             "not a trained LoRA-Mixer: train it with train_moa.py --system lora_mixer")
    ok = (isinstance(meta, dict) and meta.get("format") == "lora_mixer"
          and isinstance(meta.get("tasks"), list) and all(isinstance(t, str) for t in meta["tasks"])
          and isinstance(meta.get("modules"), list) and isinstance(meta.get("top_k"), int))
    if not ok:
        raise UserError(f"{path}: not a LoRA-Mixer config (needs format, tasks, modules, top_k)")
    return meta


# --------------------------------------------------------------------------- training

def objective(mixer: LoRAMixer, cfg: MixerConfig, start: Sequence[torch.Tensor] = (),
              tuned: Sequence[torch.Tensor] = ()) -> Objective:
    """L_task + a * balance + (+-) l * entropy (+ eta * L_cls) (+ b * preservation of `tuned`).

    L_task is the target-only LM loss through the mixture (soft gates; the joint regime routes
    each sequence to its label's expert); the routing terms are the layers' mean over the
    batch's real tokens. Every term is logged (log.jsonl "terms") whatever its weight.
    """
    joint = cfg.mixer_regime == "joint"
    sign = 1.0 if cfg.mixer_entropy_sign == "sharpen" else -1.0
    eta = cfg.label_weight

    def fn(model, batch):
        mixer.collect, mixer.soft = [], True
        mixer.hard_labels = batch["task_ids"] if joint else None
        try:
            lm = target_only_loss(model, batch)
            logits = mixer.collect
        finally:
            mixer.collect, mixer.hard_labels = None, None
        mask, n = batch["attention_mask"], batch["n_seqs"]
        pairs = [rsl_terms(z, mask, mixer.top_k) for z in logits]
        terms = {"lm": lm, "balance": torch.stack([b for b, _ in pairs]).mean() * n,
                 "entropy": torch.stack([h for _, h in pairs]).mean() * n}
        if eta:
            terms["cls"] = torch.stack([label_loss(z, mask, batch["task_ids"]) for z in logits]).mean() * n
        if tuned:
            terms["preserve"] = preservation(tuned, start) * n
        return terms

    weights = {"lm": (1.0, "n_tokens"), "balance": (cfg.mixer_balance, "n_seqs"),
               "entropy": (sign * cfg.mixer_entropy, "n_seqs")}
    if eta:
        weights["cls"] = (eta, "n_seqs")
    if tuned:
        weights["preserve"] = (cfg.mixer_preserve, "n_seqs")
    return Objective(fn, weights)


@torch.no_grad()
def routing_report(mixer: LoRAMixer, model: nn.Module, items: Sequence[dict], pad_id: int,
                   batch_size: int = 16) -> dict:
    """How the inference (top-k) routing treats each task's prompts, from the prompt alone.

    {"share": {task: {expert: mean gate over its prompts' tokens and layers}}, "own_share":
    {task: its own expert's share}, "own_share_per_layer": {module: mean over tasks of the own
    expert's share there}, "top1_own": {task: share of (token, layer) whose top expert is the
    task's own}, "entropy": mean soft entropy, "balance": the balance figure, "mean_own_share"}.
    """
    e = len(mixer.tasks)
    share = torch.zeros(e, e, dtype=torch.float64)
    own_layer = torch.zeros(len(mixer.layers), e, dtype=torch.float64)     # [layer, task]: own expert's gate mass
    top1 = torch.zeros(e, dtype=torch.float64)
    count = torch.zeros(e, dtype=torch.float64)
    ent, bal, n_batches = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    prompts = prompt_items(items)
    device = mixer.routers[0].device
    for start in range(0, len(prompts), batch_size):
        batch = to_device(collate(prompts[start:start + batch_size], pad_id), device)
        mask, labels = batch["attention_mask"], batch["task_ids"]
        mixer.collect = []
        try:
            backbone_forward(model, batch)
            logits = mixer.collect
        finally:
            mixer.collect = None
        m = mask[..., None].double()
        for layer, z in enumerate(logits):
            gates = topk_softmax(z, mixer.top_k).double()
            per_seq = (gates * m).sum(1)                                           # [b, E]
            own_layer[layer].index_add_(0, labels.cpu(), per_seq.gather(1, labels[:, None]).squeeze(1).cpu())
            own_top = (z.argmax(-1) == labels[:, None]).double() * mask            # [b, t]
            share.index_add_(0, labels.cpu(), per_seq.cpu())
            top1.index_add_(0, labels.cpu(), own_top.sum(1).cpu())
            count.index_add_(0, labels.cpu(), mask.sum(1).double().cpu())
            b, h = rsl_terms(z, mask, mixer.top_k)
            bal, ent = bal + float(b), ent + float(h)
        n_batches += len(logits)
    model.train(was_training)
    seen = [i for i in range(e) if count[i] > 0]
    out_share = {mixer.tasks[i]: {t: round(float(share[i, j] / count[i]), 6) for j, t in enumerate(mixer.tasks)}
                 for i in seen}
    own = {mixer.tasks[i]: out_share[mixer.tasks[i]][mixer.tasks[i]] for i in seen}
    per_layer_tokens = count / max(len(mixer.layers), 1)                   # each layer sees every token once
    per_layer = [round(float(sum(own_layer[l, i] / per_layer_tokens[i] for i in seen) / max(len(seen), 1)), 6)
                 for l in range(len(mixer.layers))]
    return {"share": out_share, "own_share": own,
            "own_share_per_layer": dict(zip(mixer.layer_names, per_layer)),
            "top1_own": {mixer.tasks[i]: round(float(top1[i] / count[i]), 6) for i in seen},
            "mean_own_share": sum(own.values()) / max(len(own), 1),
            "entropy": ent / max(n_batches, 1), "balance": bal / max(n_batches, 1)}


# --------------------------------------------------------------------------- registry entries

@dataclass
class MixerEvalConfig:
    """lora_mixer at evaluation: how many experts each token keeps."""

    title = "LoRA-Mixer evaluation options"

    eval_mixer_top_k: int | None = field(default=None, metadata={
        "help": "lora_mixer: experts kept per token at inference; None: the trained mixer's --mixer-top-k"})

    def __post_init__(self):
        check_positive_ints(self, "eval_mixer_top_k")


class LoRAMixerMethod(Method):
    """LoRA-Mixer trained in one regime: `lora_mixer` (the default, plug) or `lora_mixer_<regime>`."""

    kind, family = "dynamic", "trained router"
    configs = (MixerEvalConfig,)
    SUMMARIES = {"plug": "trained router, per token", "finetune": "trained router, per token, tuned experts",
                 "joint": "trained router, per token, experts trained with it"}

    def __init__(self, regime: str):
        self.name = method_name(regime)
        self.summary = self.SUMMARIES.get(regime, f"trained router, per token ({regime})")
        self.help = (f"LoRA-Mixer ({regime} regime): RUN/compose/{self.name}'s routers mix the experts per token in "
                     "the projections (top-k)")

    def folder(self, env: Env) -> Path:
        return runs.compose_dir(env.run_dir, self.name)

    def meta(self, env: Env) -> dict:
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
        runs.check_built_from(self.name, folder, env.run_dir, self.adapter_tasks(env))

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
        needed = self.adapter_tasks(env)
        mixer = LoRAMixer.load(model, self.folder(env), {t: env.adapters[t] for t in needed} if needed else None,
                               env.opt(MixerEvalConfig).eval_mixer_top_k)
        try:
            yield mixer
        finally:
            mixer.remove()
