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
from src.config import MOA_PRESETS, DataConfig, RouterConfig, SystemConfig, TrainConfig
from src.errors import UserError, run_main
from src.experts import common_modules
from src.lora import Adapter, load_adapter
from src.models import load_base_model, model_identity, resolve_model_path, same_model
from src.moa import MixtureOfLoRAs, MoAConfig
from src.tasks import data_hash, resolve_tasks
from src.training import (barrier, encode_examples, finish_distributed, fit_or_exit, init_distributed, load_data,
                          moa_objective, process_device, prompt_items, routing_accuracy)


def main(argv=None) -> None:
    # ------------------------------------------------------------------ config
    (system_cfg, data_cfg, train_cfg, router_cfg, mixer_cfg), _ = parse_configs(
        argv, "train_moa.py", __doc__, SystemConfig, DataConfig, TrainConfig, RouterConfig, mx.MixerConfig,
        presets=MOA_PRESETS)
    lora_mixer = system_cfg.system == "lora_mixer"
    tasks = resolve_tasks(data_cfg.tasks)
    resolve_model_path(train_cfg.model)
    run = Path(train_cfg.output_dir)
    missing = [t for t in tasks if not stages.adapter_stage(run, t).complete()]
    if missing:
        raise UserError(f"{runs.adapters_dir(run)} lacks the adapters of task(s) {', '.join(missing)}: "
                        f"run train_individual_loras.py --output-dir {run} --tasks {','.join(missing)} first")
    if len(tasks) < 2:
        raise UserError(f"a mixture needs at least two tasks, got {', '.join(tasks)}")
    if lora_mixer:
        adapters, modules = _mixer_inputs(run, tasks, mixer_cfg, train_cfg)
    d = init_distributed(train_cfg.device)
    say = stages.main_printer(d)
    stage = stages.mixer_stage(run, mx.method_name(mixer_cfg.mixer_regime)) if lora_mixer else stages.moa_stage(run)
    global_batch = train_cfg.batch_size * train_cfg.grad_accum * d.world
    resolved = config_dict(data_cfg, train_cfg, mixer_cfg if lora_mixer else router_cfg)
    # what RUN/moa is built from: a complete one is reused only when this matches
    built_from = stages.fingerprint(resolved, ignore={"tasks", "model"}, tasks=tasks,
                                    model=model_identity(train_cfg.model), global_batch=global_batch,
                                    adapters={t: runs.adapter_digest(runs.adapter_dir(run, t)) for t in tasks})
    # RUN/moa and RUN/checkpoints must be writable, and RUN/checkpoints/moa.lock free, before any loading
    with stages.claim([stage], train_cfg, say, d, built_from=lambda _: built_from) as todo:
        if todo and lora_mixer:
            _train_mixer(stage, run, tasks, adapters, modules, data_cfg, train_cfg, mixer_cfg, d, say, resolved,
                         global_batch, built_from)
        elif todo:
            _train(stage, run, tasks, data_cfg, train_cfg, router_cfg, d, say, resolved, global_batch, built_from)
    stages.remove_empty_checkpoints(run, d)
    finish_distributed(d)


