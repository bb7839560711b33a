"""Mixture-of-LoRAs (MoA): every task's LoRA side by side in each adapted layer, one chosen per sequence.

    y = W0 x + s_e * B_e (A_e x),   e = the expert (task LoRA) chosen for this sequence

Routers (`MoAConfig.router`), each a float32 nn.Linear to one logit per task:
  "study"  one router per adapted linear layer, on that layer's input at the prompt's last token
           (the reference study);
  "block"  one router per decoder block, on the block's input hidden states at the prompt's last
           token (Feng et al., "Mixture-of-LoRAs", LREC-COLING 2024: a sequence-level router
           before each block). We pool with the last prompt token, as the study does: it needs
           no attention mask and is what a causal model has seen of the whole prompt. The pooled
           residual stream is RMS-normalised (no parameters) first, because its scale grows with
           depth and has outlier dimensions; the study's layer inputs are mostly normalised already.
Inference rules (`MoAConfig.inference`), always hard top-1:
  "layer"  each router's argmax applies to its own layer(s) (the study);
  "last"   the last router's argmax (model order) applies to every layer;
  "vote"   majority over the routers' argmaxes; a tie goes to the tied expert with the highest
           summed softmax probability, then to the lowest index (`vote`).

Routing happens once per sequence: inside `with moa.session(experts, positions):` the routers
decide on the session's first forward (the prompt prefill of `model.generate`) and that decision
is held for every later forward (decoding steps with the KV cache). `experts` forces the experts
(oracle mode, or teacher forcing in training: the routers still compute their logits on the first
forward, with grad). For "last" and "vote" the first forward is preceded by a routing pass (the
same inputs, no cache, each layer on its own router's choice) because a layer's expert then
depends on routers after it. `MoAConfig.redecide_every_step` is the study's benchmark setting:
the routers re-decide on every forward at the last position.

The experts sit in the shared expert layer (src/experts.py, `ExpertLinear`): a batch may mix
experts (each sequence gets its own expert's output, no per-sequence copies, no loop), and
when the whole batch agrees the single expert's factors are used directly.

On disk (`save` / `load`): `moa_config.json` (config, tasks, router names, adapter sources, the
routers file's sha256) + `routers.safetensors`, plus `experts/<task>/` PEFT adapters when the
experts were trained too.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.cache_utils import Cache

from src import runs
from src.compose import Method
from src.errors import UserError, require_files
from src.experts import (EXPERTS_DIR, ROUTERS_NAME, ExpertLinear, Selection, _few, expert_adapter, expert_modules,
                         expert_order, inject_experts, load_router_tensors, remove_experts, save_routers)
from src.lora import Adapter, load_adapter, make_adapter

ROUTERS = ("study", "block")
INFERENCE = ("layer", "last", "vote")
CONFIG_NAME = "moa_config.json"
FORMAT_VERSION = 1


@dataclass
class MoAConfig:
    """Mixture-of-LoRAs: router design and inference rule."""

    router: str = field(default="study", metadata={
        "help": "study: one router per adapted linear layer, on its input at the last prompt token; "
                "block: one router per decoder block, on the block's input at the last prompt token "
                "(Feng et al. 2024)", "choices": ROUTERS})
    inference: str = field(default="layer", metadata={
        "help": "layer: each router's argmax for its own layers (the study); last: the last router's "
                "choice for all layers; vote: majority over routers (ties: highest summed probability, "
                "then lowest index)", "choices": INFERENCE})
    tasks: tuple[str, ...] = field(default=(), metadata={
        "help": "expert order (task names); empty: the order of the adapters given"})
    redecide_every_step: bool = field(default=False, metadata={
        "help": "the study's benchmark setting: routers re-decide at every forward, decoding steps "
                "included, at the last position (needs --inference layer); off: decide once from "
                "the prompt"})

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise UserError(f"--router must be one of {', '.join(ROUTERS)}; got {self.router!r}")
        if self.inference not in INFERENCE:
            raise UserError(f"--inference must be one of {', '.join(INFERENCE)}; got {self.inference!r}")
        if isinstance(self.tasks, str):
            self.tasks = tuple(t.strip() for t in self.tasks.split(",") if t.strip())
        self.tasks = tuple(self.tasks)
        dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dup:
            raise UserError(f"--tasks names a task twice: {', '.join(dup)}")
        if self.redecide_every_step and self.inference != "layer":
            raise UserError("--redecide-every-step needs --inference layer (a per-step 'last' or "
                            "'vote' decision would need a second pass through the KV cache)")


@dataclass
class RouterConfig:
    """train_moa.py: the router and its loss L = L_LM (with --lm-loss) + eta * L_cls.

    The study's setting (the default) is router-only cross-entropy with teacher forcing:
    the gold task's LoRA is active, `--no-lm-loss`, LoRAs frozen. Under teacher forcing
    with hard top-1 routing, L_LM has no gradient path to the routers; it only trains the
    LoRAs, so `--lm-loss` matters together with `--joint`.
    """

    router: str = field(default="study", metadata={
        "help": "study: one router per adapted linear layer; block: one per transformer block",
        "choices": ROUTERS})
    inference: str = field(default="layer", metadata={
        "help": "how routers decide at inference (and for the routing accuracy): layer (each router for "
                "its own layers, the study), last (the last router), vote (majority)",
        "choices": INFERENCE})
    eta: float = field(default=1.0, metadata={"help": "weight of the routing cross-entropy L_cls"})
    lm_loss: bool = field(default=False, metadata={
        "help": "add the target-only LM loss L_LM (teacher-forced; trains the LoRAs, so use with --joint)"})
    joint: bool = field(default=False, metadata={"help": "also tune the task LoRAs (otherwise they stay frozen)"})
    teacher_forcing: bool = field(default=True, metadata={
        "help": "run the gold task's LoRA while training (the study); --no-teacher-forcing runs the "
                "experts the routers pick, as at inference (deeper routers then cannot read the gold "
                "LoRA's trace in their inputs)"})

    def __post_init__(self):
        MoAConfig(router=self.router, inference=self.inference)  # one place validates both
        if not self.eta >= 0 or self.eta == float("inf"):
            raise UserError(f"--eta must be finite and not negative, got {self.eta}")
        if self.eta == 0 and not self.lm_loss:
            raise UserError("--eta 0 without --lm-loss leaves nothing to train")



# --------------------------------------------------------------------------- decisions (pure)

def vote(logits: torch.Tensor) -> torch.Tensor:
    """Majority over routers of each router's argmax; ties: highest summed softmax, then lowest index.

    Args: logits [n_routers, batch, n_experts]. Returns: LongTensor [batch].
    """
    n, _, n_experts = logits.shape
    counts = F.one_hot(logits.argmax(-1), n_experts).sum(0).double()   # [batch, n_experts]
    probs = logits.detach().double().softmax(-1).sum(0)                 # [batch, n_experts], each < n
    return (counts + probs / (n + 1)).argmax(-1)                         # probs only break count ties


def decide(logits: torch.Tensor, inference: str) -> torch.Tensor:
    """One expert per sequence from all routers' logits [n_routers, batch, n_experts] -> [batch].

    "last": the last router's argmax; "vote" (and "layer", for reporting): `vote`.
    """
    if inference == "last":
        return logits[-1].argmax(-1)
    return vote(logits)


@dataclass
class _Session:
    """One routing session's state, and what it decided."""

    forced: Selection | None
    positions: torch.Tensor | None       # [batch] last prompt token; None: -1
    n_routers: int
    active: bool = True
    forwards: int = 0                    # finished forwards of the outer model
    routing: bool = True                 # routers run in this forward
    record: bool = True                  # ... and their logits are the session's router_logits()
    logits: list = field(default_factory=list)        # per router: [batch, n_experts]
    choice: list = field(default_factory=list)        # per router: Selection of its own argmax
    decision: Selection | None = None    # "last" / "vote": one expert for every layer
    steps: list = field(default_factory=list)         # per forward: per layer Selection used

    def __post_init__(self):
        self.logits = [None] * self.n_routers
        self.choice = [None] * self.n_routers

    def router_logits(self) -> torch.Tensor:
        if any(t is None for t in self.logits):
            raise RuntimeError("no routing forward yet: run the model inside `with moa.session(...)`")
        return torch.stack([t.to(self.logits[0].device) for t in self.logits])

    def chosen(self, inference: str) -> torch.Tensor:
        if self.forced is not None:
            return self.forced.experts
        if self.decision is not None:
            return self.decision.experts
        return decide(self.router_logits(), inference)

    def step_decisions(self) -> torch.Tensor:
        return torch.stack([torch.stack([sel.experts.cpu() for sel in step]) for step in self.steps])


