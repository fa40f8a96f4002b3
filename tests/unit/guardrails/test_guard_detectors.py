"""Detectors per kind with positives, near misses and negatives; the guardrails-ai validators built on them;
and guardrails-ai kept from phoning home."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support.obfuscation import OBFUSCATED

from tollway.guardrails.detectors import PII, detect, redact


@pytest.mark.parametrize(("kind", "text", "found"), [
    ("email", "write to jane.doe+news@mail.example.co.uk today", "jane.doe+news@mail.example.co.uk"),
    ("email", "no address in user@localhost", None),
    ("phone", "call +1 415-555-2671 tomorrow", "+1 415-555-2671"),
    ("phone", "call (415) 555-2671 tomorrow", "(415) 555-2671"),
    ("phone", "order 12345 shipped", None),
    ("card", "card 4111 1111 1111 1111 on file", "4111 1111 1111 1111"),
    ("card", "card 5500-0000-0000-0004 on file", "5500-0000-0000-0004"),
    ("card", "order 4111 1111 1111 1112 (fails Luhn)", None),
    ("card", "tracking 1234567890123456", None),
    ("iban", "pay to GB82 WEST 1234 5698 7654 32 now", "GB82 WEST 1234 5698 7654 32"),
    ("iban", "pay to DE89370400440532013000", "DE89370400440532013000"),
    ("iban", "pay to GB82WEST12345698765433 (bad check digits)", None),
    ("ssn", "ssn 536-90-4399 on the form", "536-90-4399"),
    ("ssn", "ssn 000-12-3456 is never issued", None),
    ("ip", "from 203.0.113.7 at noon", "203.0.113.7"),
    ("ip", "version 1.2.3.4.5 and 999.1.1.1", None),
    ("ip", "v6 2001:db8::8a2e:370:7334 here", "2001:db8::8a2e:370:7334"),
    ("secret", "key AKIAIOSFODNN7EXAMPLE in config", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "token ghp_" + "a" * 36 + " leaked", "ghp_" + "a" * 36),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----",
     "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"),
    ("secret", "the word sk-short is not a key", None),
])
def test_each_kind(kind, text, found):
    spans = detect(text, (kind,))
    assert [s.text(text) for s in spans] == ([found] if found else [])


def test_benign_text_has_no_pii():
    text = ("The meeting moved to 3 pm on 2024-05-01. Version 2.4.1 fixed issue #4521; revenue grew 12.5% to "
            "$1,234,567 across 16 regions. See section 4.2.1 and RFC 7231.")
    assert detect(text, (*PII, "secret")) == []


def test_redaction_keeps_the_text_around_the_spans():
    text = "mail jane@example.com or 4111-1111-1111-1111."
    assert redact(text, detect(text, PII)) == "mail [REDACTED:EMAIL] or [REDACTED:CARD]."


def test_validators_fix_and_fail(tmp_path):
    from tollway.guardrails.validators import DetectPII, DetectSecrets, quiet_guard

    text = "mail jane@example.com, key AKIAIOSFODNN7EXAMPLE"
    assert quiet_guard(DetectPII(on_fail="fix")).validate(text).validated_output == \
        "mail [REDACTED:EMAIL], key AKIAIOSFODNN7EXAMPLE"
    assert quiet_guard(DetectSecrets(on_fail="fix")).validate(text).validated_output == \
        "mail jane@example.com, key [REDACTED:SECRET]"
    outcome = quiet_guard(DetectPII(on_fail="noop")).validate("nothing to see")
    assert outcome.validation_passed


def test_guardrails_ai_never_phones_home_and_exits_at_once():
    """A whole process: no connection attempt leaves it, and it does not hang at exit."""
    code = """
import socket
attempts = []
real = socket.socket.connect
def spy(self, address):
    attempts.append(address)
    return real(self, address)
socket.socket.connect = spy
from tollway.guardrails.validators import DetectPII, DetectSecrets, quiet_guard
for v in (DetectPII(on_fail="fix"), DetectSecrets(on_fail="exception")):
    try:
        quiet_guard(v).validate("jane@example.com AKIAIOSFODNN7EXAMPLE")
    except Exception:
        pass
