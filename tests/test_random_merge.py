"""random_merge, LoraHub's control: seeded uniform draws from LoraHub's bounds, each composed as
LoraHub composes, every draw evaluated and pooled into one cell (mean, per-draw scores, spread),
through full_evaluation and the rescoring of saved predictions."""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from src import compose, merging, systems  # noqa: F401 (systems: every method registered)
from src import evaluation as ev
from src.lorahub import LoraHubConfig, RandomMergeConfig, draw_weights
from src.retrieval import RetrievalConfig
from src.tasks import SCORING, clean_prediction, get_task, load_examples
from fixture_run import eval_command, fixture_run

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
TASKS = ["sentiment", "nli", "qa"]


# --------------------------------------------------------------------------- the draws

def test_draws_are_uniform_in_the_bounds_and_seeded():
    w = draw_weights(100, 3, (-1.5, 0.5), seed=7)
    flat = [x for row in w for x in row]
    assert len(w) == 100 and all(len(r) == 3 for r in w)
    assert all(-1.5 <= x <= 0.5 for x in flat) and abs(statistics.fmean(flat) + 0.5) < 0.1
    assert draw_weights(100, 3, (-1.5, 0.5), seed=7) == w                     # deterministic for a seed
    assert draw_weights(4, 3, (-1.5, 0.5), seed=7) == w[:4]                   # more draws extend the list
    assert draw_weights(4, 3, (-1.5, 0.5), seed=8) != w[:4]


def env_for(run, options, seed=0):
    env = compose.Env(run, TASKS, dict(options), seed=seed)
    compose.check_all(["random_merge"], env)
    return env


@pytest.mark.parametrize("space, method", [("factor", "weight_sum"), ("delta", "concat")])
def test_each_draw_is_lorahubs_merge_with_those_weights_cached_and_reused(tmp_path, space, method):
    shutil.copytree(FIXTURE, tmp_path / "run")
    opts = {RandomMergeConfig: RandomMergeConfig(random_draws=3), LoraHubConfig: LoraHubConfig(lorahub_space=space)}
    env = env_for(tmp_path / "run", opts)
    built = compose.build_all(["random_merge"], env)["random_merge"]
    assert not built.reused and len(built.value) == 3
    ads = [env.adapters[t] for t in TASKS]
    for i, (w, made) in enumerate(zip(draw_weights(3, 3, (-1.5, 1.5), 0), built.value)):
        info = json.loads((tmp_path / "run" / "merged" / "random_merge" / f"draw_{i}" / "merge_info.json").read_text())
        assert list(info["recipe"]["weights"].values()) == w and info["composed_as"] == method
        want = merging.merge_adapters(ads, method, w)
        for n in want.factors:
            torch.testing.assert_close(made.delta(n), want.delta(n), rtol=0, atol=1e-6)
    again = compose.build_all(["random_merge"], env_for(tmp_path / "run", opts))["random_merge"]
    assert again.reused
    for a, b in zip(built.value, again.value):
        assert all(torch.equal(a.delta(n), b.delta(n)) for n in a.factors)
    other = compose.build_all(["random_merge"], env_for(tmp_path / "run", opts, seed=1))["random_merge"]
    assert not other.reused
    n = next(iter(other.value[0].factors))
    assert not torch.equal(other.value[0].delta(n), built.value[0].delta(n))


