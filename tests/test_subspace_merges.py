"""KnOTS, Core Space, TSV and Iso-C: pinned against dense float64 references written here from
the papers' formulas, on random adapters of Qwen2-like shapes with different ranks."""
from __future__ import annotations

import json

import pytest
import torch

from src.errors import UserError, run_main
from src.lora import load_adapter, make_adapter, save_adapter
from src.merge import main as merge_main
from src.merging import CORE_MERGES, MERGES, core_space, iso_c, knots, merge_adapters, tsv

# Qwen2-like projections, scaled down: k/v (out < in), q (square), up (out > in), down (out < in)
SHAPES = [(64, 224), (224, 224), (608, 224), (224, 608)]
RANKS = [4, 8, 6]
SCALES = [2.0, 2.0, 16 / 6]
WEIGHTS = [1.0, 0.6, -0.8]
TOL = 1e-7      # singular values below TOL * s_max count as zero (as the methods do)


def _factors(out_f: int, in_f: int, ranks=RANKS, seed: int = 0):
    g = torch.Generator().manual_seed(seed + out_f * 7 + in_f)
    return [(torch.randn(r, in_f, generator=g) / in_f ** 0.5, torch.randn(out_f, r, generator=g) * 0.05)
            for r in ranks]


def _deltas(factors, scales=SCALES, weights=WEIGHTS) -> list[torch.Tensor]:
    return [w * s * b.double() @ a.double() for (a, b), s, w in zip(factors, scales, weights)]


def _product(result) -> torch.Tensor:
    a, b, s = result
    return s * b.double() @ a.double()


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol * ref.abs().max().item())


# --------------------------------------------------------------------------- dense references

def ref_ties(tensors: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023): keep each task's top int(density * numel) magnitudes, elect the
    sign of the sum, average the kept entries that agree with it."""
    kept = []
    for t in tensors:
        k = int(density * t.numel())
        flat = t.reshape(-1)
        mask = torch.zeros_like(flat)
        mask[flat.abs().argsort(descending=True)[:k]] = 1
        kept.append((flat * mask).reshape(t.shape))
    stack = torch.stack(kept)
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (stack.sign() == elected).to(stack.dtype)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def ref_knots(deltas, density, scale):
    """KnOTS: SVD of [dW_1 | ... | dW_N]; task i is S V_i^T; TIES on those; dW = scale U merged."""
    in_f = deltas[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat(deltas, 1), full_matrices=False)
    k = int((s > TOL * s[0]).sum())
    reps = [s[:k, None] * vh[:k, i * in_f:(i + 1) * in_f] for i in range(len(deltas))]
    return scale * u[:, :k] @ ref_ties(reps, density)


def ref_tsv(deltas, keep_ranks, scale):
    """TSV-Merge: per-task SVD truncated to k_i, stacked U and V each replaced by P Q^T of
    its own SVD, dW = scale U_perp diag(S) V_perp^T."""
    us, ss, vs = [], [], []
    for d, k in zip(deltas, keep_ranks):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)

    def orth(x):
        p, _, qh = torch.linalg.svd(x, full_matrices=False)
        return p @ qh
    return scale * orth(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ orth(torch.cat(vs, 1)).T


def ref_iso(deltas, scale):
    """Iso-C: the sum's SVD with every non-zero singular value replaced by their mean."""
    u, s, vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    k = int((s > TOL * s[0]).sum())
    return scale * s[:k].mean() * u[:, :k] @ vh[:k]


def ref_core(factors, deltas, merge, density, scale):
    """Core Space: U_ref from the SVD of [c_1 B_1 ... c_N B_N], V_ref from that of [A_1; ...; A_N],
    cores M_i = U_ref^T dW_i V_ref, merged, mapped back U_ref M V_ref^T."""
    coeff = [w * s for s, w in zip(SCALES, WEIGHTS)]
    u_ref = torch.linalg.svd(torch.cat([b.double() * c for (_, b), c in zip(factors, coeff)], 1),
                             full_matrices=False)[0]
    v_ref = torch.linalg.svd(torch.cat([a.double() for a, _ in factors], 0), full_matrices=False)[2].T
    cores = [u_ref.T @ d @ v_ref for d in deltas]
    if merge == "ta":
        m = sum(cores)
    elif merge == "ties":
        m = ref_ties(cores, density)
    elif merge == "tsv":
        m = ref_tsv(cores, RANKS, 1.0)
    else:
        m = ref_iso(cores, 1.0)
    return scale * u_ref @ m @ v_ref.T


