"""Upstream incidents: the minutes in which a model's upstream failed attempts stand far above their usual
share. An upstream hiccup (a saturated or restarting vLLM, a provider's bad minutes) fails attempts and
degrades the answers that do come back; those answers are evidence about the upstream, not about the
route, so the monitor sets them aside: a sample answered within one bucket of an incident bucket of its
model feeds no watch (no detector, no baseline). A lasting drop is found from the samples outside.

A bucket (``BUCKET_S``) of one model is an incident when its failed attempts (the ledger's ``attempt``
rows, which the gateway writes for every attempt that failed before anything reached the client) reach
``min_failures`` and ``share`` of the model's requests in it. The requests are estimated from the
samples as they come (each stands for 1 / its sampling rate), so a busy model's usual trickle of
failures never marks its peak hours, and a quiet model's night needs only ``min_failures``.

A hiccup that answers 200 with bad text leaves no failed attempt: it is not marked here, and the pass-rate
test's rise limit (``evidence_hours``) is what keeps it from raising an alarm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

BUCKET_S = 300.0
V = TypeVar("V")
KEEP_S = 8 * 86400.0  # incidents older than this are forgotten (a route quiet longer is rebuilt anyway)


@dataclass(frozen=True, slots=True)
class IncidentSettings:
    min_failures: int = 3  # failed attempts of one model in a bucket before it can be an incident (0: off)
    share: float = 0.05  # ... and at least this share of its requests in that bucket


class Incidents:
    """Per model, failed attempts and estimated requests per bucket; which samples fall in an incident."""

    def __init__(self, settings: IncidentSettings | None = None) -> None:
        self.settings = settings or IncidentSettings()
        self.failures: dict[str, dict[int, int]] = {}
        self.requests: dict[str, dict[int, float]] = {}
        self.set_aside = 0  # samples that fed no watch
        self._oldest = -1  # the oldest bucket kept (``forget``)

    @staticmethod
    def bucket(at: float) -> int:
        return int(at // BUCKET_S)

    def failed(self, model: str, bucket: int, count: int) -> None:
        """The failed attempts of ``model`` counted in ``bucket`` so far (replaces the bucket's count)."""
        if count:
            self.failures.setdefault(model, {})[bucket] = count
        else:
            self.failures.get(model, {}).pop(bucket, None)

    def sampled(self, model: str, at: float | None, rate: float | None) -> None:
        """A sample of ``model``'s traffic: the requests it stands for count in its bucket."""
        if at is not None and rate:
            per = self.requests.setdefault(model, {})
            b = self.bucket(at)
            per[b] = per.get(b, 0.0) + 1.0 / rate

    def incident(self, model: str, bucket: int) -> bool:
        failures = self.failures.get(model, {}).get(bucket, 0)
        return (failures >= self.settings.min_failures
                and failures >= self.settings.share * self.requests.get(model, {}).get(bucket, 0.0))

    def covers(self, model: str, at: float | None) -> bool:
        """Whether a sample of ``model`` answered at ``at`` falls within one bucket of an incident."""
        if at is None or self.settings.min_failures <= 0 or model not in self.failures:
            return False
        b = self.bucket(at)
        return self.incident(model, b - 1) or self.incident(model, b) or self.incident(model, b + 1)

    def forget(self, now: float) -> None:
        oldest = self.bucket(now - KEEP_S)
        if oldest <= self._oldest:  # once per bucket at most
            return
        self._oldest = oldest
        self.failures = _since(self.failures, oldest)
        self.requests = _since(self.requests, oldest)

    def windows(self, model: str) -> list[tuple[float, float]]:
        """The incident windows of ``model`` as (start, end) epoch seconds, pads included (for the API)."""
        out: list[tuple[float, float]] = []
        for b in sorted(b for b in self.failures.get(model, {}) if self.incident(model, b)):
            start, end = (b - 1) * BUCKET_S, (b + 2) * BUCKET_S
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out


def _since(table: dict[str, dict[int, V]], oldest: int) -> dict[str, dict[int, V]]:
    kept = {model: {b: v for b, v in per.items() if b >= oldest} for model, per in table.items()}
    return {model: per for model, per in kept.items() if per}