print("connections:", attempts)
"""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "connections: []" in result.stdout
    assert time.monotonic() - started < 10  # with telemetry on, the exporter retries for ~20 s at exit


@pytest.mark.parametrize("planted", ["jane.doe@example.com", "4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32",
                                     "+1 415-555-2671", "AKIAIOSFODNN7EXAMPLE"])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_a_span_split_across_chunks_at_every_offset_never_leaks(planted, size):
    from tollway.guardrails.detectors import finders
    from tollway.guardrails.window import Window

    text = f"Sure. The value is {planted} and nothing else matters here."
    for offset in range(size):  # the chunk boundaries fall at every position of the span
        chunks = [text[:offset], *(text[i:i + size] for i in range(offset, len(text), size))]
        window = Window(finders(("email", "card", "iban", "phone", "secret")))
        released = [window.feed(c).text for c in chunks] + [window.end().text]
        joined = "".join(released)
        assert planted not in joined
        assert "[REDACTED:" in joined
        assert joined.startswith("Sure. The value is [REDACTED:")
        assert joined.endswith("nothing else matters here.")
        assert all(planted[:6] not in piece for piece in released if "[REDACTED" not in piece)


def test_the_window_holds_back_only_what_could_still_become_a_span():
    """Partial matching: plain words are released as soon as they end, not after a fixed hold."""
    from tollway.guardrails.detectors import finders
    from tollway.guardrails.window import Window

    window = Window(finders(("email", "card", "secret")))
    text = "word " * 100
    released = "".join(window.feed(text[i:i + 5]).text for i in range(0, len(text), 5))
    assert text.startswith(released)
    assert len(text) - len(released) <= 5
    assert released + window.end().text == text
    # the start of a private key is held until its end marker arrives (or the stream ends)
    window = Window(finders(("secret",)))
    held = window.feed("key: -----BEGIN RSA PRIVATE KEY-----\nMIIEow")
    assert held.text == "key: "
    rest = window.feed("IBAAKCAQEA7\n-----END RSA PRIVATE KEY----- done").text + window.end().text
    assert rest == "[REDACTED:SECRET] done"


def test_a_stop_action_releases_only_what_came_before_the_span():
    from tollway.guardrails.detectors import finders
    from tollway.guardrails.window import Window

    window = Window(finders(("email",)), action=lambda span: "stop")
    out = window.feed("write to jane@example.com").text + window.feed(" please").text
    assert out == "write to "
    assert window.stopped
    assert window.feed("more").text == ""
    assert window.end().text == ""


# -- obfuscation: found on the folded text, redacted on the original ------------------------------------
@pytest.mark.parametrize("name", list(OBFUSCATED))
@pytest.mark.parametrize("size", [1, 3, None])  # None: the whole text at once (a JSON answer)
def test_obfuscated_pii_is_caught_and_redacted_on_the_original_characters(name, size):
    from tollway.guardrails.detectors import finders
    from tollway.guardrails.window import Window

    planted, kind = OBFUSCATED[name]
    text = f'{{"note": "Sure \u00e9t\u00e9, it is {planted} and that is all."}}'
    expected = f'{{"note": "Sure \u00e9t\u00e9, it is [REDACTED:{kind}] and that is all."}}'
    if size is None:
        assert redact(text, detect(text, PII)) == expected
        return
    for offset in range(size):
        chunks = [text[:offset], *(text[i:i + size] for i in range(offset, len(text), size))]
        window = Window(finders(PII))
        released = [window.feed(c).text for c in chunks] + [window.end().text]
        assert "".join(released) == expected, (name, size, offset)


def test_folding_keeps_benign_text_as_it_is():
    from tollway.guardrails.fold import fold

    for text in ["plain ascii", "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e", "a\\nb \\t tab", "emoji \U0001f600 ok"]:
        folded = fold(text)
        assert folded.text == text
        assert detect(text, PII) == []
    # a lowercase run that only looks like an IBAN (not a registry country, or failing mod-97) is left alone
    assert detect("hash zz12abcdef9876543 and ab12cdef0123456789abcdef01", PII) == []
