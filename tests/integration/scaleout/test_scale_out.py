"""Three `tollway serve` processes behind Debian's HAProxy (the compose file's own haproxy.cfg), one Redis Cluster
(3 masters, 3 replicas), one PostgreSQL, as an operator runs them; every invariant asserted:

1. 200 concurrent mixed requests (chat, streams, completions, embeddings) against a budget of about ten: no
   overspend, and the counters equal the ledger;
2. an upstream killed: once the first gateway has found it dead, the other gateways send it nothing more
   after a second (the failed-attempt rows in the ledger);
3. a gateway SIGTERMed under load: its streams finish, the balancer drains it, no client sees an error;
4. a gateway SIGKILLed mid-run: no admitted spend escapes the budget or the ledger (its reservations and the
   rows it held in memory are written by the survivor's sweeper), and the cost report equals the ledger.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from support.config import write_config
from support.processes import stop_all
from support.redis_cluster import RedisClusterProcesses

from tollway.local.embedded import free_port, wait_until

HAPROXY_CFG = Path(__file__).parents[3] / "deploy" / "compose" / "haproxy.cfg"
CHAT = {"model": "sim-large", "max_tokens": 16}


@pytest.fixture
def cluster(tmp_path):
    nodes = RedisClusterProcesses(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


@pytest.fixture
def gateway_processes(serve):
    """`tollway serve` processes of this test only: stopped when it ends, before its Redis Cluster."""
    started = []

    def start(*args: str, **kwargs: Any) -> Any:
        started.append(serve(*args, **kwargs))
        return started[-1]

    yield start
    stop_all(started)


def haproxy_config(ports: list[int], listen: int) -> str:
    """The compose file's HAProxy config, pointed at these gateways, checking them more often."""
    text = HAPROXY_CFG.read_text()
    text = text.replace("bind :8080", f"bind 127.0.0.1:{listen}")
    text = re.sub(r"\n    server .*", "", text)
    text += "".join(f"    server gateway-{i} 127.0.0.1:{port} check\n" for i, port in enumerate(ports, 1))
    return text.replace("inter 2s fall 2 rise 2", "inter 300ms fall 1 rise 1")


@pytest.fixture
def haproxy(tmp_path):
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(binary).exists(), "Debian's haproxy is installed by `make test` (apt-get install haproxy)"
    procs: list[subprocess.Popen[bytes]] = []

    def start(ports: list[int]) -> str:
        listen = free_port()
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_config(ports, listen))
        subprocess.run([binary, "-c", "-f", str(cfg)], check=True, capture_output=True)
        procs.append(subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=(tmp_path / "haproxy.log").open("wb"),
                                      stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{listen}"

        def up() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 20, "haproxy")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def scale_config(path: Path, sim_url: str, simb_url: str, slow_url: str) -> Path:
    write_config(path, sim_url, extra_upstreams=[
        {"name": "simb", "base_url": simb_url, "timeout_s": 3},
        {"name": "slow", "base_url": slow_url, "timeout_s": 30}],
        extra_models=[{"name": "slow-model", "upstream": "slow", "upstream_model": "sim-large", "tier": "large",
                       "price": {"input_per_mtok": "3", "output_per_mtok": "15"}}])
    config = yaml.safe_load(path.read_text())
    for model in config["models"]:
        if model["name"] == "sim-small":  # two replicas of one model: simb is the one that dies
            del model["upstream"]
            model["upstreams"] = ["sim", "simb"]
    path.write_text(yaml.safe_dump(config))
    return path


def sql(pg_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(query, params).fetchall()


async def one(client: httpx.AsyncClient, base: str, headers: dict[str, str], i: int) -> tuple[int, str]:
    """One of four kinds of request; a stream is read to its end."""
    kind = i % 4
    text = f"scale out {i}"
    if kind == 0:
        r = await client.post(base + "/v1/chat/completions", headers=headers,
                              json={**CHAT, "messages": [{"role": "user", "content": text}]})
        return r.status_code, ""
    if kind == 1:
        async with client.stream("POST", base + "/v1/chat/completions", headers=headers,
                                 json={**CHAT, "stream": True, "messages": [{"role": "user", "content": text}]}) as r:
            body = (await r.aread()).decode()
            return r.status_code, body
    if kind == 2:
        r = await client.post(base + "/v1/completions", headers=headers,
                              json={"model": "sim-large", "max_tokens": 16, "prompt": text})
        return r.status_code, ""
    r = await client.post(base + "/v1/embeddings", headers=headers, json={"model": "sim-embed", "input": text})
    return r.status_code, ""


def reconcile_drifts(url: str, admin: Any, tenant: Any) -> list[dict[str, Any]]:
    r = httpx.post(url + "/v1/admin/reconcile", headers=admin.headers, json={"tenant": tenant.name}, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["drifts"])


def ledger_total(pg_url: str, tenant_id: int) -> Decimal:
    return Decimal(sql(pg_url, "SELECT coalesce(sum(cost_usd), 0) FROM ledger WHERE tenant_id = %s", tenant_id)[0][0])


def settled_ledger(pg_url: str, tenant_id: int, quiet_s: float = 0.6, within_s: float = 15.0) -> None:
    """Wait until the three gateways' ledger writers have written this tenant's rows: its total unchanged for
    ``quiet_s`` (on a loaded machine a fixed pause was a guess, and a row still queued reads as drift)."""
    deadline, last, since = time.monotonic() + within_s, None, time.monotonic()
    while time.monotonic() < deadline:
        total = ledger_total(pg_url, tenant_id)
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)


