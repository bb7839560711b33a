"""Mixture-of-LoRAs on tiny models: oracle mode equals the single LoRA, mixed batches equal each
sequence alone, routing is decided once per generation, save/load round trip, router training."""
import json

import pytest
import torch

from src.errors import UserError
from src.lora import apply_adapter, load_adapter, save_adapter, unload_lora
from src.experts import ExpertLinear as MoALinear
from src.moa import MixtureOfLoRAs, MoAConfig, decide, vote
from tiny import random_adapter, tiny_model, trained_like_adapter

TASKS = ["a", "b", "c"]


def make_adapters(model, ranks=(4, 4, 4)):
    ads = {"a": trained_like_adapter(model, 0, ranks[0], std=0.5)}
    for i, (t, r) in enumerate(zip(TASKS[1:], ranks[1:]), 1):
        ads[t] = random_adapter(model, i, rank=r)
    return ads


def randomize_routers(moa, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in moa.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * std)
            r.bias.copy_(torch.randn(r.bias.shape, generator=g) * std)


def reference_logits(model, adapter, **inputs):
    apply_adapter(model, adapter)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        unload_lora(model)


def left_pad(seqs, pad=1):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def padded_inputs(seqs):
    ids, mask = left_pad(seqs)
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))


PROMPTS = [[5, 17, 42, 99, 7, 3], [250, 12, 8], [33, 301, 77, 140, 18]]


# --------------------------------------------------------------------------- invariants

@pytest.mark.parametrize("router", ["study", "block"])
def test_router_logits_of_a_batch_are_each_prompts_own(router):
    """Each router's logits for a left-padded batch equal the prompt's logits alone: padding and
    the other sequences change nothing (shape [n_routers, batch, experts], float32)."""
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(router=router))
    randomize_routers(moa)
    with torch.no_grad(), moa.session():
        model(**padded_inputs(PROMPTS))
        batch = moa.router_logits()
    n_routers = 2 * 6 if router == "study" else 2          # 2 blocks x 6 target layers, or 2 blocks
    assert batch.shape == (n_routers, 3, 3) and batch.dtype == torch.float32
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad(), moa.session():
            model(**padded_inputs([prompt]))
            alone = moa.router_logits()
        torch.testing.assert_close(batch[:, i], alone[:, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[:, 0], batch[:, 1])      # the prompts do route differently


def test_oracle_equals_single_lora(model):
    ads = make_adapters(model)
    inputs = padded_inputs(PROMPTS)
    refs = {t: reference_logits(model, ads[t], **inputs) for t in TASKS}
    base = model(**inputs).logits
    moa = MixtureOfLoRAs(model, ads, MoAConfig(tasks=("c", "a", "b")))
    assert moa.tasks == ["c", "a", "b"]
    randomize_routers(moa)
    for t in TASKS:
        with torch.no_grad(), moa.session(experts=[t] * 3):
            out = model(**inputs).logits
        assert (out - base).abs().max() > 1e-2                # the expert does something
        torch.testing.assert_close(out, refs[t], atol=1e-5, rtol=0)
    moa.remove()
    assert not any(isinstance(m, MoALinear) for m in model.modules())
    torch.testing.assert_close(model(**inputs).logits, base, atol=0, rtol=0)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 8, 5)])
