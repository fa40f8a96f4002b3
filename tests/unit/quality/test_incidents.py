"""Upstream incidents: failed attempts far above a model's usual share set its samples aside."""

from __future__ import annotations

import random

from tollway.evals import DriftSettings, SamplingPolicy, Scored
from tollway.gateway.quality.incidents import BUCKET_S, KEEP_S, Incidents, IncidentSettings
from tollway.gateway.quality.watches import Row, Watches


def test_a_bucket_is_an_incident_by_its_failures_and_their_share_of_the_requests():
    inc = Incidents(IncidentSettings(min_failures=3, share=0.05))
    b = 1000
    inc.failed("m", b, 2)
    assert not inc.incident("m", b)  # under the minimum
    inc.failed("m", b, 3)
    assert inc.incident("m", b)  # a quiet bucket: no samples, the minimum is enough
    for i in range(4):  # four samples at 2%: about 200 requests, of which 3 failed is 1.5%
        inc.sampled("m", b * BUCKET_S + i, 0.02)
    assert not inc.incident("m", b)
    inc.failed("m", b, 10)  # 5% of 200
    assert inc.incident("m", b)
    assert not inc.incident("other", b)  # per model
    inc.failed("m", b, 0)
    assert not inc.incident("m", b) and not inc.failures["m"]


def test_a_sample_within_one_bucket_of_an_incident_is_covered():
    inc = Incidents(IncidentSettings(min_failures=3, share=0.05))
    b = 500
    inc.failed("m", b, 5)
    start = b * BUCKET_S
    assert inc.covers("m", start - BUCKET_S)  # the bucket before (the first bad answers before the failures count)
    assert inc.covers("m", start + 10)
    assert inc.covers("m", start + 2 * BUCKET_S - 1)  # the bucket after (the tail)
    assert not inc.covers("m", start - BUCKET_S - 1)
    assert not inc.covers("m", start + 2 * BUCKET_S)
    assert not inc.covers("m", None)  # a sample with no time is never set aside
    assert not inc.covers("n", start)
    assert inc.windows("m") == [(start - BUCKET_S, start + 2 * BUCKET_S)]
    inc.failed("m", b + 2, 4)  # the windows of two incident buckets a bucket apart run together
    assert inc.windows("m") == [(start - BUCKET_S, start + 4 * BUCKET_S)]


def test_incidents_are_off_with_a_minimum_of_zero_and_old_ones_are_forgotten():
    off = Incidents(IncidentSettings(min_failures=0))
    off.failed("m", 10, 1000)
    assert not off.covers("m", 10 * BUCKET_S)
    inc = Incidents()
    inc.failed("m", 10, 50)
    inc.sampled("m", 10 * BUCKET_S, 0.5)
    inc.forget(10 * BUCKET_S + KEEP_S - 1)
    assert inc.covers("m", 10 * BUCKET_S)
    inc.forget(12 * BUCKET_S + KEEP_S)
    assert not inc.covers("m", 10 * BUCKET_S) and not inc.failures and not inc.requests


def _row(i: int, passed: bool, at: float) -> Row:
    return Row(i, 1, "m", None, None, None, None, Scored(passed=passed, output_chars=400.0, tokens=100.0,
                                                        cost=1e-4, at=at, rate=0.02))


def test_a_burst_of_failures_inside_an_incident_raises_no_alarm_and_a_lasting_drop_still_does():
    """A steady route at 90%, then an hour in which 70% of answers fail, with no rise limit (evidence per
    sample): the burst alone is an alarm; the same burst while the upstream fails its attempts is set aside.
    After the incident a lasting drop is still found."""
    settings = DriftSettings(window=200, evidence_hours=0)

    def run(failing_attempts: bool, drop_after: bool) -> tuple[list[str], int]:
        rng = random.Random(3)
        core = Watches(settings, SamplingPolicy(ceiling=0.02))
        at, i, found = 0.0, 0, []
        for _ in range(settings.baseline_samples + 1000):  # a sample a minute
            at += 60
            i += 1
            if (route := core.route(r := _row(i, rng.random() < 0.9, at))) is not None:
                core.start(route, [])
            core.feed(r)
        burst_end = at + 3600
        while at < burst_end:
            at += 6
            i += 1
            if failing_attempts:  # each sample stands for 50 requests (2%); 5 of them failed an attempt
                b = Incidents.bucket(at)
                core.incidents.failed("m", b, core.incidents.failures.get("m", {}).get(b, 0) + 5)
            found += [f.detector for _, fs in core.feed(_row(i, rng.random() < 0.3, at)) for f in fs]
        if drop_after:
            for _ in range(3000):
                at += 60
                i += 1
                found += [f.detector for _, fs in core.feed(_row(i, rng.random() < 0.8, at)) for f in fs]
        return found, core.incidents.set_aside

    alone, _ = run(False, False)
    assert "pass_rate" in alone
    marked, set_aside = run(True, False)
    assert "pass_rate" not in marked and set_aside == 600
    after, _ = run(True, True)
    assert "pass_rate" in after
