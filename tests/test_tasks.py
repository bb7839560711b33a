"""Task registry: prompts, loaders (local and hub mapping), bad input, tokenisation, scoring."""
import json

import datasets
import pytest
from tokenizers import processors

from src import tasks
from src.errors import UserError
from src.tasks import (NLI_HUB_SOURCES, PRESETS, TASKS, Example, clean_prediction, data_hash, encode_prompt,
                       load_examples, load_task_data, resolve_tasks, tokenize_example, truncate_prompt_ids)
from tiny import tiny_tokenizer

ALL = ("summarization", "translation", "qa", "sentiment", "nli", "paraphrasing", "commonsense")


def write_jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------ registry

def test_registry_names_and_presets():
    assert tuple(TASKS) == ALL
    assert PRESETS["5tasks"] == ALL[:5]
    assert PRESETS["7tasks"] == PRESETS["all"] == ALL


def test_7tasks_names_the_studys_seven():
    """A task added to the registry joins "all", never "7tasks" (whose cells it would invalidate)."""
    assert PRESETS["7tasks"] == ("summarization", "translation", "qa", "sentiment", "nli", "paraphrasing",
                                 "commonsense")


@pytest.mark.parametrize("task, inp, expected", [
    ("summarization", {"article": "A. B."}, "A. B.\n### Summarization:\n"),
    ("translation", {"en": "Hello.", "docid": "x"}, "Hello.\n### Translation from English to German:\n"),
    ("qa", {"context": "C.", "question": "Q?", "title": "T"},
     "### Context:\nC.\n### Question:\nQ?\n### Answer:\n"),
    ("sentiment", {"sentence": "great {film}"}, "great {film}\n### Sentiment:\n"),
    ("nli", {"premise": "P.", "hypothesis": "H."}, "### Premise:\nP.\n### Hypothesis:\nH.\n### Relationship:\n"),
    ("paraphrasing", {"sentence1": "S."}, "S.\n### Paraphrasing:\n"),
    ("commonsense", {"goal": "G.", "sol1": "one", "sol2": "two"},
     "G.\n### Solution 1:\none\n### Solution 2:\ntwo\n### Correct Solution:\n"),
])
def test_prompts_are_byte_exact(task, inp, expected):
    assert TASKS[task].prompt(inp) == expected
    example = Example("x", task, inp, "t", ("t",))
    assert TASKS[task].prompt(example) == expected


def test_prompt_names_a_missing_field():
    with pytest.raises(UserError, match="premise"):
        TASKS["nli"].prompt({"hypothesis": "H."})


def test_labels_only_for_classification():
    assert TASKS["sentiment"].labels == ("negative", "positive")
    assert TASKS["nli"].labels == ("entailment", "neutral", "contradiction")
    assert [t for t in TASKS.values() if t.labels] == [TASKS["sentiment"], TASKS["nli"]]
    assert {t.name: t.primary for t in TASKS.values()} == {
        "summarization": "rougeL", "translation": "bleu", "qa": "f1", "sentiment": "accuracy",
        "nli": "accuracy", "paraphrasing": "bleu", "commonsense": "accuracy"}


def test_resolve_tasks():
    assert resolve_tasks("sentiment,nli") == ["sentiment", "nli"]
    assert resolve_tasks("5tasks") == list(ALL[:5])
    assert resolve_tasks(" nli , 5tasks,paraphrasing,nli") == ["nli", "summarization", "translation", "qa",
                                                                "sentiment", "paraphrasing"]
    assert resolve_tasks(["all"]) == list(ALL)


def test_resolve_tasks_unknown_lists_tasks_and_presets():
    with pytest.raises(UserError) as e:
        resolve_tasks("sentiment,poetry")
    message = one_line_error(e)
    assert "poetry" in message and "commonsense" in message and "5tasks" in message and "7tasks" in message
    with pytest.raises(UserError):
        resolve_tasks(" , ")


@pytest.mark.parametrize("task, raw, clean", [
    ("sentiment", " positive\n### Sentiment:\nnegative", "positive"),
    ("sentiment", "Negative\nthe film was long", "Negative"),
    ("commonsense", "Store it in a jar.\nSolution 2 is wrong.", "Store it in a jar."),
    ("summarization", "Line one.\nLine two.\n### Summarization:\nmore", "Line one.\nLine two."),
    ("qa", "### Answer:\n1742", ""),
    ("translation", "  Der Zug fährt ab.  ", "Der Zug fährt ab."),
])
def test_clean_prediction(task, raw, clean):
    assert clean_prediction(task, raw) == clean


