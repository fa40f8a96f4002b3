"""The learned injection detector: a linear model over hashed character and word n-grams, scored sentence by
sentence, served with numpy (trained by ``bench/guardrails/learned.py``; the weights and the model card are
``injection_model.npz`` next to this file).

Features. The text is normalised (NFKC, zero-width characters and soft hyphens removed, case folded, runs of
spaces collapsed, line breaks kept), then every character 3-, 4- and 5-gram and every word 1- and 2-gram is
hashed into ``2**BITS`` buckets (a polynomial over the code points modulo 2**64, then multiplicative
hashing; all vectorised with numpy).
Character n-grams make a typo, a stem or a missing space cost a few features, not the match; word n-grams
carry the phrases.

Windows. An injection is a sentence or two addressed to the model, wherever it stands: in a prompt, an email
an agent reads, a code comment. So a text is cut into segments (sentences and lines, short ones joined to the
next, long ones cut at ``SEGMENT`` characters) and scored on each segment and each pair of neighbours; its
logit is the highest window's, ``bias + sum(weight[bucket] for its n-grams) / sqrt(count)``. A window holds the
n-grams that start inside it. Training (multiple-instance: an attack text is known to hold an attack, not
which window) scores the same windows the same way (``windows`` below is shared), so what is served is what was
measured. Per-window sums come from cumulative sums over each family's positions: one pass per text.

Scale. ``score`` is ``sigmoid(logit - offset)``, the offset chosen at training so that the injection guard's
default threshold (0.8) sits where the model card says (benign false positives at or under 1% pooled, 2% per
source, on sources left out of training). Where a policy sets ``injection_model: true`` it is combined with
the rules' score by taking the higher (``tollway.guardrails.injection.score``), so a threshold a tenant set
keeps its meaning for the rules. It is off by default: on the sources held out of its training it adds
almost no recall for twice the false positives (bench/RESULTS.md, "The learned injection detector").
"""

from __future__ import annotations

import json
import math
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex

BITS = 18
SEGMENT = 400  # a segment longer than this is cut (characters)
SHORT = 25  # a segment shorter than this is joined to the next
CHAR_NS = (3, 4, 5)
MAX_CHARS = 64_000  # a longer text is scored on its first and last halves of this (bounded time)
PATH = Path(__file__).with_name("injection_model.npz")

_DROP = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u200e\u200f"), None)
_BLANKS = regex.compile(r"[^\S\n]+")
_LINES = regex.compile(r" ?\n[\s]*")
_BREAK = regex.compile(r"(?<=[.!?:;])\s|\n")
_NOT_WORD = regex.compile(r"\W")
_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - BITS)
_SALT = {n: np.uint64(0x51ED27 * (n + 1)) for n in (*CHAR_NS, 1, 2)}


def normalise(text: str) -> str:
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS // 2] + "\n" + text[-MAX_CHARS // 2:]
    text = unicodedata.normalize("NFKC", text).translate(_DROP).casefold()
    return f" {_LINES.sub(chr(10), _BLANKS.sub(' ', text)).strip()} "


@dataclass(frozen=True, slots=True)
class Grams:
    """The n-grams of one normalised text: per family, bucket ids and start positions (ascending)."""

    text: str
    buckets: tuple[np.ndarray, ...]
    positions: tuple[np.ndarray, ...]

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.buckets)


def _bucket(h: np.ndarray, n: int) -> np.ndarray:
    return (((h ^ _SALT[n]) * _MIX) >> _SHIFT).astype(np.int64)


def _powers(base: np.uint64, size: int) -> np.ndarray:
    """base**0 .. base**(size-1) modulo 2**64."""
    out = np.full(size, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, dtype=np.uint64)


_PRIME_INV = np.uint64(pow(int(_PRIME), -1, 2 ** 64))  # the prime is odd, so it has an inverse modulo 2**64


