"""Train one LoRA per task on a frozen base model.

Usage:
    # CPU demo: the embedded SmolLM2-135M, bundled sample data, a few minutes
    python train_individual_loras.py --preset demo --output-dir runs/demo

    # the study's setting on a GPU: r 8, alpha 16, lr 5e-5, batch 2, up to 10 epochs with
    # early stopping (patience 3, every 100 steps), 5,000 training examples per task
    python train_individual_loras.py --preset paper --model Qwen/Qwen2-1.5B --output-dir runs/qwen2-1.5b

    # one task on several GPUs, data-parallel (global batch = batch-size * grad-accum * GPUs)
    torchrun --nproc-per-node 4 train_individual_loras.py --preset paper --tasks qa --output-dir RUN

    # continue a killed run / retrain finished tasks
    python train_individual_loras.py ... --resume        python train_individual_loras.py ... --force

    # the multitask baseline: one adapter on the union of the tasks' training examples, with the
    # task adapters' flags and as many steps as they took together (--multitask-steps N: others)
    python train_individual_loras.py ... --multitask

Writes, per task, RUN/adapters/<task>/: adapter_config.json + adapter_model.safetensors
(PEFT format), training_config.json (resolved config, seed, git commit, data hash, result)
and log.jsonl (loss, lr, tokens/s, validation loss); with --multitask, RUN/adapters/_multitask/
instead (its "_" keeps it out of the task set; src/multitask.py). The folder appears only when complete
(written beside, then renamed); a task whose folder is complete is skipped unless --force.
Resumable state lives in RUN/checkpoints/<task>/ until the task finishes; while a process
trains a task it holds RUN/checkpoints/<task>.lock, and a second process is refused by name.
All inputs (tasks, data, model, sizes) are checked before any training starts.
"""
from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch

from src import multitask, runs, stages
from src.cli import config_dict, parse_configs
from src.config import PRESETS, DataConfig, TrainConfig
from src.errors import run_main
from src.lora import LoraConfig, add_lora, adapter_from_model, lora_layers, save_adapter, unload_lora
from src.models import load_base_model, model_identity, resolve_model_path
from src.multitask import MultitaskConfig
from src.tasks import data_hash, resolve_tasks
from src.training import (TrainingDiverged, barrier, encode_examples, finish_distributed, fit, init_distributed,
                          load_data, process_device)


def init_seed(seed: int, task: str, shared: bool) -> int:
    """The LoRA-init seed of a task: `seed`, offset by a stable hash of the task name."""
    return seed if shared else seed + zlib.crc32(task.encode())


def main(argv=None) -> None:
    # ------------------------------------------------------------------ config
    (data_cfg, train_cfg, lora_cfg, mt_cfg), _ = parse_configs(
        argv, "train_individual_loras.py", __doc__, DataConfig, TrainConfig, LoraConfig, MultitaskConfig,
        presets=PRESETS)
    tasks = resolve_tasks(data_cfg.tasks)
    resolve_model_path(train_cfg.model)  # an unknown path or alias fails here, before any loading
    run = Path(train_cfg.output_dir)
    d = init_distributed(train_cfg.device)
    say = stages.main_printer(d)
    # the tasks to train are checked writable and locked (RUN/checkpoints/<task>.lock) before any loading
    failed: list[str] = []
    # what a finished adapter was built from: one is reused only when this matches (else refused; --force)
    resolved = config_dict(data_cfg, train_cfg, lora_cfg)
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * d.world

    def built_from(stage):
        return stages.fingerprint(resolved, ignore={"tasks", "model"}, task=stage.task,
                                  model=model_identity(train_cfg.model), global_batch=global_batch)
    if mt_cfg.multitask:
        failed = _train_multitask(run, tasks, data_cfg, train_cfg, lora_cfg, mt_cfg, d, say)
    else:
        with stages.claim([stages.adapter_stage(run, t) for t in tasks], train_cfg, say, d,
                          built_from=built_from) as todo:
            if todo:
                failed = _train(todo, run, data_cfg, train_cfg, lora_cfg, d, say, built_from)
    stages.remove_empty_checkpoints(run, d)
    finish_distributed(d)
    if failed:
        print(f"error: training diverged for {', '.join(failed)}; see the messages above", file=sys.stderr)
        raise SystemExit(1)


