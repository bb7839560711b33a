"""src/training.py on tiny random Qwen2 / Llama models (CPU, seconds)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny import tiny_model
from trainutil import write_task_data

from src.config import DataConfig, TrainConfig
from src.errors import UserError
from src.lora import LoraConfig, add_lora
from src.training import (IGNORE, Objective, TrainingDiverged, collate, encode_examples, fit,
                          global_batches, load_data, planned_steps, split_batch, target_only_loss)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("data"), n_train=24, n_val=8)


@pytest.fixture(scope="module")
def items(data_dir, tokenizer):
    cfg = DataConfig(tasks="sentiment", data_dir=str(data_dir), train_size=24, eval_size=8)
    train, val = load_data(cfg, ["sentiment"], "train"), load_data(cfg, ["sentiment"], "validation")
    return (encode_examples(tokenizer, train["sentiment"], 64, 8),
            encode_examples(tokenizer, val["sentiment"], 64, 8))


def _cfg(**kw) -> TrainConfig:
    base = dict(batch_size=4, grad_accum=1, lr=5e-3, epochs=1.0, max_steps=6, eval_every=0, patience=0,
                save_every=0, log_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def _run(tmp_path, items, tokenizer, arch="qwen2", **kw):
    """fit a fresh rank-4 LoRA on a fresh tiny model; (FitResult, model)."""
    model = tiny_model(arch)
    torch.manual_seed(0)
    add_lora(model, LoraConfig(rank=4, alpha=8))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fit_kw = {k: kw.pop(k) for k in ("objective", "on_step", "fingerprint") if k in kw}
    result = fit(model, params, items[0], items[1], cfg=_cfg(**kw), seed=0, name="sentiment",
                 pad_id=tokenizer.pad_token_id, state_dir=tmp_path / "ckpt", log_path=tmp_path / "log.jsonl",
                 **fit_kw)
    return result, model


# ------------------------------------------------------------------------ the loss

def test_target_only_loss_equals_full_logits_loss_and_grads(model, tokenizer, items):
    add_lora(model, LoraConfig(rank=4))
    with torch.no_grad():  # non-zero B so the LoRA factors get gradients of their own
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    batch = collate(items[0][:5], tokenizer.pad_token_id)
    ours = target_only_loss(model, batch) / batch["n_tokens"]
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    full.backward()
    assert torch.allclose(ours, full, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


def test_collate_pads_dynamically_and_marks_prompt_ends(items, tokenizer):
    batch = collate(items[0][:3], tokenizer.pad_token_id)
    lengths = [len(it["input_ids"]) for it in items[0][:3]]
    assert batch["input_ids"].shape == (3, max(lengths))  # the batch's longest, not a fixed size
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, it in enumerate(items[0][:3]):
        assert batch["labels"][i, batch["positions"][i]] == IGNORE  # last prompt token
        assert batch["labels"][i, batch["positions"][i] + 1] != IGNORE  # first target token
    left = collate(items[0][:3], tokenizer.pad_token_id, side="left")
    assert (left["positions"] == max(lengths) - 1).all() and left["attention_mask"][:, -1].all()


def test_batches_cover_every_example_once_grouped_by_length():
    lengths = [(i * 37) % 101 for i in range(200)]
    batches = global_batches(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == global_batches(lengths, 4, seed=1, epoch=0)
    assert batches != global_batches(lengths, 4, seed=1, epoch=1)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    rand = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    padded_random = sum(4 * max(lengths[i] for i in rand[j:j + 4]) for j in range(0, 200, 4))
    assert padded < 0.85 * padded_random
    # two processes with micro-batch 2 see exactly what one process with batch 4 sees
    assert split_batch([0, 1, 2, 3], 2, 1, 0, 2) + split_batch([0, 1, 2, 3], 2, 1, 1, 2) == [[0, 1], [2, 3]]
    assert planned_steps(10, 4, 2.0, None) == (3, 6) and planned_steps(10, 4, 2.0, 4) == (3, 4)


# ------------------------------------------------------------------------ the loop

def test_a_few_steps_reduce_the_loss(tmp_path, items, tokenizer, arch):
    result, _ = _run(tmp_path, items, tokenizer, arch, epochs=2.0, max_steps=12, eval_every=6)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in log if "loss" in r]
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert train[-1] < train[0] and val[-1] < val[0]
    assert all({"lr", "tokens_per_s", "eta_s", "elapsed_s"} <= set(r) for r in log if "loss" in r)
    assert result.steps == 12 and result.best_step == 12


def test_grad_accumulation_equals_the_larger_batch(tmp_path, items, tokenizer):
    a, _ = _run(tmp_path / "a", items, tokenizer, batch_size=4, grad_accum=1)
    b, _ = _run(tmp_path / "b", items, tokenizer, batch_size=2, grad_accum=2)
    for k in a.params:
        assert torch.allclose(a.params[k], b.params[k], atol=1e-6), k


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(tmp_path, items, tokenizer):
    full, _ = _run(tmp_path / "full", items, tokenizer, max_steps=6, save_every=2, eval_every=3)

    def kill(step):
        if step == 5:  # between checkpoints: step 5's work is lost, step 4's checkpoint stays
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", items, tokenizer, max_steps=6, save_every=2, eval_every=3, on_step=kill)
    assert (tmp_path / "cut" / "ckpt" / "state.json").is_file()
    resumed, _ = _run(tmp_path / "cut", items, tokenizer, max_steps=6, save_every=2, eval_every=3, resume=True)
    assert resumed.steps == full.steps == 6
    for k in full.params:
        assert (full.params[k] - resumed.params[k]).abs().max() <= 1e-6, k
    log = lambda p: [json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda recs: [{k: v for k, v in r.items() if k in ("step", "val_loss")} for r in recs]  # noqa: E731
    assert strip(log(tmp_path / "cut")) == strip(log(tmp_path / "full"))  # no duplicated lines


def test_the_log_after_a_resume_equals_the_uninterrupted_runs_line_for_line(tmp_path, items, tokenizer):
    """A checkpoint in the middle of a log window (log every 3, save every 2): the first line after
    the resume still averages the window's steps from before the kill."""
    kw = dict(max_steps=9, save_every=2, eval_every=4, log_every=3)
    _run(tmp_path / "full", items, tokenizer, **kw)

    def kill(step):
        if step == 5:   # checkpoint at 4: step 4 is in the window of the line at step 6
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", items, tokenizer, on_step=kill, **kw)
    _run(tmp_path / "cut", items, tokenizer, resume=True, **kw)
    keep = ("step", "epoch", "loss", "lr", "val_loss", "best_val_loss", "terms")
    lines = {}
    for name in ("full", "cut"):
        recs = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        lines[name] = [{k: r[k] for k in keep if k in r} for r in recs]
    assert [r["step"] for r in lines["cut"]] == [r["step"] for r in lines["full"]]
    for a, b in zip(lines["cut"], lines["full"]):
        assert a.keys() == b.keys(), (a, b)
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (k, a, b)


