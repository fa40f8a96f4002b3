"""Budget windows: where a minute, hour, day or calendar month (UTC) starts and ends, its label in keys."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True, slots=True)
class Window:
    label: str
    start: datetime | None
    end: datetime | None
    ttl_s: int  # how long the counter outlives now (0: forever)

    def describe(self, period: str) -> str:
        """The window as a person reads it: "day 2026-12-03", "month 2026-12", "hour 2026-12-03 14:00" (UTC)."""
        if self.start is None:
            return "lifetime"
        shape = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d", "month": "%Y-%m"}[period]
        return f"{period} {self.start.strftime(shape)}"

    def bounds(self) -> tuple[datetime, datetime]:
        """[start, end) for queries; a lifetime window spans all time."""
        return (self.start or datetime.min.replace(tzinfo=UTC), self.end or datetime.max.replace(tzinfo=UTC))


def window(period: str, now: datetime) -> Window:
    if period == "lifetime":
        return Window("all", None, None, 0)
    if period == "minute":
        start = now.replace(second=0, microsecond=0)
    elif period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
    elif period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    elif period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    else:
        raise ValueError(f"unknown period {period!r}")
    label, end = _span(period, start)
    # Counters stay an hour past their window, for reconciliation and inspection.
    return Window(label, start, end, int((end - now).total_seconds()) + 3600)


@functools.lru_cache(maxsize=64)
def _span(period: str, start: datetime) -> tuple[str, datetime]:
    """A window's label and end: the same for every request in it (formatting costs more than the rest)."""
    if period == "minute":
        end = start + timedelta(minutes=1)
    elif period == "hour":
        end = start + timedelta(hours=1)
    elif period == "day":
        end = start + timedelta(days=1)
    else:
        end = (start + timedelta(days=32)).replace(day=1)
    return start.strftime("%Y%m%dT%H%M"), end