def _live(session: _Session | None) -> _Session:
    if session is None:
        raise RuntimeError("no routing forward yet: run the model inside `with moa.session(...)`")
    return session


# --------------------------------------------------------------------------- helpers

def _block_of(model: nn.Module, name: str) -> str:
    """The decoder block holding module `name`: the child of the outermost ModuleList on its path."""
    parts = name.split(".")
    for k in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:k])), nn.ModuleList):
            return ".".join(parts[: k + 1])
    raise UserError(f"--router block: module {name} is not inside a list of decoder blocks")


# Keywords under which some transformers version hands a model its generation cache.
CACHE_KEYWORDS = ("past_key_values", "cache", "past_key_value", "cache_params", "state", "mems",
                  "past_buckets_states")


def without_cache(kwargs: dict) -> dict:
    """`kwargs` minus every generation cache: any `transformers` Cache object under any keyword,
    and the known cache keywords (whatever they hold), so a forward run with them neither reads
    nor extends the caller's cache."""
    return {k: v for k, v in kwargs.items() if not (isinstance(v, Cache) or k in CACHE_KEYWORDS)}


def make_routers(model: nn.Module, modules: list[str], router: str, n_experts: int):
    """(router names, each adapted layer's router index, the routers): float32 nn.Linear to one logit
    per expert, zero-initialised (uniform gates; each router's CE is convex in it); "study": one per
    adapted layer on its input, "block": one per decoder block on the block's input."""
    by_name = dict(model.named_modules())
    if router == "study":
        names, sizes = list(modules), [(by_name[n].in_features, by_name[n].weight.device) for n in modules]
        layer_router = list(range(len(modules)))
    else:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not hidden:
            raise UserError("--router block needs model.config.hidden_size")
        names = list(dict.fromkeys(_block_of(model, n) for n in modules))
        sizes = [(hidden, next(by_name[b].parameters()).device) for b in names]
        layer_router = [names.index(_block_of(model, n)) for n in modules]
    routers = nn.ModuleList(nn.Linear(d, n_experts, dtype=torch.float32, device=dev) for d, dev in sizes)
    for r in routers:
        nn.init.zeros_(r.weight)
        nn.init.zeros_(r.bias)
    return names, layer_router, routers


