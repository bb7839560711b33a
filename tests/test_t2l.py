"""Text-to-LoRA: heads, init, encoders, reconstruction, SFT, resume, the script and `generate`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import src.training as training
import train_text_to_lora as script
from src import t2l
from src.config import TrainConfig
from src.descriptions import DESCRIPTIONS, N_TRAIN, held_out_descriptions, training_descriptions
from src.errors import UserError, run_main
from src.lora import apply_adapter, unload_lora
from src.tasks import PRESETS, TASKS, load_examples
from tiny import random_adapter, save_tiny_run, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TASKS3 = ["sentiment", "nli", "qa"]
TARGETS = ("q_proj", "v_proj")


def _adapters(model, rank=4, std=0.3):
    return {t: random_adapter(model, 10 + i, rank=rank, targets=TARGETS, name=t, std=std)
            for i, t in enumerate(TASKS3)}


def _layout(model, head="L", **kw):
    return t2l.layout_of(_adapters(model), t2l.T2LConfig(head=head, **kw))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(2, 400, (2, 9), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------ descriptions

def test_every_task_has_twelve_distinct_descriptions_none_a_template():
    """The study's seven have descriptions; a task added later may have none (docs/tasks.md)."""
    assert set(PRESETS["7tasks"]) <= set(DESCRIPTIONS) <= set(TASKS)
    for task, texts in DESCRIPTIONS.items():
        assert len(texts) >= 12 and len(set(texts)) == len(texts)
        assert len(training_descriptions(task)) == N_TRAIN and len(held_out_descriptions(task)) >= 3
        assert not any("###" in d or "{" in d for d in texts)


# ------------------------------------------------------------------------ heads and init

@pytest.mark.parametrize("head", t2l.HEADS)
def test_head_sizes_follow_the_paper(head):
    model = tiny_model("qwen2")
    lay = _layout(model, head)
    hnet = t2l.HyperNet(lay, 16, head, hidden=24, embed=8)
    r = lay.rank
    want = {"L": [r * (i + o) for i, o in lay.shapes], "M": [r * max(i, o) for i, o in lay.shapes],
            "S": [max(i, o) for i, o in lay.shapes]}[head]
    assert hnet.head_weights() == [24 * w for w in want]
    factors = hnet(torch.randn(3, 16))
    for (a, b), m in zip(factors, lay.modules):
        d_in, d_out = lay.shapes[lay.type_of[lay.modules.index(m)]]
        assert a.shape == (3, r, d_in) and b.shape == (3, d_out, r)


@pytest.mark.parametrize("head", t2l.HEADS)
def test_at_init_the_generated_adapter_changes_nothing(head):
    model = tiny_model("qwen2")
    hnet = t2l.HyperNet(_layout(model, head), 16, head, hidden=24, embed=8)
    ad = hnet.adapter(torch.randn(16))
    assert all(float(b.abs().max()) == 0 for _, b in ad.factors.values())
    assert all(float(a.abs().max()) > 0 for a, _ in ad.factors.values())    # A at LoRA's Kaiming init
    want = _logits(model, IDS)
    apply_adapter(model, ad)
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)
    unload_lora(model)


