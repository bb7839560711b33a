import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402
from worktree import changed_paths, worktree_state  # noqa: E402

# Tiny models run faster on one thread, and tests share a 2-core machine.
torch.set_num_threads(1)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=["qwen2", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


# No test may write into the repository (outputs go under tmp_path): the working tree is
# compared before and after the session, and a change fails the run. WORKTREE_CHECK=0 turns the
# check off for a developer who edits files while the suite runs.
_CHECK = os.environ.get("WORKTREE_CHECK", "1") != "0"
_BEFORE = {}


def pytest_sessionstart(session):
    if _CHECK:
        _BEFORE["state"] = worktree_state(ROOT)


def pytest_sessionfinish(session, exitstatus):
    before = _BEFORE.get("state")
    if before is None:
        return
    after = worktree_state(ROOT)
    changed = changed_paths(before, after or {})
    if changed:
        shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        print(f"\nFAILED: the test suite changed {len(changed)} file(s) in the repository: {shown}", file=sys.stderr)
        session.exitstatus = 1
