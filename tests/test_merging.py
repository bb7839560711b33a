"""Merges: invariants, every method pinned against PEFT's add_weighted_adapter, and the merge CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from src.errors import UserError, run_main
from src.lora import (Adapter, apply_adapter, load_adapter, make_adapter, save_adapter,
                      unload_lora)
from src.merge import main as merge_main
from src.merging import (MERGES, VARIANTS, lowrank_svd, magnitude_prune, merge_adapters,
                         random_prune)
from tiny import save_tiny, tiny_model

ROOT = Path(__file__).resolve().parents[1]

NAMES = ["t0", "t1", "t2"]
SEED = 7


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal up to `tol` relative to the reference's largest entry."""
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol * ref.abs().max().item())


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def peft3():
    """A tiny qwen2 PeftModel holding three rank-4 adapters with random A and B (seeds 100..102),
    and the same adapters as our Adapter objects, modules in model order (PEFT's merge order)."""
    model = tiny_model("qwen2")
    cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    pm = get_peft_model(model, cfg, adapter_name=NAMES[0])
    for t in NAMES[1:]:
        pm.add_adapter(t, cfg)
    layers = [(n, m) for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    for i, t in enumerate(NAMES):
        g = torch.Generator().manual_seed(100 + i)
        for _, m in layers:
            for lin in (m.lora_A[t], m.lora_B[t]):
                lin.weight.data = torch.randn(lin.weight.shape, generator=g) * 0.3
    ours = [Adapter({n: (m.lora_A[t].weight.data.clone(), m.lora_B[t].weight.data.clone()) for n, m in layers},
                    {n: m.scaling[t] for n, m in layers}, {}, t) for t in NAMES]
    return pm, layers, ours


def _peft_merge(pm, layers, combination_type, weights, name, **kw) -> dict[str, torch.Tensor]:
    """PEFT's merged deltas (B @ A * scaling) per module. PEFT draws DARE masks from the global
    RNG after injecting the new adapter (whose init also draws), so reseed right after it."""
    inject = pm.base_model.inject_adapter

    def inject_then_seed(*a, **k):
        inject(*a, **k)
        torch.manual_seed(SEED)

    pm.base_model.inject_adapter = inject_then_seed
    try:
        pm.add_weighted_adapter(NAMES, weights, name, combination_type=combination_type, **kw)
    finally:
        del pm.base_model.inject_adapter
    return {n: m.get_delta_weight(name).detach() for n, m in layers}


def _rand_adapter(shapes: dict[str, tuple[int, int]], r: int, alpha: float, seed: int,
                  name: str, base: str | None = "tiny") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {n: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for n, (o, i) in shapes.items()}
    ad = make_adapter(factors, {n: alpha / r for n in shapes}, base, name=name)
    return ad


SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.down_proj": (32, 72)}


# --------------------------------------------------------------------------- PEFT as reference

# (PEFT combination type, PEFT weights, our method, our weights, our options)
CASES = [
    ("cat", [1.0, 0.5, -0.7], "concat", [1.0, 0.5, -0.7], {}),
    ("cat", [1.0, 0.5, -0.7], "task_arithmetic", [1.0, 0.5, -0.7], {}),
    # ours w == PEFT linear w^2 for w >= 0; with weights 1 the same adapter
    ("linear", [1.0, 1.0, 1.0], "weight_sum", None, {}),
    ("linear", [1.0, 0.25, 0.49], "weight_sum", [1.0, 0.5, 0.7], {}),
    # ours (study's 1/N) == PEFT svd with weights 1/N
    ("svd", [1 / 3] * 3, "svd", None, {}),
    ("svd", [1.0, 1.0, 1.0], "svd_sum", None, {}),
    ("svd", [1.0, 0.5, -0.7], "svd", [3.0, 1.5, -2.1], {"rank": 6}),
    ("ties", [1.0, 0.5, -0.7], "ties", [1.0, 0.5, -0.7], {"density": 0.5}),
    ("ties", [1.0, 0.5, 0.7], "ties", [1.0, 0.5, 0.7], {"density": 0.3, "majority_sign": "frequency"}),
    ("dare_linear", [1.0, 0.5, -0.7], "dare_linear", [1.0, 0.5, -0.7], {"density": 0.5}),
    ("dare_ties", [1.0, 0.5, 0.7], "dare_ties", [1.0, 0.5, 0.7], {"density": 0.6}),
    ("dare_ties", [1.0, 0.5, 0.7], "dare_ties", [1.0, 0.5, 0.7], {"density": 0.4, "majority_sign": "frequency"}),
    ("ties_svd", [1.0, 0.5, -0.7], "ties", [1.0, 0.5, -0.7], {"density": 0.5, "space": "delta"}),
    ("dare_linear_svd", [1.0, 0.5, 0.7], "dare_linear", [1.0, 0.5, 0.7], {"density": 0.5, "space": "delta"}),
    ("dare_ties_svd", [1.0, 0.5, 0.7], "dare_ties", [1.0, 0.5, 0.7], {"density": 0.5, "space": "delta"}),
]


@pytest.mark.parametrize("ctype,peft_w,method,w,opts", CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft(peft3, ctype, peft_w, method, w, opts):
    pm, layers, ours = peft3
    kw = {"density": opts["density"]} if "density" in opts else {}
    if "majority_sign" in opts:
        kw["majority_sign_method"] = opts["majority_sign"]
    if "rank" in opts:
        kw["svd_rank"] = opts["rank"]
    ref = _peft_merge(pm, layers, ctype, peft_w, f"m{len(pm.peft_config)}", **kw)
    seed = {"seed": SEED} if method.startswith("dare") else {}
    merged = merge_adapters(ours, method, w, **seed, **opts)
    assert set(merged.factors) == set(ref)
    dense_svd = ctype.endswith("svd")  # PEFT's dense float32 SVD: equal up to its rounding
    for n in ref:
        _close(merged.delta(n), ref[n], 2e-5 if dense_svd else 1e-5)


def test_dare_reproduces_only_with_the_same_seed(peft3):
    _, _, ours = peft3
    a = merge_adapters(ours, "dare_linear", density=0.5, seed=1)
    b = merge_adapters(ours, "dare_linear", density=0.5, seed=1)
    c = merge_adapters(ours, "dare_linear", density=0.5, seed=2)
    n = next(iter(a.factors))
    assert torch.equal(a.delta(n), b.delta(n))
    assert not torch.equal(a.delta(n), c.delta(n))


# --------------------------------------------------------------------------- invariants

def test_registry_names():
    assert list(MERGES) == ["concat", "weight_sum", "svd", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                            "knots", "core_space", "tsv", "iso_c"]
    assert {"svd_sum", "svd_full", "concat_unscaled", "weight_avg", "core_space_tsv"} <= set(VARIANTS)
    for fn in MERGES.values():  # every method documents its space, scale and paper
        doc = fn.__doc__
        assert doc and ("A and B" in doc or "delta" in doc) and "scale" in doc


def test_svd_full_equals_concat_with_mixed_ranks():
    ads = [_rand_adapter(SHAPES, r, 2.0 * r, s, f"a{s}") for s, r in enumerate([4, 2, 6])]
    full, cat = merge_adapters(ads, "svd_full"), merge_adapters(ads, "concat")
    assert full.ranks == cat.ranks == {n: 12 for n in SHAPES}
    for n in SHAPES:
        _close(full.delta(n), cat.delta(n))
        _close(cat.delta(n), sum(a.delta(n) for a in ads))
    low = merge_adapters(ads, "svd", rank=3)   # mixed ranks: svd accepts, any rank
    assert low.ranks == {n: 3 for n in SHAPES}


def test_concat_is_a_rank_sum_lora_with_scale_one_and_unscaled_drops_alpha_over_r():
    ads = [_rand_adapter(SHAPES, 4, 16.0, s, f"a{s}") for s in range(3)]
    cat = merge_adapters(ads, "concat")
    assert cat.scales == {n: 1.0 for n in SHAPES}
    assert cat.config["r"] == cat.config["lora_alpha"] == 12
    raw = merge_adapters(ads, "concat_unscaled")
    for n in SHAPES:
        _close(raw.delta(n), sum(a.factors[n][1] @ a.factors[n][0] for a in ads))
        _close(cat.delta(n), 4.0 * raw.delta(n))


def test_weight_sum_and_weight_avg_follow_the_study():
    ads = [_rand_adapter(SHAPES, 4, 16.0, s, f"a{s}") for s in range(3)]
    ws, avg = merge_adapters(ads, "weight_sum"), merge_adapters(ads, "weight_avg")
    for n in SHAPES:
        a_sum = sum(a.factors[n][0] for a in ads)
        b_sum = sum(a.factors[n][1] for a in ads)
        _close(ws.delta(n), 4.0 * b_sum @ a_sum)             # cross terms included, scale s = 4
        _close(avg.delta(n), ws.delta(n) / 9)                 # (1/N)^2
    assert ws.scales == {n: 4.0 for n in SHAPES}


def test_svd_is_the_mean_truncated_and_applies_the_common_scale():
    ads = [_rand_adapter(SHAPES, 4, 16.0, s, f"a{s}") for s in range(3)]
    m = merge_adapters(ads, "svd")
    for n in SHAPES:
        mean = sum(a.factors[n][1] @ a.factors[n][0] for a in ads) / 3
        u, s, vh = torch.linalg.svd(mean.double())
        _close(m.delta(n), 4.0 * (u[:, :4] * s[:4] @ vh[:4]).float())
    assert m.scales == {n: 4.0 for n in SHAPES} and m.ranks == {n: 4 for n in SHAPES}


def test_svd_with_different_scales_folds_them_and_uses_scale_one():
    ads = [_rand_adapter(SHAPES, 4, 16.0, 0, "a"), _rand_adapter(SHAPES, 4, 4.0, 1, "b")]
    m = merge_adapters(ads, "svd_full")
    assert m.scales == {n: 1.0 for n in SHAPES}
    for n in SHAPES:
        _close(m.delta(n), ads[0].delta(n) + ads[1].delta(n))


def test_lowrank_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 300, generator=g), torch.randn(200, 12, generator=g)
    a2, b2 = lowrank_svd(a, b, 5)
    u, s, vh = torch.linalg.svd((b @ a).double())
    _close(b2 @ a2, (u[:, :5] * s[:5] @ vh[:5]).float())
    torch.testing.assert_close(b2.T @ b2, torch.eye(5), atol=1e-5, rtol=0)   # B = U_r is orthonormal


@pytest.mark.parametrize("method", ["concat", "task_arithmetic", "svd_sum", "svd_full"])
def test_weight_minus_one_negates_a_delta(method):
    a, b = (_rand_adapter(SHAPES, 4, 8.0, s, f"a{s}") for s in range(2))
    neg = merge_adapters([a], method, [-1.0])
    full = {"rank": "full"} if method.startswith("svd") else {}   # two rank-4 deltas: rank 8
    diff = merge_adapters([a, b], method, [1.0, -1.0], **full)
    for n in SHAPES:
        _close(neg.delta(n), -a.delta(n))
        _close(diff.delta(n), a.delta(n) - b.delta(n))


def test_weight_sum_weight_minus_one_does_not_negate():
    """Weights act on A and on B, so a lone adapter's delta scales by w^2 (documented)."""
    a = _rand_adapter(SHAPES, 4, 8.0, 0, "a")
    for n in SHAPES:
        _close(merge_adapters([a], "weight_sum", [-1.0]).delta(n), a.delta(n))
        _close(merge_adapters([a], "weight_sum", [0.5]).delta(n), 0.25 * a.delta(n))


def test_pruning_keeps_the_stated_density():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(100, 200, generator=g)
    kept = magnitude_prune(t, 0.2)
    assert (kept != 0).sum().item() == int(0.2 * t.numel())
    assert kept.abs().min() == 0 and kept.abs().max() == t.abs().max()
    assert kept[kept != 0].abs().min() >= t.abs().flatten().kthvalue(int(0.8 * t.numel())).values
    dropped = random_prune(t, 0.3, torch.Generator().manual_seed(0))
    frac = (dropped != 0).float().mean().item()
    assert abs(frac - 0.3) < 0.01
    nz = dropped != 0
    torch.testing.assert_close(dropped[nz], t[nz] / 0.3)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_sparse_merges_keep_the_density_of_a_single_adapter(method):
    a = _rand_adapter({"m.q_proj": (64, 80)}, 8, 8.0, 0, "a")
    m = merge_adapters([a], method, density=0.25)
    A, B = m.factors["m.q_proj"]
    for t in (A, B):
        frac = (t != 0).float().mean().item()
        if method == "ties":
            assert (t != 0).sum().item() == int(0.25 * t.numel())
        else:
            assert abs(frac - 0.25) < 0.06


def test_mixed_ranks_refused_by_the_equal_rank_methods():
    ads = [_rand_adapter(SHAPES, 4, 8.0, 0, "alpha"), _rand_adapter(SHAPES, 2, 4.0, 1, "beta")]
    merge_adapters(ads, "concat")
    merge_adapters(ads, "svd")
    merge_adapters(ads, "ties", density=0.5, space="delta")   # dense deltas: ranks do not matter
    for method in ("weight_sum", "ties", "dare_linear", "dare_ties"):
        with pytest.raises(UserError) as e:
            merge_adapters(ads, method, density=0.5) if method != "weight_sum" else merge_adapters(ads, method)
        msg = str(e.value)
        assert "\n" not in msg and "alpha (4)" in msg and "beta (2)" in msg and "rank" in msg


def test_weight_sum_refuses_different_scales():
    ads = [_rand_adapter(SHAPES, 4, 8.0, 0, "alpha"), _rand_adapter(SHAPES, 4, 16.0, 1, "beta")]
    with pytest.raises(UserError, match=r"equal scales.*alpha \(2.0\), beta \(4.0\)"):
        merge_adapters(ads, "weight_sum")


@pytest.mark.parametrize("call,match", [
    (lambda a, b: merge_adapters([a, b], "nope"), r"unknown merge method 'nope'; known: concat, weight_sum, svd"),
    (lambda a, b: merge_adapters([a, b], "concat", [1.0]), r"1 weights for 2 adapters"),
    (lambda a, b: merge_adapters([a, b], "concat", rank=3), r"method concat has no option rank; its options: scaled$"),
    (lambda a, b: merge_adapters([a, b], "ties", seed=3), r"ties has no option seed; its options: density, majority_sign, space, rank$"),
    (lambda a, b: merge_adapters([a, b], "ties", density=1.5), r"density must be in \(0, 1\]"),
    (lambda a, b: merge_adapters([a, b], "ties", density=0.5, majority_sign="most"), r"'total' or 'frequency'"),
    (lambda a, b: merge_adapters([a, b], "dare_ties", density=0.5, space="weights"), r"'ab' or 'delta'"),
    (lambda a, b: merge_adapters([a, b], "svd", rank=0), r"positive integer or 'full'"),
    (lambda a, b: merge_adapters([a, b], "ties", density=0.5, rank=4), r"rank applies to space 'delta' only"),
    (lambda a, b: merge_adapters([], "svd"), r"no adapters"),
])
def test_bad_input_is_one_line(call, match):
    a, b = _rand_adapter(SHAPES, 4, 8.0, 0, "a"), _rand_adapter(SHAPES, 4, 8.0, 1, "b")
    with pytest.raises(UserError, match=match) as e:
        call(a, b)
    assert "\n" not in str(e.value)


def test_adapters_must_share_base_model_modules_and_shapes():
    a = _rand_adapter(SHAPES, 4, 8.0, 0, "a", base="org/model-1")
    with pytest.raises(UserError, match=r"adapters a and b are for different base models \(org/model-1 vs org/model-2\)"):
        merge_adapters([a, _rand_adapter(SHAPES, 4, 8.0, 1, "b", base="org/model-2")], "concat")
    merge_adapters([a, _rand_adapter(SHAPES, 4, 8.0, 1, "b", base=None)], "concat")   # unknown: allowed
    fewer = {"model.layers.0.self_attn.q_proj": (32, 32)}
    with pytest.raises(UserError, match=r"adapters a and c adapt different modules \(model.layers.0.mlp.down_proj only in a\)"):
        merge_adapters([a, _rand_adapter(fewer, 4, 8.0, 1, "c", base=None)], "concat")
    other = {**SHAPES, "model.layers.0.mlp.down_proj": (32, 64)}
    with pytest.raises(UserError, match=r"a and d disagree on module model.layers.0.mlp.down_proj: \[32, 72\] vs \[32, 64\]"):
        merge_adapters([a, _rand_adapter(other, 4, 8.0, 1, "d", base=None)], "concat")


def test_merged_adapter_is_a_peft_adapter(tmp_path, tokenizer):
    """A merge with a non-unit scale and mixed ranks saves, and PEFT reads it to the same logits."""
    model = tiny_model("qwen2")
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "up_proj"))}
    ads = [_rand_adapter(shapes, r, 2.0 * r, s, f"a{s}") for s, r in enumerate([4, 2])]
    for a in ads:   # keep the deltas small next to the random weights
        a.factors = {n: (x * 0.1, y * 0.1) for n, (x, y) in a.factors.items()}
    for method in ("svd", "concat"):
        merged = merge_adapters(ads, method)
        save_adapter(merged, tmp_path / method)
        back = load_adapter(tmp_path / method)
        for n in shapes:
            _close(back.delta(n), merged.delta(n))
        ids = tokenizer(["### Sentiment:\n good"], return_tensors="pt")["input_ids"]
        apply_adapter(model, merged)
        with torch.no_grad():
            ours = model(ids).logits
        unload_lora(model)
        pm = PeftModel.from_pretrained(tiny_model("qwen2"), str(tmp_path / method))
        with torch.no_grad():
            theirs = pm(ids).logits
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Three rank-4 adapters, one rank-2 and one for another base model, on disk."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_model("qwen2")
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if n.endswith(("q_proj", "v_proj"))}
    dirs = {}
    for name, r, base, seed in [("sentiment", 4, "tiny", 0), ("nli", 4, "tiny", 1), ("qa", 4, "tiny", 2),
                                ("small", 2, "tiny", 3), ("foreign", 4, "other/base", 4)]:
        ad = _rand_adapter(shapes, r, 8.0, seed, name, base)
        ad.factors = {n: (a * 0.1, b * 0.1) for n, (a, b) in ad.factors.items()}
        dirs[name] = save_adapter(ad, root / name)
    dirs["base"] = save_tiny(root / "base")
    return dirs