def _train(stage, run, tasks, data_cfg, train_cfg, router_cfg, d, say, resolved, global_batch, built_from) -> None:
    """Train the routers and publish RUN/moa (rank 0)."""
    if router_cfg.lm_loss and not router_cfg.joint:
        say("note: --lm-loss without --joint: under teacher forcing L_LM does not reach the routers "
            "(it is computed and logged only)")

    # ------------------------------------------------------------------- setup
    adapters = {t: load_adapter(runs.adapter_dir(run, t)) for t in tasks}
    train_data = load_data(data_cfg, tasks, "train")
    val_data = load_data(data_cfg, tasks, "validation")
    model, tokenizer = load_base_model(train_cfg.model, process_device(d, train_cfg.device), train_cfg.dtype,
                                       max_len=data_cfg.max_len)
    amp = model.device.type == "cuda" and model.dtype != torch.float32
    others = sorted({a.base_model for a in adapters.values()
                     if a.base_model and not same_model(a.base_model, train_cfg.model)})
    if others:
        say(f"note: the adapters were trained on {', '.join(others)}; --model is {train_cfg.model}")

    def items(split_data):  # every task's examples, labelled with the task's expert index
        out = []
        for i, t in enumerate(tasks):
            enc = encode_examples(tokenizer, split_data[t], data_cfg.max_len, data_cfg.max_target_len, label=i)
            out.extend(enc if router_cfg.lm_loss else prompt_items(enc))
        return out
    train_items, val_items = items(train_data), items(val_data)
    val_full = [it for i, t in enumerate(tasks)
                for it in encode_examples(tokenizer, val_data[t], data_cfg.max_len, data_cfg.max_target_len, label=i)]

    torch.manual_seed(data_cfg.seed)
    moa = MixtureOfLoRAs(model, adapters, MoAConfig(router=router_cfg.router, inference=router_cfg.inference),
                         sources={t: str(runs.adapter_dir(run, t).resolve()) for t in tasks})
    if router_cfg.joint:
        moa.set_experts_trainable(True)
    params = {n: p for n, p in moa.named_parameters() if p.requires_grad}
    hashes = {"train": data_hash(train_data), "validation": data_hash(val_data)}
    # a --resume must match this; the experts' digests too: routers half-trained on other experts are not resumed
    fingerprint = stages.fingerprint(resolved, data_hash=hashes["train"], global_batch=global_batch,
                                     adapters=built_from["adapters"])
    say(f"MoA over {', '.join(tasks)}: {len(moa.routers)} {router_cfg.router} routers, "
        f"{sum(p.numel() for p in params.values()):,} trainable parameters; {len(train_items)} training sequences; "
        f"loss {'L_LM + ' if router_cfg.lm_loss else ''}{router_cfg.eta:g} * L_cls")

    # --------------------------------------------------------------------- run
    stages.restart(stage, train_cfg, d)
    objective = moa_objective(moa, router_cfg.eta, router_cfg.lm_loss, router_cfg.teacher_forcing)
    result = fit_or_exit(model, params, train_items, val_items, cfg=train_cfg, seed=data_cfg.seed, name="moa",
                         pad_id=tokenizer.pad_token_id, state_dir=stage.state_dir, log_path=stage.log_path,
                         objective=objective, d=d, amp=amp, fingerprint=fingerprint)
    accuracy = routing_accuracy(moa, model, val_full, tokenizer.pad_token_id, train_cfg.batch_size * 2)

    # -------------------------------------------------------------------- save
    if d.main:
        with stages.publish(stage) as folder:
            moa.save(folder, save_experts=router_cfg.joint)
            runs.write_json_atomic(folder / "routing_accuracy.json", accuracy)
            runs.write_json_atomic(folder / "training_config.json", {
                "tasks": tasks, "seed": data_cfg.seed, "git_commit": runs.git_commit(), "data_hash": hashes,
                "selection_ids": {t: [ex.id for ex in val_data[t]] for t in tasks},  # evaluation leaves these out
                "model": train_cfg.model, "world_size": d.world, "global_batch": global_batch,
                "steps": result.steps, "best_step": result.best_step, "best_val_loss": result.best_val_loss,
                "stopped_early": result.stopped_early, "elapsed_s": round(result.elapsed_s, 2), "config": resolved,
                stages.BUILT_FROM: built_from, "versions": runs.versions()})
        width = max(len(t) for t in tasks)
        say(f"routing accuracy on validation ({router_cfg.inference} rule):")
        for t in tasks:
            say(f"  {t:<{width}}  {accuracy['per_task'][t]:.3f}  (n={accuracy['n'][t]})")
        say(f"  {'mean':<{width}}  {accuracy['mean']:.3f}   -> {stage.out_dir}")
    barrier(d)


# ------------------------------------------------------------------------ LoRA-Mixer

def _mixer_inputs(run: Path, tasks: list[str], cfg: mx.MixerConfig, train_cfg) -> tuple[dict[str, Adapter], list]:
    """The experts and the modules that get routers, every check done before anything is written."""
    adapters = {t: load_adapter(runs.adapter_dir(run, t)) for t in tasks}
    modules = mx.choose_modules(common_modules(adapters, tasks, "LoRA-Mixer's experts"), cfg.mixer_modules,
                                cfg.mixer_drop_uncovered)
    if cfg.mixer_top_k > len(tasks):
        raise UserError(f"--mixer-top-k {cfg.mixer_top_k} is more than the {len(tasks)} experts ({', '.join(tasks)})")
    tune = _tuned(tasks, cfg)
    if tune and len(tune) < len(tasks) and train_cfg.weight_decay:
        raise UserError("--weight-decay would move the experts outside --mixer-tune: use 0 with a partial --mixer-tune")
    return adapters, modules


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