# --------------------------------------------------------------------------- pinned

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.7])
def test_knots_matches_dense_reference(shape, density):
    f = _factors(*shape)
    ours = knots(f, SCALES, WEIGHTS, density=density, scale=0.7)
    _close(_product(ours), ref_knots(_deltas(f), density, 0.7))
    assert ours[0].shape[0] == sum(RANKS) and ours[2] == 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_tsv_matches_dense_reference(shape):
    f = _factors(*shape)
    ours = tsv(f, SCALES, WEIGHTS, scale=1.3)
    _close(_product(ours), ref_tsv(_deltas(f), RANKS, 1.3))    # 1/N of min(out, in) >= r_i: all kept
    assert ours[0].shape[0] == sum(RANKS)
    few = tsv(f, SCALES, WEIGHTS, keep=[2, 3, 1])
    _close(_product(few), ref_tsv(_deltas(f), [2, 3, 1], 1.0))
    assert few[0].shape[0] == 6


def test_tsv_keeps_one_nth_of_the_full_dimension():
    f = _factors(16, 24, ranks=[8, 8])           # min(out, in) / N = 8 >= 8: all; keep 0.25 -> 4 each
    assert tsv(f, [1.0, 1.0], [1.0, 1.0])[0].shape[0] == 16
    assert tsv(f, [1.0, 1.0], [1.0, 1.0], keep=0.25)[0].shape[0] == 8


@pytest.mark.parametrize("shape", SHAPES)
def test_iso_c_matches_dense_reference_over_the_nonzero_spectrum(shape):
    f = _factors(*shape)
    ours = iso_c(f, SCALES, WEIGHTS, scale=1.5)
    _close(_product(ours), ref_iso(_deltas(f), 1.5))
    a, b, _ = ours
    s = torch.linalg.svdvals(b.double() @ a.double())
    k = sum(RANKS)
    assert torch.allclose(s[:k], s[:k].mean().expand(k), rtol=1e-4)        # flat spectrum
    assert s[k:].abs().max() < 1e-5 * s[0]                                   # and nothing else


@pytest.mark.parametrize("merge", CORE_MERGES)
@pytest.mark.parametrize("shape", SHAPES)
def test_core_space_matches_dense_reference(shape, merge):
    f = _factors(*shape)
    ours = core_space(f, SCALES, WEIGHTS, core_merge=merge, density=0.3, scale=0.9)
    _close(_product(ours), ref_core(f, _deltas(f), merge, 0.3, 0.9))
    assert ours[0].shape[0] == sum(RANKS) and ours[2] == 1.0


@pytest.mark.parametrize("shape", SHAPES)
def test_core_space_task_arithmetic_equals_concat_exactly(shape):
    f = _factors(*shape)
    _close(_product(core_space(f, SCALES, WEIGHTS)), _product(MERGES["concat"](f, SCALES, WEIGHTS)), 1e-6)


def test_tsv_and_iso_c_do_not_depend_on_the_basis():
    """Both are defined by singular vectors, which the core space keeps: merging the cores
    gives the full-space result (Core Space's claim for these methods), with mixed ranks."""
    f = _factors(224, 608)
    _close(_product(core_space(f, SCALES, WEIGHTS, core_merge="tsv")), _product(tsv(f, SCALES, WEIGHTS)), 1e-6)
    _close(_product(core_space(f, SCALES, WEIGHTS, core_merge="iso_c")), _product(iso_c(f, SCALES, WEIGHTS)), 1e-6)