def _cli(args, capsys):
    rc = run_main(merge_main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_merges_and_records(adapter_dirs, tmp_path, capsys):
    srcs = [adapter_dirs[t] for t in ("sentiment", "nli", "qa")]
    out = tmp_path / "merged"
    rc, _, err = _cli(["--method", "svd_sum", "--rank", "6", "--out", out, *srcs], capsys)
    assert rc == 0, err
    rec = json.loads((out / "merge_info.json").read_text())
    assert rec["method"] == "svd_sum" and rec["registry_method"] == "svd"
    assert rec["options"] == {"rank": 6, "average": False} and rec["weights"] == [1.0, 1.0, 1.0]
    assert [s["name"] for s in rec["sources"]] == ["sentiment", "nli", "qa"]
    got = load_adapter(out)
    want = merge_adapters([load_adapter(d) for d in srcs], "svd_sum", rank=6)
    for n in want.factors:
        _close(got.delta(n), want.delta(n))
    # an existing folder is refused without --force, replaced with it
    rc, _, err = _cli(["--method", "concat", "--out", out, *srcs], capsys)
    assert rc == 2 and "exists; pass --force" in err
    rc, _, err = _cli(["--method", "concat", "--weights", "1", "0.5", "-1", "--force", "--out", out, *srcs], capsys)
    assert rc == 0, err
    assert json.loads((out / "merge_info.json").read_text())["weights"] == [1.0, 0.5, -1.0]


def test_cli_exports_a_plain_model(adapter_dirs, tmp_path, capsys, tokenizer):
    from transformers import AutoModelForCausalLM
    srcs = [adapter_dirs["sentiment"], adapter_dirs["nli"]]
    out, exported = tmp_path / "m", tmp_path / "model"
    rc, _, err = _cli(["--method", "dare_ties", "--density", "0.5", "--seed", "3", "--out", out,
                       "--export-model", exported, "--base", adapter_dirs["base"], *srcs], capsys)
    assert rc == 0, err
    assert json.loads((out / "merge_info.json").read_text())["options"] == {
        "density": 0.5, "majority_sign": "total", "space": "ab", "rank": None, "seed": 3}
    plain = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(adapter_dirs["base"])).eval()
    apply_adapter(model, load_adapter(out))
    ids = tokenizer(["### Premise:\n the"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


BAD = [
    (["--method", "nope"], "unknown merge method 'nope'"),
    (["--method", "concat", "--weights", "1", "2", "3"], "3 weights for 2 adapters"),
    (["--method", "weight_sum", "@small"], "equal ranks"),
    (["--method", "concat", "@foreign"], "different base models"),
    (["--method", "ties", "--density", "0"], "density must be in (0, 1]"),
    (["--method", "svd", "--rank", "abc"], "--rank must be a positive integer or 'full'"),
    (["--method", "concat", "--rank", "4"], "no option rank"),
    (["--method", "svd", "--seed", "4"], "no option seed"),
    (["--method", "ties", "--density", "0.5", "--majority-sign", "most"], "invalid choice"),
    (["--method", "concat", "--export-model", "@tmp/x"], "--export-model and --base go together"),
    (["--method", "concat", "--export-model", "@tmp/x", "--base", "@tmp/nothing"], "nothing"),
    (["--method", "concat", "@tmp/missing"], "does not exist"),
    (["--method", "concat", "--bogus"], "unrecognized arguments"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[b[1][:30] for b in BAD])
def test_cli_bad_input_one_line_exit_2_nothing_written(adapter_dirs, tmp_path, capsys, args, msg):
    def sub(a):
        if a.startswith("@tmp/"):
            return str(tmp_path / a[5:])
        return str(adapter_dirs[a[1:]]) if a.startswith("@") else a
    out = tmp_path / "out"
    argv = [sub(a) for a in args] + ["--out", str(out), str(adapter_dirs["sentiment"]), str(adapter_dirs["nli"])]
    rc, stdout, err = _cli(argv, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and msg in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no output folder, no temp leftovers


def test_cli_as_a_process(adapter_dirs, tmp_path):
    """The real entry point: exit 2, one line, no folder; --debug shows the traceback."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "src.merge", "--method", "weight_sum", "--out", str(out),
           str(adapter_dirs["sentiment"]), str(adapter_dirs["small"])]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: weight_sum needs")
    assert not out.exists()
    p = subprocess.run(cmd + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_merges_take_the_same_model_under_two_path_strings(tmp_path, monkeypatch):
    """issue 17: a relative and an absolute path of one model folder are the same base model."""
    from src import merging
    from src.errors import UserError
    from tiny import random_adapter, save_tiny, tiny_model
    model = save_tiny(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    a = random_adapter(tiny_model("qwen2"), 1)
    b = random_adapter(tiny_model("qwen2"), 2)
    a.config["base_model_name_or_path"], b.config["base_model_name_or_path"] = "m", str(model.resolve())
    merging.check_compatible([a, b])
    b.config["base_model_name_or_path"] = str(save_tiny(tmp_path / "other", "llama").resolve())
    with pytest.raises(UserError, match="different base models"):
        merging.check_compatible([a, b])


def test_cli_same_base_merges_adapters_that_name_one_model_differently(adapter_dirs, tmp_path, capsys):
    """issue 17: the override for one model under two names that resolve differently (a copy)."""
    out = tmp_path / "out"
    argv = ["--method", "concat", "--out", str(out), str(adapter_dirs["sentiment"]), str(adapter_dirs["foreign"])]
    rc, _, err = _cli(argv, capsys)
    assert rc == 2 and "python -m src.merge --same-base merges them" in err and not out.exists()
    rc, _, err = _cli([*argv, "--same-base"], capsys)
    assert rc == 0, err
    assert json.loads((out / "merge_info.json").read_text())["config"]["same_base"] is True
