"""The multitask baseline: one LoRA trained on the union of the tasks' training examples.

    python train_individual_loras.py --multitask --tasks 7tasks ... (the task adapters' flags)

It is trained as each task adapter is (the same model, rank, targets, optimiser, schedule shape,
early stopping, data subsets), with the same total number of optimizer steps as all task adapters
together: by default the sum of their recorded `steps` (RUN/adapters/<task>/training_config.json),
or for a task without an adapter the steps its adapter would plan from the same data size and
global batch; `--multitask-steps N` sets another total. It chooses its checkpoint on the union of
the tasks' validation subsets, the very examples the task adapters chose theirs on, so the
examples evaluation leaves out do not grow. It lives in RUN/adapters/_multitask (`runs.MULTITASK`):
the leading "_" keeps it out of every list of task adapters (`runs.task_adapters`), and evaluation
scores it as the static method `multitask_lora`.

This module holds what the script needs beside the training loop: its options, its stage, the
step total and the notes on a recipe that differs from the task adapters'.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from src import runs, stages
from src.cli import check_positive_ints
from src.compose import Env, Method, static
from src.errors import UserError
from src.training import planned_steps


@dataclass
class MultitaskConfig:
    """The multitask adapter: one LoRA on the union of --tasks' training examples (RUN/adapters/_multitask)."""

    title = "Multitask adapter options"

    multitask: bool = field(default=False, metadata={
        "help": "train one adapter on the union of --tasks' training examples into RUN/adapters/_multitask "
                "(the multitask baseline, method multitask_lora) instead of one adapter per task"})
    multitask_steps: int | None = field(default=None, metadata={
        "help": "its optimizer steps; None: as many as all task adapters together (the sum of their recorded "
                "steps; for a task without an adapter, the steps it would plan)"})

    def __post_init__(self):
        n = self.multitask_steps
        check_positive_ints(self, "multitask_steps")
        if n is not None and not self.multitask:
            raise UserError("--multitask-steps is the multitask adapter's: pass it with --multitask")


def stage(run: Path) -> stages.Stage:
    """RUN/adapters/_multitask: a PEFT adapter and its training_config.json; RUN/checkpoints/_multitask."""
    return stages.Stage(runs.multitask_dir(run), runs.checkpoint_dir(run, runs.MULTITASK),
                        (*runs.ADAPTER_FILES, stages.INFO_NAME))


def _record(run: Path, task: str) -> dict | None:
    """RUN/adapters/<task>/training_config.json, None when absent; UserError when unreadable."""
    path = runs.adapter_dir(run, task) / stages.INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); pass --multitask-steps N") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: not a training record; pass --multitask-steps N")
    return info


def task_steps(run: Path, tasks: Sequence[str], n_train: Mapping[str, int], global_batch: int,
               epochs: float, max_steps: int | None) -> dict[str, dict]:
    """{task: {"steps": n, "from": where n comes from}}: the steps the task's adapter took (its
    training_config.json), or, without one, the steps it would plan (`training.planned_steps` on
    its n_train examples at this global batch, epochs and max_steps)."""
    out = {}
    for t in tasks:
        info = _record(run, t)
        if info is not None:
            steps = info.get("steps")
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise UserError(f"{runs.adapter_dir(run, t) / stages.INFO_NAME}: no step count (steps: {steps!r}); "
                                f"pass --multitask-steps N")
            out[t] = {"steps": steps, "from": f"{runs.adapter_dir(run, t) / stages.INFO_NAME}"}
        else:
            steps = planned_steps(n_train[t], global_batch, epochs, max_steps)[1]
            out[t] = {"steps": steps, "from": f"planned: {n_train[t]} examples, global batch {global_batch}"}
    return out


