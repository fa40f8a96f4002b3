"""Deterministic detectors: text in, spans out. Structured PII is confirmed by its checksum where it has
one (payment cards by Luhn, IBAN by mod-97, US SSNs by their rules, Spanish, Indian and Italian
national ids by their check characters, via python-stdnum; phone numbers by
libphonenumber's metadata), so a 16-digit order number is not a card. Secrets by the shapes providers
give their keys.

Every detector also says where a span could still be forming at the end of a text (``holds``): a stream
releases text only up to there. For pattern detectors that is ``regex``'s partial matching (the earliest
match that runs into the end of the text, complete or not), so a stream holds back a few characters, not
the longest span a pattern allows.

Pure functions of the text; the guardrails-ai validators (``tollway.guardrails.validators``) and the
streaming window build on these.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import phonenumbers
import regex
from stdnum import luhn
from stdnum.es import dni
from stdnum.in_ import aadhaar
from stdnum.it import codicefiscale
from stdnum.us import ssn

from tollway.guardrails.fold import Folded, fold


@dataclass(frozen=True, slots=True)
class Span:
    kind: str  # 'email', 'phone', 'card', 'iban', 'ssn', 'ip', 'secret'
    start: int
    end: int

    def text(self, source: str) -> str:
        return source[self.start:self.end]


class Finder(Protocol):
    """What a stream's window needs of a detector."""

    @property
    def kind(self) -> str: ...

    def find(self, text: str) -> list[Span]: ...

    def holds(self, text: str) -> int:
        """The earliest index from which a span could still form if more text came (``len(text)``: none)."""
        ...


@dataclass(frozen=True, slots=True)
class Detector:
    """A pattern, with an optional check of each match (a checksum)."""

    kind: str
    pattern: regex.Pattern[str]
    check: Callable[[str], bool] | None = None

    shrink: bool = False  # a match failing its check may be a shorter one followed by more words

    def find(self, text: str) -> list[Span]:
        out = []
        for m in self.pattern.finditer(text):
            if self.check is None or self.check(m.group(0)):
                out.append(Span(self.kind, m.start(), m.end()))
            elif self.shrink and (end := self._shorter(text, m.start(), m.end())) is not None:
                out.append(Span(self.kind, m.start(), end))
        return out

    def _shorter(self, text: str, start: int, end: int) -> int | None:
        """The longest prefix of a failed match that ends a word and passes the check (``gb82 west ... 32
        now`` in any case: the pattern's last groups took ``now``)."""
        assert self.check is not None
        for stop in range(end - 1, start, -1):
            if text[stop - 1].isalnum() and not text[stop].isalnum() and self.check(text[start:stop]):
                return stop
        return None

    def holds(self, text: str) -> int:
        # A match may still grow (or pass its check with more digits) if one starting where it starts could
        # run to the end of the text: "GB82 WEST 1234 " followed by more groups.
        end = len(text)
        return min((m.start() for m in self.pattern.finditer(text, partial=True)
                    if m.end() == end or (end - m.end() <= 8
                                          and self.pattern.fullmatch(text, m.start(), partial=True) is not None)),
                   default=end)


@dataclass(frozen=True, slots=True)
class PhoneDetector:
    """libphonenumber's matcher over the runs of digits and separators that could be a number, in the common
    national formats (US, GB, DE, FR, IN) and international ones. A bare run of digits must be a valid
    number (an order number is not a phone); a run written like a phone number (a + prefix, parentheses,
    separators between groups, an extension) needs only a possible one, which catches numbers from ranges
    libphonenumber does not list. Runs of fewer than 7 digits (postcodes) and dotted quads (IP addresses) are
    not numbers. Memoised per run: a stream's window sees the same run again while it holds it back; a
    stream holds back a trailing run that looks like the start of a number."""

    kind: str = "phone"

    def find(self, text: str) -> list[Span]:
        return [Span(self.kind, m.start() + a, m.start() + b) for m in _PHONE_CANDIDATE.finditer(text)
                for a, b in _numbers(m.group())]

    def holds(self, text: str) -> int:
        return min((m.start() for m in _PHONE_RUN.finditer(text, partial=True) if m.end() == len(text)),
                   default=len(text))


_PHONE_RUN = regex.compile(r"[+(]?\d[\d ().x-]{0,28}")
_PHONE_CANDIDATE = regex.compile(r"(?<![\w+])(?<!\d\.)[+(]?\d[\d ().-]{4,24}\d(?:\)|\s?(?:x|ext\.?)\s?\d{1,6})?"
                                 r"(?!\w)(?!\.\d)")
# dotted quads (IP addresses), dates, and the US SSN shape are written like numbers but are not phones
_NOT_A_PHONE = regex.compile(r"^(?:\d{1,3}(?:\.\d{1,3}){3}|\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}"
                             r"|\d{3}-\d{2}-\d{4})$")
_REGIONS = ("US", "GB", "DE", "FR", "IN")


@lru_cache(maxsize=4096)
def _numbers(run: str) -> tuple[tuple[int, int], ...]:
    digits = sum(c.isdigit() for c in run)
    if digits < 7 or _NOT_A_PHONE.match(run):
        return ()
    formatted = digits >= 9 and not run.isdigit()
    leniency = phonenumbers.Leniency.POSSIBLE if formatted else phonenumbers.Leniency.VALID
    found = {(m.start, m.end) for region in _REGIONS
             for m in phonenumbers.PhoneNumberMatcher(run, region, leniency=leniency)}
    return tuple(sorted(found))


