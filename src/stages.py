"""The life of a training stage, shared by train_individual_loras.py and train_moa.py.

A stage is one output folder a script trains (RUN/adapters/<task>, RUN/moa) and its
resumable checkpoint (RUN/checkpoints/<name>). Every stage goes the same way:

    with claim(stages, train_cfg, say, d) as todo:   # pending(), then each stage checked writable
        for stage in todo:                             # and locked; a held lock names its holder
            restart(stage, train_cfg, d)               # --force: the old checkpoint goes first
            result = fit(..., state_dir=stage.state_dir, log_path=stage.log_path,
                         fingerprint=fingerprint(resolved, ...))  # what a --resume must match
            if d.main:
                with publish(stage) as folder:  # write the output into `folder`; on success it is
                    ...                         # renamed into place with log.jsonl, the checkpoint goes
    remove_empty_checkpoints(run, d)

Every training script states this once, as a `Recipe` (torchtune's shape: the script says what
its stages are, what each is built from, how to set up and how to train one; `run_recipe` does
the claiming, restarting, publishing and recording), so that every stage's training_config.json
has one schema (`record`): among its keys `selection_ids`, the validation examples that chose
the checkpoint, which evaluation leaves out ({} when no example chose it).

`pending` (inside `claim`) skips complete outputs unless --force, and refuses an interrupted
checkpoint without --resume / --force.

An output folder appears only when complete (built under the checkpoint, then renamed), so
a killed run leaves its checkpoint and never half an output.

A stage may record what its output was built from (`built_from`: settings, inputs' digests)
in the output's training_config.json; a complete output is then skipped only when that
matches the present fingerprint, and refused ("rerun with --force") when it does not. An
output without the record (an older version's) is skipped with a note.

While a process trains a stage, it holds the stage's lock, RUN/checkpoints/<name>.lock
(`lock_path`; it records the holder's pid and host, and goes when the stage does): a
second process on the same stage is refused by name instead of interleaving the log.
"""
from __future__ import annotations

import json
import shutil
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch

from src import runs
from src.errors import UserError
from src.training import Dist, FitResult, TrainingDiverged, _all_reduce, barrier, remove_checkpoints

# Settings that may change between a run and its --resume (the rest must match the checkpoint).
RESUMABLE = {"output_dir", "resume", "force", "progress", "device", "log_every"}
LOG_NAME = "log.jsonl"
INFO_NAME = "training_config.json"   # every stage's output records its provenance here
BUILT_FROM = "built_from"            # ... and, under this key, what the output was built from


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


def mixer_stage(run: Path, name: str = "lora_mixer") -> Stage:
    """RUN/compose/<name> (lora_mixer, or lora_mixer_<regime> for the other regimes): the routers, their
    config, training_config.json and routing.json."""
    return Stage(runs.compose_dir(run, name), runs.checkpoint_dir(run, name),
                 ("mixer_config.json", "routers.safetensors", "training_config.json", "routing.json"))


def main_printer(d: Dist) -> Callable[..., None]:
    """print on rank 0; a no-op in the other processes of a distributed job."""
    return print if d.main else (lambda *a, **k: None)


def lock_path(stage: Stage) -> Path:
    """RUN/checkpoints/<name>.lock: held while a process trains the stage."""
    return stage.state_dir.with_name(f"{stage.state_dir.name}.lock")


