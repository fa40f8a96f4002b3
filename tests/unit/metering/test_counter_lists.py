"""The counters a request is admitted against, remembered for one second: the same list for every request of
a key in that second, worked out again for new rules (a budget changed), another subject or the next second."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from tollway.gateway.metering.quota.counters import CounterLists, counters_for
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import Budget, TenantPolicy, TenantRules

KEY = Principal(key_id=7, tenant_id=3, tenant="acme", role="app", allowed_models=None, rpm=60)


def rules(limit: str) -> TenantRules:
    return TenantRules(policy=TenantPolicy(tenant_id=3), budgets=(
        Budget(id=1, tenant_id=3, scope="tenant", subject="", period="minute", limit_usd=Decimal(limit),
               limit_tokens=None),
        Budget(id=2, tenant_id=3, scope="user", subject="*", period="day", limit_usd=Decimal("1"), limit_tokens=None)))


def test_one_list_per_key_and_subject_in_a_second_and_new_rules_or_a_new_second_ask_again():
    lists, now = CounterLists(), datetime(2026, 12, 6, 11, 59, 59, 100_000, tzinfo=UTC)
    first = rules("10")
    got = lists.get(KEY, first, end_user="u1", session=None, now=now)
    assert got == counters_for(KEY, first, end_user="u1", session=None, now=now)
    assert lists.get(KEY, first, end_user="u1", session=None, now=now + timedelta(milliseconds=800)) is got
    other_user = lists.get(KEY, first, end_user="u2", session=None, now=now)
    assert other_user is not got and other_user[1].key != got[1].key
    changed = rules("20")  # a budget changed: new rules, new limits at once
    assert lists.get(KEY, changed, end_user="u1", session=None, now=now)[0].limits != got[0].limits
    later = lists.get(KEY, first, end_user="u1", session=None, now=now + timedelta(seconds=1))
    assert later is not got and later[0].key != got[0].key  # the next second is the next minute's window
    tighter = Principal(key_id=7, tenant_id=3, tenant="acme", role="app", allowed_models=None, rpm=30)
    assert lists.get(tighter, first, end_user="u1", session=None, now=now + timedelta(seconds=1))[-1].limits[2] == 30
