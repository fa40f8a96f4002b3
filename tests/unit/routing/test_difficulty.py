"""The difficulty signal: the shipped classifier re-evaluated on the packaged data, and the rules."""

from __future__ import annotations

from tollway.routing.cache import cache_key, deterministic
from tollway.routing.difficulty import assess, load_model
from tollway.routing.difficulty_train import evaluate, load_examples, train


def test_the_shipped_model_scores_what_its_file_says_on_held_out_packaged_data() -> None:
    model, examples = load_model(), load_examples()
    held_out = [e for e in examples if e.held_out]
    assert len(examples) == 600
    assert len(held_out) == model.metrics["held_out"]["examples"]
    measured = evaluate(model, held_out)
    assert measured == model.metrics["held_out"]
    assert measured["auc"] > 0.75  # multi-hop questions are told from one-hop ones well above chance


def test_training_is_reproducible() -> None:
    retrained = train(load_examples())
    assert retrained.metrics["held_out"] == load_model().metrics["held_out"]


def test_rules_set_a_floor_and_name_themselves() -> None:
    plain = assess([{"role": "user", "content": "What is the capital of France?"}])
    assert plain.signals == ()
    assert plain.score == plain.learned < 0.5
    code = assess([{"role": "user", "content": "Why does this fail?\n```python\nprint(items[0])\n```"}])
    assert code.signals == ("code",)
    assert code.score >= 0.7
    maths = assess([{"role": "user", "content": "Prove that the integral of x^2 from 0 to 1 is 1/3."}])
    assert "math" in maths.signals
    assert maths.describe().endswith("(math)")
    tools = assess([{"role": "user", "content": "hi"}], tools=True, structured=True)
    assert tools.signals == ("tools", "structured")
    assert tools.score == 0.8
    long = assess([{"role": "system", "content": "context " * 2000}, {"role": "user", "content": "Summarise."}])
    assert "long" in long.signals
    parts = assess([{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}])
    assert parts.learned == plain.learned


def test_cache_keys_ignore_key_order_and_delivery_but_not_content() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    b = {"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m", "stream": True, "user": "u"}
    assert cache_key(1, a) == cache_key(1, b) != cache_key(2, a)
    assert cache_key(1, a) != cache_key(1, {**a, "max_tokens": 5})
    assert deterministic(a)
    assert deterministic({"seed": 3})
    assert not deterministic({"temperature": 0.7})
    assert not deterministic({})