def pooled(h: torch.Tensor, s: _Session) -> torch.Tensor:
    """h [batch, tokens, d] at the session's positions on its first forward, else at -1: [batch, d]."""
    if s.positions is None or s.forwards != 0:
        return h[:, -1]
    pos = s.positions.to(h.device)
    if pos.shape[0] != h.shape[0]:
        if h.shape[0] % pos.shape[0]:
            raise UserError(f"session(positions=...) has {pos.shape[0]} entries for a batch of {h.shape[0]}")
        pos = pos.repeat_interleave(h.shape[0] // pos.shape[0])
    return h[torch.arange(h.shape[0], device=h.device), pos]


def expert_indices(experts, tasks: list[str], device) -> torch.Tensor:
    """Forced experts (a LongTensor, task names or indices) as a LongTensor [batch], checked."""
    if not torch.is_tensor(experts):
        experts = [task_index(tasks, e) if isinstance(e, str) else int(e) for e in experts]
    e = torch.as_tensor(experts, dtype=torch.long, device=device).reshape(-1)
    if e.numel() == 0:
        raise UserError("session(experts=...) is empty")
    lo, hi = int(e.min()), int(e.max())
    if lo < 0 or hi >= len(tasks):
        raise UserError(f"expert index {lo if lo < 0 else hi} out of range: {len(tasks)} experts {tasks}")
    return e


def task_index(tasks: list[str], task: str) -> int:
    if task not in tasks:
        raise UserError(f"unknown task {task!r}; the experts are {tasks}")
    return tasks.index(task)


# --------------------------------------------------------------------------- the mixture

class SequenceRouting:
    """The once-per-sequence routing of a `MixtureOfLoRAs`: the session, the model hooks that run the
    routers and hold their decision, and what the session decided. It reads the mixture's cfg,
    routers, router_names, _layer_router, layers, layer_names, tasks, _session, _in_routing_pass and
    _keep_one_logit (set by `MixtureOfLoRAs.__init__`)."""

    kind = "sequence"     # the router protocol (src/compose.py): one expert per sequence

    @contextmanager
    def session(self, experts: torch.Tensor | Sequence[int | str] | None = None,
                positions: torch.Tensor | Sequence[int] | int | None = None,
                prompt_mask: torch.Tensor | None = None) -> Iterator["MixtureOfLoRAs"]:
        """Route each sequence once: on the first forward at `positions`, held for later forwards.

        experts: LongTensor [batch] (or task names / indices) forces the experts for every layer;
            the routers still compute their logits on the first forward (teacher forcing).
        positions: [batch] index of each sequence's last prompt token; default -1 (left padding).
        prompt_mask: unused (the router reads the last prompt token only).
        """
        if self._session is not None and self._session.active:
            raise RuntimeError("MoA sessions do not nest")
        if not self.layers:
            raise RuntimeError("this MixtureOfLoRAs was removed from its model")
        device = self.routers[0].weight.device
        forced = None if experts is None else Selection(expert_indices(experts, self.tasks, device))
        if positions is not None:
            positions = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1)
        self._session = _Session(forced, positions, len(self.routers))
        try:
            yield self
        finally:
            self._session.active = False

    def _pre_forward(self, module, args, kwargs):
        if self._in_routing_pass:
            return None
        s = self._session
        if s is None or not s.active:
            raise RuntimeError("MixtureOfLoRAs: run the model inside `with moa.session(...)` "
                               "(routing is decided per session)")
        first = s.forwards == 0
        s.record = first
        s.routing = first or (s.forced is None and self.cfg.redecide_every_step)
        if first and s.forced is None and self.cfg.inference != "layer":
            # the prompt once more, no cache (whatever the installed transformers calls it: dropped by
            # type, not keyword), each layer on its own router: the logits for last / vote
            kw = {**without_cache(kwargs), "use_cache": False, **({"logits_to_keep": 1} if self._keep_one_logit else {})}
            kw.pop("labels", None)
            self._in_routing_pass = True
            try:
                module(*args, **kw)
            finally:
                self._in_routing_pass = False
            s.decision = Selection(decide(self.router_logits(), self.cfg.inference))
            s.routing = s.record = False
        return None

    def _post_forward(self, module, args, output):
        if not self._in_routing_pass:
            s = self._session
            s.steps.append([self._selection(i) for i in range(len(self.layers))])
            s.forwards += 1
            s.routing = s.record = False

    def _route(self, i: int, h: torch.Tensor) -> None:
        """Router i on hidden states h [batch, tokens, d] at the session's positions (or -1)."""
        s = self._session
        if s is None or not s.active:
            raise RuntimeError("MixtureOfLoRAs: run the model given to it inside `with moa.session(...)`")
        if not s.routing:
            return
        router = self.routers[i]
        x = pooled(h, s).to(device=router.weight.device, dtype=router.weight.dtype)     # [batch, d]
        if self.cfg.router == "block":       # the residual stream's scale grows with depth: normalise
            x = F.rms_norm(x, x.shape[-1:])
        logits = router(x)                                             # [batch, n_experts]
        if s.record:
            s.logits[i] = logits
        s.choice[i] = Selection(logits.detach().argmax(-1))

    def _selection(self, layer: int) -> Selection:
        s = self._session
        if s.forced is not None or s.decision is not None:
            return s.forced if s.forced is not None else s.decision
        sel = s.choice[self._layer_router[layer]]
        if sel is None:
            raise RuntimeError(f"MoA router {self.router_names[self._layer_router[layer]]} did not run "
                               f"before layer {self.layer_names[layer]}")
        return sel

    def _select(self, layer: ExpertLinear, x: torch.Tensor, keys=None) -> Selection:
        if self.cfg.router == "study":
            self._route(layer.index, x)
        return self._selection(layer.index)

    def _block_hook(self, i: int):
        return lambda module, args, kwargs: self._route(i, args[0] if args else kwargs["hidden_states"])

    # ----------------------------------------------------------------- what the session decided

    def router_logits(self) -> torch.Tensor:
        """[n_routers, batch, n_experts] from the session's routing forward (with grad when training)."""
        return _live(self._session).router_logits()

    def chosen_experts(self) -> torch.Tensor:
        """[batch] the expert per sequence: forced, or the last/vote decision; "layer": the routers' vote."""
        return _live(self._session).chosen(self.cfg.inference)

    def layer_shares(self) -> torch.Tensor:
        """[n_layers, batch, n_experts]: one-hot of the expert each adapted layer used on the prompt
        (the session's first forward): the per-layer routing of evaluation's heatmaps."""
        return F.one_hot(self.step_decisions()[0], len(self.tasks)).float()

    def routing_records(self) -> list[dict]:
        """Per sequence of the session: {"routed_task": the expert it was routed to}."""
        return [{"routed_task": self.tasks[int(e)]} for e in self.chosen_experts().reshape(-1).tolist()]

    def step_decisions(self) -> torch.Tensor:
        """[n_forwards, n_layers, batch]: the expert each layer used in each forward of the session."""
        if self._session is None or not self._session.steps:
            raise RuntimeError("no forward in this session yet")
        return self._session.step_decisions()

    def router_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """The study's router loss: cross-entropy against the task labels [batch], averaged over routers."""
        logits = self.router_logits()                                    # [n_routers, batch, n_experts]
        labels = labels.to(logits.device).reshape(1, -1).expand(logits.shape[0], -1)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


