"""The security seams one by one: the upstream allow-list, CSV cells, repository paths, bounded rendering,
the keyed hash of API keys, metadata filters."""

from __future__ import annotations

import hashlib
import hmac
import stat

import orjson
import pytest

from tollway.errors import InvalidRequest


# -- what reaches an upstream ---------------------------------------------------------------------------
def test_upstream_body_keeps_allowed_fields_and_drops_transport():
    from tollway.routing.wire import upstream_body

    body = {"messages": [], "model": "public", "temperature": 0.1, "top_k": 3, "api_base": "http://evil",
            "extra_headers": {"a": "b"}, "custom": 1}
    assert upstream_body("chat", body, "served") == {"messages": [], "model": "served", "temperature": 0.1,
                                                      "top_k": 3}
    assert upstream_body("chat", body, "served", frozenset({"custom"}))["custom"] == 1


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_key", "extra_headers", "headers", "timeout",
                                   "custom_llm_provider", "proxy"])
def test_transport_fields_are_a_400_naming_the_field(field):
    from tollway.routing.wire import check_client_fields

    with pytest.raises(InvalidRequest) as refused:
        check_client_fields("chat", {"messages": [], field: "x"})
    assert (refused.value.param, refused.value.code, refused.value.status) == (field, "forbidden_field", 400)


def test_a_config_entry_may_not_forward_transport_fields():
    from tollway.config import RawModel

    with pytest.raises(ValueError, match="transport or credential"):
        RawModel(name="m", upstream="u", forward_fields=["api_base"])


def test_the_litellm_upstream_never_takes_api_base_from_a_body():
    from tollway.routing.catalog import UpstreamSpec
    from tollway.routing.upstream import LiteLLMUpstream

    spec = UpstreamSpec("p", "litellm", None, "sk-secret", 5.0, 1.0, False)
    kwargs = LiteLLMUpstream(spec)._kwargs({"model": "openai/x", "messages": [], "api_base": "http://evil",
                                            "base_url": "http://evil", "extra_headers": {"x": "y"}})
    assert "api_base" not in kwargs
    assert "base_url" not in kwargs
    assert "extra_headers" not in kwargs
    assert kwargs["api_key"] == "sk-secret"


# -- CSV ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"])
def test_formula_cells_get_a_leading_quote(cell):
    from tollway.gateway.metering.reports import csv_cell

    assert csv_cell(cell) == "'" + cell


def test_other_cells_are_unchanged():
    from decimal import Decimal

    from tollway.gateway.metering.reports import csv_cell

    assert [csv_cell(v) for v in ["model", Decimal("-1.5"), 3, None]] == ["model", Decimal("-1.5"), 3, None]


# -- repository paths -------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["../../evil.txt", "/etc/passwd", ".git/config", "..", "", "a\x00b", "sub/dir.txt",
                                  b"\xff.yaml", "x" * 101, "<img src=x onerror=alert(1)>.yaml", "two\nlines.yaml"])
def test_bad_paths_are_refused(path):
    from tollway.prompts.paths import path_problem

    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["greet.yaml", "greet.golden.jsonl", "README.md", "v1.2-final_draft.yaml"])
def test_good_paths_pass(path):
    from tollway.prompts.paths import path_problem

    assert path_problem(path) is None


def test_folders_links_and_submodules_are_refused():
    from tollway.prompts.paths import path_problem

    assert [path_problem("a", mode) is not None for mode in (0o040000, 0o120000, 0o160000, 0o100755)] == \
        [True, True, True, False]


# -- rendering --------------------------------------------------------------------------------------------
def test_yaml_aliases_are_refused():
    from tollway.prompts import PromptError, parse_prompt

    with pytest.raises(PromptError, match="aliases"):
        parse_prompt("p", "v", "messages: &m [{role: user, content: hi}]\ndescription: *m\n")


def test_plain_and_bounded_templates_are_told_apart():
    from tollway.prompts import parse_prompt

    def prompt(content: str):
        return parse_prompt("p", "v", f"messages: [{{role: user, content: {content!r}}}]\n"
                                      "variables: {v: {type: string, default: x}}\n")

    assert prompt("Hello {{ v|upper }}{% if v %}!{% endif %}").plain
    assert not prompt("{% for i in range(3) %}{{ v }}{% endfor %}").plain
    assert not prompt("{{ v * 3 }}").plain
    assert not prompt("{{ v.center(100) }}").plain
    assert not prompt("{{ v|center(100) }}").plain


