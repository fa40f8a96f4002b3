"""Every check type against known answers, the judge's score reading, the paired tests, golden-set parsing
and the gate's decision."""

from __future__ import annotations

import pytest

from tollway.evals.checks import Answer, evaluate, is_refusal, judge_score
from tollway.evals.golden import GoldenSetError, parse_set, set_from_items
from tollway.evals.runner import GateThresholds, compare, decide
from tollway.evals.stats import mcnemar, paired_bootstrap


def check(spec: dict, content: str, payload: dict | None = None):
    item = set_from_items([{"id": "x", "messages": [{"role": "user", "content": "q"}], "checks": [spec]}], "t")
    return evaluate(item.items[0].checks[0], Answer(content, payload))


@pytest.mark.parametrize(("spec", "content", "passed"), [
    ({"type": "exact", "value": "Paris"}, " Paris\n", True),
    ({"type": "exact", "value": "Paris"}, "paris", False),
    ({"type": "exact", "value": "Paris", "case_sensitive": False}, "paris", True),
    ({"type": "contains", "value": "paris"}, "It is Paris.", True),
    ({"type": "contains", "values": ["Paris", "France"]}, "Paris is nice", False),
    ({"type": "contains", "values": ["Paris", "France"], "mode": "any"}, "Paris is nice", True),
    ({"type": "regex", "pattern": r"^\d{4}-\d{2}-\d{2}$"}, "2026-11-22", True),
    ({"type": "regex", "pattern": "hello", "flags": "i"}, "HELLO", True),
    ({"type": "numeric", "value": 42, "tolerance": 0.5}, "about 41.7 units", True),
    ({"type": "numeric", "value": 42, "tolerance": 0.5}, "about 40 units", False),
    ({"type": "numeric", "value": 1000, "tolerance": 0.01, "relative": True}, "1,005 in total", True),
    ({"type": "numeric", "value": 3}, "no numbers here", False),
    ({"type": "json"}, '{"a": 1}', True),
    ({"type": "json"}, '{"a": 1', False),
    ({"type": "json", "schema": {"type": "object", "required": ["a"]}}, '{"b": 1}', False),
    ({"type": "refusal"}, "I'm sorry, but I can't help with that.", True),
    ({"type": "refusal"}, "Sure, here is the recipe.", False),
    ({"type": "refusal", "expected": False}, "Sure, here is the recipe.", True),
    ({"type": "contains", "value": "error", "negate": True}, "all good", True),
])
def test_deterministic_checks(spec, content, passed):
    assert check(spec, content).passed is passed


def test_a_catastrophic_regex_check_fails_in_bounded_time():
    """An eval set's pattern comes from a client: one that backtracks without end on an answer fails that
    check after ``REGEX_TIMEOUT_S`` instead of holding the process (this one would take longer than the
    universe has existed)."""
    for negate in (False, True):  # a timeout decides nothing, whichever way the check reads
        result = check({"type": "regex", "pattern": r"(x+x+)+y", "negate": negate}, "x" * 5000)
        assert result.passed is False and "took over" in result.detail


def test_retrieval_recall_reads_the_cited_sources():
    payload = {"tollway": {"retrieval": {"sources": [{"source": "a.md", "document_id": 1},
                                                     {"source": "b.md", "document_id": 2}]}}}
    spec = {"type": "retrieval_recall", "documents": ["a.md", "c.md"], "min": 0.5}
    result = check(spec, "answer", payload)
    assert result.passed
    assert result.score == 0.5
    assert not check({**spec, "min": 1.0}, "answer", payload).passed
    assert not check(spec, "answer", None).passed


def test_a_content_filter_answer_is_a_refusal():
    assert is_refusal(Answer("", {"choices": [{"finish_reason": "content_filter", "message": {"content": ""}}]}))


@pytest.mark.parametrize(("text", "score"), [
    ('{"score": 8, "reason": "ok"}', 0.8),
    ("Score: 7/10", 0.7),
    ("I would give it 85/100.", 0.85),
    ('{"score": 0.6}', 0.6),
    ("the gateway keeps spend within budget", None),
    ("Score: 14/10", None),
])
def test_judge_score(text, score):
    assert judge_score(text) == score


def test_mcnemar_exact_matches_the_binomial():
    # 10 items flip from pass to fail, none the other way: p = 2 * 0.5^10
    a, b = [True] * 10 + [True] * 5, [False] * 10 + [True] * 5
    result = mcnemar(a, b)
    assert result.p_value == pytest.approx(2 / 1024)
    assert result.difference == pytest.approx(-10 / 15)
    # one each way: nothing to say
    assert mcnemar([True, False, True], [False, True, True]).p_value == 1.0


def test_paired_bootstrap_sees_a_consistent_shift_but_not_noise():
    a = [0.5 + 0.01 * (i % 7) for i in range(40)]
    shifted = paired_bootstrap(a, [x + 0.1 for x in a])
    assert shifted.significant(0.05)
    assert shifted.low is not None
    assert shifted.low > 0
    noisy = paired_bootstrap(a, [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(a)])
    assert not noisy.significant(0.05)


def test_golden_sets_are_checked_line_by_line():
    good = parse_set('{"id": "a", "messages": [{"role": "user", "content": "x"}], '
                     '"checks": [{"type": "contains", "value": "x"}], "notes": "kept"}\n')
    assert good.items[0].extra == {"notes": "kept"}
    assert len(good.digest) == 16
    for text, message in [
        ('{"id": "a", "checks": [{"type": "exact", "value": "x"}]}', "needs 'messages' or 'variables'"),
        ('{"id": "a", "variables": {}, "checks": [{"type": "telepathy"}]}', "checks.0"),
        ('{"id": "a", "variables": {}, "checks": [{"type": "regex", "pattern": "("}]}', "does not compile"),
        ('{"id": "a", "variables": {}, "checks": []}', "non-empty"),
        ("not json", ":1: not valid JSON"),
        ("", "empty"),
        ('{"id": "a", "variables": {}, "checks": [{"type": "exact", "value": "x"}]}\n'
         '{"id": "a", "variables": {}, "checks": [{"type": "exact", "value": "x"}]}', "appears twice"),
    ]:
        with pytest.raises(GoldenSetError, match=message):
            parse_set(text, "set.jsonl")


def test_the_gate_decides_by_pass_rate_regression_and_significance():
    t = GateThresholds(min_pass_rate=0.8, max_regression=0.05, alpha=0.05)
    base = {f"q{i}": {"passed": True, "score": None} for i in range(20)}
    worse = {k: {"passed": i >= 6, "score": None} for i, k in enumerate(base)}  # 6 regressions
    ok, why = decide({"pass_rate": 0.7}, compare(base, worse), t)
    assert not ok
    assert "pass rate 70% < 80%" in why
    assert "fell" in why
    slight = {k: {"passed": i >= 2, "score": None} for i, k in enumerate(base)}  # 2 regressions: not significant
    ok, why = decide({"pass_rate": 0.9}, compare(base, slight), t)
    assert ok, why
    ok, _ = decide({"pass_rate": 0.9}, compare(base, slight), GateThresholds(require_significance=False))
    assert not ok
    assert decide({"pass_rate": 1.0}, None, t)[0]
