"""Config dataclasses shared by the training scripts, and their presets.

One dataclass per concern; `src.cli.parse_configs` turns them into flags (`--batch-size`),
and a preset is just a dict of field values applied under what the user typed:

    DataConfig      which tasks, where their data is, how much, how long a sequence may be
    TrainConfig     model, optimiser, schedule, early stopping, checkpoints, run folder
    SystemConfig    train_moa.py only: --system moa | lora_mixer
    RouterConfig    (src/moa.py) train_moa.py: router kind, the loss L_LM + eta * L_cls, --joint
    MixerConfig     (src/mixer.py) train_moa.py --system lora_mixer: modules, top-k, loss, regime
    LoraConfig      (src/lora.py) rank, alpha, dropout, target modules

`PRESETS` serves train_individual_loras.py, `MOA_PRESETS` train_moa.py:
    demo   minutes on a 2-core CPU with the embedded SmolLM2-135M and the bundled sample data
    paper  the reference study's setting for a GPU: r 8, alpha 16, lr 5e-5, batch 2,
           10 epochs, early stopping (patience 3, every 100 steps), 5,000 examples per task,
           sequences of at most 512 tokens, 128 of them target
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from src.errors import UserError
from src.tasks import DATA_SOURCES

DEFAULT_MODEL = "smollm2-135m"
PAPER_MODEL = "Qwen/Qwen2-1.5B"


def _finite(value) -> bool:
    """A finite int or float (a bool is neither: JSON and Python would let it pass as 0 / 1)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _finite(value) or value <= 0:  # nan <= 0 is False: nan and inf need the finite check
        raise UserError(f"--{name.replace('_', '-')} must be positive and finite, got {value}")


def _not_negative(name: str, value) -> None:
    if not _finite(value) or value < 0:
        raise UserError(f"--{name.replace('_', '-')} must be finite and not negative, got {value}")


@dataclass
class DataConfig:
    """Task data: which tasks, from where, how many examples, how long a sequence may be."""

    tasks: str = field(default="5tasks", metadata={
        "help": "comma-separated task names (sentiment,nli) or a preset: 5tasks, 7tasks, all"})
    data: str = field(default="sample", metadata={
        "help": "where the data is: sample (bundled, tiny), dir (--data-dir), hub (Hugging Face datasets)",
        "choices": DATA_SOURCES})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder with <task>/{train,validation}.jsonl (implies --data dir)"})
    train_size: int | None = field(default=5000, metadata={
        "help": "training examples per task (seeded subset; local data: capped at what the files hold)"})
    eval_size: int | None = field(default=200, metadata={
        "help": "validation examples per task, for early stopping and routing accuracy (capped likewise)"})
    max_len: int = field(default=512, metadata={"help": "most tokens per training sequence (prompt + target)"})
    max_target_len: int = field(default=128, metadata={"help": "most target tokens per sequence, EOS included"})
    seed: int = field(default=0, metadata={"help": "seed for data subsets, batch order and LoRA init"})

    def __post_init__(self):
        if self.data_dir is not None and self.data == "sample":
            self.data = "dir"  # --data-dir alone means local files from that folder
        if self.data == "dir" and not self.data_dir:
            raise UserError("--data dir needs --data-dir DIR")
        if self.data != "dir" and self.data_dir is not None:
            raise UserError(f"--data-dir is only used with --data dir (got --data {self.data})")
        if self.data not in DATA_SOURCES:
            raise UserError(f"--data must be one of {', '.join(DATA_SOURCES)}, got {self.data!r}")
        _positive("train_size", self.train_size, allow_none=True)
        _positive("eval_size", self.eval_size, allow_none=True)
        _positive("max_len", self.max_len)
        _positive("max_target_len", self.max_target_len)
        if self.max_target_len >= self.max_len:
            raise UserError(f"--max-target-len ({self.max_target_len}) must be below --max-len ({self.max_len})")


