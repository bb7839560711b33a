"""The training lifecycle every script shares (src/stages.py): a `Recipe` driven by `run_recipe`."""
from __future__ import annotations

import json

import pytest
import torch

from src import runs, stages
from src.errors import UserError
from src.config import TrainConfig
from src.training import FitResult, TrainingDiverged


def _result(steps: int = 3) -> FitResult:
    return FitResult(steps=steps, best_val_loss=0.5, best_step=2, stopped_early=False, final_train_loss=0.7,
                     tokens=120, elapsed_s=1.234, params={"w": torch.zeros(1)})


class Toy:
    """Two stages (RUN/adapters/a, b); b diverges when asked; records what was set up and trained."""

    def __init__(self, run, diverge=(), knob=1):
        self.run, self.diverge, self.knob, self.setups, self.trained = run, set(diverge), knob, [], []

    def stages(self):
        return [stages.Stage(runs.adapter_dir(self.run, t), runs.checkpoint_dir(self.run, t), ("w.txt",), task=t)
                for t in ("a", "b")]

    def built_from(self, stage):
        return {"task": stage.task, "knob": self.knob}

    def setup(self, todo):
        self.setups.append([s.task for s in todo])

    def train(self, stage):
        if stage.task in self.diverge:
            raise TrainingDiverged(f"{stage.task}: loss is nan at step 2")
        self.trained.append(stage.task)
        return stages.Trained(_result(), {"task": stage.task, "selection_ids": [f"{stage.task}-1"], "seed": 0,
                                          "data_hash": None, "model": "m", "config": {"knob": self.knob}},
                              lambda folder: (folder / "w.txt").write_text(stage.task), f"{stage.task}: done")


def _cfg(run, **kw):
    return TrainConfig(output_dir=str(run), progress=False, **kw)


def test_run_recipe_trains_publishes_records_and_skips_what_is_built(tmp_path, capsys):
    run = tmp_path / "run"
    toy = Toy(run)
    assert stages.run_recipe(toy, run, _cfg(run), print) == []
    assert toy.setups == [["a", "b"]] and toy.trained == ["a", "b"]
    info = json.loads((runs.adapter_dir(run, "a") / stages.INFO_NAME).read_text())
    assert set(stages.RECORD_KEYS) <= set(info)                      # one schema for every stage
    assert info["selection_ids"] == ["a-1"] and info[stages.BUILT_FROM] == {"task": "a", "knob": 1}
    assert (info["steps"], info["best_step"], info["tokens"], info["elapsed_s"]) == (3, 2, 120, 1.23)
    assert "a: done" in capsys.readouterr().out and not (run / "checkpoints").exists()
    again = Toy(run)
    assert stages.run_recipe(again, run, _cfg(run), print) == []
    assert again.setups == [] and again.trained == []                 # nothing to train: nothing set up
    with pytest.raises(UserError, match=r"built from other inputs than now \(knob 1 -> 2\)"):
        stages.run_recipe(Toy(run, knob=2), run, _cfg(run), print)
    assert stages.selection_ids(run, ["a", "b", "c"], lambda info: None) == {"a": ["a-1"], "b": ["b-1"], "c": []}


def test_a_diverged_stage_is_named_and_the_others_still_publish(tmp_path, capsys):
    run = tmp_path / "run"
    assert stages.run_recipe(Toy(run, diverge={"a"}), run, _cfg(run), print) == ["a"]
    assert "error: a: loss is nan at step 2" in capsys.readouterr().err
    assert not runs.adapter_dir(run, "a").exists() and (runs.adapter_dir(run, "b") / "w.txt").read_text() == "b"


def test_a_record_without_the_schema_keys_is_a_bug_not_a_file():
    trained = stages.Trained(_result(), {"task": "a"}, lambda folder: None)
    with pytest.raises(ValueError, match="lacks selection_ids, seed, data_hash, model, config"):
        stages.record(trained, {})


def test_an_older_record_without_selection_ids_goes_to_the_rebuild_rule(tmp_path):
    run = tmp_path / "run"
    folder = runs.moa_dir(run)
    folder.mkdir(parents=True)
    (folder / stages.INFO_NAME).write_text(json.dumps({"tasks": ["a", "b"], "config": {}}))
    seen = []
    got = stages.selection_ids(run, ["a", "b"], lambda info: seen.append(info) or {"a": ["x"]})
    assert got == {"a": ["x"], "b": []} and seen[0]["tasks"] == ["a", "b"]
