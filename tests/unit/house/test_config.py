import re
from decimal import Decimal
from pathlib import Path

import pytest

from tollway.config import RawPrice
from tollway.routing import ConfigError, Usage, build_catalog, load_config, parse_config, resolve_upstream
from tollway.routing.catalog import discovered_kind, litellm_price, resolve_price


def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams:\n  - name: a\n    base_url: http://x\n    colour: blue\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "upstreams.0.colour" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"modles: Extra inputs are not permitted"):
        parse_config({"modles": []})


def test_secrets_must_be_references() -> None:
    with pytest.raises(ConfigError, match="env::VLLM_API_KEY"):
        parse_config({"upstreams": [{"name": "a", "base_url": "http://x", "api_key": "sk-literal"}]})


def test_secret_reference_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = parse_config({"upstreams": [{"name": "a", "base_url": "http://x:1", "api_key": "env::TW_TEST_KEY"}]})
    with pytest.raises(ConfigError, match="TW_TEST_KEY is not set"):
        resolve_upstream(raw.upstreams[0], timeout_s=1, connect_timeout_s=1)
    monkeypatch.setenv("TW_TEST_KEY", "s3cret")
    spec = resolve_upstream(raw.upstreams[0], timeout_s=1, connect_timeout_s=1)
    assert spec.api_key == "s3cret"
    assert spec.base_url == "http://x:1/v1"
    assert "s3cret" not in repr(spec)


def test_model_must_name_a_known_upstream() -> None:
    with pytest.raises(ConfigError, match="unknown upstream 'nope'"):
        parse_config({"models": [{"name": "m", "upstream": "nope"}]})


def test_price_needs_exactly_one_scheme() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({"upstreams": [{"name": "a", "base_url": "http://x"}],
                      "models": [{"name": "m", "upstream": "a",
                                  "price": {"input_per_mtok": 1, "gpu_hour_usd": 2}}]})


def test_per_token_price() -> None:
    price = resolve_price(RawPrice(input_per_mtok=Decimal(3), output_per_mtok=Decimal(15)))
    assert price.cost(Usage(input_tokens=1000, output_tokens=200)) == Decimal("0.006")


def test_cached_tokens_use_the_cached_rate() -> None:
    price = resolve_price(RawPrice(input_per_mtok=Decimal(2), output_per_mtok=Decimal(8),
                                   cached_input_per_mtok=Decimal("0.5")))
    cost = price.cost(Usage(input_tokens=1000, output_tokens=0, cached_tokens=400))
    assert cost == Decimal(600) * Decimal(2) / 10**6 + Decimal(400) * Decimal("0.5") / 10**6


def test_gpu_hour_price_attributes_gpu_seconds() -> None:
    price = resolve_price(RawPrice(gpu_hour_usd=Decimal("3.6"), prefill_tokens_per_s=Decimal(10000),
                                   decode_tokens_per_s=Decimal(1000)))
    # 5000 prompt tokens = 0.5 GPU-s, 500 output tokens = 0.5 GPU-s; 1 GPU-s at $3.6/h = $0.001
    assert price.cost(Usage(input_tokens=5000, output_tokens=500)) == Decimal("0.001")


def test_litellm_bundled_price_table() -> None:
    price = litellm_price("gpt-4o-mini")
    assert price.input_per_token == Decimal("1.5e-07")
    assert price.output_per_token == Decimal("6e-07")
    assert price.source == "litellm:gpt-4o-mini"
    with pytest.raises(ConfigError, match="not in litellm"):
        litellm_price("no-such-model-xyz")


def test_catalog_aliases_and_discovery() -> None:
    raw = parse_config({"upstreams": [{"name": "a", "base_url": "http://x"}],
                        "models": [{"name": "big", "upstream": "a", "upstream_model": "org/Big-70B",
                                    "aliases": ["auto-large"]}]})
    spec = resolve_upstream(raw.upstreams[0], timeout_s=1, connect_timeout_s=1)
    catalog = build_catalog(raw, {"a": ["org/Big-70B", "small-1", "e5-embed"]}, [spec])
    assert catalog.get("auto-large") is catalog.get("big")
    assert catalog.names() == ["big", "e5-embed", "small-1"]  # the configured upstream_model is not listed twice
    assert catalog.get("e5-embed").kind == "embedding"  # type: ignore[union-attr]
    assert catalog.get("nope") is None


