"""The text detectors look at, and the way back to the text the client sees.

Obfuscation that a reader does not see must not hide a span from the detectors: zero-width characters and
soft hyphens (``a@\u200dexample.com``, ``exam\u00adple.com``, ``4111\u200b1111...``) are dropped; compatibility
forms are folded by Unicode NFKC (full-width digits and at sign, U+FF10-FF19 and U+FF20); JSON string escapes ``\\uXXXX`` (an email
written ``john\\u0040example.com`` or wholly escaped, as a model may in JSON mode, and surrogate pairs)
are decoded. ``fold`` returns the folded text with, for each of its characters, the range of original
characters it came from, so a span found in the folded text is redacted on the original: what the client
receives keeps every other character as it was.

A stream's window folds what it holds each round; text that ends in the first characters of an escape
(``\\u00``) is folded without them (``final=False``), so a detector sees the span still forming and the
window holds it back. Plain ASCII without escapes (most text) is returned as it is, with no map.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import regex

_DROPPED = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"
_DROP = frozenset(_DROPPED)  # (a character, never a substring of the list)
_SPECIAL = regex.compile(rf"[{_DROPPED}]|\\u[0-9a-fA-F]{{4}}(?:\\u[dD][c-fC-F][0-9a-fA-F]{{2}})?|[^\x00-\x7f]+")
_PARTIAL_ESCAPE = regex.compile(r"\\(?:u[0-9a-fA-F]{0,3})?$")


@dataclass(frozen=True, slots=True)
class Folded:
    text: str
    stop: int  # where the folded original ends (before an unfinished escape, for ``final=False``)
    starts: list[int] | None = None  # per folded character, where its original characters start (None: same)
    ends: list[int] | None = None  # ... and end

    def start(self, i: int) -> int:
        """The original index of folded index ``i`` (``len(text)`` maps to ``stop``)."""
        if self.starts is None:
            return i
        return self.starts[i] if i < len(self.starts) else self.stop

    def end(self, i: int) -> int:
        """The original end of a folded span ending (exclusive) at ``i``."""
        if self.ends is None:
            return i
        return self.ends[i - 1] if i > 0 else 0


def _decode(escape: str) -> str:
    units = [int(escape[k + 2:k + 6], 16) for k in range(0, len(escape), 6)]
    if len(units) == 2:
        return chr(0x10000 + ((units[0] - 0xD800) << 10) + (units[1] - 0xDC00))
    return chr(units[0]) if not 0xD800 <= units[0] <= 0xDFFF else "\ufffd"


def fold(text: str, *, final: bool = True) -> Folded:
    cut = len(text)
    if not final and (partial := _PARTIAL_ESCAPE.search(text)) is not None:
        cut = partial.start()
    if cut == len(text) and text.isascii() and "\\u" not in text:
        return Folded(text, len(text))
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    at = 0
    changed = cut != len(text)
    for m in _SPECIAL.finditer(text, 0, cut):
        if m.start() > at:  # unchanged ASCII between specials
            out.append(text[at:m.start()])
            starts.extend(range(at, m.start()))
            ends.extend(range(at + 1, m.start() + 1))
        piece = m.group()
        if piece in _DROP:
            changed = True
        elif piece.startswith("\\u"):
            out.append(_decode(piece))
            starts.append(m.start())
            ends.append(m.end())
            changed = True
        elif unicodedata.is_normalized("NFKC", piece) and _DROP.isdisjoint(piece):
            out.append(piece)
            starts.extend(range(m.start(), m.end()))
            ends.extend(range(m.start() + 1, m.end() + 1))
        else:
            for k, char in enumerate(piece, m.start()):
                if char in _DROP:
                    continue
                folded = unicodedata.normalize("NFKC", char)
                out.append(folded)
                starts.extend([k] * len(folded))
                ends.extend([k + 1] * len(folded))
            changed = True
        at = m.end()
    if at < cut:
        out.append(text[at:cut])
        starts.extend(range(at, cut))
        ends.extend(range(at + 1, cut + 1))
    if not changed:
        return Folded(text, len(text))
    return Folded("".join(out), cut, starts, ends)
