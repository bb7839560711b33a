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
from src.training import (encode_examples, finish_distributed, fit_best, init_distributed, load_data,
                          process_device)


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
    # the stages to train are checked writable and locked (RUN/checkpoints/<task>.lock) before any loading
    recipe = (MultitaskRecipe(run, tasks, data_cfg, train_cfg, lora_cfg, mt_cfg, d, say) if mt_cfg.multitask
              else AdapterRecipe(run, tasks, data_cfg, train_cfg, lora_cfg, d, say))
    failed = stages.run_recipe(recipe, run, train_cfg, say, d)
    finish_distributed(d)
    if failed:
        print(f"error: training diverged for {', '.join(failed)}; see the messages above", file=sys.stderr)
        raise SystemExit(1)


class AdapterRecipe:
    """RUN/adapters/<task> for each task (`stages.Recipe`): a LoRA on the frozen base model."""

    def __init__(self, run, tasks, data_cfg, train_cfg, lora_cfg, d, say):
        self.run, self.tasks, self.data_cfg, self.train_cfg, self.lora_cfg, self.d, self.say = \
            run, tasks, data_cfg, train_cfg, lora_cfg, d, say
        self.resolved = config_dict(data_cfg, train_cfg, lora_cfg)
        self.global_batch = train_cfg.batch_size * train_cfg.grad_accum * d.world
        self.identity = model_identity(train_cfg.model)

    def stages(self):
        return [stages.adapter_stage(self.run, t) for t in self.tasks]

    def built_from(self, stage):
        """What a finished adapter was built from: one is reused only when this matches (else refused; --force)."""
        return stages.fingerprint(self.resolved, ignore={"tasks", "model"}, task=stage.task, model=self.identity,
                                  global_batch=self.global_batch)

    def setup(self, todo):
        # ------------------------------------------------------------------- setup
        # Everything is loaded and checked before anything is written.
        names = [stage.task for stage in todo]
        data_cfg, train_cfg = self.data_cfg, self.train_cfg
        self.train_data = load_data(data_cfg, names, "train")
        self.val_data = load_data(data_cfg, names, "validation")
        self.model, tokenizer = load_base_model(train_cfg.model, process_device(self.d, train_cfg.device),
                                                train_cfg.dtype, max_len=data_cfg.max_len)
        self.pad_id = tokenizer.pad_token_id
        self.encoded = {t: (encode_examples(tokenizer, self.train_data[t], data_cfg.max_len, data_cfg.max_target_len),
                            encode_examples(tokenizer, self.val_data[t], data_cfg.max_len, data_cfg.max_target_len))
                        for t in names}
        self.say(f"model {train_cfg.model} on {self.model.device} ({self.model.dtype}); tasks {', '.join(names)}; "
                 f"global batch {self.global_batch} ({self.d.world} process{'es' if self.d.world > 1 else ''})")

    def train(self, stage):
        # --------------------------------------------------------------------- run
        task = stage.task
        hashes = {"train": data_hash({task: self.train_data[task]}),
                  "validation": data_hash({task: self.val_data[task]})}
        # Each task is its own stage: --tasks may list other tasks on a --resume.
        fingerprint = stages.fingerprint(self.resolved, ignore={"tasks"}, task=task, data_hash=hashes["train"],
                                         global_batch=self.global_batch)
        # The same init in every process and every rerun; a different one per task unless
        # --shared-init, so that tasks' A matrices do not start (and stay) alike.
        torch.manual_seed(init_seed(self.data_cfg.seed, task, self.train_cfg.shared_init))
        info = {"task": task, "n_train": len(self.train_data[task]), "n_validation": len(self.val_data[task]),
                "selection_ids": [ex.id for ex in self.val_data[task]]}   # evaluation leaves these out
        return fit_adapter(self, stage, task, *self.encoded[task], self.train_cfg, fingerprint, hashes, info)


