"""Train a Text-to-LoRA hypernetwork (src/t2l.py) on the per-task LoRAs in RUN/adapters.

Usage:
    # after train_individual_loras.py --preset demo --output-dir runs/demo: 400 steps at lr 1e-3
    python train_text_to_lora.py --preset demo --output-dir runs/demo

    # exactly 2000 steps
    python train_text_to_lora.py --output-dir runs/demo --lr 1e-3 --max-steps 2000

    # this project's first normalisation (one std per module type, heads start at the LoRA init)
    python train_text_to_lora.py --output-dir runs/demo --t2l-norm type --max-steps 2000

    # SFT through the generated adapter on the tasks' data (the paper's lr 2.5e-5)
    python train_text_to_lora.py --objective sft --output-dir runs/demo --lr 2.5e-5

    # without one task (or each of several), to generate its adapter zero-shot from a description
    python train_text_to_lora.py --hold-out sentiment --output-dir runs/demo

    # RUN/compose/t2l and, for method t2l_zeroshot, one hypernetwork without each task
    python train_text_to_lora.py --preset demo --output-dir runs/demo --hold-out-each

    # then: python -m src.t2l generate --run runs/demo --description "..." --out my_adapter

--objective reconstruction (default): L1 between the generated factors and each task's own
adapter in z-units (--recon-target deltas: on scale * B A instead); every (task, training
description) pair is one sequence; the held-out descriptions of the same tasks are the
validation set. No base-model forward (the base model is loaded only for --encoder base).
--t2l-norm element (default, the paper's): z-scores with the library's mean and std of every A
and B element, the heads starting at the library mean; --t2l-norm type: one std per module
type, the heads starting at the LoRA init (docs/t2l.md).
--objective sft: cross-entropy (label smoothing --label-smoothing) on the target tokens of
each task's training data, through the adapter generated from one of the task's training
descriptions drawn per sequence, plus --factor-l2 times the mean square of the generated A and
B; the validation loss uses each task's first held-out description.

Length: with --max-steps N, exactly N optimizer steps whatever --epochs says (only early
stopping, --patience, can end it sooner); without it, --epochs passes over the pairs. Train
long enough to converge: a short run leaves every description near the starting point.

Writes RUN/compose/t2l/ (RUN/compose/t2l-holdout-TASK/ with --hold-out TASK; --hold-out A,B: one
for each; --hold-out-each: RUN/compose/t2l and one for each task of --tasks, trained by
reconstruction whatever --objective says, which is what method t2l_zeroshot evaluates; evaluation
never trains one): hypernet.safetensors,
t2l_config.json, training_config.json (with built_from), reconstruction.json (the relative
error of each module's delta generated from each training task's held-out descriptions),
log.jsonl. It appears only when complete; a rerun is skipped when built from the same inputs
(settings, tasks, the adapters' sha256, the descriptions, the model for --encoder base or sft)
and refused when not, unless --force; --resume continues a killed run from
RUN/checkpoints/t2l[-holdout-TASK].
"""
from __future__ import annotations

import sys
from pathlib import Path

from src import t2l
from src.cli import parse_configs
from src.config import T2L_PRESETS, DataConfig, TrainConfig
from src.errors import run_main
from src.tasks import resolve_tasks


def main(argv=None) -> None:
    (data_cfg, train_cfg, cfg, zero_shot), _ = parse_configs(
        argv, "train_text_to_lora.py", __doc__, DataConfig, TrainConfig, t2l.T2LConfig, t2l.ZeroShotConfig,
        presets=T2L_PRESETS)
    t2l.train_hypernet(Path(train_cfg.output_dir), resolve_tasks(data_cfg.tasks), data_cfg, train_cfg, cfg,
                       each=zero_shot.hold_out_each)


if __name__ == "__main__":
    sys.exit(run_main(main))
