"""Text-to-LoRA as the paper trains it: the element norm, the step count, the round trip of
exact targets through generation, the saved norm, and the reconstruction report."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import src.training as training
import train_text_to_lora as script
from src import runs, t2l
from src.config import TrainConfig
from src.descriptions import held_out_descriptions
from src.errors import UserError, run_main
from src.lora import apply_adapter, load_adapter, lora_scale, make_adapter, unload_lora
from tiny import random_adapter, save_tiny, save_tiny_run, tiny_model, tiny_tokenizer

TASKS = ["sentiment", "nli", "qa"]
TARGETS = ("q_proj", "v_proj")
IDS = torch.randint(2, 400, (2, 9), generator=torch.Generator().manual_seed(0))


def _adapters(model, n=3, rslora=False):
    """n random rank-4 adapters (alpha 8), rsLoRA-scaled when asked."""
    out = {}
    for i, t in enumerate(TASKS[:n]):
        ad = random_adapter(model, 10 + i, rank=4, targets=TARGETS, name=t)
        if rslora:
            ad = make_adapter(ad.factors, {m: lora_scale(4, 8.0, True) for m in ad.factors}, None, True, t)
        out[t] = ad
    return out


def _hypernet(ads, head="L", norm="element", hidden=64, d_enc=16):
    cfg = t2l.T2LConfig(head=head, t2l_norm=norm, t2l_hidden=hidden, t2l_embed=16)
    lay = t2l.layout_of(ads, cfg)
    return t2l.new_hypernet(list(ads.values()), lay, d_enc, cfg, seed=0), lay


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(hnet, std=0.05):
    with torch.no_grad():
        for h in hnet.heads:
            h.weight.normal_(0, std, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------ the element norm

def test_element_stats_are_the_papers_mean_and_std_floored_and_fall_back_with_one_task():
    model = tiny_model("qwen2")
    ads = _adapters(model)
    lay = t2l.layout_of(ads, t2l.T2LConfig())
    for ad in ads.values():                                              # one element equal in every adapter
        ad.factors[lay.modules[0]][0][0, 0] = 0.1
    means, stds = t2l.element_stats(list(ads.values()), lay)
    for i, m in enumerate(lay.modules):
        for k in (0, 1):
            x = torch.stack([ad.factors[m][k] for ad in ads.values()])
            torch.testing.assert_close(means[i][k], x.mean(0))
            torch.testing.assert_close(stds[i][k], x.std(0).clamp(min=t2l.STD_FLOOR))
    assert float(stds[0][0][0, 0]) == float(torch.tensor(t2l.STD_FLOOR))
    hnet, _ = _hypernet(ads)
    lib = t2l.Library(hnet, torch.randn(3, 16), [0, 1, 2], t2l.library_targets(list(ads.values()), lay))
    assert float(lib.z_targets[0][0][:, 0, 0].abs().max()) == 0          # exactly the mean: z = 0

    one = {"sentiment": ads["sentiment"]}
    lay1 = t2l.layout_of(one, t2l.T2LConfig())
    means, stds = t2l.element_stats([one["sentiment"]], lay1)
    per_type = t2l.factor_stats([one["sentiment"]], lay1, "factors")
    for i, m in enumerate(lay1.modules):
        assert torch.equal(means[i][0], one["sentiment"].factors[m][0])
        assert torch.equal(stds[i][1], torch.full_like(stds[i][1], per_type[lay1.type_of[i]][1]))


@pytest.mark.parametrize("head", t2l.HEADS)
def test_with_the_element_norm_every_description_starts_at_the_library_mean(head):
    model = tiny_model("qwen2")
    ads = _adapters(model)
    hnet, lay = _hypernet(ads, head)
    assert len(hnet.biases) == 0                                         # the paper's heads have no bias
    means, _ = t2l.element_stats(list(ads.values()), lay)
    for emb in torch.randn(3, 16, generator=torch.Generator().manual_seed(5)):
        gen = hnet.adapter(emb)
        for i, m in enumerate(lay.modules):
            torch.testing.assert_close(gen.factors[m][0], means[i][0], rtol=0, atol=0)
            torch.testing.assert_close(gen.factors[m][1], means[i][1], rtol=0, atol=0)
        assert gen.scales == ads["nli"].scales


@pytest.mark.parametrize("head,steps,worst_bound,mean_bound", [("L", 300, 0.01, 0.01), ("M", 300, 0.1, 0.02),
                                                                ("S", 1000, 0.5, 0.2)])
def test_reconstruction_in_z_units_reproduces_three_adapters(head, steps, worst_bound, mean_bound, tmp_path):
    """Measured (CPU, one thread): worst / mean relative delta error L 0.0005 / 0.0004, M 0.023 /
    0.0025, S 0.31 / 0.11 (the S head writes one rank row at a time and learns slowest)."""
    model = tiny_model("qwen2")
    ads = _adapters(model)
    hnet, lay = _hypernet(ads, head)
    emb = torch.nn.functional.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    lib = t2l.Library(hnet, emb, [0, 1, 2], t2l.library_targets(list(ads.values()), lay))
    cfg = t2l.by_steps(TrainConfig(max_steps=steps, epochs=1, batch_size=3, lr=3e-3, eval_every=0, save_every=0,
                                   log_every=50, warmup_steps=0, progress=False))
    params = dict(hnet.named_parameters())
    training.fit_or_exit(lib, params, t2l.pair_items(3), [], cfg=cfg, seed=0, name="t2l", pad_id=0,
                         state_dir=tmp_path, log_path=tmp_path / "log.jsonl",
                         objective=t2l.reconstruction_objective(lay))
    errs = [t2l.delta_error(hnet.adapter(emb[k]), ad, m) for k, ad in enumerate(ads.values()) for m in lay.modules]
    print(f"head {head}, {steps} steps: worst {max(errs):.4f}, mean {sum(errs) / len(errs):.4f}")
    assert max(errs) < worst_bound and sum(errs) / len(errs) < mean_bound


# ------------------------------------------------------------------------ exact targets round-trip

@pytest.mark.parametrize("norm,rslora", [("element", False), ("element", True), ("type", True)])
def test_exact_targets_written_through_generation_give_the_oracle_logits(norm, rslora, tmp_path):
    """The hypernetwork's output for the oracle factors (normalise, the inverse of de-normalisation)
    goes through generation's own path: de-normalise, scale (rsLoRA), make_adapter, save, load, apply."""
    model = tiny_model("qwen2")
    ads = _adapters(model, rslora=rslora)
    hnet, lay = _hypernet(ads, norm=norm)
    oracle = ads["nli"]
    z = [hnet.normalise(i, *oracle.factors[m]) for i, m in enumerate(lay.modules)]
    t2l.write_generated(hnet.to_adapter(z), {"description": "x"}, tmp_path / "gen")
    gen = load_adapter(tmp_path / "gen")
    assert gen.config.get("use_rslora", False) == rslora and gen.scales == oracle.scales
    apply_adapter(model, gen)
    ours = _logits(model)
    unload_lora(model)
    base = _logits(model)
    apply_adapter(model, oracle)
    want = _logits(model)
    unload_lora(model)
    assert (want - base).abs().max() > 1e-3                              # the adapter matters
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ save and load

