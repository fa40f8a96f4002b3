"""System-prompt leakage: the output repeating a run of the system prompt.

The system text (the request's system and developer messages and its rendered prompt's; never the context
a retrieval added, which is not a secret) is cut into word n-grams (8 words; a shorter prompt of at least
4 words counts whole). A run of output words whose every n-gram is one of them is a leak span, from its
first word to its last, whatever the case, punctuation or spacing between the words. A stream holds back
the trailing words that could still begin such a run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import regex

from tollway.guardrails.detectors import Span

WORD = regex.compile(r"\w+")
NGRAM = 8
SHORTEST = 4  # system text shorter than this many words is not checked


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group().casefold(), m.start(), m.end()) for m in WORD.finditer(text)]


@dataclass(slots=True)
class LeakDetector:
    kind: str = "system_prompt"
    n: int = NGRAM
    grams: set[tuple[str, ...]] = field(default_factory=set)  # the n-grams of the system text
    prefixes: set[tuple[str, ...]] = field(default_factory=set)  # every shorter run of consecutive words

    @classmethod
    def of(cls, system_texts: Iterable[str]) -> LeakDetector | None:
        texts = [ws for t in system_texts if len(ws := [w for w, _, _ in _words(t)]) >= SHORTEST]
        if not texts:
            return None
        n = min(NGRAM, *(len(ws) for ws in texts))
        detector = cls(n=n)
        for ws in texts:
            for i in range(len(ws)):
                detector.prefixes.update(tuple(ws[i:i + k]) for k in range(1, n) if i + k <= len(ws))
                if i + n <= len(ws):
                    detector.grams.add(tuple(ws[i:i + n]))
        return detector

    def find(self, text: str) -> list[Span]:
        words = _words(text)
        n, spans = self.n, []
        run_start = run_end = -1
        for i in range(len(words) - n + 1):
            if tuple(w for w, _, _ in words[i:i + n]) in self.grams:
                if run_end >= i:  # overlaps the current run: extend it
                    run_end = i + n - 1
                else:
                    if run_start >= 0:
                        spans.append(Span(self.kind, words[run_start][1], words[run_end][2]))
                    run_start, run_end = i, i + n - 1
        if run_start >= 0:
            spans.append(Span(self.kind, words[run_start][1], words[run_end][2]))
        return spans

    def holds(self, text: str) -> int:
        """From the first of the trailing words that could still begin a run. A last word that touches the
        end may still grow: it is held, and the complete words before it are what is looked up."""
        words = _words(text)
        hold = len(text)
        if words and words[-1][2] == len(text):
            hold = words[-1][1]
            words = words[:-1]
        for k in range(min(self.n - 1, len(words)), 0, -1):
            if tuple(w for w, _, _ in words[-k:]) in self.prefixes:
                return min(hold, words[-k][1])
        return hold
