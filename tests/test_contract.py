"""One contract over every registered method (src/systems.py), on the fixture run of a tiny model.

For each method the fixture can run (adapters, MoA, and the build caches of tests/fixtures/
run_v1_systems): its fingerprint is JSON without loss and the same when computed again; `prepare`
leaves every weight of the model bit-identical and no module behind; a dynamic method's routing
records name one of the tasks, or give shares of them that sum to one. A method the fixture cannot
run (it needs a trained LoRA-Mixer, hypernetwork or multitask adapter) refuses in one line naming
itself. Every method has a family of `compose.FAMILIES`, a help line, and dataclass options.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from src import compose, systems  # noqa: F401 (systems: every method registered)
from src import evaluation as ev
from src.errors import UserError
from src.lorahub import LoraHubConfig, RandomMergeConfig
from src.retrieval import RetrievalConfig

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sentiment", "nli", "qa"]
# the options the build caches of tests/fixtures/run_v1_systems were made with
OPTIONS = {LoraHubConfig: LoraHubConfig(lorahub_budget=3, lorahub_shots=2),
           RandomMergeConfig: RandomMergeConfig(random_draws=2), RetrievalConfig: RetrievalConfig(retrieval_shots=4)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    run = tmp_path_factory.mktemp("contract") / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_v1", run)
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_v1_systems", run, dirs_exist_ok=True)
    return compose.Env(run_dir=run, tasks=list(TASKS), options=dict(OPTIONS), model_name="tiny-qwen2",
                       dtype="float32", model_loader=lambda: (tiny_model("qwen2"), tiny_tokenizer()))


def runnable(env, name: str) -> bool:
    """Checked and built (once), or False after asserting that the refusal is one line naming it."""
    if name in env.built:
        return True
    try:
        compose.check_all([name], env)
    except UserError as e:
        assert "\n" not in str(e) and name in str(e), str(e)
        return False
    compose.build_all([name], env)
    env.built.setdefault(name, None)
    return True


@pytest.mark.parametrize("name", compose.known_methods())
def test_every_method_keeps_the_contract(env, name):
    method = compose.REGISTRY[name]
    assert method.family in compose.FAMILIES and method.help and method.kind in compose.KINDS
    assert all(dataclasses.is_dataclass(c) for c in method.configs), method.configs
    if not runnable(env, name):
        assert name in ("lora_mixer", "lora_mixer_finetune", "lora_mixer_joint", "t2l", "t2l_zeroshot",
                        "multitask_lora"), f"{name} cannot run on the fixture"
        return
    for task in TASKS:
        fp = compose.fingerprint(name, task, env, {})
        assert json.loads(json.dumps(fp, allow_nan=False)) == json.loads(json.dumps(fp))
        assert json.dumps(compose.fingerprint(name, task, env, {}), sort_keys=True) == json.dumps(fp, sort_keys=True)
    model, tok = env.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    prompts = [tok("the movie was great", add_special_tokens=False)["input_ids"],
               tok("premise: a cat sleeps. hypothesis: an animal rests", add_special_tokens=False)["input_ids"]]
    with method.prepare(model, env, "nli") as router:
        assert (router is None) == (method.kind != "dynamic")
        out = ev.generate(model, tok, prompts, batch_size=2, max_new_tokens=2, router=router)
    if method.kind == "dynamic":
        assert len(out.routing) == len(prompts)
        for rec in out.routing:
            if "routed_task" in rec:
                assert rec["routed_task"] in TASKS, rec
            else:
                share = rec["expert_share"]
                assert set(share) <= set(TASKS) and abs(sum(share.values()) - 1) < 1e-4, rec
    assert [n for n, _ in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{name} changed {k}"
