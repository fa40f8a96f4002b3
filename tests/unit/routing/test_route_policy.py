"""The route policy as a table: inputs in, decision out. No upstream, no database."""

from __future__ import annotations

from typing import Any

import pytest

from tollway.errors import InvalidRequest, NotFound, PermissionDenied
from tollway.routing import build_catalog, parse_config
from tollway.routing.decision import (
    BudgetSignal,
    RouteRequest,
    TenantRouting,
    canary_bucket,
    candidates,
    decide,
)
from tollway.routing.difficulty import Difficulty


def catalog(**routing: Any) -> Any:
    raw = parse_config({
        "upstreams": [{"name": n, "base_url": f"http://{n}"} for n in ("g", "h", "s", "t")],
        "models": [
            {"name": "large-a", "upstreams": ["g", "h"], "tier": "large", "capabilities": ["tools", "json_mode"],
             "price": {"input_per_mtok": 3, "output_per_mtok": 15}},
            {"name": "large-b", "upstream": "g", "tier": "large", "price": {"input_per_mtok": 5, "output_per_mtok": 20}},
            {"name": "mid", "upstream": "s", "tier": "medium", "capabilities": ["tools"], "context_window": 8000,
             "price": {"input_per_mtok": 1, "output_per_mtok": 2}},
            {"name": "small", "upstream": "t", "tier": "small", "capabilities": [],
             "price": {"input_per_mtok": "0.1", "output_per_mtok": "0.2"}},
            {"name": "pinned", "upstream": "g", "tier": "large", "fallbacks": ["small"],
             "price": {"input_per_mtok": 10, "output_per_mtok": 40}},
            {"name": "cand", "upstream": "h", "tier": "large", "price": {"input_per_mtok": 4, "output_per_mtok": 16}},
            {"name": "emb", "upstream": "s", "kind": "embedding"},
        ],
        "routing": {"tiers": [{"name": "large", "deadline_s": 30, "ttft_deadline_s": 3},
                              {"name": "medium", "deadline_s": 20, "ttft_deadline_s": 2},
                              {"name": "small", "deadline_s": 10, "ttft_deadline_s": 1}],
                    "rollouts": [{"model": "large-a", "candidate": "cand", "canary_percent": 25}], **routing},
    })
    return build_catalog(raw, {}, [])


CAT = catalog()
ANY = TenantRouting()
CALM = BudgetSignal()


def hardness(score: float, *signals: str) -> Difficulty:
    return Difficulty(score=score, learned=score, signals=signals)


def names(decision: Any) -> list[str]:
    return [s.model.name for s in decision.steps]


def test_a_named_model_falls_back_to_the_cheapest_model_of_each_lower_tier() -> None:
    d = decide(CAT, RouteRequest("large-b"), ANY, CALM, {})
    assert names(d) == ["large-b", "mid", "small"]
    assert d.reason == "requested"
    assert [(s.deadline_s, s.ttft_deadline_s) for s in d.steps] == [(30, 3), (20, 2), (10, 1)]


def test_explicit_fallbacks_replace_the_default_chain() -> None:
    assert names(decide(CAT, RouteRequest("pinned"), ANY, CALM, {})) == ["pinned", "small"]


@pytest.mark.parametrize(("score", "threshold", "expected"), [
    (0.9, 0.5, ["large-a", "mid", "small"]),
    (0.5, 0.5, ["large-a", "mid", "small"]),  # at the threshold: the top tier
    (0.2, 0.5, ["mid", "small"]),
    (0.9, 1.0, ["mid", "small"]),  # the frugal end of the dial
    (0.0, 0.0, ["large-a", "mid", "small"]),  # the quality end
])
def test_auto_follows_difficulty_and_the_tenant_threshold(score: float, threshold: float, expected: list[str]) -> None:
    d = decide(CAT, RouteRequest("auto", difficulty=hardness(score)), TenantRouting(threshold=threshold), CALM, {})
    assert names(d) == expected
    assert d.reason == f"auto:difficulty={score:.2f}{'>=' if score >= threshold else '<'}{threshold:.2f}"