def test_a_repetition_or_range_past_the_limit_is_refused_in_process():
    from tollway.prompts import PromptError, parse_prompt

    rep = parse_prompt("p", "v", "messages: [{role: user, content: '{{ v * 1000000 }}'}]\n"
                                 "variables: {v: {type: string, default: ab}}\n")
    rng = parse_prompt("p", "v", "messages: [{role: user, content: '{% for i in range(10**7) %}{% endfor %}'}]\n")
    for prompt in (rep, rng):
        with pytest.raises(PromptError) as refused:
            prompt.render({})
        assert refused.value.code == "prompt_render_limit"


async def test_the_render_pool_stops_a_render_at_its_time_limit():
    import time

    from tollway.prompts.render import RenderLimit, RenderPool

    pool = RenderPool(workers=1, time_limit_s=0.3)
    try:
        ok = await pool.render((("user", "{{ v }}!"),), {"v": "hi"})
        started = time.perf_counter()
        with pytest.raises(RenderLimit, match=r"limited to 0\.3s"):
            await pool.render((("user", "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}"
                                        "{% endfor %}"),), {})
        took = time.perf_counter() - started
        again = await pool.render((("user", "{{ v }}?"),), {"v": "yes"})  # the worker lives on
    finally:
        pool.close()
    assert ok == [{"role": "user", "content": "hi!"}]
    assert took < 1.5
    assert again == [{"role": "user", "content": "yes?"}]


# -- the keyed hash of API keys ------------------------------------------------------------------------------
def test_a_key_is_stored_as_hmac_over_its_sha256():
    from tollway.gateway.tenancy.keys import KeyHasher

    hasher = KeyHasher(b"server", b"old")
    sha = hashlib.sha256(b"tw-key").digest()
    assert hasher.digest("tw-key") == hmac.new(b"server", sha, hashlib.sha256).digest()
    assert hasher.candidates("tw-key") == [hasher.digest("tw-key"), hmac.new(b"old", sha, hashlib.sha256).digest(),
                                           sha]
    assert hasher.digest("tw-key") != sha


def test_the_data_directory_secret_is_made_once_and_private(tmp_path):
    from tollway.gateway.tenancy.keys import load_key_hasher

    first = load_key_hasher(None, None, tmp_path)
    second = load_key_hasher(None, None, tmp_path)
    assert first.current == second.current
    assert len(first.current) == 64
    assert stat.S_IMODE((tmp_path / "key-secret").stat().st_mode) == 0o600
    assert load_key_hasher("from-env", None, tmp_path).current == b"from-env"


# -- metadata filters --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filters", [{"team": []}, {"team": ["a\x00"]}, {"team": {"$ne": 1}}, {"": 1},
                                     {f"k{i}": 1 for i in range(17)}, {"team": list(range(101))}])
def test_bad_filters_are_refused_before_sql(filters):
    from tollway.retrieval import StoreError, check_filters

    with pytest.raises(StoreError):
        check_filters(filters)


def test_good_filters_pass():
    from tollway.retrieval import check_filters

    check_filters({"team": ["a", "b"], "year": 2024, "public": True})


async def test_one_owner_renders_at_a_time_and_another_is_not_queued_behind_it():
    import asyncio
    import time

    from tollway.prompts.render import RenderLimit, RenderPool

    slow = (("user", "{% for i in range(9999) %}{% for j in range(9999) %}{% endfor %}{% endfor %}"),)
    pool = RenderPool(workers=2, time_limit_s=0.4)
    try:
        await pool.render((("user", "warm"),), {}, "a")
        await pool.render((("user", "warm"),), {}, "b")

        async def flood() -> None:
            for result in await asyncio.gather(*(pool.render(slow, {}, "a") for _ in range(4)),
                                               return_exceptions=True):
                assert isinstance(result, RenderLimit)

        flooding = asyncio.create_task(flood())
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        other = await pool.render((("user", "{{ v }}"),), {"v": "b's"}, "b")
        waited = time.perf_counter() - started
        await flooding
    finally:
        pool.close()
    assert other == [{"role": "user", "content": "b's"}]
    assert waited < 0.3  # a free worker, not behind a's four renders of 0.4 s


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
    "http://0/", "http://[::1]/", "http://[::ffff:169.254.169.254]/", "http://169.254.169.254/latest/",
    "http://10.0.0.5/", "http://192.168.1.1/", "http://100.64.0.1/", "http://[fe80::1%25eth0]/",
    "http://localhost:8000/", "http://vllm/", "http://metadata.google.internal/", "http://db.svc.cluster.local/",
    "http://user@127.0.0.1/", "http://127.0.0.1\\@images.example.com/", "http://images.example.com/a b",
    "file:///etc/passwd", "gopher://images.example.com/", "ftp://images.example.com/x", " javascript:alert(1)",
    "http:///nohost",
])
def test_a_media_url_inside_the_model_server_s_network_is_refused(url: str) -> None:
    from tollway.routing.wire import media_url_refusal

    assert media_url_refusal(url, "public") is not None