def _saved(tmp_path, norm="element", n=3):
    """A hypernetwork with perturbed heads (base encoder, the tiny model), saved in RUN/compose/t2l."""
    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    ads = _adapters(model, n)
    hnet, lay = _hypernet(ads, norm=norm, d_enc=32)
    _perturb(hnet)
    folder = t2l.save(tmp_path / "run" / "compose" / "t2l", hnet.eval(),
                      {"encoder": "base", "tasks": list(ads), "base_model": None})
    return folder, hnet, ads, (model, tok)


def _rewrite(folder, state=None, **config):
    """Edit a saved hypernetwork's tensors and config, keeping the sha256 consistent."""
    if state is not None:
        save_file(state, str(folder / t2l.WEIGHTS_NAME), metadata={"format": "pt"})
    meta = json.loads((folder / t2l.CONFIG_NAME).read_text())
    meta.update(config, weights_sha256=runs.file_digest(folder / t2l.WEIGHTS_NAME))
    (folder / t2l.CONFIG_NAME).write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


@pytest.mark.parametrize("norm", t2l.NORMS)
def test_generate_from_the_saved_folder_equals_the_in_memory_hypernetwork(norm, tmp_path):
    folder, hnet, _, base = _saved(tmp_path, norm)
    meta = json.loads((folder / t2l.CONFIG_NAME).read_text())
    assert meta["version"] == t2l.FORMAT_VERSION and meta["norm"] == norm
    assert (meta.get("norm_file") == t2l.WEIGHTS_NAME) == (norm == "element")
    assert ("out_std" in meta) == (norm == "type")
    text = "Tell whether a review likes the film."
    saved, record = t2l.generate_adapter(folder, text, base)
    mine = hnet.adapter(t2l.encode([text], "base", base)[0])
    assert record["description"] == text and saved.scales == mine.scales
    for m, (a, b) in mine.factors.items():
        torch.testing.assert_close(saved.factors[m][0], a, rtol=0, atol=0)
        torch.testing.assert_close(saved.factors[m][1], b, rtol=0, atol=0)


