"""The two scoring protocols: the toolkit's and the reference study's, pinned on hand-made cases."""
import math

import numpy as np
import pytest
import sacrebleu

from src import metrics
from src import tasks as T

HYPS = ["the cat sat on the mat", "a b c d e", "there is a dog in the garden today", "short"]
REFS = ["the cat sat on a mat", "a b c d f", "a dog is in the garden", "a much longer reference sentence"]


def test_study_bleu_has_no_smoothing():
    assert metrics.study_bleu(["a b c d e"], ["a b c x e"])["bleu"] == 0.0    # no 4-gram matches
    assert metrics.bleu(["a b c d e"], ["a b c x e"])["bleu"] > 0             # sacreBLEU smooths


def test_study_bleu_by_hand():
    # 4/5, 3/4, 2/3, 1/2 matching n-grams, equal lengths: (0.8 * 0.75 * 2/3 * 0.5) ** 0.25
    assert metrics.study_bleu(["a b c d e"], ["a b c d f"])["bleu"] == pytest.approx(100 * 0.2 ** 0.25)
    # brevity: 4 of 4 n-grams of every order match, hypothesis 4 tokens, reference 6
    got = metrics.study_bleu(["a b c d"], ["a b c d e f"])["bleu"]
    assert got == pytest.approx(100 * math.exp(1 - 6 / 4))
    # several references: n-gram counts clipped by the max over them, length the shortest's
    got = metrics.study_bleu(["a b c d"], [["a b c d e f", "x a b c d"]])["bleu"]
    assert got == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_study_bleu_equals_sacrebleu_without_smoothing_on_single_references():
    ref = sacrebleu.corpus_bleu(HYPS, [REFS], smooth_method="none").score
    assert metrics.study_bleu(HYPS, REFS)["bleu"] == pytest.approx(ref, abs=1e-9)


def test_study_rouge_does_not_stem_and_takes_the_bootstrap_median():
    p, r = ["the cats were running"], ["the cat was running"]
    assert metrics.study_rouge(p, r)["rougeL"] < metrics.rouge(p, r)["rougeL"]     # stemming: cats = cat
    assert metrics.study_rouge(p, r)["rougeL"] == pytest.approx(metrics.rouge(p, r, use_stemmer=False)["rougeL"])
    many_p, many_r = HYPS * 25, REFS * 25
    mean = metrics.rouge(many_p, many_r, use_stemmer=False)["rougeL"]
    state = np.random.get_state()[1].copy()
    a, b = metrics.study_rouge(many_p, many_r), metrics.study_rouge(many_p, many_r)
    assert a == b                                                   # seeded: reruns the same
    assert (np.random.get_state()[1] == state).all()                # and numpy's global RNG untouched
    assert abs(a["rougeL"] - mean) < 5e-3                           # the median of bootstrap means ~ the mean


def example(task, target, refs=None):
    return T.Example("x", task, {}, target, tuple(refs or [target]))


def test_study_qa_uses_the_first_gold_answer_only():
    ex = example("qa", "Bonn", ["Bonn", "in Bonn, Germany"])
    toolkit = T.get_task("qa").score(["in Bonn, Germany"], [ex])
    study = T.get_task("qa").score(["in Bonn, Germany"], [ex], "study")
    assert toolkit["metrics"]["exact_match"] == 100.0 and study["metrics"]["exact_match"] == 0.0
    assert study["score"] < toolkit["score"]


def test_study_scores_raw_generations():
    raw = "positive\n### Sentiment:\nnegative"
    assert T.scored_prediction("sentiment", raw, "toolkit") == "positive"
    assert T.scored_prediction("sentiment", raw, "study") == raw
    ex = example("sentiment", "positive")
    assert T.get_task("sentiment").score([T.scored_prediction("sentiment", raw, "study")], [ex], "study")["score"] == 0
    assert T.get_task("sentiment").score([" Positive "], [ex], "study")["score"] == 1     # stripped, lower-cased


def test_unknown_protocol_is_refused():
    from src.errors import UserError
    with pytest.raises(UserError, match="unknown scoring protocol 'nmt'; choose one of toolkit, study"):
        T.get_task("sentiment").score(["positive"], [example("sentiment", "positive")], "nmt")


def test_right_truncation_keeps_the_first_tokens(tokenizer):
    prompt = T.get_task("sentiment").prompt({"sentence": "word " * 50})
    left = T.encode_prompt(tokenizer, prompt, 10)
    right = T.encode_prompt(tokenizer, prompt, 10, side="right")
    full = T.encode_prompt(tokenizer, prompt)
    assert right == full[:10] and left[-3:] == full[-3:] and left != right


# --------------------------------------------------------------------------- intervals

def test_bleu_statistics_reproduce_both_corpus_bleus():
    stats = [metrics.bleu_stats(h, r) for h, r in zip(HYPS, REFS)]
    total = [sum(c) for c in zip(*stats)]
    assert metrics.sacrebleu_from_stats(total) == pytest.approx(metrics.bleu(HYPS, REFS)["bleu"], abs=1e-9)
    assert metrics.bleu_from_stats(total) == pytest.approx(metrics.study_bleu(HYPS, REFS)["bleu"], abs=1e-9)


def _cells(n, seed=0):
    """Three methods' cells on one accuracy task with n examples: oracle, a weaker one, base."""
    rng = np.random.default_rng(seed)
    def cell(p):
        hits = rng.random(n) < p
        recs = [{"id": str(i), "raw": "positive" if h else "negative", "reference": "positive",
                 "score": float(h), "score_study": float(h)} for i, h in enumerate(hits)]
        return {"task": "sentiment", "n": n, "records": recs,
                "result": {"primary": "accuracy", "score": float(hits.mean()), "metrics": {"accuracy": float(hits.mean())}}}
    return {("oracle", "sentiment"): cell(0.8), ("half", "sentiment"): cell(0.4), ("base", "sentiment"): cell(0.1)}


