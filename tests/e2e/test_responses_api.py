"""End to end: OpenAI's Responses API through `tollway serve`, driven by the official openai SDK unchanged:
``responses.create`` streamed and not, the SDK's stream helper, ``previous_response_id`` over stored
responses, ``retrieve`` and ``delete``, function tools, the ledger's endpoint and the cost report by it."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import pytest


def wait_rows(ledger, request_id: str) -> list[dict]:
    deadline = time.monotonic() + 5
    while not (rows := ledger("request_id = %s", request_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def allow_storing(gateway, admin, tenant) -> None:
    resp = httpx.put(f"{gateway.url}/admin/policies", headers=admin.headers,
                     json={"tenant": tenant.name, "store_content": True})
    assert resp.status_code == 200, resp.text


@pytest.fixture
def sdk(gateway, make_tenant):
    tenant = make_tenant()
    return openai.OpenAI(base_url=gateway.url, api_key=tenant.key, max_retries=0), tenant


def test_create_answers_with_usage_the_tollway_object_and_a_ledger_row(sdk, ledger):
    client, tenant = sdk
    raw = client.responses.with_raw_response.create(
        model="sim-large", input="how much does this cost", instructions="Be brief.", max_output_tokens=6,
        metadata={"ticket": "T-1"}, safety_identifier="ada")
    response = raw.parse()
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.output_text == "the gateway keeps spend within budget"
    assert response.status == "incomplete"  # it stopped at max_output_tokens, as OpenAI says it
    assert response.incomplete_details.reason == "max_output_tokens"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (7, 6)  # "Be brief." + the input
    assert response.metadata == {"ticket": "T-1"}
    assert response.instructions == "Be brief."
    assert response.store is False  # the tenant's content policy keeps nothing: not stored
    tollway = response.model_extra["tollway"]
    assert tollway["model"] == "sim-large"
    assert tollway["cost_usd"] == raw.headers["x-tollway-cost-usd"]
    [row] = wait_rows(ledger, raw.headers["x-request-id"])
    assert (row["tenant_id"], row["endpoint"], row["end_user"], row["output_tokens"]) == (
        tenant.id, "responses", "ada", 6)


def test_the_sdk_stream_helper_gets_the_whole_event_sequence(sdk, ledger):
    client, _ = sdk
    with client.responses.stream(model="sim-small", input=[{"role": "user", "content": "hi there"}],
                                 max_output_tokens=5) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:-4] == ["response.output_text.delta"] * 5
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert final.output_text == "the gateway keeps spend within"
    assert final.usage.output_tokens == 5
    assert final.model_extra["tollway"]["model"] == "sim-small"
    assert wait_rows(ledger, final.model_extra["tollway"]["request_id"])[0]["endpoint"] == "responses"


def test_previous_response_id_continues_a_stored_conversation_within_the_tenant(gateway, sdk, make_tenant, admin,
                                                                                  sim):
    client, tenant = sdk
    allow_storing(gateway, admin, tenant)
    first = client.responses.create(model="sim-echo", input="my name is ada", instructions="First rules.")
    assert first.store is True
    assert first.output_text == "my name is ada"
    with client.responses.stream(model="sim-echo", input="what is my name", previous_response_id=first.id,
                                 instructions="Second rules.") as stream:
        second = stream.get_final_response()
    assert second.previous_response_id == first.id
    sent = orjson.loads(sim.get("/sim/last-request?model=sim-echo"))["messages"]
    # the earlier turn, without its instructions (they are not carried over), then this one
    assert [(m["role"], m["content"]) for m in sent] == [
        ("system", "Second rules."), ("user", "my name is ada"), ("assistant", "my name is ada"),
        ("user", "what is my name")]
    assert client.responses.retrieve(second.id).output_text == "what is my name"

    stranger = openai.OpenAI(base_url=gateway.url, api_key=make_tenant().key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError) as other:
        stranger.responses.create(model="sim-echo", input="and mine?", previous_response_id=second.id)
    assert other.value.body["param"] == "previous_response_id"

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as broken:  # the conversation's first turn is gone
        client.responses.create(model="sim-echo", input="again", previous_response_id=second.id)
    assert first.id in broken.value.message


def test_store_is_refused_where_the_content_policy_keeps_nothing(sdk):
    client, _ = sdk
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="sim-large", input="keep this", store=True)
    assert refused.value.body["param"] == "store"
    assert "content policy" in refused.value.message
    kept = client.responses.create(model="sim-large", input="do not keep this", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)


def test_function_tools_round_trip_streamed_and_not(sdk, sim):
    client, _ = sdk
    tools = [{"type": "function", "name": "lookup_fee", "description": "Look a fee up",
              "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]
    called = client.responses.create(model="sim-tools", input="wire fee", tools=tools)
    [call] = [item for item in called.output if item.type == "function_call"]
    assert (call.name, orjson.loads(call.arguments)) == ("lookup_fee", {"query": "wire fee"})
    with client.responses.stream(model="sim-tools", input="card fee", tools=tools) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    [streamed] = [item for item in final.output if item.type == "function_call"]
    assert orjson.loads(streamed.arguments) == {"query": "card fee"}
    answered = client.responses.create(model="sim-tools", tools=tools, max_output_tokens=3, input=[
        {"role": "user", "content": "wire fee"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "35 dollars"}])
    assert answered.output_text == "the gateway keeps"
    sent = orjson.loads(sim.get("/sim/last-request?model=sim-tools"))["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == sent[2]["tool_call_id"] == call.call_id


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),  # a function tool, its name missing
    ({"input": "x", "tools": [{"type": "function", "name": ""}]}, "tools[0].name"),  # was forwarded
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
     "input[0].content[0].type"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "api_base": "http://attacker.example"}, "api_base"),
    ({"input": "x", "previous_response_id": "../../etc"}, "previous_response_id"),
    ({"input": "x", "max_output_tokens": 0}, "max_tokens"),
    ({}, "input"),
])
def test_bad_input_is_a_400_in_openai_shape_naming_the_field(gateway, sdk, ledger, body, param):
    _, tenant = sdk
    resp = httpx.post(f"{gateway.url}/responses", headers=tenant.headers, json={"model": "sim-large", **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_reports_group_by_endpoint(gateway, sdk, admin):
    client, tenant = sdk
    client.chat.completions.create(model="sim-small", messages=[{"role": "user", "content": "a"}], max_tokens=2)
    client.responses.create(model="sim-small", input="b", max_output_tokens=3)
    client.completions.create(model="sim-small", prompt="c", max_tokens=4)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        report = httpx.get(f"{gateway.url}/reports/costs", headers=admin.headers,
                           params={"group_by": "endpoint", "tenant": tenant.name}).json()
        groups = {g["group"]: (g["requests"], g["output_tokens"]) for g in report["groups"]}
        if len(groups) == 3:
            break
        time.sleep(0.1)
    assert groups == {"chat.completions": (1, 2), "responses": (1, 3), "completions": (1, 4)}
