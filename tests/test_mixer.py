"""LoRA-Mixer: the routing loss, the gates, the mixture's invariants, training, resume, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import random_adapter, save_tiny, tiny_model

import src.training as training
import train_individual_loras as train_loras
import train_moa
from src import mixer as mx
from src.config import TrainConfig
from src.errors import UserError, run_main
from src.experts import entropy, topk_softmax
from src.lora import apply_adapter, unload_lora

TASKS = ["sentiment", "nli", "qa"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12], [8, 61, 2, 300, 77, 140, 18, 33]])


def logits(model, ids=IDS, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture
def lib():
    model = tiny_model("qwen2")
    adapters = {t: random_adapter(model, 10 + i, name=t) for i, t in enumerate(TASKS)}
    return model, adapters


# ------------------------------------------------------------------ the loss (pure)

def test_balance_is_one_at_uniform_use_and_e_when_one_expert_takes_every_token():
    uniform, _ = mx.rsl_terms(torch.zeros(2, 5, 4) + torch.arange(4.0).roll(1) * 0, None, k=4)
    assert float(uniform) == pytest.approx(1.0)
    spread = torch.eye(4)[torch.arange(8) % 4].view(2, 4, 4) * 20      # each token its own expert, evenly
    assert float(mx.rsl_terms(spread, None, k=1)[0]) == pytest.approx(1.0, abs=1e-6)
    one = torch.zeros(2, 5, 4)
    one[..., 2] = 30.0                                                # expert 2 takes every token
    assert float(mx.rsl_terms(one, None, k=1)[0]) == pytest.approx(4.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    padded = one.clone()
    padded[1, 2:] = torch.tensor([30.0, 0, 0, 0])                     # padding tokens do not count
    assert float(mx.rsl_terms(padded, mask, k=1)[0]) == pytest.approx(4.0, abs=1e-6)


def test_entropy_is_zero_for_one_hot_gates_and_log_e_for_uniform():
    assert float(entropy(torch.eye(5)).max()) == pytest.approx(0.0, abs=1e-9)
    assert float(mx.rsl_terms(torch.zeros(1, 3, 5), None, 1)[1]) == pytest.approx(float(torch.log(torch.tensor(5.0))))


def test_topk_gates_have_k_nonzeros_summing_to_one():
    scores = torch.randn(3, 7, 5)
    for k in (1, 3, 5):
        g = topk_softmax(scores, k)
        assert ((g > 0).sum(-1) == k).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(3, 7))


def test_preservation_is_the_squared_distance():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert float(mx.preservation([a, a], [b, a])) == 6.0


# ------------------------------------------------------------------ the mixture

def test_hard_routing_to_one_expert_equals_that_adapter_exactly(lib):
    model, adapters = lib
    modules = mx.choose_modules(list(adapters["qa"].factors), "all")
    for e, task in enumerate(TASKS):
        apply_adapter(model, adapters[task])
        ref = logits(model)
        unload_lora(model)
        mixer = mx.LoRAMixer(model, adapters, modules, 2, TASKS)
        mixer.hard_labels = torch.full((2,), e)
        torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=0)
        mixer.remove()


def test_hard_routing_with_attention_only_falls_short_of_the_adapter(lib):
    """The experts' MLP half is missing where only attention is routed: not the oracle."""
    model, adapters = lib
    apply_adapter(model, adapters["qa"])
    ref = logits(model)
    unload_lora(model)
    modules = mx.choose_modules(list(adapters["qa"].factors), "attention", drop_uncovered=True)
    mixer = mx.LoRAMixer(model, adapters, modules, 2, TASKS)
    mixer.hard_labels = torch.full((2,), TASKS.index("qa"))
    assert (logits(model) - ref).abs().max() > 1e-2
    mixer.remove()


def test_zero_initialised_routers_give_exactly_uniform_gates(lib):
    model, adapters = lib
    mixer = mx.LoRAMixer(model, adapters, mx.choose_modules(list(adapters["qa"].factors), "all"), 3, TASKS)
    assert all(float(w.detach().abs().max()) == 0.0 for w in mixer.routers)
    mixer.soft, mixer.collect = True, []
    logits(model)
    for z in mixer.collect:
        assert torch.equal(torch.softmax(z, -1), torch.full_like(z, 1 / 3))
    mixer.remove()
    linear = mx.LoRAMixer(model, adapters, mx.choose_modules(list(adapters["qa"].factors), "all"), 3, TASKS,
                          router_init="linear")
    assert all(float(w.detach().abs().max()) > 0 for w in linear.routers)
    linear.remove()


