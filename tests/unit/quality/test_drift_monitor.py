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
from tollway.gateway.quality.watches import Row, Watch, Watches, prompt_key, version_key


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


@pytest.mark.parametrize("sizes", [(200, 200), (200, 1000), (1000, 200), (200, 5000), (37, 53), (5, 7), (1, 3)])
def test_ks_is_scipys_exact_two_sample_test(sizes):
    """The monitor's KS test without scipy (60 MB of a gateway's memory): scipy's statistic and p-value."""
    import numpy as np

    from tollway.evals.drift import ks

    rng = np.random.default_rng(sum(sizes))
    n1, n2 = sizes
    for shift in (0.0, 0.1, 0.3, 1.0):
        for rounded in (False, True):  # ties (token counts, lengths) as well as continuous values
            a, b = rng.lognormal(5, 0.5, n1), rng.lognormal(5 + shift, 0.5, n2)
            if rounded:
                a, b = np.round(a / 20), np.round(b / 20)
            ours, theirs = ks(a, b), stats.ks_2samp(a, b)
            assert ours.statistic == pytest.approx(theirs.statistic, abs=1e-12)
            # both compute 1 - (the share of paths inside): ~1e-11 apart in the far tail, far under any alpha
            assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-6, abs=1e-10), (shift, rounded)


def test_the_hypergeometric_tail_is_scipys():
    from tollway.evals.drift import hypergeom_sf

    for k, total, marked, drawn in ((9, 5200, 200, 159), (0, 50, 10, 5), (30, 1200, 200, 80), (5, 10, 5, 5),
                                    (6, 10, 5, 5), (1, 3000, 200, 1)):
        assert hypergeom_sf(k, total, marked, drawn) == pytest.approx(
            stats.hypergeom.sf(k - 1, total, marked, drawn), rel=1e-9, abs=1e-15)


