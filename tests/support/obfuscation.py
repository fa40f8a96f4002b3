"""PII written the ways a reader does not see: each (planted text, the kind it is redacted as)."""

from __future__ import annotations


def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


OBFUSCATED = {
    "zero-width joiner after @": ("john\u200d@example.com", "EMAIL"),
    "soft hyphen in the domain": ("john@exam\u00adple.com", "EMAIL"),
    "zero-width spaces in a card": ("4111\u200b1111\u200b1111\u200b1111", "CARD"),
    "full-width digits, ungrouped": ("\uff14" + "\uff11" * 15, "CARD"),
    "full-width at sign": ("john\uff20example.com", "EMAIL"),
    "lowercase IBAN": ("gb82 west 1234 5698 7654 32", "IBAN"),
    "JSON-escaped at sign": ("john\\u0040example.com", "EMAIL"),
    "a wholly escaped email": (_escaped("john@example.com"), "EMAIL"),
    "wholly escaped card digits": (_escaped("4111111111111111"), "CARD"),
}
