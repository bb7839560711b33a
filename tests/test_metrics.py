"""Metrics pinned against their reference implementations and hand-computed values."""
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from src import metrics

PREDS = ["the cat sat on the mat", "police arrested two men on friday", "a storm hit the coast",
         "Running dogs were seen\nnear the river"]
REFS = ["the cat was sitting on the mat", "two men were arrested by police on friday",
        "a storm hit the northern coast on sunday", "Dogs ran near the river\nthey were seen by many"]


# ----------------------------------------------------------------------------- ROUGE

def test_rouge_equals_rouge_score_mean():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    per = [scorer.score(r, p) for p, r in zip(PREDS, REFS)]
    got = metrics.rouge(PREDS, REFS)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[key] == pytest.approx(sum(s[key].fmeasure for s in per) / len(per), abs=1e-12)


def test_rouge_hand_computed():
    # prediction 3 tokens, reference 6; all 3 match: P=1, R=1/2 -> F=2/3. Bigrams: 2 of 2 in
    # the prediction, 2 of 5 in the reference: F = 2 * 1 * 0.4 / 1.4 = 4/7.
    got = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(2 / 3)
    assert got["rouge2"] == pytest.approx(4 / 7)
    assert got["rougeL"] == pytest.approx(2 / 3)
    assert metrics.rouge(["same words here"], ["same words here"])["rougeL"] == 1.0


def test_rouge_stemmer_matters():
    stemmed = metrics.rouge(["dogs running"], ["dog runs"])["rouge1"]
    plain = metrics.rouge(["dogs running"], ["dog runs"], use_stemmer=False)["rouge1"]
    assert (stemmed, plain) == (1.0, 0.0)


def test_sentence_rouge_l_matches_mean():
    per = [metrics.sentence_rouge_l(p, r) for p, r in zip(PREDS, REFS)]
    assert sum(per) / len(per) == pytest.approx(metrics.rouge(PREDS, REFS)["rougeL"], abs=1e-12)


# ------------------------------------------------------------------------------ BLEU

def test_bleu_equals_sacrebleu_corpus():
    assert metrics.bleu(PREDS, REFS)["bleu"] == sacrebleu.corpus_bleu(PREDS, [REFS]).score


def test_bleu_multiple_references_are_transposed_into_streams():
    refs = [(r, r.upper()) for r in REFS]
    expected = sacrebleu.corpus_bleu(PREDS, [[r for r, _ in refs], [u for _, u in refs]]).score
    assert metrics.bleu(PREDS, refs)["bleu"] == expected


def test_bleu_known_values():
    same = "Der Zug fährt um acht Uhr ab ."
    assert metrics.bleu([same], [same])["bleu"] == pytest.approx(100.0)
    assert metrics.bleu(["völlig anders"], ["Der Zug fährt ab"])["bleu"] == 0.0
    assert metrics.bleu(PREDS, REFS)["bleu"] == pytest.approx(21.7481, abs=1e-4)  # sacrebleu 2.6.0


def test_sentence_bleu_equals_sacrebleu():
    for p, r in zip(PREDS, REFS):
        assert metrics.sentence_bleu(p, r) == sacrebleu.sentence_bleu(p, [r]).score
    assert metrics.sentence_bleu("a b c d", ["x", "a b c d"]) == pytest.approx(100.0)


def test_bleu_rejects_uneven_references():
    with pytest.raises(ValueError):
        metrics.bleu(["a", "b"], [("a",), ("b", "c")])
    with pytest.raises(ValueError):
        metrics.bleu(["a"], ["a", "b"])


# ----------------------------------------------------------------------------- SQuAD

def test_squad_normalisation_follows_official_script():
    assert metrics.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"


def test_squad_exact_match_and_f1_hand_computed():
    preds = ["The Denver Broncos", "Carolina"]
    golds = [["Denver Broncos"], ["Carolina Panthers"]]
    got = metrics.squad(preds, golds)
    # EM: 1 of 2. F1: 1.0 and (P=1, R=1/2 -> 2/3), mean 5/6.
    assert got["exact_match"] == 50.0
    assert got["f1"] == pytest.approx(100 * 5 / 6)


def test_squad_takes_the_best_gold_answer():
    assert metrics.squad(["in 1742"], [["1742", "in 1742"]]) == {"exact_match": 100.0, "f1": 100.0}
    # "red white" against "red and white": P=1, R=2/3 -> F1 = 0.8.
    assert metrics.squad_f1("red white", ["blue", "red and white"]) == pytest.approx(0.8)
    assert metrics.squad_f1("", ["anything"]) == 0.0


def test_squad_needs_gold_answers():
    with pytest.raises(ValueError):
        metrics.squad(["x"], [[]])


# -------------------------------------------------------------------------- accuracy

def test_accuracy_lowercases_and_strips():
    assert metrics.normalize_label("  Positive\n") == "positive"
    got = metrics.accuracy([" Positive", "NEUTRAL\n", "entailment", "Store it in a jar. "],
                           ["positive", "neutral", "contradiction", "store it in a jar."])
    assert got == {"accuracy": 0.75}


def test_metrics_reject_length_mismatch_and_empty():
    with pytest.raises(ValueError):
        metrics.accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.rouge([], [])


# ------------------------------------------------------------------- multitask score

def test_oracle_scores_exactly_one():
    oracle = {"summarization": 0.3127, "translation": 17.3, "qa": 71.9, "sentiment": 0.937, "nli": 0.1}
    assert metrics.multitask_score(oracle, oracle) == 1.0
    assert metrics.multitask_score(dict(reversed(oracle.items())), oracle) == 1.0


def test_multitask_score_is_mean_of_ratios():
    oracle = {"sentiment": 0.9, "translation": 20.0}
    method = {"sentiment": 0.45, "translation": 30.0}
    assert metrics.multitask_score(method, oracle) == pytest.approx((0.5 + 1.5) / 2)


def test_multitask_score_rejects_zero_oracle_and_task_mismatch():
    with pytest.raises(ValueError, match="qa"):
        metrics.multitask_score({"qa": 0.0, "nli": 0.5}, {"qa": 0.0, "nli": 0.5})
    with pytest.raises(ValueError, match="differ"):
        metrics.multitask_score({"qa": 1.0}, {"qa": 1.0, "nli": 0.5})
    with pytest.raises(ValueError):
        metrics.multitask_score({}, {})