def _train_mixer(stage, run, tasks, adapters, modules, data_cfg, train_cfg, cfg, d, say, resolved, global_batch,
                 built_from) -> None:
    """Train LoRA-Mixer's routers (and tuned experts) and publish RUN/compose/lora_mixer[_regime] (rank 0)."""
    cap = cfg.routing_cap(len(tasks))
    train_data = {t: exs[:cap] for t, exs in load_data(data_cfg, tasks, "train").items()}
    val_data = load_data(data_cfg, tasks, "validation")
    model, tokenizer = load_base_model(train_cfg.model, process_device(d, train_cfg.device), train_cfg.dtype,
                                       max_len=data_cfg.max_len)
    amp = model.device.type == "cuda" and model.dtype != torch.float32

    def items(split_data):  # every task's full examples, labelled with the task's expert index
        return [it for i, t in enumerate(tasks)
                for it in encode_examples(tokenizer, split_data[t], data_cfg.max_len, data_cfg.max_target_len, label=i)]
    train_items, val_items = items(train_data), items(val_data)

    torch.manual_seed(data_cfg.seed)
    joint = cfg.mixer_regime == "joint"
    experts = {t: mx.fresh_expert(adapters[t], data_cfg.seed + i) for i, t in enumerate(tasks)} if joint else adapters
    mixer = mx.LoRAMixer(model, experts, modules, cfg.mixer_top_k, tasks, seed=data_cfg.seed,
                          router_init=cfg.mixer_router_init)
    params = {f"routers.{i}": w for i, w in enumerate(mixer.routers)}
    tune = _tuned(tasks, cfg)
    tuned = mixer.expert_params(tune) if tune else []
    params.update({f"experts.{i}": p for i, p in enumerate(tuned)})
    start = [p.detach().clone() for p in tuned]
    hashes = {"train": data_hash(train_data), "validation": data_hash(val_data)}
    fingerprint = stages.fingerprint(resolved, data_hash=hashes["train"], global_batch=global_batch,
                                     adapters=built_from["adapters"])
    say(f"LoRA-Mixer over {', '.join(tasks)} ({cfg.mixer_regime}): routers in {len(modules)} projections, "
        f"top-{cfg.mixer_top_k} at inference, {sum(p.numel() for p in params.values()):,} trainable parameters"
        f"{'; tuning ' + ', '.join(tune) if tune else ''}; {len(train_items)} routing sequences")

    stages.restart(stage, train_cfg, d)
    objective = mx.objective(mixer, cfg, start if cfg.mixer_regime == "finetune" else (),
                             tuned if cfg.mixer_regime == "finetune" else ())
    result = fit_or_exit(model, params, train_items, val_items, cfg=train_cfg, seed=data_cfg.seed, name="lora_mixer",
                         pad_id=tokenizer.pad_token_id, state_dir=stage.state_dir, log_path=stage.log_path,
                         objective=objective, d=d, amp=amp, fingerprint=fingerprint,
                         group_lr={"experts.": cfg.mixer_expert_lr})
    for p in params.values():
        p.requires_grad_(False)
    mixer.soft = False
    mixer.refresh()
    report = mx.routing_report(mixer, model, val_items, tokenizer.pad_token_id, train_cfg.batch_size * 2)

    if d.main:
        with stages.publish(stage) as folder:
            mixer.save(folder, extra={"regime": cfg.mixer_regime, "tuned": tune}, save_experts=bool(tune),
                       sources={t: str(runs.adapter_dir(run, t).resolve()) for t in tasks})
            runs.write_json_atomic(folder / "routing.json", report)
            runs.write_json_atomic(folder / "training_config.json", {
                "tasks": tasks, "seed": data_cfg.seed, "git_commit": runs.git_commit(), "data_hash": hashes,
                "selection_ids": {t: [ex.id for ex in val_data[t]] for t in tasks},
                "routing_examples": {t: len(train_data[t]) for t in tasks},
                "model": train_cfg.model, "world_size": d.world, "global_batch": global_batch,
                "steps": result.steps, "best_step": result.best_step, "best_val_loss": result.best_val_loss,
                "stopped_early": result.stopped_early, "elapsed_s": round(result.elapsed_s, 2), "config": resolved,
                stages.BUILT_FROM: built_from, "versions": runs.versions()})
        width = max(len(t) for t in tasks)
        say(f"LoRA-Mixer routing on validation prompts (top-{cfg.mixer_top_k}): own expert's share, top-1 own")
        for t in tasks:
            say(f"  {t:<{width}}  {report['own_share'][t]:.3f}  {report['top1_own'][t]:.3f}")
        say(f"  {'mean':<{width}}  {report['mean_own_share']:.3f}   entropy {report['entropy']:.3f}  "
            f"balance {report['balance']:.3f}   -> {stage.out_dir}")
    barrier(d)


if __name__ == "__main__":
    sys.exit(run_main(main))
