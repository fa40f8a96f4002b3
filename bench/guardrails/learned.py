"""Train and measure the learned injection detector (``tollway.guardrails.learned``), source by source,
against the rules the gateway runs beside it (``tollway.guardrails.injection``).

    .venv/bin/pip install pyarrow     # the hijacks source is a parquet file (the bench's only, not a dependency)
    .venv/bin/python bench/guardrails/learned.py [--out guardrails/injection_model.npz] [--c 0.1 0.3] [--rounds 1 2]

The defaults (C 0.1, 2 rounds) are the shipped model's; about five minutes per setting on two cores. The
tau2 banking corpus comes from inspect-evals (installed); the others need Debian's ``debian-faq``,
``postgresql-doc-15``, ``debian-reference-en`` and ``dict-jargon`` (``bench/retrieval/corpora.py``), each left
out with a note when missing.

Data: ``injection_sources`` (next to this file): public sources read out of PyPI wheels, and benign documents
from Debian's documentation packages (``docs``: the tau2 banking policies, the Debian FAQ, the PostgreSQL
manual; ``docs-held``: the Debian Reference and the Jargon File, never trained on). The sources in ``HELD_OUT``
are never trained on, nor used to choose anything. The figures are honest in two ways:

- **Leave one source out.** For every training source, a model trained on the other sources scores it, so
  each source's recall (attacks) or false-positive rate (benign) is that of a source the model has not
  seen. The regularisation ``C``, the rounds and the calibration offset are chosen from these scores only.
- **Held out.** The final model (trained on every training source) scores the held-out sources once.

Training is multiple-instance: an attack text is known to hold an attack somewhere, not in which window.
Round 0 takes every window of an attack text as positive (the text's weight shared among them); each later
round keeps the ``--top`` windows the previous model scores highest. Each kept window also enters once with
a generic perturbation (a typo in one or two words, upper case, a banner around it), so spelling and
emphasis do not carry the decision. Every benign window is negative. Every source weighs the same, and the
two classes weigh the same.

The offset puts the default threshold 0.8 at the lowest leave-one-out logit that keeps the false-positive
rate at or under ``TARGET_FP`` on the pooled benign texts and at or under ``2 * TARGET_FP`` on each benign
source.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "retrieval"))

from injection_sources import HELD_OUT, Sample, load

from tollway.guardrails.injection import score as rules
from tollway.guardrails.learned import BITS, Model, grams, windows

TARGET_FP = 0.01
DEFAULT = 0.8
LOGIT_DEFAULT = math.log(DEFAULT / (1 - DEFAULT))
DOC_PIECE = 3000  # benign documents enter as pieces of about this many characters
HELD_DOCS = "docs-held"


def documents(seed: int = 5) -> list[Sample]:
    """Benign documents full of instructions to a reader (policies, manuals, a FAQ) and, held out, two more."""
    import corpora

    rng = random.Random(seed)
    out: list[Sample] = []
    for name, source, limit in (("banking", "docs", 400), ("faq", "docs", 300), ("pgdocs", "docs", 300),
                                ("debref", HELD_DOCS, 300), ("jargon", HELD_DOCS, 300)):
        if name != "banking" and not corpora.DEBIAN[name][1].exists():
            print(f"({name}: {corpora.DEBIAN[name][0]} is not installed; left out)", file=sys.stderr)
            continue
        corpus = corpora.load([name])[0]
        pieces = [d.text[i:i + DOC_PIECE] for d in corpus.docs for i in range(0, len(d.text), DOC_PIECE)]
        pieces = [p for p in pieces if len(p) > 200]
        out += [Sample(p, False, source) for p in rng.sample(pieces, min(limit, len(pieces)))]
    return out


def _typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    for i in rng.sample(long, min(len(long), rng.choice((1, 1, 2)))):
        w = words[i]
        j = rng.randrange(1, len(w) - 1)
        op = rng.random()
        words[i] = w[:j] + w[j + 1:] if op < 1 / 3 else w[:j] + w[j + 1] + w[j] + w[j + 2:] if op < 2 / 3 \
            else w[:j] + w[j] + w[j:]
    return " ".join(words)


def perturb(text: str, rng: random.Random) -> str:
    """A generic perturbation of an attack window: what an attacker does to get past a filter."""
    r = rng.random()
    if r < 0.3:
        return text.upper()
    if r < 0.7:
        return _typo(text, rng)
    if r < 0.85:
        return rng.choice(("*** ", "### ", "!!! ", "important: ", "[", "<note> ")) + text + \
            rng.choice((" ***", " ###", " !!!", "", "]", " </note>"))
    return text.capitalize()


class Windows:
    """Every text's windows as sparse rows (the n-grams that start in each, scaled by 1/sqrt(count))."""

    def __init__(self, samples: list[Sample], cap: int = 60) -> None:
        members: list[np.ndarray] = []
        owner: list[int] = []
        self.normalised: list[str] = []  # each text as the model reads it
        self.spans: list[tuple[int, int, int]] = []  # each window: (its text, start, end)
        for i, s in enumerate(samples):
            g = grams(s.text)
            spans = windows(g.text)
            if s.attack:  # a long jailbreak's windows beyond the cap add training time, not evidence (scored
                spans = spans[:cap]  # on fewer windows, its recall here can only be lower than served)
            self.normalised.append(g.text)
            for start, end in spans:
                members.append(np.concatenate([np.array([], dtype=np.int64)] + [
                    b[np.searchsorted(p, start):np.searchsorted(p, end)]
                    for b, p in zip(g.buckets, g.positions, strict=True)]))
                owner.append(i)
                self.spans.append((i, int(start), int(end)))
        self.x = _matrix(members)
        self.owner = np.array(owner)
        self.attack = np.array([s.attack for s in samples])
        self.source = np.array([s.source for s in samples])
        self.rows = np.split(np.arange(len(owner)), np.flatnonzero(np.diff(self.owner)) + 1)


