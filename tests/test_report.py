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


def test_the_readme_results_tables_are_the_committed_summaries():
    """Every table in README "Results" is a report block, and each equals what src.report makes
    of results/reference's summaries now (a rerun or a hand edit that leaves one behind fails)."""
    from pathlib import Path
    readme = Path(__file__).resolve().parent.parent / "README.md"
    blocks = [m["args"] for m in report.BLOCK.finditer(readme.read_text(encoding="utf-8"))]
    for part in ("7tasks", "5tasks"):
        assert f"headline results/reference/{part}" in [" ".join(a.split()[:2]) for a in blocks], blocks
    text, stale = report.stale_blocks(readme)
    assert stale == [], f"regenerate with: python -m src.report --readme README.md ({stale})"


def test_readme_blocks_are_checked_and_regenerated_in_place(run, capsys):
    md = run / "notes.md"
    md.write_text(f"# notes\n\n<!-- report: headline . without=nli -->\n\n| old |\n\n<!-- /report -->\n\ntail\n")
    with pytest.raises(SystemExit) as e:
        report.main(["--readme", str(md), "--check"])
    assert e.value.code == 1 and "stale: <!-- report: headline . without=nli -->" in capsys.readouterr().out
    assert "| old |" in md.read_text()
    assert run_main(report.main, ["--readme", str(md)]) == 0
    text = md.read_text()
    assert report.headline(run, "nli") in text and text.endswith("<!-- /report -->\n\ntail\n")
    assert run_main(report.main, ["--readme", str(md), "--check"]) == 0
    md.write_text("<!-- report: nonsense . -->\n\n| x |\n\n<!-- /report -->\n")
    assert run_main(report.main, ["--readme", str(md)]) == 2
    assert "unknown kind 'nonsense'" in capsys.readouterr().err


def test_empty_and_unclosed_readme_blocks_are_not_skipped(run, capsys):
    md = run / "notes.md"
    md.write_text("<!-- report: headline . -->\n<!-- /report -->\n")      # a new block, still empty
    with pytest.raises(SystemExit) as e:
        report.main(["--readme", str(md), "--check"])
    assert e.value.code == 1 and "stale: <!-- report: headline . -->" in capsys.readouterr().out
    assert run_main(report.main, ["--readme", str(md)]) == 0 and report.headline(run) in md.read_text()
    md.write_text("intro\n\n<!-- report: headline . -->\n\n| x |\n")  # never closed
    assert run_main(report.main, ["--readme", str(md), "--check"]) == 2
    assert f"{md}:3: a <!-- report: ... --> opener without its <!-- /report -->" in capsys.readouterr().err
    assert md.read_text() == "intro\n\n<!-- report: headline . -->\n\n| x |\n"


def test_costs_read_the_stage_records_the_build_ledger_and_the_cells(run):
    for stage, s in (("adapters/nli", 100.0), ("adapters/sentiment", 50.0), ("adapters/_multitask", 300.0),
                     ("moa", 40.0)):
        write_json_atomic(run / stage / "training_config.json", {"elapsed_s": s})
    write_json_atomic(run / "eval" / "builds.json", {"half": {"seconds": 12.25}})
    text = report.costs(run)
    assert text.startswith("Training (once per run): the 2 task adapters 150 s; adapters/_multitask 300 s; moa 40 s")
    assert "| `half` | 12.2 | 1.0 | 3 | 60 |" in text and "| `base` | - | 1.0 | 3 | 60 |" in text
    (run / "eval" / "builds.json").write_text("{")
    with pytest.raises(Exception, match="builds.json: unreadable"):
        report.costs(run)
