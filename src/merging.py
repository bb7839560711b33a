"""Router-free LoRA merges: pure functions on one module's factors, a registry, one entry point.

Every method in `MERGES` takes one module's factors from N adapters and returns one LoRA:

    fn(factors: [(A_i [r_i, in], B_i [out, r_i])], scales: [s_i], weights: [w_i], **options)
        -> (A [r, in], B [out, r], scale)          # dW = scale * B @ A

`merge_adapters(adapters, method, weights, **options)` checks that the adapters fit
together, runs the method on every module and returns an ordinary `Adapter` (PEFT format
on disk). `VARIANTS` are named option sets of a method (the study's unpublished runs).

Scales: s_i = alpha_i / r_i. The study's methods keep it (concat folds it into the
factors, weight_sum and svd apply the adapters' common s); methods that fold every s_i
into the factors return scale 1 (r = alpha), as PEFT's `add_weighted_adapter` does.

Reference semantics: HF PEFT `LoraModel.add_weighted_adapter` and `peft/utils/merge_utils.py`
(see tests/test_merging.py, which pins every method against it).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from src.errors import UserError
from src.lora import Adapter, make_adapter
from src.models import same_model

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]


class Mismatch(UserError):
    """A method needs equal ranks (or scales) and the adapters differ; `merge_adapters`
    turns it into a one-line message naming the adapters."""

    def __init__(self, what: str, values: Sequence):
        super().__init__(f"needs adapters of equal {what}, got {list(values)}")
        self.what, self.values = what, list(values)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def _require_equal(what: str, values: Sequence) -> None:
    if len(set(values)) > 1:
        raise Mismatch(what, values)


def _signed_sqrt(c: float) -> tuple[float, float]:
    """(sign(c) sqrt|c|, sqrt|c|): a factor c split over A and B with the sign on A (as PEFT)."""
    root = math.sqrt(abs(c))
    return math.copysign(root, c), root


# --------------------------------------------------------------------------- building blocks

def stack_factors(factors: Factors, coeffs: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i c_i B_i A_i as one LoRA of rank sum(r_i): A = [a_i A_i] rows, B = [b_i B_i] columns,
    with a_i b_i = c_i split evenly (sqrt|c_i| on each side, the sign on A).

    Returns A [sum r, in], B [out, sum r].
    """
    a_parts, b_parts = [], []
    for (a, b), c in zip(factors, coeffs):
        ca, cb = _signed_sqrt(c)
        a_parts.append(_f32(a) * ca)
        b_parts.append(_f32(b) * cb)
    return torch.cat(a_parts, 0), torch.cat(b_parts, 1)


