"""The translation path: a `kind: litellm` upstream, driven through litellm against the scripted upstream."""

from __future__ import annotations

from decimal import Decimal

import pytest
from support import sse_payloads
from support.config import write_config

MSG = [{"role": "user", "content": "through the translator"}]


@pytest.fixture
def litellm_gateway(app_factory, sim, tmp_path, monkeypatch):
    monkeypatch.setenv("TW_SIM_KEY", "sk-test")
    config = write_config(
        tmp_path / "c.yaml", sim.url,
        extra_upstreams=[{"name": "translated", "kind": "litellm", "base_url": sim.url, "api_key": "env::TW_SIM_KEY"}],
        extra_models=[
            {"name": "via-litellm", "upstream": "translated", "upstream_model": "openai/sim-large",
             "price": {"litellm": "gpt-4o-mini"}},
            {"name": "via-litellm-error", "upstream": "translated", "upstream_model": "openai/sim-error"},
            {"name": "via-litellm-overloaded", "upstream": "translated", "upstream_model": "openai/sim-overloaded"},
        ])
    return app_factory(config=config)


async def test_completion_through_litellm_is_priced_from_its_table(litellm_gateway, make_tenant, ledger):
    tenant = make_tenant()
    headers = {"authorization": f"Bearer {tenant.key}"}
    async with litellm_gateway as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=headers,
                                    json={"model": "via-litellm", "messages": MSG, "max_tokens": 4})
        stream = await gw.client.post("/v1/chat/completions", headers=headers, json={
            "model": "via-litellm", "messages": MSG, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}})
        await gw.state.ledger.flush()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "via-litellm"
    assert body["choices"][0]["message"]["content"] == "the gateway keeps spend"
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    # gpt-4o-mini in litellm's bundled table: $0.15 / $0.60 per million tokens; the sim counts 3 + 4 tokens.
    assert row["cost_usd"] == Decimal("0.00000285")
    assert row["price_source"] == "litellm:gpt-4o-mini"
    assert stream.status_code == 200
    assert "the" in stream.text
    assert stream.text.rstrip().endswith("data: [DONE]")
    [usage] = [p["usage"] for p in sse_payloads(stream.text) if p.get("usage")]
    assert usage["prompt_tokens"] == body["usage"]["prompt_tokens"]  # streamed = not streamed
    [streamed] = ledger("request_id = %s", stream.headers["x-request-id"])
    assert streamed["input_tokens"] == row["input_tokens"]


@pytest.mark.parametrize(("model", "status"), [("via-litellm-error", 502), ("via-litellm-overloaded", 503)])
async def test_litellm_errors_are_mapped(litellm_gateway, make_tenant, model, status):
    tenant = make_tenant()
    async with litellm_gateway as gw:
        resp = await gw.client.post("/v1/chat/completions", headers={"authorization": f"Bearer {tenant.key}"},
                                    json={"model": model, "messages": MSG})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["type"] == "api_error"
