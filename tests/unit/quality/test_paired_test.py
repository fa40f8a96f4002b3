"""The paired pass-rate test of a change whose old version answers beside it (a split label, a canary below
100%): its block's ratio against scipy's noncentral hypergeometric, its false drops against a rate estimated
from the old version's past, a burst that hits both versions, a real drop, the two tests a split runs together, and which watches run them."""

from __future__ import annotations

import random

import pytest
from scipy import stats

from tollway.evals.drift import conditional_llr
from tollway.evals.monitor import (
    PAIRED_BLOCK,
    PAIRED_BLOCK_S,
    ConcurrentPassTest,
    DriftSettings,
    PairedPassTest,
    PassTest,
    Scored,
)
from tollway.gateway.quality.watches import Row, Watch

ALPHA = DriftSettings().alpha * DriftSettings().sequential_share


@pytest.mark.parametrize(("x", "n", "held_n", "failures", "odds"), [
    (3, 10, 40, 6, 1.6), (0, 5, 45, 4, 1.6), (7, 25, 25, 12, 2.5), (2, 30, 20, 2, 0.7), (9, 9, 41, 20, 1.6)])
def test_a_blocks_ratio_is_fishers_noncentral_hypergeometric_against_the_central_one(x, n, held_n, failures, odds):
    total = n + held_n
    expected = (stats.nchypergeom_fisher.logpmf(x, total, n, failures, odds)
                - stats.hypergeom.logpmf(x, total, n, failures))
    assert conditional_llr(x, n, held_n, failures, __import__("math").log(odds)) == pytest.approx(expected, abs=1e-9)


def test_a_block_with_one_possible_outcome_says_nothing():
    assert conditional_llr(0, 10, 40, 0, 0.5) == 0.0  # no failure
    assert conditional_llr(3, 10, 0, 3, 0.5) == 0.0  # the old version absent
    assert conditional_llr(0, 0, 40, 3, 0.5) == 0.0  # the new version absent


def _cycle(rng: random.Random, test: PassTest | PairedPassTest | ConcurrentPassTest, new_rate: float,
           old_rate: float, *,
           held_per_new: int = 2, burst: tuple[float, float] | None = None) -> tuple[str, int]:
    """Feed a test samples a minute apart until it decides: the new version's and, for a paired test,
    ``held_per_new`` of the old version's beside each. ``burst``: (start, end) minutes in which both fail
    70% of the time. Returns ("drop" / "no_drop", the new version's samples)."""
    n, minute = 0, 0
    while True:
        minute += 1
        fail_both = burst is not None and burst[0] <= minute < burst[1]
        at = minute * 60.0
        if not isinstance(test, PassTest):
            for _ in range(held_per_new):
                found, ended = test.held(rng.random() < (0.3 if fail_both else old_rate), at)
                if found is not None or ended:
                    return ("drop" if found is not None else "no_drop"), n
        n += 1
        found, ended = test.update(rng.random() < (0.3 if fail_both else new_rate), at)
        if found is not None or ended:
            return ("drop" if found is not None else "no_drop"), n
        assert n < 50_000


def test_an_equally_good_version_is_judged_a_drop_as_rarely_as_alpha_says_whatever_the_estimate():
    """300 of the old version's samples estimate its 90% rate: held to that estimate as if known, an equally
    good new version is judged a drop in about a tenth of the cycles (the estimate came out high); the paired
    test, whose null needs no rate, in about none (alpha: 0.125%)."""
    settings = DriftSettings(evidence_hours=0)
    rng = random.Random(4)
    estimated = paired = 0
    for _ in range(150):
        p0 = sum(rng.random() < 0.9 for _ in range(300)) / 300
        estimated += _cycle(rng, PassTest("pass_rate", p0, ALPHA, settings), 0.9, 0.9)[0] == "drop"
        paired += _cycle(rng, PairedPassTest("pass_rate", p0, ALPHA, settings), 0.9, 0.9)[0] == "drop"
    assert estimated >= 6
    assert paired <= 1


def test_a_burst_that_fails_both_versions_is_not_a_drop_but_a_worse_version_is_found():
    settings = DriftSettings(evidence_hours=0)
    rng = random.Random(6)
    outcomes = [_cycle(rng, PairedPassTest("pass_rate", 0.9, ALPHA, settings), 0.9, 0.9, burst=(30, 150))[0]
                for _ in range(40)]
    assert outcomes.count("drop") == 0
    # without the old version beside it, the same burst against the known rate is a drop in most cycles
    plain = [_cycle(rng, PassTest("pass_rate", 0.9, ALPHA, settings), 0.9, 0.9, burst=(30, 150))[0]
             for _ in range(40)]
    assert plain.count("drop") >= 30
    worse = [_cycle(rng, PairedPassTest("pass_rate", 0.9, ALPHA, settings), 0.85, 0.9) for _ in range(40)]
    assert sum(d == "drop" for d, _ in worse) >= 38


