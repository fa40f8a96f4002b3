"""Deterministic detectors: text in, spans out. Structured PII is confirmed by its checksum where it has
one (payment cards by Luhn, IBAN by mod-97, US SSNs by their rules, via python-stdnum; phone numbers by
libphonenumber's metadata), so a 16-digit order number is not a card. Secrets by the shapes providers
give their keys. Each detector declares the longest span it can match: a stream holds back that much.

Pure functions of the text; the guardrails-ai validators (``tollway.guardrails.validators``) and the
streaming window build on these.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn


@dataclass(frozen=True, slots=True)
class Span:
    kind: str  # 'email', 'phone', 'card', 'iban', 'ssn', 'ip', 'secret'
    start: int
    end: int

    def text(self, source: str) -> str:
        return source[self.start:self.end]


@dataclass(frozen=True, slots=True)
class Detector:
    kind: str
    find: Callable[[str], Iterator[Span]]
    longest: int  # characters: the longest span it can match (a stream's held-back window)


def _regex(kind: str, pattern: str, check: Callable[[str], bool] | None = None,
           flags: int = 0) -> Callable[[str], Iterator[Span]]:
    compiled = re.compile(pattern, flags)

    def find(text: str) -> Iterator[Span]:
        for m in compiled.finditer(text):
            if check is None or check(m.group(0)):
                yield Span(kind, m.start(), m.end())

    return find


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def _card(value: str) -> bool:
    digits = _digits(value)
    return 13 <= len(digits) <= 19 and digits[0] in "2345689" and luhn.is_valid(digits)


def _iban(value: str) -> bool:
    return bool(iban.is_valid(value))


def _ssn(value: str) -> bool:
    return bool(ssn.is_valid(value))


def _ip(value: str) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)


def _phones(text: str) -> Iterator[Span]:
    for region in ("US", "GB", "DE", "FR", "IN"):  # numbers without a + prefix: the common national formats
        for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            yield Span("phone", match.start, match.end)


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

DETECTORS: dict[str, Detector] = {
    "email": Detector("email", _regex("email", r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                                      r"\.[A-Za-z]{2,24}"), 256),
    "phone": Detector("phone", _phones, 32),
    "card": Detector("card", _regex("card", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])", _card), 40),
    "iban": Detector("iban", _regex("iban", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b", _iban), 48),
    "ssn": Detector("ssn", _regex("ssn", r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)", _ssn), 11),
    "ip": Detector("ip", _regex("ip", r"(?<![\w.:])(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7})"
                                r"(?![\w.:])", _ip), 45),
    "secret": Detector("secret", _regex("secret", "|".join(f"(?:{p})" for p in SECRET_PATTERNS)), 8200),
}
PII = ("email", "phone", "card", "iban", "ssn", "ip")


def detect(text: str, kinds: tuple[str, ...]) -> list[Span]:
    """Spans of the given kinds, left to right; where two overlap, the longer one."""
    spans = sorted((s for kind in kinds for s in DETECTORS[kind].find(text)), key=lambda s: (s.start, -s.end))
    out: list[Span] = []
    for span in spans:
        if out and span.start < out[-1].end:
            if span.end - span.start > out[-1].end - out[-1].start:
                out[-1] = span
            continue
        out.append(span)
    return out


def redact(text: str, spans: list[Span]) -> str:
    """Each span replaced by ``[REDACTED:KIND]``."""
    out, at = [], 0
    for span in spans:
        out += [text[at:span.start], f"[REDACTED:{span.kind.upper()}]"]
        at = span.end
    out.append(text[at:])
    return "".join(out)


def longest(kinds: tuple[str, ...]) -> int:
    return max((DETECTORS[k].longest for k in kinds), default=0)