def test_a_module_set_that_drops_covered_modules_is_refused_unless_asked(lib):
    _, adapters = lib
    adapted = list(adapters["qa"].factors)
    with pytest.raises(UserError, match=r"--mixer-modules attention leaves out down_proj, gate_proj, up_proj, which "
                                        r"the experts cover.*--mixer-drop-uncovered"):
        mx.choose_modules(adapted, "attention")
    with pytest.raises(UserError, match=r"leaves out .*k_proj"):
        mx.choose_modules(adapted, "q_proj,v_proj")
    assert mx.choose_modules(adapted, "all") == adapted
    assert len(mx.choose_modules(adapted, "attention", drop_uncovered=True)) < len(adapted)


def test_inference_gates_are_top_k_and_a_mixed_batch_equals_each_sequence_alone(lib):
    model, adapters = lib
    modules = mx.choose_modules(list(adapters["qa"].factors), "attention", drop_uncovered=True)
    assert modules and all(".self_attn." in m for m in modules)
    mixer = mx.LoRAMixer(model, adapters, modules, 2, TASKS)
    mixer.collect = []
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 61, 2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    both = logits(model, ids, mask)
    gates = topk_softmax(mixer.collect[0], 2)
    assert ((gates > 0).sum(-1) == 2).all()
    mixer.collect = None
    torch.testing.assert_close(both[0], logits(model, ids[:1])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1, :3], logits(model, ids[1:, :3])[0], atol=1e-5, rtol=0)
    base = tiny_model("qwen2")
    assert not torch.allclose(both[0], logits(base, ids[:1])[0], atol=1e-3)   # the experts act
    mixer.remove()
    torch.testing.assert_close(logits(model, ids[:1]), logits(base, ids[:1]))  # removed: the base model again


def test_modules_are_chosen_by_name_and_unknown_names_list_the_adapted_ones(lib):
    _, adapters = lib
    adapted = list(adapters["qa"].factors)
    chosen = mx.choose_modules(adapted, "q_proj,v_proj", drop_uncovered=True)
    assert chosen and all(m.endswith(("q_proj", "v_proj")) for m in chosen)
    with pytest.raises(UserError, match=r"unknown module x_proj; the adapters cover .*q_proj"):
        mx.choose_modules(adapted, "q_proj,x_proj")