def test_auto_steps_down_a_tier_near_budget_exhaustion_or_above_the_velocity_line() -> None:
    hard = RouteRequest("auto", difficulty=hardness(0.9))
    low = decide(CAT, hard, ANY, BudgetSignal(headroom=0.05), {})
    fast = decide(CAT, hard, ANY, BudgetSignal(velocity_soft=True), {})
    plenty = decide(CAT, hard, ANY, BudgetSignal(headroom=0.5), {})
    assert names(low)[0] == "mid"
    assert low.reason.endswith(";budget_step_down")
    assert names(fast)[0] == "mid"
    assert fast.reason.endswith(";velocity_step_down")
    assert names(plenty)[0] == "large-a"
    # a named model is not swapped; the crossing is recorded
    named = decide(CAT, RouteRequest("large-b"), ANY, BudgetSignal(velocity_soft=True), {})
    assert names(named)[0] == "large-b"
    assert named.reason == "requested;velocity_soft"


def test_auto_says_when_the_tier_it_chose_had_no_model_the_request_may_use() -> None:
    """A hard question for a key that may use only the small model: served by it, and the reason says why the
    top tier was passed over (not only that the difficulty crossed the threshold)."""
    small_only = TenantRouting(allowed_models=frozenset({"small"}))
    d = decide(CAT, RouteRequest("auto", difficulty=hardness(0.9)), small_only, CALM, {})
    assert names(d) == ["small"]
    assert d.reason == "auto:difficulty=0.90>=0.50;large:none_eligible"
    easy = decide(CAT, RouteRequest("auto", difficulty=hardness(0.1)), small_only, CALM, {})
    assert easy.reason == "auto:difficulty=0.10<0.50;medium:none_eligible"
    upward = decide(CAT, RouteRequest("auto", difficulty=hardness(0.1)),
                    TenantRouting(allowed_models=frozenset({"large-b"})), CALM, {})
    assert (names(upward), upward.reason) == (["large-b"], "auto:difficulty=0.10<0.50;medium:none_eligible")
    assert decide(CAT, RouteRequest("auto", difficulty=hardness(0.9)), ANY, CALM, {}).reason == \
        "auto:difficulty=0.90>=0.50"  # the tier it chose served it: nothing more said


def test_capabilities_allow_lists_and_quality_floors_are_policy() -> None:
    tools = RouteRequest("auto", needs=frozenset({"tools"}), difficulty=hardness(0.1))
    assert names(decide(CAT, tools, ANY, CALM, {})) == ["mid"]  # 'small' cannot call tools
    floor = TenantRouting(quality_floor="medium")
    assert names(decide(CAT, RouteRequest("large-b"), floor, CALM, {})) == ["large-b", "mid"]
    assert names(decide(CAT, RouteRequest("auto", difficulty=hardness(0.1)), TenantRouting(quality_floor="large"),
                        CALM, {}))[0] == "large-a"
    allowed = TenantRouting(allowed_models=frozenset({"small", "large-b"}))
    assert names(decide(CAT, RouteRequest("auto", difficulty=hardness(0.9)), allowed, CALM, {})) == ["large-b", "small"]
    with pytest.raises(PermissionDenied):
        decide(CAT, RouteRequest("mid"), allowed, CALM, {})
    with pytest.raises(NotFound):
        decide(CAT, RouteRequest("nope"), ANY, CALM, {})
    vision = RouteRequest("auto", needs=frozenset({"vision"}), difficulty=hardness(0.9))
    with pytest.raises(InvalidRequest):
        decide(CAT, vision, TenantRouting(allowed_models=frozenset({"small"})), CALM, {})


