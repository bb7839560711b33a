"""The CUDA path checked against the CPU path: run by `.ci/gpu` on a machine with a GPU.

Every test here is marked `gpu` and skipped where CUDA is absent (CI never has it). What the
CPU suite checks on CPU, these check on the GPU: a training step in bf16 autocast within
tolerance of float32, merged forward equal to unmerged (float32 and bf16), MoA, Arrow, SMILE and
LoRA-Mixer forward on CUDA equal to their CPU forward, and the shell pipeline end to end on
CUDA (tiny model, bf16, real data). GPU_TESTS_DEVICE=cpu runs them on the CPU instead, to check
the tests themselves on a machine without a GPU (the comparisons are then trivially close).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import random_adapter, save_tiny, tiny_model, trained_like_adapter
from trainutil import write_task_data

from src.arrow import ArrowConfig, ArrowRouter
from src.config import DataConfig, TrainConfig
from src.lora import LoraConfig, add_lora, apply_adapter, folded, merge_lora, unload_lora, unmerge_lora
from src.mixer import LoRAMixer
from src.moa import MixtureOfLoRAs, MoAConfig
from src.smile import SmileConfig, SmileRouter
from src.training import collate, encode_examples, fit, load_data, target_only_loss

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("GPU_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="no CUDA device (the GPU suite runs with .ci/gpu)")]

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12], [8, 61, 2, 300, 77, 140, 18, 33]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
TASKS = ["sentiment", "nli", "qa"]


def on(model: torch.nn.Module, device: str, dtype=torch.float32) -> torch.nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def forward(model, ids=IDS, mask=MASK):
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()


def library(model):
    return {t: random_adapter(model, 10 + i, name=t) for i, t in enumerate(TASKS)}


# ------------------------------------------------------------------ training in bf16 autocast

@pytest.fixture(scope="module")
def items(tmp_path_factory, tokenizer):
    data = write_task_data(tmp_path_factory.mktemp("data"), n_train=16, n_val=8)
    cfg = DataConfig(tasks="sentiment", data_dir=str(data), train_size=16, eval_size=8)
    train, val = load_data(cfg, ["sentiment"], "train"), load_data(cfg, ["sentiment"], "validation")
    return (encode_examples(tokenizer, train["sentiment"], 64, 8), encode_examples(tokenizer, val["sentiment"], 64, 8))


def test_a_training_step_in_bf16_autocast_is_close_to_float32(items, tokenizer):
    base = tiny_model("qwen2")
    torch.manual_seed(0)
    add_lora(base, LoraConfig(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    batch = collate(items[0][:8], tokenizer.pad_token_id)
    grads, losses = {}, {}
    for amp in (False, True):
        model = on(base, DEVICE)
        b = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=amp):
            loss = target_only_loss(model, b) / b["n_tokens"]
        loss.backward()
        losses[amp] = float(loss.detach())
        grads[amp] = torch.cat([p.grad.flatten().float().cpu() for n, p in model.named_parameters() if "lora_" in n])
    assert abs(losses[True] - losses[False]) <= 0.02 * abs(losses[False])
    cos = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert cos > 0.99, f"bf16 autocast gradient direction differs from float32 (cosine {cos:.4f})"


def test_training_under_autocast_follows_float32(items, tokenizer, tmp_path):
    """Six optimizer steps with fit(amp=True) move the LoRA like fit(amp=False) (relative 5%)."""
    out = {}
    for amp in (False, True):
        model = tiny_model("qwen2").to(DEVICE)
        torch.manual_seed(0)
        add_lora(model, LoraConfig(rank=4, alpha=8))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        start = {n: p.detach().float().cpu().clone() for n, p in params.items()}
        cfg = TrainConfig(batch_size=4, grad_accum=1, lr=5e-3, epochs=1.0, max_steps=6, eval_every=0, patience=0,
                          save_every=0, log_every=2, progress=False)
        fit(model, params, items[0], items[1], cfg=cfg, seed=0, name="sentiment", pad_id=tokenizer.pad_token_id,
            state_dir=tmp_path / f"ckpt{amp}", log_path=tmp_path / f"log{amp}.jsonl", amp=amp)
        out[amp] = torch.cat([(p.detach().float().cpu() - start[n]).flatten() for n, p in params.items()])
    err = (out[True] - out[False]).norm() / out[False].norm()
    assert out[False].norm() > 0 and err < 0.05, f"bf16 update differs from float32 by {err:.3f} (relative)"


# ------------------------------------------------------------------ merged equals unmerged

@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_merged_forward_equals_unmerged_and_the_weights_come_back_exactly(dtype, atol):
    model = on(tiny_model("llama"), DEVICE, dtype)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = trained_like_adapter(tiny_model("llama"), 0, std=0.5)
    apply_adapter(model, adapter)
    layered = forward(model)
    merge_lora(model)                     # LoRALinear's own fold, then back
    merged = forward(model)
    unmerge_lora(model)
    unload_lora(model)
    torch.testing.assert_close(merged, layered, atol=atol, rtol=0)
    with torch.no_grad():                 # unmerge subtracts again: exact only up to rounding
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    with folded(model, adapter):          # evaluation's fold: restored from a copy
        torch.testing.assert_close(forward(model), layered, atol=atol, rtol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n          # restored exactly, bf16 included


# ------------------------------------------------------------------ routers: CUDA equals CPU

def _routers_agree(build, atol=2e-4):
    cpu_model, dev_model = tiny_model("qwen2"), on(tiny_model("qwen2"), DEVICE)
    adapters = library(cpu_model)
    cpu_router, dev_router = build(cpu_model, adapters), build(dev_model, adapters)
    with cpu_router.session():
        want = forward(cpu_model)
    with dev_router.session():
        got = forward(dev_model)
    assert (want - forward(tiny_model("qwen2"))).abs().max() > 1e-3      # the experts do something
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    return cpu_router, dev_router


@pytest.mark.parametrize("router", ["study", "block"])
def test_moa_on_cuda_equals_cpu(router):
    def build(model, adapters):
        moa = MixtureOfLoRAs(model, adapters, MoAConfig(router=router))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for r in moa.routers:
                r.weight.copy_(torch.randn(r.weight.shape, generator=g).to(r.weight))
                r.bias.copy_(torch.randn(r.bias.shape, generator=g).to(r.bias))
        return moa
    cpu, dev = _routers_agree(build)
    assert torch.equal(cpu.router_logits().argmax(-1), dev.router_logits().cpu().argmax(-1))


@pytest.mark.parametrize("k", [1, 3])
def test_arrow_on_cuda_equals_cpu(k):
    _routers_agree(lambda model, adapters: ArrowRouter(model, adapters, ArrowConfig(arrow_top_k=k)))


@pytest.mark.parametrize("k", [1, 3])
def test_smile_on_cuda_equals_cpu(k):
    _routers_agree(lambda model, adapters: SmileRouter(model, adapters, SmileConfig(smile_top_k=k, smile_gate_k=2,
                                                                                    smile_gate_scale="singular")))


@pytest.mark.parametrize("k", [1, 3])
def test_lora_mixer_on_cuda_equals_cpu(k):
    mods = [n for n, m in tiny_model("qwen2").named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
    _routers_agree(lambda model, adapters: LoRAMixer(model, adapters, mods, top_k=k, tasks=TASKS, seed=3))


def test_moa_generation_on_cuda_equals_cpu():
    """Greedy generation through the routed model gives the same tokens on both devices."""
    outs = []
    for device in ("cpu", DEVICE):
        model = on(tiny_model("qwen2"), device)
        moa = MixtureOfLoRAs(model, library(tiny_model("qwen2")), MoAConfig())
        with torch.no_grad(), moa.session():
            ids = model.generate(input_ids=IDS.to(device), attention_mask=MASK.to(device), max_new_tokens=6,
                                 do_sample=False, pad_token_id=1)
        outs.append(ids.cpu())
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ the pipeline on CUDA

def test_the_pipeline_runs_end_to_end_on_cuda_in_bf16(tmp_path):
    data = ROOT.parent / "shared" / "data"
    if not data.is_dir():
        data = write_task_data(tmp_path / "data", tasks=("sentiment", "nli", "translation"), n_train=16, n_val=12)
    model = save_tiny(tmp_path / "tiny-qwen2", "qwen2")
    run = tmp_path / "run"
    env = dict(os.environ, MODEL=str(model), TASKS="sentiment,nli,translation", RUN=str(run), DATA=str(data),
               PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               METHODS="all", MPLBACKEND="Agg")
    dev = ["--device", DEVICE]
    small = ["--train-size", "8", "--eval-size", "4", "--max-len", "160", "--max-target-len", "24",
             "--batch-size", "4", "--no-progress", *dev]
    steps = ["--lr", "1e-2", "--eval-every", "2", "--save-every", "2"]
    for cmd, extra in ((["train_all_tasks.sh", *small, "--max-steps", "4", *steps], {}),
                       (["train_all_tasks.sh", *small, "--max-steps", "4", *steps, "--multitask",
                         "--multitask-steps", "2"], {}),
                       (["train_moa.sh", *small, "--max-steps", "4", *steps], {}),
                       *((["train_moa.sh", *small, "--max-steps", "2", *steps, "--mixer-regime", regime],
                          {"SYSTEM": "lora_mixer"}) for regime in ("plug", "finetune", "joint")),
                       (["train_text_to_lora.py", "--model", str(model), "--tasks", "sentiment,nli,translation",
                         "--output-dir", str(run), "--encoder", "base", "--max-steps", "2", "--eval-every", "2",
                         "--save-every", "2", "--no-progress", *dev], {}),
                       (["run_all_evaluation.sh", "--eval-size", "4", "--batch-size", "4", "--max-new-tokens", "4",
                         "--max-prompt-len", "128", "--retrieval-encoder", "base", *dev], {})):
        runner = [sys.executable] if cmd[0].endswith(".py") else ["bash"]
        out = subprocess.run([*runner, str(ROOT / cmd[0]), *cmd[1:]], cwd=tmp_path, env={**env, **extra},
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd[0]} exited {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert {"base", "oracle", "moa", "lora_mixer", "lora_mixer_finetune", "lora_mixer_joint", "t2l", "weight_sum",
            "ties", "smile", "multitask_lora"} <= set(summary["methods"])
    cells = list((run / "eval" / "cells").rglob("*.json"))
    assert len(cells) >= 5 * 3
    want = "bfloat16" if DEVICE.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    for cell in cells:   # every cell ran in the device's default dtype, and its scores are numbers
        data = json.loads(cell.read_text())
        assert data["fingerprint"]["dtype"] == want, cell
        assert all(v == v for v in data["result"].values() if isinstance(v, float)), cell
    for task in ("sentiment", "nli", "translation"):
        trained = json.loads((run / "adapters" / task / "training_config.json").read_text())
        assert trained["steps"] == 4 and trained["final_train_loss"] == trained["final_train_loss"], task


@pytest.mark.skipif(not (ROOT / ".venv-vllm" / "bin" / "python").is_file(),
                    reason="no .venv-vllm (VLLM=1 bash setup.sh installs the official vllm wheel on a GPU machine)")
def test_the_vllm_engine_on_cuda_equals_the_hf_engine(tmp_path):
    """base, oracle, two merges and MoA in float32 on the GPU: the vLLM engine's greedy generations
    equal the hf engine's on at least 95% of the prompts (tests/test_vllm.py does the same on CPU)."""
    model = save_tiny(tmp_path / "tiny", "qwen2", hidden=128)        # head_dim 32
    run = tmp_path / "run"
    common = ["--model", str(model), "--tasks", "sentiment,nli", "--data", "sample", "--train-size", "8",
              "--eval-size", "4", "--max-len", "160", "--max-target-len", "16", "--batch-size", "4", "--no-progress",
              "--output-dir", str(run), "--max-steps", "4", "--lr", "1e-2", "--eval-every", "2", "--save-every", "0",
              "--device", DEVICE]
    for script in ("train_individual_loras.py", "train_moa.py"):
        subprocess.run([sys.executable, str(ROOT / script), *common], cwd=ROOT, check=True, capture_output=True)
    runs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        subprocess.run(["cp", "-r", str(run), str(out)], check=True)
        subprocess.run([sys.executable, str(ROOT / "full_evaluation.py"), "--model", str(model), "--output-dir",
                        str(out), "--tasks", "sentiment,nli", "--data", "sample", "--eval-size", "8",
                        "--max-new-tokens", "8", "--methods", "weight_sum,ties,moa", "--device", DEVICE,
                        "--dtype", "float32", "--engine", engine], cwd=ROOT, check=True, capture_output=True)
        runs[engine] = {(p.parent.name, p.stem): {r["id"]: r["raw"] for r in json.loads(p.read_text())["records"]}
                        for p in (out / "eval" / "cells").glob("*/*.json")}
    same = sum(runs["hf"][c][i] == runs["vllm"][c][i] for c in runs["hf"] for i in runs["hf"][c])
    total = sum(len(v) for v in runs["hf"].values())
    assert len(runs["hf"]) == 10 and same / total >= 0.95, (same, total)