def test_a_split_breaches_only_on_the_paired_test_and_moves_on_when_either_accepts():
    """Held to an estimate that came out 3 points high, the test against it alone judges an equally good
    version a drop in most cycles; the two together never breach on it and still accept. A version 5
    points worse is found, by the paired test."""
    settings = DriftSettings(evidence_hours=0)
    rng = random.Random(12)
    plain = [_cycle(rng, PassTest("pass_rate", 0.93, ALPHA, settings), 0.9, 0.9)[0] for _ in range(30)]
    assert plain.count("drop") >= 20
    both = [_cycle(rng, ConcurrentPassTest("pass_rate", 0.93, ALPHA, settings), 0.9, 0.9)[0] for _ in range(30)]
    assert both.count("drop") == 0
    worse = [_cycle(rng, ConcurrentPassTest("pass_rate", 0.9, ALPHA, settings), 0.85, 0.9)[0] for _ in range(30)]
    assert worse.count("drop") >= 29
    # once the test against the estimate has seen a drop it no longer votes: the paired test decides
    tests = [ConcurrentPassTest("pass_rate", 0.93, ALPHA, settings) for _ in range(10)]
    assert [_cycle(rng, t, 0.9, 0.9)[0] for t in tests] == ["no_drop"] * 10
    outvoted = [t for t in tests if t.outvoted]
    assert len(outvoted) >= 3
    assert all(t.plain.accepted == 0 and t.paired.accepted == 1 for t in outvoted)
    # ... and a "no drop" it had accepted before the drop it saw counts no more
    late = ConcurrentPassTest("pass_rate", 0.98, ALPHA, settings)
    assert _cycle(rng, late, 0.98, 0.98)[0] == "no_drop"
    late.anchor(0.98)
    assert (late.accepted, late.plain.accepted, late.paired.accepted) == (1, 1, 0)
    while not late.outvoted:
        late.update(False, None)
    assert late.accepted == 0
    # where failures are rare the test against the rate accepts first: a rollout moves on as fast as before
    rare = ConcurrentPassTest("pass_rate", 0.98, ALPHA, settings)
    _cycle(rng, rare, 0.98, 0.98)
    assert rare.plain.accepted == 1 and rare.paired.accepted == 0


def test_a_block_closes_when_full_or_when_its_hour_is_over():
    test = PairedPassTest("pass_rate", 0.9, ALPHA, DriftSettings())
    for i in range(PAIRED_BLOCK - 1):
        test.held(True, float(i))
    assert test.blocks == 0
    test.update(False, float(PAIRED_BLOCK))
    assert test.blocks == 1
    test.update(False, 100.0)
    test.held(True, 100.0 + PAIRED_BLOCK_S - 1)
    assert test.blocks == 1
    test.held(True, 100.0 + PAIRED_BLOCK_S)  # its hour is over: the block closes before this sample joins
    assert test.blocks == 2
    assert test.progress() >= 0.0


def _row(i: int, version: str, passed: bool) -> Row:
    return Row(i, 1, "m", None, "faq", "prod", version, Scored(passed=passed, at=60.0 * i))


def _split(settings: DriftSettings, percent: float | None) -> Watch:
    prompt = {"progressive": True, "split": percent is not None, "split_percent": percent or 0}
    return Watch(key="prompt:1:faq:prod:1", kind="prompt", subject="prompt faq@prod", rate_key="prompt:1:faq:prod",
                 tenant_id=1, settings=settings, prompt=prompt,
                 candidate=lambda r: r.prompt_version == "v2", baseline=lambda r: r.prompt_version == "v1")


def test_a_split_below_100_percent_runs_the_paired_test_on_both_versions_a_moved_label_does_not():
    settings = DriftSettings(baseline_samples=200, min_samples=50)
    rng = random.Random(3)
    split, moved, whole = _split(settings, 20.0), _split(settings, None), _split(settings, 100.0)
    assert (split.paired, moved.paired, whole.paired) == (True, False, False)
    i = 0
    for _ in range(200):
        i += 1
        for w in (split, moved, whole):
            w.feed(_row(i, "v1", rng.random() < 0.9))
    for w in (split, moved, whole):
        w.feed(_row(i + 1, "v2", True))
        assert w.test is not None
    assert isinstance(split.test.pass_tests[0], ConcurrentPassTest)  # type: ignore[union-attr]
    assert isinstance(moved.test.pass_tests[0], PassTest)  # type: ignore[union-attr]
    assert isinstance(whole.test.pass_tests[0], PassTest)  # type: ignore[union-attr]
    # the old version's samples after the split began reach the paired test, and decide with the new one's
    paired = split.test.pass_tests[0]  # type: ignore[union-attr]
    decided = False
    for _ in range(20_000):
        i += 1
        version = "v2" if rng.random() < 0.3 else "v1"
        found = split.feed(_row(i, version, rng.random() < 0.9))
        assert found == []
        if split.advances():
            decided = True
            break
    assert decided and paired.accepted >= 1 and split.decided()
    assert len(split.base) > 200  # its baseline grew too: the window tests read it


def test_a_watch_made_from_stored_samples_replays_the_old_version_beside_the_new_one():
    """As ``Monitor._load`` does: the old version's stored samples are the baseline already; replayed in the
    order they answered, they reach the paired test (not the baseline a second time)."""
    settings = DriftSettings(baseline_samples=200, min_samples=50)
    rng = random.Random(21)
    rows = [_row(i, "v1", rng.random() < 0.9) for i in range(300)]
    rows += [_row(300 + i, "v2" if i % 3 == 0 else "v1", rng.random() < 0.9) for i in range(600)]
    split = _split(settings, 20.0)
    for row in rows:
        if row.prompt_version == "v1":
            split.base.append(row.scored)
    held = len(split.base)
    first = next(i for i, row in enumerate(rows) if row.prompt_version == "v2")
    for row in rows[first:]:
        assert split.replay(row) == []
    assert len(split.base) == held
    paired = split.test.pass_tests[0].paired  # type: ignore[union-attr]
    assert paired.blocks == 600 // PAIRED_BLOCK  # both versions' 600 samples (the new one's alone: 200, 4 blocks)
    assert split.test.n == 200  # type: ignore[union-attr]