def test_mixed_batch_equals_each_alone(ranks):
    """Different forced experts per row, left padding of different lengths, ranks that differ."""
    model = tiny_model("llama")
    ads = make_adapters(model, ranks)
    experts = [2, 0, 1]
    refs = [reference_logits(model, ads[TASKS[e]], input_ids=torch.tensor([p]))[0]
            for e, p in zip(experts, PROMPTS)]
    moa = MixtureOfLoRAs(model, ads)
    with torch.no_grad(), moa.session(experts=torch.tensor(experts)):
        out = model(**padded_inputs(PROMPTS)).logits
    for i, p in enumerate(PROMPTS):
        with torch.no_grad(), moa.session(experts=experts[i:i + 1]):
            alone = model(input_ids=torch.tensor([p])).logits[0]
        torch.testing.assert_close(alone, refs[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[i, -len(p):], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("router,inference", [("study", "layer"), ("study", "last"), ("study", "vote"),
                                              ("block", "layer"), ("block", "last"), ("block", "vote")])
def test_routed_mixed_batch_equals_each_alone(router, inference):
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(router=router, inference=inference))
    randomize_routers(moa, seed=4)
    with torch.no_grad(), moa.session():               # positions default -1: left padding
        out = model(**padded_inputs(PROMPTS)).logits
        chosen = moa.chosen_experts()
        per_layer = moa.step_decisions()[0]              # [n_layers, batch]
    assert chosen.unique().numel() > 1                   # the batch really is mixed
    for i, p in enumerate(PROMPTS):
        with torch.no_grad(), moa.session():
            alone = model(input_ids=torch.tensor([p])).logits[0]
            assert moa.chosen_experts().item() == chosen[i].item()
            assert torch.equal(moa.step_decisions()[0][:, 0], per_layer[:, i])
        torch.testing.assert_close(out[i, -len(p):], alone, atol=1e-5, rtol=0)
    if inference != "layer":                             # one expert for all layers
        assert torch.equal(per_layer, chosen.expand_as(per_layer))
        assert torch.equal(chosen, decide(moa_logits(moa, model), inference))


def test_layer_shares_are_each_layers_choice_on_the_prompt():
    """evaluation's per-layer heatmap: one-hot of the expert each layer used on the first forward,
    unchanged by decoding steps (the decision is held)."""
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(inference="layer"))
    randomize_routers(moa, seed=4)
    with torch.no_grad(), moa.session():
        model(**padded_inputs(PROMPTS))
        first = moa.step_decisions()[0]                  # [n_layers, batch]
        shares = moa.layer_shares()
    assert shares.shape == (len(moa.layer_names), len(PROMPTS), len(TASKS))
    assert torch.equal(shares.argmax(-1), first) and torch.equal(shares.sum(-1), torch.ones_like(first, dtype=shares.dtype))
    assert first.unique().numel() > 1                    # the layers really disagree somewhere


def moa_logits(moa, model):
    with torch.no_grad(), moa.session():
        model(**padded_inputs(PROMPTS))
        return moa.router_logits()


def test_positions_pick_the_routed_token():
    """Right padding: positions name each sequence's last prompt token."""
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(router="block", inference="last"))
    randomize_routers(moa, seed=1)
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [1] * (width - len(p)) for p in PROMPTS])
    mask = (torch.arange(width)[None] < torch.tensor([len(p) for p in PROMPTS])[:, None]).long()
    with torch.no_grad(), moa.session(positions=[len(p) - 1 for p in PROMPTS]):
        model(input_ids=ids, attention_mask=mask)
        right = moa.router_logits()
    with torch.no_grad(), moa.session():
        model(**padded_inputs(PROMPTS))
        left = moa.router_logits()
    torch.testing.assert_close(right, left, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- generation

def generate(model, ids, mask, n=4):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=1)


@pytest.mark.parametrize("router,inference", [("study", "layer"), ("study", "vote"), ("block", "last")])
def test_generation_decides_once(router, inference):
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(router=router, inference=inference))
    randomize_routers(moa, seed=5)
    calls = []
    for r in moa.routers:
        r.register_forward_hook(lambda m, a, o: calls.append(1))
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad(), moa.session():
        out = generate(model, ids, mask)
        steps = moa.step_decisions()                    # [n_forwards, n_layers, batch]
        chosen = moa.chosen_experts()
    assert steps.shape[0] == 4                          # prefill + 3 decoding steps
    assert (steps == steps[0]).all()                    # held, never re-decided
    assert len(calls) == len(moa.routers)               # the routers ran once, on the prompt
    if inference != "layer":
        with torch.no_grad(), moa.session(experts=chosen):
            oracle = generate(model, ids, mask)
        assert torch.equal(out, oracle)
    for i, p in enumerate(PROMPTS):                     # each prompt alone: same decision and text
        with torch.no_grad(), moa.session():
            alone = generate(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))
        assert torch.equal(alone[0, -4:], out[i, -4:])


@pytest.mark.parametrize("router,inference", [("study", "layer"), ("study", "vote"), ("block", "last"),
                                              ("block", "vote")])
