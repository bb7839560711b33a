"""Evaluation's generation engines: `hf` (transformers' `generate` in this process, as always) and
`vllm` (a vLLM OpenAI-compatible server, of which evaluation is the client).

With `--engine vllm`, full_evaluation.py either uses a running server (`--vllm-url`) or starts one
for the run on a free loopback port from the vLLM environment (`VLLM=1 bash setup.sh` builds
.venv-vllm: vLLM pins its own torch and transformers), waits for it, and stops it at the end, on
an error and on Ctrl-C. What each cell sends (docs/engines.md):

    base                        the base model, no LoRA
    a static method, oracle     its adapter, registered with the server as a LoRA (`register`)
    MoA                         our routers pick each prompt's experts on the prompt (in this process),
                                then each prompt goes out with that choice as one LoRA; a mixed batch
                                is served in one pass
    token-level routers         stay on the hf engine (Arrow, SMILE, LoRA-Mixer, moa_study)

Adapters go to the server as PEFT folders in one normal form (`export_adapter`): every module at
one rank (zero rows where an adapter's is smaller) with its scale folded into B and lora_alpha =
r, so that vLLM's scaling is exactly 1 whatever rsLoRA, rank_pattern or alpha_pattern the adapter
had. Prompts go as token ids and come back as token ids (`return_token_ids`), greedy, stopping at
the tokenizer's EOS only (the model's generation_config is not applied: `--generation-config
vllm`), so the two engines decode the same model the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from src import runs
from src.errors import UserError
from src.lora import Adapter, make_adapter, save_adapter

ENGINES = ("hf", "vllm")
RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)   # the --max-lora-rank values vLLM accepts
ROOT = Path(__file__).resolve().parent.parent
BASE_NAME = "base"                                # the name the server serves the base model under


@dataclass
class EngineConfig:
    """Which engine generates: hf (transformers, in this process) or vllm (a vLLM server)."""

    title = "Engine"

    engine: str = field(default="hf", metadata={
        "help": "hf: transformers' generate in this process; vllm: a vLLM server (static methods, base, oracle, "
                "MoA; token-level routers stay on hf; docs/engines.md)", "choices": ENGINES})
    vllm_url: str | None = field(default=None, metadata={
        "help": "a running vLLM OpenAI-compatible server (http://HOST:PORT) started with --enable-lora and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; default: start one for the run"})
    vllm_python: str = field(default=".venv-vllm/bin/python", metadata={
        "help": "the Python of the vLLM environment that serves (VLLM=1 bash setup.sh builds it)"})
    vllm_port: int = field(default=0, metadata={"help": "loopback port of the server started (0: a free one)"})
    vllm_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for the server to come up"})
    vllm_max_loras: int = field(default=8, metadata={"help": "LoRAs the server holds in one batch (--max-loras)"})
    vllm_arg: str = field(default="", metadata={
        "help": "extra arguments for the server started, as one string, e.g. --vllm-arg='--tensor-parallel-size 4'"})

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.vllm_port < 65536:
            raise UserError(f"--vllm-port must be 0 (a free port) or a port number, got {self.vllm_port}")
        if not self.vllm_timeout > 0:
            raise UserError(f"--vllm-timeout must be above 0, got {self.vllm_timeout}")
        if self.vllm_max_loras < 1:
            raise UserError(f"--vllm-max-loras must be a positive integer, got {self.vllm_max_loras}")
        try:
            shlex.split(self.vllm_arg)
        except ValueError as e:
            raise UserError(f"--vllm-arg {self.vllm_arg!r}: {e}") from None


# --------------------------------------------------------------------------- adapters in normal form

def max_rank(adapters: Sequence[Adapter]) -> int:
    return max((a.shape[0] for ad in adapters for a, _ in ad.factors.values()), default=1)


def server_rank(rank: int, what: str = "the largest adapter") -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    for r in RANKS:
        if r >= rank:
            return r
    raise UserError(f"{what} has rank {rank}: vLLM serves LoRAs up to rank {RANKS[-1]}")


def normal_form(adapter: Adapter) -> Adapter:
    """`adapter` at one rank (zero rows padded), each module's scale folded into B, scale 1."""
    r = max_rank([adapter])
    factors = {}
    for name, (a, b) in adapter.factors.items():
        pad = r - a.shape[0]
        a2 = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b2 = b * adapter.scales[name]
        b2 = torch.cat([b2, b2.new_zeros(b2.shape[0], pad)], 1) if pad else b2
        factors[name] = (a2.contiguous(), b2.contiguous())
    return make_adapter(factors, {n: 1.0 for n in factors}, adapter.base_model, name=adapter.name)  # alpha = r