@pytest.mark.parametrize("url", [
    "https://images.example.com/cat.png", "HTTPS://IMAGES.EXAMPLE.COM/cat.png", "http://8.8.8.8/x.png",
    "http://[2001:4860:4860::8888]/x.png", "http://1e100.net/x.png", "https://images.example.com./x.png",
    "data:image/png;base64,iVBORw0KGgo=", "DATA:audio/wav;base64,AAAA",
])
def test_a_public_or_inline_media_url_is_allowed(url: str) -> None:
    from tollway.routing.wire import media_url_refusal

    assert media_url_refusal(url, "public") is None
    assert media_url_refusal(url, "any") is None
    assert (media_url_refusal(url, "inline") is None) == url.lower().startswith("data:")


def test_text_postgres_would_refuse_is_stored_with_a_replacement_character() -> None:
    from tollway.infra.db import storable, storable_json

    assert storable("eve\x00") == "eve\ufffd"
    assert storable(None) is None
    kept = {"a": "plain", "literal": "\\u0000"}  # the six characters a user typed, not a NUL
    assert storable_json(kept).obj == kept
    assert storable_json({"k\x00": ["v\x00", 1, {"n": "\x00"}]}).obj == {"k\ufffd": ["v\ufffd", 1, {"n": "\ufffd"}]}


@pytest.mark.parametrize("pattern", ["a{1001}", "a{1,1001}", "a{99999999999999999999}", "a\\\\{5000}",
                                     "(ab){2}c{1000000,}"])
def test_a_bounded_repeat_past_its_count_is_refused(pattern):
    from tollway.routing.wire import check_structured_output

    with pytest.raises(InvalidRequest, match="bounded repeat"):
        check_structured_output({"guided_regex": pattern})


@pytest.mark.parametrize("pattern", ["a{1000}", "a{3,}", "a\\{5000}", "\\\\\\{5000}", "{x}", "[0-9]{1,3}"])
def test_a_repeat_in_range_or_an_escaped_brace_passes(pattern):
    from tollway.routing.wire import check_structured_output

    check_structured_output({"guided_regex": pattern})


def test_a_schema_too_deep_or_too_large_is_refused_and_its_text_form_is_read():
    from tollway.routing.wire import MAX_SCHEMA_CHARS, check_structured_output

    deep: dict[str, object] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidRequest, match="nests deeper"):
        check_structured_output({"guided_json": deep})
    with pytest.raises(InvalidRequest, match="characters"):
        check_structured_output({"json_schema": {"enum": ["x" * MAX_SCHEMA_CHARS]}})
    with pytest.raises(InvalidRequest, match="bounded repeat"):
        check_structured_output({"guided_json": '{"type": "string", "pattern": "z{4000}"}'})
    check_structured_output({"guided_json": "not json at all"})  # the model server answers that one


def _format(schema):
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 100_000},
    {"type": "array", "items": {"type": "number"}, "maxItems": 10**12},
    {"type": "array", "minItems": 1001},
    {"type": "object", "maxProperties": 5e3},
    {"type": "object", "properties": {"default": {"type": "string", "minLength": 2000}}},  # a property named so
    {"$defs": {"enum": {"type": "array", "maxContains": 4000}}, "$ref": "#/$defs/enum"},
    {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "string", "maxLength": 1_000_000}}]},
])
def test_a_schema_s_length_or_count_bound_past_the_repeat_limit_is_refused(schema):
    from tollway.routing.wire import check_structured_output

    with pytest.raises(InvalidRequest, match="length and count bounds") as refused:
        check_structured_output(_format(schema))
    assert refused.value.param == "response_format"
    with pytest.raises(InvalidRequest, match="length and count bounds"):
        check_structured_output({"guided_json": orjson.dumps(schema).decode()})


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": 1, "maxLength": 1000},
    {"type": "array", "maxItems": 10, "default": [], "examples": [{"maxItems": 99999}]},  # data, not a schema
    {"enum": [{"maxLength": 50_000}, "x"], "const": {"minItems": 10**9}},
    {"type": "object", "properties": {"maxItems": {"type": "integer"}, "pattern": {"type": "string"}}},
    {"type": "string", "maxLength": True},  # not a count: the model server answers that one
])
def test_a_schema_within_its_bounds_or_naming_them_as_data_passes(schema):
    from tollway.routing.wire import check_structured_output

    check_structured_output(_format(schema))