def _matrix(members: list[np.ndarray]) -> sparse.csr_matrix:
    """One row per bucket array, each n-gram weighing 1/sqrt(count) (an empty row gets bucket 0)."""
    members = [b if len(b) else np.array([0]) for b in members]
    rows = np.concatenate([np.full(len(b), i) for i, b in enumerate(members)])
    vals = np.concatenate([np.full(len(b), 1 / math.sqrt(len(b))) for b in members])
    m = sparse.csr_matrix((vals, (rows, np.concatenate(members))), shape=(len(members), 2 ** BITS))
    m.sum_duplicates()
    return m


def rows_of(texts: list[str]) -> sparse.csr_matrix:
    """Whole texts as rows (the perturbed windows)."""
    grammed = [grams(text) for text in texts]
    return _matrix([np.concatenate(g.buckets) if g.count else np.array([], dtype=np.int64) for g in grammed])


def fit(x: sparse.csr_matrix, y: np.ndarray, weight: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, solver="liblinear", max_iter=3000, random_state=0)
    clf.fit(x, y, sample_weight=weight)
    return clf.coef_[0].astype(np.float32), float(clf.intercept_[0])


def train(w: Windows, keep: np.ndarray, c: float, rounds: int, top: int, seed: int) -> tuple[np.ndarray, float]:
    """A model from the samples in ``keep`` (bool per sample)."""
    rng = random.Random(seed)
    attacks = np.flatnonzero(keep & w.attack)
    negatives = np.concatenate([w.rows[i] for i in np.flatnonzero(keep & ~w.attack)])
    coef: np.ndarray | None = None
    bias = 0.0
    for round_ in range(rounds + 1):
        chosen: list[np.ndarray] = []
        if coef is None:
            chosen = [w.rows[i] for i in attacks]
        else:
            logits = w.x @ coef
            chosen = [w.rows[i][np.argsort(-logits[w.rows[i]])[:top]] for i in attacks]
        positives = np.concatenate(chosen)
        share = np.concatenate([np.full(len(c_), 1 / len(c_)) for c_ in chosen])
        extra = [] if round_ == 0 else [perturb(_window_text(w, r), rng) for r in positives]
        x = sparse.vstack([w.x[negatives], w.x[positives]] + ([rows_of(extra)] if extra else [])).tocsr()
        y = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives) + len(extra))]).astype(int)
        owners = np.concatenate([w.owner[negatives], w.owner[positives], w.owner[positives][:len(extra)]])
        weight = np.concatenate([np.ones(len(negatives)), share, share[:len(extra)]])
        _, index = np.unique(w.source[owners], return_inverse=True)
        source_rows = np.bincount(index, weights=weight)  # each source's total weight, before balancing
        weight = weight / source_rows[index]
        for label in (0, 1):
            weight[y == label] *= len(y) / 2 / weight[y == label].sum()
        coef, bias = fit(x, y, weight, c)
    assert coef is not None
    return coef, bias


