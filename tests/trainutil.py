"""Small task data written on the spot for the training tests (learnable, offline, fast)."""
from __future__ import annotations

import json
import random
from pathlib import Path

POS = ["good", "great", "fine", "nice", "happy"]
NEG = ["bad", "awful", "poor", "sad", "worse"]
FILL = ["the", "a", "of", "and", "film", "story", "it", "was"]


def _sentiment(rng: random.Random, i: int) -> dict:
    label = rng.choice(["positive", "negative"])
    words = rng.sample(FILL, 3) + [rng.choice(POS if label == "positive" else NEG)]
    rng.shuffle(words)
    return {"id": f"s{i}", "task": "sentiment", "input": {"sentence": " ".join(words)}, "target": label}


def _nli(rng: random.Random, i: int) -> dict:
    label = rng.choice(["entailment", "neutral", "contradiction"])
    premise = " ".join(rng.sample(FILL, 4))
    hypothesis = {"entailment": premise, "neutral": "maybe " + premise, "contradiction": "not " + premise}[label]
    return {"id": f"n{i}", "task": "nli", "input": {"premise": premise, "hypothesis": hypothesis}, "target": label}


def _translation(rng: random.Random, i: int) -> dict:
    en = " ".join(rng.sample(FILL, 4))
    return {"id": f"t{i}", "task": "translation", "input": {"en": en}, "target": en.replace("the", "der")}


MAKERS = {"sentiment": _sentiment, "nli": _nli, "translation": _translation}


def write_task_data(root: str | Path, tasks=("sentiment", "nli"), n_train: int = 24, n_val: int = 8,
                    seed: int = 0) -> Path:
    """<root>/<task>/{train,validation}.jsonl in the unified format."""
    root = Path(root)
    rng = random.Random(seed)
    for task in tasks:
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("validation", n_val)):
            rows = [MAKERS[task](rng, f"{split}{i}") for i in range(n)]
            (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train_args(model, run, *extra, tasks: str = "sentiment,nli") -> list[str]:
    """train_individual_loras.py / train_moa.py arguments for a tiny model on the bundled sample:
    4 steps of 4, validation every 2 steps on 4 examples, a checkpoint every 2 steps."""
    return ["--model", str(model), "--tasks", tasks, "--data", "sample", "--output-dir", str(run),
            "--train-size", "16", "--eval-size", "4", "--max-len", "96", "--max-target-len", "8",
            "--batch-size", "4", "--lr", "1e-2", "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
            "--log-every", "1", "--no-progress", *extra]
