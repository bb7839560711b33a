"""Retrieval routing (LoRAuter-style): routing, exactness against the oracle, gates, the base
encoder's view of the plain model, the cached build step, the fingerprint, bad input, and the
method through full_evaluation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src import compose, merging, systems  # noqa: F401 (systems: every method registered)
from src import evaluation as ev
from src.encoders import MINILM_PACKAGE, encode_texts
from src.experts import Selection, topk_softmax
from src.lora import apply_adapter, folded, unload_lora
from src.retrieval import RetrievalConfig, RetrievalRouter, load_embeddings, save_embeddings, task_embeddings
from src.tasks import get_task, load_examples
from fixture_run import eval_command, fixture_run
from tiny import random_adapter, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
TASKS = ["sentiment", "nli", "qa"]
MARKERS = ["### Sentiment:", "### Premise:", "### Context:"]      # each task's prompt, told apart
SETTINGS = ev.Settings(max_new_tokens=4, batch_size=4)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    ads = {t: random_adapter(model, 30 + i, rank=4, name=t, std=0.3) for i, t in enumerate(TASKS)}
    shots = {t: load_examples(t, "train", "sample", None, 6, 0) for t in TASKS}
    return model, tok, ads, shots


def decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def prompts(shots, t):
    return [get_task(t).prompt(ex) for ex in shots[t]]


def perfect(texts):
    """A perfect embedding: the one-hot of the prompt's task."""
    return torch.stack([F.one_hot(torch.tensor(next(i for i, m in enumerate(MARKERS) if m in x)), 3).float()
                        for x in texts])


# --------------------------------------------------------------------------- routing

def test_own_training_prompts_route_to_their_task(setup):
    """all-MiniLM-L6-v2 (the default encoder): a task's own training prompts, as the evaluated
    prompts, go to that task's expert; the record names the chosen expert and every similarity."""
    pytest.importorskip(MINILM_PACKAGE)
    model, tok, ads, shots = setup
    emb = task_embeddings([encode_texts(prompts(shots, t), "minilm") for t in TASKS])
    router = RetrievalRouter(model, ads, TASKS, emb, lambda x: encode_texts(x, "minilm"), decode(tok))
    try:
        for t in TASKS:
            body = ev.evaluate_task(model, tok, t, shots[t], SETTINGS, router=router)
            assert [r["routed_task"] for r in body["records"]] == [t] * len(shots[t])
            rec = body["records"][0]
            assert rec["experts"] == {t: 1.0} and set(rec["similarity"]) == set(TASKS)
            assert max(rec["similarity"], key=rec["similarity"].get) == t
    finally:
        router.remove()
    assert not any(type(m).__name__ == "ExpertLinear" for m in model.modules())


def test_top1_with_a_perfect_embedding_is_the_oracle_exactly(setup):
    """k = 1 and an embedding that knows the task: every batch takes the one-expert fast path,
    the logits are bit for bit the adapter's own LoRA layers', and the predictions and scores are
    the folded oracle's."""
    model, tok, ads, shots = setup
    ids = {t: torch.tensor([ev.task_registry.encode_prompt(tok, prompts(shots, t)[0], 400)]) for t in TASKS}
    got, logits = {}, {}
    router = RetrievalRouter(model, ads, TASKS, torch.eye(3), perfect, decode(tok))
    try:
        for i, t in enumerate(TASKS):
            got[t] = ev.evaluate_task(model, tok, t, shots[t], SETTINGS, router=router)
            assert isinstance(router._last["route"], Selection) and router._last["route"].uniform == i
            with torch.no_grad(), router.session():
                logits[t] = model(input_ids=ids[t]).logits
    finally:
        router.remove()
    for t in TASKS:
        apply_adapter(model, ads[t])
        with torch.no_grad():
            assert torch.equal(logits[t], model(input_ids=ids[t]).logits)
        unload_lora(model)
        with folded(model, ads[t]):
            want = ev.evaluate_task(model, tok, t, shots[t], SETTINGS)
        assert [r["prediction"] for r in got[t]["records"]] == [r["prediction"] for r in want["records"]]
        assert got[t]["result"] == want["result"]
        assert {r["routed_task"] for r in got[t]["records"]} == {t}