def _train(todo, run, data_cfg, train_cfg, lora_cfg, d, say, built_from) -> list[str]:
    """Train the stages of `todo` in turn; the tasks whose training diverged."""
    # ------------------------------------------------------------------- setup
    # Everything is loaded and checked before anything is written.
    names = [stage.task for stage in todo]
    train_data = load_data(data_cfg, names, "train")
    val_data = load_data(data_cfg, names, "validation")
    model, tokenizer = load_base_model(train_cfg.model, process_device(d, train_cfg.device), train_cfg.dtype,
                                       max_len=data_cfg.max_len)
    amp = model.device.type == "cuda" and model.dtype != torch.float32
    encoded = {t: (encode_examples(tokenizer, train_data[t], data_cfg.max_len, data_cfg.max_target_len),
                   encode_examples(tokenizer, val_data[t], data_cfg.max_len, data_cfg.max_target_len))
               for t in names}
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * d.world
    resolved = config_dict(data_cfg, train_cfg, lora_cfg)
    say(f"model {train_cfg.model} on {model.device} ({model.dtype}); tasks {', '.join(names)}; "
        f"global batch {global_batch} ({d.world} process{'es' if d.world > 1 else ''})")

    # --------------------------------------------------------------------- run
    failed = []
    for stage in todo:
        task = stage.task
        stages.restart(stage, train_cfg, d)
        hashes = {"train": data_hash({task: train_data[task]}), "validation": data_hash({task: val_data[task]})}
        # Each task is its own stage: --tasks may list other tasks on a --resume.
        fingerprint = stages.fingerprint(resolved, ignore={"tasks"}, task=task, data_hash=hashes["train"],
                                      global_batch=global_batch)

        # The same init in every process and every rerun; a different one per task unless
        # --shared-init, so that tasks' A matrices do not start (and stay) alike.
        torch.manual_seed(init_seed(data_cfg.seed, task, train_cfg.shared_init))
        add_lora(model, lora_cfg)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        try:
            result = fit(model, params, encoded[task][0], encoded[task][1], cfg=train_cfg, seed=data_cfg.seed,
                         name=task, pad_id=tokenizer.pad_token_id, state_dir=stage.state_dir,
                         log_path=stage.log_path, d=d, amp=amp, fingerprint=fingerprint)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(task)
            unload_lora(model)
            continue

        # ---------------------------------------------------------------- save
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in result.params.items():
                named[k].copy_(v)
        if d.main:
            # the base model as a resolved path (or hub id / alias): `runs/../m` and `m` agree
            adapter = adapter_from_model(model, base_model=model_identity(train_cfg.model), name=task)
            info = {"task": task, "seed": data_cfg.seed, "git_commit": runs.git_commit(), "data_hash": hashes,
                    "model": train_cfg.model, "world_size": d.world, "global_batch": global_batch,
                    "n_train": len(train_data[task]), "n_validation": len(val_data[task]),
                    "selection_ids": [ex.id for ex in val_data[task]]}   # evaluation leaves these out
            _publish(stage, adapter, info, result, model, resolved, built_from(stage), say)
        barrier(d)
        unload_lora(model)

    return failed


def _publish(stage, adapter, info: dict, result, model, resolved: dict, built_from, say) -> None:
    """Publish a trained adapter with its training_config.json: `info` (what the trainer knows) and
    the result's record, then one line naming it."""
    info = {**info, "steps": result.steps, "best_step": result.best_step, "best_val_loss": result.best_val_loss,
            "stopped_early": result.stopped_early, "final_train_loss": result.final_train_loss,
            "tokens": result.tokens, "elapsed_s": round(result.elapsed_s, 2),
            "lora_modules": len(lora_layers(model)), "config": resolved,
            stages.BUILT_FROM: built_from, "versions": runs.versions()}
    with stages.publish(stage) as folder:
        save_adapter(adapter, folder, extra_json={"training_config.json": info})
    val = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    say(f"{info['task']}: {result.steps} steps, best validation loss {val}"
        f"{' (stopped early)' if result.stopped_early else ''} -> {stage.out_dir}")


