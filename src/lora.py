"""LoRA: a thin wrapper on nn.Linear, injection by module name, and PEFT-format I/O.

    y = W0 x + scale * B (A x),  A: [r, in] (Kaiming-uniform), B: [out, r] (zeros),
    scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

Verbs: `add_lora`, `lora_layers`, `merge_lora` / `unmerge_lora`, `disable_adapters`,
`unload_lora`, `Adapter` (tensors + PEFT config), `load_adapter` / `save_adapter`,
`apply_adapter`, `adapter_from_model`, `export_merged_model`.

On disk an adapter is PEFT's `adapter_config.json` + `adapter_model.safetensors`
(keys `base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
reads what we write and we read what PEFT writes.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from src.errors import UserError, require_files, writing
from src.runs import atomic_dir, replace_dir

# The study's targets: attention q/k/v and the MLP's gate/up/down in every block.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _number(x) -> bool:
    """A finite int or float (not a bool, which JSON and Python would let pass as 0 / 1)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and math.isfinite(x))


def _positive_number(x) -> bool:
    return _number(x) and x > 0


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass
class LoraConfig:
    """LoRA hyperparameters (the study: r 8, alpha 16, q/k/v/gate/up/down)."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch input"})
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={
        "help": "module names (suffixes) or regexes of the nn.Linear layers to adapt"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scale alpha/sqrt(r)"})

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t for t in self.target_modules.split(",") if t)
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"--rank must be a positive integer, got {self.rank}")
        if not _positive_number(self.alpha):
            raise UserError(f"--alpha must be positive and finite, got {self.alpha}")
        if not (_number(self.dropout) and 0.0 <= self.dropout < 1.0):  # also refuses nan
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UserError("--target-modules is empty")

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.use_rslora)


class LoRALinear(nn.Module):
    """An existing nn.Linear plus a low-rank update; the base layer stays frozen and untouched.

    LoRA parameters live in float32 whatever the base dtype (bf16 factors lose the
    small updates); inputs are cast to them and the update cast back.
    """

    def __init__(self, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = linear
        self.r, self.alpha = r, alpha
        self.scale = lora_scale(r, alpha, use_rslora)
        dev = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, r, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True

    @classmethod
    def from_factors(cls, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> "LoRALinear":
        """A LoRALinear around `linear` holding the given factors (A [r, in], B [out, r]) and scale."""
        layer = cls(linear, a.shape[0], scale * a.shape[0])
        layer.scale = float(scale)              # exactly, whatever alpha / r rounds to
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        return layer

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]), the parameters themselves."""
        return self.lora_A, self.lora_B

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, [out, in], in the LoRA dtype."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if self.merged or not self.enabled:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no per-token LoRA cost); idempotent."""
        if not self.merged:
            w = self.linear.weight
            w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the folded update again; idempotent."""
        if self.merged:
            w = self.linear.weight
            w.copy_((w.float() - self.delta_weight().float()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, merged={self.merged}"


# --------------------------------------------------------------------------- injection

def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """A pattern matches the module's last name component, or the full name as a regex."""
    last = name.rsplit(".", 1)[-1]
    return any(p == last or re.fullmatch(p, name) for p in patterns)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name in the base model: LoRALinear} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, LoRALinear]:
    """Wrap every matching nn.Linear in a LoRALinear; freeze everything but the LoRA factors."""
    if lora_layers(model):
        raise UserError("model already has LoRA layers; call unload_lora(model) first")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and matches(n, cfg.target_modules)]
    if not names:
        raise UserError(f"no nn.Linear matches target modules {list(cfg.target_modules)}")
    model.requires_grad_(False)
    for n in names:
        set_module(model, n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.alpha,
                                         cfg.dropout, cfg.use_rslora))
    return lora_layers(model)


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Base-model outputs without a reload: unmerge and switch off every LoRA layer."""
    layers = lora_layers(model).values()
    state = [(m, m.merged, m.enabled) for m in layers]
    for m in layers:
        m.unmerge()
        m.enabled = False
    try:
        yield model
    finally:
        for m, merged, enabled in state:
            m.enabled = enabled
            if merged:
                m.merge()


def unload_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the plain nn.Linear layers back; with merge=True their weights keep the update."""
    for name, m in lora_layers(model).items():
        m.merge() if merge else m.unmerge()
        set_module(model, name, m.linear)
    return model