# ------------------------------------------------------------------- sample data

@pytest.mark.parametrize("task", ALL)
def test_sample_data_loads(task):
    train, validation = load_examples(task, "train"), load_examples(task, "validation")
    assert 39 <= len(train) <= 40 and 15 <= len(validation) <= 16
    assert {ex.task for ex in train + validation} == {task}
    assert not {ex.id for ex in train} & {ex.id for ex in validation}
    for ex in train + validation:
        assert ex.target and ex.target in ex.references
        assert TASKS[task].prompt(ex).endswith(":\n")


@pytest.mark.parametrize("task", ["sentiment", "nli", "commonsense"])
def test_sample_labels_are_balanced(task):
    for split in ("train", "validation"):
        examples = load_examples(task, split)
        keys = [ex.input["sol1"] == ex.target for ex in examples] if task == "commonsense" else \
            [ex.target for ex in examples]
        counts = {k: keys.count(k) for k in set(keys)}
        assert len(counts) == (3 if task == "nli" else 2) and len(set(counts.values())) == 1


def test_sample_commonsense_target_is_solution_text():
    for ex in load_examples("commonsense", "validation"):
        assert ex.target in (ex.input["sol1"], ex.input["sol2"])


def test_size_is_a_seeded_subset():
    a = load_examples("sentiment", "train", size=10, seed=3)
    assert a == load_examples("sentiment", "train", size=10, seed=3)
    assert load_examples("sentiment", "train", size=12, seed=3)[:10] == a
    assert a != load_examples("sentiment", "train", size=10, seed=4)
    assert len({ex.id for ex in a}) == 10
    assert load_examples("sentiment", "train") == load_examples("sentiment", "train", size=None)


def test_size_above_available():
    with pytest.raises(UserError) as e:
        load_examples("sentiment", "validation", size=17)
    message = one_line_error(e)
    assert "sentiment" in message and "validation" in message and "17" in message and "16" in message
    assert len(load_examples("sentiment", "validation", size=17, allow_fewer=True)) == 16


def test_load_task_data_and_hash():
    data = load_task_data("sentiment,nli", "validation", size=4)
    assert list(data) == ["sentiment", "nli"] and all(len(v) == 4 for v in data.values())
    digest = data_hash(data)
    assert len(digest) == 64 and digest == data_hash(dict(reversed(data.items())))
    changed = dict(data, nli=[Example(ex.id, ex.task, ex.input, "neutral", ("neutral",)) for ex in data["nli"]])
    assert data_hash(changed) != digest


# ------------------------------------------------------------------- shared data

def to_record(ex: Example) -> dict:
    """An Example back in the unified format (commonsense: the solution's number)."""
    target = ex.target
    if ex.task == "commonsense":
        target = "1" if ex.input["sol1"] == ex.target else "2"
    record = {"id": ex.id, "task": ex.task, "input": ex.input, "target": target}
    return {**record, "answers": list(ex.references)} if ex.task == "qa" else record


def test_shared_data_round_trip(shared_data, tmp_path):
    data = load_task_data("all", "validation", data="dir", data_dir=str(shared_data))
    assert {task: len(v) for task, v in data.items()} == dict.fromkeys(ALL, 300)
    for task, examples in data.items():
        for ex in examples:
            if TASKS[task].labels:
                assert ex.target in TASKS[task].labels
        write_jsonl(tmp_path / task / "validation.jsonl", [to_record(ex) for ex in examples])
    assert load_task_data("all", "validation", data="dir", data_dir=tmp_path) == data


def test_shared_data_fields(shared_data):
    qa = load_examples("qa", "validation", data="dir", data_dir=shared_data, size=20)
    assert all(ex.target == ex.references[0] for ex in qa)
    assert any(len(ex.references) > 1 for ex in qa)
    piqa = load_examples("commonsense", "train", data="dir", data_dir=shared_data, size=20)
    assert all(ex.target in (ex.input["sol1"], ex.input["sol2"]) for ex in piqa)


# --------------------------------------------------------------------- bad input

GOOD = {"id": "a", "task": "sentiment", "input": {"sentence": "fine"}, "target": "positive"}