def pattern(kind: str, source: str, check: Callable[[str], bool] | None = None, flags: int = 0,
            shrink: bool = False) -> Detector:
    return Detector(kind, regex.compile(source, flags), check, shrink)


def _digits(value: str) -> str:
    return str(regex.sub(r"\D", "", value))


def _card(value: str) -> bool:
    """Luhn-valid, 13-19 digits from a card network's ranges; Maestro (50, 56-69, 0604) also has 12; JCB's
    15-digit 1800 and 2131."""
    digits = _digits(value)
    if not luhn.is_valid(digits):
        return False
    if digits[:4] in ("1800", "2131"):
        return len(digits) == 15
    if digits[:2] == "50" or "56" <= digits[:2] <= "69" or digits[:4] == "0604":
        return 12 <= len(digits) <= 19
    return 13 <= len(digits) <= 19 and digits[0] in "23456"


@lru_cache(maxsize=1)
def _iban_countries() -> frozenset[str]:
    """The country codes of SWIFT's IBAN registry (python-stdnum's copy)."""
    from importlib.resources import files

    text = files("stdnum").joinpath("iban.dat").read_text()
    return frozenset(line[:2] for line in text.splitlines() if regex.match(r"[A-Z]{2} ", line))


def _iban(value: str) -> bool:
    """ISO 13616's mod-97 check over the rearranged number, in any case (``gb82west...`` is the same account),
    from a country in the IBAN registry (not each country's length and format: a malformed IBAN that passes
    mod-97 is still an account number)."""
    compact = value.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34 or compact[:2] not in _iban_countries():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ssn(value: str) -> bool:
    return bool(ssn.is_valid(value))


def _national_id(value: str) -> bool:
    """Spain's DNI (check letter), India's Aadhaar (Verhoeff), Italy's codice fiscale (check letter)."""
    return any(module.is_valid(value) for module in (dni, aadhaar, codicefiscale))


def _ip(value: str) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)


# Provider key shapes (as published by the providers; detect-secrets' plugins list the same families).
SECRET_PATTERNS = (
    r"AKIA[0-9A-Z]{16}",                                   # AWS access key id
    r"(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}",        # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{22,255}",
    r"xox[abposr]-[A-Za-z0-9-]{10,250}",                   # Slack
    r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,200}",            # OpenAI / Anthropic style
    r"(?:sk|rk)_live_[A-Za-z0-9]{16,250}",                 # Stripe
    r"AIza[0-9A-Za-z_-]{35}",                              # Google API key
    r"tw-[A-Za-z0-9_-]{40,50}",                            # Tollway keys
    r"eyJ[A-Za-z0-9_-]{8,2000}\.eyJ[A-Za-z0-9_-]{8,4000}\.[A-Za-z0-9_-]{8,2000}",  # JWT
    r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----[\s\S]{16,8000}?-----END [A-Z ]{0,40}PRIVATE KEY-----",
)

DETECTORS: dict[str, Finder] = {
    "email": pattern("email", r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}"),
    "phone": PhoneDetector(),
    "card": pattern("card", r"(?<![\d-])\d(?:[ -]?\d){11,18}(?![\d-])", _card),
    "iban": pattern("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", _iban, regex.IGNORECASE, shrink=True),
    "ssn": pattern("ssn", r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)", _ssn),
    "national_id": pattern("national_id", r"(?<![\w+-])(?:\d{8}-?[A-Z]|[2-9]\d{3} ?\d{4} ?\d{4}"
                           r"|[A-Z]{6}\d{2}[A-Z]\d{2}[A-Z]\d{3}[A-Z])(?![\w-])", _national_id),
    "ip": pattern("ip", r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})(?![\w.:])",
                  _ip),
    "secret": pattern("secret", "|".join(f"(?:{p})" for p in SECRET_PATTERNS)),
}
# Where two detectors find the same span, the earlier one here names it: checksummed types before phone.
PII = ("email", "card", "iban", "ssn", "national_id", "ip", "phone")


def finders(kinds: tuple[str, ...]) -> list[Finder]:
    return [DETECTORS[k] for k in kinds]


def detect(text: str, kinds: tuple[str, ...]) -> list[Span]:
    return spans_of(text, finders(kinds))


def spans_of(text: str, found_by: list[Finder], folded: Folded | None = None) -> list[Span]:
    """Spans found by any of ``found_by`` in the folded text (``tollway.guardrails.fold``: zero-width
    characters dropped, NFKC, JSON escapes decoded), left to right, where two overlap the longer one, each
    mapped back onto ``text``."""
    folded = folded or fold(text)
    spans = sorted((s for f in found_by for s in f.find(folded.text)), key=lambda s: (s.start, -s.end))
    out: list[Span] = []
    for span in spans:
        if out and span.start < out[-1].end:
            if span.end - span.start > out[-1].end - out[-1].start:
                out[-1] = span
            continue
        out.append(span)
    if folded.starts is None:
        return out
    return [Span(s.kind, folded.start(s.start), folded.end(s.end)) for s in out]


def redact(text: str, spans: list[Span]) -> str:
    """Each span replaced by ``[REDACTED:KIND]``."""
    out, at = [], 0
    for span in spans:
        out += [text[at:span.start], f"[REDACTED:{span.kind.split(':')[0].upper()}]"]
        at = span.end
    out.append(text[at:])
    return "".join(out)