class MultitaskRecipe(AdapterRecipe):
    """RUN/adapters/_multitask (`stages.Recipe`): one adapter on the union of the tasks' training
    examples, trained as each task adapter is, for as many steps as they took together
    (src/multitask.py)."""

    def __init__(self, run, tasks, data_cfg, train_cfg, lora_cfg, mt_cfg, d, say):
        super().__init__(run, tasks, data_cfg, train_cfg, lora_cfg, d, say)
        self.mt_cfg = mt_cfg
        self.resolved = config_dict(data_cfg, train_cfg, lora_cfg, mt_cfg)
        self.train_data = load_data(data_cfg, tasks, "train")          # the default step total counts them
        self.per_task = multitask.task_steps(run, tasks, {t: len(self.train_data[t]) for t in tasks},
                                             self.global_batch, train_cfg.epochs, train_cfg.max_steps)
        self.steps = mt_cfg.multitask_steps or sum(v["steps"] for v in self.per_task.values())

    def stages(self):
        return [multitask.stage(self.run)]

    def built_from(self, stage):
        return stages.fingerprint(self.resolved, ignore={"tasks", "model"}, tasks=list(self.tasks),
                                  model=self.identity, global_batch=self.global_batch, steps=self.steps)

    def setup(self, todo):
        # ------------------------------------------------------------------- setup
        tasks, data_cfg, train_cfg = self.tasks, self.data_cfg, self.train_cfg
        self.val_data = load_data(data_cfg, tasks, "validation")    # each task's own subset, as its adapter's
        self.selection = {t: [ex.id for ex in self.val_data[t]] for t in tasks}
        for note in multitask.recipe_notes(self.run, tasks, self.resolved, self.identity, self.global_batch,
                                           self.selection):
            self.say(f"note: {note}")
        self.model, tokenizer = load_base_model(train_cfg.model, process_device(self.d, train_cfg.device),
                                                train_cfg.dtype, max_len=data_cfg.max_len)
        self.pad_id = tokenizer.pad_token_id
        self.items = [[it for t in tasks for it in encode_examples(tokenizer, split[t], data_cfg.max_len,
                                                                   data_cfg.max_target_len)]
                      for split in (self.train_data, self.val_data)]
        source = (f"--multitask-steps {self.steps}" if self.mt_cfg.multitask_steps else
                  "the task adapters' " + " + ".join(f"{t} {v['steps']}" for t, v in self.per_task.items()))
        self.say(f"model {train_cfg.model} on {self.model.device} ({self.model.dtype}); the multitask adapter over "
                 f"{', '.join(tasks)}: {len(self.items[0])} examples, {self.steps} steps ({source}), "
                 f"global batch {self.global_batch}")

    def train(self, stage):
        # --------------------------------------------------------------------- run
        tasks = self.tasks
        cfg = multitask.schedule(self.train_cfg, self.steps, len(self.items[0]), self.global_batch)
        hashes = {"train": data_hash(self.train_data), "validation": data_hash(self.val_data)}
        fingerprint = stages.fingerprint(self.resolved, ignore={"tasks"}, tasks=list(tasks), data_hash=hashes["train"],
                                         global_batch=self.global_batch, steps=self.steps)
        torch.manual_seed(init_seed(self.data_cfg.seed, runs.MULTITASK, self.train_cfg.shared_init))
        info = {"task": runs.MULTITASK, "tasks": list(tasks), "n_train": len(self.items[0]),
                "n_train_per_task": {t: len(self.train_data[t]) for t in tasks}, "n_validation": len(self.items[1]),
                "selection_ids": self.selection,   # evaluation leaves these out
                "planned_steps": self.steps, "multitask_steps": self.mt_cfg.multitask_steps,
                "task_steps": self.per_task, "schedule": {"epochs": cfg.epochs, "max_steps": cfg.max_steps}}
        return fit_adapter(self, stage, runs.MULTITASK, *self.items, cfg, fingerprint, hashes, info)


def fit_adapter(recipe: AdapterRecipe, stage, name: str, train_items, val_items, cfg, fingerprint, hashes,
                info: dict) -> stages.Trained:
    """Add a LoRA to the recipe's model, fit it (`cfg`), take it off again, and return it as the
    stage's output: a PEFT adapter whose record is `info` plus the provenance every adapter records."""
    model, d = recipe.model, recipe.d
    add_lora(model, recipe.lora_cfg)
    try:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        result = fit_best(model, params, train_items, val_items, cfg=cfg, seed=recipe.data_cfg.seed, name=name,
                     pad_id=recipe.pad_id, state_dir=stage.state_dir, log_path=stage.log_path, d=d,
                     amp=model.device.type == "cuda" and model.dtype != torch.float32, fingerprint=fingerprint)
        # the base model as a resolved path (or hub id / alias): `runs/../m` and `m` agree
        adapter = adapter_from_model(model, base_model=recipe.identity, name=name)
        modules = len(lora_layers(model))
    finally:
        unload_lora(model)
    record = {**info, "seed": recipe.data_cfg.seed, "data_hash": hashes, "model": recipe.train_cfg.model,
              "world_size": d.world, "global_batch": recipe.global_batch, "lora_modules": modules,
              "config": recipe.resolved}
    val = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    return stages.Trained(result, record, lambda folder: save_adapter(adapter, folder),
                          f"{name}: {result.steps} steps, best validation loss {val}"
                          f"{' (stopped early)' if result.stopped_early else ''} -> {stage.out_dir}")


if __name__ == "__main__":
    sys.exit(run_main(main))
