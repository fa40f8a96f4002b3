"""Budget and rate windows: where each one starts and ends, its counter label, and how long the counter lives."""

from datetime import UTC, datetime

import pytest

from tollway.gateway.metering.quota import window


@pytest.mark.parametrize(("period", "now", "label", "start", "end"), [
    ("minute", datetime(2026, 12, 31, 23, 59, 30, 5, tzinfo=UTC), "20261231T2359",
     datetime(2026, 12, 31, 23, 59, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("hour", datetime(2026, 3, 9, 7, 15, tzinfo=UTC), "20260309T0700",
     datetime(2026, 3, 9, 7, tzinfo=UTC), datetime(2026, 3, 9, 8, tzinfo=UTC)),
    ("day", datetime(2028, 2, 28, 12, tzinfo=UTC), "20280228T0000",
     datetime(2028, 2, 28, tzinfo=UTC), datetime(2028, 2, 29, tzinfo=UTC)),
    ("month", datetime(2026, 12, 31, 23, 0, tzinfo=UTC), "20261201T0000",
     datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("month", datetime(2027, 1, 31, tzinfo=UTC), "20270101T0000",
     datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)),
])
def test_windows_start_end_and_label(period, now, label, start, end) -> None:
    win = window(period, now)
    assert (win.label, win.start, win.end) == (label, start, end)
    assert win.ttl_s == int((end - now).total_seconds()) + 3600  # an hour past the window, for reconciliation


def test_the_same_window_later_keeps_its_label_and_a_shorter_ttl() -> None:
    early = window("hour", datetime(2026, 5, 1, 10, 0, 1, tzinfo=UTC))
    late = window("hour", datetime(2026, 5, 1, 10, 59, 59, tzinfo=UTC))
    assert (early.label, early.end) == (late.label, late.end)
    assert (early.ttl_s, late.ttl_s) == (3599 + 3600, 1 + 3600)


def test_lifetime_has_no_bounds_and_never_expires() -> None:
    win = window("lifetime", datetime(2026, 5, 1, tzinfo=UTC))
    assert (win.label, win.start, win.end, win.ttl_s) == ("all", None, None, 0)
    assert win.bounds()[0] < datetime(1900, 1, 1, tzinfo=UTC) < datetime(9000, 1, 1, tzinfo=UTC) < win.bounds()[1]
    with pytest.raises(ValueError, match="fortnight"):
        window("fortnight", datetime(2026, 5, 1, tzinfo=UTC))
