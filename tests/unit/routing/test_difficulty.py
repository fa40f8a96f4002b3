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


def test_code_signals_match_as_before_and_stay_linear_on_hostile_prompts():
    """The code signal once was one pattern with ``SELECT.+FROM``; it is now two searches for the query and
    one pattern for the rest. On random mixes of the words involved both give the same verdict; a prompt of
    "select" repeated (no FROM: the old pattern backtracked over the rest of the text at every occurrence,
    17 s for 140 KB, hours for megabytes) is assessed like any other."""
    import random
    import re

    from tollway.routing.difficulty import has_code

    old = re.compile(r"```|\bdef \w+\(|\bclass \w+[:(]|\bfunction\s*\w*\(|#include\s*<|\bSELECT\b.+\bFROM\b|=>|;\s*\n",
                     re.IGNORECASE | re.DOTALL)
    rng = random.Random(3)
    words = ["select", "from", "SELECT", "FROM", "x", "def", "f(", "class", "A:", ";", "\n", "=>", "```", "function",
             "(", " ", "selectfrom", "from_", "_select", "#include", "<", "é"]
    for _ in range(5000):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "\n", "  "]) for _ in range(rng.randrange(1, 12)))
        assert (old.search(text) is not None) == has_code(text), text
    assert has_code("select name\n  from users") and not has_code("select a fromage")
    hostile = "select " * 400_000  # 2.8 MB
    assert "code" not in assess([{"role": "user", "content": hostile}]).signals
    assert "code" in assess([{"role": "user", "content": hostile + "from t"}]).signals
