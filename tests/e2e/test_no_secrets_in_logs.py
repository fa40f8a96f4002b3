"""A whole scenario against `tollway serve` at debug level, then every log line it wrote is searched for
the secrets it handled: tenant keys (good, wrong and new), the provider key, the console session."""

from __future__ import annotations

import httpx
import openai
from support.config import write_config


def test_no_key_or_provider_secret_reaches_a_log_line(serve, sim, pg, redis_url, make_tenant, make_key,
                                                      tmp_path):
    provider_key = "sk-provider-" + "9" * 24
    config = write_config(
        tmp_path / "tollway.yaml", sim.url,
        extra_upstreams=[{"name": "provider", "kind": "litellm", "base_url": sim.url,
                          "api_key": "env::TW_PROVIDER_KEY"}],
        extra_models=[{"name": "hosted", "upstream": "provider", "upstream_model": "openai/sim-large"},
                      {"name": "hosted-error", "upstream": "provider", "upstream_model": "openai/sim-error"}])
    gateway = serve("--config", str(config), env={
        "TOLLWAY_DATABASE_URL": pg.url, "TOLLWAY_REDIS_URL": redis_url, "TOLLWAY_BOOTSTRAP": "false",
        "TOLLWAY_LOG_LEVEL": "debug", "TW_PROVIDER_KEY": provider_key})
    app = make_tenant()
    admin = make_key(app.name, "admin")
    finance = make_key(app.name, "finance")
    wrong = "tw-" + "W" * 43
    client = openai.OpenAI(api_key=app.key, base_url=gateway.url, max_retries=0)
    msgs = [{"role": "user", "content": "hello"}]
    client.chat.completions.create(model="sim-large", messages=msgs)
    client.chat.completions.create(model="hosted", messages=msgs)
    list(client.chat.completions.create(model="hosted", messages=msgs, stream=True))
    client.embeddings.create(model="sim-embed", input="x")
    for model in ("hosted-error", "sim-error"):
        try:
            client.chat.completions.create(model=model, messages=msgs)
        except openai.APIError:
            pass
    assert httpx.post(gateway.url + "/chat/completions", headers={"authorization": f"Bearer {wrong}"},
                      json={"model": "sim-large", "messages": msgs}).status_code == 401
    assert httpx.post(gateway.url + "/chat/completions", headers={"authorization": f"Bearer {app.key}"},
                      json={"model": "hosted", "messages": msgs, "api_key": provider_key}).status_code == 400
    created = httpx.post(gateway.url + "/admin/keys", headers={"authorization": f"Bearer {admin}"},
                         json={"tenant": app.name, "role": "app"})
    assert created.status_code == 201, created.text
    new_key = created.json()["key"]
    assert httpx.get(gateway.url + "/models", headers={"authorization": f"Bearer {new_key}"}).status_code == 200
    base = gateway.url.removesuffix("/v1")
    login = httpx.post(base + "/console/login", data={"key": finance}, follow_redirects=False)
    assert login.status_code == 303
    session = login.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    gateway.stop()
    log = gateway.log.read_text()
    assert "debug" in log.lower() or len(log.splitlines()) > 3  # something was logged at all
    for secret in (app.key, admin, finance, wrong, new_key, provider_key, session):
        assert secret not in log
        assert secret[-16:] not in log  # nor a tail of it
