"""An experiment (``bench/guardrails/learned.py``), not shipped: the learned injection detector a linear model over hashed character and word n-grams, served with numpy.

Features. The text is normalised (NFKC, zero-width characters and soft hyphens removed, case folded,
whitespace collapsed), then every character 3-, 4- and 5-gram and every word 1- and 2-gram is hashed into
``2**BITS`` buckets (multiplicative hashing over the code points, vectorised; word hashes by CRC-32).
Character n-grams make a typo, a synonym's stem or a missing space cost a few features, not the match; word
n-grams carry the phrases. A text's logit is ``bias + sum(weight[bucket] for each n-gram) / sqrt(count)``:
the same as a dot product with the count vector scaled by ``1/sqrt(count)``, which is what training fits.

Windows. A long text is scored in windows of ``WINDOW`` characters (half overlapping) and its score is the
highest window's, so an injection inside a long document or tool output is not diluted by the benign text
around it; a text no longer than a window is scored whole, exactly as in training. Per-window sums come
from cumulative sums over each n-gram family's positions: a 4k-token prompt costs one pass.

Scale. ``score`` is a calibrated value in [0, 1]: ``sigmoid(logit - offset)`` with the offset chosen at
training so that the default threshold (0.8) sits at the operating point the model card states (benign
false positives at or under 1% on every benign source left out of training). The weights, the bias, the
offset and the card (sources, figures) are one ``.npz`` file written by ``bench/guardrails/learned.py``.
"""

from __future__ import annotations

import json
import math
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex

BITS = 18
WINDOW = 1024
CHAR_NS = (3, 4, 5)

_DROP = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u200e\u200f"), None)
_SPACE = regex.compile(r"\s+")
_WORD = regex.compile(r"\w+")
_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - BITS)
_SALT = {n: np.uint64(0x51ED27 * (n + 1)) for n in (*CHAR_NS, 1, 2)}


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_DROP).casefold()
    return f" {_SPACE.sub(' ', text).strip()} "


@dataclass(frozen=True, slots=True)
class Grams:
    """The n-grams of one normalised text: per family, bucket ids and start positions (ascending)."""

    length: int
    buckets: tuple[np.ndarray, ...]
    positions: tuple[np.ndarray, ...]

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.buckets)


def _bucket(h: np.ndarray, n: int) -> np.ndarray:
    return (((h ^ _SALT[n]) * _MIX) >> _SHIFT).astype(np.int64)


def grams(text: str) -> Grams:
    """Hashed n-grams of ``normalise(text)``."""
    text = normalise(text)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    size = len(points)
    buckets, positions = [], []
    with np.errstate(over="ignore"):
        for n in CHAR_NS:
            if size < n:
                continue
            h = points[:size - n + 1].copy()
            for k in range(1, n):
                h = h * _PRIME + points[k:size - n + 1 + k]
            buckets.append(_bucket(h, n))
            positions.append(np.arange(size - n + 1, dtype=np.int64))
        words = [(m.start(), zlib.crc32(m.group().encode())) for m in _WORD.finditer(text)]
        if words:
            starts = np.fromiter((s for s, _ in words), dtype=np.int64, count=len(words))
            hashes = np.fromiter((h for _, h in words), dtype=np.uint64, count=len(words))
            buckets.append(_bucket(hashes, 1))
            positions.append(starts)
            if len(words) > 1:
                buckets.append(_bucket(hashes[:-1] * _PRIME + hashes[1:], 2))
                positions.append(starts[:-1])
    return Grams(size, tuple(buckets), tuple(positions))


@dataclass(frozen=True, slots=True)
class Model:
    weights: np.ndarray  # float32, 2**BITS
    bias: float
    offset: float  # subtracted from the logit before the sigmoid: puts the operating point at 0.8
    card: dict[str, Any]

    def logit(self, text: str) -> float:
        """The highest window's logit (the whole text's when it fits in one window)."""
        g = grams(text)
        if g.count == 0:
            return self.bias
        if g.length <= WINDOW:
            total = sum(float(self.weights[b].sum()) for b in g.buckets)
            return self.bias + total / math.sqrt(g.count)
        starts = np.arange(0, max(g.length - WINDOW, 0) + WINDOW // 2, WINDOW // 2, dtype=np.int64)
        ends = starts + WINDOW
        sums = np.zeros(len(starts))
        counts = np.zeros(len(starts))
        for b, p in zip(g.buckets, g.positions, strict=True):
            running = np.concatenate(([0.0], np.cumsum(self.weights[b], dtype=np.float64)))
            lo, hi = np.searchsorted(p, starts), np.searchsorted(p, ends)
            sums += running[hi] - running[lo]
            counts += hi - lo
        present = counts > 0
        return self.bias + float(np.max(sums[present] / np.sqrt(counts[present])))

    def score(self, text: str) -> float:
        return 1.0 / (1.0 + math.exp(-(self.logit(text) - self.offset)))

    def save(self, path: Path) -> None:
        np.savez_compressed(path, weights=self.weights.astype(np.float16), bias=np.float64(self.bias),
                            offset=np.float64(self.offset), card=np.frombuffer(json.dumps(self.card).encode(),
                                                                                 dtype=np.uint8))


def load(path: Path) -> Model:
    with np.load(path) as data:
        return Model(data["weights"].astype(np.float32), float(data["bias"]), float(data["offset"]),
                     json.loads(bytes(data["card"]).decode()))
