"""What a schema's length and count bounds cost a grammar engine, per generated token: llguidance (one of vLLM's
structured-output backends; a small wheel that runs here) fills its next-token mask over cl100k_base while an
answer of fixed text is fed to it token by token, for each bound beside the same schema without one. A bench,
not a test (it times); the numbers say whether a bound's size reaches the model server's per-token cost, and
with which engine (``tollway.routing.wire.COUNT_KEYWORDS`` bounds them at ``MAX_REPEAT``).

    python -m venv /tmp/llg && /tmp/llg/bin/pip install llguidance tiktoken numpy   # the bench's only
    /tmp/llg/bin/python bench/security/grammar_bounds.py [--bounds 1000,10000,100000]

xgrammar (vLLM's default backend) needs torch and does not install here; its issue #852 reports a string's
``maxLength`` of 100,000 making each mask fill ~300x slower.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def _tiktoken_offline() -> None:
    """cl100k_base from the file litellm's wheel ships (as ``tollway.tokens`` does), when the project's venv is
    beside this one."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        found = glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", ".venv", "lib", "python3*",
                                       "site-packages", "litellm", "litellm_core_utils", "tokenizers"))
        if found:
            os.environ["TIKTOKEN_CACHE_DIR"] = found[0]


SHAPES: dict[str, tuple[Callable[[int | None], dict[str, Any]], str]] = {
    # name: (schema with the bound or without it, the answer fed token by token)
    "string maxLength": (lambda n: {"type": "object", "properties": {"content": {
        "type": "string", **({} if n is None else {"maxLength": n})}}, "required": ["content"]},
        json.dumps({"content": "lorem ipsum dolor sit amet " * 33})),  # 891 characters: within every bound
    "array maxItems": (lambda n: {"type": "array", "items": {"type": "integer"},
                                  **({} if n is None else {"maxItems": n})}, json.dumps(list(range(300)))),
    "array minItems": (lambda n: {"type": "array", "items": {"type": "integer"},
                                  **({} if n is None else {"minItems": n})},
                       json.dumps(list(range(300)))[:-1]),  # left open: 300 items may be the start of more
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bounds", default="100,1000,10000,100000,1000000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _tiktoken_offline()
    import llguidance
    import llguidance.numpy as lnp
    import llguidance.tiktoken
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base")
    tok = llguidance.tiktoken.lltokenizer_from_encoding(enc)

    def feed(schema: dict[str, Any], text: str) -> tuple[float, float, float, int] | str:
        """(p50 and max of one mask fill in us, all fills in ms, tokens) over ``text``, or the engine's error."""
        matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(schema))
        mask = lnp.allocate_token_bitmask(1, tok.vocab_size)
        times = []
        for token in enc.encode(text):
            start = time.perf_counter()
            lnp.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - start)
            if not matcher.consume_token(token):
                return (matcher.get_error() or "refused").splitlines()[0][:80]
        return statistics.median(times) * 1e6, max(times) * 1e6, sum(times) * 1e3, len(times)

    print(llguidance.get_version(), "over cl100k_base;",
          f"best of {args.rounds} rounds per cell")
    print("| shape | bound | mask fill p50 / max (us) | all fills (ms) | tokens |")
    print("|---|---|---|---|---|")
    for name, (schema, text) in SHAPES.items():
        for bound in [None, *(int(b) for b in args.bounds.split(","))]:
            runs = [feed(schema(bound), text) for _ in range(args.rounds)]
            done = [r for r in runs if not isinstance(r, str)]
            if not done:
                print(f"| {name} | {bound} | {runs[0]} | | |")
                continue
            best = min(done, key=lambda r: r[2])
            print(f"| {name} | {bound if bound is not None else 'none'} | {best[0]:.1f} / {best[1]:.1f} | "
                  f"{best[2]:.2f} | {best[3]} |", flush=True)


if __name__ == "__main__":
    main()
