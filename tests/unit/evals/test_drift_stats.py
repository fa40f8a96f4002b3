"""The drift statistics against known values and seeded simulations (groundwork for the live quality loop)."""

from __future__ import annotations

import math
import random

import pytest

from tollway.evals.drift import BernoulliCUSUM, BernoulliMSPRT, BernoulliSPRT, cusum_threshold, ks, psi


def test_sprt_expected_samples_match_walds_formula():
    test = BernoulliSPRT(0.90, 0.85, alpha=0.01, beta=0.05)
    kl_10 = 0.85 * math.log(0.85 / 0.90) + 0.15 * math.log(0.15 / 0.10)  # KL(p1 || p0)
    expected = (0.05 * math.log(0.05 / 0.99) + 0.95 * math.log(0.95 / 0.01)) / kl_10
    assert test.expected_samples("h1") == pytest.approx(expected)
    assert 300 < test.expected_samples("h1") < 400
    assert 200 < test.expected_samples("h0") < 300


def _run(p: float, rng: random.Random, limit: int = 20_000) -> tuple[str | None, int]:
    test = BernoulliSPRT(0.90, 0.85, alpha=0.01, beta=0.05)
    for n in range(1, limit + 1):
        decided = test.update(rng.random() < p)
        if decided is not None:
            return decided, n
    return None, limit


def test_sprt_error_rates_and_sample_sizes_hold_in_simulation():
    rng = random.Random(7)
    under_h0 = [_run(0.90, rng) for _ in range(400)]
    under_h1 = [_run(0.85, rng) for _ in range(400)]
    false_alarms = sum(d == "drop" for d, _ in under_h0) / len(under_h0)
    misses = sum(d == "no_drop" for d, _ in under_h1) / len(under_h1)
    assert false_alarms <= 0.03 and misses <= 0.10  # alpha 0.01, beta 0.05, with simulation slack
    mean_n = sum(n for _, n in under_h1) / len(under_h1)
    assert mean_n == pytest.approx(BernoulliSPRT(0.90, 0.85).expected_samples("h1"), rel=0.25)


def test_cusum_threshold_solves_siegmunds_formula_and_the_recursion_restarts_at_zero():
    test = BernoulliCUSUM(0.90, 0.85, arl0=80_000)
    kl0 = 0.90 * math.log(0.90 / 0.85) + 0.10 * math.log(0.10 / 0.15)
    assert test.kl0() == pytest.approx(kl0)
    assert (math.exp(test.h) - test.h - 1) / kl0 == pytest.approx(80_000, rel=1e-6)
    assert cusum_threshold(160_000, kl0) > test.h  # fewer false alarms: a higher bar
    fail, ok = math.log(0.15 / 0.10), math.log(0.85 / 0.90)
    test.update(False)
    test.update(True)
    assert test.llr == pytest.approx(fail + ok)
    assert test.run == 2
    for _ in range(20):
        test.update(True)
    assert test.llr == 0.0 and test.run == 0  # passes never push it below zero


def _cusum_run(p: float, test: BernoulliCUSUM, rng: random.Random) -> int:
    test.restart()
    n = 0
    while True:
        n += 1
        if test.update(rng.random() < p):
            return n


def test_cusum_false_alarm_run_and_delay_hold_in_simulation():
    rng = random.Random(13)
    test = BernoulliCUSUM(0.90, 0.85, arl0=5_000)
    arl0 = sum(_cusum_run(0.90, test, rng) for _ in range(200)) / 200
    assert 0.7 * 5_000 < arl0 < 1.6 * 5_000  # Siegmund's approximation, with simulation slack
    delay = sum(_cusum_run(0.85, test, rng) for _ in range(400)) / 400
    assert delay == pytest.approx(test.expected_delay(), rel=0.2)


def test_msprt_is_always_valid_under_h0_and_finds_a_drop():
    rng = random.Random(11)
    alarms = 0
    for _ in range(300):
        test = BernoulliMSPRT(0.90, alpha=0.05)
        alarms += any(test.update(rng.random() < 0.90) for _ in range(1500))  # looking after every sample
    assert alarms / 300 <= 0.05
    found = []
    for _ in range(100):
        test = BernoulliMSPRT(0.90, alpha=0.05)
        found.append(next((n for n in range(1, 5001) if test.update(rng.random() < 0.85)), None))
    assert sum(f is not None for f in found) >= 95
    assert test.p_value() <= 0.05


def test_psi_matches_the_hand_computed_value():
    expected = ["a"] * 50 + ["b"] * 50
    actual = ["a"] * 30 + ["b"] * 70
    by_hand = (0.3 - 0.5) * math.log(0.3 / 0.5) + (0.7 - 0.5) * math.log(0.7 / 0.5)
    assert psi(expected, actual) == pytest.approx(by_hand)
    assert psi(expected, expected) == 0.0


def test_ks_separates_shifted_samples():
    rng = random.Random(3)
    base = [rng.gauss(100, 20) for _ in range(500)]
    same = [rng.gauss(100, 20) for _ in range(500)]
    shifted = [rng.gauss(120, 20) for _ in range(500)]
    assert ks(base, same).p_value > 0.01
    assert ks(base, shifted).p_value < 1e-6