def test_generated_adapter_round_trips_through_peft(tmp_path):
    import peft
    model = tiny_model("qwen2")
    model.save_pretrained(str(tmp_path / "base"))
    hnet = t2l.HyperNet(_layout(model), 16, "L", hidden=24, embed=8)
    with torch.no_grad():
        for h in hnet.heads:
            h.weight.normal_(0, 0.05)                                    # B != 0: the adapter matters
    ad = hnet.adapter(torch.randn(16))
    t2l.write_generated(ad, {"description": "x"}, tmp_path / "gen")
    assert json.loads((tmp_path / "gen" / t2l.GENERATED_NAME).read_text())["description"] == "x"
    apply_adapter(model, ad)
    ours = _logits(model, IDS)
    unload_lora(model)
    assert (ours - _logits(model, IDS)).abs().max() > 1e-4
    from transformers import AutoModelForCausalLM
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                            str(tmp_path / "gen")).eval()
    torch.testing.assert_close(_logits(theirs, IDS), ours, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ encoders

def test_base_encoder_is_deterministic_and_tells_descriptions_apart():
    base = (tiny_model("qwen2"), tiny_tokenizer())
    texts = ["Decide whether a movie review is positive.", "Translate English into German."]
    e1, e2 = t2l.encode(texts, "base", base), t2l.encode(texts, "base", base)
    assert e1.shape == (2, 32)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    torch.testing.assert_close(e1.norm(dim=-1), torch.ones(2))
    assert (e1[0] - e1[1]).abs().max() > 1e-3


def test_minilm_encoder_is_deterministic_and_tells_descriptions_apart():
    pytest.importorskip(t2l.MINILM_PACKAGE)
    texts = ["Decide whether a movie review is positive.", "Translate English into German.",
             "Say if a film review is favourable."]
    e1, e2 = t2l.encode(texts, "minilm"), t2l.encode(texts, "minilm")
    assert e1.shape == (3, 384)
    torch.testing.assert_close(e1, e2)
    sim = e1 @ e1.T
    assert sim[0, 2] > sim[0, 1]                                         # meaning, not just tokens


# ------------------------------------------------------------------------ reconstruction

def _library(model, head="L", mode="factors"):
    ads = _adapters(model)
    cfg = t2l.T2LConfig(head=head, recon_target=mode)
    lay = t2l.layout_of(ads, cfg)
    emb = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    hnet = t2l.HyperNet(lay, 16, head, hidden=64, embed=16)
    ordered = list(ads.values())
    lib = t2l.Library(hnet, emb, [0, 1, 2], t2l.library_targets(ordered, lay))
    return lib, lay, t2l.reconstruction_objective(lay, t2l.factor_stats(ordered, lay, mode), mode), ordered


def _fit(model, params, items, tmp_path, objective, steps, lr=1e-3, **kw):
    cfg = TrainConfig(max_steps=steps, epochs=1e6, batch_size=3, lr=lr, eval_every=0, save_every=kw.pop("save_every", 0),
                      log_every=10, warmup_steps=0, progress=False, resume=kw.pop("resume", False))
    return training.fit(model, params, items, [], cfg=cfg, seed=0, name="t2l", pad_id=kw.pop("pad_id", 0),
                        state_dir=tmp_path / "state", log_path=tmp_path / "state" / "log.jsonl",
                        objective=objective, **kw)


def _recon_loss(lib, obj):
    batch = training.collate(t2l.pair_items(3), 0)
    with torch.no_grad():
        return float(obj.fn(lib, batch)["l1"]) / 3


@pytest.mark.parametrize("head", t2l.HEADS)
def test_reconstruction_reproduces_three_adapters(head, tmp_path):
    model = tiny_model("qwen2")
    lib, lay, obj, ordered = _library(model, head)
    before = _recon_loss(lib, obj)
    params = dict(lib.hnet.named_parameters())
    result = _fit(lib, params, t2l.pair_items(3), tmp_path, obj, steps={"L": 300, "M": 300, "S": 1000}[head],
                  lr=3e-3)
    with torch.no_grad():
        for k, v in result.params.items():
            params[k].copy_(v)
    after = _recon_loss(lib, obj)
    assert after < 0.05 * before, (before, after)
    worst = 0.0
    for i, ad in enumerate(ordered):                                      # the deltas, closely
        gen = lib.hnet.adapter(lib.pair_emb[i])
        for m in lay.modules:
            want = ad.delta(m)
            worst = max(worst, float((gen.delta(m) - want).norm() / want.norm()))
    print(f"head {head}: L1 {before:.3f} -> {after:.4f}; worst relative delta error {worst:.4f}")
    assert worst < {"L": 0.1, "M": 0.1, "S": 0.3}[head]


def test_reconstruction_on_deltas_lowers_the_loss(tmp_path):
    model = tiny_model("qwen2")
    lib, _, obj, _ = _library(model, "M", "deltas")
    before = _recon_loss(lib, obj)
    params = dict(lib.hnet.named_parameters())
    result = _fit(lib, params, t2l.pair_items(3), tmp_path, obj, steps=60, lr=3e-3)
    assert result.final_train_loss < 0.7 * before


def test_kill_and_resume_gives_the_same_hypernetwork(tmp_path):
    model = tiny_model("qwen2")

    def run(folder, stop=None, resume=False):
        lib, _, obj, _ = _library(model)
        params = dict(lib.hnet.named_parameters())

        def on_step(step):
            if step == stop:
                raise KeyboardInterrupt
        try:
            return _fit(lib, params, t2l.pair_items(3), folder, obj, steps=12, save_every=4, resume=resume,
                        on_step=on_step).params
        except KeyboardInterrupt:
            return None
    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop=6) is None
    resumed = run(tmp_path / "b", resume=True)
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) < 1e-6


