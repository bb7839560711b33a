"""Offline metrics and the oracle-normalised multitask score (mean over tasks of method / oracle).

Pure functions on strings, offline (the `evaluate` package fetches its metric scripts from
the hub). Two protocols share them: the toolkit's (sacreBLEU, stemmed ROUGE means, SQuAD
against every gold answer) and the study's (`study_bleu`: nmt corpus BLEU without smoothing;
`study_rouge`: unstemmed ROUGE, bootstrap median; SQuAD against the first gold answer), see
`src/tasks.py:SCORING`.

Scales follow the reference implementations: ROUGE and accuracy in 0..1, BLEU and SQuAD
in 0..100. The multitask score is a ratio to the oracle, so the scale cancels out.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import lru_cache

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


# ---------------------------------------------------------------------------- ROUGE

@lru_cache(maxsize=None)
def _rouge_scorer(rouge_types: tuple[str, ...], use_stemmer: bool) -> rouge_scorer.RougeScorer:
    # Scorers are stateless: build each kind once rather than once per example.
    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict:
    """Mean ROUGE F-measures, as `rouge_score.RougeScorer` computes them.

    `evaluate`'s rouge defaults to `use_stemmer=False`; the Hugging Face summarization
    recipe (and this project) passes True. The mean is exact, where `evaluate` reports the
    median of a bootstrap of means (which differs in the third decimal at most).
    `rougeLsum` splits on newlines, which is how CNN/DailyMail highlights are joined.

    Returns:
        {"rouge1", "rouge2", "rougeL", "rougeLsum"}: mean F-measures, 0..1.
    """
    _check_lengths(predictions, references)
    scorer = _rouge_scorer(ROUGE_TYPES, use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


def sentence_rouge_l(prediction: str, reference: str, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure of one prediction (the per-example summarization score), 0..1."""
    return _rouge_scorer(("rougeL",), use_stemmer).score(reference, prediction)["rougeL"].fmeasure


# ----------------------------------------------------------------------------- BLEU

def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Per-example references -> sacrebleu's reference streams (one list per reference slot)."""
    per_example = [[r] if isinstance(r, str) else list(r) for r in references]
    counts = {len(refs) for refs in per_example}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("every prediction needs the same, non-zero number of references")
    return [list(stream) for stream in zip(*per_example)]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Corpus BLEU with sacrebleu's defaults (13a tokeniser, exp smoothing): the toolkit's BLEU
    (`evaluate`'s "sacrebleu" metric computes the same; the study used its "bleu", `study_bleu`).

    Args:
        predictions: one hypothesis per example.
        references: per example, one reference string or a sequence of them (the same
            number for every example).

    Returns:
        {"bleu": corpus BLEU, 0..100}
    """
    _check_lengths(predictions, references)
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score}


def sentence_bleu(prediction: str, references: str | Sequence[str]) -> float:
    """sacrebleu's sentence BLEU (exp smoothing, effective order), the per-example score, 0..100."""
    refs = [references] if isinstance(references, str) else list(references)
    return sacrebleu.sentence_bleu(prediction, refs).score


# ----------------------------------------------------------- the study's BLEU and ROUGE
# The study scored with `evaluate.load("bleu")` and `evaluate.load("rouge")`, scripts fetched
# from the hub at run time. Both are reproduced here from what those scripts compute, offline:
# `bleu` is tensorflow/nmt's `compute_bleu` (corpus BLEU, n-grams up to 4, brevity penalty, no
# smoothing) on 13a-tokenised text; `rouge` is rouge_score without stemming, aggregated by
# rouge_score's BootstrapAggregator (its median, "mid").

@lru_cache(maxsize=None)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    return Tokenizer13a()


def _ngrams(tokens: Sequence[str], max_order: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu_stats(prediction: str, references: str | Sequence[str], max_order: int = 4) -> list[float]:
    """One example's sufficient statistics for corpus BLEU: [matches per order..., possible
    matches per order..., translation length, reference length (the shortest: nmt's rule),
    reference length (the closest: sacreBLEU's rule)], on 13a tokens. Corpus BLEU is
    `bleu_from_stats` (the study's) or `sacrebleu_from_stats` (the toolkit's) of their sum."""
    tok = _tokenizer_13a()
    refs = [references] if isinstance(references, str) else list(references)
    ref_tokens = [tok(r).split() for r in refs]
    hyp = tok(prediction).split()
    merged: Counter = Counter()
    for r in ref_tokens:
        merged |= _ngrams(r, max_order)
    overlap = _ngrams(hyp, max_order) & merged
    matches = [0.0] * max_order
    for ngram, count in overlap.items():
        matches[len(ngram) - 1] += count
    possible = [float(max(len(hyp) - n + 1, 0)) for n in range(1, max_order + 1)]
    closest = min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
    return [*matches, *possible, float(len(hyp)), float(min(len(r) for r in ref_tokens)), float(closest)]


def sacrebleu_from_stats(stats: Sequence[float], max_order: int = 4) -> float:
    """sacreBLEU's corpus BLEU (exp smoothing) from summed `bleu_stats`, 0..100."""
    return sacrebleu.BLEU.compute_bleu([int(x) for x in stats[:max_order]],
                                       [int(x) for x in stats[max_order:2 * max_order]],
                                       int(stats[2 * max_order]), int(stats[2 * max_order + 2]),
                                       smooth_method="exp").score


def bootstrap(n: int, samples: int = 1000, seed: int = 0):
    """[samples, n] example indices drawn with replacement (numpy, seeded): one resample a row."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def bleu_from_stats(stats: Sequence[float], max_order: int = 4) -> float:
    """nmt's compute_bleu (smooth=False) from summed `bleu_stats`, 0..100: 0 when some n-gram
    order has no match; brevity penalty exp(1 - r/c) when the translation is shorter."""
    matches, possible = stats[:max_order], stats[max_order:2 * max_order]
    hyp_len, ref_len = stats[2 * max_order], stats[2 * max_order + 1]
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) <= 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    if hyp_len == 0:
        return 0.0
    ratio = hyp_len / ref_len if ref_len else float("inf")
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return 100.0 * geo_mean * bp


def study_bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """The study's corpus BLEU (`evaluate`'s bleu: nmt compute_bleu, no smoothing), 0..100
    (evaluate reports 0..1; the scale cancels in the multitask score)."""
    _check_lengths(predictions, references)
    total = [sum(col) for col in zip(*(bleu_stats(p, r) for p, r in zip(predictions, references)))]
    return {"bleu": bleu_from_stats(total)}


def study_rouge(predictions: Sequence[str], references: Sequence[str], seed: int = 0) -> dict:
    """The study's ROUGE (`evaluate`'s rouge: rouge_score, no stemming, the BootstrapAggregator's
    median of 1,000 resampled means). The aggregator draws from numpy's global RNG; here it is
    seeded (`seed`) and the global state restored afterwards, so a result reruns the same."""
    import numpy as np
    from rouge_score import scoring

    _check_lengths(predictions, references)
    scorer = _rouge_scorer(ROUGE_TYPES, False)
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references):
        aggregator.add_scores(scorer.score(reference, prediction))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        result = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    return {key: float(result[key].mid.fmeasure) for key in ROUGE_TYPES}


# ---------------------------------------------------------------------------- SQuAD
# The official SQuAD v1.1 evaluation script (Rajpurkar et al. 2016), function for function.

_PUNCTUATION = frozenset(string.punctuation)

def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    return max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)


def _token_f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 against the best-matching gold answer, 0..1."""
    return max(_token_f1(prediction, a) for a in answers)


