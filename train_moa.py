"""Train the Mixture-of-LoRAs routers on top of the per-task LoRAs in RUN/adapters.

Usage:
    # after train_individual_loras.py --preset demo --output-dir runs/demo
    python train_moa.py --preset demo --output-dir runs/demo

    # the study's setting on a GPU: one router per adapted layer, router-only cross-entropy
    # with teacher forcing, LoRAs frozen
    python train_moa.py --preset paper --model Qwen/Qwen2-1.5B --output-dir runs/qwen2-1.5b

    # the MoA paper's loss L_LM + eta * L_cls, tuning the LoRAs too
    python train_moa.py ... --lm-loss --eta 0.5 --joint

    # LoRA-Mixer instead (docs/lora_mixer.md): per-token routers in every projection the experts cover
    python train_moa.py --system lora_mixer --preset demo --output-dir runs/demo
    python train_moa.py --system lora_mixer --mixer-regime finetune ...   # -> RUN/compose/lora_mixer_finetune

The loss is L = L_LM + eta * L_cls with teacher forcing (the gold task's LoRA is active):
  L_cls   cross-entropy of every router's logits against the task label, averaged over
          routers (--eta weighs it; default 1);
  L_LM    target-only LM loss, only with --lm-loss. Hard top-1 routing gives it no path to
          the routers, so it trains the LoRAs and belongs with --joint.
The default (--no-lm-loss, LoRAs frozen) is the study's router-only training: each batch
then holds the prompts alone, since a router reads the prompt's last token.

Reads RUN/adapters/<task>/ for every task of --tasks (missing ones are named). Writes RUN/moa/:
moa_config.json + routers.safetensors (+ experts/<task>/ with --joint), training_config.json,
log.jsonl, routing_accuracy.json (per task, on the validation data; also printed). RUN/moa
appears only when complete. On rerun it is skipped when it was built from the same inputs
(task list, settings, model, the adapters' sha256, recorded in its training_config.json)
and refused when not, unless --force retrains it; --resume continues a killed run from
RUN/checkpoints/moa. A second process on the same RUN/moa is refused (RUN/checkpoints/moa.lock).

--system lora_mixer trains LoRA-Mixer (src/mixer.py) under the same contract, into
RUN/compose/lora_mixer/ (the default regime, plug; --mixer-regime finetune or joint: into
RUN/compose/lora_mixer_finetune/ or lora_mixer_joint/, evaluated as methods of those names): mixer_config.json + routers.safetensors (+ experts/<task>/ when the
experts were tuned), training_config.json, log.jsonl (every loss term), routing.json (each
task's expert shares on the validation prompts, routing entropy, the balance figure).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from src import runs, stages
from src.cli import config_dict, parse_configs
from src import mixer as mx
from src.config import MOA_PRESETS, DataConfig, SystemConfig, TrainConfig
from src.errors import UserError, run_main
from src.experts import common_modules
from src.lora import load_adapter
from src.models import load_base_model, model_identity, resolve_model_path, same_model
from src.moa import MixtureOfLoRAs, MoAConfig, RouterConfig
from src.tasks import data_hash, resolve_tasks
from src.training import (encode_examples, finish_distributed, fit_best, init_distributed, load_data,
                          moa_objective, process_device, prompt_items, routing_accuracy)


def main(argv=None) -> None:
    # ------------------------------------------------------------------ config
    (system_cfg, data_cfg, train_cfg, router_cfg, mixer_cfg), _ = parse_configs(
        argv, "train_moa.py", __doc__, SystemConfig, DataConfig, TrainConfig, RouterConfig, mx.MixerConfig,
        presets=MOA_PRESETS)
    tasks = resolve_tasks(data_cfg.tasks)
    resolve_model_path(train_cfg.model)
    run = Path(train_cfg.output_dir)
    missing = [t for t in tasks if not stages.adapter_stage(run, t).complete()]
    if missing:
        raise UserError(f"{runs.adapters_dir(run)} lacks the adapters of task(s) {', '.join(missing)}: "
                        f"run train_individual_loras.py --output-dir {run} --tasks {','.join(missing)} first")
    if len(tasks) < 2:
        raise UserError(f"a mixture needs at least two tasks, got {', '.join(tasks)}")
    d = init_distributed(train_cfg.device)
    say = stages.main_printer(d)
    recipe = RECIPES[system_cfg.system](run, tasks, data_cfg, train_cfg, {"moa": router_cfg,
                                                                         "lora_mixer": mixer_cfg}[system_cfg.system],
                                        d, say)
    # the stage's folders must be writable and its lock (RUN/checkpoints/<name>.lock) free before any loading
    if stages.run_recipe(recipe, run, train_cfg, say, d):
        raise SystemExit(1)
    finish_distributed(d)


class MoARecipe:
    """RUN/moa (`stages.Recipe`): the routers over the frozen (or, with --joint, tuned) task LoRAs."""

    def __init__(self, run, tasks, data_cfg, train_cfg, cfg, d, say):
        self.run, self.tasks, self.data_cfg, self.train_cfg, self.cfg, self.d, self.say = \
            run, tasks, data_cfg, train_cfg, cfg, d, say
        self.global_batch = train_cfg.batch_size * train_cfg.grad_accum * d.world
        self.resolved = config_dict(data_cfg, train_cfg, cfg)
        # what the output is built from: a complete one is reused only when this matches
        self.built = stages.fingerprint(self.resolved, ignore={"tasks", "model"}, tasks=tasks,
                                        model=model_identity(train_cfg.model), global_batch=self.global_batch,
                                        adapters={t: runs.adapter_digest(runs.adapter_dir(run, t)) for t in tasks})

    def stages(self):
        return [stages.moa_stage(self.run)]

    def built_from(self, stage):
        return self.built

    def load(self, train_data=None):
        """The data and the base model; every task's examples labelled with the task's expert index."""
        data_cfg, train_cfg = self.data_cfg, self.train_cfg
        self.train_data = train_data or load_data(data_cfg, self.tasks, "train")
        self.val_data = load_data(data_cfg, self.tasks, "validation")
        self.model, tokenizer = load_base_model(train_cfg.model, process_device(self.d, train_cfg.device),
                                                train_cfg.dtype, max_len=data_cfg.max_len)
        self.pad_id = tokenizer.pad_token_id
        self.labelled = [[it for i, t in enumerate(self.tasks) for it in encode_examples(
            tokenizer, split[t], data_cfg.max_len, data_cfg.max_target_len, label=i)]
            for split in (self.train_data, self.val_data)]

    def record(self, **extra) -> dict:
        hashes = {"train": data_hash(self.train_data), "validation": data_hash(self.val_data)}
        return {"tasks": self.tasks, "seed": self.data_cfg.seed, "data_hash": hashes,
                "selection_ids": {t: [ex.id for ex in self.val_data[t]] for t in self.tasks},  # left out in evaluation
                **extra, "model": self.train_cfg.model, "world_size": self.d.world, "global_batch": self.global_batch,
                "config": self.resolved}

    def fit(self, stage, name: str, params: dict, train_items, val_items, objective, **kw):
        """Fit `params` (the checkpoint's fingerprint: the settings, the data, the experts' digests: routers
        half-trained on other experts are not resumed), then load its chosen tensors into them."""
        fingerprint = stages.fingerprint(self.resolved, data_hash=data_hash(self.train_data),
                                         global_batch=self.global_batch, adapters=self.built["adapters"])
        result = fit_best(self.model, params, train_items, val_items, cfg=self.train_cfg, seed=self.data_cfg.seed,
                     name=name, pad_id=self.pad_id, state_dir=stage.state_dir, log_path=stage.log_path,
                     objective=objective, d=self.d, fingerprint=fingerprint,
                     amp=self.model.device.type == "cuda" and self.model.dtype != torch.float32, **kw)
        return result

    def setup(self, todo):
        # ------------------------------------------------------------------- setup
        cfg = self.cfg
        if cfg.lm_loss and not cfg.joint:
            self.say("note: --lm-loss without --joint: under teacher forcing L_LM does not reach the routers "
                     "(it is computed and logged only)")
        adapters = {t: load_adapter(runs.adapter_dir(self.run, t)) for t in self.tasks}
        self.load()
        others = sorted({a.base_model for a in adapters.values()
                         if a.base_model and not same_model(a.base_model, self.train_cfg.model)})
        if others:
            self.say(f"note: the adapters were trained on {', '.join(others)}; --model is {self.train_cfg.model}")
        torch.manual_seed(self.data_cfg.seed)
        self.moa = MixtureOfLoRAs(self.model, adapters, MoAConfig(router=cfg.router, inference=cfg.inference),
                                  sources={t: str(runs.adapter_dir(self.run, t).resolve()) for t in self.tasks})
        if cfg.joint:
            self.moa.set_experts_trainable(True)

    def train(self, stage):
        # --------------------------------------------------------------------- run
        cfg, moa, tasks = self.cfg, self.moa, self.tasks
        train_items, val_items = (items if cfg.lm_loss else prompt_items(items) for items in self.labelled)
        params = {n: p for n, p in moa.named_parameters() if p.requires_grad}
        self.say(f"MoA over {', '.join(tasks)}: {len(moa.routers)} {cfg.router} routers, "
                 f"{sum(p.numel() for p in params.values()):,} trainable parameters; {len(train_items)} training "
                 f"sequences; loss {'L_LM + ' if cfg.lm_loss else ''}{cfg.eta:g} * L_cls")
        objective = moa_objective(moa, cfg.eta, cfg.lm_loss, cfg.teacher_forcing)
        result = self.fit(stage, "moa", params, train_items, val_items, objective)
        accuracy = routing_accuracy(moa, self.model, self.labelled[1], self.pad_id, self.train_cfg.batch_size * 2)

        # -------------------------------------------------------------------- save
        def write(folder):
            moa.save(folder, save_experts=cfg.joint)
            runs.write_json_atomic(folder / "routing_accuracy.json", accuracy)
        width = max(len(t) for t in tasks)
        lines = [f"routing accuracy on validation ({cfg.inference} rule):",
                 *(f"  {t:<{width}}  {accuracy['per_task'][t]:.3f}  (n={accuracy['n'][t]})" for t in tasks),
                 f"  {'mean':<{width}}  {accuracy['mean']:.3f}   -> {stage.out_dir}"]
        return stages.Trained(result, self.record(), write, "\n".join(lines))


class MixerRecipe(MoARecipe):
    """RUN/compose/lora_mixer[_regime] (`stages.Recipe`): LoRA-Mixer's routers (and tuned experts)."""

    def __init__(self, run, tasks, data_cfg, train_cfg, cfg, d, say):
        # the experts and the modules that get routers, every check done before anything is written
        self.adapters = {t: load_adapter(runs.adapter_dir(run, t)) for t in tasks}
        self.modules = mx.choose_modules(common_modules(self.adapters, tasks, "LoRA-Mixer's experts"),
                                         cfg.mixer_modules, cfg.mixer_drop_uncovered)
        if cfg.mixer_top_k > len(tasks):
            raise UserError(f"--mixer-top-k {cfg.mixer_top_k} is more than the {len(tasks)} experts "
                            f"({', '.join(tasks)})")
        self.tune = _tuned(tasks, cfg)
        if self.tune and len(self.tune) < len(tasks) and train_cfg.weight_decay:
            raise UserError("--weight-decay would move the experts outside --mixer-tune: use 0 with a partial "
                            "--mixer-tune")
        super().__init__(run, tasks, data_cfg, train_cfg, cfg, d, say)

    def stages(self):
        return [stages.mixer_stage(self.run, mx.method_name(self.cfg.mixer_regime))]

    def setup(self, todo):
        cap = self.cfg.routing_cap(len(self.tasks))
        self.load({t: exs[:cap] for t, exs in load_data(self.data_cfg, self.tasks, "train").items()})

    def train(self, stage):
        cfg, tasks, seed, model = self.cfg, self.tasks, self.data_cfg.seed, self.model
        torch.manual_seed(seed)
        joint = cfg.mixer_regime == "joint"
        experts = ({t: mx.fresh_expert(self.adapters[t], seed + i) for i, t in enumerate(tasks)} if joint
                   else self.adapters)
        mixer = mx.LoRAMixer(model, experts, self.modules, cfg.mixer_top_k, tasks, seed=seed,
                             router_init=cfg.mixer_router_init)
        params = {f"routers.{i}": w for i, w in enumerate(mixer.routers)}
        tuned = mixer.expert_params(self.tune) if self.tune else []
        params.update({f"experts.{i}": p for i, p in enumerate(tuned)})
        start = [p.detach().clone() for p in tuned]
        train_items, val_items = self.labelled
        self.say(f"LoRA-Mixer over {', '.join(tasks)} ({cfg.mixer_regime}): routers in {len(self.modules)} "
                 f"projections, top-{cfg.mixer_top_k} at inference, {sum(p.numel() for p in params.values()):,} "
                 f"trainable parameters{'; tuning ' + ', '.join(self.tune) if self.tune else ''}; "
                 f"{len(train_items)} routing sequences")
        finetune = cfg.mixer_regime == "finetune"
        objective = mx.objective(mixer, cfg, start if finetune else (), tuned if finetune else ())
        result = self.fit(stage, "lora_mixer", params, train_items, val_items, objective,
                          group_lr={"experts.": cfg.mixer_expert_lr})
        for p in params.values():
            p.requires_grad_(False)
        mixer.soft = False
        mixer.refresh()
        report = mx.routing_report(mixer, model, val_items, self.pad_id, self.train_cfg.batch_size * 2)

        def write(folder):
            mixer.save(folder, extra={"regime": cfg.mixer_regime, "tuned": self.tune}, save_experts=bool(self.tune),
                       sources={t: str(runs.adapter_dir(self.run, t).resolve()) for t in tasks})
            runs.write_json_atomic(folder / "routing.json", report)
        width = max(len(t) for t in tasks)
        lines = [f"LoRA-Mixer routing on validation prompts (top-{cfg.mixer_top_k}): own expert's share, top-1 own",
                 *(f"  {t:<{width}}  {report['own_share'][t]:.3f}  {report['top1_own'][t]:.3f}" for t in tasks),
                 f"  {'mean':<{width}}  {report['mean_own_share']:.3f}   entropy {report['entropy']:.3f}  "
                 f"balance {report['balance']:.3f}   -> {stage.out_dir}"]
        record = self.record(routing_examples={t: len(self.train_data[t]) for t in tasks})
        return stages.Trained(result, record, write, "\n".join(lines))


def _tuned(tasks: list[str], cfg: mx.MixerConfig) -> list[str]:
    """The experts that move: C of the finetune regime (default all), every one in joint, none in plug."""
    if cfg.mixer_regime == "plug":
        return []
    if cfg.mixer_regime == "joint" or cfg.mixer_tune is None:
        return list(tasks)
    names = [t.strip() for t in cfg.mixer_tune.split(",") if t.strip()]
    unknown = [t for t in names if t not in tasks]
    if unknown or not names:
        raise UserError(f"--mixer-tune: {', '.join(unknown) or repr(cfg.mixer_tune)} is not an expert; "
                        f"the experts: {', '.join(tasks)}")
    return names


RECIPES = {"moa": MoARecipe, "lora_mixer": MixerRecipe}   # --system; SYSTEMS in src/config.py lists the same


if __name__ == "__main__":
    sys.exit(run_main(main))
