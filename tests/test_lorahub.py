"""LoraHub: the composition, the search, the side path, and the method through full_evaluation."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from src.errors import UserError
from src.lora import apply_adapter, folded, save_adapter, unload_lora
from src.lorahub import Composer, LoraHubConfig, ShotLoss, SidePath, l1_penalty, scale_search, search
from src.merging import merge_adapters
from src.tasks import load_examples
from fixture_run import eval_command, fixture_run
from tiny import random_adapter, tiny_model, tiny_tokenizer

TASKS = ["sentiment", "nli", "qa"]


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    ads = [random_adapter(model, 10 + i, rank=4, name=t, std=0.3) for i, t in enumerate(TASKS)]
    shots = [ex for t in TASKS for ex in load_examples(t, "train", "sample", None, 3, 0)]
    return model, tok, ads, ShotLoss(model, tok, shots, max_len=128, batch_size=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("space", ["factor", "delta"])
def test_one_hot_weights_reproduce_that_adapter(setup, space):
    model, _, ads, _ = setup
    ids = torch.randint(2, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    method = "weight_sum" if space == "factor" else "concat"
    for k, ad in enumerate(ads):
        onehot = [1.0 if i == k else 0.0 for i in range(len(ads))]
        merged = merge_adapters(ads, method, onehot)
        for n in ad.factors:                                       # the adapter, exactly
            torch.testing.assert_close(merged.delta(n), ad.delta(n), rtol=0, atol=1e-6)
        apply_adapter(model, ad)
        want = _logits(model, ids)
        unload_lora(model)
        composer = Composer(ads, space)
        side = SidePath(model, composer.ranks())
        composer.write(side, onehot)
        got = _logits(model, ids)
        side.remove()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("space", ["factor", "delta"])
def test_side_path_loss_equals_the_folded_merge(setup, space):
    """A candidate scored through the side path = the merged adapter folded into the weights."""
    model, _, ads, loss = setup
    w = [0.7, -0.4, 1.2]
    composer = Composer(ads, space)
    side = SidePath(model, composer.ranks())
    composer.write(side, w)
    ours = loss()
    side.remove()
    with folded(model, merge_adapters(ads, "weight_sum" if space == "factor" else "concat", w)):
        want = loss()
    assert abs(ours - want) < 1e-5 * abs(want)
    assert not any(isinstance(m, type(side).__mro__[0]) for m in model.modules())


def test_search_is_seeded_and_never_worse_than_its_start():
    target = torch.tensor([0.8, -0.5, 0.3])

    def f(w):
        return float(((torch.tensor(w) - target) ** 2).sum())
    a = search(f, 3, 25, (-1.5, 1.5), 0.05, seed=3)
    b = search(f, 3, 25, (-1.5, 1.5), 0.05, seed=3)
    assert a.trace == b.trace and a.weights == b.weights
    r1, r2, r3 = (search(f, 3, 10, (-1.5, 1.5), 0.05, seed=s, optimizer="RandomSearch") for s in (3, 3, 4))
    assert r1.trace == r2.trace and r1.trace != r3.trace                # a random optimizer follows the seed
    assert r1.loss <= r1.start_loss
    assert a.trace[0]["weights"] == [0.0, 0.0, 0.0]                    # the start is candidate 1
    assert a.loss <= a.start_loss and a.loss == min(t["objective"] for t in a.trace)
    assert a.loss < 0.5 * a.start_loss                                 # it found something
    assert all(-1.5 <= x <= 1.5 for t in a.trace for x in t["weights"])
    assert abs(a.trace[3]["objective"] - a.trace[3]["loss"] - l1_penalty(a.trace[3]["weights"], 0.05)) < 1e-12


def test_search_on_a_model_lowers_the_shot_loss_toward_the_right_adapter(setup):
    """Shots of task qa, scored with qa's adapter as the "truth": the search moves toward it."""
    model, tok, ads, _ = setup
    ex = load_examples("qa", "train", "sample", None, 4, 0)
    loss = ShotLoss(model, tok, ex, max_len=128)
    composer = Composer(ads, "factor")
    side = SidePath(model, composer.ranks())
    try:
        found = search(lambda w: (composer.write(side, w), loss())[1], 3, 12, (-1.5, 1.5), 0.0, seed=0)
    finally:
        side.remove()
    assert found.loss <= found.start_loss
    assert found.trace[0]["loss"] == pytest.approx(loss(), rel=1e-6)   # start = the base model


def test_scale_search_picks_the_grid_point_with_the_lowest_loss(setup):
    model, _, ads, loss = setup
    merged = merge_adapters(ads, "concat")
    found = scale_search(model, merged, loss, [0.0, 0.5, 1.0])
    assert found["losses"][0] == pytest.approx(loss(), rel=1e-6)      # scale 0 = the base model
    assert found["chosen"] == [0.0, 0.5, 1.0][min(range(3), key=found["losses"].__getitem__)]
    with folded(model, merged):
        assert found["losses"][2] == pytest.approx(loss(), rel=1e-5)


def test_factor_space_refuses_mixed_ranks_naming_them(setup):
    model, _, ads, _ = setup
    small = random_adapter(model, 99, rank=2, name="qa")
    with pytest.raises(UserError, match=r"lorahub in factor space needs adapters of equal ranks; module .*: "
                                        r"sentiment \(4\), nli \(4\), qa \(2\) \(use --lorahub-space delta\)"):
        Composer([*ads[:2], small], "factor")
    assert Composer([*ads[:2], small], "delta").ranks()[next(iter(small.factors))] == 10


