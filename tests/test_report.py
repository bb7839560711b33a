"""src/report.py: the headline with a task left out, and the paired differences it prints, read
from the summaries and (without a task) recomputed from the cells on the same resamples."""
import pytest
from test_scoring import _three_tasks

from src import evaluation as ev
from src import paired, report
from src.errors import run_main
from src.runs import cell_path, write_json_atomic

TASKS, METHODS = ["sentiment", "nli", "commonsense"], ["oracle", "half", "base"]


@pytest.fixture
def run(tmp_path):
    cells = _three_tasks()
    for (m, t), c in cells.items():
        write_json_atomic(cell_path(tmp_path, m, t), c)
    for protocol in ("toolkit", "study"):
        ev.write_results(tmp_path, ev.summarize("m", TASKS, METHODS, cells, {"seed": 0, "git_commit": None,
                                                                            "data_hash": "0" * 16, "command": "x",
                                                                            "config": {}}, protocol))
    return tmp_path


def test_the_pairs_table_prints_the_summary_pairs_and_the_ones_without_a_task(run):
    summary = report.load(run, "toolkit")
    table = report.pairs_table(run, [("base", "half")], without="nli")
    e = paired.difference(summary["paired"]["pairs"], "base", "half")
    assert e["difference"] < 0 and f"{e['difference']:+.3f} ({e['interval'][0]:+.3f} to" in table
    dropped = report.pair_differences(run, [("base", "half"), ("half", "oracle")], "nli")
    w = {m: summary["methods"][m]["without"]["nli"] for m in METHODS}
    assert dropped[("base", "half")]["difference"] == pytest.approx(w["base"]["score"] - w["half"]["score"], abs=1e-12)
    assert dropped[("half", "oracle")]["difference"] == pytest.approx(w["half"]["score"] - 1.0, abs=1e-12)
    # the difference with the oracle is the method's own resampled score, shifted: the same interval
    lo, hi = dropped[("half", "oracle")]["interval"]
    assert [lo + 1, hi + 1] == pytest.approx(w["half"]["interval"], abs=1e-12)
    assert "toolkit, without nli" in report.headline(run, "nli")
    assert "without" not in report.headline(run, "translation")       # a task the run does not have


def test_bad_pairs_fail_in_one_line_before_anything_is_printed(run, capsys):
    assert run_main(report.main, [str(run), "--pairs", "half:nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().count("\n") == 0 and "nope is not in" in err and "half" in err
    assert run_main(report.main, [str(run), "--pairs", "half"]) == 2
    assert "'half' is not A:B" in capsys.readouterr().err
