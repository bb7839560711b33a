"""Arrow routing, pinned against PEFT's create_arrow_model on PEFT-made adapters."""
import pytest
import torch

from src.arrow import (ArrowConfig, ArrowRouter, arrow_gates, genknowsub, power_prototype,
                       top_right_singular_vector)
from src.errors import UserError
from src.lora import load_adapter
from tiny import random_adapter, tiny_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12], [8, 61, 2, 300, 77, 140, 18, 33]])


def peft_adapters(tmp, arch, n, prefix, seed0, rank=4):
    """n PEFT LoRA folders (random A and B, init_lora_weights=False) for tiny_model(arch)."""
    paths = []
    for i in range(n):
        base = tiny_model(arch)                     # seeds the global RNG itself: seed after it
        torch.manual_seed(seed0 + i)
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        path = tmp / f"{prefix}{i}"
        model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def library(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"arrow-{request.param}")
    return {"arch": request.param, "tasks": peft_adapters(tmp, request.param, 3, "task", 10),
            "general": peft_adapters(tmp, request.param, 2, "general", 50)}


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (2, 1.0), (3, 1.0), (2, 0.5)])
@pytest.mark.parametrize("gks", [False, True])
def test_matches_peft_create_arrow_model(library, k, temperature, gks):
    arch = library["arch"]
    ref_model = peft.create_arrow_model(
        tiny_model(arch), library["tasks"],
        peft.ArrowConfig(top_k=k, router_temperature=temperature, use_gks=gks, rng_seed=7),
        general_adapter_paths=library["general"] if gks else None)
    ref = logits(ref_model)
    model = tiny_model(arch)
    adapters = {f"t{i}": load_adapter(p) for i, p in enumerate(library["tasks"])}
    general = [load_adapter(p) for p in library["general"]] if gks else []
    router = ArrowRouter(model, adapters, ArrowConfig(arrow_top_k=k, arrow_temperature=temperature,
                                                      arrow_prototypes="power", arrow_seed=7), general)
    ours = logits(model)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    router.remove()
    assert not torch.allclose(logits(model), ref, atol=1e-3)       # the routing did something


def test_exact_prototypes_match_a_dense_float64_svd():
    g = torch.Generator().manual_seed(0)
    for out, inp, r in [(64, 40, 4), (24, 96, 8), (32, 32, 1)]:
        a, b = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        v = top_right_singular_vector(a, b).double()
        dense = torch.linalg.svd(b.double() @ a.double()).Vh[0]
        assert v.shape == (inp,)
        torch.testing.assert_close(v * torch.sign(v @ dense), dense, atol=1e-6, rtol=0)


def test_power_iterations_approach_the_exact_prototype():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 50, generator=g), torch.randn(30, 4, generator=g)
    exact = top_right_singular_vector(a, b)
    assert abs(float(power_prototype(a, b, iters=200) @ exact)) == pytest.approx(1.0, abs=1e-5)