def test_generation_cache_holds_prompt_and_new_tokens(router, inference):
    """The routing pass of last/vote never reads or extends the generation's cache, whatever
    transformers calls it (`past_key_values` up to 5.23, `cache` from 5.24)."""
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(router=router, inference=inference))
    randomize_routers(moa, seed=5)
    ids, mask = left_pad(PROMPTS)
    n = 4
    with torch.no_grad(), moa.session():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=1, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert cache is not None
    # the last new token is returned, not fed back: the cache holds prompt + n - 1 positions
    assert cache.get_seq_length() == ids.shape[1] + n - 1
    assert out.sequences.shape == (len(PROMPTS), ids.shape[1] + n)


def test_without_cache_drops_every_cache_object():
    from transformers import DynamicCache
    from src.moa import without_cache
    c = DynamicCache()
    kw = {"input_ids": 1, "cache": c, "past_key_values": None, "my_state": c, "use_cache": True}
    assert without_cache(kw) == {"input_ids": 1, "use_cache": True}


def test_redecide_every_step_reroutes():
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(redecide_every_step=True))
    randomize_routers(moa, seed=5, std=3.0)
    calls = []
    for r in moa.routers:
        r.register_forward_hook(lambda m, a, o: calls.append(1))
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad(), moa.session():
        generate(model, ids, mask, n=6)
        steps = moa.step_decisions()
        assert moa.router_logits().shape == (12, 3, 3)   # the prefill's logits
    assert len(calls) == 6 * len(moa.routers)
    assert not (steps == steps[0]).all()               # a random router flips somewhere in 6 steps


def test_bfloat16_model():
    """bf16 base, float32 routers and experts: runs, and oracle mode tracks the single LoRA."""
    model = tiny_model("qwen2").to(torch.bfloat16)
    ads = make_adapters(model)
    inputs = padded_inputs(PROMPTS)
    ref = reference_logits(model, ads["b"], **inputs)
    moa = MixtureOfLoRAs(model, ads)
    assert all(r.weight.dtype == torch.float32 for r in moa.routers)
    with torch.no_grad(), moa.session(experts=[1, 1, 1]):
        out = model(**inputs).logits
        assert moa.router_logits().dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad(), moa.session(experts=[0, 1, 2]):
        assert generate(model, ids, mask).shape == (3, 6 + 4)


def test_beams_share_the_sequence_decision():
    """generate expands each sequence into beams: they all use that sequence's expert."""
    model = tiny_model("qwen2")
    moa = MixtureOfLoRAs(model, make_adapters(model), MoAConfig(inference="vote"))
    randomize_routers(moa, seed=4)
    kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=1)
    ids, mask = left_pad(PROMPTS[:2])
    with torch.no_grad(), moa.session():
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)      # [4, 6 + 3]
        chosen = moa.chosen_experts()
    assert chosen.shape == (4,) and chosen[0] == chosen[1] and chosen[2] == chosen[3]
    for i, p in enumerate(PROMPTS[:2]):
        with torch.no_grad(), moa.session(experts=chosen[2 * i: 2 * i + 1]):
            alone = model.generate(input_ids=torch.tensor([p]), **kw)
        assert torch.equal(alone[:, -3:], out[2 * i: 2 * i + 2, -3:])


# --------------------------------------------------------------------------- decisions

def test_vote_tie_breaks():
    # 3 routers, 1 sequence, 3 experts: argmaxes 0, 1, 1 -> 1 (majority)
    lg = torch.tensor([[[5., 0, 0]], [[0, 1., 0]], [[0, 1., 0]]])
    assert vote(lg).tolist() == [1]
    # 2 routers: argmaxes 0 and 1 tie; router 0 is surer of 0 -> 0
    lg = torch.tensor([[[5., 0, 0]], [[0, 1., 0]]])
    assert vote(lg).tolist() == [0]
    lg = torch.tensor([[[1., 0, 0]], [[0, 5., 0]]])
    assert vote(lg).tolist() == [1]
    # exact tie -> lowest index; "last" -> the last router
    lg = torch.tensor([[[0., 0, 1]], [[0, 1., 0]]])
    assert vote(lg).tolist() == [1]
    assert decide(lg, "last").tolist() == [1] and decide(lg[:1], "last").tolist() == [2]


