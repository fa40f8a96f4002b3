"""Restricted terms, competitor names and topics, exact and fuzzy.

A term matches whole words, case-insensitively, with a few character errors allowed in longer terms
(``regex``'s fuzzy matching: 0 errors up to 5 letters, 1 up to 11, 2 beyond), so "Acme Crop" and
"acme-corp" still match "Acme Corp" while "acne" does not match "acme". A topic is a name with words or
phrases that signal it; any of them counts as the topic. Spans are kinds ``term``, ``competitor`` and
``topic:NAME``; a stream holds back what could still become one (partial matching).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import regex

from tollway.guardrails.detectors import Detector, Finder


def allowed_errors(term: str) -> int:
    letters = sum(c.isalnum() for c in term)
    return 0 if letters <= 5 else 1 if letters <= 11 else 2


def _alternative(term: str) -> str:
    words = [regex.escape(w) for w in term.split()]
    body = r"[\s\-_]*".join(words)  # "acme corp", "acme-corp", "AcmeCorp"
    errors = allowed_errors(term)
    fuzzy = f"{{e<={errors}}}" if errors else ""
    return rf"(?:(?<!\w)(?:{body}){fuzzy}(?!\w))"


def term_detector(kind: str, terms: Iterable[str]) -> Detector | None:
    """One detector for a list of terms (longest first, so a longer term wins where both match)."""
    clean = sorted({t.strip() for t in terms if t.strip()}, key=len, reverse=True)
    if not clean:
        return None
    source = "|".join(_alternative(t) for t in clean)
    return Detector(kind, regex.compile(source, regex.IGNORECASE | regex.BESTMATCH | regex.V1))


def term_finders(terms: Iterable[str] = (), competitors: Iterable[str] = (),
                 topics: Mapping[str, Iterable[str]] | None = None) -> list[Finder]:
    found = [term_detector("term", terms), term_detector("competitor", competitors)]
    found += [term_detector(f"topic:{name}", words) for name, words in (topics or {}).items()]
    return [d for d in found if d is not None]