def load_bad(tmp_path, lines, task="sentiment"):
    path = write_jsonl(tmp_path / task / "train.jsonl", lines)
    with pytest.raises(UserError) as e:
        load_examples(task, "train", data="dir", data_dir=tmp_path)
    return path, one_line_error(e)


def test_malformed_line_names_file_and_line(tmp_path):
    path, message = load_bad(tmp_path, [GOOD, '{"id": "b", "task": '])
    assert f"{path}:2" in message and "malformed" in message


def test_missing_input_field_names_field_task_and_line(tmp_path):
    path, message = load_bad(tmp_path, [GOOD, dict(GOOD, id="b", input={"text": "x"})])
    assert "input.sentence" in message and "sentiment" in message and f"{path}:2" in message


def test_missing_top_level_field(tmp_path):
    record = {k: v for k, v in GOOD.items() if k != "target"}
    path, message = load_bad(tmp_path, [record])
    assert "'target'" in message and f"{path}:1" in message


@pytest.mark.parametrize("record, words", [
    (dict(GOOD, target="pos"), ["pos", "negative, positive"]),
    (dict(GOOD, task="nli"), ["nli", "sentiment"]),
    (dict(GOOD, input={"sentence": 3}), ["input.sentence", "string"]),
    (["not", "an", "object"], ["JSON object"]),
])
def test_bad_records(tmp_path, record, words):
    _, message = load_bad(tmp_path, [record])
    assert all(w in message for w in words)


def test_commonsense_target_must_name_a_solution(tmp_path):
    record = {"id": "a", "task": "commonsense", "input": {"goal": "g", "sol1": "x", "sol2": "y"}, "target": "3"}
    _, message = load_bad(tmp_path, [record], task="commonsense")
    assert '"1" or "2"' in message


def test_duplicate_id(tmp_path):
    path, message = load_bad(tmp_path, [GOOD, GOOD])
    assert f"{path}:2" in message and "duplicate" in message


def test_empty_split(tmp_path):
    path, message = load_bad(tmp_path, ["", "  "])
    assert "empty" in message and str(path) in message


def test_missing_folder_and_split_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_examples("qa", "train", data="dir", data_dir=tmp_path)
    assert str(tmp_path / "qa") in one_line_error(e)
    write_jsonl(tmp_path / "sentiment" / "train.jsonl", [GOOD])
    with pytest.raises(UserError) as e:
        load_examples("sentiment", "test", data="dir", data_dir=tmp_path)
    assert str(tmp_path / "sentiment" / "test.jsonl") in one_line_error(e)


@pytest.mark.parametrize("kwargs, words", [
    (dict(task="poetry"), ["poetry", "known tasks", "presets"]),
    (dict(split="dev"), ["dev", "validation"]),
    (dict(data="web"), ["web", "hub, sample, dir"]),
    (dict(data="dir"), ["data_dir"]),
    (dict(data_dir="somewhere"), ["data_dir"]),
    (dict(size=0), ["size"]),
    (dict(data="hub", hub_nli="anli"), ["anli", "multi_nli, snli"]),
])
def test_bad_arguments(kwargs, words):
    args = dict(task="sentiment", split="train") | kwargs
    with pytest.raises(UserError) as e:
        load_examples(**args)
    message = one_line_error(e)
    assert all(w in message for w in words)


# ------------------------------------------------------------------ hub mapping
# Local files with the hub datasets' column schema, loaded by `datasets` itself and fed
# through the unmodified mapping code in place of the hub download.

