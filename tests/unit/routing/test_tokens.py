"""A request's prompt as a budget reserves it: what a chat template renders besides the messages' texts."""

from __future__ import annotations

import json

from tollway.routing.tokens import _DefinitionCounts, count_messages, count_prompt, prompt_chars
from tollway.tokens import count_text

QUESTION = {"role": "user", "content": "how much does a wire cost"}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look a fee up in the fee table",
                                           "parameters": {"type": "object", "properties": {"fee": {"type": "string"}}}}}]


def test_tool_calls_in_the_conversation_and_names_are_counted():
    arguments = json.dumps({"query": "international wire fees for business accounts"})
    call = {"role": "assistant", "content": None, "name": "teller",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]}
    legacy = {"role": "assistant", "content": None, "function_call": {"name": "lookup", "arguments": arguments}}
    bare = {"role": "assistant", "content": None}
    base = count_messages([QUESTION, bare])
    assert count_messages([QUESTION, call]) == base + count_text("teller") + count_text("lookup") + count_text(arguments)
    assert count_messages([QUESTION, legacy]) == base + count_text("lookup") + count_text(arguments)
    # shapes an upstream would refuse count what they hold, and nothing breaks
    odd = {"role": "assistant", "content": None, "tool_calls": [None, {"function": "x"}, {"function": {"arguments": 3}}]}
    assert count_messages([QUESTION, odd]) == base
    assert prompt_chars([QUESTION, call], {}) == len(QUESTION["content"]) + len("teller") + len("lookup") + len(arguments)


def test_definitions_a_template_renders_are_counted_as_their_json():
    plain = count_prompt([QUESTION], {"temperature": 0})
    assert plain == count_messages([QUESTION])
    with_tools = count_prompt([QUESTION], {"tools": TOOLS, "tool_choice": "auto"})
    assert with_tools == plain + count_text(json.dumps({"tools": TOOLS}, separators=(",", ":")))
    documents = [{"title": "fees", "text": "a wire costs 25 dollars"}]
    both = count_prompt([QUESTION], {"functions": [TOOLS[0]["function"]], "documents": documents})
    assert both > plain + count_text("a wire costs 25 dollars")
    assert count_prompt([QUESTION], {"tools": []}) == plain  # an empty list renders nothing
    assert prompt_chars([QUESTION], {"tools": TOOLS}) > len(json.dumps(TOOLS)) // 2


def test_the_definitions_count_is_kept_per_tenant_and_bounded():
    counts = _DefinitionCounts(size=3)
    text = json.dumps({"tools": TOOLS})
    assert counts.count(1, text) == counts.count(2, text) == count_text(text)
    assert len(counts._counts) == 2  # one entry per tenant: a count cached for one is not another's
    for i in range(10):
        counts.count(1, text + " " * i)
    assert len(counts._counts) == 3


def test_media_parts_are_counted_by_type():
    from tollway.routing.tokens import media_parts

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "compare"}, image, image,
                                             {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]},
                {"role": "user", "content": "and this"}, {"role": "assistant", "content": None}, "not a message"]
    assert media_parts(messages) == 3
    assert media_parts([QUESTION]) == 0


def test_a_predicted_outputs_text_is_counted():
    from tollway.routing.tokens import prediction_chars, prediction_tokens

    code = "def total(xs):\n    return sum(xs)\n"
    assert prediction_tokens({"prediction": {"type": "content", "content": code}}) == count_text(code)
    parts = {"prediction": {"type": "content", "content": [{"type": "text", "text": code}, {"type": "text", "text": "x"}]}}
    assert prediction_tokens(parts) == count_text(code) + count_text("x") and prediction_chars(parts) == len(code) + 1
    assert prediction_tokens({}) == prediction_tokens({"prediction": "x"}) == prediction_tokens({"prediction": {}}) == 0