def test_fingerprint_changes_with_each_option_and_nothing_else(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")

    def fp(draws=None, hub=None, seed=0, other=None):
        env = compose.Env(tmp_path / "run", TASKS, {RandomMergeConfig: RandomMergeConfig(**(draws or {})),
                                                    LoraHubConfig: LoraHubConfig(**(hub or {})), **(other or {})},
                          seed=seed)
        env.load_adapters(TASKS)
        return json.dumps(compose.fingerprint("random_merge", "qa", env, {}), sort_keys=True)
    ref = fp()
    changed = [fp({"random_draws": 2}), fp(hub={"lorahub_bounds": (-1.0, 1.0)}), fp(hub={"lorahub_space": "delta"}),
               fp(seed=1)]
    assert len({ref, *changed}) == len(changed) + 1
    for unused in ({"lorahub_budget": 3}, {"lorahub_shots": 2}, {"lorahub_l1": 0.0}, {"lorahub_optimizer": "CMA"},
                   {"lorahub_leave_out": True}, {"lorahub_batch_size": 2}, {"lorahub_max_len": 64}):
        assert fp(hub=unused) == ref, unused
    assert fp(other={RetrievalConfig: RetrievalConfig(retrieval_top_k=2)}) == ref


# --------------------------------------------------------------------------- pooling the draws

def body(task, examples, raws):
    """An evaluate_task body for these raw generations (every protocol scored, as evaluation does)."""
    t = get_task(task)
    records = [{"id": ex.id, "task": task, "prompt": "", "prediction": clean_prediction(t, r), "raw": r,
                "reference": ex.target, "metric": t.primary} for ex, r in zip(examples, raws)]
    results = {}
    for p in SCORING:
        res = ev.score_records(task, records, p)
        for rec, v in zip(records, res.pop("per_example")):
            rec["score" if p == "toolkit" else "score_study"] = float(v)
        results[p] = res
    return {"task": task, "n": len(records), "result": results["toolkit"], "results": results, "records": records,
            "seconds": 1.0, "new_tokens": 0, "tokens_per_s": None}


def test_a_pooled_cell_reports_the_mean_each_draw_and_their_spread():
    ex = {t: load_examples(t, "validation", "sample", None, 4, 0) for t in ("sentiment", "nli")}

    def right(t, k):                   # the first k examples answered right, the others wrong
        wrong = {"positive": "negative", "negative": "positive"} if t == "sentiment" else None
        return [e.target if i < k else (wrong[e.target] if wrong else
                                        ("neutral" if e.target != "neutral" else "entailment"))
                for i, e in enumerate(ex[t])]
    draws = {"sentiment": [4, 2, 1], "nli": [3, 3, 0]}
    cells = {("oracle", t): body(t, ex[t], right(t, 4)) for t in ex}
    for t in ex:
        cells[("random_merge", t)] = ev.pool_draws([body(t, ex[t], right(t, k)) for k in draws[t]],
                                                   [{"weights": {"a": i}} for i in range(3)])
    pooled = cells[("random_merge", "sentiment")]
    assert pooled["n"] == 4 and len(pooled["records"]) == 12
    assert [r["draw"] for r in pooled["records"]] == [0] * 4 + [1] * 4 + [2] * 4
    assert pooled["result"]["score"] == pytest.approx(statistics.fmean([1.0, 0.5, 0.25]))
    assert pooled["result"]["draws"] == {"scores": [1.0, 0.5, 0.25], "min": 0.25, "max": 1.0,
                                         "std": pytest.approx(statistics.stdev([1, .5, .25]))}
    assert pooled["result"]["metrics"]["accuracy"] == pooled["result"]["score"]
    assert [d["weights"] for d in pooled["draws"]] == [{"a": 0}, {"a": 1}, {"a": 2}]
    for t in ex:                                       # saved predictions rescore to the same pooled results
        again = ev.rescored_cell(t, cells[("random_merge", t)]["records"])
        assert again["results"] == cells[("random_merge", t)]["results"] and again["n"] == 4

    meta = {"config": {}, "seed": 0, "git_commit": None, "data_hash": "0" * 16, "command": "test"}
    summary = ev.summarize("m", ["sentiment", "nli"], ["oracle", "random_merge"], cells, meta)
    entry = summary["methods"]["random_merge"]
    each = [(s / 1.0 + n / 1.0) / 2 for s, n in zip([1.0, 0.5, 0.25], [0.75, 0.75, 0.0])]
    assert entry["draws"]["multitask_scores"] == pytest.approx(each)
    assert entry["multitask_score"] == pytest.approx(statistics.fmean(each))           # the mean of the draws'
    assert entry["draws"]["min"] == pytest.approx(min(each)) and entry["draws"]["n"] == 3
    assert entry["per_task"]["nli"]["draws"]["scores"] == [0.75, 0.75, 0.0]
    lo, hi = entry["multitask_interval"]
    assert lo <= entry["multitask_score"] <= hi and "draws" not in summary["methods"]["oracle"]
    assert "random_merge: the mean over 3 seeded draws; each draw's multitask score 0.125-0.875" \
        in ev.results_markdown(summary)
    for t in ex:                                       # every oracle at 0: no multitask score to spread
        cells[("oracle", t)] = body(t, ex[t], right(t, 0))
    zero = ev.summarize("m", ["sentiment", "nli"], ["oracle", "random_merge"], cells, meta)
    assert zero["methods"]["random_merge"]["draws"] == {"n": 3, "tasks": [], "multitask_scores": None, "std": None,
                                                        "min": None, "max": None}
    assert "random_merge: the mean over 3 seeded draws (each draw's scores: summary.json)" in ev.results_markdown(zero)


# --------------------------------------------------------------------------- through full_evaluation

def _cmd(*extra):
    return eval_command("--score-by", "likelihood", *extra, eval_size=8, batch_size=8)


def _copy(tmp_path, name):
    return fixture_run(tmp_path / name, "--score-by", "likelihood", eval_size=8, batch_size=8)


def test_random_merge_through_full_evaluation_is_deterministic_for_a_seed(tmp_path):
    folder, go = _copy(tmp_path, "a")
    out = go("--methods", "random_merge", "--random-draws", "2", "--lorahub-bounds", "-1", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mean of 2 draws" in out.stderr
    cell = json.loads((folder / "eval" / "cells" / "random_merge" / "qa.json").read_text())
    weights = [d["weights"] for d in cell["draws"]]
    assert [list(w.values()) for w in weights] == draw_weights(2, 3, (-1.0, 1.0), 0)
    for i, w in enumerate(weights):
        info = json.loads((folder / "merged" / "random_merge" / f"draw_{i}" / "merge_info.json").read_text())
        assert info["recipe"]["weights"] == w
    preds = (folder / "eval" / "predictions" / "random_merge" / "qa.jsonl").read_text().splitlines()
    assert [json.loads(x)["draw"] for x in preds] == [0] * 8 + [1] * 8
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    entry = summary["methods"]["random_merge"]
    assert len(entry["per_task"]["qa"]["draws"]["scores"]) == 2
    assert entry["draws"]["n"] == 2 and entry["draws"]["tasks"] == ["sentiment", "nli"]   # the oracle scores 0 on qa
    assert "random_merge: the mean over 2 seeded draws" in (folder / "eval" / "results.md").read_text()
    same = go("--methods", "random_merge", "--random-draws", "2", "--lorahub-bounds", "-1", "1")
    assert "0 to compute" in same.stderr
    more = go("--methods", "random_merge", "--random-draws", "3", "--lorahub-bounds", "-1", "1")
    assert "3 to compute" in more.stderr and "random_merge: built" in more.stderr
    other, go_b = _copy(tmp_path, "b")                    # another run folder, the same seed: the same predictions
    assert go_b("--methods", "random_merge", "--random-draws", "3", "--lorahub-bounds", "-1", "1").returncode == 0
    for t in TASKS:
        mine, theirs = (f / "eval" / "predictions" / "random_merge" / f"{t}.jsonl" for f in (folder, other))
        assert mine.read_text() == theirs.read_text()
    shutil.rmtree(folder / "eval" / "cells" / "random_merge")         # rescoring from the saved predictions alone
    before = json.loads((folder / "eval" / "summary.json").read_text())["methods"]["random_merge"]
    ev.rescore(folder)
    after = json.loads((folder / "eval" / "summary.json").read_text())["methods"]["random_merge"]
    assert after["draws"] == before["draws"] and after["per_task"]["qa"]["draws"] == before["per_task"]["qa"]["draws"]


@pytest.mark.parametrize("extra, msg", [
    (["--random-draws", "0"], "error: --random-draws must be a positive integer, got 0"),
    (["--lorahub-bounds", "1", "-1"], "error: --lorahub-bounds: the lower bound must be below the upper, got 1.0 -1.0"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, extra, msg, monkeypatch, capsys):
    import full_evaluation
    from src.errors import run_main
    folder, _ = _copy(tmp_path, "a")
    monkeypatch.chdir(folder.parent)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    capsys.readouterr()
    rc = run_main(full_evaluation.main, _cmd("--methods", "random_merge", *extra)[2:])
    assert rc == 2 and capsys.readouterr().err.strip().splitlines() == [msg]
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