def test_three_gateways_behind_haproxy_on_a_redis_cluster_behave_as_one(
        start_sim, sim, pg, cluster, gateway_processes, haproxy, make_tenant, admin, tmp_path):
    simb = start_sim()
    slow = start_sim("--tokens-per-s", "25", "--completion-tokens", "60")
    config = scale_config(tmp_path / "tollway.yaml", sim.url, simb.url, slow.url)
    env = {"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": cluster.url, "TOLLWAY_BOOTSTRAP": "0",
           "TOLLWAY_LEASE_S": "2", "TOLLWAY_SWEEP_INTERVAL_S": "0.5", "TOLLWAY_POLICY_CACHE_TTL_S": "0",
           "TOLLWAY_LEDGER_FLUSH_INTERVAL_S": "0.05", "TOLLWAY_DRAIN_PAUSE_S": "1"}
    gateways = [gateway_processes("--config", str(config), env=env) for _ in range(3)]
    lb = haproxy([int(g.url.rsplit(":", 1)[1].removesuffix("/v1")) for g in gateways])

    # -- 1. 200 concurrent mixed requests against a budget of about ten ----------------------------------------
    tenant = make_tenant()
    probe = httpx.post(lb + "/v1/chat/completions", headers=tenant.headers, timeout=30,
                       json={**CHAT, "messages": [{"role": "user", "content": "scale out probe"}]})
    assert probe.status_code == 200, probe.text
    limit = Decimal(probe.headers["x-tollway-cost-usd"]) * 11
    r = httpx.put(lb + "/v1/admin/budgets", headers=admin.headers, timeout=10,
                  json={"tenant": tenant.name, "window": "day", "limit_usd": str(limit)})
    assert r.status_code == 200, r.text
    time.sleep(0.5)  # every gateway has heard of the budget (change notifications)
    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
            return list(await asyncio.gather(*(one(client, lb, tenant.headers, i) for i in range(200))))

    results = asyncio.run(burst())
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    paid = [s for i, s in enumerate(statuses) if i % 4 != 3]  # embeddings cost a fraction of a chat
    assert 1 <= paid.count(200) <= 11 and 429 in paid, paid.count(200)
    assert all(body.rstrip().endswith("data: [DONE]") for s, body in results if s == 200 and body)
    settled_ledger(pg.url, tenant.id)
    assert ledger_total(pg.url, tenant.id) <= limit, "no overspend across three gateways"
    assert reconcile_drifts(lb, admin, tenant) == [], "the cluster's counters equal the ledger"

    # -- 2. an upstream killed: shared within a second ---------------------------------------------------------
    first, others = gateways[0], gateways[1:]
    tenant2 = make_tenant()
    simb.process.kill()
    simb.process.wait()
    small = {"model": "sim-small", "max_tokens": 4, "messages": [{"role": "user", "content": "which replica"}]}
    for i in range(60):  # only the first gateway meets the dead replica until its breaker opens
        r = httpx.post(first.url + "/chat/completions", headers=tenant2.headers, timeout=30,
                       json={**small, "user": f"u{i}"})
        assert r.status_code == 200, r.text  # the live replica answers
        if first.metric('tollway_upstream_breaker_state{upstream="simb"}', admin.headers) == 2:
            break
    tripped = datetime.now(UTC)
    assert first.metric('tollway_upstream_breaker_state{upstream="simb"}', admin.headers) == 2, "the first one tripped"
    deadline = time.monotonic() + 2.5
    n = 0
    while time.monotonic() < deadline:  # the other gateways, busy from the moment the first one tripped
        for g in others:
            n += 1
            r = httpx.post(g.url + "/chat/completions", headers=tenant2.headers, timeout=30,
                           json={**small, "user": f"v{n}"})
            assert r.status_code == 200, r.text
    time.sleep(0.3)
    attempts = sql(pg.url, "SELECT created_at FROM ledger WHERE tenant_id = %s AND role = 'attempt'"
                   " AND upstream = 'simb' AND created_at > %s", tenant2.id, tripped)
    late = [a for (a,) in attempts if a > tripped + timedelta(seconds=1)]
    assert len(late) <= len(others), f"after 1 s each other gateway sent the dead replica at most one attempt: {late}"
    assert len(attempts) <= len(others), "they learned of it from the first one, not by failing 5 times each"
    assert n >= 10

    # -- 3. a gateway SIGTERMed: its streams finish, the balancer drains it --------------------------------------
    # (its /readyz says 503 for TOLLWAY_DRAIN_PAUSE_S before its port closes, as the compose file sets it: without
    # the pause a request sent in the moment before the balancer's next check met a closed port, a 502)
    draining = gateways[2]
    tenant3 = make_tenant()
    stream_body = {"model": "slow-model", "max_tokens": 60, "stream": True,
                   "messages": [{"role": "user", "content": "a long answer"}]}
    async def drain() -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def stream_to_end() -> tuple[int, str]:
                async with client.stream("POST", lb + "/v1/chat/completions", headers=tenant3.headers,
                                         json=stream_body) as resp:
                    return resp.status_code, (await resp.aread()).decode()

            streams = [asyncio.create_task(stream_to_end()) for _ in range(6)]
            await asyncio.sleep(0.8)
            in_flight = await asyncio.to_thread(draining.metric, 'tollway_upstream_in_flight{upstream="slow"}',
                                                admin.headers)
            assert in_flight >= 1, "streams on the gateway to drain"
            draining.process.send_signal(signal.SIGTERM)
            during = [await one(client, lb, tenant3.headers, i) for i in range(12)]
            return during, list(await asyncio.gather(*streams))

    during, finished = asyncio.run(drain())
    assert [s for s, _ in during] == [200] * 12, "the balancer sent nothing to the draining gateway"
    for status, body in finished:
        assert status == 200 and body.rstrip().endswith("data: [DONE]"), body[-200:]
    assert draining.process.wait(30) == 0

    # -- 4. a gateway SIGKILLed mid-run: nothing escapes the budget or the ledger --------------------------------
    victim, survivor = gateways[0], gateways[1]
    tenant4 = make_tenant()
    worst = Decimal(60 * 15 + 20 * 3) / 10**6  # the worst case of one slow stream, about
    limit4 = worst * 10
    r = httpx.put(lb + "/v1/admin/budgets", headers=admin.headers, timeout=10,
                  json={"tenant": tenant4.name, "window": "day", "limit_usd": str(limit4)})
    assert r.status_code == 200
    time.sleep(0.5)
    before = slow.metric('tollway_sim_requests_total{model="sim-large"}')
    async def kill_mid_run() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            async def paid_stream(i: int) -> int:
                base = victim.url.removesuffix("/v1") if i % 6 == 0 else lb  # some surely on the victim
                try:
                    async with client.stream("POST", base + "/v1/chat/completions", headers=tenant4.headers,
                                             json={**stream_body, "user": f"k{i}"}) as resp:
                        await resp.aread()
                        return resp.status_code
                except httpx.HTTPError:
                    return -1  # the gateway died under it

            tasks = [asyncio.create_task(paid_stream(i)) for i in range(0, 30, 6)]  # admitted first
            await asyncio.sleep(0.3)
            tasks += [asyncio.create_task(paid_stream(i)) for i in range(30) if i % 6]
            await asyncio.sleep(0.7)
            os.kill(victim.process.pid, signal.SIGKILL)
            victim.process.wait()
            return list(await asyncio.gather(*tasks))

    outcomes = asyncio.run(kill_mid_run())
    assert -1 in outcomes, outcomes  # streams cut by the kill
    sent_upstream = slow.metric('tollway_sim_requests_total{model="sim-large"}') - before

    def swept() -> bool:  # the victim's leases ran out (2 s) and the survivor's sweeper wrote them
        return ledger_rows_upstream() >= sent_upstream and reconcile_drifts(lb, admin, tenant4) == []

    def ledger_rows_upstream() -> int:
        return int(sql(pg.url, "SELECT count(*) FROM ledger WHERE tenant_id = %s AND model = 'slow-model'"
                       " AND status <> 429", tenant4.id)[0][0])

    wait_until(swept, 20, "the dead gateway's requests in the ledger")
    spent = ledger_total(pg.url, tenant4.id)
    assert spent <= limit4, "no overspend through a SIGKILL"
    unsettled = sql(pg.url, "SELECT count(*) FROM ledger WHERE tenant_id = %s AND error_code = 'unsettled'",
                    tenant4.id)[0][0]
    assert unsettled >= 1, "the killed gateway's streams became unsettled rows"
    report = httpx.get(lb + "/v1/reports/costs", headers=admin.headers, params={"tenant": tenant4.name},
                       timeout=30).json()
    assert Decimal(report["totals"]["spend_usd"]) == spent, "the report equals the ledger"
    assert survivor.process.poll() is None
