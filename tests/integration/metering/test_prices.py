"""Prices without a config file: a model found through discovery is marked unpriced wherever its cost
shows, is priced from the CLI or the API for every replica at once, and the local CPU model is priced by
the machine time it uses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from tollway.config import RawPrice
from tollway.routing import Usage
from tollway.routing.catalog import resolve_price

ASK = {"model": "sim-echo", "messages": [{"role": "user", "content": "price me"}], "max_tokens": 8}


def test_a_cpu_hour_price_attributes_machine_time() -> None:
    price = resolve_price(RawPrice(cpu_hour_usd=Decimal("0.09"), prefill_tokens_per_s=Decimal(250),
                                   decode_tokens_per_s=Decimal(70)))
    # 250 prompt tokens = 1 s, 70 output tokens = 1 s: 2 s of an hour at $0.09
    assert price.cost(Usage(input_tokens=250, output_tokens=70)) == Decimal("0.09") * 2 / 3600
    assert price.source == "cpu_hour"


async def test_a_discovered_model_is_unpriced_until_priced_and_then_every_answer_costs(app_factory, make_tenant,
                                                                                    admin, sim, pg, tmp_path):
    tenant = make_tenant()
    async with app_factory(config=None, upstreams=[sim.url]) as gw:  # the quick start: discovery, no config
        first = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
        assert first.status_code == 200, first.text
        assert first.headers["x-tollway-price-source"] == "unpriced"
        assert first.json()["tollway"]["price_source"] == "unpriced"
        listed = (await gw.client.get("/v1/admin/models", headers=admin.headers)).json()["data"]
        assert {m["model"]: m["source"] for m in listed}["sim-echo"] == "unpriced"

        # from the CLI, straight to the database: the running gateway applies it through the change channel
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "tollway.cli", "models", "price", "sim-echo", "--input-per-mtok",
                             "2", "--output-per-mtok", "8"], capture_output=True, text=True,
            env={"TOLLWAY_DATABASE_URL": pg.url, "PATH": "/usr/bin:/bin"}, cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr
        for _ in range(50):
            listed = (await gw.client.get("/v1/admin/models", headers=admin.headers)).json()["data"]
            if {m["model"]: m["source"] for m in listed}["sim-echo"] == "set":
                break
            await asyncio.sleep(0.1)
        second = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
        assert second.headers["x-tollway-price-source"] == "set"
        usage = second.json()["usage"]
        expected = (Decimal(usage["prompt_tokens"]) * 2 + Decimal(usage["completion_tokens"]) * 8) / 10**6
        assert Decimal(second.headers["x-tollway-cost-usd"]) == expected.quantize(Decimal("1e-10"))

        # over the API, then removed again
        put = await gw.client.put("/v1/admin/models/sim-echo/price", headers=admin.headers,
                                  json={"price": {"cpu_hour_usd": "0.36", "prefill_tokens_per_s": 100,
                                                  "decode_tokens_per_s": 10}})
        assert put.status_code == 200, put.text
        assert put.json()["source"] == "set:cpu_hour"
        bad = await gw.client.put("/v1/admin/models/sim-echo/price", headers=admin.headers,
                                  json={"price": {"cpu_hour_usd": "0.36"}})
        assert bad.status_code == 400
        assert "prefill_tokens_per_s" in bad.json()["error"]["message"]
        unknown = await gw.client.put("/v1/admin/models/nope/price", headers=admin.headers,
                                      json={"price": {"input_per_mtok": 1}})
        assert unknown.status_code == 404
        gone = await gw.client.delete("/v1/admin/models/sim-echo/price", headers=admin.headers)
        assert gone.json()["deleted"] is True
        third = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
        assert third.headers["x-tollway-price-source"] == "unpriced"


def test_the_local_model_has_a_default_price_by_machine_time(tmp_path: Path) -> None:
    """Without a config the catalog gives the local model the settings' CPU-hour price."""
    from tollway.config import RawConfig
    from tollway.local.embedded import LOCAL_MODEL_NAME
    from tollway.routing import build_catalog, set_default_prices
    from tollway.settings import Settings

    settings = Settings(data_dir=tmp_path)
    catalog = build_catalog(RawConfig(), {"local": [LOCAL_MODEL_NAME]}, [])
    assert catalog.models[LOCAL_MODEL_NAME].price.source == "unpriced"
    set_default_prices(catalog, {LOCAL_MODEL_NAME: RawPrice(
        cpu_hour_usd=settings.local_cpu_hour_usd, prefill_tokens_per_s=settings.local_prefill_tokens_per_s,
        decode_tokens_per_s=settings.local_decode_tokens_per_s)})
    catalog.set_prices(catalog.default_prices)
    price = catalog.models[LOCAL_MODEL_NAME].price
    assert price.source == "default:cpu_hour"
    assert price.cost(Usage(input_tokens=34, output_tokens=20)) > 0


