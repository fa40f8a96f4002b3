"""The live loop's detectors and checks: against scipy as the reference, planted changes, a long seeded run of
unchanged traffic, the sampling policy, and the reference-free checks of one answer."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from tollway.evals.checks import Answer
from tollway.evals.live import check_answer, grounding
from tollway.evals.monitor import (
    DriftSettings,
    RouteTest,
    SamplingPolicy,
    Scored,
    SteadyWatch,
    chi_squared,
    rise_p_value,
)


def draw(rng: random.Random, *, pass_rate: float = 0.9, token_scale: float = 1.0, refusal: float = 0.03) -> Scored:
    tokens = rng.lognormvariate(math.log(400), 0.5) * token_scale
    return Scored(passed=rng.random() < pass_rate, refusal=rng.random() < refusal, guard_failed=rng.random() < 0.01,
                  output_chars=tokens * 2, tokens=tokens, cost=tokens * 2e-6)


def test_rise_p_value_is_fishers_one_sided_exact_test():
    for table in ([[30, 170], [50, 950]], [[3, 37], [2, 98]]):
        fisher = stats.fisher_exact(table, alternative="greater").pvalue
        (hits, misses), (base_hits, base_misses) = table
        assert rise_p_value(base_hits, base_hits + base_misses, hits, hits + misses) == pytest.approx(fisher)
    assert rise_p_value(50, 1000, 5, 200) == 1.0  # a fall is not a rise
    chi = stats.chi2_contingency([[30, 170], [50, 950]], correction=True).statistic
    assert chi_squared(50, 1000, 30, 200) == pytest.approx(chi)


def test_the_rise_test_keeps_its_false_alarm_rate_for_a_rare_rate():
    # 3% refusals, 200-sample windows against a 5000-sample baseline, alpha 0.00025 (a window test's share):
    # the exact test stays under its nominal rate; the halved chi-squared approximation rejected 26 where
    # 10 were nominal on these draws
    import numpy as np

    rng = np.random.default_rng(3)
    alpha, windows = 0.00025, 40_000
    base, hits = rng.binomial(5000, 0.03, windows), rng.binomial(200, 0.03, windows)
    assert rise_p_value(int(base.min()), 5000, 9, 200) > 100 * alpha  # fewer than 10 can never reject here
    rejected = sum(rise_p_value(int(b), 5000, int(h), 200) < alpha for b, h in zip(base, hits, strict=True) if h >= 10)
    assert rejected <= 1.3 * alpha * windows


def test_a_planted_drop_is_found_by_the_sprt_and_the_alpha_is_split():
    rng = random.Random(3)
    settings = DriftSettings(window=200)
    test = RouteTest([draw(rng) for _ in range(2000)], settings)
    assert test.detectors[0] == "pass_rate"
    assert "tokens" in test.detectors
    assert "refusal" in test.detectors
    assert test.pass_tests[0].alpha == pytest.approx(settings.alpha / 2)
    assert test.window_alpha * len(test.windowed) == pytest.approx(settings.alpha / 2)
    for n in range(1, 5000):  # noqa: B007  (n is read after the loop)
        if found := test.update(draw(rng, pass_rate=0.80)):
            break
    assert found[0].detector == "pass_rate"
    assert found[0].test == "sprt"
    assert n < 1500
    assert found[0].statistic >= found[0].threshold
    assert found[0].baseline == pytest.approx(0.9, abs=0.02)


def test_a_steady_route_finds_a_drop_that_starts_at_any_time_with_the_cusum():
    rng = random.Random(6)
    settings = DriftSettings(window=200)
    watch = SteadyWatch(settings)
    for _ in range(settings.baseline_samples + 3000):  # long unchanged traffic first: the drop starts mid-run
        assert watch.observe(draw(rng)) == []
    assert watch.test is not None
    cusum = watch.test.pass_tests[0].cusum
    assert cusum is not None
    assert cusum.arl0 == pytest.approx(settings.window / (settings.alpha / 2))
    for n in range(1, 5000):  # noqa: B007  (n is read after the loop)
        if found := [f for f in watch.observe(draw(rng, pass_rate=0.80)) if f.detector == "pass_rate"]:
            break
    assert found[0].test == "cusum"
    assert found[0].statistic >= found[0].threshold == pytest.approx(cusum.h)
    # the evidence is the run since the statistic last stood at zero (it may have begun before the drop)
    assert found[0].samples > 0
    assert found[0].current < found[0].baseline
    assert n < 1500
    assert watch.test is None  # the route starts over on its new baseline


def test_a_token_rise_is_found_by_ks():
    rng = random.Random(5)
    test = RouteTest([draw(rng) for _ in range(2000)], DriftSettings(window=200))
    found = []
    for _ in range(2000):
        found = test.update(draw(rng, token_scale=1.3))
        if found:
            break
    assert {f.detector for f in found} & {"tokens", "output_chars", "cost"}
    tokens = next(f for f in found if f.test == "ks")
    assert tokens.p_value is not None
    assert tokens.p_value < tokens.threshold
    assert tokens.current > tokens.baseline


def test_a_refusal_rise_is_found():
    rng = random.Random(8)
    test = RouteTest([draw(rng) for _ in range(2000)], DriftSettings(window=200, pass_drop=None))
    found = []
    for _ in range(1000):
        if found := [f for f in test.update(draw(rng, refusal=0.15)) if f.detector == "refusal"]:
            break
    assert found
    assert found[0].test == "rise"
    assert found[0].extra["psi"] > 0


def test_no_alarm_on_a_long_seeded_run_of_unchanged_traffic():
    rng = random.Random(2026)
    watch = SteadyWatch(DriftSettings())
    alarms = [f for _ in range(20_000) for f in watch.observe(draw(rng))]  # about 100 days at 2% of 10k/day
    assert alarms == []
    assert watch.test is not None
    assert watch.test.n == 20_000 - DriftSettings().baseline_samples


def test_the_msprt_stays_quiet_on_an_improvement_and_fires_on_a_drop():
    rng = random.Random(4)
    settings = DriftSettings(pass_drop=None)
    better = RouteTest([draw(rng) for _ in range(1000)], settings)
    assert not any(f.detector == "pass_rate" for _ in range(3000) for f in better.update(draw(rng, pass_rate=0.99)))
    worse = RouteTest([draw(rng) for _ in range(1000)], settings)
    hits = [f for _ in range(3000) for f in worse.update(draw(rng, pass_rate=0.75)) if f.detector == "pass_rate"]
    assert hits
    assert hits[0].test == "msprt"
    assert hits[0].p_value is not None
    assert hits[0].p_value <= 0.0025


def test_no_regression_needs_samples_and_an_accepted_cycle():
    rng = random.Random(9)
    test = RouteTest([draw(rng) for _ in range(500)], DriftSettings(min_samples=100, pass_drop=0.2))
    for _ in range(99):
        test.update(draw(rng))
    assert not test.no_regression()  # 99 samples: not yet
    for _ in range(300):
        test.update(draw(rng))
    assert test.pass_tests[0].accepted > 0
    assert test.no_regression()


def test_the_sampling_rate_rises_with_progress_and_is_bounded():
    policy = SamplingPolicy(base=0.02, ceiling=0.25, start=0.15, full=0.45)
    assert policy.rate(0) == policy.rate(0.15) == 0.02
    assert policy.rate(0.3) == pytest.approx(0.02 + 0.23 / 2)
    assert policy.rate(0.45) == policy.rate(1.0) == 0.25
    rng = random.Random(1)
    test = RouteTest([draw(rng) for _ in range(1000)], DriftSettings())
    progress = []
    for _ in range(300):
        test.update(draw(rng, pass_rate=0.8))
        progress.append(test.progress())
    assert max(progress) > 0.45  # a real drop drives the rate to its bound before the alarm


def test_reference_free_checks():
    ok = check_answer(Answer("Paris is the capital of France.", {"choices": [{"finish_reason": "stop"}]}))
    assert ok.passed
    assert not ok.refusal
    refused = check_answer(Answer("I'm sorry, I can't help with that."))
    assert not refused.passed
    assert refused.refusal
    cut = check_answer(Answer("Paris is", {"choices": [{"finish_reason": "length"}]}))
    assert not cut.passed
    assert cut.checks[0]["detail"] == "stopped at the token limit"
    schema = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": ["city"]}}}
    assert check_answer(Answer('{"city": "Oslo"}'), response_format=schema).passed
    bad = check_answer(Answer('{"town": "Oslo"}'), response_format=schema)
    assert not bad.passed
    assert "city" in next(c for c in bad.checks if c["name"] == "json_schema")["detail"]
    assert not check_answer(Answer("{nope"), response_format={"type": "json_object"}).passed
    redacted = check_answer(Answer("fine"), guard_actions=["pass", "redact"])
    assert redacted.guard_failed
    assert not redacted.passed


def test_grounding_in_the_retrieved_passages():
    passages = ["The Eiffel Tower was completed in 1889 for the World's Fair in Paris."]
    assert grounding("The Eiffel Tower was completed in 1889. It stands in Paris for the fair.", passages) == 1.0
    assert grounding("Bananas contain potassium and grow in tropical plantations.", passages) == 0.0
    checked = check_answer(Answer("Bananas contain potassium and grow in tropical plantations."),
                           sources=[{"text": passages[0], "score": 0.82}])
    assert not checked.passed
    assert checked.retrieval_score == 0.82
    assert checked.grounded == 0.0