# --------------------------------------------------------------------------- adapters

@dataclass
class Adapter:
    """Adapter tensors and their PEFT config.

    factors: {module name: (A [r, in], B [out, r])}; scales: {module name: float}.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    config: dict = field(default_factory=dict)
    name: str = ""

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> dict[str, int]:
        return {n: a.shape[0] for n, (a, _) in self.factors.items()}

    @property
    def target_modules(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n in self.factors})

    def delta(self, module: str) -> torch.Tensor:
        """scale * B @ A for one module, [out, in] (dense: for tests and small layers)."""
        a, b = self.factors[module]
        return (b.float() @ a.float()) * self.scales[module]


def peft_config(r: int, alpha: float, target_modules: list[str], base_model: str | None,
                use_rslora: bool = False, dropout: float = 0.0,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> dict:
    """An adapter_config.json that PEFT's LoraConfig reads."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(r), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
        "target_modules": sorted(target_modules), "use_rslora": bool(use_rslora),
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
    }


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name ending in it (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def make_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scales: dict[str, float],
                 base_model: str | None, use_rslora: bool = False, name: str = "",
                 dropout: float = 0.0) -> Adapter:
    """An Adapter with a PEFT config that reproduces `scales` exactly.

    The most common (rank, scale) becomes `r` / `lora_alpha`; other modules get
    `rank_pattern` / `alpha_pattern` entries, which PEFT honours.
    """
    if not factors:
        raise UserError("an adapter needs at least one module")
    rs = {n: int(a.shape[0]) for n, (a, _) in factors.items()}
    r0, s0 = Counter((rs[n], scales[n]) for n in factors).most_common(1)[0][0]
    to_alpha = (lambda r, s: s * math.sqrt(r)) if use_rslora else (lambda r, s: s * r)
    rank_pattern, alpha_pattern = {}, {}
    for n in factors:
        if (rs[n], scales[n]) != (r0, s0):
            rank_pattern[n] = rs[n]
            alpha_pattern[n] = to_alpha(rs[n], scales[n])
    cfg = peft_config(r0, to_alpha(r0, s0), sorted({n.rsplit(".", 1)[-1] for n in factors}),
                      base_model, use_rslora, dropout, rank_pattern, alpha_pattern)
    return Adapter(dict(factors), dict(scales), cfg, name)


def save_adapter(adapter: Adapter, folder: str | os.PathLike,
                 extra_json: dict[str, dict] | None = None) -> Path:
    """Write PEFT's two files (plus e.g. `training_config.json`) atomically into `folder`."""
    folder = Path(folder)
    tmp = atomic_dir(folder)
    try:
        tensors = {}
        for n, (a, b) in adapter.factors.items():
            tensors[f"{_PREFIX}{n}.lora_A.weight"] = a.detach().to("cpu").contiguous()
            tensors[f"{_PREFIX}{n}.lora_B.weight"] = b.detach().to("cpu").contiguous()
        with writing(folder):
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2) + "\n")
            for fname, obj in (extra_json or {}).items():
                (tmp / fname).write_text(json.dumps(obj, indent=2, default=str) + "\n")
            replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# PEFT LoraConfig features that change what an adapter computes beyond W0 x + s B A x, or
# that need tensors besides lora_A / lora_B: refused by field name, never silently dropped.
# (VeLoRA, EVA, MiCA, orthogonal or Gaussian init, layers_to_transform, exclude_modules end
# in a plain LoRA and load as one.)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_set(value) -> bool:
    return value not in (None, False, "", [], {})


def _changes_base(init) -> bool:
    return isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS)


