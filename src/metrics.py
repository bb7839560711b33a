"""Offline metrics and the oracle-normalised multitask score (mean over tasks of method / oracle).

Pure functions on strings. They re-implement what the study got from the `evaluate`
package, which fetches its metric scripts from the hub, straight on the libraries those
scripts wrap (`rouge_score`, `sacrebleu`) or on the official SQuAD v1.1 script.

Scales follow the reference implementations: ROUGE and accuracy in 0..1, BLEU and SQuAD
in 0..100. The multitask score is a ratio to the oracle, so the scale cancels out.
"""
from __future__ import annotations

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
    """Corpus BLEU with sacrebleu's defaults (13a tokeniser, exp smoothing), as `evaluate`'s
    sacrebleu computes it.

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