@pytest.mark.parametrize("k", [2, 3])
def test_topk_gates_per_sequence_sum_to_one_and_fuse_the_experts(setup, k):
    """Top-k gates: k experts per sequence, softmax(cos / T) over them, summing to 1; one
    sequence's output is the concat merge with those gates as weights, folded."""
    model, tok, ads, shots = setup
    base = (model, tok)
    emb = task_embeddings([encode_texts(prompts(shots, t), "base", base) for t in TASKS])
    router = RetrievalRouter(model, ads, TASKS, emb, lambda x: encode_texts(x, "base", base), decode(tok),
                             top_k=k, temperature=0.05)
    mixed = [ev.task_registry.encode_prompt(tok, prompts(shots, t)[j], 400) for t in TASKS for j in range(2)]
    try:
        out = ev.generate(model, tok, mixed, batch_size=6, max_new_tokens=2, router=router)
        gates = router._last["gates"]                                          # [6, 3], the batch's order
        assert ((gates > 0).sum(-1) == k).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(6), rtol=0, atol=1e-6)
        recorded = torch.tensor([[r["experts"].get(t, 0.0) for t in TASKS] for r in out.routing])   # input order
        sims = torch.tensor([[r["similarity"][t] for t in TASKS] for r in out.routing])
        torch.testing.assert_close(recorded, topk_softmax(sims, k, 0.05), rtol=0, atol=1e-4)
        assert sorted(recorded.tolist()) == sorted(torch.round(gates, decimals=6).tolist())
        for r in out.routing:
            assert len(r["experts"]) == k and abs(sum(r["experts"].values()) - 1) < 1e-5
            assert r["routed_task"] == next(iter(r["experts"]))
        ids = torch.tensor([mixed[0]])
        with torch.no_grad(), router.session():
            mine = model(input_ids=ids).logits
        g = router._last["gates"][0].tolist()
    finally:
        router.remove()
    with folded(model, merging.merge_adapters([ads[t] for t in TASKS], "concat", weights=g)), torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(mine, want, rtol=0, atol=1e-5)


def test_the_base_encoder_sees_the_plain_base_model(setup):
    """With the experts injected, --retrieval-encoder base embeds a prompt exactly as the plain
    base model does (the expert layers add nothing while it runs), once per distinct prompt."""
    model, tok, ads, shots = setup
    base = (model, tok)
    texts = prompts(shots, "nli")[:3]
    plain = encode_texts(texts, "base", base)
    seen = []

    def embed(x):
        seen.append(encode_texts(x, "base", base))
        return seen[-1]
    router = RetrievalRouter(model, ads, TASKS, task_embeddings([plain[:1], plain[1:2], plain[2:]]), embed,
                             decode(tok))
    try:
        ids = [ev.task_registry.encode_prompt(tok, x, 400) for x in texts]
        ev.generate(model, tok, ids + ids, batch_size=6, max_new_tokens=2, router=router)
        with router.session(experts=[0]):             # an expert acting: another embedding
            assert (encode_texts(texts[:1], "base", base) - plain[:1]).abs().max() > 1e-4
    finally:
        router.remove()
    assert len(seen) == 1 and len(seen[0]) == 3                    # the batch's 6 prompts: 3 distinct
    assert sorted(seen[0].tolist()) == sorted(plain.tolist())         # each exactly its plain-model embedding


# --------------------------------------------------------------------------- the build step and the entry

def test_embeddings_cache_is_reused_only_for_the_same_recipe(tmp_path):
    emb = torch.randn(3, 8)
    recipe = {"encoder": "base", "shots": 2, "shot_ids": {"a": ["1", "2"]}}
    save_embeddings(tmp_path / "r", emb, recipe)
    assert torch.equal(load_embeddings(tmp_path / "r", recipe), emb)
    assert load_embeddings(tmp_path / "r", {**recipe, "shots": 3}) is None
    (tmp_path / "r" / "task_embeddings.safetensors").write_bytes(b"damaged")
    assert load_embeddings(tmp_path / "r", recipe) is None


def test_fingerprint_changes_with_each_option_and_nothing_else(tmp_path):
    from src.arrow import ArrowConfig
    from src.lorahub import LoraHubConfig
    shutil.copytree(FIXTURE, tmp_path / "run")
    method = compose.REGISTRY["retrieval"]

    def fp(cfg=None, seed=0, other=None, model="tiny-qwen2"):
        env = compose.Env(tmp_path / "run", TASKS, {RetrievalConfig: RetrievalConfig(**(cfg or {})), **(other or {})},
                          seed=seed, model_name=model, dtype="float32")
        env.load_adapters(TASKS)
        return json.dumps(compose.fingerprint("retrieval", "qa", env, {}), sort_keys=True)
    ref = fp()
    changed = [fp({"retrieval_shots": 8}), fp({"retrieval_encoder": "base"}), fp({"retrieval_top_k": 2}),
               fp({"retrieval_top_k": 2, "retrieval_temperature": 0.5}), fp(seed=1),
               fp({"retrieval_encoder": "base"}, model="other")]          # the base encoder is the model
    assert len({ref, *changed}) == len(changed) + 1
    assert fp({"retrieval_temperature": 0.5}) == ref                      # no effect at top-k 1
    assert fp(model="other") == ref                                       # MiniLM does not depend on it
    assert fp(other={ArrowConfig: ArrowConfig(arrow_top_k=1), LoraHubConfig: LoraHubConfig(lorahub_shots=2)}) == ref
    assert method.kind == "dynamic" and RetrievalConfig in method.configs


