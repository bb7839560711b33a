"""Text-to-LoRA: the hypernetwork's init, heads, reconstruction, SFT, resume, encoders, I/O, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import random_adapter, save_tiny, tiny_model

import src.training as training
import train_individual_loras as train_loras
import train_text_to_lora
from src import t2l, t2l_train
from src.config import DataConfig, TrainConfig
from src.descriptions import DESCRIPTIONS, N_TRAIN
from src.errors import UserError, run_main
from src.lora import apply_adapter, load_adapter, unload_lora

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "nli", "qa"]
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12], [8, 61, 2, 300, 77, 140, 18, 33]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def library(rank=4):
    model = tiny_model("qwen2")
    return model, {t: random_adapter(model, 10 + i, rank=rank, name=t) for i, t in enumerate(TASKS)}


def hypernet(adapters, head="L", **kw):
    layout = t2l.layout_of(adapters, t2l.T2LConfig(**kw))
    return t2l.HyperNet(layout, d_enc=16, head=head, hidden=32, embed=8)


def test_every_task_has_twelve_varied_descriptions_none_a_template():
    from src.tasks import TASKS as REGISTRY
    for name, task in REGISTRY.items():
        texts = DESCRIPTIONS[name]
        assert len(texts) >= 12 and len(set(texts)) == len(texts) and N_TRAIN < len(texts)
        template_lines = {line.strip() for line in task.template.splitlines() if len(line.strip()) > 8}
        assert not any(line in d for d in texts for line in template_lines), name


@pytest.mark.parametrize("head", t2l.HEADS)
def test_at_init_the_adapter_is_the_lora_init_and_changes_nothing(head):
    model, adapters = library()
    hnet = hypernet(adapters, head)
    ad = hnet.adapter(torch.randn(16))
    assert all(float(b.abs().max()) == 0 for _, b in ad.factors.values())
    a = next(iter(ad.factors.values()))[0]
    assert 0 < float(a.abs().max()) <= 1 / a.shape[1] ** 0.5 + 1e-6            # Kaiming-uniform bounds
    ref = logits(model)
    apply_adapter(model, ad)
    torch.testing.assert_close(logits(model), ref, atol=0, rtol=0)


@pytest.mark.parametrize("head", t2l.HEADS)
def test_head_sizes_follow_the_papers_formulas(head):
    _, adapters = library()
    hnet = hypernet(adapters, head)
    r, hidden = 4, 32
    for (d_in, d_out), n in zip(hnet.layout.shapes, hnet.head_weights()):
        expected = {"L": r * (d_in + d_out), "M": r * max(d_in, d_out), "S": max(d_in, d_out)}[head]
        assert n == hidden * expected
    # one batched pass gives every module its factors, shaped as the adapters'
    out = hnet(torch.randn(3, 16))
    for m, (a, b) in zip(hnet.layout.modules, out):
        assert a.shape == (3, *adapters["qa"].factors[m][0].shape) and b.shape == (3, *adapters["qa"].factors[m][1].shape)


def test_generated_adapters_round_trip_through_peft_with_identical_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model, adapters = library()
    hnet = hypernet(adapters, "M")
    with torch.no_grad():
        for h in hnet.heads:
            h.weight.normal_(0, 0.05)                   # a trained-like hypernetwork: B is not 0
    ad = hnet.adapter(torch.randn(16))
    out = t2l.write_generated(ad, {"description": "x"}, tmp_path / "gen")
    apply_adapter(model, load_adapter(out))
    ours = logits(model)
    unload_lora(model)
    assert not torch.allclose(ours, logits(model), atol=1e-4)
    ref = peft.PeftModel.from_pretrained(tiny_model("qwen2"), str(out))
    torch.testing.assert_close(logits(ref), ours, atol=1e-5, rtol=0)


def _fit_reconstruction(adapters, steps, tmp, head="L", on_step=None, resume=False):
    layout = t2l.layout_of(adapters, t2l.T2LConfig())
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(len(TASKS), 3, 16), dim=-1)   # 3 descriptions per task
    hnet = t2l.HyperNet(layout, 16, head, hidden=64, embed=8)
    stats = t2l.factor_stats(list(adapters.values()), layout, "factors")
    pairs = [(i, emb[i, j]) for i in range(len(TASKS)) for j in range(3)]
    targets = [[adapters[t].factors[m] for m in layout.modules] for t in TASKS]

    def fn(model, batch):
        k = batch["task_ids"]
        gen = model(torch.stack([pairs[int(i)][1] for i in k]))
        tgt = [(torch.stack([targets[pairs[int(i)][0]][j][0] for i in k]),
                torch.stack([targets[pairs[int(i)][0]][j][1] for i in k])) for j in range(len(layout.modules))]
        return {"l1": t2l.reconstruction_loss(gen, tgt, layout, stats, "factors").sum()}
    cfg = TrainConfig(max_steps=steps, epochs=10000.0, batch_size=9, lr=3e-3, eval_every=0, save_every=5,
                      log_every=steps, progress=False, resume=resume)
    result = training.fit(hnet, dict(hnet.named_parameters()), t2l_train._items(len(pairs)), [], cfg=cfg, seed=0,
                          name="t2l", pad_id=0, state_dir=tmp / "state", log_path=tmp / "log.jsonl",
                          objective=training.Objective(fn, {"l1": (1.0, "n_seqs")}), on_step=on_step)
    with torch.no_grad():
        for k, v in result.params.items():
            dict(hnet.named_parameters())[k].copy_(v)
    return hnet, emb, result


def test_reconstruction_reproduces_three_adapters_closely(tmp_path):
    _, adapters = library()
    hnet, emb, _ = _fit_reconstruction(adapters, 400, tmp_path)
    for i, t in enumerate(TASKS):
        gen = hnet.adapter(emb[i, 0])
        for m, (a, b) in adapters[t].factors.items():
            ga, gb = gen.factors[m]
            rel = float((gb @ ga - b @ a).norm() / (b @ a).norm())
            assert rel < 0.05, (t, m, rel)            # reached here: about 0.01 after 400 steps
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if "loss" in x]
    assert log[-1]["loss"] < 0.1


def test_kill_and_resume_gives_the_same_hypernetwork(tmp_path):
    _, adapters = library()
    full, _, _ = _fit_reconstruction(adapters, 12, tmp_path / "full")

    def kill(step):
        if step == 7:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _fit_reconstruction(adapters, 12, tmp_path / "cut", on_step=kill)
    resumed, _, _ = _fit_reconstruction(adapters, 12, tmp_path / "cut", resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_the_encoders_are_deterministic_and_tell_descriptions_apart():
    texts = ["Classify a movie review as positive or negative.", "Translate German into English."]
    for encoder, base in (("minilm", None), ("base", None)):
        if encoder == "base":
            from tiny import tiny_tokenizer
            base = (tiny_model("qwen2").eval(), tiny_tokenizer())
        try:
            one, two = t2l.encode(texts, encoder, base), t2l.encode(texts, encoder, base)
        except UserError as e:
            pytest.skip(str(e))
        torch.testing.assert_close(one, two, atol=0, rtol=0)
        assert torch.allclose(one.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert float(one[0] @ one[1]) < 0.999
    assert t2l.encode(texts[:1], "minilm").shape == (1, 384)


@pytest.mark.parametrize("text, message", [("   ", "--description is empty"),
                                           ("x" * 1001, "--description is 1001 characters long")])
def test_bad_descriptions_are_one_line(text, message):
    with pytest.raises(UserError, match=message):
        t2l.check_description(text)


def test_mixed_ranks_are_refused_when_the_head_needs_one():
    model = tiny_model("qwen2")
    adapters = {"a": random_adapter(model, 1, rank=4), "b": random_adapter(model, 2, rank=8)}
    with pytest.raises(UserError, match=r"mixed ranks \(4, 8\): the hypernetwork's head needs one rank"):
        t2l.layout_of(adapters, t2l.T2LConfig())


# ------------------------------------------------------------------ the command lines

@pytest.fixture(scope="module")
def t2l_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2l")
    model = save_tiny(tmp / "qwen2")
    run = tmp / "run"
    assert run_main(train_loras.main, _args(model, run, "--max-steps", "2")) == 0
    return model, run


def _args(model, run, *extra, tasks="sentiment,nli,qa"):
    return ["--model", str(model), "--tasks", tasks, "--data", "sample", "--output-dir", str(run),
            "--train-size", "8", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8",
            "--batch-size", "4", "--lr", "1e-2", "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
            "--log-every", "1", "--no-progress", *extra]


def test_reconstruction_from_the_command_line_then_generate(t2l_run, tmp_path):
    model, run = t2l_run
    args = _args(model, run, "--max-steps", "20", "--epochs", "100", "--batch-size", "9", "--lr", "3e-3")
    assert run_main(train_text_to_lora.main, args) == 0
    folder = run / "compose" / "t2l"
    assert {"t2l_config.json", "hypernet.safetensors", "training_config.json", "log.jsonl"} <= \
        {p.name for p in folder.iterdir()}
    val = [json.loads(x)["val_loss"] for x in (folder / "log.jsonl").read_text().splitlines() if "val_loss" in x]
    assert val[-1] < val[0]
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "src.t2l", "generate", "--run", str(run), "--description",
           "Tell whether a film review likes the movie.", "--out", str(out)]
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((out / "t2l_generated.json").read_text())
    assert rec["description"].startswith("Tell whether") and len(rec["hypernet_sha256"]) == 64
    assert set(load_adapter(out).factors) == set(load_adapter(run / "adapters" / "qa").factors)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    empty = subprocess.run([*cmd[:7], " ", "--out", str(tmp_path / "g2")], cwd=ROOT, capture_output=True,
                           text=True, env=env, timeout=300)
    assert empty.returncode == 2 and empty.stderr.strip() == "error: --description is empty: describe the task " \
        "in a sentence" and not (tmp_path / "g2").exists()


def test_sft_lowers_the_task_loss(t2l_run, tmp_path):
    model_dir, run = t2l_run
    r = tmp_path / "run"
    shutil.copytree(run / "adapters", r / "adapters")
    data = DataConfig(tasks="sentiment,nli", data="sample", train_size=8, eval_size=4, max_len=96, max_target_len=8)
    train = TrainConfig(model=str(model_dir), output_dir=str(r), max_steps=8, epochs=100.0, batch_size=4, lr=1e-2,
                        eval_every=4, save_every=4, progress=False)
    t2l_train.train(r, ["sentiment", "nli"], data, train, t2l.T2LConfig(objective="sft", encoder="base"),
                    say=lambda *a: None)
    log = [json.loads(x) for x in (r / "compose" / "t2l" / "log.jsonl").read_text().splitlines()]
    val = [x["val_loss"] for x in log if "val_loss" in x]
    assert len(val) == 2 and val[-1] < val[0]
    assert {"lm", "l2"} == set(next(x for x in log if "terms" in x)["terms"])


@pytest.mark.parametrize("bad, message", [
    (["--hold-out", "poetry"], "--hold-out poetry: not a task of this run (the tasks: sentiment, nli, qa)"),
    (["--head", "XL"], "invalid choice: 'XL'"),
    (["--encoder", "gte"], "invalid choice: 'gte'"),
    (["--tasks", "sentiment,nli,qa,translation"], "lacks the adapters of task(s) translation"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(t2l_run, tmp_path, capsys, bad, message):
    model, run = t2l_run
    r = tmp_path / "run"
    shutil.copytree(run / "adapters", r / "adapters")
    before = sorted(p.relative_to(r) for p in r.rglob("*"))
    capsys.readouterr()
    assert run_main(train_text_to_lora.main, _args(model, r, *bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.relative_to(r) for p in r.rglob("*")) == before
