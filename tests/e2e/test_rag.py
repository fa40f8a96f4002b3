"""End to end: `tollway ingest` (the CLI, a client of the running gateway) fills a collection from a folder;
the official openai SDK asks with ``extra_body={"retrieval": ...}``, JSON and stream; the scripted upstream
receives the context; the answer carries its sources."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from support.processes import client_cli

DOCS = {
    "handbook/fees.md": "# Fees\n\n## Overdraft\n\nAn overdraft costs 35 dollars per item, at most three a day.\n\n"
                        "## Wires\n\nInternational wires cost 45 dollars.",
    "handbook/cards.md": "# Cards\n\n## Lost cards\n\nFreeze the card in the app, then order a replacement.",
    "handbook/notes.txt": "Branches open at nine and close at five on weekdays.",
    "handbook/skip.bin": "not a text suffix: the folder walk leaves it out",
}


def test_ingest_a_folder_then_ask_with_the_openai_sdk(gateway, make_tenant, sim, tmp_path):
    tenant = make_tenant(ingest=True)
    for name, text in DOCS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    first = client_cli("ingest", "handbook", "--collection", "kb", key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "3 documents in" in first.stdout
    assert "3 created, 0 replaced, 0 unchanged, 0 failed" in first.stdout
    assert "documents/s" in first.stdout
    assert "index version: kb@3+local/all-MiniLM-L6-v2-int8+c200o32s1024w240" in first.stdout
    (tmp_path / "handbook/notes.txt").write_text("Branches open at eight now.")
    again = client_cli("ingest", "handbook", "--collection", "kb", key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert "0 created, 1 replaced, 2 unchanged, 0 failed" in again.stdout, again.stdout + again.stderr
    found = client_cli("search", "what does an overdraft cost", "--collection", "kb", "--json", key=tenant.key,
                    url=gateway.url, cwd=tmp_path)
    assert json.loads(found.stdout)["sources"][0]["source"] == "handbook/fees.md"
    for flag in ("--context-tokens", "-k"):  # 0 is refused as the API refuses it, not taken for "the default"
        zero = client_cli("search", "what does an overdraft cost", "--collection", "kb", flag, "0", key=tenant.key,
                          url=gateway.url, cwd=tmp_path)
        assert (zero.returncode, zero.stdout) == (2, ""), zero.stdout
        assert "400" in zero.stderr and "greater than or equal to 1" in zero.stderr, zero.stderr

    sdk = openai.OpenAI(base_url=gateway.url, api_key=tenant.key, max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model="sim-large", max_tokens=5, messages=[{"role": "user", "content": "What does an overdraft cost?"}],
        extra_body={"retrieval": {"collection": "kb", "context_tokens": 300}})
    completion = raw.parse()
    info = completion.model_extra["tollway"]["retrieval"]
    assert info["sources"][0]["source"] == "handbook/fees.md"
    assert info["index_version"] == "kb@4+local/all-MiniLM-L6-v2-int8+c200o32s1024w240"
    assert raw.headers["x-tollway-index-version"] == info["index_version"]
    sent = httpx.get(sim.url.removesuffix("/v1") + "/sim/last-request",  # the upstream is shared: this request's
                     params={"model": "sim-large", "contains": "What does an overdraft cost?"}).json()
    assert sent["messages"][0]["role"] == "system"
    assert "35 dollars" in sent["messages"][0]["content"]
    assert "retrieval" not in sent

    stream = sdk.chat.completions.create(
        model="sim-large", max_tokens=5, stream=True, messages=[{"role": "user", "content": "Lost my card"}],
        extra_body={"retrieval": {"collection": "kb", "context_tokens": 300}})
    chunks = list(stream)
    final = chunks[-1].model_extra["tollway"]["retrieval"]
    assert final["sources"][0]["source"] == "handbook/cards.md"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_cli_reports_refusals_and_bad_files(gateway, make_tenant, tmp_path):
    tenant = make_tenant()  # no --ingest
    (tmp_path / "a.md").write_text("# A\n\ntext")
    refused = client_cli("ingest", "a.md", "--collection", "kb", key=tenant.key, url=gateway.url, cwd=tmp_path)
    assert refused.returncode == 2
    assert "ingest" in refused.stderr
    writer = make_tenant(ingest=True)
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    mixed = client_cli("ingest", "a.md", "empty.md", "latin1.txt", "--collection", "kb", key=writer.key,
                    url=gateway.url, cwd=tmp_path)
    assert mixed.returncode == 1
    assert "1 created" in mixed.stdout
    assert "2 failed" in mixed.stdout
    assert "failed: empty.md" in mixed.stderr
    assert "failed: latin1.txt: not UTF-8 text" in mixed.stderr


def test_the_local_embedder_is_a_model_like_any_other(gateway, make_tenant, ledger):
    tenant = make_tenant()
    sdk = openai.OpenAI(base_url=gateway.url, api_key=tenant.key, max_retries=0)
    assert "local/all-MiniLM-L6-v2-int8" in {m.id for m in sdk.models.list()}
    raw = sdk.embeddings.with_raw_response.create(model="local/all-MiniLM-L6-v2-int8",
                                                  input=["reset my password", "forgot my password", "weather"])
    got = raw.parse()  # the SDK asks for base64 by default and decodes it
    vectors = [d.embedding for d in got.data]
    assert [len(v) for v in vectors] == [384] * 3
    assert got.usage.prompt_tokens > 0
    same = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    other = sum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    assert same > other + 0.2  # normalised: a dot product is the cosine
    floats = sdk.embeddings.create(model="local/all-MiniLM-L6-v2-int8", input="reset my password",
                                   encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="local/all-MiniLM-L6-v2-int8", input=[[1, 2, 3]])
    assert refused.value.body["param"] == "input"
    deadline = time.monotonic() + 5
    while not (rows := ledger("request_id = %s", raw.headers["x-request-id"])):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (rows[0]["model"], rows[0]["cost_usd"], rows[0]["input_tokens"]) == (
        "local/all-MiniLM-L6-v2-int8", 0, got.usage.prompt_tokens)