def squad(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """SQuAD v1.1 exact match and F1, each the max over an example's gold answers.

    Returns:
        {"exact_match", "f1"}: means, 0..100 (as the official script reports them).
    """
    _check_lengths(predictions, answers)
    if any(len(golds) == 0 for golds in answers):
        raise ValueError("every qa example needs at least one gold answer")
    n = len(predictions)
    return {
        "exact_match": 100.0 * sum(squad_exact(p, g) for p, g in zip(predictions, answers)) / n,
        "f1": 100.0 * sum(squad_f1(p, g) for p, g in zip(predictions, answers)) / n,
    }


# ------------------------------------------------------------------------- accuracy

def normalize_label(s: str) -> str:
    """The study's normalisation for classification answers: strip, lower-case."""
    return s.strip().lower()


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Share of predictions equal to their reference after `normalize_label`.

    For commonsense the reference is the text of the correct solution.

    Returns:
        {"accuracy": 0..1}
    """
    _check_lengths(predictions, references)
    hits = sum(normalize_label(p) == normalize_label(r) for p, r in zip(predictions, references))
    return {"accuracy": hits / len(predictions)}


# ------------------------------------------------------------------ multitask score

def multitask_score(method: Mapping[str, float], oracle: Mapping[str, float]) -> float:
    """Mean over tasks of method[t] / oracle[t]: 1.0 means as good as the right adapter for every input.

    The oracle scored against itself gives exactly 1.0. A ratio to an oracle score of 0 is
    undefined and raises, rather than silently dropping the task and changing the mean.

    Args:
        method: primary metric per task for the method being scored.
        oracle: primary metric per task for each task's own adapter; the same tasks.

    Raises:
        ValueError: no tasks, the two disagree on the tasks, or an oracle score is 0.
    """
    if not oracle:
        raise ValueError("no tasks to score")
    if set(method) != set(oracle):
        raise ValueError(f"method tasks {sorted(method)} differ from oracle tasks {sorted(oracle)}")
    zero = [t for t in oracle if oracle[t] == 0]
    if zero:
        raise ValueError(f"oracle score is 0 for task(s) {', '.join(zero)}: the ratio is undefined")
    return sum(method[t] / oracle[t] for t in oracle) / len(oracle)