# ------------------------------------------------------------------------ SFT

def test_sft_through_the_generated_adapter_lowers_the_task_loss(tmp_path):
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    lay = _layout(model)
    hnet = t2l.HyperNet(lay, 16, "L", hidden=32, embed=8)
    train_emb = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    items = [it for i, t in enumerate(["sentiment", "nli"])
             for it in training.encode_examples(tok, load_examples(t, "train", "sample", None, 6, 0), 96, 8,
                                                label=i)]
    with t2l.generated(model, lay) as layers:
        obj = t2l.sft_objective(hnet, layers, train_emb, train_emb[:, 0], 0.1, 1e-3)
        batch = training.collate(items, tok.pad_token_id)
        model.eval()
        with torch.no_grad():
            before = float(obj.fn(model, batch)["lm"]) / batch["n_tokens"]
        params = {f"hnet.{k}": p for k, p in hnet.named_parameters()}
        result = _fit(model, params, items, tmp_path, obj, steps=15, lr=1e-2, pad_id=tok.pad_token_id)
        with torch.no_grad():
            for k, v in result.params.items():
                params[k].copy_(v)
        model.eval()
        with torch.no_grad():
            after = float(obj.fn(model, batch)["lm"]) / batch["n_tokens"]
    assert after < before - 0.1, (before, after)
    assert not any(isinstance(m, t2l.GeneratedLinear) for m in model.modules())   # unwrapped on exit


# ------------------------------------------------------------------------ bad input

def test_bad_descriptions_heads_encoders_and_ranks_are_refused():
    for text in ("", "   ", "x" * (t2l.MAX_DESCRIPTION_CHARS + 1)):
        with pytest.raises(UserError, match="description"):
            t2l.check_description(text)
    with pytest.raises(UserError, match="--head"):
        t2l.T2LConfig(head="XL")
    with pytest.raises(UserError, match="--encoder"):
        t2l.T2LConfig(encoder="gte")
    model = tiny_model("qwen2")
    mixed = _adapters(model)
    mixed["qa"] = random_adapter(model, 3, rank=8, targets=TARGETS, name="qa")
    with pytest.raises(UserError, match="mixed ranks"):
        t2l.layout_of(mixed, t2l.T2LConfig())
    with pytest.raises(UserError, match="--t2l-targets: o_proj"):
        t2l.layout_of(_adapters(model), t2l.T2LConfig(t2l_targets="o_proj"))
    lay = t2l.layout_of(_adapters(model), t2l.T2LConfig(t2l_targets="v_proj"))
    assert lay.types == ["self_attn.v_proj"] and len(lay.modules) == 2


