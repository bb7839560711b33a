"""The run folder's one home: its layout, atomic writes, locks, digests, provenance, cells.

    RUN/adapters/<task>/                  one PEFT adapter per task (train_individual_loras.py)
    RUN/adapters/_multitask/              one adapter on the union of the tasks' data (--multitask);
                                          a leading "_" marks it as no task: task_adapters() skips it
    RUN/checkpoints/<name>/               resumable training state until a stage finishes
    RUN/moa/                              a trained Mixture-of-LoRAs (train_moa.py)
    RUN/merged/<method>/                  a built static composition (merges, searches), reused
    RUN/eval/cells/<method>/<task>.json   one finished evaluation cell
    RUN/eval/predictions/<method>/<task>.jsonl
    RUN/eval/summary.json, results.csv, results.md
    RUN/analysis/, RUN/plots/             cosine similarities and figures (src/analysis.py)

Every file that matters is written to a temporary file beside its target and renamed onto
it, so a reader never sees half of one; a folder is built beside its target and renamed
into place. Locks are flock(2) locks: the kernel releases them when their holder dies.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator, Sequence

from src.errors import UserError, writing

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- layout

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MOA_FILES = ("moa_config.json", "routers.safetensors")
MULTITASK = "_multitask"     # RUN/adapters/_multitask: the multitask baseline, never one of the tasks


def adapters_dir(run: Path) -> Path:
    return Path(run) / "adapters"


def adapter_dir(run: Path, task: str) -> Path:
    return adapters_dir(run) / task


def multitask_dir(run: Path) -> Path:
    """RUN/adapters/_multitask: one adapter trained on the union of the tasks' training examples."""
    return adapter_dir(run, MULTITASK)


def task_adapters(run: Path) -> list[str]:
    """The tasks with an adapter in RUN/adapters, by name: every folder holding one, except the
    reserved names that start with "_" (the multitask adapter) and the hidden ones (a folder being
    written or replaced, `atomic_dir` / `replace_dir`)."""
    folder = adapters_dir(run)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(("_", ".")) and (p / ADAPTER_FILES[0]).is_file())


def checkpoint_dir(run: Path, name: str) -> Path:
    return Path(run) / "checkpoints" / name


def moa_dir(run: Path) -> Path:
    return Path(run) / "moa"


def compose_dir(run: Path, system: str) -> Path:
    """RUN/compose/<system>: a trained composition system beside MoA (lora_mixer, t2l)."""
    return Path(run) / "compose" / system


def merged_dir(run: Path, method: str) -> Path:
    return Path(run) / "merged" / method


def eval_dir(run: Path) -> Path:
    return Path(run) / "eval"


def cell_path(run: Path, method: str, task: str) -> Path:
    return eval_dir(run) / "cells" / method / f"{task}.json"


def predictions_dir(run: Path, method: str) -> Path:
    return eval_dir(run) / "predictions" / method


def predictions_path(run: Path, method: str, task: str) -> Path:
    return predictions_dir(run, method) / f"{task}.jsonl"


def summary_path(run: Path) -> Path:
    return eval_dir(run) / "summary.json"


def analysis_dir(run: Path) -> Path:
    return Path(run) / "analysis"


def plots_dir(run: Path) -> Path:
    return Path(run) / "plots"


def has_adapter(run: Path, task: str) -> bool:
    return (adapter_dir(run, task) / ADAPTER_FILES[0]).is_file()


# --------------------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_tmp(path: Path) -> tuple[int, str]:
    """A temporary file beside `path` to be renamed onto it, with the permissions an ordinary
    new file gets (mkstemp makes it private, 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", dir=Path(path).parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` to write; renamed onto `path` when the block
    succeeds, removed when it fails."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = atomic_tmp(path)
    os.close(fd)
    try:
        with writing(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())      # a writer may have made it afresh, private (safetensors: 0600)
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_saved_config(folder: Path, name: str, weights: str, missing: str) -> object:
    """The JSON `name` of a saved model folder that must also hold `weights`: UserError `missing`
    (what it is not, and how to make it) when either file is absent, one line when unreadable."""
    path = Path(folder) / name
    if not path.is_file() or not (Path(folder) / weights).is_file():
        raise UserError(f"{folder}: {missing} (no {name} or {weights})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: unreadable ({e})") from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """JSON (indent 2, keys in insertion order) written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_dir(folder: Path) -> Path:
    """A new temporary folder beside `folder`, to be filled and then `replace_dir`-ed onto it."""
    folder = Path(folder)
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder should read like any other
    return tmp


def replace_dir(tmp: Path, folder: Path) -> None:
    """Move a finished temporary folder into place; an old folder is removed only after. Its files
    get the permissions an ordinary new file gets (safetensors writes them private, 0600)."""
    mode = 0o666 & ~_umask()
    for f in Path(tmp).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- locks