def test_a_version_one_folder_still_loads_as_the_type_norm(tmp_path):
    folder, hnet, _, base = _saved(tmp_path, "type")
    _rewrite(folder, version=1, norm=None)
    loaded, meta = t2l.load(folder)
    assert meta["norm"] == "type" and loaded.norm == "type"
    emb = t2l.encode(["Translate English into German."], "base", base)[0]
    assert torch.equal(loaded.adapter(emb).factors[hnet.layout.modules[0]][1],
                       hnet.adapter(emb).factors[hnet.layout.modules[0]][1])


def test_a_saved_norm_that_does_not_fit_is_refused_in_one_line(tmp_path, capsys):
    folder, _, _, _ = _saved(tmp_path)
    model_dir = save_tiny(tmp_path / "qwen2")
    state = load_file(str(folder / t2l.WEIGHTS_NAME))
    cases = [({"norm": "type"}, state, "(norm type): it lacks out_std"),
             ({}, {k: v for k, v in state.items() if not k.startswith("element.")}, "lacks element.mean_A_0"),
             ({}, {**state, "element.std_B_1": -state["element.std_B_1"]}, "std_B_1 is not finite and positive"),
             ({}, {**state, "element.mean_A_0": state["element.mean_A_0"][:1]}, "element.mean_A_0 is [1,"),
             ({"version": 3}, state, "format version 3"),
             ({"version": 1}, state, "version 1 has no element norm")]
    for config, tensors, words in cases:
        _rewrite(folder, tensors, **config)
        with pytest.raises(UserError) as e:
            t2l.load(folder)
        assert words in str(e.value), str(e.value)
        assert run_main(t2l.main, ["generate", "--run", str(tmp_path / "run"), "--description", "x", "--out",
                                   str(tmp_path / "out"), "--model", str(model_dir)]) == 2
        errors = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()
                  and not line.startswith(("Loading weights", "Writing model shards"))]   # transformers' bars
        assert len(errors) == 1 and errors[0].startswith("error:") and words in errors[0], errors
        _rewrite(folder, state, version=t2l.FORMAT_VERSION, norm="element")
    t2l.load(folder)                                                     # restored: loads again
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ another encoder, model or alpha

TEXT = "Tell whether a review likes the film."


