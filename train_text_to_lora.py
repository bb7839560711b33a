"""Train a Text-to-LoRA hypernetwork that writes a task's adapter from its description.

Usage:
    # after train_individual_loras.py --output-dir RUN: learn to reproduce RUN/adapters from the
    # tasks' descriptions (fast: no base-model forward)
    python train_text_to_lora.py --preset demo --output-dir runs/demo

    # SFT through the generated adapter on the tasks' data (the way that can generalise)
    python train_text_to_lora.py --preset demo --output-dir runs/demo --objective sft

    # leave one task out, to generate its adapter zero-shot
    python train_text_to_lora.py --output-dir RUN --hold-out nli

    # then: an adapter from any description, in PEFT's format
    python -m src.t2l generate --run RUN --description "Classify movie reviews by sentiment." --out my_adapter

Reads RUN/adapters/<task>/ for every task of --tasks: their modules, rank and scale are the
generated adapters' (and, for reconstruction, the targets). Writes RUN/compose/t2l/ (or
RUN/compose/t2l-holdout-TASK/): hypernet.safetensors, t2l_config.json, training_config.json,
log.jsonl. It appears only when complete. It is reused when built from the same inputs and
refused when not (--force retrains), and --resume continues a killed run. The descriptions
are in src/descriptions.py: each task's first 9 train, the other 3 validate. Details:
docs/t2l.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

from src import t2l_train
from src.cli import parse_configs
from src.config import DataConfig, TrainConfig, T2L_PRESETS
from src.errors import run_main
from src.models import resolve_model_path
from src.t2l import T2LConfig
from src.tasks import resolve_tasks


def main(argv=None) -> None:
    (data_cfg, train_cfg, t2l_cfg), _ = parse_configs(
        argv, "train_text_to_lora.py", __doc__, DataConfig, TrainConfig, T2LConfig, presets=T2L_PRESETS)
    tasks = resolve_tasks(data_cfg.tasks)
    resolve_model_path(train_cfg.model)
    t2l_train.train(Path(train_cfg.output_dir), tasks, data_cfg, train_cfg, t2l_cfg)


if __name__ == "__main__":
    sys.exit(run_main(main))