_UNSUPPORTED = (
    ("use_dora", _is_set, "DoRA adapters are not supported"),
    ("lora_bias", _is_set, "a bias on lora_B is not supported"),
    ("bias", lambda v: v not in (None, "none"), "bias tensors are not supported"),
    ("fan_in_fan_out", _is_set, "transposed (fan_in, fan_out) weights are not supported"),
    ("modules_to_save", _is_set, "fully trained copies of modules are not supported"),
    ("trainable_token_indices", _is_set, "trainable token embeddings are not supported"),
    ("layer_replication", _is_set, "layer replication is not supported"),
    ("megatron_config", _is_set, "Megatron parallel layers are not supported"),
    ("target_parameters", _is_set, "LoRA on bare parameters is not supported"),
    ("alora_invocation_tokens", _is_set, "Activated LoRA (aLoRA) is not supported"),
    ("use_qalora", _is_set, "QALoRA is not supported"),
    ("use_bdlora", _is_set, "block-diagonal LoRA (BD-LoRA) is not supported"),
    ("kasa_config", _is_set, "KaSA adapters are not supported"),
    ("monteclora_config", _is_set, "MonteCLoRA adapters are not supported"),
    ("arrow_config", _is_set, "PEFT's Arrow routing is not supported"),
    ("init_lora_weights", _changes_base, ("this initialisation also changes the base weights, which the "
                                          "adapter files do not hold (convert it to a plain LoRA with PEFT)")),
)

_LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else "set"