@pytest.mark.parametrize(("model_id", "kind"), [
    # embedding servers a quick start meets (vLLM, TEI), by the ids they list
    ("BAAI/bge-m3", "embedding"), ("BAAI/bge-large-en-v1.5", "embedding"), ("intfloat/e5-mistral-7b-instruct", "embedding"),
    ("intfloat/multilingual-e5-large", "embedding"), ("thenlper/gte-large", "embedding"),
    ("Alibaba-NLP/gte-Qwen2-7B-instruct", "embedding"), ("sentence-transformers/all-MiniLM-L6-v2", "embedding"),
    ("all-mpnet-base-v2", "embedding"), ("nomic-ai/nomic-embed-text-v1.5", "embedding"),
    ("jinaai/jina-embeddings-v3", "embedding"), ("Snowflake/snowflake-arctic-embed-l", "embedding"),
    ("Qwen/Qwen3-Embedding-0.6B", "embedding"), ("hkunlp/instructor-large", "embedding"),
    ("dunzhang/stella_en_1.5B_v5", "embedding"), ("text-embedding-3-small", "embedding"), ("e5-embed", "embedding"),
    # rerankers and cross-encoders (some are of an embedding family by name)
    ("BAAI/bge-reranker-v2-m3", "rerank"), ("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank"),
    ("mixedbread-ai/mxbai-rerank-large-v1", "rerank"), ("jinaai/jina-reranker-v2-base-multilingual", "rerank"),
    ("Qwen/Qwen3-Reranker-0.6B", "rerank"), ("Alibaba-NLP/gte-multilingual-reranker-base", "rerank"),
    # chat models stay chat
    ("meta-llama/Llama-3.3-70B-Instruct", "chat"), ("Qwen/Qwen2.5-7B-Instruct", "chat"),
    ("microsoft/Phi-3.5-mini-instruct", "chat"), ("mistralai/Mistral-7B-Instruct-v0.3", "chat"),
    ("google/gemma-2-9b-it", "chat"), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "chat"), ("gpt-4o-mini", "chat"),
    ("org/Big-70B", "chat"), ("small-1", "chat"), ("sim-large", "chat"),
])
def test_a_discovered_models_kind_is_read_from_its_id(model_id: str, kind: str) -> None:
    """A quick start's upstreams list model ids only: an embedding model taken for a chat model would be
    routed chat requests (and refuse them); one taken for chat could not embed a collection."""
    assert discovered_kind(model_id) == kind
    raw = parse_config({"upstreams": [{"name": "a", "base_url": "http://x"}]})
    spec = resolve_upstream(raw.upstreams[0], timeout_s=1, connect_timeout_s=1)
    assert build_catalog(raw, {"a": [model_id]}, [spec]).get(model_id).kind == kind  # type: ignore[union-attr]


def test_the_shipped_example_config_is_valid() -> None:
    raw = load_config(Path(__file__).resolve().parents[3] / "deploy" / "tollway.example.yaml")
    assert [u.name for u in raw.upstreams] == ["vllm-large-0", "vllm-large-1", "vllm-small", "openai"]
    assert {m.name for m in raw.models} == {"llama-3.3-70b", "qwen2.5-7b", "gpt-4o-mini", "bge-m3"}
    build = build_catalog(raw, {}, [])
    large = build.get("large")
    assert large is not None
    assert large.price.source == "gpu_hour"
    assert large.replicas == ("vllm-large-0", "vllm-large-1")
    assert large.can(frozenset({"tools"}))
    assert [t.name for t in build.tiers] == ["large", "small"]
    assert build.auto_aliases == {"auto"}
    assert build.routing.rollouts[0].shadow_percent == 2
    # 40,000 prompt tokens = 1 GPU-s and 2,500 output tokens = 1 GPU-s at $5/h: 2 s -> $0.002777...
    assert round(large.price.cost(Usage(input_tokens=40_000, output_tokens=2_500)), 8) == Decimal("0.00277778")
    from tollway.gateway.parts.guarding import Guarding

    guarding = Guarding.from_config(raw.guardrails)  # the guard section parses and builds as the gateway's does
    assert guarding.config.output == {"pii": "redact", "secrets": "redact", "leak": "redact"}
    from tollway.gateway.parts.evaluating import eval_settings

    assert eval_settings(raw.evals).gate.min_pass_rate == 0.8
    from tollway.gateway.quality.sampling import quality_settings

    quality = quality_settings(raw.quality)
    assert quality.drift.alpha == 0.0025
    assert quality.drift.sequential_share == 0.5
    assert (quality.drift.evidence_hours, quality.drift.alarm_days) == (3, 1000)
    assert (quality.incidents.min_failures, quality.incidents.share) == (3, 0.05)
    assert quality.policy.ceiling == 0.25


@pytest.mark.parametrize(("models", "routing", "problem"), [
    ([{"name": "m", "upstream": "a", "upstreams": ["a"]}], {}, "not both and not neither"),
    ([{"name": "m"}], {}, "not both and not neither"),
    ([{"name": "m", "upstreams": ["a", "zz"]}], {}, "unknown upstream 'zz'"),
    ([{"name": "m", "upstream": "a", "tier": "huge"}], {}, "unknown tier 'huge'"),
    ([{"name": "m", "upstream": "a", "fallbacks": ["ghost"]}], {}, "falls back to unknown model 'ghost'"),
    ([{"name": "m", "upstream": "a", "capabilities": ["telepathy"]}], {}, "capabilities"),
    ([{"name": "m", "upstream": "a"}], {"rollouts": [{"model": "m", "candidate": "x"}]}, "unknown model 'x'"),
    ([{"name": "m", "upstream": "a"}], {"tiers": [{"name": "t"}, {"name": "t"}]}, "tier names must be unique"),
    ([{"name": "m", "upstream": "a"}], {"breaker": {"open_s": 0}}, "routing.breaker.open_s"),
    ([{"name": "m", "upstream": "a"}], {"ballance": "p2c"}, "routing.ballance"),
])
def test_routing_config_mistakes_are_start_up_errors(models: list[dict[str, object]], routing: dict[str, object],
                                                     problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config({"upstreams": [{"name": "a", "base_url": "http://a"}], "models": models, "routing": routing})