def adapter_key(adapter: Adapter) -> str:
    """A name for the adapter's content (factors and scales): equal adapters share one server LoRA."""
    h = hashlib.sha256()
    for name in sorted(adapter.factors):
        a, b = adapter.factors[name]
        h.update(name.encode())
        h.update(repr(float(adapter.scales[name])).encode())
        for t in (a, b):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_adapter(adapter: Adapter, root: Path) -> tuple[str, Path]:
    """(name, folder): the adapter in normal form under root/<name>, written once (atomically)."""
    name = f"lora-{adapter_key(adapter)}"
    folder = Path(root) / name
    if not (folder / "adapter_model.safetensors").is_file():
        save_adapter(normal_form(adapter), folder)
    return name, folder


# --------------------------------------------------------------------------- the model the server loads

def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "multilora"


def served_model(model: str, say: Callable[..., None]) -> str:
    """What the server loads for --model: a hub id or a model folder as given; a GGUF (the embedded
    model) exported once, dequantised, to a cached safetensors folder that vLLM can read."""
    from src.models import load_base_model, resolve_model_path
    name, gguf = resolve_model_path(model)
    if not gguf:
        return name
    path = Path(name) / gguf
    digest = runs.file_digest(path)[:16]
    folder = cache_root() / "models" / f"{Path(gguf).stem}-{digest}"
    if (folder / "config.json").is_file():
        return str(folder)
    say(f"exporting {path} once to {folder} (safetensors, for vLLM)")
    lm, tokenizer = load_base_model(model, "cpu", "float32")
    tmp = runs.atomic_dir(folder)
    lm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    runs.replace_dir(tmp, folder)
    return str(folder)


# --------------------------------------------------------------------------- the server

def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(log: Path) -> str:
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if "Error" in x or "error" in x]
    return (errors or lines or [""])[-1][:300]


class Server:
    """A vLLM server for one evaluation run, as a context manager: started on enter (waited for,
    with a progress line), stopped on exit, whatever ended the block (its process group gets
    SIGTERM, then SIGKILL after 15 s)."""

    def __init__(self, cfg: EngineConfig, model: str, dtype: str, rank: int, log: Path,
                 say: Callable[..., None] = print):
        python = Path(cfg.vllm_python)
        if not python.is_absolute() and not python.exists():
            python = ROOT / python
        if not python.is_file():
            raise UserError(f"--engine vllm: no vLLM environment at {cfg.vllm_python} (build it with "
                            f"VLLM=1 bash setup.sh, or pass --vllm-url of a running server)")
        port = cfg.vllm_port or free_port()
        if cfg.vllm_port and not port_free(port):
            raise UserError(f"--vllm-port {port}: 127.0.0.1:{port} is in use")
        self.url, self.log, self.say, self.timeout = f"http://127.0.0.1:{port}", Path(log), say, cfg.vllm_timeout
        self.cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                    "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port),
                    "--dtype", dtype, "--enable-lora", "--max-lora-rank", str(rank),
                    "--max-loras", str(cfg.vllm_max_loras), "--generation-config", "vllm", "--skip-tokenizer-init",
                    # on the CPU build, torch.compile retraces the model for every new batch shape (minutes
                    # each on SmolLM2-135M, measured): eager there; CUDA keeps its graphs
                    *([] if torch.cuda.is_available() else ["--enforce-eager"]), *shlex.split(cfg.vllm_arg)]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {"VLLM_CPU_KVCACHE_SPACE": "2",      # GiB (vLLM's CPU default takes most of the memory); CUDA ignores it
               **os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=_die_with_parent)
        if threading.current_thread() is threading.main_thread():   # SIGTERM stops the server too
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self) -> None:
        start, shown = time.monotonic(), -10.0
        while True:
            waited = time.monotonic() - start
            if self.proc.poll() is not None:
                raise UserError(f"the vLLM server exited with code {self.proc.returncode} while starting "
                                f"({_last_line(self.log)}; log: {self.log})")
            if healthy(self.url):
                self.say(f"vLLM server up at {self.url} after {waited:.0f} s (log: {self.log})")
                return
            if waited > self.timeout:
                raise UserError(f"the vLLM server did not come up within {self.timeout:g} s (--vllm-timeout; "
                                f"log: {self.log})")
            if waited - shown >= 10:
                self.say(f"waiting for the vLLM server at {self.url}: {waited:.0f} s")
                shown = waited
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue

    def __exit__(self, *exc) -> None:
        self.stop()
        if getattr(self, "_sigterm", None) is not None:
            signal.signal(signal.SIGTERM, self._sigterm)


def _interrupt(signum, frame):
    raise KeyboardInterrupt          # a terminated evaluation leaves through its `with`: the server stops


