"""Task registry: the seven tasks, their prompts, data, tokenisation and scores.

Every task is one `Task` in `TASKS`: its input fields, its prompt template, its primary
metric, its closed label set (classification only) and where it lives on the Hugging Face
hub. Data comes from one of three places, all giving the same `Example`s:

- "sample": `data/sample/<task>/<split>.jsonl` in this repository (tiny, hand-written, so
  the pipeline runs offline; no research value),
- "dir": the same layout under any folder, e.g. `../shared/data` (real data, see its
  SOURCES.md),
- "hub": `datasets.load_dataset` on the study's datasets.

Local files hold one JSON object per line, the unified format:

    {"id": str, "task": str, "input": {<raw task fields>}, "target": str}

plus, for qa, a top-level "answers" list of all gold answers. commonsense stores the number
of the correct solution ("1" or "2") in "target"; its `Example.target` is that solution's text.

Usage:
    examples = load_examples("sentiment", "validation", data="sample", size=8, seed=0)
    prompt = TASKS["sentiment"].prompt(examples[0])
    result = TASKS["sentiment"].score(predictions, examples)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from src import metrics
from src.descriptions import DESCRIPTIONS
from src.errors import UserError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
SPLITS = ("train", "validation", "test")
DATA_SOURCES = ("hub", "sample", "dir")


@dataclass(frozen=True)
class Example:
    """One example of one task.

    Attributes:
        id: unique within its task and split.
        task: the task's name.
        input: the raw task fields (the prompt's placeholders, and any extra fields).
        target: the text the model should generate (no EOS); for commonsense the text of
            the correct solution.
        references: every gold answer used for scoring: all answers for qa, else (target,).
    """
    id: str
    task: str
    input: dict
    target: str
    references: tuple[str, ...]


def _example(task: str, id: str, input: dict, target: str, references: Sequence[str] = ()) -> Example:
    return Example(id, task, input, target, tuple(references) or (target,))


# ------------------------------------------------------------------------ hub sources

@dataclass(frozen=True, eq=False)  # one instance per source: compared and hashed by identity
class HubSource:
    """A task's dataset on the Hugging Face hub, and how one of its rows becomes an Example.

    Attributes:
        path: dataset id for `datasets.load_dataset`.
        config: its config name, or None.
        splits: our split name ("train", "validation", "test") -> the hub split to load,
            slices allowed ("train[:-1000]").
        columns: the columns `to_example` reads; checked before any row is mapped.
        to_example: (row, row index in its split) -> Example, or None to drop the row.
        revision: the hub revision, or None for the default branch.
    """
    path: str
    config: str | None
    splits: dict[str, str]
    columns: tuple[str, ...]
    to_example: Callable[[dict, int], Example | None] = field(repr=False)
    revision: str | None = None


SENTIMENT_LABELS = ("negative", "positive")  # glue sst2: 0 negative, 1 positive
NLI_LABELS = ("entailment", "neutral", "contradiction")  # multi_nli and snli share this order

# Hub example ids: "<dataset>-<row index in the loaded split>" (squad: its official question
# id, as in the local files), unique within a split and stable across runs.


def _summarization_row(row: dict, idx: int) -> Example:
    return _example("summarization", f"cnn_dailymail-{idx}", {"article": row["article"]}, row["highlights"])


def _translation_row(row: dict, idx: int) -> Example:
    pair = row["translation"]
    return _example("translation", f"wmt14-{idx}", {"en": pair["en"]}, pair["de"])


def _qa_row(row: dict, idx: int) -> Example | None:
    answers = list(row["answers"]["text"])
    if not answers:
        return None
    inp = {"title": row["title"], "context": row["context"], "question": row["question"]}
    return _example("qa", f"squad-{row['id']}", inp, answers[0], answers)


def _sentiment_row(row: dict, idx: int) -> Example | None:
    if row["label"] not in (0, 1):  # -1 marks glue's unlabelled test split
        return None
    return _example("sentiment", f"sst2-{idx}", {"sentence": row["sentence"]}, SENTIMENT_LABELS[row["label"]])


def _nli_row(dataset: str, row: dict, idx: int) -> Example | None:
    if row["label"] not in (0, 1, 2):  # -1: annotators did not agree on a gold label
        return None
    inp = {"premise": row["premise"], "hypothesis": row["hypothesis"]}
    return _example("nli", f"{dataset}-{idx}", inp, NLI_LABELS[row["label"]])


def _paraphrasing_row(row: dict, idx: int) -> Example | None:
    if row["label"] != 1:  # only true paraphrase pairs teach sentence1 -> sentence2
        return None
    return _example("paraphrasing", f"paws-{idx}", {"sentence1": row["sentence1"]}, row["sentence2"])


def _commonsense_row(row: dict, idx: int) -> Example | None:
    if row["label"] not in (0, 1):  # -1 marks piqa's unlabelled test split
        return None
    inp = {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"]}
    return _example("commonsense", f"piqa-{idx}", inp, inp[f"sol{row['label'] + 1}"])


# Datasets whose test split is unlabelled (squad has none) evaluate on the hub's validation
# split, as the study did, and take their own validation split from the end of train.
_EVAL_ON_HUB_VALIDATION = {"train": "train[:-1000]", "validation": "train[-1000:]", "test": "validation"}
_SAME_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
_NLI_COLUMNS = ("premise", "hypothesis", "label")

NLI_HUB_SOURCES = {
    "multi_nli": HubSource(
        "nyu-mll/multi_nli", None,
        {"train": "train", "validation": "validation_mismatched", "test": "validation_matched"},
        _NLI_COLUMNS, partial(_nli_row, "multi_nli")),
    "snli": HubSource("stanfordnlp/snli", None, _SAME_SPLITS, _NLI_COLUMNS, partial(_nli_row, "snli")),
}


# --------------------------------------------------------------------------- scoring
# Each scorer: (predictions, examples, protocol) -> (metrics dict, one score per example).
#
# Two protocols, both offline:
#   toolkit  the default: sacreBLEU (exp smoothing), ROUGE with stemming (exact mean), SQuAD
#            against every gold answer, generations cleaned first (`clean_prediction`);
#   study    exactly as the reference study scored: `evaluate`'s bleu (nmt corpus BLEU, no
#            smoothing), rouge (no stemming, bootstrap median), SQuAD against the first gold
#            answer only, raw generations (classification still compares stripped and
#            lower-cased text).

SCORING = ("toolkit", "study")

Scorer = Callable[[list[str], list[Example], str], tuple[dict, list[float]]]


def _score_rouge(predictions: list[str], examples: list[Example], protocol: str = "toolkit") -> tuple[dict, list[float]]:
    refs = [ex.target for ex in examples]
    stem = protocol == "toolkit"
    per_example = [metrics.sentence_rouge_l(p, r, use_stemmer=stem) for p, r in zip(predictions, refs)]
    if protocol == "study":
        return metrics.study_rouge(predictions, refs), per_example
    return metrics.rouge(predictions, refs), per_example


def _score_bleu(predictions: list[str], examples: list[Example], protocol: str = "toolkit") -> tuple[dict, list[float]]:
    refs = [ex.references for ex in examples]
    if protocol == "study":
        per_example = [metrics.bleu_from_stats(metrics.bleu_stats(p, r)) for p, r in zip(predictions, refs)]
        return metrics.study_bleu(predictions, refs), per_example
    per_example = [metrics.sentence_bleu(p, r) for p, r in zip(predictions, refs)]
    return metrics.bleu(predictions, refs), per_example


def _score_squad(predictions: list[str], examples: list[Example], protocol: str = "toolkit") -> tuple[dict, list[float]]:
    golds = [ex.references[:1] if protocol == "study" else ex.references for ex in examples]
    per_example = [100.0 * metrics.squad_f1(p, g) for p, g in zip(predictions, golds)]
    return metrics.squad(predictions, golds), per_example


def _score_accuracy(predictions: list[str], examples: list[Example], protocol: str = "toolkit") -> tuple[dict, list[float]]:
    refs = [ex.target for ex in examples]
    norm = metrics.normalize_label
    per_example = [float(norm(p) == norm(r)) for p, r in zip(predictions, refs)]
    return metrics.accuracy(predictions, refs), per_example


# -------------------------------------------------------------------- local targets
# Each resolver: (input, stored target) -> target text; ValueError says what is wrong.

def _target_as_is(inp: dict, target: str) -> str:
    return target


def _solution_text(inp: dict, target: str) -> str:
    """commonsense files store "1" or "2"; the model generates the solution itself."""
    if target not in ("1", "2"):
        raise ValueError(f"target must be \"1\" or \"2\" (the correct solution), got {target!r}")
    return inp[f"sol{target}"]


# ------------------------------------------------------------------------------ tasks

@dataclass(frozen=True, eq=False)  # registry singletons: compared and hashed by identity
class Task:
    """One task: what it reads, how it is prompted, where its data is, how it is scored.

    Attributes:
        name: the task's name, also its data folder.
        fields: the input fields the prompt needs (exactly the template's placeholders).
        template: the prompt, a format string ending in the "### ...:\\n" marker.
        primary: the metric the multitask score uses (a key of `score()["metrics"]`).
        labels: the closed label set of a classification task, else None.
        hub: where the study's dataset for this task lives.
        scorer: (predictions, examples) -> (metrics, per-example scores).
        resolve_target: (input, stored target) -> target text, for local files.
        single_line: answers never span lines, so a generation is cut at its first newline.
        descriptions: sentences describing the task for Text-to-LoRA (src/t2l.py): 12, the first
            `descriptions.N_TRAIN` train, the rest are held out; () for a task it does not use.
    """
    name: str
    fields: tuple[str, ...]
    template: str
    primary: str
    labels: tuple[str, ...] | None
    hub: HubSource = field(repr=False)
    scorer: Scorer = field(repr=False)
    resolve_target: Callable[[dict, str], str] = field(default=_target_as_is, repr=False)
    single_line: bool = False
    descriptions: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self):
        placeholders = {name for _, name, _, _ in string.Formatter().parse(self.template) if name}
        if placeholders != set(self.fields):
            raise ValueError(f"task {self.name}: template fields {sorted(placeholders)} != {sorted(self.fields)}")

    def prompt(self, example_or_input: Example | Mapping[str, str]) -> str:
        """The prompt for an Example or a raw input dict (extra fields are ignored)."""
        inp = example_or_input.input if isinstance(example_or_input, Example) else example_or_input
        missing = [f for f in self.fields if f not in inp]
        if missing:
            raise UserError(f"task {self.name}: input lacks field(s) {', '.join(missing)}")
        return self.template.format(**{f: inp[f] for f in self.fields})

    def score(self, predictions: Sequence[str], examples: Sequence[Example], protocol: str = "toolkit") -> dict:
        """Score predictions against their examples under a scoring protocol (`SCORING`):
        "toolkit" expects cleaned predictions (see `clean_prediction`), "study" raw ones.

        Returns:
            {"primary": metric name, "score": its value, "metrics": every metric,
             "per_example": one score per example}. Per-example scores: sentence ROUGE-L
            (summarization), sentence BLEU (translation, paraphrasing; their mean is not
            the corpus BLEU), F1 in 0..100 (qa), 0/1 (classification).
        """
        if len(predictions) != len(examples):
            raise ValueError(f"task {self.name}: {len(predictions)} predictions for {len(examples)} examples")
        if any(ex.task != self.name for ex in examples):
            raise ValueError(f"task {self.name}: examples of another task given")
        if protocol not in SCORING:
            raise UserError(f"unknown scoring protocol {protocol!r}; choose one of {', '.join(SCORING)}")
        scores, per_example = self.scorer(list(predictions), list(examples), protocol)
        return {"primary": self.primary, "score": float(scores[self.primary]),
                "metrics": {k: float(v) for k, v in scores.items()}, "per_example": per_example}

    def parse_local(self, record: object, where: str) -> Example:
        """One unified-format record -> Example; `where` ("file:line") names it in errors."""
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key, kind in (("id", str), ("task", str), ("input", dict), ("target", str)):
            if key not in record:
                raise UserError(f"{where}: missing field '{key}' (task {self.name})")
            if not isinstance(record[key], kind):
                raise UserError(f"{where}: field '{key}' must be a {kind.__name__} (task {self.name})")
        if record["task"] != self.name:
            raise UserError(f"{where}: record is for task '{record['task']}', expected '{self.name}'")
        inp = record["input"]
        for name in self.fields:
            if name not in inp:
                raise UserError(f"{where}: missing field 'input.{name}' (task {self.name})")
            if not isinstance(inp[name], str):
                raise UserError(f"{where}: field 'input.{name}' must be a string (task {self.name})")
        try:
            target = self.resolve_target(inp, record["target"])
        except ValueError as e:
            raise UserError(f"{where}: {e} (task {self.name})") from None
        if self.labels is not None and target not in self.labels:
            raise UserError(f"{where}: target {target!r} is not one of {', '.join(self.labels)} (task {self.name})")
        if not target.strip():
            raise UserError(f"{where}: empty target (task {self.name})")
        answers = record.get("answers", [target])
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise UserError(f"{where}: 'answers' must be a non-empty list of strings (task {self.name})")
        return _example(self.name, record["id"], inp, target, answers)

    def parse_hub(self, row: dict, idx: int) -> Example | None:
        """One row of this task's hub dataset -> Example, or None to drop it."""
        return self.hub.to_example(row, idx)


TASKS: dict[str, Task] = {t.name: dataclasses.replace(t, descriptions=DESCRIPTIONS[t.name]) for t in (
    Task("summarization", ("article",), "{article}\n### Summarization:\n", "rougeL", None,
         HubSource("abisee/cnn_dailymail", "3.0.0", _SAME_SPLITS, ("article", "highlights"), _summarization_row),
         _score_rouge),
    Task("translation", ("en",), "{en}\n### Translation from English to German:\n", "bleu", None,
         HubSource("wmt/wmt14", "de-en", _SAME_SPLITS, ("translation",), _translation_row),
         _score_bleu),
    Task("qa", ("context", "question"),
         "### Context:\n{context}\n### Question:\n{question}\n### Answer:\n", "f1", None,
         HubSource("rajpurkar/squad", None, _EVAL_ON_HUB_VALIDATION,
                   ("id", "title", "context", "question", "answers"), _qa_row),
         _score_squad),
    Task("sentiment", ("sentence",), "{sentence}\n### Sentiment:\n", "accuracy", SENTIMENT_LABELS,
         HubSource("nyu-mll/glue", "sst2", _EVAL_ON_HUB_VALIDATION, ("sentence", "label"), _sentiment_row),
         _score_accuracy, single_line=True),
    Task("nli", ("premise", "hypothesis"),
         "### Premise:\n{premise}\n### Hypothesis:\n{hypothesis}\n### Relationship:\n", "accuracy", NLI_LABELS,
         NLI_HUB_SOURCES["multi_nli"], _score_accuracy, single_line=True),
    Task("paraphrasing", ("sentence1",), "{sentence1}\n### Paraphrasing:\n", "bleu", None,
         HubSource("google-research-datasets/paws", "labeled_final", _SAME_SPLITS,
                   ("sentence1", "sentence2", "label"), _paraphrasing_row),
         _score_bleu),
    Task("commonsense", ("goal", "sol1", "sol2"),
         "{goal}\n### Solution 1:\n{sol1}\n### Solution 2:\n{sol2}\n### Correct Solution:\n", "accuracy", None,
         # datasets >= 4 runs no loading scripts; piqa's default branch is one, so read the
         # hub's auto-converted parquet branch, where the config is called "default".
         HubSource("ybisk/piqa", "default", _EVAL_ON_HUB_VALIDATION, ("goal", "sol1", "sol2", "label"),
                   _commonsense_row, revision="refs/convert/parquet"),
         _score_accuracy, resolve_target=_solution_text, single_line=True),
)}

PRESETS: dict[str, tuple[str, ...]] = {
    "5tasks": ("summarization", "translation", "qa", "sentiment", "nli"),
    # the study's seven by name: a task added to TASKS joins "all", never this set (its cells stay valid)
    "7tasks": ("summarization", "translation", "qa", "sentiment", "nli", "paraphrasing", "commonsense"),
    "all": tuple(TASKS),
}


def _known() -> str:
    return f"known tasks: {', '.join(TASKS)}; presets: {', '.join(PRESETS)}"


def get_task(name: str | Task) -> Task:
    """The Task for a name (a Task is returned as is); unknown -> UserError."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; {_known()}")
    return TASKS[name]


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """Task names from "sentiment,nli", a preset name, or a list of either.

    Presets expand in place; duplicates are dropped, first occurrence kept.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if part in PRESETS:
            names.extend(PRESETS[part])
        elif part:
            names.append(get_task(part).name)
    if not names:
        raise UserError(f"no task given; {_known()}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------- prediction

_NEXT_MARKER = re.compile(r"(?:^|\n)###")


def scored_prediction(task: str | Task, raw: str, protocol: str = "toolkit") -> str:
    """What a protocol scores of a raw generation: cleaned (toolkit) or as generated (study)."""
    return clean_prediction(task, raw) if protocol == "toolkit" else raw


def clean_prediction(task: str | Task, text: str) -> str:
    """A raw generation -> the answer to score.

    Generation can run past the answer (the model starts another "### ...:" section, or
    keeps writing), so: cut at the first line that starts with "###", keep only the first
    line for single-line tasks (sentiment, nli, commonsense), strip whitespace.
    """
    text = _NEXT_MARKER.split(text.strip(), maxsplit=1)[0]
    if get_task(task).single_line:
        text = text.split("\n", 1)[0]
    return text.strip()


# ------------------------------------------------------------------------ loading

def _read_split(task: Task, root: Path, split: str) -> list[Example]:
    """Every Example in `<root>/<task>/<split>.jsonl`, validated; blank lines are skipped."""
    folder = root / task.name
    if not folder.is_dir():
        raise UserError(f"no data folder for task {task.name}: {folder}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"no {split} split for task {task.name}: {path} does not exist")
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        example = task.parse_local(record, where)
        if example.id in first_line:
            raise UserError(f"{where}: duplicate id '{example.id}' (first at line {first_line[example.id]})")
        first_line[example.id] = lineno
        examples.append(example)
    if not examples:
        raise UserError(f"empty split: {path} has no examples")
    return examples


def _hub_rows(source: HubSource, split: str):
    """One split of a hub dataset, as a `datasets.Dataset` (tests replace this function)."""
    import datasets  # imported here: only the hub path needs it, and it is slow to import

    return datasets.load_dataset(source.path, source.config, split=source.splits[split],
                                 revision=source.revision)


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _too_few(task: str, split: str, size: int, available: int) -> UserError:
    return UserError(f"task {task}, split {split}: {size} examples requested, only {available} available")


def _load_hub(task: Task, split: str, source: HubSource, size: int | None, seed: int,
              allow_fewer: bool) -> list[Example]:
    """The first `size` usable rows of the hub split in a seeded order (all, in order, if None).

    Rows are mapped only until `size` examples are kept, so a 5,000-example subset of a
    287k-row split is quick; dropped rows (no gold label) are skipped over.
    """
    name = f"{source.path} ({source.config or 'default'}) split {source.splits[split]}"
    try:
        rows = _hub_rows(source, split)
    except OSError as e:  # unreachable hub, unknown dataset: one line is enough
        raise UserError(f"could not load {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = [c for c in source.columns if c not in rows.column_names]
    if missing:
        raise UserError(f"{name} lacks column(s) {', '.join(missing)} (task {task.name})")
    order = range(len(rows)) if size is None else shuffled(len(rows), seed)
    examples: list[Example] = []
    for idx in order:
        example = source.to_example(rows[idx], idx)
        if example is not None:
            examples.append(example)
            if len(examples) == size:
                break
    if not examples:
        raise UserError(f"empty split: {name} has no usable rows (task {task.name})")
    if size is not None and len(examples) < size and not allow_fewer:
        raise _too_few(task.name, split, size, len(examples))
    return examples


def load_examples(task: str, split: str, data: str = "sample", data_dir: str | Path | None = None,
                  size: int | None = None, seed: int = 0, hub_nli: str = "multi_nli",
                  allow_fewer: bool = False) -> list[Example]:
    """Load one task's split.

    Args:
        task: a task name.
        split: "train", "validation" or "test".
        data: "sample" (this repository's data/sample), "dir" (the same layout under
            `data_dir`) or "hub".
        data_dir: the folder holding `<task>/<split>.jsonl`; only with data="dir".
        size: how many examples: the first `size` after a shuffle seeded by `seed` (the
            same seed gives the same subset, and a smaller size a prefix of it); None for
            all, in file order.
        seed: the shuffle's seed.
        hub_nli: which dataset nli loads from the hub: a key of NLI_HUB_SOURCES.
        allow_fewer: when `size` exceeds what the split holds, return all of it (shuffled)
            instead of raising.

    Raises:
        UserError: unknown task, split, data source or hub_nli; a missing folder or file; a
            malformed or incomplete record; an empty split; `size` above what is available.
    """
    t = get_task(task)
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if data not in DATA_SOURCES:
        raise UserError(f"unknown data source '{data}'; choose one of {', '.join(DATA_SOURCES)}")
    if (data == "dir") != (data_dir is not None):
        raise UserError("data_dir is needed with data='dir' and only then")
    if hub_nli not in NLI_HUB_SOURCES:
        raise UserError(f"unknown nli hub source '{hub_nli}'; choose one of {', '.join(NLI_HUB_SOURCES)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"size must be a positive integer or None, got {size!r}")

    if data == "hub":
        source = NLI_HUB_SOURCES[hub_nli] if t.name == "nli" else t.hub
        return _load_hub(t, split, source, size, seed, allow_fewer)
    examples = _read_split(t, SAMPLE_DIR if data == "sample" else Path(data_dir), split)
    if size is None:
        return examples
    if size > len(examples) and not allow_fewer:
        raise _too_few(t.name, split, size, len(examples))
    return [examples[i] for i in shuffled(len(examples), seed)[:size]]


def load_task_data(tasks: str | Sequence[str], split: str, data: str = "sample",
                   data_dir: str | Path | None = None, size: int | None = None, seed: int = 0,
                   hub_nli: str = "multi_nli", allow_fewer: bool = False) -> dict[str, list[Example]]:
    """`load_examples` for every task (names or presets, as `resolve_tasks` takes them).

    Every task is loaded and validated before anything is returned, so a bad file fails
    the run before any training or generation starts.
    """
    return {name: load_examples(name, split, data, data_dir, size, seed, hub_nli, allow_fewer)
            for name in resolve_tasks(tasks)}


def load_capped(tasks: str | Sequence[str], split: str, data: str, data_dir: str | Path | None,
                size: int | None, seed: int, hub_nli: str = "multi_nli",
                flag: str = "--eval-size", exclude: Mapping[str, Sequence[str]] | None = None
                ) -> dict[str, list[Example]]:
    """Each task's `split`: a seeded subset of `size` examples (all if None).

    Local files ("sample", "dir") hold what they hold: a larger size is capped at it (the
    bundled sample has a few dozen examples per task), said on stderr naming `flag`. Every
    task is loaded and validated before anything is returned. Training and evaluation both
    load their data through here.

    exclude: {task: example ids} never to take (local files only): the subset is then the
    first `size` examples of the same seeded shuffle that are not excluded, so evaluation
    can stay disjoint from the examples that chose a checkpoint.
    """
    import sys

    out = {}
    for task in resolve_tasks(tasks):
        skip = set((exclude or {}).get(task, ()))
        if skip and data != "hub":
            every = load_examples(task, split, data, data_dir, None, seed)
            left = [every[i] for i in shuffled(len(every), seed) if every[i].id not in skip]
            if size is not None and len(left) < size:
                print(f"note: {data_dir or 'data/sample'} holds {len(left)} {split} examples of task {task} "
                      f"besides the {len(every) - len(left)} that chose checkpoints; using them all ({flag} {size})",
                      file=sys.stderr)
            out[task] = left if size is None else left[:size]
            if not out[task]:
                raise UserError(f"task {task}: every {split} example chose a checkpoint; none is left to "
                                f"evaluate (pass --no-exclude-selection, or another --split)")
            continue
        n = size
        if data != "hub" and size is not None:
            available = len(load_examples(task, split, data, data_dir, None, seed))
            if available < size:
                print(f"note: {data_dir or 'data/sample'} holds {available} {split} examples of task {task}; "
                      f"using them all ({flag} {size})", file=sys.stderr)
            n = min(size, available)
        out[task] = load_examples(task, split, data, data_dir, n, seed, hub_nli)
    return out


def data_hash(examples_by_task: Mapping[str, Sequence[Example]]) -> str:
    """sha256 (hex) of the examples' ids, inputs, targets and references, in order.

    Canonical JSON (sorted keys, tasks sorted by name), so equal data gives an equal hash
    on any machine; it identifies the exact data a result was computed on.
    """
    payload = {task: [[ex.id, ex.input, ex.target, list(ex.references)] for ex in examples]
               for task, examples in sorted(examples_by_task.items())}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- tokenising

def truncate_prompt_ids(ids: Sequence[int], max_prompt_len: int, bos_token_id: int | None = None) -> list[int]:
    """Keep the LAST `max_prompt_len` prompt tokens (left truncation).

    The end of a prompt is its "### <Task>:\\n" marker, which tells the model what to
    write; the long part (an article, a context) loses its beginning instead. A leading
    `bos_token_id`, when given and present, stays in front.
    """
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be at least 1, got {max_prompt_len}")
    ids = list(ids)
    if len(ids) <= max_prompt_len:
        return ids
    if bos_token_id is not None and ids[0] == bos_token_id:
        return ids[:1] + ids[len(ids) - max_prompt_len + 1:]
    return ids[-max_prompt_len:]


def _bos(tokenizer) -> list[int]:
    """[BOS] if the tokenizer puts it in front of the text it encodes, else [] (Qwen2 does not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("")["input_ids"][:1] == [bos] else []


def encode_prompt(tokenizer, prompt: str, max_prompt_len: int | None = None, side: str = "left") -> list[int]:
    """Prompt ids as training sees them: the tokenizer's BOS (if it adds one), then the
    text without other special tokens, left-truncated to `max_prompt_len` (None: no limit).

    side="right" keeps the first `max_prompt_len` tokens instead, as the study's tokenizer
    call most likely did (it cuts the "### Task:" marker off long prompts); "left", the
    default, keeps the marker that tells the model what to do.
    """
    bos = _bos(tokenizer)
    ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_prompt_len is None:
        return ids
    if side == "right":
        return ids[:max_prompt_len]
    return truncate_prompt_ids(ids, max_prompt_len, bos[0] if bos else None)


def tokenize_example(tokenizer, prompt: str, target: str, max_len: int = 512,
                     max_target_len: int = 128) -> dict:
    """One training sequence: prompt then target then EOS; the loss sees only the target.

    Prompt and target are tokenised separately, so the prompt/target boundary is the same
    token boundary that generation starts from.

    Args:
        max_len: the most tokens in the whole sequence.
        max_target_len: the most target tokens, EOS included: the target is cut to
            max_target_len - 1 tokens and EOS is always appended.

    Returns:
        {"input_ids": prompt + target + [eos], "labels": [-100] * len(prompt) + target + [eos]},
        the prompt left-truncated (`truncate_prompt_ids`) so the total fits in max_len.
    """
    if not 1 <= max_target_len < max_len:
        raise ValueError(f"need 1 <= max_target_len < max_len, got {max_target_len} and {max_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; every target must end with one")
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][: max_target_len - 1] + [eos]
    prompt_ids = encode_prompt(tokenizer, prompt, max_len - len(target_ids))
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(padded [batch, longest], attention mask [batch, longest]) as LongTensors, padded with
    `value` on `side` ("right": real tokens keep positions 0..n-1; "left": every sequence ends
    at -1). Training's batches (`training.collate`) and evaluation's
    (`evaluation.pad_batch`) both pad through here."""
    width = max(len(x) for x in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(width - len(x), width) if side == "left" else slice(0, len(x))
        out[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return out, mask
