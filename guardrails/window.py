"""A held-back window over streamed text: text is released only once no detector can still match across
the boundary, so a span split over any number of chunks is caught whole and never reaches the client.

The window holds back the longest span its detectors declare; a span found inside the releasable part
is redacted there, and one that reaches past the boundary moves the boundary to its start. A few released
characters are kept as left context so a detector's look-behind sees what came before. Pure: the stream
transformer of the guardrails issue wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tollway.guardrails.detectors import Span, detect, longest, redact

CONTEXT = 16  # released characters kept for look-behind


@dataclass(slots=True)
class Window:
    kinds: tuple[str, ...]
    hold: int = 0  # 0: the detectors' longest span
    pending: str = ""
    context: str = ""
    found: list[Span] = field(default_factory=list)  # spans redacted so far (offsets in their window)

    def __post_init__(self) -> None:
        self.hold = self.hold or longest(self.kinds)

    def feed(self, text: str) -> str:
        """Take a chunk; return what may be released now (redacted)."""
        self.pending += text
        return self._release(len(self.pending) - self.hold)

    def end(self) -> str:
        """The stream has ended: release the rest (redacted)."""
        return self._release(len(self.pending))

    def _release(self, cut: int) -> str:
        if cut <= 0:
            return ""
        lead = len(self.context)
        spans = [Span(s.kind, s.start - lead, s.end - lead) for s in detect(self.context + self.pending, self.kinds)
                 if s.end > lead]
        for span in spans:
            if span.start < cut < span.end:  # it may still grow: keep it whole for the next round
                cut = max(span.start, 0)
        if cut <= 0:
            return ""
        inside = [Span(s.kind, max(s.start, 0), s.end) for s in spans if s.end <= cut]
        released = redact(self.pending[:cut], inside)
        self.found += inside
        self.context = (self.context + self.pending[:cut])[-CONTEXT:]
        self.pending = self.pending[cut:]
        return released
