"""The repository's working tree before and after the test suite: no test may write into it.

Every test writes under pytest's tmp_path; `conftest.py` compares this state at the start and
the end of a session and fails the run when a file in the repository changed, appeared or was
deleted (committed results above all: a test once republished results/reference).
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def worktree_state(root: Path) -> dict[str, str] | None:
    """Path -> git status code and content digest of every changed or untracked file; None outside git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], cwd=root,
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    state = {}
    entries = out.stdout.decode("utf-8", "surrogateescape").split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code[0] in "RC":   # a rename or copy: the next entry is the source
            i += 1
        file = root / path
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else "-"
        state[path] = f"{code} {digest}"
    return state


def changed_paths(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
