"""Replica health: the breaker's state machine on a fake clock, balancing, vLLM metrics, retry budget."""

from __future__ import annotations

import random
from collections import Counter

from tollway.config import RawBreaker, RawSaturation
from tollway.routing.fallback import RetryBudget
from tollway.routing.health import Health, parse_vllm_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health(names: list[str], clock: Clock, **breaker: object) -> Health:
    return Health(names, RawBreaker(**breaker), RawSaturation(stale_after_s=5, max_waiting=4, max_kv_cache=0.9),
                  clock=clock, rng=random.Random(7))


def test_breaker_opens_cools_down_probes_and_closes() -> None:
    clock = Clock()
    replica = health(["a"], clock, consecutive_failures=3, open_s=10, half_open_probes=1)["a"]
    for _ in range(3):
        ticket = replica.start()
        assert ticket is not None
        replica.finish(ticket, False)
    assert replica.state == "open"
    assert replica.start() is None
    assert not replica.available()
    clock.now += 9.9
    assert replica.start() is None
    clock.now += 0.2
    assert replica.available()
    probe = replica.start()
    assert probe is not None
    assert probe.probe
    assert replica.state == "half_open"
    assert replica.start() is None  # one probe at a time
    replica.finish(probe, False)  # the probe failed: open again, a fresh cool-down
    assert replica.state == "open"
    assert replica.start() is None
    clock.now += 10.1
    probe = replica.start()
    assert probe is not None
    replica.finish(probe, True)
    assert replica.state == "closed"
    assert replica.start() is not None
    assert replica.refused_open == 4  # every start() the breaker turned away


def test_error_rate_trips_without_consecutive_failures_and_neutral_outcomes_do_not_count() -> None:
    clock = Clock()
    replica = health(["a"], clock, consecutive_failures=100, error_rate=0.5, window=4)["a"]
    for ok in (True, False, True):
        ticket = replica.start()
        assert ticket is not None
        replica.finish(ticket, ok)
    ticket = replica.start()
    assert ticket is not None
    replica.finish(ticket, False, count=False)  # a client disconnect says nothing about the replica
    assert replica.state == "closed"
    assert replica.outstanding == 0
    ticket = replica.start()
    assert ticket is not None
    replica.finish(ticket, False)
    assert replica.state == "open"


def test_ewma_latency_and_outstanding() -> None:
    clock = Clock()
    replica = health(["a"], clock)["a"]
    ticket = replica.start()
    assert ticket is not None
    assert replica.outstanding == 1
    clock.now += 0.1
    replica.finish(ticket, True, ttft_s=0.05)
    assert round(replica.latency_ms, 6) == 100.0
    assert round(replica.ttft_ms, 6) == 50.0
    assert replica.outstanding == 0
    ticket = replica.start()
    assert ticket is not None
    clock.now += 0.2
    replica.finish(ticket, True)
    assert round(replica.latency_ms, 6) == 120.0  # 100 + 0.2 * (200 - 100)


def test_least_outstanding_p2c_and_affinity() -> None:
    clock = Clock()
    h = health(["a", "b", "c"], clock)
    h["a"].outstanding, h["b"].outstanding, h["c"].outstanding = 5, 0, 9
    assert h.pick(["a", "b", "c"], balance="least_outstanding").name == "b"
    picks = Counter(h.pick(["a", "b", "c"]).name for _ in range(300))
    assert picks["c"] == 0  # p2c never picks the busiest of three
    h["a"].outstanding = h["b"].outstanding = h["c"].outstanding = 0
    chosen = {h.pick(["a", "b", "c"], affinity="You are a pirate.").name for _ in range(20)}
    assert len(chosen) == 1
    keys = Counter(h.pick(["a", "b", "c"], affinity=f"prompt {i}").name for i in range(300))
    assert set(keys) == {"a", "b", "c"}  # different prompts spread out
    [sticky] = chosen
    h[sticky].outstanding = 5  # too busy: affinity yields to balance
    assert h.pick(["a", "b", "c"], affinity="You are a pirate.").name != sticky


def test_saturation_from_fresh_metrics_only() -> None:
    clock = Clock()
    h = health(["a", "b"], clock)
    a = h["a"]
    a.waiting, a.kv_cache, a.metrics_at = 4, 0.2, clock.now
    assert a.saturated()
    assert h.state_of(["a"]) == "saturated"
    assert h.state_of(["a", "b"]) == "ok"
    assert h.pick(["a", "b"]).name == "b"
    a.waiting, a.kv_cache = 0, 0.95
    assert a.saturated()
    clock.now += 6  # the reading is stale: it says nothing
    assert not a.saturated()


def test_parse_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_waiting Number of requests waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_running{model_name="m"} 7
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.4
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7
vllm:num_requests_waiting_by_reason{reason="capacity"} 99
vllm:time_to_first_token_seconds_bucket{le="0.1"} 5
"""
    assert parse_vllm_metrics(text) == {"waiting": 5.0, "running": 7.0, "kv_cache": 0.7}


def test_retry_budget_is_a_share_of_requests_plus_a_trickle() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.25, min_per_s=1, clock=clock)
    budget.tokens = 0
    assert not budget.withdraw()
    for _ in range(8):
        budget.deposit()
    assert budget.withdraw()
    assert budget.withdraw()
    assert not budget.withdraw()
    clock.now += 1
    assert budget.withdraw()
    assert not budget.withdraw()
    assert budget.refused == 3
