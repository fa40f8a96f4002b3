import pytest

from tollway.errors import InvalidJSON, InvalidRequest, PayloadTooLarge, UpstreamTimeout
from tollway.gateway.http.protocol import ChatCompletionRequest, parse_json_object, validate


def test_error_shape() -> None:
    assert PayloadTooLarge("too big").body() == {
        "error": {"message": "too big", "type": "invalid_request_error", "param": None,
                  "code": "payload_too_large"}}
    assert PayloadTooLarge.status == 413
    assert UpstreamTimeout("slow").status == 504


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
])
def test_invalid_fields_name_their_param(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate(ChatCompletionRequest, body)
    assert info.value.param == param
    assert info.value.status == 400


def test_unknown_openai_fields_are_kept() -> None:
    req = validate(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "tools": [{"type": "function"}], "seed": 7, "logprobs": True})
    assert req.model_extra == {"tools": [{"type": "function"}], "seed": 7, "logprobs": True}


def test_json_must_be_an_object() -> None:
    with pytest.raises(InvalidJSON):
        parse_json_object(b"{not json")
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_json_object(b"[1, 2]")