def test_resume_with_other_settings_is_refused(tmp_path, items, tokenizer):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, items, tokenizer, save_every=2, fingerprint={"lr": 1},
             on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 3 else None)
    with pytest.raises(UserError, match="lr"):
        _run(tmp_path, items, tokenizer, save_every=2, resume=True, fingerprint={"lr": 2})


def test_nan_loss_stops_naming_task_and_step_and_keeps_the_checkpoint(tmp_path, items, tokenizer):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = target_only_loss(model, batch)
        return {"lm": loss * float("nan") if calls["n"] == 3 else loss}
    with pytest.raises(TrainingDiverged, match=r"task sentiment: loss is nan at step 3"):
        _run(tmp_path, items, tokenizer, save_every=2, objective=Objective(poisoned))
    from src.training import load_checkpoint
    state = load_checkpoint(tmp_path / "ckpt")  # safetensors + JSON: no unpickling
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["params"].values())


def test_checkpoints_load_without_unpickling_and_bad_files_are_one_line_errors(tmp_path):
    import fractions
    import random

    from src.training import linear_schedule, load_checkpoint, rng_state, save_checkpoint, set_rng_state
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1)
    scheduler = linear_schedule(optimizer, 1, 4)
    p.sum().backward()
    optimizer.step()
    scheduler.step()
    save_checkpoint(tmp_path / "ok", {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "rng": rng_state(), "best_val": None, "fingerprint": {"lr": 0.1}})
    draws = (random.random(), torch.rand(2))
    state = load_checkpoint(tmp_path / "ok")  # weights_only=True
    set_rng_state(state["rng"])
    assert random.random() == draws[0] and torch.equal(torch.rand(2), draws[1])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert scheduler.get_last_lr() == state["scheduler"]["_last_lr"]

    with pytest.raises(TypeError, match="Fraction"):                       # only tensors and plain values
        save_checkpoint(tmp_path / "new", {"x": fractions.Fraction(1, 3)})
    (tmp_path / "pickled").mkdir()                                          # an old torch.save checkpoint
    torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "pickled" / "state.pt")   # needs unpickling: refused
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "state.pt").write_bytes(b"not a checkpoint")
    for folder in ("pickled", "corrupt"):
        with pytest.raises(UserError, match=r"unreadable checkpoint \(UnpicklingError\); delete it or use --force"):
            load_checkpoint(tmp_path / folder)
    assert load_checkpoint(tmp_path / "absent") is None


def test_early_stopping_keeps_the_best_validation_state(tmp_path, items, tokenizer, monkeypatch):
    import src.training as training
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 9.0])  # best at the 2nd evaluation, then 3 worse ones
    monkeypatch.setattr(training, "evaluate_loss", lambda *a, **k: next(losses))
    result, _ = _run(tmp_path, items, tokenizer, max_steps=20, eval_every=1, patience=3)
    assert result.stopped_early and result.steps == 5 and result.best_step == 2 and result.best_val_loss == 2.0