def _generate(tmp_path, capsys, *extra):
    """`generate` in process into tmp_path/out: (exit code, stderr lines but transformers' loading bars)."""
    code = run_main(t2l.main, ["generate", "--run", str(tmp_path / "run"), "--description", TEXT,
                               "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return code, [line for line in err if line.strip() and not line.startswith(("Loading weights", "Writing model"))]


def _refused(tmp_path, capsys, *extra) -> str:
    """The one line of a refused `generate`, which wrote nothing."""
    code, err = _generate(tmp_path, capsys, *extra)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    assert not (tmp_path / "out").exists()
    return err[0]


def test_descriptions_of_another_width_are_refused_before_the_hypernetwork_runs(tmp_path, capsys):
    folder, _, _, _ = _saved(tmp_path)                                  # base encoder, the 32-wide tiny model
    narrow, wide = save_tiny(tmp_path / "narrow"), save_tiny(tmp_path / "wide", hidden=64)
    _rewrite(folder, base_model=str(wide))                              # the recorded model is now a wider one
    line = _refused(tmp_path, capsys)
    assert f"{folder} was trained on descriptions encoded by base (width 32)" in line, line
    assert f"the model {wide} gives width 64" in line, line
    with pytest.raises(UserError, match="width 64"):
        t2l.generate_adapter(folder, TEXT, (tiny_model(hidden=64), tiny_tokenizer()))
    _rewrite(folder, base_model=str(narrow.resolve()))
    assert "gives width 64" in _refused(tmp_path, capsys, "--model", str(wide), "--same-base")

    _rewrite(folder, d_enc=None)                                        # a config without d_enc: read off the weights
    assert t2l.load(folder)[1]["d_enc"] == 32
    assert "(width 32)" in _refused(tmp_path, capsys, "--model", str(wide), "--same-base")
    assert _generate(tmp_path, capsys)[0] == 0                          # the model it was trained with
    assert (tmp_path / "out" / t2l.GENERATED_NAME).is_file()


def test_a_config_naming_another_encoder_is_refused_in_one_line(tmp_path, capsys):
    pytest.importorskip(t2l.MINILM_PACKAGE)
    folder, _, _, _ = _saved(tmp_path)                                  # 32 wide: the base encoder's
    _rewrite(folder, encoder="minilm")
    line = _refused(tmp_path, capsys)
    assert "encoded by minilm (width 32); all-MiniLM-L6-v2 gives width 384" in line, line


def test_generate_for_another_model_is_refused_unless_same_base(tmp_path, capsys):
    folder, _, _, _ = _saved(tmp_path)
    narrow, other = save_tiny(tmp_path / "narrow"), save_tiny(tmp_path / "other", seed=1)   # both 32 wide
    _rewrite(folder, base_model=str(narrow.resolve()))
    line = _refused(tmp_path, capsys, "--model", str(other))
    assert f"trained for the model {narrow.resolve()}; --model is {other}" in line and "--same-base" in line, line
    (tmp_path / "elsewhere").mkdir()
    assert _generate(tmp_path, capsys, "--model", str(tmp_path / "elsewhere" / ".." / "narrow"))[0] == 0  # one model
    import shutil
    shutil.rmtree(tmp_path / "out")
    assert _generate(tmp_path, capsys, "--model", str(other), "--same-base")[0] == 0
    assert load_adapter(tmp_path / "out").base_model == str(narrow.resolve())   # the hypernetwork's name, as merge


def test_evaluating_t2l_on_another_model_than_it_writes_for_says_so(tmp_path, capsys):
    """The t2l entry, like task adapters of another base model: a note naming both (the shapes may fit)."""
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    folder, _, ads, _ = _saved(tmp_path)
    _rewrite(folder, base_model="Qwen/Qwen2-0.5B")
    tasks = list(ads)
    for model_name, expected in (("Qwen/Qwen2-0.5B", []), ("Qwen/Qwen2-1.5B", [
            f"note: {folder} writes adapters for Qwen/Qwen2-0.5B; evaluating them on Qwen/Qwen2-1.5B"])):
        capsys.readouterr()
        compose.REGISTRY["t2l"].check(compose.Env(tmp_path / "run", tasks, model_name=model_name))
        assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("note:")] == expected


def _save_kv4(path):
    """A tiny model as wide as tiny_model's (32) whose v_proj is [32, 32], not [16, 32]: 4 key-value heads, not 2."""
    from transformers import Qwen2ForCausalLM
    config = tiny_model("qwen2").config
    config.num_key_value_heads = 4
    Qwen2ForCausalLM(config).save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def test_a_model_whose_modules_differ_is_refused_naming_a_module_and_both_shapes(tmp_path, capsys):
    folder, _, _, (_, tok) = _saved(tmp_path)                           # base encoder, q_proj and v_proj
    kv4 = _save_kv4(tmp_path / "kv4")
    _rewrite(folder, base_model=str(kv4))                               # the same width, other module shapes
    line = _refused(tmp_path, capsys)
    assert f"writes model.layers.0.self_attn.v_proj as [16, 32] (out, in); in the model {kv4} it is [32, 32]" \
        in line, line
    with pytest.raises(UserError, match="writes model.layers.1.self_attn.q_proj, which this model does not have"):
        t2l.generate_adapter(folder, TEXT, (tiny_model(layers=1), tok))  # a layer fewer

    pytest.importorskip(t2l.MINILM_PACKAGE)                             # minilm: --model alone is loaded
    hnet, lay = _hypernet(_adapters(tiny_model("qwen2")), d_enc=384)
    narrow, wide = save_tiny(tmp_path / "narrow"), save_tiny(tmp_path / "wide", hidden=64)
    t2l.save(folder, hnet, {"encoder": "minilm", "base_model": str(narrow.resolve())})
    line = _refused(tmp_path, capsys, "--model", str(wide), "--same-base")
    assert f"writes {lay.modules[0]} as [32, 32] (out, in); in the model {wide} it is [64, 64]" in line, line
    assert _generate(tmp_path, capsys, "--model", str(narrow))[0] == 0


def test_the_recorded_base_model_is_the_one_the_hypernetwork_writes_for():
    model = tiny_model("qwen2")
    ads = list(_adapters(model, 2).values())
    assert t2l.trained_for("org/used", ads, uses_model=True) == "org/used"
    assert t2l.trained_for("org/default", ads, uses_model=False) is None            # the adapters name none
    named = [make_adapter(ad.factors, ad.scales, "org/theirs", name=ad.name) for ad in ads]
    assert t2l.trained_for("org/default", named, uses_model=False) == "org/theirs"
    named[1] = make_adapter(ads[1].factors, ads[1].scales, "org/another")
    assert t2l.trained_for("org/default", named, uses_model=False) is None          # they disagree


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_an_alpha_that_is_not_positive_is_refused_in_the_config(alpha):
    with pytest.raises(UserError, match=f"--t2l-alpha must be finite and above 0.*got {alpha}"):
        t2l.T2LConfig(objective="sft", t2l_alpha=alpha, t2l_norm="type")


def test_a_saved_alpha_of_zero_is_refused_before_anything_is_written(tmp_path, capsys):
    folder, _, _, _ = _saved(tmp_path)
    model_dir = save_tiny(tmp_path / "qwen2")
    layout = json.loads((folder / t2l.CONFIG_NAME).read_text())["layout"]
    _rewrite(folder, layout={**layout, "alpha": 0.0})                   # written before alpha 0 was refused
    with pytest.raises(UserError, match="alpha is 0.0"):
        t2l.load(folder)
    assert "alpha is 0.0, so every adapter it writes would change nothing" in \
        _refused(tmp_path, capsys, "--model", str(model_dir))


# ------------------------------------------------------------------------ the reconstruction report

def test_delta_error_matches_the_dense_computation():
    model = tiny_model("qwen2")
    ads = _adapters(model)
    gen, target = ads["sentiment"], ads["nli"]
    def dense(ad, m):
        return ad.scales[m] * ad.factors[m][1].double() @ ad.factors[m][0].double()
    for m in gen.factors:
        want = float((dense(gen, m) - dense(target, m)).norm() / dense(target, m).norm())
        assert abs(t2l.delta_error(gen, target, m) - want) < 1e-9 * max(1.0, want)
        assert t2l.delta_error(target, target, m) < 1e-6


def test_the_report_is_zero_for_exact_targets_and_matches_a_direct_computation(tmp_path):
    folder, hnet, ads, base = _saved(tmp_path, n=1)                   # one task: at init, exactly its adapter
    with torch.no_grad():
        for h in hnet.heads:
            h.weight.zero_()
    t2l.save(folder, hnet, {"encoder": "base", "tasks": ["sentiment"], "base_model": None})
    texts = {"sentiment": held_out_descriptions("sentiment")}
    report = t2l.reconstruction_report(folder, ads, texts, base)
    assert report["mean"] < 1e-6 and report["norm"] == "element"
    assert [d["description"] for d in report["tasks"]["sentiment"]["descriptions"]] == list(texts["sentiment"])

    folder, hnet, ads, base = _saved(tmp_path / "b", n=3)              # heads perturbed: a direct computation
    texts = {t: held_out_descriptions(t)[:2] for t in ads}
    report = t2l.reconstruction_report(folder, ads, texts, base)
    lay = hnet.layout
    for task, rec in report["tasks"].items():
        gens = [hnet.adapter(e) for e in t2l.encode(texts[task], "base", base)]
        direct = {m: sum(float((g.delta(m) - ads[task].delta(m)).norm() / ads[task].delta(m).norm()) for g in gens)
                  / len(gens) for m in lay.modules}
        for m in lay.modules:
            assert abs(rec["modules"][m] - direct[m]) < 1e-5
        assert abs(rec["mean"] - sum(direct.values()) / len(direct)) < 1e-5
        for t, ty in enumerate(lay.types):
            mods = [lay.modules[i] for i in lay.of_type(t)]
            assert abs(rec["by_type"][ty] - sum(direct[m] for m in mods) / len(mods)) < 1e-5
    assert abs(report["mean"] - sum(r["mean"] for r in report["tasks"].values()) / 3) < 1e-9


# ------------------------------------------------------------------------ the script: steps, options, report

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model folder and the adapters folder of a run for sentiment and nli."""
    model_dir, run = save_tiny_run(tmp_path_factory.mktemp("t2l_steps"), targets=TARGETS)
    return model_dir, run / "adapters"


def _run(tiny_run, tmp_path, name):
    import shutil
    run = tmp_path / name
    shutil.copytree(tiny_run[1], run / "adapters")
    return run


def _args(model_dir, run, *extra):
    """18 (task, description) pairs, batch 6: 3 steps per epoch."""
    return ["--model", str(model_dir), "--tasks", "sentiment,nli", "--output-dir", str(run), "--encoder", "base",
            "--t2l-hidden", "32", "--t2l-embed", "8", "--batch-size", "6", "--lr", "3e-3", "--eval-every", "3",
            "--save-every", "0", "--log-every", "1", "--patience", "0", "--no-progress", *extra]


def _steps(run):
    folder = run / "compose" / "t2l"
    info = json.loads((folder / "training_config.json").read_text())
    logged = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    return info["steps"], max(logged)


def test_max_steps_decides_the_length_whatever_the_epochs(tiny_run, tmp_path, capsys):
    model_dir = tiny_run[0]
    few, many = _run(tiny_run, tmp_path, "few"), _run(tiny_run, tmp_path, "many")
    assert run_main(script.main, _args(model_dir, few, "--epochs", "1", "--max-steps", "7")) == 0
    assert "7 steps (--max-steps)" in capsys.readouterr().out
    assert run_main(script.main, _args(model_dir, many, "--epochs", "100", "--max-steps", "7")) == 0
    assert "7 of 7 steps" in capsys.readouterr().out
    assert _steps(few) == _steps(many) == (7, 7)
    a, b = (t2l.load(r / "compose" / "t2l")[0].state_dict() for r in (few, many))
    assert all(torch.equal(a[k], b[k]) for k in a)                     # the same training
    assert run_main(script.main, _args(model_dir, few, "--epochs", "100", "--max-steps", "7")) == 0
    assert "skip" in capsys.readouterr().out                           # --epochs is moot with --max-steps
    by_epochs = _run(tiny_run, tmp_path, "epochs")
    assert run_main(script.main, _args(model_dir, by_epochs, "--epochs", "2")) == 0
    assert _steps(by_epochs) == (6, 6)                                 # without --max-steps: 2 epochs of 3


def test_every_new_option_changes_the_fingerprint_and_the_report_is_written(tiny_run, tmp_path, capsys):
    model_dir = tiny_run[0]
    run = _run(tiny_run, tmp_path, "run")
    assert run_main(script.main, _args(model_dir, run, "--max-steps", "4")) == 0
    folder = run / "compose" / "t2l"
    info = json.loads((folder / "training_config.json").read_text())
    assert info["config"]["T2LConfig"]["t2l_norm"] == "element"
    report = json.loads((folder / t2l.REPORT_NAME).read_text())
    assert set(report["tasks"]) == {"sentiment", "nli"} and report["mean"] == info["reconstruction_error"]
    assert [d["description"] for d in report["tasks"]["nli"]["descriptions"]] == list(held_out_descriptions("nli"))
    capsys.readouterr()
    for extra, word in ((["--t2l-norm", "type"], "--t2l-norm"), (["--t2l-hidden", "48"], "--t2l-hidden")):
        assert run_main(script.main, _args(model_dir, run, "--max-steps", "4", *extra)) == 2
        err = capsys.readouterr().err
        assert "built from other inputs" in err and word in err and len(err.strip().splitlines()) == 1
    assert run_main(script.main, _args(model_dir, run, "--max-steps", "4", "--t2l-norm", "type", "--force")) == 0
    meta = json.loads((folder / t2l.CONFIG_NAME).read_text())
    assert meta["norm"] == "type" and len(meta["out_std"]) == 2


def test_bad_norm_options_are_one_line(tiny_run, tmp_path, capsys):
    model_dir = tiny_run[0]
    run = _run(tiny_run, tmp_path, "bad")
    for extra, word in ((["--t2l-norm", "layer"], "--t2l-norm"), (["--t2l-hidden", "0"], "--t2l-hidden"),
                        (["--objective", "sft", "--t2l-rank", "8"], "--t2l-norm element")):
        assert run_main(script.main, _args(model_dir, run, "--max-steps", "2", *extra)) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "compose").exists()


def test_sft_with_alpha_zero_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    model_dir = tiny_run[0]
    run = _run(tiny_run, tmp_path, "alpha")
    sft = ["--objective", "sft", "--t2l-norm", "type", "--data", "sample", "--train-size", "4", "--eval-size", "2",
           "--max-len", "96", "--max-target-len", "8", "--max-steps", "1"]
    for alpha in ("0", "-1", "nan"):
        assert run_main(script.main, _args(model_dir, run, *sft, "--t2l-alpha", alpha)) == 2
        err = capsys.readouterr().err
        assert "--t2l-alpha must be finite and above 0" in err and len(err.strip().splitlines()) == 1, err
    assert not (run / "compose").exists() and not (run / "checkpoints").exists()


def test_sft_records_the_examples_that_chose_its_checkpoint_and_evaluation_leaves_them_out(tiny_run, tmp_path):
    """issue 26: with --objective sft the validation examples choose the checkpoint; the record names
    them, and `compose.selection_ids` (what evaluation leaves out) includes them."""
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    model_dir = tiny_run[0]
    run = _run(tiny_run, tmp_path, "sft")
    sft = ["--objective", "sft", "--t2l-norm", "type", "--data", "sample", "--train-size", "4", "--eval-size", "3",
           "--max-len", "96", "--max-target-len", "8", "--max-steps", "1"]
    assert run_main(script.main, _args(model_dir, run, *sft)) == 0
    info = json.loads((run / "compose" / "t2l" / "training_config.json").read_text())
    chosen = info["selection_ids"]
    assert sorted(chosen) == ["nli", "sentiment"] and all(len(ids) == 3 for ids in chosen.values())
    left_out = compose.selection_ids(run, ["sentiment", "nli"])
    for task, ids in chosen.items():
        assert set(ids) <= set(left_out[task])


def test_a_reconstruction_record_adds_no_examples_to_leave_out(tiny_run, tmp_path):
    from src import compose, systems  # noqa: F401 (systems: every method registered)
    model_dir = tiny_run[0]
    run = _run(tiny_run, tmp_path, "recon")
    assert run_main(script.main, _args(model_dir, run, "--max-steps", "1")) == 0
    assert json.loads((run / "compose" / "t2l" / "training_config.json").read_text())["selection_ids"] == {}
    assert compose.selection_ids(run, ["sentiment", "nli"]) == {"sentiment": [], "nli": []}
