"""What counting a request's prompt for its reservation costs, in process, side by side: the messages alone
(what the reservation counted before tool definitions and tool calls were part of it), the messages with an
agent's tool definitions counted afresh each time, and the same with the per-tenant count kept
(``routing.tokens.count_prompt``, the path a chat request takes).

    .venv/bin/python bench/budgets/prompt_count.py [--tools 5] [--calls 2000] [--rounds 3]

The definitions are ``--tools`` functions of a 60-word description and eight described parameters each
(about 0.9 KB of JSON a tool, as agents send them). Per round and variant: microseconds per count (wall time
of ``--calls`` calls, one thread).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tollway.routing.tokens import _definitions, count_messages, count_prompt
from tollway.tokens import count_text

MESSAGES = [{"role": "system", "content": "You are a bank's assistant. Use the tools to look fees up."},
            {"role": "user", "content": "how much does an international wire to a business account cost"}]


def tools(n: int) -> list[dict[str, object]]:
    return [{"type": "function", "function": {
        "name": f"lookup_{j}", "description": " ".join(f"how to use lookup {j}, note {k}." for k in range(10)),
        "parameters": {"type": "object", "properties": {
            f"field_{k}": {"type": "string", "description": f"filter the results by field {k}"} for k in range(8)}}}}
        for j in range(n)]


def per_call(work: Callable[[int], object], calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        work(i)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    params = {"tools": tools(args.tools), "tool_choice": "auto"}
    text = _definitions(params)
    variants: dict[str, Callable[[int], object]] = {
        "messages alone (before)": lambda i: count_messages(MESSAGES),
        "with the tools, counted each time": lambda i: count_messages(MESSAGES) + count_text(_definitions(params)),
        "with the tools, count kept per tenant (now)": lambda i: count_prompt(MESSAGES, params, 7),
    }
    print(f"{args.tools} tools, {len(text):,} characters of JSON, {count_text(text):,} tokens; "
          f"the messages {count_messages(MESSAGES)} tokens")
    for work in variants.values():
        work(0)  # the encoding loaded, the tenant's count kept
    for r in range(args.rounds):
        figures = ", ".join(f"{name} {per_call(work, args.calls):.1f} us" for name, work in variants.items())
        print(f"round {r + 1}: {figures}")


if __name__ == "__main__":
    main()
