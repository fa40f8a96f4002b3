"""Golden sets and their checks (the LLM judge among them), the runner, paired comparisons and the
production gate's decision. The gateway runs them through its chat path (``tollway.gateway.parts.evaluating``);
live sampling and drift detection come with the live quality loop."""

if __name__ != "tollway.evals":
    raise ImportError("This folder is Tollway's 'tollway.evals' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'evals'.")

from tollway.evals.checks import JUDGE_SYSTEM, Answer, judge_score
from tollway.evals.golden import GoldenSet, GoldenSetError, parse_set, set_from_items
from tollway.evals.live import check_answer
from tollway.evals.monitor import DriftSettings, Finding, RouteTest, SamplingPolicy, Scored, SteadyWatch
from tollway.evals.runner import (
    GateThresholds,
    ItemResult,
    Target,
    compare,
    decide,
    parse_prompt_ref,
    run_set,
    summary,
)

__all__ = [
    "JUDGE_SYSTEM",
    "Answer",
    "DriftSettings",
    "Finding",
    "GateThresholds",
    "GoldenSet",
    "GoldenSetError",
    "ItemResult",
    "RouteTest",
    "SamplingPolicy",
    "Scored",
    "SteadyWatch",
    "Target",
    "check_answer",
    "compare",
    "decide",
    "judge_score",
    "parse_prompt_ref",
    "parse_set",
    "run_set",
    "set_from_items",
    "summary",
]