def test_a_tool_s_count_bounds_are_held_only_where_the_model_server_compiles_its_schema():
    """With ``tool_choice`` auto the model server reads the calls the model wrote: an agent's file tool may say
    100,000 characters. A required call, a named function or a strict function is compiled, and bounded."""
    from tollway.routing.wire import check_structured_output

    write = {"type": "function", "function": {"name": "write", "parameters": {
        "type": "object", "properties": {"content": {"type": "string", "maxLength": 100_000}}}}}
    check_structured_output({"tools": [write]})
    check_structured_output({"tools": [write], "tool_choice": "auto"})
    strict = {"type": "function", "function": {**write["function"], "strict": True}}
    for body in ({"tools": [write], "tool_choice": "required"},
                 {"tools": [write], "tool_choice": {"type": "function", "function": {"name": "write"}}},
                 {"tools": [strict]}):
        with pytest.raises(InvalidRequest, match="maxLength") as refused:
            check_structured_output(body)
        assert refused.value.param == "tools[0].function.parameters"


@pytest.mark.parametrize(("body", "param"), [
    ({"stop": ["x"] * 33}, "stop"),
    ({"stop": "y" * 1025}, "stop"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"bad_words": ["w" * 2000]}, "bad_words"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"allowed_token_ids": list(range(262_145))}, "allowed_token_ids"),
    ({"best_of": 4}, "best_of"),
    ({"best_of": 5, "n": 4}, "best_of"),
])
def test_a_per_token_list_past_its_bound_or_best_of_above_n_is_refused(body, param):
    """What a model server walks at every token (stop strings, stop tokens, bad words, biases) is bounded, and
    best_of above n, whose discarded sequences no budget reserves or usage reports, is refused."""
    from tollway.routing.wire import check_client_fields

    with pytest.raises(InvalidRequest) as refused:
        check_client_fields("chat", {"model": "m", "messages": [], **body})
    assert refused.value.param == param


@pytest.mark.parametrize("body", [
    {"stop": ["a", "b", "c", "d"]}, {"stop": "x" * 1024}, {"stop": ["s"] * 32}, {"best_of": 4, "n": 4}, {"best_of": 1},
    {"logit_bias": {"50256": -100}}, {"stop_token_ids": [1, 2]}, {"bad_words": ["no"]},
])
def test_per_token_lists_within_their_bounds_pass(body):
    from tollway.routing.wire import check_client_fields

    check_client_fields("chat", {"model": "m", "messages": [], **body})


@pytest.mark.parametrize("tool", [{"type": "function", "function": {}}, {"type": "function"},
                                  {"type": "function", "function": {"name": ""}},
                                  {"type": "function", "function": {"name": "n" * 257}}])
def test_a_chat_function_tool_without_a_name_is_refused(tool):
    from tollway.routing.wire import check_client_fields

    with pytest.raises(InvalidRequest) as refused:
        check_client_fields("chat", {"model": "m", "messages": [], "tools": [tool]})
    assert refused.value.param == "tools[0].function.name"
    check_client_fields("chat", {"model": "m", "messages": [], "tools": [
        {"type": "function", "function": {"name": "math.add", "parameters": {"type": "object"}}}]})


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": "lookup"}, "tools"), ({"tools": {"type": "function"}}, "tools"), ({"tools": [1, 2]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "a"}}, None]}, "tools[1]"),
    ({"functions": "lookup"}, "functions"), ({"functions": [{"name": "a"}, "b"]}, "functions[1]"),
])
def test_tools_that_are_not_a_list_of_objects_are_refused(body, param):
    from tollway.routing.wire import check_client_fields

    with pytest.raises(InvalidRequest) as refused:
        check_client_fields("chat", {"model": "m", "messages": [], **body})
    assert refused.value.param == param
    check_client_fields("chat", {"model": "m", "messages": [], "tools": [], "functions": [{"name": "a"}]})


def test_a_prompt_whose_params_pass_the_structured_output_bounds_only():
    """A prompt's response_format and tools reach the model server as a client's do: bounded alike, when it is
    submitted."""
    from tollway.prompts import PromptError, parse_prompt

    head = "messages:\n  - role: user\n    content: hi\nparams:\n  response_format:\n"
    schema = "    {type: json_schema, json_schema: {name: s, schema: {type: string, pattern: '%s'}}}\n"
    with pytest.raises(PromptError, match="bounded repeat") as refused:
        parse_prompt("p", "v1", head + schema % "a{9999}")
    assert refused.value.param == "params.response_format"
    assert parse_prompt("p", "v1", head + schema % "a{3}").raw.params["response_format"]["type"] == "json_schema"