def test_intervals_contain_the_estimate_shrink_with_more_examples_and_pin_the_oracle():
    from src import evaluation as ev
    methods = ["oracle", "half", "base"]
    small, smalls = ev.intervals(["sentiment"], methods, _cells(40), "toolkit")
    large, larges = ev.intervals(["sentiment"], methods, _cells(4000), "toolkit")
    for m in methods:
        point = _cells(40)[(m, "sentiment")]["result"]["score"]
        lo, hi = small[(m, "sentiment")]
        assert lo <= point <= hi
        assert large[(m, "sentiment")][1] - large[(m, "sentiment")][0] < (hi - lo) / 3
    assert smalls["oracle"] == [1.0, 1.0]                              # paired: the oracle against itself
    assert smalls["half"][0] < smalls["half"][1] and larges["half"][1] - larges["half"][0] < 0.2
    again, _ = ev.intervals(["sentiment"], methods, _cells(40), "toolkit")
    assert again == small                                              # seeded


def test_a_zero_oracle_task_leaves_the_score_undefined_and_gives_it_over_the_other_tasks():
    from src import evaluation as ev
    cells = _cells(40)
    for m in ("oracle", "half", "base"):                  # nli: every method (the oracle too) always wrong
        recs = [{"id": str(i), "raw": "neutral", "reference": "entailment", "score": 0.0, "score_study": 0.0}
                for i in range(40)]
        cells[(m, "nli")] = {"task": "nli", "n": 40, "records": recs, "seconds": 1.0,
                             "result": {"primary": "accuracy", "score": 0.0, "metrics": {"accuracy": 0.0}}}
    methods = ["oracle", "half", "base"]
    for m in methods:
        cells[(m, "sentiment")]["seconds"] = 1.0
    s = ev.summarize("m", ["sentiment", "nli"], methods, cells, {}, "toolkit")
    alone = ev.summarize("m", ["sentiment"], methods, cells, {}, "toolkit")
    for m in methods:
        entry = s["methods"][m]
        assert entry["multitask_score"] is None and entry["undefined_tasks"] == ["nli"]
        d = entry["multitask_defined"]
        assert d["tasks"] == ["sentiment"]
        assert d["score"] == pytest.approx(alone["methods"][m]["multitask_score"], abs=1e-12)
        assert d["interval"] == alone["methods"][m]["multitask_interval"]   # the same seeded resamples


def _three_tasks(n=60):
    """oracle, half and base on sentiment, nli and commonsense (accuracy), per-example hits drawn."""
    cells = {}
    for k, task in enumerate(("sentiment", "nli", "commonsense")):
        for (m, t), c in _cells(n, seed=k).items():
            cells[(m, task)] = {**c, "task": task, "seconds": 1.0}
    return cells


def test_paired_differences_are_the_bootstrap_of_the_difference_computed_by_hand():
    from src import evaluation as ev
    from src import paired
    tasks, methods = ["sentiment", "nli", "commonsense"], ["oracle", "half", "base"]
    cells = _three_tasks()
    s = ev.summarize("m", tasks, methods, cells, {}, "toolkit")
    pairs = s["paired"]["pairs"]
    assert s["paired"]["tasks"] == tasks and set(pairs) == {"oracle", "half"} and set(pairs["half"]) == {"base"}
    # by hand: each task's examples drawn with the seeded indices, the same draw for every method
    ratio = {m: 0 for m in methods}
    for k, t in enumerate(tasks):
        idx = np.random.default_rng(ev.BOOTSTRAP["seed"] + k).integers(0, 60, size=(ev.BOOTSTRAP["samples"], 60))
        hits = {m: np.array([r["score"] for r in cells[(m, t)]["records"]])[idx].mean(1) for m in methods}
        for m in methods:
            ratio[m] = ratio[m] + hits[m] / hits["oracle"] / len(tasks)
    d = ratio["half"] - ratio["base"]
    e = pairs["half"]["base"]
    assert e["interval"] == pytest.approx([np.percentile(d, 2.5), np.percentile(d, 97.5)], abs=1e-12)
    assert e["a_better"] == pytest.approx((d > 0).mean(), abs=1e-12)
    point = s["methods"]["half"]["multitask_score"] - s["methods"]["base"]["multitask_score"]
    assert e["difference"] == pytest.approx(point, abs=1e-12)
    assert e["interval"][0] > 0 and e["a_better"] == 1.0                # 0.4 against 0.1, 60 examples each
    back = paired.difference(pairs, "base", "half")                     # either order
    assert back["difference"] == -e["difference"] and back["interval"] == [-e["interval"][1], -e["interval"][0]]
    assert paired.difference(pairs, "half", "nope") is None


def test_the_score_without_each_task_is_the_score_over_the_others():
    from src import evaluation as ev
    tasks, methods = ["sentiment", "nli", "commonsense"], ["oracle", "half", "base"]
    cells = _three_tasks()
    s = ev.summarize("m", tasks, methods, cells, {}, "toolkit")
    for m in methods:
        without = s["methods"][m]["without"]
        assert list(without) == tasks
        for t in tasks:
            rest = [x for x in tasks if x != t]
            alone = ev.summarize("m", rest, methods, cells, {}, "toolkit")["methods"][m]["multitask_score"]
            assert without[t]["score"] == pytest.approx(alone, abs=1e-12)
            lo, hi = without[t]["interval"]
            assert lo <= without[t]["score"] <= hi
    assert s["methods"]["oracle"]["without"]["nli"]["interval"] == [1.0, 1.0]