def test_single_adapter_knots_is_its_trimmed_delta_and_full_density_keeps_it():
    f = _factors(64, 224)[:1]
    full = _product(knots(f, SCALES[:1], [1.0], density=1.0))
    _close(full, _deltas(f, SCALES[:1], [1.0])[0], 1e-6)


def test_scale_multiplies_the_merged_delta():
    f = _factors(64, 224)
    for name in ("knots", "core_space", "tsv", "iso_c"):
        one = _product(MERGES[name](f, SCALES, WEIGHTS))
        _close(_product(MERGES[name](f, SCALES, WEIGHTS, scale=0.4)), 0.4 * one, 1e-6)


# --------------------------------------------------------------------------- adapters and the CLI

def _adapter(name, ranks, seed):
    shapes = {"model.layers.0.self_attn.k_proj": (16, 48), "model.layers.0.mlp.up_proj": (96, 48)}
    g = torch.Generator().manual_seed(seed)
    factors = {n: (torch.randn(ranks, i, generator=g) * 0.1, torch.randn(o, ranks, generator=g) * 0.1)
               for n, (o, i) in shapes.items()}
    return make_adapter(factors, {n: 2.0 for n in shapes}, "tiny", name=name)


@pytest.mark.parametrize("method", ["knots", "core_space", "core_space_tsv", "tsv", "iso_c"])
def test_merged_adapters_of_mixed_ranks_are_peft_adapters(method, tmp_path):
    ads = [_adapter("a", 4, 0), _adapter("b", 2, 1), _adapter("c", 3, 2)]
    merged = merge_adapters(ads, method)
    save_adapter(merged, tmp_path / method)
    back = load_adapter(tmp_path / method)
    cfg = json.loads((tmp_path / method / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    for n in merged.factors:
        _close(back.delta(n).double(), merged.delta(n).double(), 1e-6)


def test_cli_merges_with_core_merge_and_scale(tmp_path, capsys):
    dirs = [save_adapter(_adapter(n, r, i), tmp_path / n) for i, (n, r) in enumerate([("a", 4), ("b", 4)])]
    out = tmp_path / "out"
    rc = run_main(merge_main, ["--method", "core_space", "--core-merge", "ties", "--density", "0.4",
                               "--merge-scale", "0.5", "--out", str(out), *map(str, dirs)])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "merge_info.json").read_text())
    assert rec["options"] == {"core_merge": "ties", "density": 0.4, "scale": 0.5}
    ads = [load_adapter(d) for d in dirs]
    n = next(iter(ads[0].factors))
    want = core_space([ad.factors[n] for ad in ads], [2.0, 2.0], [1.0, 1.0], core_merge="ties", density=0.4,
                      scale=0.5)
    _close(load_adapter(out).delta(n).double(), _product(want).float().double(), 1e-6)


@pytest.mark.parametrize("args, msg", [
    (["--method", "knots", "--merge-scale", "auto"], "--merge-scale auto picks the scale on training shots"),
    (["--method", "tsv", "--merge-scale", "inf"], "--merge-scale must be a finite number or 'auto', got inf"),
    (["--method", "tsv", "--keep", "0"], "--keep must be in (0, 1], got 0.0"),
    (["--method", "concat", "--merge-scale", "2"], "method concat has no option scale"),
    (["--method", "core_space", "--core-merge", "x"], "invalid choice: 'x'"),
])
def test_cli_bad_options_one_line_nothing_written(args, msg, tmp_path, capsys):
    dirs = [save_adapter(_adapter(n, 4, i), tmp_path / n) for i, n in enumerate("ab")]
    out = tmp_path / "out"
    rc = run_main(merge_main, [*args, "--out", str(out), *map(str, dirs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and msg in err[0], err
    assert not out.exists()


def test_bad_density_and_core_merge_in_the_functions():
    f = _factors(16, 48)
    with pytest.raises(UserError, match="density must be in"):
        knots(f, SCALES, WEIGHTS, density=0)
    with pytest.raises(UserError, match="core_merge must be one of ta, ties, tsv, iso_c"):
        core_space(f, SCALES, WEIGHTS, core_merge="dare")