def _die_with_parent() -> None:
    """In the server's process: SIGTERM when the evaluation process dies, even by SIGKILL (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- the client

class Client:
    """Greedy generation on a vLLM server: prompts as token ids, one LoRA (or none) per prompt."""

    def __init__(self, url: str, adapters_root: Path, log: Path | None = None, workers: int = 8):
        self.url, self.root, self.log, self.workers = url.rstrip("/"), Path(adapters_root), log, workers
        self.loaded: set[str] = set()

    def _post(self, path: str, body: dict, timeout: float = 3600) -> tuple[int, str]:
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (OSError, ValueError) as e:
            where = f"; log: {self.log}, {_last_line(self.log)}" if self.log else ""
            raise UserError(f"the vLLM server at {self.url} stopped answering ({getattr(e, 'reason', e)}{where})") \
                from None

    def register(self, adapter: Adapter, what: str) -> str:
        """The server's name for `adapter` (exported and loaded once)."""
        name, folder = export_adapter(adapter, self.root)
        if name in self.loaded:
            return name
        status, text = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())})
        if status != 200 and "already" not in text:
            try:
                text = json.loads(text).get("error", {}).get("message", text)
            except (ValueError, AttributeError):
                pass
            raise UserError(f"the vLLM server refused {what} (rank {max_rank([adapter])}, "
                            f"{len(adapter.factors)} modules): {' '.join(str(text).split())[:300]}")
        self.loaded.add(name)
        return name

    def _complete(self, model: str, prompts: list[list[int]], max_tokens: int, eos: int) -> list[list[int]]:
        body = {"model": model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0, "n": 1,
                "ignore_eos": True, "stop_token_ids": [eos], "return_token_ids": True,
                "skip_special_tokens": False}
        status, text = self._post("/v1/completions", body)
        if status != 200:
            raise UserError(f"the vLLM server answered {status} for {model}: {' '.join(text.split())[:300]}")
        choices = sorted(json.loads(text)["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            ids = list(c.get("token_ids") or [])
            out.append(ids[:ids.index(eos)] if eos in ids else ids)
        return out

    def generate(self, prompt_ids: Sequence[Sequence[int]], loras: Sequence[str], max_tokens: int, eos: int,
                 batch_size: int = 64, progress=None) -> list[list[int]]:
        """Greedy completions, in order; prompts of one LoRA go together, all groups at once (the
        server batches them), `batch_size` prompts per request."""
        jobs = []
        for lora in dict.fromkeys(loras):
            idx = [i for i, x in enumerate(loras) if x == lora]
            jobs += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        out: list[list[int] | None] = [None] * len(prompt_ids)

        def run(idx):
            got = self._complete(loras[idx[0]], [list(prompt_ids[i]) for i in idx], max_tokens, eos)
            return idx, got
        pool = ThreadPoolExecutor(max(1, min(self.workers, len(jobs))))
        try:
            for idx, got in pool.map(run, jobs):
                for i, ids in zip(idx, got):
                    out[i] = ids
                if progress:
                    progress(len(idx))
        finally:   # on Ctrl-C or an error: do not wait for requests in flight (stopping the server ends them)
            pool.shutdown(wait=False, cancel_futures=True)
        return out


def adapters_in(value) -> list[Adapter]:
    """Every Adapter inside build results (a `compose.Built`, or dicts and lists of them)."""
    if isinstance(value, Adapter):
        return [value]
    if hasattr(value, "reused") and hasattr(value, "value"):        # compose.Built
        return adapters_in(value.value)
    if isinstance(value, dict):
        return [a for v in value.values() for a in adapters_in(v)]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in adapters_in(v)]
    return []


def connect(stack, cfg: EngineConfig, model: str, dtype: str, rank: int, folder: Path,
            say: Callable[..., None] = None) -> Client:
    """A client of --vllm-url, or of a server started for the run (entered into `stack`, which stops
    it). folder: where the exported adapters and the server's log go (the server must read them)."""
    say = say or note
    folder = Path(folder)
    if cfg.vllm_url:
        if not healthy(cfg.vllm_url.rstrip("/")):
            raise UserError(f"--vllm-url {cfg.vllm_url}: no vLLM server answers there (GET /health)")
        return Client(cfg.vllm_url, folder / "adapters")
    server = stack.enter_context(Server(cfg, served_model(model, say), dtype, server_rank(rank), folder / "server.log",
                                        say))
    return Client(server.url, folder / "adapters", server.log)


def server_version(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/version", timeout=5) as r:
            return json.loads(r.read().decode()).get("version")
    except (OSError, ValueError):
        return None


def note(*args) -> None:
    print(*args, file=sys.stderr)