# --------------------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    ads = make_adapters(model, (4, 2, 6))
    sources = {}
    for t, a in ads.items():
        sources[t] = save_adapter(a, tmp_path / "adapters" / t)
    ads = {t: load_adapter(p) for t, p in sources.items()}
    moa = MixtureOfLoRAs(model, ads, MoAConfig(router="block", inference="vote"), sources=sources)
    randomize_routers(moa, seed=4)
    inputs = padded_inputs(PROMPTS)
    with torch.no_grad(), moa.session():
        before = model(**inputs).logits
        logits_before = moa.router_logits()
    (tmp_path / "moa").mkdir()
    (tmp_path / "moa" / "log.jsonl").write_text("{}\n")
    moa.save(tmp_path / "moa")
    assert (tmp_path / "moa" / "log.jsonl").exists()      # other files left alone
    meta = json.loads((tmp_path / "moa" / "moa_config.json").read_text())
    assert meta["tasks"] == TASKS and meta["config"]["router"] == "block"
    assert meta["adapters"]["b"]["source"] == str(sources["b"])
    moa.remove()

    moa2 = MixtureOfLoRAs.load(model, tmp_path / "moa")     # adapters from the recorded sources
    assert moa2.cfg == moa.cfg
    with torch.no_grad(), moa2.session():
        after = model(**inputs).logits
        torch.testing.assert_close(moa2.router_logits(), logits_before, atol=0, rtol=0)
    torch.testing.assert_close(after, before, atol=0, rtol=0)

    # joint training changed the experts: save them, load without the sources
    moa2.set_experts_trainable(True)
    assert all(p.requires_grad for layer in moa2.layers for p in (layer.lora_A, layer.lora_B))
    with torch.no_grad():
        moa2.layers[0].lora_B[:, 1].add_(1.0)
    with torch.no_grad(), moa2.session():
        changed = model(**inputs).logits
    moa2.save(tmp_path / "moa", save_experts=True)
    moa2.remove()
    for t in TASKS:
        (tmp_path / "adapters" / t / "adapter_model.safetensors").unlink()
    moa3 = MixtureOfLoRAs.load(model, tmp_path / "moa")
    with torch.no_grad(), moa3.session():
        torch.testing.assert_close(model(**inputs).logits, changed, atol=0, rtol=0)
    moa3.remove()

    # a half-finished save is noticed; the model is left unchanged by a failed load
    (tmp_path / "moa" / "routers.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="interrupted save"):
        MixtureOfLoRAs.load(model, tmp_path / "moa")
    assert not any(isinstance(m, MoALinear) for m in model.modules())


def test_load_rejects_other_router_layout(tmp_path):
    model = tiny_model("qwen2")
    ads = make_adapters(model)
    MixtureOfLoRAs(model, ads, MoAConfig(router="study")).save(tmp_path / "moa")
    other = tiny_model("qwen2", layers=3)
    ads3 = {t: random_adapter(other, i) for i, t in enumerate(TASKS)}
    with pytest.raises(UserError, match="routers"):
        MixtureOfLoRAs.load(other, tmp_path / "moa", adapters=ads3)
    assert not any(isinstance(m, MoALinear) for m in other.modules())
    with pytest.raises(UserError, match="no source recorded"):
        MixtureOfLoRAs.load(tiny_model("qwen2"), tmp_path / "moa")


# --------------------------------------------------------------------------- bad input

def test_bad_input():
    model = tiny_model("qwen2")
    ads = make_adapters(model)
    with pytest.raises(UserError, match="at least one adapter"):
        MixtureOfLoRAs(model, {})
    partial = dict(ads, b=random_adapter(model, 7, targets=("q_proj", "v_proj")))
    with pytest.raises(UserError, match=r"adapter 'b' lacks model\.layers\.0\.mlp\.down_proj"):
        MixtureOfLoRAs(model, partial)
    with pytest.raises(UserError, match="no adapter for d"):
        MixtureOfLoRAs(model, ads, MoAConfig(tasks=("a", "b", "d")))
    with pytest.raises(UserError, match="--router"):
        MoAConfig(router="token")
    with pytest.raises(UserError, match="--inference"):
        MoAConfig(inference="soft")
    with pytest.raises(UserError, match="needs --inference layer"):
        MoAConfig(inference="vote", redecide_every_step=True)
    with pytest.raises(UserError, match="twice"):
        MoAConfig(tasks="a,b,a")
    assert MoAConfig(tasks="a,b").tasks == ("a", "b")
    assert not any(isinstance(m, MoALinear) for m in model.modules())   # nothing injected on error

    moa = MixtureOfLoRAs(model, ads)
    with pytest.raises(UserError, match="already has"):
        MixtureOfLoRAs(model, ads)
    with pytest.raises(RuntimeError, match="session"):
        model(input_ids=torch.tensor([[3, 4]]))
    with pytest.raises(UserError, match="out of range"):
        with moa.session(experts=[0, 3]):
            pass
    with pytest.raises(UserError, match="unknown task"):
        with moa.session(experts=["z"]):
            pass


# --------------------------------------------------------------------------- training

@pytest.mark.parametrize("router", ["study", "block"])
def test_router_training_reaches_full_accuracy(router):
    """Frozen LoRAs, teacher forcing, CE on the router logits: two synthetic 'tasks' (their own
    token ranges and their own prompt suffix, as the real tasks have their own formats) separate."""
    model = tiny_model("qwen2")
    ads = {t: random_adapter(model, i, std=0.05) for i, t in enumerate(["a", "b"])}
    moa = MixtureOfLoRAs(model, ads, MoAConfig(router=router, inference="vote"))
    router_params = {id(p) for p in moa.routers.parameters()}
    assert [p for p in moa.parameters() if p.requires_grad] == list(moa.routers.parameters())
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in router_params)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        labels = torch.arange(n) % 2                                      # [batch]
        body = torch.where(labels[:, None] == 0, torch.randint(10, 100, (n, 6), generator=g),
                           torch.randint(200, 300, (n, 6), generator=g))
        suffix = torch.where(labels[:, None] == 0, torch.tensor([[20, 21, 7]]), torch.tensor([[30, 31, 9]]))
        return torch.cat([body, suffix], 1), labels                       # ids: [batch, 9]

    opt = torch.optim.Adam(moa.routers.parameters(), lr=3e-2)
    for _ in range(40):
        ids, labels = batch(32)
        with moa.session(experts=labels):                                 # teacher forcing
            model(input_ids=ids)
            loss = moa.router_loss(labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(layer.lora_A.grad is None for layer in moa.layers)       # experts stayed frozen
    ids, labels = batch(64)                                               # unseen prompts
    with torch.no_grad(), moa.session():
        model(input_ids=ids)
        per_router = moa.router_logits().argmax(-1)                       # [n_routers, batch]
        assert torch.equal(moa.chosen_experts(), labels)                 # routing accuracy 1.0
    assert (per_router == labels).float().mean().item() > 0.95


def test_joint_training_reaches_only_the_used_experts():
    """set_experts_trainable: L = L_LM + eta * L_cls trains the routers and the experts in use."""
    model = tiny_model("llama")
    moa = MixtureOfLoRAs(model, make_adapters(model, (2, 4, 3)))
    randomize_routers(moa)
    moa.set_experts_trainable(True)
    ids, mask = left_pad(PROMPTS)
    experts = torch.tensor([0, 1, 0])
    with moa.session(experts=experts):
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        loss = out.loss + 0.1 * moa.router_loss(experts)
    loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in moa.routers)
    for layer in moa.layers:
        ga, gb = layer.lora_A.grad, layer.lora_B.grad            # [E, r, in], [out, E, r]
        assert ga[2].abs().sum() == 0 and gb[:, 2].abs().sum() == 0         # expert c unused
        assert ga[0, 2:].abs().sum() == 0 and gb[:, 0, 2:].abs().sum() == 0  # rank padding stays 0
    assert moa.layers[-1].lora_B.grad[:, :2].abs().sum() > 0
