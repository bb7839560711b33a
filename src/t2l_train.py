"""Training a Text-to-LoRA hypernetwork (src/t2l.py) under the training stages' contract.

`train(run, tasks, data_cfg, train_cfg, cfg)` publishes RUN/compose/t2l (or
RUN/compose/t2l-holdout-TASK with `cfg.hold_out`). It is reused when built from the same
inputs, refused when not (unless --force), and resumable with --resume. It runs through
`training.fit`, so it has the same progress bar, log, checkpoints and early stopping as the
adapters. train_text_to_lora.py is its command line, and the `t2l_zeroshot` method calls it
once per held-out task.

  - reconstruction: each (task, training description) pair is one item. The loss is the
    mean L1 of the z-scored generated factors (or deltas) to the task's adapter. The held-out
    descriptions of the same tasks are the validation items.
  - sft: the tasks' encoded examples. Each sequence gets one of its task's training
    descriptions, drawn from the seeded generator, so a resumed run draws the same ones. The
    loss is cross-entropy on the target tokens (label smoothing), plus factor_l2 times the
    generated factors' mean square.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from src import runs, stages, t2l
from src.cli import config_dict
from src.descriptions import DESCRIPTIONS, held_out_descriptions, training_descriptions
from src.errors import UserError
from src.lora import load_adapter
from src.models import load_base_model, model_identity
from src.tasks import data_hash
from src.training import (IGNORE, Dist, Objective, encode_examples, fit, lm_head_logits, load_data,
                          target_hidden)


def stage_of(run: Path, hold_out: str | None) -> stages.Stage:
    name = t2l.folder_name(hold_out)
    return stages.Stage(runs.compose_dir(run, name), runs.checkpoint_dir(run, name),
                        (*t2l.FILES, "training_config.json"))


def trained_tasks(tasks: list[str], cfg: t2l.T2LConfig) -> list[str]:
    """The tasks the hypernetwork learns: all, or all but --hold-out (which must be one of them)."""
    missing = [t for t in tasks if t not in DESCRIPTIONS]
    if missing:
        raise UserError(f"no descriptions for task {', '.join(missing)} (src/descriptions.py)")
    if cfg.hold_out is None:
        return list(tasks)
    if cfg.hold_out not in tasks:
        raise UserError(f"--hold-out {cfg.hold_out}: not a task of this run (the tasks: {', '.join(tasks)})")
    rest = [t for t in tasks if t != cfg.hold_out]
    if not rest:
        raise UserError(f"--hold-out {cfg.hold_out} leaves no task to train on")
    return rest


def check_inputs(run: Path, tasks: list[str], cfg: t2l.T2LConfig):
    """(tasks trained on, their adapters, the layout), every check done before anything is written."""
    trained = trained_tasks(tasks, cfg)
    missing = [t for t in tasks if not runs.has_adapter(run, t)]
    if missing:
        raise UserError(f"{runs.adapters_dir(run)} lacks the adapters of task(s) {', '.join(missing)}: run "
                        f"train_individual_loras.py --output-dir {run} --tasks {','.join(missing)} first")
    adapters = {t: load_adapter(runs.adapter_dir(run, t)) for t in trained}
    layout = t2l.layout_of(adapters, cfg)
    if cfg.encoder == "minilm":
        t2l.minilm_folder()
    return trained, adapters, layout


def train(run: Path, tasks: list[str], data_cfg, train_cfg, cfg: t2l.T2LConfig, say=print, d: Dist = Dist(),
          base: tuple | None = None) -> Path:
    """Train (or reuse) the hypernetwork of `cfg` on `tasks`; its folder."""
    trained, adapters, layout = check_inputs(run, tasks, cfg)
    stage = stage_of(run, cfg.hold_out)
    resolved = config_dict(data_cfg, train_cfg, cfg)
    built_from = stages.fingerprint(resolved, ignore={"tasks", "model"}, tasks=trained,
                                    model=model_identity(train_cfg.model),
                                    adapters={t: runs.adapter_digest(runs.adapter_dir(run, t)) for t in trained},
                                    descriptions={t: list(DESCRIPTIONS[t]) for t in trained})
    with stages.claim([stage], train_cfg, say, d, built_from=lambda _: built_from) as todo:
        if todo:
            _train(stage, trained, adapters, layout, data_cfg, train_cfg, cfg, say, d, resolved, built_from, base)
    stages.remove_empty_checkpoints(run, d)
    return stage.out_dir


def _items(n: int) -> list[dict]:
    """Placeholder sequences for fit: item k stands for (task, description) pair k."""
    return [{"input_ids": [0], "labels": [IGNORE], "prompt_len": 1, "task_id": k} for k in range(n)]


def _train(stage, trained, adapters, layout, data_cfg, train_cfg, cfg, say, d, resolved, built_from, base) -> None:
    need_model = cfg.objective == "sft" or cfg.encoder == "base"
    if need_model and base is None:
        base = load_base_model(train_cfg.model, "cpu" if train_cfg.device == "auto" and not torch.cuda.is_available()
                               else ("cuda" if train_cfg.device == "auto" else train_cfg.device), train_cfg.dtype)
    train_desc = {t: list(training_descriptions(t)) for t in trained}
    val_desc = {t: list(held_out_descriptions(t)) for t in trained}
    emb_train = {t: t2l.encode(train_desc[t], cfg.encoder, base) for t in trained}
    emb_val = {t: t2l.encode(val_desc[t], cfg.encoder, base) for t in trained}
    d_enc = next(iter(emb_train.values())).shape[-1]
    hnet = t2l.HyperNet(layout, d_enc, cfg.head, cfg.t2l_hidden, cfg.t2l_embed, seed=data_cfg.seed)
    if cfg.objective == "sft":
        device = base[0].device
        hnet.to(device)
    params = dict(hnet.named_parameters())
    stats = t2l.factor_stats(list(adapters.values()), layout, cfg.recon_target)
    hashes = {}

    if cfg.objective == "reconstruction":
        pairs_train = [(i, e) for i, t in enumerate(trained) for e in emb_train[t]]
        pairs_val = [(i, e) for i, t in enumerate(trained) for e in emb_val[t]]
        targets = [[adapters[t].factors[m] for m in layout.modules] for t in trained]

        def objective_for(pairs):
            emb = torch.stack([e for _, e in pairs])
            task_of = torch.tensor([i for i, _ in pairs])

            def fn(model, batch):
                k = batch["task_ids"]
                gen = model(emb[k])
                tgt = [(torch.stack([targets[int(i)][j][0] for i in task_of[k]]),
                        torch.stack([targets[int(i)][j][1] for i in task_of[k]])) for j in range(len(layout.modules))]
                return {"l1": t2l.reconstruction_loss(gen, tgt, layout, stats, cfg.recon_target).sum()}
            return Objective(fn, {"l1": (1.0, "n_seqs")})
        train_items, val_items = _items(len(pairs_train)), _items(len(pairs_val))
        objective = objective_for(pairs_train)
        val_objective = objective_for(pairs_val)
        hashes["adapters"] = built_from["adapters"]
        model = hnet
    else:
        model, tok = base
        train_data = load_data(data_cfg, trained, "train")
        val_data = load_data(data_cfg, trained, "validation")
        hashes = {"train": data_hash(train_data), "validation": data_hash(val_data)}

        def items(split):
            return [it for i, t in enumerate(trained)
                    for it in encode_examples(tok, split[t], data_cfg.max_len, data_cfg.max_target_len, label=i)]
        train_items, val_items = items(train_data), items(val_data)
        objective = _sft_objective(hnet, layout, cfg, [emb_train[t] for t in trained])
        val_objective = _sft_objective(hnet, layout, cfg, [emb_val[t] for t in trained])
    fingerprint = stages.fingerprint(resolved, global_batch=train_cfg.batch_size * train_cfg.grad_accum,
                                     built_from=built_from)
    say(f"Text-to-LoRA ({cfg.objective}, head {cfg.head}, encoder {cfg.encoder}) on {', '.join(trained)}"
        f"{f' (holding out {cfg.hold_out})' if cfg.hold_out else ''}: {len(layout.modules)} modules, rank "
        f"{layout.rank}, {sum(p.numel() for p in params.values()):,} parameters; {len(train_items)} training items")
    stages.restart(stage, train_cfg, d)
    result = fit(model, params, train_items, val_items, cfg=train_cfg, seed=data_cfg.seed, name=stage.out_dir.name,
                 pad_id=0 if cfg.objective == "reconstruction" else base[1].pad_token_id,
                 state_dir=stage.state_dir, log_path=stage.log_path, objective=_Switch(objective, val_objective),
                 d=d, fingerprint=fingerprint)
    with torch.no_grad():
        for k, v in result.params.items():
            params[k].copy_(v)
    hnet.cpu().eval()
    with stages.publish(stage) as folder:
        t2l.save(folder, hnet, {"encoder": cfg.encoder, "objective": cfg.objective, "tasks": trained,
                                "hold_out": cfg.hold_out, "recon_target": cfg.recon_target, "stats": stats,
                                "base_model": model_identity(train_cfg.model)})
        runs.write_json_atomic(folder / "training_config.json", {
            "tasks": trained, "hold_out": cfg.hold_out, "seed": data_cfg.seed, "git_commit": runs.git_commit(),
            "data_hash": hashes, "model": train_cfg.model, "steps": result.steps, "best_step": result.best_step,
            "best_val_loss": result.best_val_loss, "final_train_loss": result.final_train_loss,
            "elapsed_s": round(result.elapsed_s, 2), "config": resolved, stages.BUILT_FROM: built_from,
            "versions": runs.versions()})
    val = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    say(f"{stage.out_dir.name}: {result.steps} steps, best validation loss {val} -> {stage.out_dir}")


class _Switch(Objective):
    """The training objective in train mode, the validation one (held-out descriptions) in eval mode."""

    def __init__(self, train: Objective, val: Objective):
        super().__init__(lambda model, batch: (train if model.training else val).fn(model, batch), train.terms)


def _sft_objective(hnet: t2l.HyperNet, layout: t2l.Layout, cfg: t2l.T2LConfig, embs: list[torch.Tensor]) -> Objective:
    def fn(model, batch):
        tasks = batch["task_ids"].tolist()
        picks = [int(torch.randint(len(embs[t]), (1,))) for t in tasks]         # the seeded generator: resumable
        emb = torch.stack([embs[t][p] for t, p in zip(tasks, picks)]).to(batch["input_ids"].device)
        factors = hnet(emb)
        with t2l.generated(model, layout) as layers:
            for layer, (a, b) in zip(layers, factors):
                layer.a, layer.b = a, b
            hidden, targets = target_hidden(model, batch)
            ce = F.cross_entropy(lm_head_logits(model, hidden), targets, reduction="sum",
                                 label_smoothing=cfg.label_smoothing)
        l2 = torch.stack([(a ** 2).flatten(1).mean(1) + (b ** 2).flatten(1).mean(1) for a, b in factors]).mean(0)
        return {"lm": ce, "l2": l2.sum()}
    return Objective(fn, {"lm": (1.0, "n_tokens"), "l2": (cfg.factor_l2, "n_seqs")})
