"""Costs page load time at 10k, 100k and 1M ledger rows in the period: server time (the page's HTTP
response, measured by the client on loopback) and a full load in headless Chromium (navigation start to the
load event), beside the API's cost report for the same rows over a window that is not whole UTC days (its
whole days from the daily rollup, the two part days at its ends from the ledger). Target: under 300 ms at 1M
rows for both.

    .venv/bin/python bench/console/costs_page.py [--sizes 10000,100000,1000000] [--runs 15]

Rows are spread over 20 days with 997 end users (each on every day), 20 keys, 10 tags, 5 prompt versions and 4 models; they
are inserted with INSERT ... SELECT, so the ledger's rollup trigger runs as it does for the ledger writer.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import free_port, wait_http

from tollway.local.embedded import EmbeddedPostgres

INSERT = """
INSERT INTO ledger (request_id, created_at, tenant_id, key_id, end_user, endpoint, model, tier, route_reason, role,
                    attempt, cost_usd, input_tokens, output_tokens, status, tags, prompt_name, prompt_version,
                    latency_ms, baseline_usd, cache_hit, saved_usd)
SELECT 'b-' || %(offset)s + g, %(end)s - (g %% 20) * interval '1 day' - (g %% 86000) * interval '1 second',
       %(tenant)s, %(key)s + g %% 20, 'user' || g %% 997, 'chat.completions',
       (ARRAY['large-a', 'large-b', 'small-a', 'small-b'])[1 + g %% 4], CASE WHEN g %% 4 < 2 THEN 'large' ELSE 'small' END,
       (ARRAY['requested', 'auto:difficulty=0.7;target=large-a', 'auto:difficulty=0.2;target=small-a'])[1 + g %% 3],
       CASE WHEN g %% 25 = 0 THEN 'attempt' ELSE 'answer' END, CASE WHEN g %% 25 = 0 THEN 2 ELSE 1 END,
       (g %% 997) * 0.0000013, 100 + g %% 900, 10 + g %% 300, CASE WHEN g %% 50 = 0 THEN 502 ELSE 200 END,
       ARRAY['tag' || g %% 10], 'prompt' || g %% 5, (g %% 3)::text, 12, (g %% 997) * 0.000004,
       g %% 17 = 0, CASE WHEN g %% 17 = 0 THEN 0.0002 ELSE 0 END
FROM generate_series(1, %(count)s) AS g
"""


def timed_get(opener: urllib.request.OpenerDirector, url: str, headers: dict[str, str] | None = None) -> float:
    req = urllib.request.Request(url, headers=headers or {})
    start = time.perf_counter()
    with opener.open(req, timeout=120) as resp:
        resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - start


def p50_p95(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000


def browser_loads(base: str, key: str, url: str, runs: int) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))
    try:
        driver.get(f"{base}/console/login")
        driver.find_element(By.ID, "key").send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "form[action='/console/login'] button").click()
        time.sleep(1)
        out = []
        for _ in range(runs):
            driver.get(url)
            timing = driver.execute_script("const t = performance.getEntriesByType('navigation')[0];"
                                           " return [t.startTime, t.loadEventEnd];")
            out.append((timing[1] - timing[0]) / 1000)
        return out
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="tollway-costs-bench-"))
    pg = EmbeddedPostgres(work / "pg")
    pg.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        import asyncio

        import psycopg

        from tollway.gateway.tenancy.keys import create_key, create_tenant, load_key_hasher
        from tollway.infra.db import migrate

        asyncio.run(migrate(pg.url))
        hasher = load_key_hasher(os.environ.get("TOLLWAY_KEY_SECRET"), None, work / "data")  # the gateway below reads the same data dir

        async def keys() -> tuple[int, int, str]:
            async with await psycopg.AsyncConnection.connect(pg.url, autocommit=True) as conn:
                tid = await create_tenant(conn, "bench")
                first = await create_key(conn, "bench", hasher=hasher, role="app")
                for _ in range(19):
                    await create_key(conn, "bench", hasher=hasher, role="app")
                finance = await create_key(conn, "bench", hasher=hasher, role="finance")
            return tid, first.id, finance.secret

        tenant, first_key, finance = asyncio.run(keys())
        sim_port, port = free_port(), free_port()
        env = {**os.environ, "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_DATA_DIR": str(work / "data"),
               "TOLLWAY_BOOTSTRAP": "false"}
        log = work / "sim.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "tollway.cli", "sim-upstream", "--port", str(sim_port),
                                       "--models", "large-a,large-b,small-a,small-b"],
                                      stdout=log.open("wb"), stderr=subprocess.STDOUT))
        wait_http(f"http://127.0.0.1:{sim_port}/v1/models", 30, procs[-1], log)
        log = work / "serve.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "tollway.cli", "serve", "--port", str(port),
                                       "--upstream", f"http://127.0.0.1:{sim_port}/v1"], env=env,
                                      stdout=log.open("wb"), stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", 120, procs[-1], log)
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        opener.open(urllib.request.Request(f"{base}/console/login", data=urllib.parse.urlencode(
            {"key": finance}).encode()), timeout=30).read()
        end = datetime.now(UTC).replace(hour=23, minute=0, second=0, microsecond=0)
        period = {"from": (end - timedelta(days=19)).date().isoformat(), "to": end.date().isoformat()}
        page = f"{base}/console/costs?" + urllib.parse.urlencode(period)
        # the same rows over a window of part days: whole days from the rollup, the ends from the ledger
        raw = f"{base}/v1/reports/costs?" + urllib.parse.urlencode(
            {"group_by": "model", "from": period["from"] + "T00:00:01Z", "to": period["to"] + "T23:59:59Z"})
        results = []
        inserted = 0
        for size in sizes:
            t0 = time.perf_counter()
            with psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute(INSERT, {"offset": inserted, "end": end, "tenant": tenant, "key": first_key,
                                      "count": size - inserted})
                conn.execute("ANALYZE ledger_daily")
                rollup_rows = conn.execute("SELECT count(*) FROM ledger_daily WHERE tenant_id = %s",
                                           (tenant,)).fetchone()
            insert_s = time.perf_counter() - t0
            inserted = size
            for _ in range(3):
                timed_get(opener, page)  # warm
            server = [timed_get(opener, page) for _ in range(args.runs)]
            raw_times = [timed_get(opener, raw, {"authorization": f"Bearer {finance}"}) for _ in range(5)]
            browser = browser_loads(base, finance, page, max(5, args.runs // 3))
            results.append({"rows": size, "rollup_rows": rollup_rows[0] if rollup_rows else 0,
                            "insert_s": round(insert_s, 1), "page_ms": p50_p95(server),
                            "browser_ms": p50_p95(browser), "raw_report_ms": p50_p95(raw_times)})
            print(json.dumps(results[-1]), flush=True)
        print()
        print(f"{'ledger rows':>12} {'rollup rows':>12} {'page p50/p95 ms':>18} {'browser load p50/p95 ms':>24}"
              f" {'part-day window report p50/p95 ms':>30}")
        for r in results:
            print(f"{r['rows']:>12,} {r['rollup_rows']:>12,} {r['page_ms'][0]:>8.1f} / {r['page_ms'][1]:>7.1f}"
                  f" {r['browser_ms'][0]:>13.1f} / {r['browser_ms'][1]:>7.1f}"
                  f" {r['raw_report_ms'][0]:>19.1f} / {r['raw_report_ms'][1]:>7.1f}")
        print("target: page under 300 ms at 1M rows:", "met" if results[-1]["page_ms"][0] < 300 else "NOT met")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
