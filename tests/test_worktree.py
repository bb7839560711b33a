"""The working-tree guard that fails a test session which writes into the repository."""
import subprocess

from worktree import changed_paths, worktree_state


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_guard_sees_a_modified_a_deleted_and_a_new_file(tmp_path):
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    for name in ("a.json", "b.png"):
        (repo / "results" / name).write_text(name)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    before = worktree_state(repo)
    assert before == {}
    (repo / "results" / "a.json").write_text("overwritten")
    (repo / "results" / "b.png").unlink()
    (repo / "results" / "new.csv").write_text("1")
    middle = worktree_state(repo)
    assert changed_paths(before, middle) == ["results/a.json", "results/b.png", "results/new.csv"]
    (repo / "results" / "a.json").write_text("overwritten again")   # a file already dirty, changed again
    after = worktree_state(repo)
    assert changed_paths(middle, after) == ["results/a.json"]
    assert changed_paths(after, worktree_state(repo)) == []


def test_guard_is_off_outside_a_repository(tmp_path):
    assert worktree_state(tmp_path) is None