def check_adapter_config(cfg, path: Path) -> None:
    """A UserError naming the field when an adapter_config.json is not a plain LoRA we can apply."""
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: not a JSON object (got {type(cfg).__name__})")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for name, is_set, why in _UNSUPPORTED:
        if is_set(cfg.get(name)):
            raise UserError(f"{path}: {name} is {_shown(cfg[name])}: {why} (only plain LoRA)")
    if "r" in cfg and not _positive_int(cfg["r"]):
        raise UserError(f"{path}: r must be a positive integer, got {_shown(cfg['r'])}")
    if "lora_alpha" in cfg and not _positive_number(cfg["lora_alpha"]):
        raise UserError(f"{path}: lora_alpha must be positive and finite, got {_shown(cfg['lora_alpha'])}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise UserError(f"{path}: use_rslora must be true or false, got {_shown(cfg['use_rslora'])}")
    for name, ok, what in (("rank_pattern", _positive_int, "a positive integer"),
                           ("alpha_pattern", _positive_number, "positive and finite")):
        patterns = cfg.get(name) or {}
        if not isinstance(patterns, dict):
            raise UserError(f"{path}: {name} must be an object, got {_shown(patterns)}")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as e:
                raise UserError(f"{path}: {name} key {key!r} is not a valid regex ({e})") from None
            if not ok(value):
                raise UserError(f"{path}: {name}[{key!r}] must be {what}, got {_shown(value)}")


def _foreign_tensor(key: str) -> str:
    """What a tensor that is not a lora_A / lora_B weight holds, for the error message."""
    for part, what in (("lora_magnitude_vector", "a DoRA magnitude vector"),
                       ("modules_to_save", "a modules_to_save copy of a module"),
                       ("trainable_tokens", "trainable token embeddings"),
                       ("lora_embedding", "a LoRA on an embedding")):
        if part in key:
            return what
    return "a bias" if key.endswith(".bias") else "not a LoRA factor"


def load_adapter(folder: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter folder (ours or PEFT's), honouring rank/alpha patterns and rsLoRA.

    Anything beyond a plain LoRA (a config feature in `_UNSUPPORTED`, a tensor that is not a
    lora_A / lora_B weight) is a UserError naming it, never silently dropped.
    """
    folder = Path(folder)
    cfg_path, w_path = require_files(folder, "adapter folder", CONFIG_NAME, WEIGHTS_NAME)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e})") from None
    check_adapter_config(cfg, cfg_path)
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{w_path}: unreadable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sorted(tensors.items()):
        m = _LORA_KEY.fullmatch(key)
        if not m:
            raise UserError(f"{w_path}: tensor {key} is {_foreign_tensor(key)}: only plain LoRA "
                            f"(<module>.lora_A.weight / lora_B.weight) is supported")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise UserError(f"{w_path}: no LoRA tensors (keys like base_model.model.<module>.lora_A.weight)")
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = cfg.get("use_rslora", False)
    factors, scales = {}, {}
    for n, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{w_path}: module {n} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{w_path}: module {n}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit")
        r = _pattern_value(cfg.get("rank_pattern") or {}, n, r0)
        if r != a.shape[0]:
            raise UserError(f"{w_path}: module {n} has rank {a.shape[0]} but the config says {r}")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, n, alpha0)
        factors[n] = (a, b)
        scales[n] = lora_scale(r, alpha, rslora)
    return Adapter(factors, scales, cfg, folder.name)


def adapter_from_model(model: nn.Module, base_model: str | None = None, name: str = "") -> Adapter:
    """The LoRA layers of `model` as an Adapter (tensors detached, on CPU)."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("model has no LoRA layers")
    factors = {n: (m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone()) for n, m in layers.items()}
    any_layer = next(iter(layers.values()))
    rslora = not math.isclose(any_layer.scale, any_layer.alpha / any_layer.r)
    dropout = getattr(any_layer.dropout, "p", 0.0)
    return make_adapter(factors, {n: m.scale for n, m in layers.items()}, base_model, rslora, name, dropout)


def check_adapter_fits(model: nn.Module, adapter: Adapter) -> None:
    """Every adapter module exists in the model as a Linear of matching shape, else UserError."""
    modules = dict(model.named_modules())
    for n, (a, b) in adapter.factors.items():
        m = modules.get(n)
        if isinstance(m, LoRALinear):
            m = m.linear
        if not isinstance(m, nn.Linear):
            raise UserError(f"adapter {adapter.name or ''} module {n}: no such nn.Linear in the model".replace("  ", " "))
        want = (m.out_features, m.in_features)
        if a.shape[1] != want[1] or b.shape[0] != want[0]:
            raise UserError(f"adapter {adapter.name} module {n}: lora_B @ lora_A is "
                            f"[{b.shape[0]}, {a.shape[1]}] but the layer is {list(want)}")


def apply_adapter(model: nn.Module, adapter: Adapter, trainable: bool = False) -> dict[str, LoRALinear]:
    """Inject LoRA layers holding `adapter`'s tensors (shapes checked first, nothing changed on error)."""
    check_adapter_fits(model, adapter)
    if lora_layers(model):
        raise UserError("model already has LoRA layers; call unload_lora(model) first")
    model.requires_grad_(False)
    for n, (a, b) in adapter.factors.items():
        layer = LoRALinear.from_factors(model.get_submodule(n), a, b, adapter.scales[n])
        layer.requires_grad_(trainable)
        set_module(model, n, layer)
    return lora_layers(model)


@contextmanager
def folded(model: nn.Module, adapter: Adapter) -> Iterator[nn.Module]:
    """The model with `adapter` folded into its weights (W <- W + s B A), no LoRA layer left.

    Inference then costs exactly what the base model costs. On exit the touched weights
    are restored from a CPU copy (exact, unlike subtracting the delta again in bf16; on a
    GPU the copy costs no GPU memory).
    """
    check_adapter_fits(model, adapter)
    backup = {n: model.get_submodule(n).weight.detach().to("cpu", copy=True) for n in adapter.factors}
    try:
        apply_adapter(model, adapter)
        unload_lora(model, merge=True)   # fold, then put the plain nn.Linear back
        yield model
    finally:
        unload_lora(model, merge=False)  # only if apply succeeded and unload did not
        with torch.no_grad():
            for n, w in backup.items():
                model.get_submodule(n).weight.copy_(w)



def export_merged_model(model: nn.Module, adapter: Adapter, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """A plain Hugging Face model folder with the adapter folded into the weights.

    Works on the model in place: the LoRA layers are removed again and the base weights
    restored exactly (from a CPU copy: merge-then-unmerge is not exact in bf16) before
    returning, also on error.
    """
    out_dir = Path(out_dir)
    apply_adapter(model, adapter)
    originals = {n: m.linear.weight.detach().to("cpu", copy=True) for n, m in lora_layers(model).items()}
    tmp = atomic_dir(out_dir)
    try:
        merge_lora(model)
        saved = {n: m for n, m in lora_layers(model).items()}
        for n, m in saved.items():
            set_module(model, n, m.linear)
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for n, m in saved.items():
            set_module(model, n, m)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        unload_lora(model, merge=False)
        with torch.no_grad():
            for n, w in originals.items():
                model.get_submodule(n).weight.copy_(w)
    return out_dir
