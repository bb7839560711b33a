"""The one expert layer under every router: its gates, and its outputs against single adapters."""
import pytest
import torch

from src import merging
from src.experts import Selection, entropy, inject_experts, load_balance, remove_experts, topk_softmax
from src.lora import apply_adapter, folded, unload_lora
from tiny import random_adapter, tiny_model

TASKS = ["a", "b", "c"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3], [250, 12, 8, 8, 61, 2]])


def adapters_for(model, ranks=(4, 4, 4)):
    return {t: random_adapter(model, i, rank=r, name=t) for i, (t, r) in enumerate(zip(TASKS, ranks))}


class Gates:
    """A route callback that returns fixed gates (or a Selection) and records the shapes seen."""

    def __init__(self, make):
        self.make = make

    def __call__(self, layer, x, keys):
        return self.make(x)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_gates(model, ads, make):
    names, layers = inject_experts(model, ads, TASKS, Gates(make))
    try:
        return logits(model)
    finally:
        remove_experts(model, names, layers)


def alone(model, adapter, ids=IDS):
    apply_adapter(model, adapter)
    try:
        return logits(model, ids)
    finally:
        unload_lora(model)


# --------------------------------------------------------------------------- gates (pure)

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_softmax_keeps_k_and_sums_to_one(k):
    scores = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(k))
    g = topk_softmax(scores, k, temperature=0.7)
    assert ((g > 0).sum(-1) <= k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(4, 7), atol=1e-6, rtol=0)
    # PEFT's formulation: softmax over the full row with the non-top-k scores at -inf
    top, idx = scores.topk(min(k, 5), dim=-1)
    full = torch.full_like(scores, float("-inf")).scatter(-1, idx, top)
    torch.testing.assert_close(g, torch.softmax(full / 0.7, -1), atol=1e-7, rtol=0)


def test_balance_and_entropy_of_uniform_gates():
    p = torch.full((10, 4), 0.25)
    assert float(load_balance(p, torch.ones(10, 4))) == pytest.approx(1.0)
    assert float(entropy(p).mean()) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    one_hot = torch.eye(4)[torch.zeros(10, dtype=torch.long)]          # every token on expert 0
    assert float(load_balance(one_hot, one_hot)) == pytest.approx(4.0)  # the worst imbalance: E
    assert float(entropy(one_hot).max()) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- the layer