def recorded_built_from(stage: Stage) -> dict | None:
    """What the complete output of `stage` records it was built from; None when it records
    nothing (an older version's output) or its training_config.json is unreadable."""
    try:
        doc = json.loads((stage.out_dir / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    rec = doc.get(BUILT_FROM) if isinstance(doc, dict) else None
    return rec if isinstance(rec, dict) else None


_UNSET = object()  # a key one record has and the other lacks


def _show(value) -> str:
    if value is _UNSET:
        return "(not recorded)"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "(none)"
    return "none" if value is None else str(value)


def _label(key: str) -> str:
    """"RouterConfig.router" -> "--router"; other keys as they are."""
    cls, _, field = key.partition(".")
    return f"--{field.replace('_', '-')}" if field and cls.endswith("Config") else key.replace("_", " ")


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two built_from records, in words ("tasks a,b -> a,b,c", ...);
    under "adapters" ({task: digest}) only the tasks on both sides whose digest changed."""
    old, new = json.loads(json.dumps(old, default=str)), json.loads(json.dumps(new, default=str))
    out = []
    for key in list(new) + [k for k in old if k not in new]:
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key.endswith("adapters"):
            redone = [t for t in b if t in a and a[t] != b[t]]
            if redone:
                out.append(f"the adapter{'s' if len(redone) > 1 else ''} of {','.join(redone)} "
                           f"{'were' if len(redone) > 1 else 'was'} retrained since")
            continue  # an added or dropped task shows in the task list
        out.append(f"{_label(key)} {_show(a)} -> {_show(b)}")
    return out


def _skip(stage: Stage, cfg, say: Callable[..., None], built_from: Callable[[Stage], dict] | None) -> bool:
    """True when the stage's output is complete and is to be kept (said); UserError when it is
    complete but was built from other inputs than `built_from(stage)` now names."""
    if not stage.complete() or cfg.force:
        return False
    what = f"skip {stage.task}" if stage.task else "skip"
    if built_from is not None:
        recorded, now = recorded_built_from(stage), built_from(stage)
        if recorded is None:
            say(f"note: {stage.out_dir} records nothing of what it was built from (an older version "
                f"made it), so it is kept unchecked; --force retrains it")
        else:
            diff = changes(recorded, now)
            if diff:
                shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
                raise UserError(f"{stage.out_dir} was built from other inputs than now ({shown}): "
                                f"rerun with --force to retrain it")
    say(f"{what}: {stage.out_dir} is complete (--force retrains)")
    return True


def _check_interrupted(todo: list[Stage], cfg) -> None:
    for stage in todo:
        if stage.state_dir.exists() and not (cfg.resume or cfg.force):
            run_of = f" of task {stage.task}" if stage.task else ""
            raise UserError(f"{stage.state_dir} holds an interrupted run{run_of}: "
                            f"pass --resume to continue it or --force to restart")


def pending(stages: Iterable[Stage], cfg, say: Callable[..., None] = print,
            built_from: Callable[[Stage], dict] | None = None) -> list[Stage]:
    """The stages to train, checked before anything is loaded or written.

    A stage whose output is complete is skipped (said) unless cfg.force; with `built_from`,
    only when the output's record of what it was built from matches built_from(stage) (else
    UserError; no record: skipped with a note). A stage to train whose checkpoint folder
    exists is an interrupted run: without cfg.resume or cfg.force that is a UserError, for
    the first such stage.
    """
    todo = [stage for stage in stages if not _skip(stage, cfg, say, built_from)]
    _check_interrupted(todo, cfg)
    return todo


def _held(stage: Stage, lock: runs.OwnedLock) -> str:
    run = stage.state_dir.parent.parent
    what = f"task {stage.task} in {run}" if stage.task else str(stage.out_dir)
    return f"{what} is being trained by {lock.holder()} (lock {lock.path})"


@contextmanager
def claim(stages: Iterable[Stage], cfg, say: Callable[..., None] = print, d: Dist = Dist(),
          built_from: Callable[[Stage], dict] | None = None) -> Iterator[list[Stage]]:
    """`pending`, with each stage to train made sure of and held for the block.

    Before anything is loaded: every output and checkpoint folder must be creatable and
    writable (else UserError), and rank 0 takes each stage's lock (`lock_path`); one held by
    another process is a UserError naming it (pid, host). Only then are interrupted
    checkpoints judged, so a run in progress is not mistaken for a killed one. On leaving,
    the locks go, then the run folders this call created if they are still empty (bad
    input found later leaves nothing behind) and RUN/checkpoints once it is empty.
    """
    todo = [stage for stage in stages if not _skip(stage, cfg, say, built_from)]
    with ExitStack() as stack:
        failure = None
        if todo and d.main:
            try:
                for stage in todo:
                    runs.check_writable(stage.out_dir.parent)
                    runs.check_writable(stage.state_dir.parent)
                    if stage.out_dir.exists() and not stage.out_dir.is_dir():
                        raise UserError(f"cannot write {stage.out_dir}: it is a file, not a folder")
                for stage in todo:
                    folder = lock_path(stage).parent
                    try:
                        created = runs.make_dirs(folder)
                    except OSError as e:
                        raise UserError(f"cannot create {folder} ({e.strerror or e})") from None
                    stack.callback(_remove_if_empty, list(dict.fromkeys([*created, folder])))
                    lock = runs.OwnedLock(lock_path(stage))
                    try:
                        got = lock.acquire()
                    except OSError as e:
                        raise UserError(f"cannot write {lock.path} ({e.strerror or e})") from None
                    if not got:
                        raise UserError(_held(stage, lock))
                    stack.callback(lock.release)
            except UserError as e:
                failure = e
        if d.world > 1:  # every process learns whether rank 0 got the stages
            failed = _all_reduce(torch.tensor([1.0 if failure else 0.0]), d).item() > 0
            if failed and not d.main:
                raise SystemExit(2)  # rank 0 says why
        if failure is not None:
            raise failure
        # a stage another process finished while this one waited for its lock is skipped now
        todo = [stage for stage in todo if not _skip(stage, cfg, say, built_from)]
        _check_interrupted(todo, cfg)
        yield todo


def _remove_if_empty(folders: list[Path]) -> None:
    """rmdir each folder, innermost first, while it is empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


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


# --------------------------------------------------------------------------- recipes

# What every stage's record names besides the fit's own figures (`record`): evaluation reads
# selection_ids ({task: ids} or, for one task's stage, a list; {} when no example chose the
# checkpoint), the rest is provenance.
RECORD_KEYS = ("selection_ids", "seed", "data_hash", "model", "config")


@dataclass
class Trained:
    """One stage trained by a recipe: the fit's result, the recipe's own fields of the record
    (RECORD_KEYS among them), what writes the output files into a folder (it may complete the
    record: the record is written after it), and what is said once the output is in place (a
    callable: said as it returns then)."""

    result: FitResult
    record: dict
    write: Callable[[Path], None]
    message: str | Callable[[], str] = ""


class Recipe(Protocol):
    """A training script's work, driven by `run_recipe`.

    stages: every output the script would train (complete ones are skipped by `built_from`);
    built_from: what a stage's output is built from (settings, inputs' digests), recorded in it;
    setup: load what training needs (data, model), once, only when some stage is to train;
    train: fit one stage (its checkpoint folder is stage.state_dir, its log stage.log_path) and
    return it as `Trained`; TrainingDiverged skips the stage and marks the run failed.
    """

    def stages(self) -> list[Stage]: ...

    def built_from(self, stage: Stage) -> dict: ...

    def setup(self, todo: list[Stage]) -> None: ...

    def train(self, stage: Stage) -> Trained: ...


def record(trained: Trained, built_from: dict) -> dict:
    """A stage's training_config.json: the recipe's fields, the fit's figures, the commit, what the
    output was built from and the package versions."""
    missing = [k for k in RECORD_KEYS if k not in trained.record]
    if missing:
        raise ValueError(f"a recipe's record lacks {', '.join(missing)}")
    r = trained.result
    return {**trained.record, "git_commit": runs.git_commit(), "steps": r.steps, "best_step": r.best_step,
            "best_val_loss": r.best_val_loss, "stopped_early": r.stopped_early,
            "final_train_loss": r.final_train_loss, "tokens": r.tokens, "elapsed_s": round(r.elapsed_s, 2),
            BUILT_FROM: built_from, "versions": runs.versions()}


def run_recipe(recipe: Recipe, run: Path, cfg, say: Callable[..., None] = print, d: Dist = Dist()) -> list[str]:
    """Claim the recipe's stages, set up once, then train, publish and record each in turn (rank 0
    writes); the names of the stages whose training diverged (each said in one error line)."""
    failed: list[str] = []
    with claim(recipe.stages(), cfg, say, d, built_from=recipe.built_from) as todo:
        if todo:
            recipe.setup(todo)
        for stage in todo:
            restart(stage, cfg, d)
            try:
                trained = recipe.train(stage)
            except TrainingDiverged as e:
                print(f"error: {e}", file=sys.stderr)
                failed.append(stage.task or stage.out_dir.name)
                continue
            if d.main:
                with publish(stage) as folder:
                    trained.write(folder)
                    runs.write_json_atomic(folder / INFO_NAME, record(trained, recipe.built_from(stage)))
                message = trained.message() if callable(trained.message) else trained.message
                if message:
                    say(message)
            barrier(d)
    remove_empty_checkpoints(run, d)
    return failed


def selection_ids(run: Path, tasks: Iterable[str], rebuild: Callable[[dict], dict | None]) -> dict[str, list[str]]:
    """{task: the validation ids that chose a checkpoint}, from every stage record of the run
    (RUN/adapters/*, RUN/moa, RUN/compose/*). A record without `selection_ids` (an older
    version's) is passed to `rebuild`, which returns its ids ({task: ids}) or None."""
    run = Path(run)
    out: dict[str, set[str]] = {t: set() for t in tasks}
    paths = [*sorted(runs.adapters_dir(run).glob(f"*/{INFO_NAME}")), runs.moa_dir(run) / INFO_NAME,
             *sorted((run / "compose").glob(f"*/{INFO_NAME}"))]
    for path in paths:
        if not path.is_file():
            continue
        try:
            info = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e})") from None
        if not isinstance(info, dict):
            raise UserError(f"{path}: not a stage record (a JSON object)")
        ids = info.get("selection_ids")
        if ids is None:
            ids = rebuild(info)
        if isinstance(ids, list):
            ids = {info.get("task"): ids}
        for t, some in (ids or {}).items():
            if t in out:
                out[t].update(some)
    return {t: sorted(v) for t, v in out.items()}