async def test_a_usd_budget_names_the_models_it_cannot_see(app_factory, make_tenant, admin, sim, pg, tmp_path):
    """A discovered model costs $0 until priced, so a USD limit never counts its answers: setting one says so,
    over the API (from the models the gateway serves), on the console's Budgets page, and from the CLI (from
    the tenant's recent answers), and stops saying so once the model has a price. A token limit counts them: no warning."""
    tenant = make_tenant()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tollway.cli", *args], capture_output=True, text=True,
                              env={"TOLLWAY_DATABASE_URL": pg.url, "PATH": "/usr/bin:/bin"}, cwd=tmp_path,
                              timeout=120)

    async with app_factory(config=None, upstreams=[sim.url]) as gw:
        async def put(**body: object) -> dict[str, object]:
            r = await gw.client.put("/v1/admin/budgets", headers=admin.headers,
                                    json={"tenant": tenant.name, **body})
            assert r.status_code == 200, r.text
            return r.json()

        assert "warnings" not in await put(window="month", limit_tokens=1000)
        login = await gw.client.post("/console/login", data={"key": admin.key}, follow_redirects=False)
        assert login.status_code == 303
        page = await gw.client.get("/console/budgets", params={"tenant": tenant.name})
        assert page.status_code == 200 and 'id="unpriced"' not in page.text  # a token limit counts them
        [warning] = (await put(window="day", limit_usd="5"))["warnings"]
        assert warning["code"] == "unpriced_models" and "sim-echo" in warning["models"]
        assert "never count toward limit_usd" in warning["message"]
        page = await gw.client.get("/console/budgets", params={"tenant": tenant.name})
        assert 'id="unpriced"' in page.text and "sim-echo" in page.text  # the console says so too

        answer = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json=ASK)
        assert answer.status_code == 200, answer.text
        await gw.state.ledger.flush()
        out = await asyncio.to_thread(cli, "budgets", "set", "--tenant", tenant.name, "--window", "hour",
                                      "--usd", "1")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["warnings"][0]["models"] == ["sim-echo"]
        assert "warning: sim-echo has no price" in out.stderr

        priced = await gw.client.put("/v1/admin/models/sim-echo/price", headers=admin.headers,
                                     json={"price": {"input_per_mtok": 1, "output_per_mtok": 2}})
        assert priced.status_code == 200, priced.text
        try:
            def named(body: dict[str, object]) -> list[str]:  # the upstream serves other unpriced models too
                return [m for w in body.get("warnings", []) for m in w["models"]]  # type: ignore[attr-defined]

            for _ in range(50):  # the change channel brings the price to this gateway's catalog
                if "sim-echo" not in named(body := await put(window="day", limit_usd="6")):
                    break
                await asyncio.sleep(0.1)
            assert "sim-echo" not in named(body)
            out = await asyncio.to_thread(cli, "budgets", "set", "--tenant", tenant.name, "--window", "hour",
                                          "--usd", "2")  # this tenant's answers were all sim-echo's
            assert out.returncode == 0 and "warnings" not in json.loads(out.stdout), out.stderr
            assert out.stderr == ""
        finally:
            await gw.client.delete("/v1/admin/models/sim-echo/price", headers=admin.headers)