# ------------------------------------------------------------------------ the script and `generate`

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with tiny-model adapters for sentiment and nli (as train_individual_loras.py leaves them)."""
    return save_tiny_run(tmp_path_factory.mktemp("t2l"), targets=TARGETS)


def _args(model_dir, run, *extra):
    return ["--model", str(model_dir), "--tasks", "sentiment,nli", "--output-dir", str(run), "--encoder", "base",
            "--t2l-hidden", "32", "--t2l-embed", "8", "--batch-size", "6", "--lr", "3e-3", "--max-steps", "6",
            "--eval-every", "3", "--save-every", "3", "--log-every", "1", "--no-progress", *extra]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_bad_script_input_writes_nothing(tiny_run, capsys):
    model_dir, run = tiny_run
    before = _listing(run)
    for extra, word in ((["--hold-out", "qa"], "--hold-out qa"), (["--head", "XL"], "head"),
                        (["--encoder", "gte"], "encoder")):
        assert run_main(script.main, _args(model_dir, run, *extra)) == 2
        assert word in capsys.readouterr().err
    assert _listing(run) == before
    out = run.parent / "never"
    for text in ("", "x" * 2000):
        proc = subprocess.run([sys.executable, "-m", "src.t2l", "generate", "--run", str(run), "--description", text,
                               "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 2 and "description" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not out.exists()


def test_script_trains_skips_and_generate_writes_a_peft_adapter(tiny_run, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM
    model_dir, run = tiny_run
    assert run_main(script.main, _args(model_dir, run)) == 0
    folder = run / "compose" / "t2l"
    assert sorted(p.name for p in folder.iterdir()) == ["hypernet.safetensors", "log.jsonl", "reconstruction.json",
                                                        "t2l_config.json", "training_config.json"]
    info = json.loads((folder / "training_config.json").read_text())
    assert info["steps"] == 6 and info["tasks"] == ["sentiment", "nli"] and "adapters" in info["built_from"]
    assert not (run / "checkpoints").exists()
    mtime = (folder / "hypernet.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert run_main(script.main, _args(model_dir, run)) == 0
    assert "skip" in capsys.readouterr().out
    assert (folder / "hypernet.safetensors").stat().st_mtime_ns == mtime
    assert run_main(script.main, _args(model_dir, run, "--hold-out", "nli")) == 0
    assert json.loads((run / "compose" / "t2l-holdout-nli" / "training_config.json").read_text())["tasks"] == \
        ["sentiment"]

    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "src.t2l", "generate", "--run", str(run), "--description",
                           "Tell whether a review likes the film.", "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / t2l.GENERATED_NAME).read_text())
    assert record["description"] == "Tell whether a review likes the film."
    assert record["hypernet_sha256"] == __import__("src.runs", fromlist=["x"]).file_digest(
        folder / t2l.CONFIG_NAME, folder / t2l.WEIGHTS_NAME)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out))
    assert len([n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]) == 4


def test_t2l_methods_generate_each_task_from_hypernetworks_that_evaluation_never_trains(tiny_run):
    """issue 26: t2l_zeroshot's hypernetworks come from train_text_to_lora.py --hold-out-each; without them
    the method refuses in one line naming the command, and a hold-out trained otherwise is refused."""
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    model_dir, run = tiny_run
    if not (run / "compose" / "t2l").is_dir():
        assert run_main(script.main, _args(model_dir, run)) == 0
    env = compose.Env(run_dir=run, tasks=["sentiment", "nli"], model_loader=lambda: (tiny_model("qwen2"),
                                                                                      tiny_tokenizer()))
    env.load_adapters(env.tasks)
    for held in ("sentiment", "nli"):
        shutil.rmtree(run / "compose" / f"t2l-holdout-{held}", ignore_errors=True)
    with pytest.raises(UserError, match=r"t2l-holdout-sentiment, a hypernetwork trained without sentiment "
                                        r"\(evaluation trains none\): run train_text_to_lora.py .*--hold-out-each"):
        compose.check_all(["t2l_zeroshot"], env)
    assert not (run / "compose" / "t2l-holdout-sentiment").exists()
    # a hold-out trained with other flags than RUN/compose/t2l is refused by what differs
    assert run_main(script.main, _args(model_dir, run, "--hold-out", "sentiment", "--lr", "1e-3")) == 0
    with pytest.raises(UserError, match=r"t2l-holdout-sentiment was not trained as RUN/compose/t2l was, without "
                                        r"sentiment \(--lr 0\.001 -> 0\.003"):
        compose.check_all(["t2l_zeroshot"], env)
    assert run_main(script.main, [*_args(model_dir, run), "--hold-out-each", "--force"]) == 0
    compose.check_all(["t2l", "t2l_zeroshot"], env)
    built = compose.build_all(["t2l", "t2l_zeroshot"], env)
    for method in ("t2l", "t2l_zeroshot"):
        value = built[method].value
        assert set(value) == {"sentiment", "nli"} and all(len(a.factors) == 4 for a in value.values())
    folder = run / "compose" / "t2l-holdout-sentiment"
    info = json.loads((folder / "training_config.json").read_text())
    assert info["tasks"] == ["nli"] and info["selection_ids"] == {} and info["hold_out"] == "sentiment"
    mtime = (folder / "hypernet.safetensors").stat().st_mtime_ns
    fp = compose.REGISTRY["t2l"].fingerprint(env, "nli")["t2l"]
    assert fp["encoder"] == "base" and fp["description"] == held_out_descriptions("nli")[0]
    compose.build_all(["t2l_zeroshot"], env)                                    # evaluation trains nothing
    assert run_main(script.main, [*_args(model_dir, run), "--hold-out-each"]) == 0   # complete: skipped
    assert (folder / "hypernet.safetensors").stat().st_mtime_ns == mtime


def test_script_sft_and_resume_after_a_kill(tiny_run, tmp_path, monkeypatch):
    import shutil
    model_dir, run = tiny_run
    mine = tmp_path / "run"
    shutil.copytree(run / "adapters", mine / "adapters")
    args = _args(model_dir, mine, "--objective", "sft", "--data", "sample", "--train-size", "8", "--eval-size", "4",
                 "--max-len", "96", "--max-target-len", "8", "--batch-size", "4", "--max-steps", "4",
                 "--save-every", "2", "--eval-every", "0", "--lr", "1e-2")
    assert run_main(script.main, [*args, "--output-dir", str(tmp_path / "straight")]) != 0   # no adapters there
    shutil.copytree(run / "adapters", tmp_path / "straight" / "adapters")
    assert run_main(script.main, [*args, "--output-dir", str(tmp_path / "straight")]) == 0
    straight = t2l.load(tmp_path / "straight" / "compose" / "t2l")[0].state_dict()

    real_fit = training.fit

    def killed_fit(*a, **k):                                  # dies after step 3 (checkpoint at 2)
        def on_step(step):
            if step == 3:
                raise KeyboardInterrupt
        return real_fit(*a, **k, on_step=on_step)
    monkeypatch.setattr(training, "fit", killed_fit)
    with pytest.raises(KeyboardInterrupt):
        script.main(args)
    assert not (mine / "compose" / "t2l").exists() and (mine / "checkpoints" / "t2l").is_dir()
    monkeypatch.setattr(training, "fit", real_fit)
    assert run_main(script.main, [*args, "--resume"]) == 0
    resumed = t2l.load(mine / "compose" / "t2l")[0].state_dict()
    assert max(float((straight[k] - resumed[k]).abs().max()) for k in straight) < 1e-6
    info = json.loads((mine / "compose" / "t2l" / "training_config.json").read_text())
    assert info["config"]["T2LConfig"]["objective"] == "sft" and info["data_hash"]["train"]


def test_a_task_carries_its_descriptions_and_one_without_is_refused_in_one_line(monkeypatch):
    """issue 26: descriptions come from the Task (`Task.descriptions`), so a new task brings its own."""
    import dataclasses
    from src import tasks
    from src.errors import UserError
    assert training_descriptions("nli") == tasks.TASKS["nli"].descriptions[:N_TRAIN]
    monkeypatch.setitem(tasks.TASKS, "nli", dataclasses.replace(tasks.TASKS["nli"], descriptions=()))
    with pytest.raises(UserError, match=r"descriptions of task nli: its Task\(\.\.\.\) in src/tasks.py has none") as e:
        training_descriptions("nli")
    assert "\n" not in str(e.value)
    own = tuple(f"Describe the new task, take {i}." for i in range(12))
    monkeypatch.setitem(tasks.TASKS, "nli", dataclasses.replace(tasks.TASKS["nli"], descriptions=own))
    assert held_out_descriptions("nli") == own[N_TRAIN:]