class MixtureOfLoRAs(SequenceRouting, nn.Module):
    """Per-task LoRAs side by side in `model`'s layers and trainable routers that pick one per sequence.

    Injects expert layers (src/experts.py) into `model` in place (undo with `remove()`). `routers` holds the
    trainable parameters; the experts are frozen unless `set_experts_trainable(True)`. Run the
    model (the object given here: `model(...)`, `model.generate(...)`) inside `session()`
    (`SequenceRouting`: the routing itself).
    """

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter], cfg: MoAConfig | None = None,
                 *, sources: dict[str, str | os.PathLike | None] | None = None):
        super().__init__()
        cfg = cfg or MoAConfig()
        tasks = expert_order(adapters, cfg.tasks)
        modules = expert_modules(model, adapters, tasks)                # checked, in model order
        self.router_names, self._layer_router, self.routers = make_routers(model, modules, cfg.router, len(tasks))
        self.cfg = dataclasses.replace(cfg, tasks=tuple(tasks))
        self.tasks = list(tasks)
        self.sources = {t: (str(sources[t]) if sources and sources.get(t) else None) for t in tasks}
        self._adapter_configs = {t: dict(adapters[t].config) for t in tasks}
        self.__dict__["model"] = model            # not a submodule: moa.state_dict() stays small
        self._session: _Session | None = None
        self._in_routing_pass = False
        self._keep_one_logit = "logits_to_keep" in inspect.signature(model.forward).parameters
        names, layers = inject_experts(model, adapters, tasks, self._select)
        assert names == modules
        self.layer_names = list(modules)
        self.layers = nn.ModuleList(layers)      # shared with `model`: moa.parameters() has the experts
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward)]
        if cfg.router == "block":
            self._hooks += [model.get_submodule(b).register_forward_pre_hook(self._block_hook(i), with_kwargs=True)
                            for i, b in enumerate(self.router_names)]

    # ----------------------------------------------------------------- training, removal, I/O

    def set_experts_trainable(self, trainable: bool = True) -> None:
        """Joint training: let the LoRA experts learn too (the routers always do)."""
        for layer in self.layers:
            layer.lora_A.requires_grad_(trainable)
            layer.lora_B.requires_grad_(trainable)

    def forward(self, *args, **kwargs):
        """The wrapped model's forward (run it inside `session()`)."""
        return self.model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Put the plain nn.Linear layers back and drop the hooks; idempotent. Returns the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        remove_experts(self.model, self.layer_names, self.layers)
        self.layers, self.layer_names, self._session = nn.ModuleList(), [], None
        return self.model

    def expert_adapter(self, task: str) -> Adapter:
        """Task's expert as an Adapter (CPU copies; differs from the input only after joint training)."""
        return expert_adapter(self.layer_names, self.layers, task_index(self.tasks, task),
                              self._adapter_configs[task], task)

    def save(self, folder: str | os.PathLike, save_experts: bool = False) -> Path:
        return save_mixture(self, folder, save_experts)

    @classmethod
    def load(cls, model: nn.Module, folder: str | os.PathLike,
             adapters: dict[str, Adapter] | None = None) -> "MixtureOfLoRAs":
        return load_mixture(model, folder, adapters)


