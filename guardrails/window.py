"""A held-back window over streamed text: text is released only up to where no detector could still be
forming a span, so a span split over any number of chunks is caught whole and never reaches the client.

Each round the window runs its detectors over the folded text of what it holds (``tollway.guardrails.fold``:
spans hidden by zero-width characters, compatibility forms or JSON escapes are found, and land on the
original characters) (plus a little released text as left context,
for look-behinds) and releases up to the earliest of: where a detector says a span could still be forming
(``Finder.holds``), and the start of any span that reaches past that point. Spans inside the released part
get their action: ``redact`` replaces them, ``log`` lets them through (recorded), ``stop`` ends the answer
before them. A window over a whole-text check (JSON, a hub validator) releases nothing until the end.
Pure: the gateway's output guard wraps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tollway.guardrails.detectors import Finder, Span, redact, spans_of
from tollway.guardrails.fold import fold

CONTEXT = 32  # released characters kept for look-behind


@dataclass(slots=True)
class Release:
    text: str  # may go to the client now
    spans: list[Span] = field(default_factory=list)  # found in what was released (and the stopping one)
    stop: Span | None = None  # a span whose action ends the answer: ``text`` is what came before it


@dataclass(slots=True)
class Window:
    finders: list[Finder]
    action: Callable[[Span], str] = lambda span: "redact"  # 'redact', 'log' or 'stop'
    whole: bool = False  # hold everything until the end
    pending: str = ""
    context: str = ""
    stopped: bool = False

    def feed(self, text: str) -> Release:
        """Take a chunk; return what may be released now."""
        if self.stopped:
            return Release("")
        self.pending += text
        if self.whole:
            return Release("")
        return self._release(final=False)

    def end(self) -> Release:
        """The stream has ended: release the rest."""
        if self.stopped or not self.pending:
            return Release("")
        return self._release(final=True)

    def _release(self, *, final: bool) -> Release:
        lead = len(self.context)
        text = self.context + self.pending
        folded = fold(text, final=final)
        spans = [Span(s.kind, max(s.start - lead, 0), s.end - lead) for s in spans_of(text, self.finders, folded)
                 if s.end > lead]
        cut = len(self.pending)
        if not final:
            # where a span could still be forming, in the folded text, is held back on the original (with
            # the characters folding dropped inside it, and an escape not finished yet)
            cut = min([cut, folded.stop - lead, *(folded.start(f.holds(folded.text)) - lead for f in self.finders)])
        for span in spans:
            if span.start < cut < span.end:  # it may still grow: keep it whole for the next round
                cut = span.start
        if cut <= 0:
            return Release("")
        inside, redacted = [], []
        stop = None
        for span in spans:
            if span.end > cut:
                break
            act = self.action(span)
            if act == "stop":
                stop = span
                break
            inside.append(span)
            if act == "redact":
                redacted.append(span)
        if stop is not None:
            released = redact(self.pending[:stop.start], redacted)
            self.stopped, self.pending = True, ""
            return Release(released, [*inside, stop], stop)
        released = redact(self.pending[:cut], redacted)
        self.context = (self.context + self.pending[:cut])[-CONTEXT:]
        self.pending = self.pending[cut:]
        return Release(released, inside)