@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock (flock) on `path`, held for the block; yields False at once
    when another process holds it and `wait` is False. The kernel drops it when its holder
    exits, so a crashed run never leaves a stale lock. A file is created and stays; a folder
    (locked as it is) gets nothing written into it."""
    folder = Path(path).is_dir()
    if not folder:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY if folder else os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class OwnedLock:
    """A non-blocking flock on `path` whose file names its holder ({"pid", "host", "since"}):
    how one training stage (a task's LoRA, the MoA) keeps a second process off its checkpoint
    and log. `acquire()` is False when another process holds it (`holder()` then says who);
    `release()` deletes the file, then unlocks. Like file_lock, the kernel drops the lock
    when its holder dies; the file a dead holder leaves is simply taken over.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self._holder: dict | None = None

    def acquire(self) -> bool:
        for _ in range(20):  # the file may be deleted by a releasing holder between open and flock
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a releasing holder: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._holder = _read_holder(fd)
                os.close(fd)
                return False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder had just deleted: take the new one
                os.close(fd)
                continue
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (record + "\n").encode(), 0)
            self.fd = fd
            return True
        raise OSError(f"{self.path}: could not take the lock (the file keeps disappearing)")

    def holder(self) -> str:
        """'process PID on host HOST' of the process that holds the lock (after a failed acquire)."""
        h = self._holder or {}
        if h.get("pid"):
            return f"process {h['pid']} on host {h.get('host', '?')}"
        return "another process"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> dict | None:
    try:
        doc = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def check_writable(folder: Path) -> None:
    """UserError unless `folder` exists as a writable folder or can be created: the nearest
    existing folder on its path must be a folder (not a file) that this process may write in."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write {folder}: it is a file, not a folder")
    p = folder
    while not p.exists():
        if p == p.parent:
            break
        p = p.parent
    if not p.is_dir():
        raise UserError(f"cannot create {folder}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {folder}: no write permission in {p}")


def make_dirs(folder: Path) -> list[Path]:
    """mkdir -p `folder`; the folders it created, outermost first (to remove again on failure)."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def cell_lock(run: Path, method: str, task: str) -> Path:
    """The lock file by which processes evaluating one run folder share out its cells."""
    path = cell_path(run, method, task)
    return path.with_name(f".{path.stem}.lock")


# --------------------------------------------------------------------------- digests

def file_digest(*paths: Path) -> str:
    """sha256 of the files' bytes, in order (identifies an adapter or router version)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def adapter_digest(folder: Path) -> str:
    """sha256 of an adapter folder's config and weights."""
    return file_digest(*(Path(folder) / f for f in ADAPTER_FILES))


def moa_digest(folder: Path) -> str:
    """sha256 of a saved MoA: its config, routers and (joint training) its own experts."""
    folder = Path(folder)
    return file_digest(*(folder / f for f in MOA_FILES),
                       *sorted((folder / "experts").glob("*/adapter_model.safetensors")))


# --------------------------------------------------------------------------- provenance

# The packages whose version every result file records: the ones our numbers depend on.
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "accelerate")


def package_versions(*names: str) -> dict[str, str | None]:
    """{name: installed version, or None when absent} (peft is a test dependency only)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def versions() -> dict[str, str | None]:
    """python and every TRACKED_PACKAGES version: what a result records about its software."""
    return {"python": sys.version.split()[0], **package_versions(*TRACKED_PACKAGES)}


def git_commit(repo: Path | None = None) -> str | None:
    """The repository's HEAD commit (read-only `git rev-parse`), or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or ROOT, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_meta(prog: str, argv: Sequence[str] | None, config: dict, seed: int, data_hash: str) -> dict:
    """What every result file records: command, config, seed, git commit, data hash, versions."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return {"command": shlex.join(["python", prog, *argv]),
            "config": config, "seed": seed, "git_commit": git_commit(), "data_hash": data_hash,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}


# --------------------------------------------------------------------------- evaluation cells

def write_predictions(run: Path, method: str, task: str, records: Sequence[dict]) -> Path:
    path = predictions_path(run, method, task)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def load_cell(run: Path, method: str, task: str, fingerprint: dict) -> dict | None:
    """The finished cell for (method, task) if it exists and was computed with exactly
    `fingerprint`; None otherwise (missing, unreadable or stale)."""
    path = cell_path(run, method, task)
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(cell, dict) or cell.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    if not isinstance(cell.get("records"), list) or not isinstance(cell.get("result"), dict):
        return None                      # damaged: recomputed, as a missing cell
    if not predictions_path(run, method, task).is_file():
        write_predictions(run, method, task, cell["records"])
    return cell


def find_cell(run: Path, method: str, task: str, fingerprint: dict,
              reuse_from: Sequence[Path] = ()) -> dict | None:
    """The finished cell from RUN, or else from another run folder in `reuse_from` (copied
    into RUN with its own provenance): a cell is only ever taken with the same fingerprint."""
    cell = load_cell(run, method, task, fingerprint)
    for other in reuse_from:
        if cell is not None:
            break
        cell = load_cell(Path(other), method, task, fingerprint)
        if cell is not None:
            write_predictions(run, method, task, cell["records"])
            write_json_atomic(cell_path(run, method, task), cell)
    return cell


def save_cell(run: Path, method: str, task: str, fingerprint: dict, body: dict, meta: dict) -> dict:
    """Predictions JSONL first, then the cell file (its presence marks the cell finished)."""
    cell = {"method": method, "task": task, "fingerprint": fingerprint, **body, "meta": meta}
    write_predictions(run, method, task, body["records"])
    write_json_atomic(cell_path(run, method, task), cell)
    return cell


def check_built_from(method: str, folder: Path, run_dir: Path, experts: Sequence[str]) -> None:
    """Refuse routers trained over other adapters than RUN/adapters holds now (an expert retrained
    since): their training_config.json records each adapter's sha256 under built_from. Folders
    trained before that was recorded are taken as they are."""
    try:
        info = json.loads((folder / "training_config.json").read_text())
    except (OSError, ValueError):
        return
    recorded = (info.get("built_from") or {}).get("adapters") if isinstance(info, dict) else None
    if not isinstance(recorded, dict):
        return
    changed = [t for t in experts if t in recorded and has_adapter(run_dir, t)
               and recorded[t] != adapter_digest(adapter_dir(run_dir, t))]
    if changed:
        raise UserError(f"method {method}: {folder} was trained over other adapters than {adapters_dir(run_dir)} "
                        f"holds now (retrained since: {', '.join(changed)}); retrain it with train_moa.py --force "
                        f"(or leave {method} out of --methods)")