def _disjoint_items(n: int, seed: int) -> list[dict]:
    """Three tasks of 6 tokens each, never shared: 18 points in the 32-dimensional inputs, which a
    linear router can separate."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, lo in enumerate((10, 130, 260)):
        for _ in range(n):
            ids = torch.randint(lo, lo + 6, (12,), generator=g).tolist()
            out.append({"input_ids": ids, "labels": [-100] * 8 + ids[8:], "prompt_len": 8, "task_id": t})
    return out


def test_training_routes_each_tasks_tokens_mostly_to_its_own_expert(lib, tmp_path):
    model, adapters = lib
    modules = mx.choose_modules(list(adapters["qa"].factors), "attention", drop_uncovered=True)
    mixer = mx.LoRAMixer(model, adapters, modules, 1, TASKS, router_init="linear")
    before = mx.routing_report(mixer, model, _disjoint_items(4, 1), pad_id=0)
    cfg = mx.MixerConfig(mixer_top_k=1, mixer_label_weight=1.0)
    params = {f"routers.{i}": w for i, w in enumerate(mixer.routers)}
    train_cfg = TrainConfig(max_steps=40, batch_size=6, lr=5e-2, eval_every=0, save_every=0, progress=False)
    result = training.fit(model, params, _disjoint_items(8, 0), [], cfg=train_cfg, seed=0, name="lora_mixer",
                          pad_id=0, state_dir=tmp_path / "state", log_path=tmp_path / "log.jsonl",
                          objective=mx.objective(mixer, cfg))
    with torch.no_grad():
        for k, v in result.params.items():
            params[k].copy_(v)
    after = mx.routing_report(mixer, model, _disjoint_items(4, 1), pad_id=0)
    assert before["mean_own_share"] < 0.6
    assert min(after["own_share"].values()) > 0.8, after["own_share"]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert set(log[-1]["terms"]) == {"lm", "balance", "entropy", "cls"}


# ------------------------------------------------------------------ train_moa.py --system lora_mixer

@pytest.fixture(scope="module")
def mixer_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixer")
    model = save_tiny(tmp / "qwen2")
    run = tmp / "run"
    assert run_main(train_loras.main, _args(model, run)) == 0
    return model, run


def _args(model, run, *extra, tasks="sentiment,nli,qa"):
    return ["--model", str(model), "--tasks", tasks, "--data", "sample", "--output-dir", str(run),
            "--train-size", "8", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8",
            "--batch-size", "4", "--lr", "1e-2", "--max-steps", "3", "--eval-every", "2", "--save-every", "2",
            "--log-every", "1", "--no-progress", *extra]


def _mix(model, run, *extra):
    return _args(model, run, "--system", "lora_mixer", *extra)


def _routers(run: Path, name: str = "lora_mixer") -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "compose" / name / "routers.safetensors"))


def test_trains_into_compose_lora_mixer_and_skips_then_refuses_a_changed_setting(mixer_run, capsys):
    model, run = mixer_run
    assert run_main(train_moa.main, _mix(model, run, "--max-steps", "6")) == 0
    folder = run / "compose" / "lora_mixer"
    assert {"mixer_config.json", "routers.safetensors", "training_config.json", "routing.json", "log.jsonl"} \
        <= {p.name for p in folder.iterdir()}
    report = json.loads((folder / "routing.json").read_text())
    assert set(report["own_share"]) == set(TASKS) and report["balance"] >= 1 - 1e-6
    log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    assert {"lm", "balance", "entropy"} <= set(log[0]["terms"])
    assert not (run / "moa").exists()                                   # MoA's folder is not touched
    capsys.readouterr()
    assert run_main(train_moa.main, _mix(model, run, "--max-steps", "6")) == 0
    assert "skip" in capsys.readouterr().out
    assert run_main(train_moa.main, _mix(model, run, "--max-steps", "6", "--mixer-entropy", "0.5")) == 2
    assert "(--mixer-entropy 0.01 -> 0.5)" in capsys.readouterr().err


def test_kill_and_resume_gives_the_uninterrupted_routers(mixer_run, tmp_path, monkeypatch):
    model, run = mixer_run
    import shutil
    full, cut = tmp_path / "full", tmp_path / "cut"
    for r in (full, cut):
        shutil.copytree(run / "adapters", r / "adapters")
    args = ("--max-steps", "5", "--mixer-regime", "finetune", "--mixer-tune", "qa")
    assert run_main(train_moa.main, _mix(model, full, *args)) == 0
    real_fit = training.fit

    def killed_at_step_3(*a, **kw):
        def on_step(step):
            if step == 3:
                raise KeyboardInterrupt
        return real_fit(*a, **kw, on_step=on_step)
    monkeypatch.setattr(training, "fit", killed_at_step_3)
    assert run_main(train_moa.main, _mix(model, cut, *args)) == 130
    assert not (cut / "compose" / "lora_mixer_finetune").exists()
    monkeypatch.setattr(training, "fit", real_fit)
    assert run_main(train_moa.main, _mix(model, cut, *args, "--resume")) == 0
    a, b = _routers(full, "lora_mixer_finetune"), _routers(cut, "lora_mixer_finetune")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    from src.lora import load_adapter
    ea = load_adapter(full / "compose" / "lora_mixer_finetune" / "experts" / "qa")
    eb = load_adapter(cut / "compose" / "lora_mixer_finetune" / "experts" / "qa")
    assert max(float((ea.factors[m][i] - eb.factors[m][i]).abs().max()) for m in ea.factors for i in (0, 1)) <= 1e-6


def _distance(run: Path, task: str) -> float:
    from src.lora import load_adapter
    tuned = load_adapter(run / "compose" / "lora_mixer_finetune" / "experts" / task)
    start = load_adapter(run / "adapters" / task)
    return sum(float(((tuned.factors[m][i] - start.factors[m][i]) ** 2).sum()) for m in tuned.factors for i in (0, 1))


def test_preservation_keeps_the_tuned_experts_near_their_start_and_frozen_ones_exact(mixer_run, tmp_path):
    model, run = mixer_run
    import shutil
    dist = {}
    for b in (0.0, 1e4):
        r = tmp_path / f"b{b:g}"
        shutil.copytree(run / "adapters", r / "adapters")
        assert run_main(train_moa.main, _mix(model, r, "--max-steps", "6", "--lr", "5e-2", "--mixer-regime",
                                             "finetune", "--mixer-tune", "nli,qa", "--mixer-preserve", str(b))) == 0
        dist[b] = _distance(r, "qa")
        assert _distance(r, "sentiment") == 0.0                        # not in C: exactly where it started
    assert dist[0.0] > 0 and dist[1e4] < 0.1 * dist[0.0], dist


@pytest.mark.parametrize("bad, message", [
    (["--mixer-modules", "x_proj"], "--mixer-modules: unknown module x_proj; the adapters cover"),
    (["--mixer-modules", "attention"], "--mixer-modules attention leaves out down_proj, gate_proj, up_proj"),
    (["--mixer-router-init", "normal"], "--mixer-router-init"),
    (["--mixer-expert-lr", "0"], "--mixer-expert-lr must be a finite number above 0"),
    (["--mixer-top-k", "0"], "--mixer-top-k must be a positive integer"),
    (["--mixer-top-k", "4"], "--mixer-top-k 4 is more than the 3 experts (sentiment, nli, qa)"),
    (["--mixer-balance", "-1"], "--mixer-balance must be finite and not negative"),
    (["--mixer-entropy", "-0.1"], "--mixer-entropy must be finite and not negative"),
    (["--mixer-preserve", "-1"], "--mixer-preserve must be finite and not negative"),
    (["--mixer-regime", "finetune", "--mixer-tune", "poetry"], "--mixer-tune: poetry is not an expert"),
    (["--tasks", "sentiment,nli,qa,translation"], "lacks the adapters of task(s) translation"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(mixer_run, tmp_path, capsys, bad, message):
    model, run = mixer_run
    import shutil
    r = tmp_path / "run"
    shutil.copytree(run / "adapters", r / "adapters")
    before = sorted(p.relative_to(r) for p in r.rglob("*"))
    capsys.readouterr()
    assert run_main(train_moa.main, _mix(model, r, *bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.relative_to(r) for p in r.rglob("*")) == before


def test_lora_mixer_through_full_evaluation(mixer_run, tmp_path, capsys):
    """`--methods lora_mixer` evaluates with per-example expert shares, reuses its cells, and an
    option of its own is in the fingerprint; without a trained mixer it names what is missing."""
    import shutil

    import full_evaluation
    model, run = mixer_run
    r = tmp_path / "run"
    shutil.copytree(run / "adapters", r / "adapters")
    ev = ["--model", str(model), "--output-dir", str(r), "--tasks", "sentiment,nli,qa", "--data", "sample",
          "--eval-size", "2", "--batch-size", "4", "--max-new-tokens", "3", "--max-prompt-len", "96",
          "--methods", "lora_mixer"]
    capsys.readouterr()
    assert run_main(full_evaluation.main, ev) == 2
    assert "method lora_mixer" in capsys.readouterr().err and not (r / "eval").exists()
    assert run_main(train_moa.main, _mix(model, r, "--mixer-top-k", "2")) == 0
    assert run_main(full_evaluation.main, ev) == 0
    summary = json.loads((r / "eval" / "summary.json").read_text())
    assert set(summary["methods"]) == {"oracle", "lora_mixer", "base"}
    table = summary["routing"]["lora_mixer"]
    assert table["kind"] == "token" and set(table["share"]) == set(TASKS)
    rec = json.loads((r / "eval" / "predictions" / "lora_mixer" / "qa.jsonl").read_text().splitlines()[0])
    assert abs(sum(rec["expert_share"].values()) - 1) < 1e-4
    capsys.readouterr()
    assert run_main(full_evaluation.main, ev) == 0
    assert "0 to compute" in capsys.readouterr().err
    assert run_main(full_evaluation.main, [*ev, "--eval-mixer-top-k", "1"]) == 0
    assert "3 to compute" in capsys.readouterr().err



@pytest.mark.parametrize("system, method", [("moa", "moa"), ("lora_mixer", "lora_mixer")])
def test_evaluation_refuses_routers_trained_over_other_adapters(mixer_run, tmp_path, capsys, system, method):
    """An expert retrained after its routers: evaluation refuses in one line, pointing to --force."""
    import shutil

    import full_evaluation
    from src.lora import load_adapter, save_adapter
    model, run = mixer_run
    r = tmp_path / "run"
    shutil.copytree(run / "adapters", r / "adapters")
    assert run_main(train_moa.main, _args(model, r, "--system", system)) == 0
    ad = load_adapter(r / "adapters" / "nli")                  # "retrained": other weights, same shapes
    for m, (a, b) in ad.factors.items():
        ad.factors[m] = (a, b + 0.01)
    save_adapter(ad, r / "adapters" / "nli")
    ev = ["--model", str(model), "--output-dir", str(r), "--tasks", "sentiment,nli,qa", "--data", "sample",
          "--eval-size", "2", "--batch-size", "4", "--max-new-tokens", "3", "--max-prompt-len", "96",
          "--methods", method]
    capsys.readouterr()
    assert run_main(full_evaluation.main, ev) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"method {method}:" in err[0] and "retrained since: nli" in err[0] \
        and "train_moa.py --force" in err[0], err
    assert not (r / "eval").exists()