def test_health_reorders_the_chain() -> None:
    req = RouteRequest("large-b")
    down = decide(CAT, req, ANY, CALM, {"large-b": "down"})
    assert names(down) == ["mid", "small"]
    assert down.reason == "requested;large-b:down;target=mid"
    busy = decide(CAT, req, ANY, CALM, {"large-b": "saturated"})
    assert names(busy) == ["mid", "small", "large-b"]  # overflow first, the queue as a last resort
    assert busy.reason == "requested;large-b:saturated;target=mid"
    nothing = decide(CAT, req, ANY, CALM, {"large-b": "down", "mid": "down", "small": "down"})
    assert nothing.steps == ()
    # auto takes the cheapest healthy model of its tier, and says which cheaper one it passed over
    hard = decide(CAT, RouteRequest("auto", difficulty=hardness(0.9)), ANY, CALM, {"large-a": "down"})
    assert names(hard)[0] == "cand"
    assert hard.reason == "auto:difficulty=0.90>=0.50;large-a:down"


def test_canary_by_a_stable_bucket() -> None:
    req = RouteRequest("large-a")
    inside = decide(CAT, req, ANY, CALM, {}, canary=0.10)
    outside = decide(CAT, req, ANY, CALM, {}, canary=0.30)
    assert names(inside)[:2] == ["cand", "large-a"]
    assert inside.rollout == "canary"
    assert inside.reason == "requested;canary:cand"
    assert names(outside)[0] == "large-a"
    assert outside.rollout is None
    assert canary_bucket("user-1") == canary_bucket("user-1") != canary_bucket("user-2")
    share = sum(canary_bucket(f"user-{i}") < 0.25 for i in range(4000)) / 4000
    assert 0.22 < share < 0.28


def test_candidates_bound_the_worst_case() -> None:
    auto = {m.name for m in candidates(CAT, RouteRequest("auto"), ANY)}
    assert auto == {"large-a", "large-b", "mid", "small", "pinned", "cand"}
    assert {m.name for m in candidates(CAT, RouteRequest("small"), ANY)} == {"small"}
    assert {m.name for m in candidates(CAT, RouteRequest("mid"), ANY)} == {"mid", "small"}
    # a canary candidate is reserved for, unless the tenant may not use it; a shadow is never the tenant's cost
    assert {m.name for m in candidates(CAT, RouteRequest("large-a"), ANY)} == {"large-a", "mid", "small", "cand"}
    only_a = TenantRouting(allowed_models=frozenset({"large-a", "small"}))
    assert {m.name for m in candidates(CAT, RouteRequest("large-a"), only_a)} == {"large-a", "small"}
    # explicit fallbacks, like the tier below, only where the tenant may go (as the route itself)
    assert {m.name for m in candidates(CAT, RouteRequest("pinned"), ANY)} == {"pinned", "small"}
    only_pinned = TenantRouting(allowed_models=frozenset({"pinned"}))
    assert {m.name for m in candidates(CAT, RouteRequest("pinned"), only_pinned)} == {"pinned"}
    assert names(decide(CAT, RouteRequest("pinned"), only_pinned, CALM, {})) == ["pinned"]
    shadowed = catalog(rollouts=[{"model": "large-a", "candidate": "cand", "shadow_percent": 50}])
    assert {m.name for m in candidates(shadowed, RouteRequest("large-a"), ANY)} == {"large-a", "mid", "small"}


def test_context_windows_filter_fallbacks_and_refuse_a_named_model_that_cannot_fit() -> None:
    long = RouteRequest("large-b", tokens=20_000)
    assert names(decide(CAT, long, ANY, CALM, {})) == ["large-b", "small"]  # 'mid' holds 8,000 tokens
    assert names(decide(CAT, RouteRequest("large-b", tokens=7_000), ANY, CALM, {})) == ["large-b", "mid", "small"]
    with pytest.raises(InvalidRequest) as refused:
        decide(CAT, RouteRequest("mid", tokens=9_000), ANY, CALM, {})
    assert refused.value.code == "context_length_exceeded"
