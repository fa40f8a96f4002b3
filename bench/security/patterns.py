"""Every regular expression the gateway runs over client text (and the guard terms' patterns, built from sample
terms as a tenant's policy would build them), probed for superlinear time (a bench, not a
test: it times). Each pattern is searched in texts made of one short unit repeated, 3,000 and then 6,000
times, alone or after one word; the units are the words of the pattern's own source with separators, and
characters that patterns often repeat. A pattern whose time more than triples when the text doubles (and takes over 50 ms) is
reported: that is backtracking a client could aim at, on the event loop or a worker's GIL.

    .venv/bin/python bench/security/patterns.py
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from collections.abc import Iterator
from typing import Any

import regex

SEPARATORS = [" ", "", "\n", "a", "1", "=", ";", "*", "#", "<", "(", ".", "-", "@", ":"]
EXTRA_UNITS = ["a1 ", "1 1 ", "= 1", "aaaa@", "1-", "x.", "eyJ", "eyJa.", "AB12 ", "+1 ", "(1", "\\u0040"]


def patterns() -> dict[str, Any]:
    """Compiled patterns in the package's modules: module globals, and those held by objects in module-level
    lists, tuples and dicts (detectors, rules)."""
    found: dict[str, Any] = {}

    def take(name: str, value: Any) -> None:
        for candidate in (value, getattr(value, "pattern", None)):
            if isinstance(candidate, re.Pattern | regex.Pattern):
                found[name] = candidate
        parts = getattr(value, "parts", None)
        if isinstance(parts, tuple):
            for i, part in enumerate(parts):
                if isinstance(part, regex.Pattern):
                    found[f"{name}.parts[{i}]"] = part

    names = ["tollway"]
    for top in ("tollway", "tollway.gateway", "tollway.routing", "tollway.retrieval", "tollway.guardrails",
                "tollway.prompts", "tollway.evals"):
        package = importlib.import_module(top)
        names += [top] + [info.name for info in pkgutil.walk_packages(package.__path__, top + ".")]
    for name in dict.fromkeys(names):
        if name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        for attr, value in vars(module).items():
            take(f"{name}.{attr}", value)
            if isinstance(value, list | tuple):
                for i, item in enumerate(value):
                    take(f"{name}.{attr}[{i}]", item)
            elif isinstance(value, dict):
                for key, item in value.items():
                    take(f"{name}.{attr}[{key!r}]", item)
    # patterns built per tenant policy: guard terms (approximate matching), from sample terms
    from tollway.guardrails.terms import term_finders

    for finder in term_finders(["Project Falcon", "Acme Corporation International"], ["Globex", "Initech Software"],
                               {"medical": ["diagnosis", "prescription drugs"]}):
        take(f"terms:{getattr(finder, 'kind', '?')}", finder)
    return found


def units(source: str) -> Iterator[tuple[str, str]]:
    """(head, unit): the text is ``head`` then ``unit`` repeated. Both shapes: a word and a separator
    repeated together, and one word followed by a long run of one separator (two adjacent unbounded
    quantifiers over the run: quadratic once per word)."""
    words = set(re.findall(r"[A-Za-z]{3,}", source)[:16]) or {"a"}
    for word in words:
        for sep in SEPARATORS:
            yield "", word + sep
            if sep:
                yield word, sep
    for sep in SEPARATORS[2:]:
        yield "", sep
    for unit in EXTRA_UNITS:
        yield "", unit


def main() -> None:
    found = patterns()
    slow = []
    started = time.perf_counter()
    for name, pattern in found.items():
        worst: tuple[float, float, str] | None = None
        for head, unit in units(pattern.pattern):
            t0 = time.perf_counter()
            pattern.search(head + unit * 3000 + "x")
            small = time.perf_counter() - t0
            if small < 0.01:
                continue
            t0 = time.perf_counter()
            pattern.search(head + unit * 6000 + "x")
            large = time.perf_counter() - t0
            if large > 3 * small and large > 0.05 and (worst is None or large > worst[1]):
                worst = (small, large, head + unit + "...")
        if worst is not None:
            slow.append((name, *worst))
    print(f"{len(found)} patterns probed in {time.perf_counter() - started:.0f} s")
    if not slow:
        print("none grows faster than linearly on these texts")
    for name, small, large, unit in sorted(slow, key=lambda s: -s[2]):
        print(f"SUPERLINEAR {name}: unit {unit!r}: {small * 1000:.0f} ms at 3,000, {large * 1000:.0f} ms at 6,000")


if __name__ == "__main__":
    main()
