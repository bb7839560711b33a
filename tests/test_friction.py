"""What a newcomer trips over: the shell drivers' Python, -h texts, the demo's output,
results.csv in pandas, and plots that say what they show.

The second paragraph of this docstring is what `build_parser` must show with -h when its
caller passes only the first one (test_build_parser_shows_the_callers_whole_docstring).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = ["run_demo.sh", "run_all_evaluation.sh", "train_all_tasks.sh", "train_moa.sh", "run_reference.sh"]
NO_ENV = "error: no Python environment with the project's packages: run 'bash setup.sh' first (or set PYTHON=...)"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "RUN", "MODEL", "TASKS", "DATA", "METHODS")}
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", **extra)
    return {k: v for k, v in env.items() if v is not None}


def _bash(script, *args, env, cwd, timeout=180):
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _has_torch(python: str) -> bool:
    code = "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('transformers')))"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(mode)
    return path


# --------------------------------------------------------------------------- 1. the drivers' Python

@pytest.mark.parametrize("python", [None, "/nonexistent/python"], ids=["default", "missing"])
@pytest.mark.parametrize("script", DRIVERS)
def test_driver_help_exits_0_without_a_traceback(script, python, tmp_path):
    out = _bash(ROOT / script, "-h", env=_env(PYTHON=python), cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Traceback" not in text, text
    assert "Usage" in text or "bash " in text
    if script == "run_all_evaluation.sh" and python is None and (ROOT / ".venv" / "bin" / "python").exists():
        assert "Reads RUN/adapters/<task>/" in text and "Evaluation options:" in text   # full_evaluation.py -h
    if script == "run_all_evaluation.sh" and python is not None:
        assert "setup.sh" in text


def _pythons_without_packages() -> list[str]:
    out = ["/nonexistent/python"]
    if Path("/usr/bin/python3").exists() and not _has_torch("/usr/bin/python3"):
        out.append("/usr/bin/python3")
    return out


@pytest.mark.parametrize("python", _pythons_without_packages())
@pytest.mark.parametrize("script", DRIVERS)
def test_a_python_without_the_packages_is_one_line_exit_2(script, python, tmp_path):
    run = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    out = _bash(ROOT / script, env=_env(PYTHON=python, RUN=str(run), DATA=str(data), MODEL="/nonexistent/model"),
                cwd=tmp_path, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(lines) == 1 and lines[0].startswith(NO_ENV), out.stderr
    assert python in lines[0]                  # says which PYTHON it tried
    assert "Traceback" not in out.stdout + out.stderr
    assert not run.exists()


def _marking_python(path: Path, marker: Path, name: str) -> Path:
    """An interpreter that notes its name in `marker`, then runs the tests' Python."""
    return _write(path, f'#!/bin/sh\necho {name} >> "{marker}"\nexec "{sys.executable}" "$@"\n', 0o755)


def test_the_venv_beside_the_script_comes_first_then_python_on_path(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "train_moa.sh", repo / "train_moa.sh")      # train_moa.py is not there: exits at once
    shutil.copy(ROOT / "drivers.sh", repo / "drivers.sh")
    marker = tmp_path / "used"
    bindir = tmp_path / "bin"
    _marking_python(bindir / "python", marker, "path")
    env = _env(PATH=f"{bindir}:/usr/bin:/bin")

    out = _bash(repo / "train_moa.sh", env=env, cwd=tmp_path)         # no .venv: the python on PATH
    assert NO_ENV not in out.stderr and "train_moa.py" in out.stderr, out.stderr
    assert marker.read_text().split()[-1] == "path"

    _marking_python(repo / ".venv" / "bin" / "python", marker, "venv")
    out = _bash(repo / "train_moa.sh", env=env, cwd=tmp_path)         # .venv beside the script wins
    assert NO_ENV not in out.stderr and marker.read_text().split()[-1] == "venv", out.stderr

    out = _bash(repo / "train_moa.sh", env=_env(PATH=env["PATH"], PYTHON=str(bindir / "python")), cwd=tmp_path)
    assert marker.read_text().split()[-1] == "path"                   # PYTHON=... overrides