def test_genknowsub_subtracts_the_mean_general_factors():
    g = torch.Generator().manual_seed(2)
    task = [(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(2)]
    general = [(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(2)]
    out = genknowsub(task, general)
    torch.testing.assert_close(out[1][0], task[1][0] - (general[0][0] + general[1][0]) / 2)
    torch.testing.assert_close(out[0][1], task[0][1] - (general[0][1] + general[1][1]) / 2)


def test_gates_keep_top_k_of_the_absolute_scores():
    s = torch.tensor([[[0.5, -3.0, 1.0, 0.1]]])
    g = arrow_gates(s, 2)
    assert g[0, 0, 0] == 0 and g[0, 0, 3] == 0                    # |-3| and |1| are the top 2
    torch.testing.assert_close(g[0, 0, [1, 2]], torch.softmax(torch.tensor([3.0, 1.0]), 0))


def test_session_records_each_experts_share_of_the_prompt():
    model = tiny_model("qwen2")
    ads = {t: random_adapter(model, i, name=t) for i, t in enumerate(["a", "b", "c"])}
    router = ArrowRouter(model, ads, ArrowConfig(arrow_top_k=2))
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0                                                # left padding on row 1
    with router.session(prompt_mask=mask), torch.no_grad():
        model(input_ids=IDS, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    shares = router.layer_shares()                                 # [layers, batch, experts]
    assert shares.shape == (len(router.layers), 2, 3)
    torch.testing.assert_close(shares.sum(-1), torch.ones(len(router.layers), 2), atol=1e-6, rtol=0)
    recs = router.routing_records()
    assert len(recs) == 2 and sum(recs[0]["expert_share"].values()) == pytest.approx(1.0, abs=1e-5)
    # the padded row's shares come from its five real tokens only
    with router.session(prompt_mask=torch.ones(1, 5, dtype=torch.long)):
        logits(model, IDS[1:, 3:])
    torch.testing.assert_close(router.layer_shares()[:, 0], shares[:, 1], atol=1e-5, rtol=0)
    router.remove()


# --------------------------------------------------------------------------- bad input

def test_refuses_adapters_of_different_ranks():
    model = tiny_model("qwen2")
    ads = {"qa": random_adapter(model, 0, rank=4), "nli": random_adapter(model, 1, rank=2)}
    with pytest.raises(UserError, match=r"one rank .*qa \(rank 4\), nli \(rank 2\)"):
        ArrowRouter(model, ads, ArrowConfig(arrow_top_k=1))
    assert not [m for m in model.modules() if type(m).__name__ == "ExpertLinear"]   # nothing injected


def test_refuses_adapters_of_different_modules():
    model = tiny_model("qwen2")
    ads = {"qa": random_adapter(model, 0), "nli": random_adapter(model, 1, targets=("q_proj", "v_proj"))}
    with pytest.raises(UserError, match="must cover the same modules: adapter 'nli' lacks"):
        ArrowRouter(model, ads, ArrowConfig(arrow_top_k=1))


@pytest.mark.parametrize("kw,msg", [
    (dict(arrow_top_k=0), "--arrow-top-k must be a positive integer"),
    (dict(arrow_temperature=0.0), "--arrow-temperature must be a finite number > 0"),
    (dict(arrow_temperature=float("nan")), "--arrow-temperature must be a finite number > 0"),
    (dict(arrow_prototypes="dense"), "--arrow-prototypes must be one of exact, power"),
])
def test_config_refuses_bad_options(kw, msg):
    with pytest.raises(UserError, match=msg):
        ArrowConfig(**kw)


def test_refuses_more_top_k_than_experts():
    model = tiny_model("qwen2")
    ads = {"qa": random_adapter(model, 0), "nli": random_adapter(model, 1)}
    with pytest.raises(UserError, match="--arrow-top-k 3 is more than the 2 experts"):
        ArrowRouter(model, ads, ArrowConfig(arrow_top_k=3))


def test_the_default_top_k_is_capped_at_the_experts():
    """Two tasks: the default (PEFT's 3) keeps both experts, as --arrow-top-k 2 does, exactly."""
    model = tiny_model("qwen2")
    ads = {"qa": random_adapter(model, 0), "nli": random_adapter(model, 1)}
    assert ArrowConfig().top_k(2) == 2 and ArrowConfig().top_k(7) == 3 and ArrowConfig(arrow_top_k=1).top_k(7) == 1
    outs = []
    for cfg in (ArrowConfig(), ArrowConfig(arrow_top_k=2)):
        router = ArrowRouter(model, ads, cfg)
        with router.session():
            outs.append(logits(model))
        router.remove()
    assert torch.equal(outs[0], outs[1])


def test_refuses_a_general_adapter_that_does_not_fit():
    model = tiny_model("qwen2")
    ads = {"qa": random_adapter(model, 0), "nli": random_adapter(model, 1)}
    general = random_adapter(model, 2, rank=2, name="wiki")
    with pytest.raises(UserError, match=r"general wiki \(rank 2\)"):
        ArrowRouter(model, ads, ArrowConfig(arrow_top_k=1), general=[general])