def grams(text: str) -> Grams:
    """Hashed n-grams of ``normalise(text)``. A character n-gram's hash is the polynomial
    ``sum(point[i + k] * PRIME**(n - 1 - k))`` modulo 2**64; a word's is the same polynomial over its
    characters, from prefix sums (each point times ``PRIME**-i``), so no step loops over words in Python."""
    text = normalise(text)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    size = len(points)
    buckets, positions = [], []
    with np.errstate(over="ignore"):
        if size >= CHAR_NS[0]:
            h = points[:size - CHAR_NS[0] + 1].copy()
            for k in range(1, CHAR_NS[0]):
                h = h * _PRIME + points[k:size - CHAR_NS[0] + 1 + k]
            for n in CHAR_NS:
                if n > CHAR_NS[0]:
                    if size < n:
                        break
                    h = h[:size - n + 1] * _PRIME + points[n - 1:]
                buckets.append(_bucket(h, n))
                positions.append(np.arange(size - n + 1, dtype=np.int64))
        word = np.frombuffer(_NOT_WORD.sub(" ", text).encode("utf-32-le", "surrogatepass"), dtype=np.uint32) != 32
        edges = np.diff(np.concatenate(([False], word, [False])).astype(np.int8))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if len(starts):
            down = _powers(_PRIME_INV, size + 1)
            prefix = np.concatenate(([np.uint64(0)], np.cumsum(points * down[:size], dtype=np.uint64)))
            up = _powers(_PRIME, size + 1)
            hashes = (prefix[ends] - prefix[starts]) * up[ends - 1]
            buckets.append(_bucket(hashes, 1))
            positions.append(starts.astype(np.int64))
            if len(starts) > 1:
                buckets.append(_bucket(hashes[:-1] * _PRIME + hashes[1:], 2))
                positions.append(starts[:-1].astype(np.int64))
    return Grams(text, tuple(buckets), tuple(positions))


def segments(text: str) -> list[tuple[int, int]]:
    """(start, end) of each segment of a normalised text: sentences and lines, a short one joined to the
    next, a long one cut every ``SEGMENT`` characters."""
    cuts = [0, *(m.end() for m in _BREAK.finditer(text)), len(text)]
    out: list[tuple[int, int]] = []
    start = 0
    for end in cuts[1:]:
        if end - start < SHORT and end != len(text):
            continue
        while end - start > SEGMENT:
            out.append((start, start + SEGMENT))
            start += SEGMENT
        if end > start:
            out.append((start, end))
        start = end
    if len(out) > 1 and out[-1][1] - out[-1][0] < SHORT:  # a short tail joins the segment before it
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out or [(0, len(text))]


def windows(text: str) -> np.ndarray:
    """(start, end) rows of a normalised text's windows: each segment, and each pair of neighbours."""
    segs = np.array(segments(text), dtype=np.int64)
    if len(segs) == 1:
        return segs
    pairs = np.stack([segs[:-1, 0], segs[1:, 1]], axis=1)
    return np.concatenate([segs, pairs])


def window_sums(g: Grams, weights: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the sum of its n-grams' weights and their count."""
    sums = np.zeros(len(spans))
    counts = np.zeros(len(spans))
    for b, p in zip(g.buckets, g.positions, strict=True):
        running = np.concatenate(([0.0], np.cumsum(weights[b], dtype=np.float64)))
        lo, hi = np.searchsorted(p, spans[:, 0]), np.searchsorted(p, spans[:, 1])
        sums += running[hi] - running[lo]
        counts += hi - lo
    return sums, counts


@dataclass(frozen=True, slots=True)
class Model:
    weights: np.ndarray  # float32, 2**BITS
    bias: float
    offset: float  # subtracted from the logit before the sigmoid: puts the operating point at 0.8
    card: dict[str, Any]

    def logit(self, text: str) -> float:
        """The highest window's logit."""
        g = grams(text)
        if g.count == 0:
            return self.bias
        sums, counts = window_sums(g, self.weights, windows(g.text))
        present = counts > 0
        return self.bias + float(np.max(sums[present] / np.sqrt(counts[present])))

    def score(self, text: str) -> float:
        return 1.0 / (1.0 + math.exp(-(self.logit(text) - self.offset)))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, weights=self.weights.astype(np.float16), bias=np.float64(self.bias),
                            offset=np.float64(self.offset),
                            card=np.frombuffer(json.dumps(self.card).encode(), dtype=np.uint8))


def load(path: Path = PATH) -> Model:
    with np.load(path) as data:
        return Model(data["weights"].astype(np.float32), float(data["bias"]), float(data["offset"]),
                     json.loads(bytes(data["card"]).decode()))


_LOADED: list[Model | None] = []
_LOADING = threading.Lock()


def model() -> Model | None:
    """The shipped model, loaded on first use (~1 MB of memory; a gateway whose policies never use the
    injection guard never loads it). None where the file is missing (a source checkout before training)."""
    if not _LOADED:
        with _LOADING:
            if not _LOADED:
                _LOADED.append(load() if PATH.exists() else None)
    return _LOADED[0]