@dataclass
class TrainConfig:
    """Model, optimisation, early stopping, checkpoints and the run folder."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "base model: hub id (Qwen/Qwen2-1.5B), local HF folder, .gguf file, or alias smollm2-135m"})
    output_dir: str = field(default="runs/default", metadata={
        "help": "run folder RUN: adapters go to RUN/adapters/<task>, resumable state to RUN/checkpoints/<task>"})
    epochs: float = field(default=10.0, metadata={"help": "passes over each task's training data"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop after this many optimizer steps (the LR schedule spans them)"})
    batch_size: int = field(default=2, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; global batch = batch-size * grad-accum * processes"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW peak learning rate (linear decay to 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: none)"})
    eval_every: int = field(default=100, metadata={
        "help": "steps between validation-loss evaluations (0: only at the end)"})
    patience: int = field(default=3, metadata={
        "help": "early stopping: evaluations without improvement before stopping (0: never stop early)"})
    save_every: int = field(default=100, metadata={"help": "steps between resumable checkpoints (0: none)"})
    log_every: int = field(default=10, metadata={"help": "steps between log lines in log.jsonl"})
    resume: bool = field(default=False, metadata={"help": "continue from RUN/checkpoints/<task> where present"})
    force: bool = field(default=False, metadata={"help": "retrain tasks whose adapter is already complete"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if available), cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else float32), float32, bfloat16, float16"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    shared_init: bool = field(default=False, metadata={
        "help": "start every task's LoRA from the same random A (default: a per-task init seed, "
                "seed + crc32(task name))"})

    def __post_init__(self):
        _positive("epochs", self.epochs)
        _positive("max_steps", self.max_steps, allow_none=True)
        _positive("batch_size", self.batch_size)
        _positive("grad_accum", self.grad_accum)
        _positive("lr", self.lr)
        _positive("log_every", self.log_every)
        for name in ("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "patience", "save_every"):
            _not_negative(name, getattr(self, name))
        for name in ("batch_size", "grad_accum", "warmup_steps", "eval_every", "patience", "save_every",
                     "log_every"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise UserError(f"--{name.replace('_', '-')} must be an integer, got {getattr(self, name)!r}")
        if self.resume and self.force:
            raise UserError("--resume and --force contradict each other (force restarts from scratch)")
        if not self.model:
            raise UserError("--model is empty")




SYSTEMS = ("moa", "lora_mixer")


@dataclass
class SystemConfig:
    """train_moa.py: which router system to train over RUN/adapters."""

    title = "System"

    system: str = field(default="moa", metadata={
        "help": "moa: the study's Mixture-of-LoRAs, one expert per sequence (RUN/moa); lora_mixer: LoRA-Mixer's "
                "per-token routers in the projections (RUN/compose/lora_mixer)", "choices": SYSTEMS})

    def __post_init__(self):
        if self.system not in SYSTEMS:
            raise UserError(f"--system must be one of {', '.join(SYSTEMS)}, got {self.system!r}")


# ------------------------------------------------------------------------------ presets
# Named dicts of field values; flags typed by the user override them.

PRESETS: dict[str, dict] = {
    # A few minutes on a 2-core CPU: embedded model, bundled sample data, two short tasks.
    "demo": dict(model=DEFAULT_MODEL, tasks="sentiment,nli", data="sample", train_size=32, eval_size=8,
                 max_len=256, max_target_len=32, epochs=3.0, max_steps=16, batch_size=4, grad_accum=1,
                 lr=1e-3, rank=8, alpha=16.0, eval_every=8, patience=3, save_every=8, log_every=2),
    # The reference study's training setting, for a GPU.
    "paper": dict(model=PAPER_MODEL, tasks="5tasks", data="hub", train_size=5000, eval_size=200,
                  max_len=512, max_target_len=128, epochs=10.0, max_steps=None, batch_size=2, grad_accum=1,
                  lr=5e-5, rank=8, alpha=16.0, eval_every=100, patience=3, save_every=100, log_every=10),
}

MOA_PRESETS: dict[str, dict] = {
    "demo": dict(PRESETS["demo"], max_steps=24, lr=1e-2, batch_size=8, eval_every=12, save_every=12),
    # Router-only training is cheap and converges in far fewer steps than a LoRA; the
    # study does not state its router hyperparameters, so these are ours.
    "paper": dict(PRESETS["paper"], epochs=1.0, lr=1e-3, batch_size=8),
}

T2L_PRESETS: dict[str, dict] = {
    # Reconstruction on a 2-core CPU in about a minute (no base-model forward); sft is slower.
    "demo": dict(PRESETS["demo"], lr=1e-3, epochs=400.0, max_steps=400, batch_size=8, eval_every=50,
                 patience=0, save_every=50, log_every=10),
    # The paper's settings: reconstruction lr 1e-3 (sft: pass --lr 2.5e-5).
    "paper": dict(PRESETS["paper"], lr=1e-3, epochs=2000.0, max_steps=5000, batch_size=16, eval_every=250,
                  patience=0, save_every=250),
}
