"""Crafted documents against the ingestion's parser: the CPU one document of a few megabytes costs, the
markdown parser with and without its inline rules (headings need the block rules only), and HTML nested
deeper than Python recurses. Prints one table; a bench, not a test (the figures are seconds of CPU).

    .venv/bin/python bench/security/documents.py [--mb 2]
"""

from __future__ import annotations

import argparse
import time

from markdown_it import MarkdownIt

from tollway.retrieval import Splitting, parse


def crafted(mb: float) -> dict[str, tuple[str, str]]:
    n = int(mb * 1_000_000)
    return {
        "emphasis delimiters (`*a**`)": ("markdown", "# T\n\n" + "*a**" * (n // 4)),
        "brackets (`[[[...]]]`)": ("markdown", "# T\n\n" + "[" * (n // 2) + "]" * (n // 2)),
        "link references": ("markdown", "".join(f"[a{i}]: http://x/{i}\n" for i in range(n // 40))
                             + "".join(f"[a{i}] " for i in range(n // 40))),
        "a flat list (`- x`)": ("markdown", "# T\n" + "- x\n" * (n // 4)),
        "a table": ("markdown", "| a | b |\n|---|---|\n" + "| x | y |\n" * (n // 10)),
        "HTML nested 50,000 deep": ("html", "<html><body>" + "<div>" * 50_000 + "x" + "</div>" * 50_000
                                    + "</body></html>"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=2.0, help="size of each crafted markdown document")
    args = ap.parse_args()
    full, blocks = MarkdownIt("commonmark"), MarkdownIt("commonmark").disable("inline")
    print(f"| document ({args.mb:g} MB of markdown) | markdown-it, all rules | block rules (the parser's) | "
          "the whole parse (sections, chunks, tokens) |")
    print("|---|---|---|---|")
    for name, (fmt, text) in crafted(args.mb).items():
        cells = []
        if fmt == "markdown":
            for md in (full, blocks):
                started = time.process_time()
                md.parse(text)
                cells.append(f"{time.process_time() - started:.2f} s")
        else:
            cells += ["-", "-"]
        started = time.process_time()
        try:
            parse(text, fmt, title=None, source="crafted", splitting=Splitting())
            cells.append(f"{time.process_time() - started:.2f} s")
        except RecursionError:
            cells.append("RecursionError")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
