"""Evaluation on a tiny random model: the oracle scores exactly 1.0, folded merges generate
what LoRA layers generate, MoA in oracle mode is the oracle, mixed batches equal batch size 1,
cells are reused and resumed, bad input exits 2 before any work, the analysis cosine equals the
dense one, and the notebook runs headless on the results.

One small run folder is built once per module: a tiny Qwen2, three task LoRAs trained for a
few dozen steps to memorise six short examples each (so the oracle scores above 0), a MoA with
random routers, and one full_evaluation.py run over it.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import full_evaluation
from src import compose, runs, systems  # noqa: F401 (systems: every method registered)
from src import evaluation as ev
from src import tasks as T
from src.analysis import cosine_matrices, factor_inner
from src.errors import run_main
from src.lora import (LoraConfig, add_lora, adapter_from_model, apply_adapter, folded, lora_layers,
                      save_adapter, unload_lora)
from src.moa import MixtureOfLoRAs
from tiny import trained_like_adapter, save_tiny, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "nli", "qa"]


def run_adapters(run):
    """{task: Adapter} of a run folder, as evaluation loads them."""
    env = compose.Env(Path(run), TASKS)
    env.load_adapters(TASKS)
    return env.adapters
EXAMPLES = {
    "sentiment": [({"sentence": s}, y) for s, y in [
        ("a fine film", "positive"), ("the worst", "negative"), ("and it is good", "positive"),
        ("not for me", "negative"), ("was great", "positive"), ("dull and slow", "negative")]],
    "nli": [({"premise": p, "hypothesis": h}, y) for p, h, y in [
        ("a dog runs", "an animal runs", "entailment"), ("the man sings", "the man is silent", "contradiction"),
        ("she is in Bonn", "she likes tea", "neutral"), ("two kids play", "kids play", "entailment"),
        ("it is sunny", "it is raining", "contradiction"), ("he reads", "he reads a novel", "neutral")]],
    "qa": [({"title": "t", "context": c, "question": q}, a) for c, q, a in [
        ("Anna lives in Bonn.", "Where does Anna live?", "Bonn"),
        ("The cat is black.", "What colour is the cat?", "black"),
        ("Tom has two dogs.", "How many dogs has Tom?", "two"),
        ("The shop opens at nine.", "When does the shop open?", "at nine"),
        ("Lea drinks tea.", "What does Lea drink?", "tea"),
        ("The river is cold.", "How is the river?", "cold")]],
}
FLAGS = ["--max-new-tokens", "10", "--batch-size", "4"]


def write_data(folder: Path, tasks=TASKS) -> Path:
    for t in tasks:
        lines = [json.dumps({"id": f"{t}-{i}", "task": t, "input": inp, "target": y}) + "\n"
                 for i, (inp, y) in enumerate(EXAMPLES[t])]
        (folder / t).mkdir(parents=True, exist_ok=True)
        for split in ("train", "validation"):
            (folder / t / f"{split}.jsonl").write_text("".join(lines))
    return folder


def memorise(model, tokenizer, task: str, examples, max_steps: int = 300, seed: int = 0):
    """A LoRA trained (full batch, Adam) until greedy decoding reproduces the targets."""
    torch.manual_seed(seed)
    layers = add_lora(model, LoraConfig(rank=8, alpha=16))
    params = [p for m in layers.values() for p in (m.lora_A, m.lora_B)]
    for p in params:
        p.requires_grad_(True)
    seqs = [T.tokenize_example(tokenizer, T.TASKS[task].prompt(ex), ex.target) for ex in examples]
    width = max(len(s["input_ids"]) for s in seqs)
    ids = torch.tensor([s["input_ids"] + [1] * (width - len(s["input_ids"])) for s in seqs])
    labels = torch.tensor([s["labels"] + [-100] * (width - len(s["labels"])) for s in seqs])
    mask = torch.tensor([[1] * len(s["input_ids"]) + [0] * (width - len(s["input_ids"])) for s in seqs])
    prompts = [T.encode_prompt(tokenizer, T.TASKS[task].prompt(ex), 400) for ex in examples]
    opt = torch.optim.Adam(params, lr=2e-2)
    for step in range(1, max_steps + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            with torch.no_grad():
                texts = ev.generate(model, tokenizer, prompts, batch_size=8, max_new_tokens=10).texts
            if [T.clean_prediction(task, x) for x in texts] == [ex.target for ex in examples]:
                break
    adapter = adapter_from_model(model, name=task)
    unload_lora(model)
    return adapter


def evaluate(argv) -> int:
    """full_evaluation.py in-process, as the command line runs it: its exit code."""
    return run_main(full_evaluation.main, argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    run, data = root / "run", write_data(root / "data")
    model_dir = save_tiny(root / "model")
    tok = tiny_tokenizer()
    model = tiny_model("qwen2")
    examples = T.load_task_data(TASKS, "train", "dir", data)
    adapters = {}
    for i, t in enumerate(TASKS):
        adapters[t] = memorise(model, tok, t, examples[t], seed=i)
        save_adapter(adapters[t], run / "adapters" / t)
    moa = MixtureOfLoRAs(model, adapters)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in moa.routers:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))
    moa.save(run / "moa")
    moa.remove()
    argv = ["--model", str(model_dir), "--output-dir", str(run), "--tasks", ",".join(TASKS),
            "--methods", "moa,concat,weight_sum,svd", "--data-dir", str(data), *FLAGS]
    assert evaluate(argv) == 0
    return {"root": root, "run": run, "data": data, "model_dir": model_dir, "argv": argv, "tok": tok,
            "examples": T.load_task_data(TASKS, "validation", "dir", data)}


def summary_of(run):
    return json.loads((run / "eval" / "summary.json").read_text())


def scores_of(run):
    """{method: (multitask score, {task: metrics})}: the results without timings."""
    return {m: (e["multitask_score"], {t: c["metrics"] for t, c in e["per_task"].items()})
            for m, e in summary_of(run)["methods"].items()}


# --------------------------------------------------------------------------- results

def test_oracle_multitask_score_is_exactly_one(tiny_run):
    s = summary_of(tiny_run["run"])
    oracle = s["methods"]["oracle"]
    assert all(oracle["per_task"][t]["score"] > 0 for t in TASKS)
    assert oracle["multitask_score"] == 1.0
    assert list(s["methods"]) == ["oracle", "moa", "concat", "weight_sum", "svd", "base"]
    for m, entry in s["methods"].items():
        for t in TASKS:
            cell = entry["per_task"][t]
            assert cell["primary"] == T.TASKS[t].primary
            assert cell["oracle_score"] == oracle["per_task"][t]["score"]
            assert cell["primary"] in cell["metrics"]


def test_result_files_record_their_provenance(tiny_run):
    run = tiny_run["run"]
    s = summary_of(run)
    assert s["model"] == str(tiny_run["model_dir"]) and s["tasks"] == TASKS
    meta = s["meta"]
    assert meta["seed"] == 0 and len(meta["data_hash"]) == 64 and "git_commit" in meta
    import transformers
    assert meta["versions"]["transformers"] == transformers.__version__
    assert {"python", "torch", "transformers", "tokenizers", "peft", "safetensors"} <= set(meta["versions"])
    assert meta["versions"]["peft"]                      # installed for the tests
    assert "--methods" in meta["command"] and meta["config"]["EvalConfig"]["max_new_tokens"] == 10
    assert meta["command"].startswith("python full_evaluation.py --model")
    md = (run / "eval" / "results.md").read_text()
    csv = (run / "eval" / "results.csv").read_text()
    assert meta["data_hash"][:16] in md and "command:" in md
    assert not csv.startswith("#")                        # pandas.read_csv reads it as it is
    assert "| oracle |" in md and md.count("\n| ") == 1 + 6  # header + one row per method
    rows = csv.splitlines()
    assert rows[0] == "method,sentiment,nli,qa,multitask_score,multitask_lo,multitask_hi" and len(rows) == 7
    cell = json.loads(runs.cell_path(run, "svd", "qa").read_text())
    assert cell["meta"]["data_hash"] == meta["data_hash"] and len(cell["fingerprint"]["merge"]["adapters"]) == 3
    records = [json.loads(x) for x in runs.predictions_path(run, "moa", "nli").read_text().splitlines()]
    assert len(records) == 6
    assert {"id", "prompt", "prediction", "reference", "metric", "score", "routed_task"} <= set(records[0])
    assert records[0]["routed_task"] in TASKS
    assert sum(s["routing"]["moa"]["confusion"]["nli"].values()) == 6
    per_layer = s["routing"]["moa"]["per_layer"]["nli"]     # each layer's choice, as a share of the prompts
    assert len(per_layer) == len(s["routing"]["moa"]["layers"]) and all(sum(row) == pytest.approx(1) for row in per_layer)
    assert (run / "merged" / "svd" / "adapter_model.safetensors").is_file()


def test_rerun_reuses_cells_resumes_and_force_recomputes(tiny_run, monkeypatch):
    run = tiny_run["run"]
    calls = []
    real = ev.evaluate_task
    monkeypatch.setattr(ev, "evaluate_task", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    before = scores_of(run)
    with monkeypatch.context() as m:
        m.setattr(full_evaluation, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
        assert evaluate(tiny_run["argv"]) == 0
    assert calls == []                                       # every cell reused, no model loaded
    assert scores_of(run) == before
    runs.cell_path(run, "concat", "nli").unlink()              # as if interrupted before this cell
    assert evaluate(tiny_run["argv"]) == 0
    assert calls == ["nli"]
    assert scores_of(run) == before
    calls.clear()
    assert evaluate([*tiny_run["argv"], "--methods", "svd", "--force"]) == 0
    assert sorted(calls) == sorted(TASKS * 3)                # oracle, svd, base
    assert scores_of(run)["svd"] == before["svd"]


def test_changed_setting_recomputes_only_affected_cells(tiny_run, monkeypatch, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    calls = []
    real = ev.evaluate_task
    monkeypatch.setattr(ev, "evaluate_task", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    argv = [*tiny_run["argv"], "--output-dir", str(run), "--methods", "ties", "--density", "0.5"]
    assert evaluate(argv) == 0
    assert len(calls) == 3                                   # only ties is new
    calls.clear()
    assert evaluate([*argv[:-1], "0.7"]) == 0                # another density: ties again, nothing else
    assert len(calls) == 3
    assert json.loads((run / "merged" / "ties" / "merge_info.json").read_text())["recipe"]["options"]["density"] == 0.7


def test_cells_held_by_another_process_are_waited_for_not_recomputed(tiny_run, monkeypatch, tmp_path):
    """Two processes on one run folder share its cells: a cell whose lock another holds is
    left to it, and read once that one has finished it."""
    import threading
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    finished = json.loads(runs.cell_path(run, "concat", "nli").read_text())
    runs.cell_path(run, "concat", "nli").unlink()
    calls = []
    real = ev.evaluate_task
    monkeypatch.setattr(ev, "evaluate_task", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    other = runs.file_lock(runs.cell_lock(run, "concat", "nli"))   # "the other process"
    assert other.__enter__() is True

    def the_other_finishes():
        runs.save_cell(run, "concat", "nli", finished["fingerprint"], {k: finished[k] for k in finished
                     if k not in ("method", "task", "fingerprint", "meta")}, finished["meta"])
        other.__exit__(None, None, None)

    timer = threading.Timer(1.0, the_other_finishes)
    timer.start()
    assert evaluate([*tiny_run["argv"], "--output-dir", str(run)]) == 0
    timer.join()
    assert calls == []                                       # waited for, then read
    assert summary_of(run)["methods"]["concat"]["per_task"]["nli"]["metrics"] == finished["result"]["metrics"]
    with runs.file_lock(runs.cell_lock(run, "concat", "nli"), wait=False) as free:
        assert free                                          # nothing left locked


def test_reuse_from_takes_matching_cells_of_another_run(tiny_run, monkeypatch, tmp_path):
    """A 2-task table on the same adapters takes base and oracle from the 3-task run; its
    merges (over other adapters) are computed."""
    run = tmp_path / "run2"
    for t in TASKS[:2]:
        shutil.copytree(tiny_run["run"] / "adapters" / t, run / "adapters" / t)
    calls = []
    real = ev.evaluate_task
    monkeypatch.setattr(ev, "evaluate_task", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    argv = [*tiny_run["argv"], "--output-dir", str(run), "--tasks", ",".join(TASKS[:2]), "--methods", "concat",
            "--reuse-from", str(tiny_run["run"])]
    assert evaluate(argv) == 0
    assert sorted(t for _, t in calls) == sorted(TASKS[:2])  # concat only
    s, ref = summary_of(run), summary_of(tiny_run["run"])
    for m in ("base", "oracle"):
        for t in TASKS[:2]:
            assert s["methods"][m]["per_task"][t]["metrics"] == ref["methods"][m]["per_task"][t]["metrics"]
            assert runs.predictions_path(run, m, t).read_text() == runs.predictions_path(tiny_run["run"], m, t).read_text()
    assert evaluate([*argv[:-1], str(tmp_path / "nowhere")]) == 2


# --------------------------------------------------------------------------- generation

def random_lora(model, seed, rank=4):
    return trained_like_adapter(model, seed, rank, std=0.3)


def prompt_ids(tok, examples_by_task):
    return [T.encode_prompt(tok, T.TASKS[t].prompt(ex), 400) for t, exs in examples_by_task.items() for ex in exs]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_folded_generation_equals_lora_layers_and_restores_weights(arch, tiny_run):
    tok, model = tiny_run["tok"], tiny_model(arch)
    adapter = random_lora(model, 1)
    ids = prompt_ids(tok, tiny_run["examples"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with folded(model, adapter):
        assert not lora_layers(model)
        in_w = ev.generate(model, tok, ids, batch_size=5, max_new_tokens=12).token_ids
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    apply_adapter(model, adapter)
    layered = ev.generate(model, tok, ids, batch_size=5, max_new_tokens=12).token_ids
    unload_lora(model)
    plain = ev.generate(model, tok, ids, batch_size=5, max_new_tokens=12).token_ids
    assert in_w == layered
    assert in_w != plain


def test_moa_oracle_mode_equals_oracle(tiny_run):
    tok, model = tiny_run["tok"], tiny_model("qwen2")
    adapters = run_adapters(tiny_run["run"])
    settings = ev.Settings(max_new_tokens=8, batch_size=4)
    expected = {}
    for t in TASKS:
        with folded(model, adapters[t]):
            expected[t] = ev.evaluate_task(model, tok, t, tiny_run["examples"][t], settings)
    moa = MixtureOfLoRAs.load(model, runs.moa_dir(tiny_run["run"]), adapters)
    for t in TASKS:
        forced = torch.full((len(tiny_run["examples"][t]),), moa.tasks.index(t))
        got = ev.evaluate_task(model, tok, t, tiny_run["examples"][t], settings, router=moa, experts=forced)
        assert [r["prediction"] for r in got["records"]] == [r["prediction"] for r in expected[t]["records"]]
        assert got["result"] == expected[t]["result"]
        assert {r["routed_task"] for r in got["records"]} == {t}
    moa.remove()


def test_mixed_moa_batches_equal_batch_size_one(tiny_run):
    tok, model = tiny_run["tok"], tiny_model("qwen2")
    adapters = run_adapters(tiny_run["run"])
    moa = MixtureOfLoRAs.load(model, runs.moa_dir(tiny_run["run"]), adapters)
    ids = prompt_ids(tok, tiny_run["examples"])
    batched = ev.generate(model, tok, ids, batch_size=len(ids), max_new_tokens=10, router=moa)
    single = ev.generate(model, tok, ids, batch_size=1, max_new_tokens=10, router=moa)
    assert len({r["routed_task"] for r in batched.routing}) > 1                      # the batch really mixes experts
    assert batched.routing == single.routing
    assert batched.token_ids == single.token_ids
    moa.remove()


def test_likelihood_scoring_picks_the_most_likely_label(tiny_run):
    tok, model = tiny_run["tok"], tiny_model("llama")
    adapter = random_lora(model, 2)
    exs = tiny_run["examples"]["nli"]
    settings = ev.Settings(score_by="likelihood", batch_size=4)
    with folded(model, adapter):
        cell = ev.evaluate_task(model, tok, "nli", exs, settings)
        # reference: one unpadded full forward per (example, label)
        for rec, ex in zip(cell["records"], exs):
            p = T.encode_prompt(tok, T.TASKS["nli"].prompt(ex), 400)
            ref = {}
            for lab in T.NLI_LABELS:
                target = ev.label_ids(tok, lab)
                logp = torch.log_softmax(model(torch.tensor([p + target])).logits[0].float(), -1)
                ref[lab] = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(target))
            assert rec["label_logprobs"] == pytest.approx(ref, abs=1e-4)
            assert rec["prediction"] == max(ref, key=ref.get)
    # free-text tasks ignore --score-by likelihood and generate
    qa = ev.evaluate_task(model, tok, "qa", tiny_run["examples"]["qa"], settings)
    assert "label_logprobs" not in qa["records"][0]


def test_moa_likelihood_routes_like_generation(tiny_run):
    tok, model = tiny_run["tok"], tiny_model("qwen2")
    adapters = run_adapters(tiny_run["run"])
    moa = MixtureOfLoRAs.load(model, runs.moa_dir(tiny_run["run"]), adapters)
    exs = tiny_run["examples"]["sentiment"]
    lik = ev.evaluate_task(model, tok, "sentiment", exs, ev.Settings(score_by="likelihood", batch_size=4), router=moa)
    gen = ev.evaluate_task(model, tok, "sentiment", exs, ev.Settings(max_new_tokens=2, batch_size=4), router=moa)
    moa.remove()
    assert [r["routed_task"] for r in lik["records"]] == [r["routed_task"] for r in gen["records"]]
    assert all(r["prediction"] in T.SENTIMENT_LABELS for r in lik["records"])


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case, message", [
    ("unknown_method", "unknown method 'nope'; known: base, oracle, moa, moa_study, arrow, lora_mixer, lora_mixer_finetune, lora_mixer_joint, lorahub, lorahub_task, t2l, t2l_zeroshot, concat"),
    ("missing_adapter", "no adapter for task qa"),
    ("missing_moa", "no RUN/moa"),
    ("missing_task_data", "no data folder for task qa"),
    ("merge_that_cannot_be_built", "ties: rank applies to space 'delta' only"),
])
def test_bad_input_exits_2_with_one_line_and_no_summary(case, message, tiny_run, tmp_path, capsys):
    run, data = tmp_path / "run", tiny_run["data"]
    shutil.copytree(tiny_run["run"] / "adapters", run / "adapters")
    methods = "concat"
    if case == "unknown_method":
        methods = "concat,nope"
    elif case == "missing_adapter":
        shutil.rmtree(run / "adapters" / "qa")
    elif case == "missing_moa":
        methods = "moa"
        message = f"no {run / 'moa'}/moa_config.json"
    elif case == "missing_task_data":
        data = write_data(tmp_path / "data", ["sentiment", "nli"])
    argv = ["--model", str(tiny_run["model_dir"]), "--output-dir", str(run), "--tasks", ",".join(TASKS),
            "--methods", methods, "--data-dir", str(data), *FLAGS]
    if case == "merge_that_cannot_be_built":      # fails in the build step, after concat was built
        argv[argv.index("--methods") + 1] = "concat,ties"
        argv += ["--rank", "4"]
    capsys.readouterr()
    assert evaluate(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (run / "eval").exists() and not (run / "merged").exists()


def test_driver_runs_evaluation_then_plots(tiny_run, tmp_path):
    import subprocess

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    env = {**os.environ, "MODEL": str(tiny_run["model_dir"]), "RUN": str(run), "TASKS": ",".join(TASKS),
           "DATA": str(tiny_run["data"]), "METHODS": "moa,concat,weight_sum,svd", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "run_all_evaluation.sh"), *FLAGS], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "18 cells reused, 0 to compute" in out.stderr
    assert (run / "plots" / "multitask_score.png").is_file() and "| oracle |" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "run_all_evaluation.sh"), "--methods", "nope"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_eval_size_is_capped_at_what_local_data_holds(tiny_run, capsys):
    data = T.load_capped(["sentiment", "qa"], "validation", "dir", tiny_run["data"], 100, seed=0)
    assert [len(v) for v in data.values()] == [6, 6]
    assert "holds 6 validation examples of task sentiment; using them all (--eval-size 100)" in capsys.readouterr().err
    sub = T.load_capped(["sentiment"], "validation", "dir", tiny_run["data"], 4, seed=0)["sentiment"]
    assert sub == T.load_examples("sentiment", "validation", "dir", tiny_run["data"], 4, seed=0)


# --------------------------------------------------------------------------- analysis

def test_cosine_from_factors_equals_dense_cosine():
    model = tiny_model("qwen2")
    ads = {f"t{i}": random_lora(model, i, rank=2 + i) for i in range(3)}
    got = cosine_matrices(ads)

    def dense(ad, m):  # s B A, formed explicitly, in float64
        a, b = ad.factors[m]
        return b.double() @ a.double() * ad.scales[m]

    def flat(ad, modules):
        return torch.cat([dense(ad, m).flatten() for m in modules])

    for i, a in enumerate(ads.values()):
        for j, b in enumerate(ads.values()):
            x, y = flat(a, sorted(a.factors)), flat(b, sorted(a.factors))
            assert got["overall"][i][j] == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-10)
            layer0 = [m for m in sorted(a.factors) if ".layers.0." in m]
            x, y = flat(a, layer0), flat(b, layer0)
            assert got["per_layer"]["0"][i][j] == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-10)
    m = next(iter(ads["t0"].factors))
    (a1, b1), (a2, b2) = ads["t0"].factors[m], ads["t1"].factors[m]
    inner = float((dense(ads["t0"], m) * dense(ads["t1"], m)).sum())
    assert factor_inner(a1, b1, ads["t0"].scales[m], a2, b2, ads["t1"].scales[m]) == pytest.approx(inner, rel=1e-9)


def test_analysis_plots_and_notebook_run_headless(tiny_run, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    from src import analysis

    run = tiny_run["run"]
    assert evaluate(tiny_run["argv"]) == 0     # the plots draw summary.json: the fixture's (an earlier test left svd's)
    second = tmp_path / "second"
    shutil.copytree(run / "eval", second / "eval")
    assert run_main(analysis.main, [str(run), str(second), "--out", str(tmp_path / "cmp")]) == 0
    for name in ("cosine_overall", "cosine_per_layer", "multitask_score", "per_task_metrics", "routing_moa"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "comparison_multitask.png").is_file()
    cos = json.loads((run / "analysis" / "cosine.json").read_text())
    assert cos["tasks"] == TASKS and cos["overall"][0][0] == pytest.approx(1.0)

    nb = nbformat.read(ROOT / "visualize_lora.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    os.environ["RUN_DIR"] = str(run)
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["RUN_DIR"]
    text = "".join(str(o.get("text", "")) + json.dumps(o.get("data", {})) for c in nb.cells for o in c.get("outputs", []))
    assert "multitask" in text.lower() and "oracle" in text


# --------------------------------------------------------------------------- scoring protocols

def test_both_protocols_are_written_and_rescoring_gives_the_same(tiny_run, tmp_path):
    run = tiny_run["run"]
    study = json.loads((run / "eval" / "summary_study.json").read_text())
    toolkit = summary_of(run)
    assert study["scoring"] == "study" and toolkit["scoring"] == "toolkit"
    assert "scoring: study" in (run / "eval" / "results_study.md").read_text()
    cell = json.loads(runs.cell_path(run, "concat", "qa").read_text())
    again = ev.score_records("qa", cell["records"], "study")
    assert again.pop("per_example") == [r["score_study"] for r in cell["records"]]
    assert again == cell["results"]["study"]
    # a committed results folder keeps summary + predictions only: rescoring rebuilds both tables
    copy = tmp_path / "committed"
    shutil.copytree(run / "eval" / "predictions", copy / "eval" / "predictions")
    shutil.copy(run / "eval" / "summary.json", copy / "eval" / "summary.json")
    assert ev.main(["rescore", str(copy)]) is None
    for name in ("summary.json", "summary_study.json"):
        redone = json.loads((copy / "eval" / name).read_text())
        original = json.loads((run / "eval" / name).read_text())
        for m in original["methods"]:
            assert redone["methods"][m]["multitask_score"] == original["methods"][m]["multitask_score"], (name, m)
            for t in TASKS:
                assert redone["methods"][m]["per_task"][t]["metrics"] == original["methods"][m]["per_task"][t]["metrics"]


def test_moa_study_decodes_at_batch_one_and_redecides_every_step(tiny_run):
    """The registry's moa_study = MoA with per-step re-decision (layer rule), one prompt at a time."""
    tok, model = tiny_run["tok"], tiny_model("qwen2")
    env = compose.Env(tiny_run["run"], TASKS)
    compose.check_all(["moa_study"], env)
    method = compose.REGISTRY["moa_study"]
    assert method.max_batch == 1
    settings = ev.Settings(max_new_tokens=6, batch_size=1)
    ex = tiny_run["examples"]["nli"]
    with method.prepare(model, env, "nli") as moa:
        assert moa.cfg.redecide_every_step and moa.cfg.inference == "layer"
        got = ev.evaluate_task(model, tok, "nli", ex, settings, router=moa)
    assert not moa.cfg.redecide_every_step                                           # restored on exit
    assert not any(type(m).__name__ == "ExpertLinear" for m in model.modules())     # and removed
    from src.moa import MoAConfig
    ref = MixtureOfLoRAs.load(model, runs.moa_dir(tiny_run["run"]), env.adapters)
    ref.cfg = MoAConfig(**{**vars(ref.cfg), "inference": "layer", "redecide_every_step": True})
    want = ev.evaluate_task(model, tok, "nli", ex, settings, router=ref)
    ref.remove()
    assert [r["raw"] for r in got["records"]] == [r["raw"] for r in want["records"]]


def test_prompts_and_new_tokens_must_fit_the_models_context():
    """issue 17: a --max-prompt-len + --max-new-tokens beyond max_position_embeddings is one clear line."""
    from types import SimpleNamespace

    import full_evaluation
    from src.errors import UserError
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))
    full_evaluation.check_context(model, SimpleNamespace(max_prompt_len=400, max_new_tokens=112))
    with pytest.raises(UserError, match=r"--max-prompt-len 400 \+ --max-new-tokens 128 = 528 tokens is more than "
                                         r"the model's context of 512 \(max_position_embeddings\)"):
        full_evaluation.check_context(model, SimpleNamespace(max_prompt_len=400, max_new_tokens=128))