@pytest.mark.parametrize("form", ["selection", "sequence", "token"])
@pytest.mark.parametrize("e", [0, 2])
def test_one_hot_gates_equal_that_adapter_alone(arch, form, e):
    model = tiny_model(arch)
    ads = adapters_for(model, (4, 2, 6))
    ref = alone(model, ads[TASKS[e]])

    def make(x):
        if form == "selection":
            return Selection(torch.full((x.shape[0],), e, dtype=torch.long))
        shape = (x.shape[0], len(TASKS)) if form == "sequence" else (*x.shape[:2], len(TASKS))
        return torch.nn.functional.one_hot(torch.full(shape[:-1], e), len(TASKS)).float()
    torch.testing.assert_close(with_gates(model, ads, make), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", ["sequence", "token"])
def test_all_ones_gates_equal_the_concat_merge(arch, form):
    model = tiny_model(arch)
    ads = adapters_for(model, (4, 2, 6))
    merged = merging.merge_adapters([ads[t] for t in TASKS], "concat")
    with folded(model, merged):
        ref = logits(model)

    def make(x):
        return torch.ones(x.shape[0], len(TASKS)) if form == "sequence" else torch.ones(*x.shape[:2], len(TASKS))
    torch.testing.assert_close(with_gates(model, ads, make), ref, atol=1e-5, rtol=0)


def test_soft_gates_per_sequence_equal_the_weighted_concat_merge(arch):
    """A per-sequence router whose gates are not one-hot (retrieval's top-k, a soft MoA) takes the
    per-sequence path: gates g equal folding sum_e g_e s_e B_e A_e (concat with weights g), and
    the same gates repeated on every token take the per-token path to the same output."""
    model = tiny_model(arch)
    ads = adapters_for(model, (4, 2, 6))
    g = [0.2, 0.5, 0.3]
    merged = merging.merge_adapters([ads[t] for t in TASKS], "concat", weights=g)
    with folded(model, merged):
        ref = logits(model)
    per_seq = with_gates(model, ads, lambda x: torch.tensor(g).expand(x.shape[0], len(TASKS)))
    per_tok = with_gates(model, ads, lambda x: torch.tensor(g).expand(*x.shape[:2], len(TASKS)))
    torch.testing.assert_close(per_seq, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(per_tok, per_seq, atol=1e-6, rtol=0)
    assert (per_seq - logits(model)).abs().max() > 1e-2          # the experts act


@pytest.mark.parametrize("form", ["selection", "sequence", "token"])
def test_a_mixed_batch_equals_each_sequence_alone(form):
    model = tiny_model("qwen2")
    ads = adapters_for(model)
    g = torch.Generator().manual_seed(3)
    seq_gates = torch.softmax(torch.randn(2, len(TASKS), generator=g), -1)
    tok_gates = topk_softmax(torch.randn(2, IDS.shape[1], len(TASKS), generator=g), 2)

    def gates_for(rows):
        def make(x):
            if form == "selection":
                return Selection(torch.tensor([0, 2])[rows])
            if form == "sequence":
                return seq_gates[rows]
            return tok_gates[rows]
        return make
    names, layers = inject_experts(model, ads, TASKS, Gates(gates_for([0, 1])))
    try:
        both = logits(model)
        for i in range(2):
            for layer in layers:
                layer.route = Gates(gates_for([i]))
            torch.testing.assert_close(logits(model, IDS[i:i + 1]), both[i:i + 1], atol=1e-5, rtol=0)
    finally:
        remove_experts(model, names, layers)
    if form == "selection":   # and each is its own expert's adapter
        for i, e in enumerate([0, 2]):
            torch.testing.assert_close(both[i:i + 1], alone(model, ads[TASKS[e]], IDS[i:i + 1]), atol=1e-6, rtol=0)


def test_keys_are_computed_with_the_a_projection():
    """A router's linear map given as keys reaches the callback as x @ keys^T, in the same matmul."""
    model = tiny_model("qwen2")
    ads = adapters_for(model)
    seen = {}

    def route(layer, x, keys_out):
        seen[layer.index] = (x.detach().float() @ layer.keys.T, keys_out.detach())
        return torch.ones(*x.shape[:2], len(TASKS)) / len(TASKS)
    names, layers = inject_experts(model, ads, TASKS, route)
    for layer in layers:
        layer.set_keys(torch.randn(5, layer.linear.in_features))
    try:
        logits(model)
    finally:
        remove_experts(model, names, layers)
    assert len(seen) == len(layers)
    for want, got in seen.values():
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_router_on_the_projection_sees_every_experts_a_side():
    """route_on_projection(): the callback receives [..., E * r_max], each expert's A x side by side
    (zero-padded ranks), and the output is the per-token path's for the same gates."""
    model = tiny_model("qwen2")
    ads = adapters_for(model, (4, 2, 6))
    g = torch.Generator().manual_seed(5)
    tok_gates = topk_softmax(torch.randn(2, IDS.shape[1], len(TASKS), generator=g), 2)
    ref = with_gates(model, ads, lambda x: tok_gates)
    seen = {}

    def route(layer, x, proj):
        seen[layer.index] = (torch.cat([x.detach().float() @ layer.lora_A[e].T for e in range(len(TASKS))], -1),
                             proj.detach())
        return tok_gates
    names, layers = inject_experts(model, ads, TASKS, route)
    for layer in layers:
        layer.route_on_projection()
    try:
        got = logits(model)
    finally:
        remove_experts(model, names, layers)
    assert len(seen) == len(layers) and all(p.shape[-1] == 3 * 6 for _, p in seen.values())
    for want, proj in seen.values():
        torch.testing.assert_close(proj, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", ["arrow", "smile"])
def test_a_per_token_router_over_one_adapter_is_that_adapter(arch, router):
    """Arrow and SMILE over one expert: LoRALinear's own math bit for bit (the expert layer's one-expert
    path), the adapter folded into the weights up to rounding, the whole prompt on that expert."""
    from src.arrow import ArrowConfig, ArrowRouter
    from src.smile import SmileConfig, SmileRouter
    model = tiny_model(arch)
    ad = random_adapter(model, 3, name="qa")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12], [8, 61, 2, 300, 77, 140, 18, 33]])

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits
    apply_adapter(model, ad)
    layered = logits()
    unload_lora(model)
    with folded(model, ad):
        in_weights = logits()
    made = (ArrowRouter(model, {"qa": ad}, ArrowConfig(arrow_top_k=1)) if router == "arrow"
            else SmileRouter(model, {"qa": ad}, SmileConfig()))
    with made.session():
        got = logits()
    made.remove()
    assert torch.equal(got, layered)                               # LoRALinear's own math, bit for bit
    torch.testing.assert_close(got, in_weights, atol=5e-5, rtol=0)      # folding rounds differently
    assert made.routing_records() == [{"expert_share": {"qa": 1.0}}] * 2