def schedule(train_cfg, steps: int, n_examples: int, global_batch: int):
    """train_cfg with exactly `steps` optimizer steps over n_examples (max_steps = steps, enough
    epochs for them): the learning-rate schedule spans them, as a task adapter's spans its own."""
    per_epoch = max(1, math.ceil(n_examples / global_batch))
    return dataclasses.replace(train_cfg, max_steps=steps, epochs=float(math.ceil(steps / per_epoch)))


def recipe_notes(run: Path, tasks: Sequence[str], resolved: dict, model: str, global_batch: int,
                 selection: Mapping[str, Sequence[str]]) -> list[str]:
    """What sets the multitask adapter apart from the task adapters beyond its step total, one line
    per task adapter that differs: their recorded settings (but epochs and steps) against `resolved`,
    and the validation examples each chose its checkpoint on against `selection`."""
    ignore = {"tasks", "model", "epochs", "max_steps"}
    mine = stages.fingerprint({k: v for k, v in resolved.items() if k != MultitaskConfig.__name__}, ignore,
                              model=model, global_batch=global_batch)
    notes = []
    for t in tasks:
        info = _record(run, t)
        if info is None or not isinstance(info.get("config"), dict):
            continue
        theirs = stages.fingerprint(info["config"], ignore,
                                    model=(info.get(stages.BUILT_FROM) or {}).get("model", info.get("model")),
                                    global_batch=info.get("global_batch"))
        diff = stages.changes(theirs, mine)
        if diff:
            notes.append(f"the {t} adapter was trained with other settings ({'; '.join(diff[:4])}): the multitask "
                         f"adapter is not trained as it was")
        chosen = info.get("selection_ids")
        if isinstance(chosen, list) and sorted(chosen) != sorted(selection.get(t, ())):
            notes.append(f"the multitask adapter chooses its checkpoint on other validation examples of {t} than "
                         f"its adapter did: evaluation leaves out both")
    return notes


# --------------------------------------------------------------------------- registry entries

class MultitaskLoRA(Method):
    """The multitask baseline: one adapter trained on the union of the tasks' training examples
    (train_individual_loras.py --multitask, src/multitask.py), folded like the oracle, for every task."""

    name = "multitask_lora"
    family, summary = "baseline", "one adapter trained on every task's examples"
    help = ("one adapter trained on the union of the tasks' training examples, as many steps as the task adapters "
            "together (RUN/adapters/_multitask), folded")

    def adapter_tasks(self, env):
        return [runs.MULTITASK]

    def trained_on(self, env: Env) -> list[str] | None:
        """The tasks its training_config.json names (None: no readable record)."""
        try:
            tasks = json.loads((runs.multitask_dir(env.run_dir) / "training_config.json").read_text())["tasks"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return [t for t in tasks if isinstance(t, str)] if isinstance(tasks, list) else None

    def check(self, env):
        folder = runs.multitask_dir(env.run_dir)
        if not runs.has_adapter(env.run_dir, runs.MULTITASK):
            raise UserError(f"method multitask_lora needs the multitask adapter: no {folder} (train it with "
                            f"train_individual_loras.py --multitask --tasks {','.join(env.tasks)} and the task "
                            f"adapters' flags, or leave multitask_lora out of --methods)")
        trained = self.trained_on(env)
        if trained is None:
            return
        unseen = [t for t in env.tasks if t not in trained]
        if unseen:
            raise UserError(f"method multitask_lora: {folder} was trained on {', '.join(trained)}, not on "
                            f"{', '.join(unseen)} (retrain it with train_individual_loras.py --multitask --tasks "
                            f"{','.join(env.tasks)} --force)")
        if len(trained) > len(env.tasks):
            print(f"note: {folder} was trained on {len(trained)} tasks ({', '.join(trained)}); evaluating "
                  f"{len(env.tasks)} of them", file=sys.stderr)

    def fingerprint(self, env, task):
        return {"multitask_lora": {"adapter": env.digests[runs.MULTITASK]}}

    def prepare(self, model, env, task):
        return static(model, env.adapters[runs.MULTITASK])
