"""One contract over every registered method (src/systems.py), on the fixture run of a tiny model.

For each method the fixture can run (adapters, MoA, and the build caches of tests/fixtures/
run_v1_systems): its fingerprint is JSON without loss and the same when computed again; `prepare`
leaves every weight of the model bit-identical and no module behind; a dynamic method's routing
records name one of the tasks, or give shares of them that sum to one. A method the fixture cannot
run (it needs a trained LoRA-Mixer, hypernetwork or multitask adapter) refuses in one line naming
itself. Every method has a family of `compose.FAMILIES`, a help line, and dataclass options; every
option it reads changes its fingerprint (the options that cannot change a prediction, and the ones a
method does not read, are declared with the reason).
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


# --------------------------------------------------------------------------- options and fingerprints
# Every option of every registered method: a changed value, with the other options of its config it
# needs to matter (a temperature means nothing at top-k 1), must change the cell's fingerprint; the
# options that cannot change a prediction are listed apart, each with why. A new option that is in
# neither table fails `test_every_option_is_declared`.
GENERAL = str(ROOT / "tests" / "fixtures" / "run_v1" / "adapters" / "qa")
CHANGED = {
    ("ArrowConfig", "arrow_top_k"): (2, {}), ("ArrowConfig", "arrow_temperature"): (0.5, {}),
    ("ArrowConfig", "arrow_prototypes"): ("power", {}),
    ("ArrowConfig", "arrow_power_iters"): (3, {"arrow_prototypes": "power"}),
    ("ArrowConfig", "arrow_seed"): (1, {"arrow_prototypes": "power"}),
    ("ArrowConfig", "arrow_general"): ((GENERAL,), {}),
    ("LoraHubConfig", "lorahub_budget"): (4, {}), ("LoraHubConfig", "lorahub_shots"): (1, {}),
    ("LoraHubConfig", "lorahub_bounds"): ((-1.0, 1.0), {}), ("LoraHubConfig", "lorahub_l1"): (0.1, {}),
    ("LoraHubConfig", "lorahub_space"): ("delta", {}), ("LoraHubConfig", "lorahub_optimizer"): ("CMA", {}),
    ("LoraHubConfig", "lorahub_leave_out"): (True, {}), ("LoraHubConfig", "lorahub_max_len"): (100, {}),
    ("RandomMergeConfig", "random_draws"): (3, {}),
    ("RetrievalConfig", "retrieval_shots"): (3, {}), ("RetrievalConfig", "retrieval_encoder"): ("base", {}),
    ("RetrievalConfig", "retrieval_top_k"): (2, {}),
    ("RetrievalConfig", "retrieval_temperature"): (0.5, {"retrieval_top_k": 2}),
    ("SmileConfig", "smile_top_k"): (2, {}), ("SmileConfig", "smile_gate_k"): (2, {}),
    ("SmileConfig", "smile_gate_scale"): ("singular", {}),
    ("SmileConfig", "smile_normalize"): ("input", {"smile_top_k": 2}),
    ("SmileConfig", "smile_temperature"): (0.5, {"smile_top_k": 2}),
    ("SmileConfig", "smile_rank"): (2, {}),
    ("MixerEvalConfig", "eval_mixer_top_k"): (1, {}),
    # a merge's own options: each merge reads those of merging.options_of (`merge_cases` below)
    ("MergeConfig", "density"): (0.3, {}), ("MergeConfig", "rank"): (2, {}),
    ("MergeConfig", "majority_sign"): ("frequency", {}), ("MergeConfig", "space"): ("delta", {}),
    ("MergeConfig", "weights"): ((1.0, 0.5, 0.25), {}), ("MergeConfig", "core_merge"): ("tsv", {}),
    ("MergeConfig", "keep"): (0.5, {}), ("MergeConfig", "merge_scale"): ("0.5", {}),
    ("MergeConfig", "merge_scale_grid"): ((0.5, 1.0), {"merge_scale": "auto"}),
}
UNCHANGED = {   # options that change speed or memory, never a prediction
    ("LoraHubConfig", "lorahub_batch_size"): "batches the shots' loss; the sum is the same",
}
SEARCH = {"lorahub_budget", "lorahub_l1", "lorahub_optimizer", "lorahub_leave_out", "lorahub_shots", "lorahub_max_len"}


def not_read(method, field: str) -> str | None:
    """Why `method` does not read option `field` (None: it does)."""
    from src.merge import Merge
    if method.name == "lorahub" and field == "lorahub_leave_out":
        return "one merge for every task: no target task to leave out"
    if method.name == "random_merge" and field in SEARCH:
        return "random weights: no search, no shots"
    if isinstance(method, Merge) and field.startswith("lorahub_") and field not in ("lorahub_shots", "lorahub_max_len"):
        return "--merge-scale auto scores its grid on LoraHub's shots: only their number and length"
    return None


SECOND = {"density": 0.7, "rank": 3, "majority_sign": "total", "space": "ab", "core_merge": "ties", "keep": 0.25,
          "merge_scale": "0.75"}
MERGE_FIELDS = {"density": "density", "rank": "rank", "majority_sign": "majority_sign", "space": "space",
                "core_merge": "core_merge", "keep": "keep", "merge_scale": "scale"}


def _declared(config: type) -> set[str]:
    return {f for c, f in [*CHANGED, *UNCHANGED] if c == config.__name__}


def test_every_option_is_declared():
    for m in compose.REGISTRY.values():
        for config in m.configs:
            fields = {f.name for f in dataclasses.fields(config)}
            assert fields == _declared(config), (m.name, config.__name__, fields ^ _declared(config))


def _cases(method):
    """(config, field, value, context) for each option `method` reads."""
    from src import merging
    for config in method.configs:
        for field in sorted(_declared(config)):
            if (config.__name__, field) in UNCHANGED or not_read(method, field):
                continue
            value, context = CHANGED[(config.__name__, field)]
            if config.__name__ == "MergeConfig":
                reads = set(merging.options_of(merging.MERGES[merging.resolve_method(method.name, {})[0]]))
                if field in MERGE_FIELDS and MERGE_FIELDS[field] not in reads:
                    continue
                if field == "merge_scale_grid" and "scale" not in reads:
                    continue
                preset = merging.resolve_method(method.name, {})[1]
                if field in MERGE_FIELDS and preset.get(MERGE_FIELDS[field]) == value:
                    value = SECOND[field]                      # a variant that presets this very value
            yield config, field, value, context


@pytest.mark.parametrize("name", [m for m in compose.known_methods() if compose.REGISTRY[m].configs])
def test_the_fingerprint_changes_with_each_option_the_method_reads(env, name):
    method = compose.REGISTRY[name]
    if not runnable(env, name):
        return                                       # refused in one line (the test above)
    from src.merging import MergeConfig
    checked = 0
    for config, field, value, context in _cases(method):
        base = dataclasses.replace(env.opt(config), **context)
        changed = dataclasses.replace(base, **{field: value})
        prints = []
        for cfg in (base, changed):
            env.options[config] = cfg
            if config is not MergeConfig and MergeConfig in method.configs:    # a merge reads LoraHub's shots
                env.options[MergeConfig] = MergeConfig(merge_scale="auto")     # only to search its scale
            try:
                prints.append(json.dumps(compose.fingerprint(name, "nli", env, {}), sort_keys=True, default=str))
            finally:
                env.options[config] = OPTIONS.get(config, config())
                env.options.pop(MergeConfig, None)
        assert prints[0] != prints[1], f"{name}: --{field.replace('_', '-')} {value!r} leaves the fingerprint as it is"
        checked += 1
    assert checked, f"{name} reads none of its options"