# --------------------------------------------------------------------------- on disk

def save_mixture(moa: MixtureOfLoRAs, folder: str | os.PathLike, save_experts: bool = False) -> Path:
    """moa_config.json + routers.safetensors (+ experts/<task>/ PEFT adapters), each written atomically
    (`experts.save_routers`: the config last, with the routers file's sha256)."""
    tensors = {}
    for i, r in enumerate(moa.routers):
        tensors[f"routers.{i}.weight"] = r.weight
        tensors[f"routers.{i}.bias"] = r.bias
    meta = {
        "format": "mixture_of_loras", "version": FORMAT_VERSION,
        "config": dataclasses.asdict(moa.cfg), "tasks": moa.tasks,
        "routers": moa.router_names, "router_in_features": [r.in_features for r in moa.routers],
        "adapters": {t: {"source": moa.sources[t],
                         "base_model": moa._adapter_configs[t].get("base_model_name_or_path")}
                     for t in moa.tasks},
        "experts_saved": bool(save_experts),
    }
    experts = {t: moa.expert_adapter(t) for t in moa.tasks} if save_experts else None
    return save_routers(folder, tensors, CONFIG_NAME, meta, experts)


def load_mixture(model: nn.Module, folder: str | os.PathLike,
                 adapters: dict[str, Adapter] | None = None) -> MixtureOfLoRAs:
    """A saved mixture on `model`. adapters default: experts/<task>/ if saved, else the recorded sources."""
    folder = Path(folder)
    cfg_path, w_path = require_files(folder, "MoA folder", CONFIG_NAME, ROUTERS_NAME)
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = MoAConfig(**meta["config"])
        tasks = list(meta["tasks"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: not a MoA config ({e})") from None
    recorded = {t: (meta.get("adapters", {}).get(t) or {}).get("source") for t in tasks}
    if adapters is None:
        adapters = {}
        for t in tasks:
            path = folder / EXPERTS_DIR / t if meta.get("experts_saved") else recorded[t]
            if path is None:
                raise UserError(f"{cfg_path}: no source recorded for task {t!r}; pass adapters=")
            adapters[t] = load_adapter(path)
    else:
        missing = [t for t in tasks if t not in adapters]
        if missing:
            raise UserError(f"{cfg_path}: no adapter given for expert {', '.join(missing)}")
        adapters = {t: adapters[t] for t in tasks}      # extra adapters are not experts here
    tensors = load_router_tensors(folder, CONFIG_NAME, meta)
    moa = MixtureOfLoRAs(model, adapters, cfg, sources=recorded)
    try:
        if moa.router_names != meta.get("routers"):
            raise UserError(f"{cfg_path}: its routers ({_few(meta.get('routers') or [])}) are not "
                            f"this model's ({_few(moa.router_names)})")
        state = {k.removeprefix("routers."): v for k, v in tensors.items()}
        try:
            moa.routers.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{w_path}: routers do not fit this model ({str(e).splitlines()[0]})") from None
    except BaseException:
        moa.remove()
        raise
    return moa


# --------------------------------------------------------------------------- registry entries

@torch.no_grad()
def routed_adapters(moa: MixtureOfLoRAs, model: nn.Module, tokenizer, prompt_ids, batch_size: int):
    """What the routers choose for each prompt, as the one adapter that serves it (the vLLM engine):
    a forward over each batch of prompts (left-padded, as `generate` pads them) decides every adapted
    layer's expert, as the first forward of generation does; the prompt's adapter has, in each layer,
    its chosen expert's factors. Prompts with the same choices share one adapter. Returns
    `compose.Served` with MoA's routing records and per-layer shares."""
    from src.compose import Served
    from src.evaluation import _pad_id, length_sorted_batches, model_device, pad_batch
    experts = [moa.expert_adapter(t) for t in moa.tasks]
    made: dict[tuple[int, ...], Adapter] = {}
    n = len(prompt_ids)
    adapters, records, shares = [None] * n, [None] * n, [None] * n
    for idx in length_sorted_batches([len(p) for p in prompt_ids], batch_size):
        ids, mask = pad_batch([prompt_ids[i] for i in idx], _pad_id(tokenizer), "left", model_device(model))
        with moa.session():
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            choice = moa.step_decisions()[0]                    # [n_layers, batch]
            recs, layer = moa.routing_records(), moa.layer_shares()
        for b, i in enumerate(idx):
            key = tuple(int(e) for e in choice[:, b])
            if key not in made:
                chosen = {name: experts[e] for name, e in zip(moa.layer_names, key)}
                made[key] = make_adapter({m: ad.factors[m] for m, ad in chosen.items()},
                                         {m: ad.scales[m] for m, ad in chosen.items()}, experts[key[0]].base_model,
                                         name="moa:" + "+".join(sorted({moa.tasks[e] for e in key})))
            adapters[i], records[i], shares[i] = made[key], recs[b], layer[:, b]
    return Served(adapters, records, shares, list(moa.tasks), list(moa.layer_names))


def moa_experts(folder: Path) -> tuple[list[str], bool]:
    """(expert task names, whether the experts are saved inside the MoA folder) from moa_config.json."""
    path = Path(folder) / CONFIG_NAME
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


class MoA(Method):
    name, kind = "moa", "dynamic"
    family, summary = "trained router", "trained router, per sequence"
    help = "Mixture-of-LoRAs: RUN/moa's trained routers pick one expert per sequence"

    def check(self, env):
        folder = runs.moa_dir(env.run_dir)
        if not (folder / CONFIG_NAME).is_file():
            raise UserError(f"method moa needs a trained MoA: no {folder}/{CONFIG_NAME} "
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
        runs.check_built_from(self.name, folder, env.run_dir, [] if saved else experts)

    def adapter_tasks(self, env):
        experts, saved = moa_experts(runs.moa_dir(env.run_dir))
        return [] if saved else experts

    def fingerprint(self, env, task):
        return {"moa": {"files": runs.moa_digest(runs.moa_dir(env.run_dir)),
                        "adapters": [env.digests[t] for t in self.adapter_tasks(env)]}}

    vllm = True   # decided once per sequence: each prompt's choice is one LoRA on the vLLM engine

    def served(self, model, tokenizer, env, task, prompt_ids, batch_size, draw=None):
        with self.prepare(model, env, task) as moa:
            if moa.cfg.redecide_every_step:
                raise UserError(f"{runs.moa_dir(env.run_dir)} re-decides at every step (redecide_every_step): "
                                "one LoRA per request cannot serve it; evaluate it with --engine hf")
            return routed_adapters(moa, model, tokenizer, prompt_ids, batch_size)

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
    vllm = False  # re-decides at every step: stays on the hf engine
    summary = "trained router, per sequence, re-decided per step"
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