def _window_text(w: Windows, row: int) -> str:
    owner, start, end = w.spans[row]
    return w.normalised[owner][start:end].strip()


def text_logits(w: Windows, coef: np.ndarray, bias: float, which: np.ndarray) -> np.ndarray:
    logits = w.x @ coef + bias
    return np.array([logits[w.rows[i]].max() for i in which])


def offset_for(samples: list[Sample], logits: np.ndarray, benign: np.ndarray) -> float:
    by_source: dict[str, list[float]] = defaultdict(list)
    for i in benign:
        by_source[samples[i].source].append(logits[i])
    for cut in np.sort(logits[benign]):
        pooled = float(np.mean(logits[benign] >= cut))
        worst = max(float(np.mean(np.array(v) >= cut)) for v in by_source.values())
        if pooled <= TARGET_FP and worst <= 2 * TARGET_FP:
            return float(cut) - LOGIT_DEFAULT + 1e-6
    return float(np.max(logits[benign])) - LOGIT_DEFAULT + 1e-6


def by_threshold(source: np.ndarray, attack: np.ndarray, logits: np.ndarray, offset: float,
                 rule_scores: np.ndarray, held_out: set[str]) -> None:
    """What a tenant's ``injection_threshold`` buys: per threshold, the benign texts flagged (pooled over the
    training sources, leave-one-out; over the held-out benign sources) and the attacks caught (the mean over
    attack sources, training and held out), by the rules alone (the default) and by the rules with the model (``injection_model: true``)."""
    held = np.isin(source, list(held_out))
    print("\n| threshold | benign flagged, training (rules / with the model) | benign flagged, held out | "
          "attacks caught, training sources' mean | attacks caught, held-out sources' mean |")
    print("|---|---|---|---|---|")
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        by_rules = rule_scores >= t
        both = by_rules | (logits - offset >= math.log(t / (1 - t)))

        def mean(flags: np.ndarray, mask: np.ndarray) -> float:
            return float(np.mean(flags[mask]))

        def macro(flags: np.ndarray, mask: np.ndarray) -> float:
            return float(np.mean([np.mean(flags[source == s]) for s in sorted(set(source[mask]))]))

        print(f"| {t} | {mean(by_rules, ~attack & ~held):.4f} / {mean(both, ~attack & ~held):.4f} | "
              f"{mean(by_rules, ~attack & held):.4f} / {mean(both, ~attack & held):.4f} | "
              f"{macro(by_rules, attack & ~held):.3f} / {macro(both, attack & ~held):.3f} | "
              f"{macro(by_rules, attack & held):.3f} / {macro(both, attack & held):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/injection_model.npz"),
                        help="where to write the model (the shipped one: guardrails/injection_model.npz)")
    parser.add_argument("--c", type=float, nargs="+", default=[0.1])
    parser.add_argument("--rounds", type=int, nargs="+", default=[2])
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--dump", type=Path, help="write every text's score (leave-one-out or held out) here")
    args = parser.parse_args()
    started = time.perf_counter()
    samples = load() + documents()
    held_out = set(HELD_OUT) | {HELD_DOCS}
    w = Windows(samples)
    print(f"{len(samples)} texts, {w.x.shape[0]} windows ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    training = np.array([s.source not in held_out for s in samples])
    benign = np.flatnonzero(training & ~w.attack)
    best: tuple[float, int, float, np.ndarray, float] | None = None
    for c in args.c:
        for rounds in args.rounds:
            logits = np.full(len(samples), np.nan)
            for source in sorted(set(w.source[training])):
                held = w.source == source
                coef, bias = train(w, training & ~held, c, rounds, args.top, args.seed)
                logits[held] = text_logits(w, coef, bias, np.flatnonzero(held))
            offset = offset_for(samples, logits, benign)
            flagged = logits >= offset + LOGIT_DEFAULT
            per_source = [float(np.mean(flagged[w.source == s])) for s in sorted(set(w.source[training & w.attack]))]
            macro = float(np.mean(per_source))
            print(f"C={c} rounds={rounds}: leave-one-source-out recall {np.mean(flagged[training & w.attack]):.3f} "
                  f"(macro over sources {macro:.3f}) at benign FP <= {TARGET_FP:.0%}", flush=True)
            if best is None or macro > best[2]:
                best = (c, rounds, macro, logits, offset)
    assert best is not None
    c, rounds, _, loo, offset = best
    coef, bias = train(w, training, c, rounds, args.top, args.seed)
    final = text_logits(w, coef, bias, np.arange(len(samples)))
    scored = np.where(training, loo, final)  # leave-one-out for training sources, the final model for the rest
    flagged = scored >= offset + LOGIT_DEFAULT
    rule_scores = np.array([rules(s.text).score for s in samples])
    by_rules = rule_scores >= DEFAULT
    lines = []
    for source in sorted(set(w.source), key=lambda s: (not w.attack[w.source == s][0], s)):
        m = w.source == source
        lines.append({"source": source, "attack": bool(w.attack[m][0]), "held_out": source in held_out,
                      "texts": int(m.sum()), "rules": round(float(by_rules[m].mean()), 4),
                      "model": round(float(flagged[m].mean()), 4),
                      "either": round(float((flagged | by_rules)[m].mean()), 4)})
    model = Model(coef, bias, offset, {
        "trained_on": sorted(set(w.source[training])), "held_out": sorted(held_out), "c": c, "rounds": rounds,
        "top": args.top, "threshold": DEFAULT, "target_fp": TARGET_FP, "results": lines,
        "texts": int(training.sum()), "seconds": round(time.perf_counter() - started, 1),
    })
    model.save(args.out)
    if args.dump:
        np.savez(args.dump, scored=scored, source=w.source, attack=w.attack, cut=offset + LOGIT_DEFAULT,
                 texts=np.array([s.text[:2000] for s in samples]))
    print(f"\nC={c}, rounds={rounds}, offset {offset:.3f}. Share flagged at the default threshold {DEFAULT} (recall "
          "for attacks, false positives for benign); the model's figure is leave-one-source-out for a training "
          "source, the final model's for a held-out one:\n")
    print("| source | kind | texts | rules (default) | learned model | either (`injection_model: true`) |")
    print("|---|---|---|---|---|---|")
    for line in lines:
        kind = ("attack" if line["attack"] else "benign") + (", **held out**" if line["held_out"] else "")
        print(f"| {line['source']} | {kind} | {line['texts']} | {line['rules']:.3f} | {line['model']:.3f} | "
              f"{line['either']:.3f} |")
    by_threshold(w.source, w.attack, scored, offset, rule_scores, held_out)
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