def test_no_venv_and_a_python_without_torch_is_refused(tmp_path):
    if not Path("/usr/bin/python3").exists() or _has_torch("/usr/bin/python3"):
        pytest.skip("needs a system python3 without torch")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "train_moa.sh", repo / "train_moa.sh")
    shutil.copy(ROOT / "drivers.sh", repo / "drivers.sh")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to("/usr/bin/python3")
    out = _bash(repo / "train_moa.sh", env=_env(PATH=f"{bindir}:/usr/bin:/bin"), cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == NO_ENV, out.stderr


# --------------------------------------------------------------------------- 3 + 6. the demo's output

STUB_EVALUATION = '''
import sys
from pathlib import Path
args = sys.argv[1:]
run = Path(args[args.index("--output-dir") + 1])
table = "# Evaluation results\\n\\n| method | sentiment (accuracy) | multitask score |\\n|---|---|---|\\n| oracle | 1.000 | 1.000 |\\n"
(run / "eval").mkdir(parents=True, exist_ok=True)
(run / "eval" / "results.md").write_text(table)
print(table)          # as full_evaluation.py prints the table it wrote
'''


def _stub_repo(tmp_path: Path) -> Path:
    """run_demo.sh and run_all_evaluation.sh as they are, the steps they call stubbed."""
    repo = tmp_path / "repo"
    for name in ("run_demo.sh", "run_all_evaluation.sh", "drivers.sh"):
        _write(repo / name, (ROOT / name).read_text())
    for name in ("train_all_tasks.sh", "train_moa.sh"):
        _write(repo / name, "#!/usr/bin/env bash\nexit 0\n")
    _write(repo / "full_evaluation.py", STUB_EVALUATION)
    _write(repo / "src" / "__init__.py", "")
    _write(repo / "src" / "analysis.py", "")
    return repo


def test_the_demo_prints_the_table_once_and_a_notebook_command_that_exists_here(tmp_path):
    repo = _stub_repo(tmp_path)
    out = _bash(repo / "run_demo.sh", env=_env(PYTHON=sys.executable), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("| oracle |") == 1, out.stdout
    assert out.stdout.count("table: ") == 1, out.stdout
    notebook = [line for line in out.stdout.splitlines() if "visualize_lora.ipynb" in line]
    assert len(notebook) == 1, out.stdout
    has_jupyter = subprocess.run([sys.executable, "-m", "jupyter", "execute", "--version"],
                                 capture_output=True).returncode == 0
    if has_jupyter:
        assert "-m jupyter execute" in notebook[0] and "RUN_DIR=runs/demo" in notebook[0], notebook
    else:
        assert "pip install notebook" in notebook[0], notebook


def test_without_jupyter_the_hint_says_to_install_the_notebook(tmp_path):
    repo = _stub_repo(tmp_path)
    python = _write(tmp_path / "bin" / "python", f'''#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "jupyter" ]; then echo "No module named jupyter" >&2; exit 1; fi
exec "{sys.executable}" "$@"
''', 0o755)
    out = _bash(repo / "run_all_evaluation.sh", env=_env(PYTHON=str(python), RUN=str(tmp_path / "run")),
                cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    hint = [line for line in out.stdout.splitlines() if "visualize_lora.ipynb" in line]
    assert len(hint) == 1 and "pip install notebook" in hint[0] and "jupyter notebook" in hint[0], out.stdout
    assert "jupyter execute" not in out.stdout
    assert str(tmp_path / "run") in hint[0]          # the run folder, absolute: the kernel runs in the repository


def test_the_notebook_hint_quotes_a_run_folder_with_spaces(tmp_path):
    """The printed command can be pasted as it is: RUN_DIR and --output survive a space."""
    import shlex
    run = tmp_path / "my runs" / "run 1"
    run.mkdir(parents=True)
    out = subprocess.run(["bash", "-c", f'HERE={shlex.quote(str(ROOT))}; PYTHON={shlex.quote(sys.executable)}; '
                                        f'source "$HERE/drivers.sh"; notebook_hint {shlex.quote(str(run))}'],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout.strip().removeprefix("notebook: ").split("   (")[0])
    assert f"RUN_DIR={run}" in words, words
    if "execute" in words:
        assert f"--output={run}/visualize_lora" in words, words


# --------------------------------------------------------------------------- 2. -h texts

@dataclass
class _RequiredAndOptional:
    """Options of a made-up command: required, optional and defaulted fields."""
    title = "Made-up options"

    out: str = field(default="", metadata={"help": "output folder (required)"})
    limit: int | None = field(default=None, metadata={"help": "most items; none: all"})
    share: float = field(default=0.2, metadata={"help": "share of entries kept (top 20%)"})
    seed: int = field(default=0, metadata={"help": "random seed (default: the run's)"})
    names: tuple[str, ...] = field(default=("a", "b"), metadata={"help": "names"})


@dataclass
class EvalSomethingConfig:
    """Evaluate something."""
    x: int = field(default=1, metadata={"help": "x"})


def test_build_parser_shows_the_callers_whole_docstring_readable_groups_and_defaults():
    from src import cli

    text = cli.build_parser("made-up", __doc__.split("\n\n")[0], _RequiredAndOptional, EvalSomethingConfig).format_help()
    assert "The second paragraph of this docstring" in text            # the whole module docstring
    assert "Made-up options:" in text and "Evaluation something options:" in text
    assert "_RequiredAndOptional:" not in text and "EvalSomethingConfig:" not in text
    assert "(default: )" not in text and "(default: None)" not in text
    assert "(default: 0.2)" in text and "20%" in text                 # a literal % does not break -h
    assert "(default: a b)" in text
    flat = " ".join(text.split())
    assert "random seed (default: the run's)" in flat and "(default: 0)" not in flat   # said once
    other = cli.build_parser("made-up", "Another description.", EvalSomethingConfig).format_help()
    assert "The second paragraph" not in other and "Another description." in other


def _help_of(main, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["-h"])
    assert exc.value.code == 0
    return capsys.readouterr().out


DEFAULT = re.compile(r"(?<!/)\bdefault\b(?!/)", re.I)      # the word, not a path such as runs/default


def _entries(text: str) -> dict[str, str]:
    """{flag: its help text} of an argparse -h."""
    out, flag = {}, None
    for line in text.splitlines():
        m = re.match(r"  (--[\w-]+)", line)
        if m:
            flag = m.group(1)
            out[flag] = line
        elif flag and line.startswith("    "):
            out[flag] += " " + line.strip()
        else:
            flag = None
    return out


def test_full_evaluation_help_is_the_whole_docstring_with_readable_groups(capsys):
    import full_evaluation

    text = _help_of(full_evaluation.main, capsys)
    assert "Reads RUN/adapters/<task>/ and RUN/moa/" in text and "python full_evaluation.py --methods list" in text
    assert "Evaluation options:" in text and "Merge options:" in text
    assert not re.search(r"^\w+Config:$", text, re.M), "group titled by its class name"
    assert "(default: )" not in text and "(default: None)" not in text
    entries = _entries(text)
    assert "--output-dir" in entries and "--density" in entries
    for flag, help_ in entries.items():
        assert len(DEFAULT.findall(help_)) <= 1, (flag, help_)
    assert "(default: 16)" in entries["--batch-size"]


def test_training_help_shows_each_default_once(capsys):
    import train_individual_loras

    text = _help_of(train_individual_loras.main, capsys)
    entries = _entries(text)
    assert "Training options:" in text and "LoRA options:" in text and "Data options:" in text
    assert "(default: False)" not in entries["--shared-init"] and "per-task init seed" in entries["--shared-init"]
    for flag, help_ in entries.items():
        assert len(DEFAULT.findall(help_)) <= 1, (flag, help_)


def test_analysis_help_shows_the_whole_docstring(capsys):
    from src import analysis

    text = _help_of(analysis.main, capsys)
    assert "cosine_overall.png" in text and "comparison_multitask.png" in text


# --------------------------------------------------------------------------- synthetic results

TASKS = ["summarization", "translation", "qa", "sentiment", "nli"]
PRIMARY = {"summarization": "rougeL", "translation": "bleu", "qa": "f1", "sentiment": "accuracy", "nli": "accuracy"}
SCORES = {   # base scores 0 on nli: the bar that is not there
    "oracle": [0.59, 1.66, 86.0, 0.92, 0.25],
    "moa": [0.28, 1.98, 80.6, 0.92, 0.25],
    "base": [0.30, 0.30, 28.4, 0.50, 0.0],
}


def synthetic_summary() -> dict:
    methods = {}
    for m, scores in SCORES.items():
        per_task = {t: {"primary": PRIMARY[t], "score": v, "oracle_score": SCORES["oracle"][k],
                        "relative": v / SCORES["oracle"][k], "interval": [v * 0.8, v * 1.2 + 0.01],
                        "metrics": {PRIMARY[t]: v}, "n": 12, "seconds": 1.0, "tokens_per_s": None}
                    for k, (t, v) in enumerate(zip(TASKS, scores))}
        score = sum(c["relative"] for c in per_task.values()) / len(TASKS)
        methods[m] = {"multitask_score": score, "multitask_interval": [score - 0.1, score + 0.1], "per_task": per_task}
    meta = {"seed": 0, "git_commit": "0" * 40, "data_hash": "ab" * 32, "command": "python full_evaluation.py ...",
            "config": {"data_desc": "sample (validation, 12 examples per task, seed 0)"}}
    return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "tasks": TASKS, "scoring": "toolkit",
            "bootstrap": {}, "methods": methods, "meta": meta}


# --------------------------------------------------------------------------- 4. results.csv

def test_results_csv_reads_with_plain_pandas(tmp_path):
    import pandas as pd

    from src import evaluation as ev

    summary = synthetic_summary()
    paths = ev.write_results(tmp_path, summary)
    csv_path = next(p for p in paths if p.suffix == ".csv")
    assert not any(line.startswith("#") for line in csv_path.read_text().splitlines())
    df = pd.read_csv(csv_path)
    assert list(df.columns) == ["method", *TASKS, "multitask_score", "multitask_lo", "multitask_hi"]
    assert list(df["method"]) == list(SCORES) and len(df) == len(SCORES)
    assert df.loc[df.method == "base", "nli"].item() == 0.0
    assert df.loc[df.method == "oracle", "qa"].item() == pytest.approx(86.0)
    # the provenance is still next to it: summary.json's meta and the head of results.md
    md = next(p for p in paths if p.suffix == ".md").read_text()
    assert summary["meta"]["data_hash"][:16] in md and "command:" in md
    assert json.loads(next(p for p in paths if p.suffix == ".json").read_text())["meta"] == summary["meta"]


# --------------------------------------------------------------------------- 5. plots

@pytest.fixture
def plt():
    import matplotlib
    import matplotlib.pyplot as plt
    matplotlib.use("Agg", force=True)
    yield plt
    plt.close("all")


def _texts(ax) -> list[str]:
    return [t.get_text().strip() for t in ax.texts]


def test_per_task_plot_has_one_panel_per_task_and_a_label_on_every_bar(plt):
    from src import analysis

    summary = synthetic_summary()
    fig = analysis.plot_per_task(summary)
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(shown) == len(TASKS) == len(fig.axes)
    for ax, t in zip(shown, TASKS):
        assert t in ax.get_title()
        labels = _texts(ax)
        assert len(labels) == len(SCORES), labels
        for m, scores in SCORES.items():
            assert analysis._value(scores[TASKS.index(t)]) in labels
        assert min(lab.get_fontsize() for lab in ax.get_xticklabels()) >= 8
    nli = shown[TASKS.index("nli")]
    assert "0.000" in _texts(nli)                                # the 0 score is labelled
    title = fig.get_suptitle()
    assert "SmolLM2-135M-Instruct" in title and "12 examples per task" in title and "5 tasks" in title


def test_multitask_plot_title_states_model_tasks_and_sizes(plt):
    from src import analysis

    fig = analysis.plot_multitask(synthetic_summary())
    title = fig.axes[0].get_title()
    assert "SmolLM2-135M-Instruct" in title and "5 tasks" in title and "12 examples per task" in title
    assert len(fig.axes[0].texts) == len(SCORES)


def _cosines() -> dict:
    n = len(TASKS)
    small = [[1.0 if i == j else 0.1 * ((i + j) % 3 - 1) * (0.5 + 0.1 * i) for j in range(n)] for i in range(n)]
    small = [[small[min(i, j)][max(i, j)] for j in range(n)] for i in range(n)]      # symmetric
    return {"tasks": TASKS, "overall": small, "per_layer": {"0": small, "1": small},
            "per_module_type": {}, "norms": {t: 1.0 for t in TASKS},
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "rank": "8", "train_examples": {t: 32 for t in TASKS}}


def test_cosine_plot_scales_to_the_off_diagonal_range_and_names_the_adapters(plt):
    from src import analysis

    cos = _cosines()
    off = max(abs(v) for i, row in enumerate(cos["overall"]) for j, v in enumerate(row) if i != j)
    assert 0 < off <= 0.1
    fig = analysis.plot_cosine(cos)
    lo, hi = fig.axes[0].images[0].get_clim()
    assert (lo, hi) != (-1, 1) and hi == pytest.approx(off) and lo == pytest.approx(-off)
    title = fig.axes[0].get_title()
    assert "SmolLM2-135M-Instruct" in title and "5 tasks" in title and "32 training examples per task" in title
    layer = analysis.plot_cosine_per_layer(cos)
    assert "SmolLM2-135M-Instruct" in layer.axes[0].get_title()
    old = {k: v for k, v in cos.items() if k not in ("model", "rank", "train_examples")}   # an older cosine.json
    assert "5 tasks" in analysis.plot_cosine(old).axes[0].get_title()


def test_routing_plot_states_model_and_examples(plt):
    from src import analysis

    conf = {"method": "moa", "true": TASKS, "routed": TASKS, "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "counts": [[12 if i == j else 0 for j in range(5)] for i in range(5)]}
    title = analysis.plot_routing(conf).axes[0].get_title()
    assert "moa routing" in title and "SmolLM2-135M-Instruct" in title and "12 examples per task" in title


def test_routing_plots_read_summary_json_alone():
    """issue 26: the routing heatmaps come from summary.json's routing tables (no predictions read)."""
    from src import analysis
    summary = {"tasks": ["sentiment", "nli"], "model": "m",
               "methods": {"arrow": {"per_task": {"sentiment": {"n": 4}, "nli": {"n": 6}}}},
               "routing": {"moa": {"kind": "sequence", "accuracy": 0.8,
                                   "confusion": {"sentiment": {"sentiment": 3, "nli": 1}, "nli": {"nli": 6}}},
                           "arrow": {"kind": "token", "accuracy": 0.7,
                                     "share": {"sentiment": {"sentiment": 0.6, "nli": 0.4},
                                               "nli": {"sentiment": 0.2, "nli": 0.8}}}}}
    assert analysis.routing_methods(summary) == ["moa", "arrow"]
    moa = analysis.routing_confusion(summary, "moa")
    assert moa["true"] == moa["routed"] == ["sentiment", "nli"] and moa["counts"] == [[3, 1], [0, 6]]
    arrow = analysis.routing_confusion(summary, "arrow")
    assert arrow["share"] == [[0.6, 0.4], [0.2, 0.8]] and arrow["counts"] == [[4, 4], [6, 6]]
    assert analysis.routing_confusion(summary, "concat") is None


def test_adapters_info_reads_model_rank_and_training_size(tmp_path):
    from types import SimpleNamespace

    from src import analysis

    for t in ("nli", "qa"):
        _write(tmp_path / t / "training_config.json", json.dumps({"n_train": 32}))
    ads = {t: SimpleNamespace(base_model="smollm2-135m", config={"r": 8}) for t in ("nli", "qa")}
    info = analysis.adapters_info(tmp_path, ads)
    assert info == {"model": "smollm2-135m", "rank": "8", "train_examples": {"nli": 32, "qa": 32}}
    assert analysis.cosine_label({"tasks": ["nli", "qa"], **info}) == \
        "smollm2-135m LoRAs (r 8), 2 tasks, 32 training examples per task"


def test_plot_run_writes_the_plots_of_a_summary(tmp_path, plt):
    from src import analysis
    from src.runs import summary_path

    summary_path(tmp_path).parent.mkdir(parents=True)
    summary_path(tmp_path).write_text(json.dumps(synthetic_summary()))
    names = {p.name for p in analysis.plot_run(tmp_path, cosines=False)}
    assert {"multitask_score.png", "per_task_metrics.png"} <= names


def test_positive_integer_options_are_one_line_naming_the_flag():
    """src.cli.check_positive_ints, which the option classes share: None passes, 0, -1, 2.5, True, "2" do not."""
    from types import SimpleNamespace

    from src.cli import check_positive_ints
    from src.errors import UserError
    check_positive_ints(SimpleNamespace(smile_top_k=3, smile_rank=None), "smile_top_k", "smile_rank")
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(UserError, match=rf"^--smile-rank must be a positive integer, got {bad}$"):
            check_positive_ints(SimpleNamespace(smile_top_k=3, smile_rank=bad), "smile_top_k", "smile_rank")