HUB_ROWS = {
    "abisee/cnn_dailymail": [{"article": "A storm hit. Trees fell.", "highlights": "Storm hit.\nTrees fell.",
                              "id": "0001"}],
    "wmt/wmt14": [{"translation": {"de": "Der Zug fährt ab.", "en": "The train leaves."}}],
    "rajpurkar/squad": [{"id": "5733be", "title": "T", "context": "Founded in 1742.", "question": "When?",
                         "answers": {"text": ["1742", "in 1742"], "answer_start": [11, 8]}}],
    "nyu-mll/glue": [{"sentence": "bad", "label": 0, "idx": 0}, {"sentence": "good", "label": 1, "idx": 1},
                     {"sentence": "unlabelled", "label": -1, "idx": 2}],
    "nyu-mll/multi_nli": [{"promptID": 1, "pairID": "1e", "premise": "P.", "hypothesis": f"H{label}.",
                           "genre": "fiction", "label": label} for label in (0, 1, 2, -1)],
    "stanfordnlp/snli": [{"premise": "P.", "hypothesis": f"H{label}.", "label": label} for label in (2, -1, 0)],
    "google-research-datasets/paws": [{"id": i, "sentence1": f"S{i}.", "sentence2": f"T{i}.", "label": label}
                                      for i, label in enumerate((1, 0, 1))],
    "ybisk/piqa": [{"goal": "G.", "sol1": "wrong", "sol2": "right", "label": 1},
                   {"goal": "G2.", "sol1": "right", "sol2": "wrong", "label": 0},
                   {"goal": "G3.", "sol1": "a", "sol2": "b", "label": -1}],
}


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    calls = []

    def hub_rows(source, split):
        calls.append((source.path, source.config, source.splits[split]))
        path = write_jsonl(tmp_path / source.path.replace("/", "__") / "rows.jsonl", HUB_ROWS[source.path])
        return datasets.load_dataset("json", data_files={"train": str(path)}, split="train",
                                     cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(tasks, "_hub_rows", hub_rows)
    return calls


def hub(task, **kw):
    return load_examples(task, "test", data="hub", **kw)


def test_hub_mapping_per_task(fake_hub):
    assert [(e.input, e.target) for e in hub("summarization")] == [
        ({"article": "A storm hit. Trees fell."}, "Storm hit.\nTrees fell.")]
    assert [(e.input, e.target) for e in hub("translation")] == [({"en": "The train leaves."}, "Der Zug fährt ab.")]
    [qa] = hub("qa")
    assert (qa.id, qa.target, qa.references) == ("squad-5733be", "1742", ("1742", "in 1742"))
    assert [e.target for e in hub("sentiment")] == ["negative", "positive"]
    assert [(e.input["hypothesis"], e.target) for e in hub("nli")] == [
        ("H0.", "entailment"), ("H1.", "neutral"), ("H2.", "contradiction")]
    assert [(e.input, e.target) for e in hub("paraphrasing")] == [({"sentence1": "S0."}, "T0."),
                                                                 ({"sentence1": "S2."}, "T2.")]
    assert [e.target for e in hub("commonsense")] == ["right", "right"]
    assert fake_hub[0] == ("abisee/cnn_dailymail", "3.0.0", "test")
    assert ("nyu-mll/glue", "sst2", "validation") in fake_hub  # the study's eval split


def test_hub_nli_source_is_selectable(fake_hub):
    examples = hub("nli", hub_nli="snli")
    assert [e.target for e in examples] == ["contradiction", "entailment"]
    assert all(e.id.startswith("snli-") for e in examples)
    assert fake_hub[-1][0] == "stanfordnlp/snli"


def test_parse_hub_drops_unlabelled_rows():
    assert TASKS["nli"].parse_hub({"premise": "p", "hypothesis": "h", "label": -1}, 0) is None
    assert TASKS["sentiment"].parse_hub({"sentence": "s", "label": 1}, 7).target == "positive"


def test_hub_size_subset(fake_hub):
    two = hub("nli", size=2, seed=1)
    assert two == hub("nli", size=2, seed=1) and hub("nli", size=3, seed=1)[:2] == two
    with pytest.raises(UserError) as e:
        hub("nli", size=4)
    assert "4 examples requested, only 3 available" in one_line_error(e)


def test_hub_missing_column_and_unreachable_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "_hub_rows", lambda source, split: datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(UserError) as e:
        hub("sentiment")
    assert "sentence" in one_line_error(e)

    def offline(source, split):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)\nmore")
    monkeypatch.setattr(tasks, "_hub_rows", offline)
    with pytest.raises(UserError) as e:
        hub("sentiment")
    assert "Couldn't reach" in one_line_error(e)


def test_hub_split_names_are_valid_split_specs():
    sources = [t.hub for t in TASKS.values()] + list(NLI_HUB_SOURCES.values())
    for source in sources:
        assert set(source.splits) == {"train", "validation", "test"}
        for spec in source.splits.values():
            datasets.ReadInstruction.from_spec(spec)


# ------------------------------------------------------------------- tokenising