def lowrank_svd(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of M = B @ A, exactly, without forming the dense [out, in] matrix.

    B = Qb Rb (thin QR of [out, R]), A^T = Qa Ra (thin QR of [in, R]), so
    M = Qb (Rb Ra^T) Qa^T; the SVD of the small core Rb Ra^T = Uc S Vc^T gives
    M = (Qb Uc) S (Qa Vc)^T. Work in float64 (the matrices are thin, it costs little).

    Returns A' = S_r V_r^T [rank, in], B' = U_r [out, rank] with B' @ A' the best rank-`rank`
    approximation of M (M itself when rank >= R).
    """
    u, s, vh = lowrank_usv(a, b, rank)
    return (s[:, None] * vh).float(), u.float().contiguous()


def lowrank_usv(a: torch.Tensor, b: torch.Tensor, rank: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD M = B @ A = U diag(s) Vh, from the factors (as `lowrank_svd`), in float64:
    U [out, k], s [k], Vh [k, in] with k = min(rank, R) (all R when rank is None)."""
    qb, rb = torch.linalg.qr(b.double())            # qb: [out, k], rb: [k, R]
    qa, ra = torch.linalg.qr(a.double().T)          # qa: [in, k'], ra: [k', R]
    uc, s, vch = torch.linalg.svd(rb @ ra.T)        # core: [k, k']
    rank = s.numel() if rank is None else min(rank, s.numel())
    # LAPACK's Q is column-major; multiplying through its transpose is ~20x faster on CPU
    u = (uc[:, :rank].T @ qb.mT).mT                 # [out, rank]
    vh = vch[:rank] @ qa.mT                         # [rank, in]
    return u, s[:rank], vh


def polar(x: torch.Tensor) -> torch.Tensor:
    """The closest matrix with orthonormal columns to x [n, k] (n >= k): P Q^T from x = P S Q^T
    (orthogonal Procrustes), as TSV-Merge orthogonalises its stacked singular vectors."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def nonzero(s: torch.Tensor, tol: float = 1e-7) -> int:
    """How many of the singular values s (descending) are non-zero: above tol * max(s)."""
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > tol * s[0]).sum())


def dense_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense [out, in] delta (only for deltas that are not low rank):
    returns A = S_r V_r^T [rank, in], B = U_r [out, rank]."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, s.numel())
    return s[:rank, None] * vh[:rank], u[:, :rank].contiguous()


def _resolve_rank(rank: int | str | None, ranks: Sequence[int]) -> int:
    """None -> max r_i (PEFT's default), "full" -> sum r_i, else a positive integer."""
    if rank is None:
        return max(ranks)
    if rank == "full":
        return sum(ranks)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UserError(f"rank must be a positive integer or 'full', got {rank!r}")
    return rank


DENSITY = 0.2   # share of entries TIES and DARE keep by default: TIES' top 20% (Yadav et al.), PEFT's guide


def _check_density(density: float | None, method: str) -> float:
    if density is None:
        raise UserError(f"{method} needs a density (fraction of entries kept, in (0, 1])")
    if not 0.0 < density <= 1.0:
        raise UserError(f"density must be in (0, 1], got {density}")
    return float(density)


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top int(density * numel) entries of |t|, zero the rest (PEFT `magnitude_based_pruning`)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale by 1/density
    (PEFT `random_pruning(rescale=True)`; the same draws as PEFT's global RNG seeded alike)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election on [N, ...]: "total" = sign of the sum, "frequency" = the more
    common sign (0 counts as +). Returns where each task agrees with the elected sign."""
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(0)
    elif method == "frequency":
        votes = sign.sum(0)
    else:
        raise UserError(f"majority sign method must be 'total' or 'frequency', got {method!r}")
    return sign == torch.where(votes >= 0, 1.0, -1.0)


def disjoint_mean(stacked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tasks that agree with the elected sign (TIES disjoint merge)."""
    return (stacked * mask).sum(0) / mask.sum(0).clamp(min=1.0)


def sparse_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                 prune: str, sign: str | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The one general method behind TIES and DARE (as mergekit): sparsify each task tensor
    (`prune` "magnitude" or "random"), then either a weighted sum (`sign` None) or sign
    election on the unweighted pruned tensors followed by the disjoint mean of the weighted
    ones (`sign` "total"/"frequency"). Exactly PEFT's `ties`, `dare_linear`, `dare_ties`."""
    pruned = [magnitude_prune(_f32(t), density) if prune == "magnitude"
              else random_prune(_f32(t), density, generator) for t in tensors]
    stacked = torch.stack(pruned)                                   # [N, *shape]
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if sign is None:
        return (stacked * w).sum(0)
    return disjoint_mean(stacked * w, majority_sign_mask(stacked, sign))


# --------------------------------------------------------------------------- the methods

def concat(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
           scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Concatenation (the study; PEFT `cat`): dW = sum_i w_i s_i B_i A_i, exactly.

    Acts on A and B: stacks the A_i as rows and the B_i as columns, a LoRA of rank sum(r_i)
    (ranks may differ). Scale: w_i s_i is folded into the factors (sqrt on each side, sign
    on A; PEFT puts it all on A, same product), result scale 1 (r = alpha = sum r_i).
    `scaled=False` drops the s_i (the study's unpublished unscaled run, dW = sum w_i B_i A_i).
    No cross terms B_i A_j. Paper: the reference study; equal to task arithmetic
    (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) on LoRA deltas.
    """
    coeffs = [w * (s if scaled else 1.0) for w, s in zip(weights, scales)]
    a, b = stack_factors(factors, coeffs)
    return a, b, 1.0


def task_arithmetic(factors: Factors, scales: Sequence[float], weights: Sequence[float]
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Task arithmetic (Ilharco et al., ICLR 2023): dW = sum_i w_i dW_i on the deltas.

    For LoRA deltas dW_i = s_i B_i A_i this is exactly `concat` with the weights (a LoRA of
    rank sum(r_i), scale 1), so no dense delta is ever formed.
    """
    return concat(factors, scales, weights)


def weight_sum(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
               average: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weight summing (the study): A = sum_i w_i A_i, B = sum_i w_i B_i, dW = s B A.

    Acts on A and B separately, so the cross terms B_i A_j (i != j) are part of the method,
    and a weight w scales its own term B_i A_i by w^2 (w = -1 does NOT negate a delta; use
    concat / task_arithmetic for that). Scale: the adapters' common s (equal ranks and
    scales required), w_i = 1 in the study; `average=True` uses w_i / N (the study's
    unpublished weighted average, an overall 1/N^2 on the diagonal terms).

    Relation to PEFT `linear` (which puts sign(v) sqrt|v s| on A_i and sqrt|v s| on B_i,
    scale 1): for w_i >= 0 ours with weights w equals PEFT linear with weights w^2; with
    weights 1 they are the same adapter product s (sum B_i)(sum A_i).
    """
    _require_equal("ranks", [a.shape[0] for a, _ in factors])
    _require_equal("scales", [round(s, 12) for s in scales])
    n = len(factors)
    w = [x / n for x in weights] if average else list(weights)
    a = sum(wi * _f32(ai) for wi, (ai, _) in zip(w, factors))
    b = sum(wi * _f32(bi) for wi, (_, bi) in zip(w, factors))
    return a, b, float(scales[0])


def svd(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
        rank: int | str | None = None, average: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SVD merge (the study): M = (1/N) sum_i w_i B_i A_i, truncated to rank r:
    B = U_r, A = S_r V_r^T, applied with the adapters' common scale s.

    Acts on the deltas, through their factors: the truncated SVD is computed exactly by
    `lowrank_svd` (thin QRs of the stacked factors, an SVD of the (sum r_i)^2 core), never
    by a dense [out, in] SVD. Options: `average=False` drops the 1/N (SVD of the sum);
    `rank` defaults to the adapters' common rank (max rank if they differ, as PEFT);
    rank="full" (or >= sum r_i) reproduces the sum exactly. When the scales differ each
    s_i is folded into its delta and the result has scale 1.

    Relation to PEFT `svd` (dense torch.linalg.svd of sum_i v_i s_i B_i A_i, split U S | V^T,
    scale 1): ours with weights w equals PEFT svd with weights w_i / N, product for product
    (the factors differ by the S split and by sign/rotation). PEFT's optional `svd_clamp`
    (quantile clamp of the factors) is not reproduced. Paper: the reference study; SVD
    re-factoring as in kohya-ss `svd_merge_lora.py`.
    """
    rank = _resolve_rank(rank, [a.shape[0] for a, _ in factors])
    n = len(factors)
    same_scale = len({round(s, 12) for s in scales}) == 1
    coeffs = [w * (1.0 if same_scale else s) / (n if average else 1) for w, s in zip(weights, scales)]
    a, b = stack_factors(factors, coeffs)                       # M = b @ a: [out, sum r] @ [sum r, in]
    a, b = lowrank_svd(a, b, rank)
    return a, b, float(scales[0]) if same_scale else 1.0


def _sparse_method(factors: Factors, scales: Sequence[float], weights: Sequence[float],
                   density: float | None, prune: str, sign: str | None, space: str,
                   rank: int | str | None, generator: torch.Generator | None, name: str):
    density = _check_density(density, name)
    if space == "ab" and rank is not None:
        raise UserError(f"{name}: rank applies to space 'delta' only (in space 'ab' the rank is the adapters')")
    if space == "ab":
        # PEFT's add_weighted_adapter: each of A and B merged on its own, w_i s_i split as
        # sign(c) sqrt|c| on A and sqrt|c| on B; result scale 1. Draws: all A's, then all B's.
        _require_equal("ranks", [a.shape[0] for a, _ in factors])
        split = [_signed_sqrt(w * s) for w, s in zip(weights, scales)]
        a = sparse_merge([a for a, _ in factors], [c[0] for c in split], density, prune, sign, generator)
        b = sparse_merge([b for _, b in factors], [c[1] for c in split], density, prune, sign, generator)
        return a, b, 1.0
    if space != "delta":
        raise UserError(f"space must be 'ab' or 'delta', got {space!r}")
    r = _resolve_rank(rank, [a.shape[0] for a, _ in factors])
    if prune == "random" and sign is None and density >= 1:
        # no pruning, no election: plain task arithmetic, still low rank, factor it exactly
        a, b = stack_factors(factors, [w * s for w, s in zip(weights, scales)])
        a, b = lowrank_svd(a, b, r)
        return a, b, 1.0
    # PEFT's *_svd combination types: merge the dense deltas s_i B_i A_i, then truncated SVD.
    deltas = [_f32(b) @ _f32(a) * s for (a, b), s in zip(factors, scales)]
    merged = sparse_merge(deltas, weights, density, prune, sign, generator)
    a, b = dense_svd(merged, min(merged.shape) if rank == "full" else r)
    return a, b, 1.0


def ties(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
         density: float = DENSITY, majority_sign: str = "total", space: str = "ab",
         rank: int | str | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """TIES (Yadav et al., "TIES-Merging", NeurIPS 2023): trim each task tensor to its top
    `density` magnitudes, elect a sign per entry ("total" or "frequency"), average the
    weighted entries that agree with it. Default density 0.2 (the paper's top 20%).

    space="ab" (default, PEFT `ties`): acts on A and on B separately, with w_i s_i split as
    sign sqrt on A and sqrt on B; equal ranks required; result scale 1.
    space="delta" (PEFT `ties_svd`): acts on the dense deltas s_i B_i A_i; the merged delta
    is dense (not low rank), so it is re-factored by a truncated dense SVD at `rank`
    (default max r_i; "full" = exact); result scale 1.
    """
    return _sparse_method(factors, scales, weights, density, "magnitude", majority_sign, space,
                          rank, None, "ties")


def dare_linear(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
                density: float = DENSITY, space: str = "ab", rank: int | str | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """DARE (Yu et al., "Language Models are Super Mario", ICML 2024) with a linear merge:
    drop each entry with probability 1 - density, rescale the rest by 1/density, weighted sum.
    Default density 0.2 (as PEFT's merging guide).

    space="ab" (default, PEFT `dare_linear`): on A and B separately, w_i s_i split as in
    `ties`, equal ranks, scale 1. space="delta" (PEFT `dare_linear_svd`): on the dense
    deltas, re-factored by a truncated SVD at `rank`; scale 1. Randomness from `generator`
    (merge_adapters seeds one from `seed`), drawn in module order, A's then B's.
    """
    return _sparse_method(factors, scales, weights, density, "random", None, space, rank,
                          generator, "dare_linear")


def dare_ties(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
              density: float = DENSITY, majority_sign: str = "total", space: str = "ab",
              rank: int | str | None = None, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """DARE drop-and-rescale (Yu et al., ICML 2024) followed by TIES sign election and
    disjoint mean (Yadav et al., NeurIPS 2023). Default density 0.2 (as PEFT's merging guide).

    space="ab" (default, PEFT `dare_ties`): on A and B separately, w_i s_i split as in
    `ties`, equal ranks, scale 1. space="delta" (PEFT `dare_ties_svd`): on the dense deltas,
    re-factored by a truncated SVD at `rank`; scale 1. Randomness as `dare_linear`.
    """
    return _sparse_method(factors, scales, weights, density, "random", majority_sign, space,
                          rank, generator, "dare_ties")


# --------------------------------------------------------------------------- merges in a shared basis
#
# The four below work in a basis the adapters share, computed from the factors: thin QRs or
# SVDs of the stacked A's and B's (at most sum r_i wide), never a dense [out, in] delta. Each
# folds w_i s_i into task i's delta dW_i = w_i s_i B_i A_i, applies its scaling coefficient
# `scale` to the merged delta (data-free default 1: the merged delta at the size the method
# gives it; `--merge-scale auto` picks it on training shots) and returns a LoRA of scale 1
# whose rank is stated in its docstring. Adapters of different ranks are accepted.

def _task_deltas(factors: Factors, scales: Sequence[float], weights: Sequence[float]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each task's (A_i, c_i B_i) in float64 with c_i = w_i s_i: dW_i = c_i B_i A_i."""
    return [(a.detach().double(), b.detach().double() * (w * s)) for (a, b), s, w in zip(factors, scales, weights)]


def _as_lora(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, 1) float32 for dW = scale * b @ a (the coefficient folded into A)."""
    return (a * scale).float().contiguous(), b.float().contiguous(), 1.0


def knots(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
          density: float = DENSITY, majority_sign: str = "total", scale: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025;
    gstoica27/KnOTS): align the tasks in one SVD basis, then TIES-merge their coordinates.

    Acts on the deltas, through their factors. Space: the joint SVD of the task deltas side by side, [dW_1 | ... | dW_N] = U S [V_1 | ... | V_N]^T
    (U shared by all tasks; computed from the factors: a QR of the stacked B's, one QR per A_i,
    an SVD of the sum(r_i)^2 core; components with s <= 1e-7 s_max dropped). Each task is
    represented by S V_i^T [k, in] (S folded in, as KnOTS); these are merged by TIES (trim to the
    top `density` magnitudes per task, `majority_sign` election, disjoint mean: `sparse_merge`),
    and dW = scale * U (merged S V^T). KnOTS trims each task over the whole model's flattened
    parameters; here, as every merge of this module, per module. Defaults: density 0.2 (KnOTS-TIES,
    topK 20), scale 1 (KnOTS searches its alpha on validation data; --merge-scale auto on shots).
    Returns a LoRA of rank k <= sum r_i, scale 1.
    """
    density = _check_density(density, "knots")
    deltas = _task_deltas(factors, scales, weights)
    qb, rb = torch.linalg.qr(torch.cat([b for _, b in deltas], 1))         # [out, R], [R, R]
    qas, ras = zip(*(torch.linalg.qr(a.T) for a, _ in deltas))             # A_i^T = Qa_i Ra_i
    uc, s, vch = torch.linalg.svd(rb @ torch.block_diag(*[r.T for r in ras]))
    k = nonzero(s)
    u = (uc[:, :k].T @ qb.mT).mT                                           # [out, k]
    starts = [0]
    for r in ras:
        starts.append(starts[-1] + r.shape[1])
    reps = [s[:k, None] * (vch[:k, starts[i]:starts[i + 1]] @ qas[i].mT) for i in range(len(deltas))]
    merged = sparse_merge(reps, [1.0] * len(reps), density, "magnitude", majority_sign)
    return _as_lora(u, merged, scale)


CORE_MERGES = ("ta", "ties", "tsv", "iso_c")


def core_space(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
               core_merge: str = "ta", density: float = DENSITY, scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Core Space merging (Panariello et al., "Accurate and Efficient Low-Rank Model Merging in
    Core Space", NeurIPS 2025; apanariello4/core-space-merging).

    Acts on the deltas, through their factors. Space: reference bases shared by all tasks,
    U_ref from the SVD of the stacked B's
    [B_1 ... B_N] [out, R] and V_ref from the SVD of the stacked A's [A_1; ...; A_N] [R, in]
    (R = sum r_i). Each task's core M_i = U_ref^T dW_i V_ref = (U_ref^T B_i)(A_i V_ref) is
    R x R; the cores are merged by `core_merge`: "ta" (task arithmetic, sum M_i), "ties" (trim
    to `density` per task, sign election, disjoint mean), "tsv" (TSV-Merge of the cores, each
    keeping its full rank r_i, as the reference does) or "iso_c" (the sum with its spectrum
    made flat). dW = scale * U_ref M V_ref^T. No [out, in] matrix is ever formed. Lossless:
    with "ta" and scale 1 it equals `concat` exactly (every dW_i lies in the two bases).
    Defaults: core_merge ta, density 0.2, scale 1 (the paper tunes alpha on validation data;
    --merge-scale auto on shots). Returns a LoRA of rank R = sum r_i, scale 1.
    """
    if core_merge not in CORE_MERGES:
        raise UserError(f"core_merge must be one of {', '.join(CORE_MERGES)}, got {core_merge!r}")
    deltas = _task_deltas(factors, scales, weights)
    u_ref = torch.linalg.svd(torch.cat([b for _, b in deltas], 1), full_matrices=False)[0]   # [out, R]
    vh_ref = torch.linalg.svd(torch.cat([a for a, _ in deltas], 0), full_matrices=False)[2]  # [R, in]
    cores = [(u_ref.T @ b) @ (a @ vh_ref.T) for a, b in deltas]                            # R x R each
    if core_merge == "ta":
        m = sum(cores)
    elif core_merge == "ties":
        m = sparse_merge(cores, [1.0] * len(cores), _check_density(density, "core_space ties"),
                         "magnitude", "total")
    elif core_merge == "tsv":
        ma, mb, _ = tsv([(c, torch.eye(c.shape[0], dtype=c.dtype)) for c in cores], [1.0] * len(cores),
                        [1.0] * len(cores), keep=[a.shape[0] for a, _ in deltas], _dtype=torch.float64)
        m = mb @ ma
    else:
        ma, mb, _ = iso_c([(c, torch.eye(c.shape[0], dtype=c.dtype)) for c in cores], [1.0] * len(cores),
                          [1.0] * len(cores), _dtype=torch.float64)
        m = mb @ ma
    return _as_lora(u_ref, m.double() @ vh_ref, scale)


def tsv(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
        keep: float | Sequence[int] | None = None, scale: float = 1.0, _dtype: torch.dtype = torch.float32
        ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
    Merging", CVPR 2025; AntoAndGar/task_singular_vectors).

    Acts on the deltas, through their factors. Space: each task's own singular vectors,
    dW_i = U_i S_i V_i^T (from the factors,
    `lowrank_usv`). Each task keeps its top k_i = min(r_i, int(keep * min(out, in)))
    components (keep default 1/N, the paper's rule: for LoRA adapters this is every component),
    the kept U_i and V_i are stacked side by side and each stack is replaced by its closest
    orthonormal matrix (`polar`: P Q^T of its SVD), removing the interference between tasks,
    and dW = scale * U_perp diag(S) V_perp^T with the singular values as they were. Default
    scale 1 (the paper searches alpha in 0.1..3 on validation data; --merge-scale auto on
    shots). Returns a LoRA of rank sum k_i, scale 1.
    """
    deltas = _task_deltas(factors, scales, weights)
    out_f, in_f = deltas[0][1].shape[0], deltas[0][0].shape[1]
    n = len(deltas)
    if keep is None or isinstance(keep, (int, float)):
        frac = 1.0 / n if keep is None else float(keep)
        if not 0 < frac <= 1:
            raise UserError(f"tsv keep must be in (0, 1], got {keep}")
        ks = [max(1, min(a.shape[0], int(frac * min(out_f, in_f)))) for a, _ in deltas]
    else:
        ks = list(keep)
    us, ss, vhs = [], [], []
    for (a, b), k in zip(deltas, ks):
        u, s, vh = lowrank_usv(a, b, k)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    u_perp = polar(torch.cat(us, 1))                 # [out, K]
    v_perp = polar(torch.cat(vhs, 0).T)              # [in, K]
    return (torch.cat(ss)[:, None] * v_perp.T * scale).to(_dtype).contiguous(), u_perp.to(_dtype).contiguous(), 1.0


def iso_c(factors: Factors, scales: Sequence[float], weights: Sequence[float], *,
          scale: float = 1.0, _dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Iso-C (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025; danielm1405/iso-merging).

    Acts on the deltas, through their factors. Space: the singular vectors of the
    task-arithmetic sum dW = sum_i dW_i = U S V^T (from the
    stacked factors, `lowrank_usv`). Its spectrum is made flat: dW_iso = scale * sbar U V^T,
    sbar the mean singular value. The mean is over the non-zero spectrum only (s > 1e-7 s_max,
    at most sum r_i values): the reference averages all min(out, in) values of a full-rank
    sum, which for a low-rank LoRA sum would shrink sbar by R / min(out, in). Default scale 1
    (the paper searches alpha in 0.1..3 on validation data; --merge-scale auto on shots).
    Returns a LoRA of rank k <= sum r_i (the non-zero spectrum), scale 1.
    """
    deltas = _task_deltas(factors, scales, weights)
    u, s, vh = lowrank_usv(torch.cat([a for a, _ in deltas], 0), torch.cat([b for _, b in deltas], 1))
    k = nonzero(s)
    sbar = s[:k].mean() if k else s.new_zeros(())
    return (vh[:k] * (sbar * scale)).to(_dtype).contiguous(), u[:, :k].to(_dtype).contiguous(), 1.0


MERGES: dict[str, Callable] = {
    "concat": concat,
    "weight_sum": weight_sum,
    "svd": svd,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "knots": knots,
    "core_space": core_space,
    "tsv": tsv,
    "iso_c": iso_c,
}

# Named option sets: {name: (method, options)}.
VARIANTS: dict[str, tuple[str, dict]] = {
    "svd_sum": ("svd", {"average": False}),                    # SVD of the sum, not the mean
    "svd_full": ("svd", {"average": False, "rank": "full"}),   # rank sum(r_i): equals concat
    "concat_unscaled": ("concat", {"scaled": False}),          # the study's unpublished run
    "weight_avg": ("weight_sum", {"average": True}),           # w_i = 1/N
    "core_space_tsv": ("core_space", {"core_merge": "tsv"}),   # TSV-Merge inside the core space
}


# --------------------------------------------------------------------------- entry point

def options_of(fn: Callable) -> list[str]:
    """A method's keyword options (`generator` included; private `_` ones are not options)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and not p.name.startswith("_")]


def resolve_method(method: str, options: dict) -> tuple[str, dict]:
    """(registry name, options) for a registry or VARIANTS name; the user's options win."""
    if method in VARIANTS:
        base, preset = VARIANTS[method]
        return base, {**preset, **options}
    if method in MERGES:
        return method, dict(options)
    raise UserError(f"unknown merge method {method!r}; known: {', '.join([*MERGES, *VARIANTS])}")


def method_options(method: str, **options) -> tuple[str, dict]:
    """(registry name, every option with its value: the method's defaults, the variant's
    preset, then `options`), e.g. for recording a merge next to its result."""
    name, options = resolve_method(method, options)
    params = inspect.signature(MERGES[name]).parameters
    full = {o: params[o].default for o in options_of(MERGES[name]) if o != "generator"}
    if "generator" in params:
        full["seed"] = 0
    full.update({k: v for k, v in options.items() if v is not None})
    return name, full


def _label(adapter: Adapter, i: int) -> str:
    return adapter.name or f"adapter #{i + 1}"


def check_compatible(adapters: Sequence[Adapter]) -> None:
    """Same base model (when both say; the same model under two names, e.g. a relative and an
    absolute path or an alias, counts as the same), same module set, same layer shapes; else UserError."""
    if not adapters:
        raise UserError("no adapters to merge")
    first, l0 = adapters[0], _label(adapters[0], 0)
    for i, ad in enumerate(adapters[1:], 1):
        li = _label(ad, i)
        if first.base_model and ad.base_model and not same_model(first.base_model, ad.base_model):
            raise UserError(f"adapters {l0} and {li} are for different base models "
                            f"({first.base_model} vs {ad.base_model}); if they are one model, "
                            f"python -m src.merge --same-base merges them")
        if set(ad.factors) != set(first.factors):
            only0 = sorted(set(first.factors) - set(ad.factors))
            only1 = sorted(set(ad.factors) - set(first.factors))
            example = f"{only0[0]} only in {l0}" if only0 else f"{only1[0]} only in {li}"
            raise UserError(f"adapters {l0} and {li} adapt different modules ({example})")
        for n, (a, b) in ad.factors.items():
            a0, b0 = first.factors[n]
            if (b.shape[0], a.shape[1]) != (b0.shape[0], a0.shape[1]):
                raise UserError(f"adapters {l0} and {li} disagree on module {n}: "
                                f"[{b0.shape[0]}, {a0.shape[1]}] vs [{b.shape[0]}, {a.shape[1]}]")


def merge_adapters(adapters: list[Adapter], method: str, weights: list[float] | None = None,
                   **options) -> Adapter:
    """Merge `adapters` module by module with `method` (a MERGES or VARIANTS name).

    weights: one per adapter (default 1 each). options: the method's keyword options
    (rank, average, scaled, density, majority_sign, space) plus `seed` (default 0) for the
    random methods: one torch.Generator, drawn in the adapters' module order.
    Returns an Adapter (scale per module as the method says) named after the method.
    """
    name, options = resolve_method(method, options)
    fn = MERGES[name]
    check_compatible(adapters)
    if weights is None:
        weights = [1.0] * len(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise UserError(f"{len(weights)} weights for {len(adapters)} adapters")
    allowed = [o for o in options_of(fn) if o != "generator"]
    random = "generator" in options_of(fn)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(allowed) - ({"seed"} if random else set()))
    if unknown:
        raise UserError(f"method {name} has no option {', '.join(unknown)}; "
                        f"its options: {', '.join(allowed + ['seed'] * random) or 'none'}")
    if "scale" in options and not (isinstance(options["scale"], (int, float)) and math.isfinite(options["scale"])):
        raise UserError(f"{name}: the scale must be a finite number, got {options['scale']!r}")
    if random:
        options["generator"] = torch.Generator().manual_seed(int(options.pop("seed", 0)))

    factors, scales = {}, {}
    for module in adapters[0].factors:
        per = [ad.factors[module] for ad in adapters]
        try:
            a, b, s = fn(per, [ad.scales[module] for ad in adapters], weights, **options)
        except Mismatch as e:
            listed = ", ".join(f"{_label(ad, i)} ({v})" for i, (ad, v) in enumerate(zip(adapters, e.values)))
            raise UserError(f"{method} needs adapters of equal {e.what}; module {module}: {listed}") from None
        factors[module] = (a.contiguous(), b.contiguous())
        scales[module] = s
    base = next((ad.base_model for ad in adapters if ad.base_model), None)
    return make_adapter(factors, scales, base, name=method)


# --------------------------------------------------------------------------- options

SCALE_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


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
        "choices": CORE_MERGES})
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
