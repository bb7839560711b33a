"""The life of a training stage, shared by train_individual_loras.py and train_moa.py.

A stage is one output folder a script trains (RUN/adapters/<task>, RUN/moa) and its
resumable checkpoint (RUN/checkpoints/<name>). Every stage goes the same way:

    todo = pending(stages, train_cfg, say)   # skip complete outputs unless --force; refuse an
                                             # interrupted checkpoint without --resume / --force
    for stage in todo:
        restart(stage, train_cfg, d)         # --force: the old checkpoint goes first
        result = fit(..., state_dir=stage.state_dir, log_path=stage.log_path,
                     fingerprint=fingerprint(resolved, ...))  # what a --resume must match
        if d.main:
            with publish(stage) as folder:   # write the output into `folder`; on success it is
                ...                          # renamed into place with log.jsonl, the checkpoint goes
    remove_empty_checkpoints(run, d)

An output folder appears only when complete (built under the checkpoint, then renamed), so
a killed run leaves its checkpoint and never half an output.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from src import runs
from src.errors import UserError
from src.training import Dist, barrier, remove_checkpoints

# Settings that may change between a run and its --resume (the rest must match the checkpoint).
RESUMABLE = {"output_dir", "resume", "force", "progress", "device", "log_every"}
LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class Stage:
    """One output folder of a training script and where its checkpoint lives.

    task: named in messages when a script trains one stage per task (None: the script's one stage).
    """

    out_dir: Path
    state_dir: Path
    complete_files: tuple[str, ...]  # what a finished out_dir holds
    task: str | None = None

    @property
    def log_path(self) -> Path:
        """The training log, kept beside the checkpoint until the output is published."""
        return self.state_dir / LOG_NAME

    def complete(self) -> bool:
        return all((self.out_dir / f).is_file() for f in self.complete_files)


def adapter_stage(run: Path, task: str) -> Stage:
    """RUN/adapters/<task>: a PEFT adapter and its training_config.json."""
    return Stage(runs.adapter_dir(run, task), runs.checkpoint_dir(run, task),
                 (*runs.ADAPTER_FILES, "training_config.json"), task=task)


def moa_stage(run: Path) -> Stage:
    """RUN/moa: the routers, their config, training_config.json and routing_accuracy.json."""
    return Stage(runs.moa_dir(run), runs.checkpoint_dir(run, "moa"),
                 (*runs.MOA_FILES, "training_config.json", "routing_accuracy.json"))


def main_printer(d: Dist) -> Callable[..., None]:
    """print on rank 0; a no-op in the other processes of a distributed job."""
    return print if d.main else (lambda *a, **k: None)


def pending(stages: Iterable[Stage], cfg, say: Callable[..., None] = print) -> list[Stage]:
    """The stages to train, checked before anything is loaded or written.

    A stage whose output is complete is skipped (said) unless cfg.force. A stage to train
    whose checkpoint folder exists is an interrupted run: without cfg.resume or cfg.force
    that is a UserError, for the first such stage.
    """
    todo = []
    for stage in stages:
        if stage.complete() and not cfg.force:
            skip = f"skip {stage.task}" if stage.task else "skip"
            say(f"{skip}: {stage.out_dir} is complete (--force retrains)")
        else:
            todo.append(stage)
    for stage in todo:
        if stage.state_dir.exists() and not (cfg.resume or cfg.force):
            run_of = f" of task {stage.task}" if stage.task else ""
            raise UserError(f"{stage.state_dir} holds an interrupted run{run_of}: "
                            f"pass --resume to continue it or --force to restart")
    return todo


def restart(stage: Stage, cfg, d: Dist = Dist()) -> None:
    """With cfg.force, rank 0 deletes the stage's old checkpoint; every process waits for it."""
    if cfg.force:
        remove_checkpoints(stage.state_dir, d)
    barrier(d)


def fingerprint(resolved: dict, ignore: Iterable[str] = (), **extra) -> dict:
    """The fingerprint a --resume must match: every resolved setting as "Class.field", except
    RESUMABLE and `ignore`, then `extra` (e.g. the task, the data hash, the global batch)."""
    skip = RESUMABLE | set(ignore)
    out = {f"{cls}.{k}": v for cls, fields in resolved.items() for k, v in fields.items() if k not in skip}
    out.update(extra)
    return out


@contextmanager
def publish(stage: Stage) -> Iterator[Path]:
    """Yields an empty folder (under the checkpoint) to write the stage's output into.

    When the block succeeds, the training log is copied into the folder, the folder is
    renamed onto stage.out_dir (an old one is removed only after) and the checkpoint is
    deleted. When it fails, nothing moves: the checkpoint stays for a --resume. Rank 0 only.
    """
    staged = stage.state_dir / "final"
    if staged.exists():  # left by a run killed while saving
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    yield staged
    if stage.log_path.exists():
        shutil.copyfile(stage.log_path, staged / LOG_NAME)
    stage.out_dir.parent.mkdir(parents=True, exist_ok=True)
    runs.replace_dir(staged, stage.out_dir)
    remove_checkpoints(stage.state_dir)


def remove_empty_checkpoints(run: Path, d: Dist = Dist()) -> None:
    """Remove RUN/checkpoints once no stage has a checkpoint left in it (rank 0)."""
    folder = Path(run) / "checkpoints"  # the parent of every runs.checkpoint_dir(run, name)
    if d.main and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
