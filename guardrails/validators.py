"""Tollway's detectors as guardrails-ai validators, and guardrails-ai without its telemetry.

guardrails-ai sends anonymous spans to its own collector unless ``~/.guardrailsrc`` says otherwise, and
every ``Guard`` reloads that file; at exit its exporter retries for ~20 s when the collector cannot be
reached. ``quiet_guard()`` builds a ``Guard`` that never does: the file is not read, metrics collection is
off for the guard and for the validators it runs (tests watch ``socket.connect``). Inside the gateway's event
loop guardrails-ai's async validator service cannot start a loop of its own: ``GUARDRAILS_RUN_SYNC`` (its
documented switch) makes it validate sequentially instead of warning on every call.
"""

from __future__ import annotations

import os
from typing import Any

from guardrails import Guard, settings
from guardrails.classes.rc import RC
from guardrails.validator_base import FailResult, PassResult, Validator, register_validator
from tollway.guardrails.detectors import PII, detect, redact

_OFF = RC(enable_metrics=False, use_remote_inferencing=False)


class _QuietGuard(Guard):  # type: ignore[misc]
    def _load_rc(self) -> None:  # instead of reading ~/.guardrailsrc
        settings.rc = _OFF


def quiet_guard(*validators: Validator) -> Guard:
    """A Guard running ``validators``, its telemetry off."""
    os.environ.setdefault("GUARDRAILS_RUN_SYNC", "true")
    settings.rc = _OFF
    guard = _QuietGuard()
    guard.configure(allow_metrics_collection=False)
    for validator in validators:
        guard = guard.use(validator)
    return guard


def _result(value: str, kinds: tuple[str, ...], name: str) -> PassResult | FailResult:
    spans = detect(value, kinds)
    if not spans:
        return PassResult()
    found = ", ".join(sorted({s.kind for s in spans}))
    return FailResult(error_message=f"{name}: {len(spans)} span(s) found ({found})", fix_value=redact(value, spans),
                      metadata={"spans": len(spans), "kinds": sorted({s.kind for s in spans})})


@register_validator(name="tollway/pii", data_type="string")
class DetectPII(Validator):  # type: ignore[misc]
    """Emails, phone numbers, payment cards (Luhn), IBANs (mod-97), US SSNs, IP addresses. ``fix``
    redacts them; ``exception`` (Tollway's block) refuses."""

    def __init__(self, kinds: tuple[str, ...] = PII, on_fail: Any = None, **kwargs: Any) -> None:
        settings.rc = _OFF
        super().__init__(on_fail=on_fail, kinds=kinds, **kwargs)
        self.kinds = tuple(kinds)

    def _validate(self, value: Any, metadata: dict[str, Any]) -> PassResult | FailResult:
        return _result(str(value), self.kinds, "pii")


@register_validator(name="tollway/secrets", data_type="string")
class DetectSecrets(Validator):  # type: ignore[misc]
    """API keys, tokens and private keys by their providers' shapes."""

    def __init__(self, on_fail: Any = None, **kwargs: Any) -> None:
        settings.rc = _OFF
        super().__init__(on_fail=on_fail, **kwargs)

    def _validate(self, value: Any, metadata: dict[str, Any]) -> PassResult | FailResult:
        return _result(str(value), ("secret",), "secrets")