_cmd = eval_command


@pytest.fixture()
def run(tmp_path):
    return fixture_run(tmp_path)


def test_retrieval_through_full_evaluation(run):
    """--methods retrieval: its task embeddings built once from training prompts no cell evaluates
    (cached with encoder, shots and their ids), routing accuracy and a routing plot, cells reused
    on rerun, a new option recomputed."""
    folder, go = run
    out = go("--methods", "retrieval", "--retrieval-encoder", "base", "--retrieval-shots", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 cells reused, 9 to compute" in out.stderr and "retrieval: built" in out.stderr
    info = json.loads((folder / "merged" / "retrieval" / "retrieval_info.json").read_text())
    assert info["shape"][0] == 3 and info["recipe"]["encoder"] == "base" and info["recipe"]["shots"] == 4
    train = {t: {ex.id for ex in load_examples(t, "train", "sample")} for t in TASKS}
    for t in TASKS:
        evaluated = {json.loads(x)["id"] for x in (folder / "eval" / "predictions" / "retrieval" / f"{t}.jsonl")
                     .read_text().splitlines()}
        ids = info["recipe"]["shot_ids"][t]
        assert len(ids) == 4 and set(ids) <= train[t] and not set(ids) & evaluated
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    table = summary["routing"]["retrieval"]
    assert table["kind"] == "sequence" and 0 <= table["accuracy"] <= 1
    assert sum(sum(row.values()) for row in table["confusion"].values()) == 9
    assert "retrieval routing accuracy" in (folder / "eval" / "results.md").read_text()
    from src import analysis
    assert "routing_retrieval.png" in {p.name for p in analysis.plot_run(folder, cosines=False)}
    again = go("--methods", "retrieval", "--retrieval-encoder", "base", "--retrieval-shots", "4")
    assert "9 cells reused, 0 to compute" in again.stderr
    (folder / "eval" / "cells" / "retrieval" / "qa.json").unlink()
    again = go("--methods", "retrieval", "--retrieval-encoder", "base", "--retrieval-shots", "4")
    assert "1 to compute" in again.stderr and "retrieval: reused" in again.stderr, again.stderr[-2000:]
    k2 = go("--methods", "retrieval", "--retrieval-encoder", "base", "--retrieval-shots", "4", "--retrieval-top-k", "2")
    assert k2.returncode == 0 and "3 to compute" in k2.stderr
    rec = json.loads((folder / "eval" / "predictions" / "retrieval" / "nli.jsonl").read_text().splitlines()[0])
    assert len(rec["experts"]) == 2 and abs(sum(rec["experts"].values()) - 1) < 1e-5


@pytest.mark.parametrize("extra, msg", [
    (["--retrieval-shots", "41"], "error: --retrieval-shots 41: the training split of task sentiment holds only 40 "
                                  "examples that are not evaluated"),
    (["--retrieval-encoder", "nope"], "error: full_evaluation.py: argument --retrieval-encoder: invalid choice: "),
    (["--retrieval-top-k", "0"], "error: --retrieval-top-k must be a positive integer, got 0"),
    (["--retrieval-top-k", "4"], "error: --retrieval-top-k 4 is more than the 3 experts (sentiment, nli, qa)"),
    (["--retrieval-temperature", "0"], "error: --retrieval-temperature must be a finite number above 0, got 0.0"),
])
def test_bad_input_one_line_exit_2_nothing_written(run, extra, msg, monkeypatch, capsys):
    import full_evaluation
    from src.errors import run_main
    folder, _ = run
    monkeypatch.chdir(folder.parent)                   # in-process: the same command, without a new Python
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    capsys.readouterr()
    encoder = [] if "--retrieval-encoder" in extra else ["--retrieval-encoder", "base"]
    rc = run_main(full_evaluation.main, _cmd("--methods", "retrieval", *encoder, *extra)[2:])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(msg), lines
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
