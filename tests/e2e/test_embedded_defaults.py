"""The fresh-machine path: `tollway serve` with nothing configured starts embedded PostgreSQL, Redis and
the local SmolLM2 model, prints a key once, and answers the openai SDK."""

from __future__ import annotations

import time
from decimal import Decimal

import openai
import psycopg
import pytest
from support.processes import bootstrap_key

from tollway.local.embedded import LOCAL_MODEL_NAME


@pytest.fixture(scope="module")
def embedded(serve_module):
    env = {"TOLLWAY_DATABASE_URL": "", "TOLLWAY_REDIS_URL": "", "TOLLWAY_UPSTREAMS": "", "TOLLWAY_CONFIG": ""}
    served = serve_module(env=env, ready_timeout=240)
    return served, bootstrap_key(served)


def test_local_model_answers_streaming_and_not(embedded):
    served, key = embedded
    sdk = openai.OpenAI(base_url=served.url, api_key=key, max_retries=0, timeout=60)
    assert LOCAL_MODEL_NAME in {m.id for m in sdk.models.list()}
    msg = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    completion = sdk.chat.completions.create(model=LOCAL_MODEL_NAME, messages=msg, max_tokens=12, temperature=0)
    assert completion.choices[0].message.content.strip()
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 12
    chunks = list(sdk.chat.completions.create(model=LOCAL_MODEL_NAME, messages=msg, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    # llama.cpp sends no usage in streams: the gateway counts the prompt as the model does (its tokenizer
    # over its chat template) and still gives the promised chunk.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens == completion.usage.prompt_tokens  # streamed = not streamed


def test_embedded_database_holds_the_ledger(embedded):
    served, key = embedded
    sdk = openai.OpenAI(base_url=served.url, api_key=key, max_retries=0, timeout=60)
    raw = sdk.chat.completions.with_raw_response.create(
        model=LOCAL_MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    request_id = raw.headers["x-request-id"]
    # priced by the machine time it uses, with no configuration: the quick start shows real costs
    assert raw.headers["x-tollway-price-source"] == "default:cpu_hour"
    assert Decimal(raw.headers["x-tollway-cost-usd"]) > 0
    port = (served.log.parent / "data" / "postgres.port").read_text().strip()
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + 5
    rows: list[tuple[object, ...]] = []
    while not rows and time.monotonic() < deadline:
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT model, status, usage_source, cost_usd FROM ledger WHERE request_id = %s",
                                (request_id,)).fetchall()
        time.sleep(0.05)
    assert rows == [(LOCAL_MODEL_NAME, 200, "upstream", Decimal(raw.headers["x-tollway-cost-usd"]))]


def test_the_console_shows_what_the_quick_start_charged(embedded):
    """Three SDK requests to the local model on a fresh quick start: the console's spend for the model grows
    by exactly what their headers said, and it is not zero."""
    import subprocess
    import sys

    import httpx

    served, key = embedded
    made = subprocess.run([sys.executable, "-m", "tollway.cli", "keys", "create", "--tenant", "default", "--role",
                           "finance"], capture_output=True, text=True, env=served.env, timeout=120)
    assert made.returncode == 0, made.stderr
    finance = made.stdout.strip().splitlines()[-1]
    base = served.url.removesuffix("/v1")

    def spent(client: httpx.Client) -> Decimal:
        view = client.get("/console/costs.json").json()
        rows = next(s["rows"] for s in view["sections"] if s["group"] == "model")
        return sum((Decimal(r["spend_usd"]) for r in rows if r["group"] == LOCAL_MODEL_NAME), Decimal(0))

    with httpx.Client(base_url=base, timeout=30) as console:
        signed = console.post("/console/login", data={"key": finance}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        before = spent(console)
        sdk = openai.OpenAI(base_url=served.url, api_key=key, max_retries=0, timeout=60)
        charged = Decimal(0)
        for question in ("Name a color.", "Name a fruit.", "Name a city."):
            raw = sdk.chat.completions.with_raw_response.create(
                model=LOCAL_MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=6)
            charged += Decimal(raw.headers["x-tollway-cost-usd"])
        assert charged > 0
        deadline = time.monotonic() + 5
        while spent(console) - before != charged and time.monotonic() < deadline:  # the ledger writes behind
            time.sleep(0.1)
        assert spent(console) - before == charged
