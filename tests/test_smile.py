"""SMILE routing, pinned against a dense float64 reference written from the paper (FusionBench's
SmileGate / SmileMoELinear: logits ||V_k^T x||, softmax, top-k, renormalise)."""
import json

import pytest
import torch
import torch.nn as nn

from src import compose, systems  # noqa: F401 (systems: every method registered)
from src.arrow import ArrowConfig, ArrowRouter
from src.errors import UserError
from src.lora import lora_layers, set_module
from src.smile import SmileConfig, SmileRouter, factor_svd, smile_logits, svd_form
from tiny import random_adapter, tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12], [8, 61, 2, 300, 77, 140, 18, 33]])
TASKS = ["a", "b", "c"]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def library(model, ranks=(4, 4, 4)):
    return {t: random_adapter(model, 10 + i, rank=r, name=t, std=0.05) for i, (t, r) in enumerate(zip(TASKS, ranks))}


# --------------------------------------------------------------------------- the dense reference

class DenseSmile(nn.Module):
    """One SMILE layer as the paper writes it, in float64 from dense deltas dW_i = s_i B_i A_i."""

    def __init__(self, linear, deltas, cfg: SmileConfig):
        super().__init__()
        self.linear, self.cfg = linear, cfg
        self.gates_v, self.gates_s, self.experts = [], [], []
        for dw in deltas:
            u, s, vh = torch.linalg.svd(dw)                       # dense, float64
            rank = int(torch.linalg.matrix_rank(dw))              # the delta's own directions (null space: none)
            g = min(cfg.smile_gate_k, rank)
            self.gates_v.append(vh[:g])
            self.gates_s.append(s[:g])
            k = rank if cfg.smile_rank is None else min(cfg.smile_rank, rank)
            self.experts.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])

    def forward(self, x):
        x64 = x.double()
        r = []
        for v, s in zip(self.gates_v, self.gates_s):
            proj = x64 @ v.T
            if self.cfg.smile_gate_scale == "singular":
                proj = proj * s
            r.append(proj.norm(dim=-1))
        r = torch.stack(r, -1)                                    # [b, t, E]
        if self.cfg.smile_normalize == "input":
            r = r / x64.norm(dim=-1, keepdim=True)
        p = torch.softmax(r / self.cfg.smile_temperature, -1)     # softmax, top-k, renormalise
        w, idx = p.topk(self.cfg.smile_top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros(*x.shape[:-1], self.linear.out_features, dtype=torch.float64)
        for e, dw in enumerate(self.experts):
            gate = (w * (idx == e)).sum(-1, keepdim=True)
            out = out + gate * (x64 @ dw.T)
        return self.linear(x) + out.float()


def dense_reference(model, adapters, cfg):
    by_name = dict(model.named_modules())
    names = list(next(iter(adapters.values())).factors)
    for n in names:
        deltas = [(ad.factors[n][1].double() @ ad.factors[n][0].double()) * ad.scales[n] for ad in adapters.values()]
        set_module(model, n, DenseSmile(by_name[n], deltas, cfg))
    return model


# --------------------------------------------------------------------------- math

def test_factor_svd_equals_a_dense_float64_svd():
    g = torch.Generator().manual_seed(0)
    for out, inp, r in [(64, 40, 4), (24, 96, 8), (32, 32, 1), (6, 50, 8)]:
        a, b = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        u, s, v = factor_svd(a, b)
        dense = torch.linalg.svd(b.double() @ a.double())
        k = s.shape[0]
        assert k == min(r, out, inp)
        torch.testing.assert_close(s, dense.S[:k], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close((u * s) @ v.T, b.double() @ a.double(), atol=1e-9, rtol=1e-9)
        for j in range(k):                                         # each singular pair up to sign
            torch.testing.assert_close(v[:, j] * torch.sign(v[:, j] @ dense.Vh[j]), dense.Vh[j], atol=1e-8, rtol=0)


def test_svd_form_keeps_the_delta_and_truncates_to_the_top_triplets():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 30, generator=g), torch.randn(20, 6, generator=g)
    a2, b2, s = svd_form(a, b)
    assert a2.shape == (6, 30) and b2.shape == (20, 6)
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(a2 @ a2.T, torch.eye(6), atol=1e-6, rtol=0)      # orthonormal rows: V^T
    dense = torch.linalg.svd(b.double() @ a.double())
    best2 = dense.U[:, :2] @ torch.diag(dense.S[:2]) @ dense.Vh[:2]              # Eckart-Young
    for rows, m in [(0, 2), (4, 4), (9, 6)]:     # the gate's rows kept beyond the truncation, B' 0 there
        a3, b3, s3 = svd_form(a, b, rank=2, rows=rows)
        assert a3.shape == (m, 30) and b3.shape == (20, m) and s3.shape == (m,)
        assert not b3[:, 2:].any()
        torch.testing.assert_close((b3 @ a3).double(), best2, atol=1e-4, rtol=0)


def test_logits_are_the_norm_of_the_first_gate_k_coordinates():
    proj = torch.tensor([[[3.0, 4.0, 12.0, 1.0, 0.0, 2.0]]])     # two experts of rank 3
    torch.testing.assert_close(smile_logits(proj, 2, 2), torch.tensor([[[5.0, 1.0]]]))
    torch.testing.assert_close(smile_logits(proj, 2, 3), torch.tensor([[[13.0, 5 ** 0.5]]]))
    w = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(smile_logits(proj, 2, 2, w), torch.tensor([[[(36 + 16) ** 0.5, 1.0]]]))
    torch.testing.assert_close(smile_logits(proj, 2, 2, x_norm=torch.tensor([[10.0]])),
                               torch.tensor([[[0.5, 0.1]]]))


# --------------------------------------------------------------------------- against the reference

CONFIGS = {
    "default": SmileConfig(),
    "top2": SmileConfig(smile_top_k=2),
    "gate2-singular": SmileConfig(smile_top_k=2, smile_gate_k=2, smile_gate_scale="singular"),
    "input-norm-T": SmileConfig(smile_top_k=3, smile_normalize="input", smile_temperature=0.3),
    "rank2": SmileConfig(smile_top_k=2, smile_gate_k=3, smile_rank=2),
    "gate1": SmileConfig(smile_top_k=2, smile_gate_k=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_the_dense_float64_reference(arch, name):
    cfg = CONFIGS[name]
    ranks = (4, 2, 6) if name in ("top2", "rank2") else (4, 4, 4)    # SMILE takes any ranks
    ads = library(tiny_model(arch), ranks)
    ref = logits(dense_reference(tiny_model(arch), ads, cfg))
    model = tiny_model(arch)
    router = SmileRouter(model, ads, cfg)
    with router.session():
        ours = logits(model)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    router.remove()
    assert (ours - logits(model)).abs().max() > 1e-3                   # the routing did something


def test_gate_k_1_is_arrow_with_exact_prototypes():
    """Arrow's |v . x| is SMILE's logit with one singular vector: the same gates, the same outputs."""
    model = tiny_model("qwen2")
    ads = library(model)
    outs, shares = [], []
    for router in (lambda: SmileRouter(model, ads, SmileConfig(smile_top_k=2, smile_gate_k=1)),
                   lambda: ArrowRouter(model, ads, ArrowConfig(arrow_top_k=2))):
        r = router()
        with r.session():
            outs.append(logits(model))
        shares.append(r.layer_shares())
        r.remove()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(shares[0], shares[1], atol=1e-5, rtol=0)


def test_session_records_shares_and_remove_restores_the_model_bit_for_bit():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = logits(model)
    router = SmileRouter(model, library(model), SmileConfig(smile_top_k=2))
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    with router.session(prompt_mask=mask), torch.no_grad():
        model(input_ids=IDS, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    shares = router.layer_shares()
    assert shares.shape == (len(router.layers), 2, 3)
    torch.testing.assert_close(shares.sum(-1), torch.ones(len(router.layers), 2), atol=1e-6, rtol=0)
    recs = router.routing_records()
    assert len(recs) == 2 and sum(recs[0]["expert_share"].values()) == pytest.approx(1.0, abs=1e-5)
    router.remove()
    assert not lora_layers(model) and torch.equal(logits(model), plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw,msg", [
    (dict(smile_top_k=0), "--smile-top-k must be a positive integer, got 0"),
    (dict(smile_gate_k=0), "--smile-gate-k must be a positive integer"),
    (dict(smile_rank=0), "--smile-rank must be a positive integer"),
    (dict(smile_temperature=0.0), "--smile-temperature must be a finite number > 0"),
    (dict(smile_temperature=float("nan")), "--smile-temperature must be a finite number > 0"),
    (dict(smile_gate_scale="sigma"), "--smile-gate-scale must be one of none, singular"),
    (dict(smile_normalize="l2"), "--smile-normalize must be one of none, input"),
])
def test_config_refuses_bad_options(kw, msg):
    with pytest.raises(UserError, match=msg):
        SmileConfig(**kw)


def test_refuses_more_top_k_than_experts_and_leaves_the_model_alone():
    model = tiny_model("qwen2")
    ads = {t: random_adapter(model, i, name=t) for i, t in enumerate(["qa", "nli"])}
    with pytest.raises(UserError, match=r"--smile-top-k 3 is more than the 2 experts \(qa, nli\)"):
        SmileRouter(model, ads, SmileConfig(smile_top_k=3))
    assert not [m for m in model.modules() if type(m).__name__ == "ExpertLinear"]


def test_refuses_adapters_of_different_modules():
    model = tiny_model("qwen2")
    ads = {"qa": random_adapter(model, 0), "nli": random_adapter(model, 1, targets=("q_proj", "v_proj"))}
    with pytest.raises(UserError, match="must cover the same modules: adapter 'nli' lacks"):
        SmileRouter(model, ads)


# --------------------------------------------------------------------------- the registry entry

def _env(tmp_path, **options):
    from tiny import save_tiny_run
    _, run = save_tiny_run(tmp_path, tasks=("sentiment", "nli", "qa"), rank=4)
    env = compose.Env(run, ["sentiment", "nli", "qa"], {SmileConfig: SmileConfig(**options)})
    compose.check_all(["smile"], env)
    return env


def test_fingerprint_changes_with_each_option_and_not_otherwise(tmp_path, capsys):
    env = _env(tmp_path)

    def fp(**options):
        env.options[SmileConfig] = SmileConfig(**options)
        return compose.fingerprint("smile", "qa", env, {})

    base, top2 = fp(), fp(smile_top_k=2)
    assert json.loads(json.dumps(base)) == base == fp()                    # survives JSON; same options, same
    changed = [top2, fp(smile_gate_k=2), fp(smile_gate_scale="singular"), fp(smile_rank=2),
               fp(smile_top_k=2, smile_temperature=0.5), fp(smile_top_k=2, smile_normalize="input")]
    assert all(c != base for c in changed) and changed[4] != top2 and changed[5] != top2
    assert len({json.dumps(c, sort_keys=True) for c in changed}) == len(changed)
    # what cannot change a gate is left out: T and normalisation at k = 1, values beyond the rank (4)
    assert fp(smile_temperature=0.5) == fp(smile_normalize="input") == base
    assert fp(smile_gate_k=4) == fp(smile_gate_k=9) and fp(smile_rank=4) == fp(smile_rank=8) == fp(smile_rank=None)
    assert fp(smile_gate_k=3) != fp(smile_gate_k=4)
    env.digests["qa"] = "another"                                          # a retrained adapter
    assert fp() != base


def test_the_entry_refuses_more_top_k_than_tasks(tmp_path):
    with pytest.raises(UserError, match=r"--smile-top-k 4 is more than the 3 experts \(sentiment, nli, qa\)"):
        _env(tmp_path, smile_top_k=4)


def test_smile_through_full_evaluation(tmp_path):
    """`--methods smile` evaluates and records each expert's share; bad k is one line, exit code 2,
    nothing written; a rerun reuses the cells and an option is in the fingerprint."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tiny import save_tiny
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "tests" / "fixtures" / "run_v1", tmp_path / "run")
    save_tiny(tmp_path / "tiny-qwen2")
    base = [sys.executable, str(root / "full_evaluation.py"), "--model", "tiny-qwen2", "--output-dir", "run",
            "--tasks", "sentiment,nli,qa", "--data", "sample", "--eval-size", "2", "--batch-size", "4",
            "--max-new-tokens", "4", "--max-prompt-len", "128", "--no-exclude-selection", "--methods", "smile"]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")

    def run(*extra):
        return subprocess.run([*base, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)

    for bad, line in [("4", "error: --smile-top-k 4 is more than the 3 experts (sentiment, nli, qa)"),
                      ("0", "error: --smile-top-k must be a positive integer, got 0")]:
        out = run("--smile-top-k", bad)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [line], out.stderr[-2000:]
        assert not (tmp_path / "run" / "eval" / "cells" / "smile").exists()
    out = run("--smile-top-k", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 cells reused, 3 to compute" in out.stderr            # base and oracle from the fixture
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    table = summary["routing"]["smile"]
    assert table["kind"] == "token" and set(table["share"]) == {"sentiment", "nli", "qa"}
    rec = json.loads((tmp_path / "run" / "eval" / "predictions" / "smile" / "qa.jsonl").read_text().splitlines()[0])
    assert abs(sum(rec["expert_share"].values()) - 1) < 1e-4
    assert "0 to compute" in run("--smile-top-k", "2").stderr
    assert "3 to compute" in run("--smile-top-k", "2", "--smile-gate-k", "2").stderr