def _train_multitask(run, tasks, data_cfg, train_cfg, lora_cfg, mt_cfg, d, say) -> list[str]:
    """RUN/adapters/_multitask: one adapter on the union of the tasks' training examples, trained as
    each task adapter is, for as many steps as they took together (src/multitask.py). Returns
    ["_multitask"] when its training diverged."""
    # ------------------------------------------------------------------- setup
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * d.world
    resolved = config_dict(data_cfg, train_cfg, lora_cfg, mt_cfg)
    identity = model_identity(train_cfg.model)
    train_data = load_data(data_cfg, tasks, "train")          # the default step total counts them
    per_task = multitask.task_steps(run, tasks, {t: len(train_data[t]) for t in tasks}, global_batch,
                                    train_cfg.epochs, train_cfg.max_steps)
    steps = mt_cfg.multitask_steps or sum(v["steps"] for v in per_task.values())

    def built_from(stage):
        return stages.fingerprint(resolved, ignore={"tasks", "model"}, tasks=list(tasks), model=identity,
                                  global_batch=global_batch, steps=steps)
    with stages.claim([multitask.stage(run)], train_cfg, say, d, built_from=built_from) as todo:
        if not todo:
            return []
        stage = todo[0]
        val_data = load_data(data_cfg, tasks, "validation")    # each task's own subset, as its adapter's
        selection = {t: [ex.id for ex in val_data[t]] for t in tasks}
        for note in multitask.recipe_notes(run, tasks, resolved, identity, global_batch, selection):
            say(f"note: {note}")
        model, tokenizer = load_base_model(train_cfg.model, process_device(d, train_cfg.device), train_cfg.dtype,
                                           max_len=data_cfg.max_len)
        amp = model.device.type == "cuda" and model.dtype != torch.float32
        train_items = [it for t in tasks for it in encode_examples(tokenizer, train_data[t], data_cfg.max_len,
                                                                   data_cfg.max_target_len)]
        val_items = [it for t in tasks for it in encode_examples(tokenizer, val_data[t], data_cfg.max_len,
                                                                 data_cfg.max_target_len)]
        cfg = multitask.schedule(train_cfg, steps, len(train_items), global_batch)
        source = (f"--multitask-steps {steps}" if mt_cfg.multitask_steps else
                  "the task adapters' " + " + ".join(f"{t} {v['steps']}" for t, v in per_task.items()))
        say(f"model {train_cfg.model} on {model.device} ({model.dtype}); the multitask adapter over "
            f"{', '.join(tasks)}: {len(train_items)} examples, {steps} steps ({source}), global batch {global_batch}")

        # --------------------------------------------------------------------- run
        stages.restart(stage, train_cfg, d)
        hashes = {"train": data_hash(train_data), "validation": data_hash(val_data)}
        fingerprint = stages.fingerprint(resolved, ignore={"tasks"}, tasks=list(tasks), data_hash=hashes["train"],
                                         global_batch=global_batch, steps=steps)
        torch.manual_seed(init_seed(data_cfg.seed, runs.MULTITASK, train_cfg.shared_init))
        add_lora(model, lora_cfg)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        try:
            result = fit(model, params, train_items, val_items, cfg=cfg, seed=data_cfg.seed, name=runs.MULTITASK,
                         pad_id=tokenizer.pad_token_id, state_dir=stage.state_dir, log_path=stage.log_path, d=d,
                         amp=amp, fingerprint=fingerprint)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return [runs.MULTITASK]

        # ---------------------------------------------------------------- save
        with torch.no_grad():
            named = dict(model.named_parameters())
            for k, v in result.params.items():
                named[k].copy_(v)
        if d.main:
            adapter = adapter_from_model(model, base_model=identity, name=runs.MULTITASK)
            info = {"task": runs.MULTITASK, "tasks": list(tasks), "seed": data_cfg.seed, "git_commit": runs.git_commit(),
                    "data_hash": hashes, "model": train_cfg.model, "world_size": d.world, "global_batch": global_batch,
                    "n_train": len(train_items), "n_train_per_task": {t: len(train_data[t]) for t in tasks},
                    "n_validation": len(val_items), "selection_ids": selection,   # evaluation leaves these out
                    "planned_steps": steps, "multitask_steps": mt_cfg.multitask_steps, "task_steps": per_task,
                    "schedule": {"epochs": cfg.epochs, "max_steps": cfg.max_steps}}
            _publish(stage, adapter, info, result, model, resolved, built_from(stage), say)
        barrier(d)
        unload_lora(model)
    return []


if __name__ == "__main__":
    sys.exit(run_main(main))