def test_frozen_base_is_untouched(tmp_path, items, tokenizer):
    before = {n: p.clone() for n, p in tiny_model("qwen2").named_parameters()}
    _, model = _run(tmp_path, items, tokenizer, max_steps=2)
    for n, p in model.named_parameters():
        key = n.replace(".linear.", ".")
        if "lora_" not in n:
            assert torch.equal(p, before[key]) and p.grad is None, n


def test_config_validation():
    with pytest.raises(UserError, match="batch-size"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(UserError, match="max-target-len"):
        DataConfig(max_len=64, max_target_len=64)
    assert DataConfig(data_dir="x").data == "dir"
    assert replace(TrainConfig(), lr=1.0).lr == 1.0


def test_presets_and_flags():
    from src.cli import parse_configs
    from src.config import MOA_PRESETS, PRESETS
    from src.moa import RouterConfig
    (data, train, lora), _ = parse_configs(["--preset", "paper", "--lr", "1e-4"], "t", "", DataConfig, TrainConfig,
                                           LoraConfig, presets=PRESETS)
    assert (lora.rank, lora.alpha, train.batch_size, train.epochs, train.patience, train.eval_every) == (8, 16, 2, 10, 3, 100)
    assert (data.train_size, data.max_len, data.max_target_len, train.lr) == (5000, 512, 128, 1e-4)  # the flag wins
    (data, train, router), _ = parse_configs(["--preset", "demo", "--eta", "2", "--joint", "--lm-loss"], "t", "",
                                             DataConfig, TrainConfig, RouterConfig, presets=MOA_PRESETS)
    assert (router.eta, router.joint, router.lm_loss, router.teacher_forcing, router.router) == (2.0, True, True, True, "study")
    assert train.model == "smollm2-135m" and data.data == "sample"
    with pytest.raises(UserError, match="nothing to train"):
        RouterConfig(eta=0.0)


def test_train_text_to_lora_takes_its_presets(monkeypatch):
    """train_text_to_lora.py --preset demo / paper (T2L_PRESETS); an explicit flag wins."""
    import train_text_to_lora
    seen = []
    monkeypatch.setattr(train_text_to_lora.t2l, "train_hypernet", lambda run, tasks, *cfgs, **kw: seen.append(cfgs))
    train_text_to_lora.main(["--preset", "demo"])
    data, train, _ = seen[-1]
    assert (train.max_steps, train.lr, data.tasks, data.data) == (400, 1e-3, "sentiment,nli", "sample")
    train_text_to_lora.main(["--preset", "paper", "--max-steps", "7"])
    assert (seen[-1][1].max_steps, seen[-1][1].lr, seen[-1][1].batch_size) == (7, 1e-3, 16)


def test_a_group_of_params_trains_at_its_own_learning_rate(tmp_path, items, tokenizer):
    """group_lr: the lora_A params at lr 0 stay exactly where they start; lora_B (B = 0 at the start, so
    the only factor with a gradient) moves at cfg.lr."""
    model = tiny_model("qwen2")
    torch.manual_seed(0)
    add_lora(model, LoraConfig(rank=4, alpha=8))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    b_names = {n for n in params if "lora_A" in n}
    frozen = {f"b.{n}": params[n] for n in b_names}
    moving = {n: p for n, p in params.items() if n not in b_names}
    fit(model, {**moving, **frozen}, items[0], items[1], cfg=_cfg(max_steps=3, weight_decay=0.0), seed=0,
        name="sentiment", pad_id=tokenizer.pad_token_id, state_dir=tmp_path / "ckpt", log_path=tmp_path / "log.jsonl",
        group_lr={"b.": 0.0})
    assert all(torch.equal(params[n], start[n]) for n in b_names)
    assert any(not torch.equal(params[n], start[n]) for n in moving)


def test_the_default_eval_size_on_the_sample_leaves_half_the_validation_to_evaluate(capsys):
    """The sample holds 16 validation examples a task; the default --eval-size (200) would let model
    selection take them all and leave evaluation nothing: training takes half, with a note."""
    from src.tasks import load_capped
    from src.training import load_data
    chosen = load_data(DataConfig(tasks="sentiment,nli", data="sample"), ["sentiment", "nli"], "validation")
    err = capsys.readouterr().err
    for task, n in (("sentiment", 16), ("nli", 15)):
        assert len(chosen[task]) == n // 2
        assert f"holds {n} validation examples of task {task}; model selection takes {n // 2}" in err, err
        left = load_capped([task], "validation", "sample", None, None, 0,
                           exclude={task: [ex.id for ex in chosen[task]]})[task]
        assert len(left) == n - n // 2
    asked = load_data(DataConfig(tasks="sentiment", data="sample", eval_size=8), ["sentiment"], "validation")
    assert len(asked["sentiment"]) == 8 and "model selection" not in capsys.readouterr().err
    assert len(load_data(DataConfig(tasks="sentiment", data="sample"), ["sentiment"], "train")["sentiment"]) == 40