def test_tokenize_masks_exactly_the_prompt(tokenizer):
    for task in ALL:
        ex = load_examples(task, "validation", size=1)[0]
        prompt = TASKS[task].prompt(ex)
        out = tokenize_example(tokenizer, prompt, ex.target)
        prompt_ids = encode_prompt(tokenizer, prompt)
        target_ids = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = len(prompt_ids)
        assert out["input_ids"] == prompt_ids + target_ids
        assert out["labels"] == [-100] * n + target_ids


def test_tokenize_truncation_keeps_eos_and_prompt_end(tokenizer):
    prompt = TASKS["summarization"].prompt({"article": "The storm hit the coast. " * 40})
    target = "Trees fell across the roads and homes lost power. " * 10
    out = tokenize_example(tokenizer, prompt, target, max_len=64, max_target_len=16)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    assert len(out["input_ids"]) == len(out["labels"]) == 64
    assert out["input_ids"][-16:] == target_ids[:15] + [tokenizer.eos_token_id]
    assert out["labels"] == [-100] * 48 + out["input_ids"][-16:]
    assert out["input_ids"][:48] == encode_prompt(tokenizer, prompt)[-48:]
    assert tokenizer.decode(out["input_ids"][:48]).endswith("\n### Summarization:\n")


def test_tokenize_keeps_bos_in_front():
    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|pad|> $A",
                                                                  special_tokens=[("<|pad|>", 1)])
    tok.bos_token = "<|pad|>"  # a tokenizer that puts a BOS in front of what it encodes
    prompt = TASKS["sentiment"].prompt({"sentence": "a long and winding review " * 20})
    full = tokenize_example(tok, prompt, "positive")
    assert full["input_ids"][0] == 1 and full["input_ids"].count(1) == 1
    short = tokenize_example(tok, prompt, "positive", max_len=20, max_target_len=4)
    assert short["input_ids"][0] == 1 and len(short["input_ids"]) == 20
    assert short["input_ids"][1:-2] == full["input_ids"][-19:-2]


def test_truncate_prompt_ids():
    assert truncate_prompt_ids([5, 6, 7, 8, 9], 3) == [7, 8, 9]
    assert truncate_prompt_ids([5, 6, 7, 8, 9], 3, bos_token_id=5) == [5, 8, 9]
    assert truncate_prompt_ids([5, 6], 3, bos_token_id=5) == [5, 6]
    assert truncate_prompt_ids([6, 7, 8], 2, bos_token_id=5) == [7, 8]
    with pytest.raises(ValueError):
        truncate_prompt_ids([1], 0)


def test_tokenize_rejects_bad_lengths_and_missing_eos(tokenizer):
    with pytest.raises(ValueError):
        tokenize_example(tokenizer, "p", "t", max_len=8, max_target_len=8)
    tok = tiny_tokenizer()
    tok.eos_token = None
    with pytest.raises(UserError):
        tokenize_example(tok, "p", "t")


# --------------------------------------------------------------------- scoring

@pytest.mark.parametrize("task, best", [("summarization", 1.0), ("translation", 100.0), ("qa", 100.0),
                                        ("sentiment", 1.0), ("nli", 1.0), ("paraphrasing", 100.0),
                                        ("commonsense", 1.0)])
def test_gold_predictions_score_best(task, best):
    examples = load_examples(task, "validation")
    result = TASKS[task].score([ex.target for ex in examples], examples)
    assert result["primary"] == TASKS[task].primary
    assert result["score"] == pytest.approx(best) == result["metrics"][result["primary"]]
    assert len(result["per_example"]) == len(examples)
    assert all(s == pytest.approx(best) for s in result["per_example"])


def test_score_per_example_means():
    qa = load_examples("qa", "validation")
    result = TASKS["qa"].score(["the " + ex.target.upper() if i % 2 else "no idea" for i, ex in enumerate(qa)], qa)
    assert sum(result["per_example"]) / len(qa) == pytest.approx(result["metrics"]["f1"])
    assert result["metrics"]["exact_match"] == 50.0
    piqa = load_examples("commonsense", "validation")
    numbers = ["1" if ex.input["sol1"] == ex.target else "2" for ex in piqa]
    assert TASKS["commonsense"].score(numbers, piqa)["score"] == 0.0  # the text is scored, not the number


def test_score_rejects_mismatch():
    examples = load_examples("sentiment", "validation")
    with pytest.raises(ValueError):
        TASKS["sentiment"].score(["positive"], examples)
    with pytest.raises(ValueError):
        TASKS["nli"].score(["positive"] * len(examples), examples)