@pytest.mark.parametrize("kw, msg", [
    ({"lorahub_budget": 0}, "--lorahub-budget must be at least 1, got 0"),
    ({"lorahub_shots": 0}, "--lorahub-shots must be at least 1, got 0"),
    ({"lorahub_bounds": (1.0, -1.0)}, "--lorahub-bounds: the lower bound must be below the upper, got 1.0 -1.0"),
    ({"lorahub_bounds": (0.0, float("nan"))}, "--lorahub-bounds must be a finite number, got nan"),
    ({"lorahub_l1": -1.0}, "--lorahub-l1 must be >= 0, got -1.0"),
])
def test_config_refuses_bad_values(kw, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        LoraHubConfig(**kw)


# --------------------------------------------------------------------------- through full_evaluation

_cmd = eval_command


@pytest.fixture()
def run(tmp_path):
    return fixture_run(tmp_path)


def test_lorahub_and_auto_scale_search_on_training_shots_only(run):
    """Both scopes and --merge-scale auto: cached with their trace, reused on rerun, and every
    shot is a training example that no cell evaluates, even when evaluating on the train split."""
    folder, go = run
    for split in ("validation", "train"):
        out = go("--methods", "lorahub,lorahub_task,knots", "--lorahub-budget", "4", "--lorahub-shots", "2",
                 "--merge-scale", "auto", "--merge-scale-grid", "0.5", "1", "--split", split)
        assert out.returncode == 0, out.stderr[-3000:]
        train_ids = {t: {ex.id for ex in load_examples(t, "train", "sample")} for t in TASKS}
        evaluated = {t: {json.loads(x)["id"] for m in ("lorahub", "knots") for x in
                         (folder / "eval" / "predictions" / m / f"{t}.jsonl").read_text().splitlines()}
                     for t in TASKS}
        info = json.loads((folder / "merged" / "lorahub" / "merge_info.json").read_text())
        scaled = json.loads((folder / "merged" / "knots" / "merge_info.json").read_text())
        per_task = {t: json.loads((folder / "merged" / "lorahub_task" / t / "merge_info.json").read_text())
                    for t in TASKS}
        for t in TASKS:
            for ids in (info["search"]["shot_ids"][t], scaled["scale_search"]["shot_ids"][t],
                        per_task[t]["search"]["shot_ids"][t]):
                assert len(ids) == 2 and set(ids) <= train_ids[t] and not set(ids) & evaluated[t], (split, t)
            assert list(per_task[t]["search"]["shot_ids"]) == [t]
        assert len(info["search"]["trace"]) == 4 and info["search"]["objective"] <= info["search"]["start_objective"]
        assert scaled["scale_search"]["chosen"] in (0.5, 1.0)
    from src import analysis
    found = analysis.search_records(folder)
    assert sorted((r["method"], r["target"] or "", r["kind"]) for r in found) == sorted(
        [("lorahub", "", "weights"), ("knots", "", "scale")] + [("lorahub_task", t, "weights") for t in TASKS])
    assert "searches.png" in {p.name for p in analysis.plot_run(folder, cosines=False)}
    (folder / "eval" / "cells" / "lorahub" / "qa.json").unlink()
    again = go("--methods", "lorahub,lorahub_task,knots", "--lorahub-budget", "4", "--lorahub-shots", "2",
               "--merge-scale", "auto", "--merge-scale-grid", "0.5", "1", "--split", "train")
    assert "1 to compute" in again.stderr and "lorahub: reused" in again.stderr, again.stderr[-2000:]


@pytest.mark.parametrize("extra, msg", [
    (["--lorahub-budget", "0"], "error: --lorahub-budget must be at least 1, got 0"),
    (["--lorahub-shots", "0"], "error: --lorahub-shots must be at least 1, got 0"),
    (["--lorahub-shots", "41"], "error: --lorahub-shots 41: the training split of task sentiment holds only 40 "
                                "examples that are not evaluated"),
    (["--lorahub-bounds", "1", "-1"], "error: --lorahub-bounds: the lower bound must be below the upper, got 1.0 -1.0"),
    (["--merge-scale", "nan"], "error: --merge-scale must be a finite number or 'auto', got nan"),
])
def test_bad_input_one_line_exit_2_nothing_written(run, extra, msg, monkeypatch, capsys):
    import full_evaluation
    from src.errors import run_main
    folder, _ = run
    monkeypatch.chdir(folder.parent)                   # in-process: the same command, without a new Python
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    capsys.readouterr()
    rc = run_main(full_evaluation.main, _cmd("--methods", "lorahub,knots", *extra)[2:])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [msg], err[-2000:]
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_mixed_ranks_refused_in_factor_space_naming_adapters(run):
    folder, go = run
    small = random_adapter(tiny_model("qwen2"), 5, rank=2, name="qa")
    shutil.rmtree(folder / "adapters" / "qa")
    save_adapter(small, folder / "adapters" / "qa")
    out = go("--methods", "lorahub")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1
    assert "lorahub in factor space needs adapters of equal ranks" in lines[0] and "qa (2)" in lines[0]
    assert not (folder / "merged").exists()