def test_the_monitor_runs_without_loading_scipy():
    import subprocess
    import sys

    code = ("import random, sys\n"
            "from tollway.evals.monitor import DriftSettings, RouteTest, Scored\n"
            "rng = random.Random(1)\n"
            "def draw(p):\n"
            "    t = rng.lognormvariate(6, 0.5)\n"
            "    return Scored(passed=rng.random() < p, refusal=rng.random() < 0.05, guard_failed=False,"
            " output_chars=t * 2, tokens=t, cost=t * 2e-6)\n"
            "test = RouteTest([draw(0.9) for _ in range(1000)], DriftSettings(window=200), steady=True)\n"
            "found = [f for _ in range(2000) for f in test.update(draw(0.6))]\n"
            "assert found, 'a drop to 60% is found'\n"
            "assert {'scipy', 'scipy.stats'}.isdisjoint(sys.modules), sorted(m for m in sys.modules if 'scipy' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_busy_steady_route_holds_a_bounded_number_of_samples_and_its_baseline_keeps_its_rate():
    """Samples wait six hours (2 x evidence_hours) to enter the baseline: at a busy route's pace that was a
    growing queue (a quick start soaked to 1M requests grew 0.6 MB per 100k). Thinned, it is bounded, and
    the weighted baseline rate it feeds stays the route's."""
    from tollway.evals.monitor import SteadyWatch

    rng = random.Random(11)
    settings = DriftSettings(window=200, baseline_samples=1000, baseline_max=2000)
    watch = SteadyWatch(settings)
    start, most = 1_000_000.0, 0
    for i in range(60_000):  # 50 a second for 20 minutes, then 6 hours on: all of it waited its turn
        at = start + i / 50 if i < 50_000 else start + 6 * 3600 + 60 + i / 50
        watch.observe(_with(draw(rng, pass_rate=0.8), at=at, rate=0.05))
        most = max(most, len(watch.pending))
    assert most < 3 * 2000  # the newest held (lag, or a CUSUM run) and twice baseline_max; 50,000 unthinned
    assert len(watch.baseline) == 2000
    weights = [1 / s.rate for s in watch.baseline]
    rate = sum(w * s.passed for w, s in zip(weights, watch.baseline, strict=True)) / sum(weights)
    assert rate == pytest.approx(0.8, abs=0.03)


def _with(s: Scored, **changes: float) -> Scored:
    from dataclasses import replace

    return replace(s, **changes)


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


@pytest.mark.parametrize("steady", [True, False])
def test_a_route_that_never_passes_raises_no_drift_until_it_passes_and_drops(steady):
    """A baseline of 0% is held to the clamped 1%: every run of failures looked like a drop from it."""
    rng = random.Random(5)
    test = RouteTest([draw(rng, pass_rate=0.0) for _ in range(2000)], DriftSettings(window=200), steady=steady)
    assert test.detectors[0] == "pass_rate"
    found = [f for _ in range(20_000) for f in test.update(draw(rng, pass_rate=0.0))]
    assert not [f for f in found if f.detector == "pass_rate"]
    # the baseline (a steady route's trailing window) starts passing: the test is back once it re-anchors
    baseline = test.baseline
    assert isinstance(baseline, list)
    baseline[:] = [draw(rng, pass_rate=0.9) for _ in range(2000)]
    found = [f for _ in range(3000) for f in test.update(draw(rng, pass_rate=0.5))]
    assert [f for f in found if f.detector == "pass_rate"]


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
    samples, baseline, detectors = watch.breached or (0, 0, [])  # what the alert reports: the test that fired
    assert samples >= n and baseline >= settings.baseline_samples and "pass_rate" in detectors


@pytest.mark.parametrize("rebase", [True, False])
def test_a_refusal_breach_during_a_pass_rate_drop_leaves_the_drop_in_the_pass_rate_tests_evidence(rebase):
    """A pass rate that drops and, a little later, refusals that rise: the refusal detector breaches first and
    starts over on what follows (one alert for its shift, not one per window); the pass-rate test keeps its
    baseline and its evidence and finds the drop. When the whole route started over at the refusals' breach
    (``rebase_windows`` off), the drop joined the next baseline and was never found."""
    rng = random.Random(1)
    settings = DriftSettings(window=200, rebase_windows=rebase)
    watch = SteadyWatch(settings)
    for _ in range(settings.baseline_samples + 2000):
        assert watch.observe(draw(rng)) == []
    found: list[str] = []
    for i in range(6000):
        # the pass rate drops 5 points; 60 samples on, refusals go from 3% to 20% for good
        found += [f.detector for f in watch.observe(draw(rng, pass_rate=0.85, refusal=0.2 if i >= 60 else 0.03))]
        if "pass_rate" in found:
            break
    assert found[0] == "refusal"  # a rise of refusals shows in its first window
    if rebase:
        assert found == ["refusal", "pass_rate"]  # one alert for the refusals' shift, then the drop's (592 on)
        assert watch.test is None  # the drop's breach: now the route starts over
    else:  # the refusals' breach restarted everything: the drop in the next baseline, its shift alerted again
        assert "pass_rate" not in found and found.count("refusal") == 2


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


def timed(rng: random.Random, at: float | None, *, pass_rate: float = 0.9) -> Scored:
    s = draw(rng, pass_rate=pass_rate)
    return Scored(passed=s.passed, refusal=s.refusal, guard_failed=s.guard_failed, output_chars=s.output_chars,
                  tokens=s.tokens, cost=s.cost, at=at)


def test_the_rise_limit_counts_from_the_peak_of_the_hour_before_the_last():
    """A dip in the last hour does not lower the cap (a dense drop's downward swings would otherwise undo
    its capped climbs); the hour before that no longer counts once two hours old."""
    from tollway.evals.drift import RiseLimit

    limit = RiseLimit(2.0, span_s=3600)
    assert limit.ceiling(0, 0.0) == 2.0
    assert limit.ceiling(1800, 3.0) == 2.0  # (the caller cuts it to 2.0; the value it reports is what counts)
    assert limit.ceiling(2400, 1.0) == 2.0
    assert limit.ceiling(3700, 0.5) == 2.0  # t=0 left the last hour: the peak before it is 0.0
    assert limit.ceiling(5500, 0.2) == 5.0  # t=1800 (3.0) left too: the peak, not t=2400's 1.0
    assert limit.ceiling(6100, 0.1) == 5.0  # t=2400 left as well: 3.0 is still the peak of [t-2h, t-1h)
    assert limit.ceiling(9700, 0.1) == 2.5  # 3.0 and 1.0 are over two hours old: t=3700's 0.5 is the peak
    limit.reset()
    assert limit.ceiling(20000, 0.0) == 2.0


def test_the_rise_limit_from_a_point_is_the_value_an_hour_before_plus_the_limit():
    from tollway.evals.drift import RiseLimit

    limit = RiseLimit(2.0, span_s=3600, peak=False)
    assert limit.ceiling(None, 5.0) is None  # no time: no limit
    assert limit.ceiling(0, 0.0) == 2.0  # a fresh statistic stood at zero
    assert limit.ceiling(600, 2.0) == 2.0
    assert limit.ceiling(3000, 1.5) == 2.0
    assert limit.ceiling(3700, 1.8) == 2.0  # the value at t=0 left the hour: it is where it stood an hour before
    assert limit.ceiling(4300, 1.9) == 4.0  # ... then the value at t=600
    limit.reset()
    assert limit.ceiling(9000, 0.0) == 2.0


def test_an_hour_long_burst_oversampled_is_not_a_drop_but_a_lasting_drop_is():
    """Twelve samples a minute for an hour at a 63% pass rate (a hiccup sampled at the raised rate) after a
    day at 90%: the CUSUM climbs at most a third of its threshold that hour. Without times it is an alarm;
    the same drop going on for hours is still found."""
    rng = random.Random(8)
    settings = DriftSettings(window=200)

    def run(with_time: bool, burst_minutes: int) -> list[str]:
        watch = SteadyWatch(settings)
        at = 0.0
        for _ in range(settings.baseline_samples + 2000):  # a sample every three minutes
            at += 180
            watch.observe(timed(rng, at if with_time else None))
        found: list[str] = []
        for _ in range(burst_minutes * 12):
            at += 5
            found += [f.detector for f in watch.observe(timed(rng, at if with_time else None, pass_rate=0.63))]
        return found

    assert "pass_rate" in run(False, 60)
    assert "pass_rate" not in run(True, 60)
    assert "pass_rate" in run(True, 6 * 60)


def test_a_change_watch_halves_its_alpha_after_each_clean_cycle():
    """A moved label watched for a week at a busy route's rate runs many SPRT cycles; each "no drop" halves
    the next cycle's alpha, so the watch as a whole spends at most twice its alpha (it used to spend alpha per
    cycle: an equally good version was rolled back in 3% of moves at 10k requests a day)."""
    rng = random.Random(9)
    test = RouteTest([draw(rng) for _ in range(2000)], DriftSettings(window=200))
    [sequential] = test.pass_tests
    for _ in range(6000):
        assert [f for f in test.update(draw(rng)) if f.detector == "pass_rate"] == []
    assert sequential.accepted >= 3
    assert sequential.sprt is not None
    assert sequential.sprt.alpha == pytest.approx(sequential.alpha / 2 ** sequential.accepted)


def test_a_change_watch_spends_its_window_budget_over_its_windows():
    """A change's watch runs window tests for as long as it is watched (a week at a busy route's rate is
    dozens of windows); the k-th window gets 6 / (pi^2 k^2) of the budget, so the watch as a whole raises at
    most its budget on unchanged traffic. A large alpha makes the difference countable: spent per window,
    these runs would raise about two window alarms each."""
    settings = DriftSettings(window=50, alpha=0.2, pass_drop=None)
    rng = random.Random(12)
    alarms = 0
    for _ in range(40):
        test = RouteTest([draw(rng) for _ in range(300)], settings)
        for _ in range(20 * settings.window):
            alarms += len([f for f in test.update(draw(rng)) if f.test in ("ks", "rise")])
    assert alarms <= 12  # per window: ~80 expected; spent: at most 40 runs x the budget (0.1) on average
    test = RouteTest([draw(rng) for _ in range(300)], settings)
    spent = []
    for k in range(1, 200):
        test.windows = k
        spent.append(test._alpha())
    assert spent[0] == pytest.approx(test.window_alpha * 6 / math.pi ** 2)
    assert sum(spent) < test.window_alpha
    steady = RouteTest([draw(rng) for _ in range(300)], settings, steady=True)
    steady.windows = 50
    assert steady._alpha() == steady.window_alpha  # a steady route's budget is per day instead


def test_a_busy_steady_route_spends_its_window_budget_per_day():
    rng = random.Random(10)
    per_day = DriftSettings(window=200, alarm_days=1000)
    hourly = [timed(rng, i * 3600.0) for i in range(2000)]  # 24 samples a day: the per-window alpha binds
    minutely = [timed(rng, i * 60.0) for i in range(2000)]  # 1440 a day: the per-day budget binds
    plain = RouteTest(hourly, DriftSettings(window=200), steady=True)
    assert RouteTest(hourly, per_day, steady=True).window_alpha == plain.window_alpha
    busy = RouteTest(minutely, per_day, steady=True)
    assert busy.window_alpha == pytest.approx(200 / (1000 * 1440 * len(busy.windowed)), rel=0.01)
    assert busy.window_alpha < plain.window_alpha / 5
    assert busy.pass_tests[0].alpha == plain.pass_tests[0].alpha  # the CUSUM is limited per hour instead
    assert RouteTest(minutely, per_day).window_alpha == plain.window_alpha  # a change's watch: per test


def test_the_baseline_rate_weighs_each_sample_as_the_traffic_it_stands_for():
    """A thousand samples at 2% (90% pass) and a burst of 500 at 25% (60% pass): the burst is 40 requests'
    worth of traffic beside 50,000, so the route is held to about 90%, not to the 80% of the raw samples."""
    base = [Scored(passed=i % 10 != 0, rate=0.02) for i in range(1000)]
    burst = [Scored(passed=i % 5 >= 2, rate=0.25) for i in range(500)]
    test = RouteTest([*base, *burst], DriftSettings(window=200))
    assert test.pass_tests[0].p0 == pytest.approx((900 / 0.02 + 300 / 0.25) / (1000 / 0.02 + 500 / 0.25))
    assert test.pass_tests[0].p0 > 0.88
    assert RouteTest([Scored(passed=i % 10 != 0) for i in range(1000)], DriftSettings()).pass_tests[0].p0 == 0.9


def _prompt_watch(settings: DriftSettings) -> Watch:
    return Watch(key="prompt:1:faq:prod:1", kind="prompt", subject="prompt faq@prod", rate_key="prompt:1:faq:prod",
                 tenant_id=1, settings=settings, prompt={"progressive": False},
                 candidate=lambda r: r.prompt_version == "v2", baseline=lambda r: r.prompt_version == "v1")


def _version_row(i: int, version: str, passed: bool) -> Row:
    return Row(i, 1, "m", None, "faq", "prod", version, Scored(passed=passed, at=float(i)))


def test_a_change_watch_is_decided_once_its_sprt_accepts_no_drop():
    rng = random.Random(5)
    settings = DriftSettings(baseline_samples=300, pass_drop=0.1)
    watch = _prompt_watch(settings)
    assert not watch.decided()  # no test yet: its baseline is still to come
    for i in range(300):
        watch.feed(_version_row(i, "v1", rng.random() < 0.9))
    assert not watch.decided()  # a baseline, but none of the new version's samples
    i = 300
    while not watch.decided():
        assert watch.feed(_version_row(i, "v2", rng.random() < 0.9)) == []  # as good: never a breach
        i += 1
        assert i < 3000, "an SPRT for a 10-point drop accepts an equal rate well within 2,700 samples"
    assert watch.test is not None and all(t.accepted == 1 for t in watch.test.pass_tests)
    # without a specified drop the mSPRT never accepts: its silence is its evidence, decided as soon as it runs
    msprt = _prompt_watch(DriftSettings(baseline_samples=300, pass_drop=None))
    for j in range(300):
        msprt.feed(_version_row(j, "v1", True))
    msprt.feed(_version_row(300, "v2", True))
    assert msprt.decided()


def test_a_rollout_step_short_of_evidence_asks_for_the_ceiling_for_its_candidate_alone():
    """At 5% of a label's users and 2% sampling, a 10k-requests-a-day route's candidate gets ~10 samples a day:
    weeks to the evidence a step needs, the rollout standing still meanwhile. Its watch asks for the ceiling,
    under the candidate version's own key, until it may move on; a moved label's watch does not."""
    rng = random.Random(3)
    policy = SamplingPolicy(base=0.02, ceiling=0.25)
    settings = DriftSettings(baseline_samples=300, pass_drop=0.1, min_samples=50)
    watches = Watches(settings, policy)
    step = _prompt_watch(settings)
    step.key, step.rate_key = "prompt:1:faq:prod:2", version_key(1, "faq", "prod", "v2")
    step.prompt = {"progressive": True, "split": True}
    moved = _prompt_watch(settings)
    watches.watches = {step.key: step, moved.key: moved}
    assert watches.rates(0.0)[step.rate_key][0] == 0.25  # no baseline yet: waiting too
    assert watches.rates(0.0)[moved.rate_key][0] == 0.02
    for i in range(300):
        watches.feed(_version_row(i, "v1", rng.random() < 0.9))
    i, advanced = 300, False
    while not advanced:
        assert watches.rates(float(i))[step.rate_key][0] == 0.25
        advanced = any(w is step and not found for w, found in watches.feed(_version_row(i, "v2", rng.random() < 0.9)))
        i += 1
        assert i < 3300
    assert step.test is not None and step.test.no_regression() and step.done
    assert watches.rates(float(i))[step.rate_key][0] == 0.02  # moved on: the candidate's rate is its progress's


def test_a_split_labels_candidate_is_sampled_at_its_own_rate():
    from tollway.gateway.quality.sampling import LiveQuality, quality_settings

    live = LiveQuality(None, None, None, None, quality_settings({"sample_rate": 0.02}))  # type: ignore[arg-type]
    live.rates = {version_key(1, "faq", "prod", "v2"): 0.25, prompt_key(1, "faq", "prod"): 0.05}
    assert live.rate("m", 1, "faq", "prod", "v2") == 0.25
    assert live.rate("m", 1, "faq", "prod", "v1") == 0.05  # the version the label holds: the label's rate
    assert live.rate("m", 2, "faq", "prod", "v2") == 0.02  # another tenant's label of the same name
    assert live.rate("m", 1, "faq", "prod") == 0.05


def test_a_moved_label_is_tested_against_its_old_rate_less_its_noise_a_split_against_its_rate():
    rng = random.Random(9)
    settings = DriftSettings(baseline_samples=1000, short_baseline=200, short_caution=1.645)
    moved, split = _prompt_watch(settings), _prompt_watch(settings)
    split.prompt = {"progressive": False, "split": True}
    for i in range(150):
        for w in (moved, split):
            w.feed(_version_row(i, "v1", rng.random() < 0.9))
    moved.feed(_version_row(150, "v2", True))
    assert moved.test is None  # under short_baseline: nothing to compare with yet
    for i in range(151, 300):
        for w in (moved, split):
            w.feed(_version_row(i, "v1", rng.random() < 0.9))
    for w in (moved, split):
        w.feed(_version_row(300, "v2", True))
    assert split.test is None  # a split's old version keeps serving: it waits for baseline_samples
    assert moved.test is not None
    passes = sum(bool(s.passed) for s in moved.base)
    p = passes / len(moved.base)
    [test] = moved.test.pass_tests
    assert test.p0 == pytest.approx(p - 1.645 * math.sqrt(p * (1 - p) / len(moved.base)))
    full, canary = _prompt_watch(settings), _prompt_watch(settings)  # a full baseline: the same caution, a
    canary.prompt = {"progressive": False, "split": True}          # split's (its baseline grows): its own rate
    for i in range(1000):
        for w in (full, canary):
            w.feed(_version_row(i, "v1", rng.random() < 0.9))
    for w in (full, canary):
        w.feed(_version_row(1000, "v2", True))
        assert w.test is not None
    fp = sum(bool(s.passed) for s in full.base) / len(full.base)
    assert full.test.pass_tests[0].p0 == pytest.approx(fp - 1.645 * math.sqrt(fp * (1 - fp) / len(full.base)))
    cp = sum(bool(s.passed) for s in canary.base) / len(canary.base)
    assert canary.test.pass_tests[0].p0 == pytest.approx(cp)


def test_a_moved_labels_caution_is_a_quality_setting():
    from tollway.gateway.quality.sampling import quality_settings

    assert quality_settings({}).drift.moved_caution == 1.645
    assert quality_settings({"moved_caution": 0}).drift.moved_caution == 0.0
    with pytest.raises(Exception, match="moved_caution"):
        quality_settings({"moved_caution": -1})
