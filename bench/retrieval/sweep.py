"""Search settings side by side on the same ingested corpora, in one run: for each variant of
``retrieval.search.Tuning`` (``FIELD=VALUE,FIELD=VALUE``; the first block is always the defaults), the
hierarchical modes' recall and answer in context at each budget against flat's and BM25's
(bench/retrieval/versus_bm25.py's measures and baseline, computed once per corpus). Made for choosing
settings on the tuning corpora together; a held-out corpus is refused unless ``--held-out`` says so (run it
once, after the choice, with versus_bm25.py).

    .venv/bin/python bench/retrieval/sweep.py --corpora pydocs,faq,foldoc,banking --data DIR \\
        --variants mmr_lambda=1.0 section_weight=0.1,document_weight=0.1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
import corpora
from common import bench_tenant
from versus_bm25 import bm25_packed, flat, ready, tuning_of

from tollway.retrieval import LocalEmbedder, Query, Searcher, Splitting
from tollway.retrieval.embedders import Embedded

# settings that change what the flat modes return: flat is run again for a variant that touches them
FLAT_FIELDS = {"candidates", "lexical_weight", "lexical_postings", "ef_search"}
MODES = {"hierarchical": ("hierarchical", False), "hierarchical+lex": ("hierarchical", True),
         "flat": ("flat", False), "flat+lex": ("flat", True)}


def score(ask: corpora.Ask, answerable: bool, sources: set[str], context: str) -> tuple[float, float | None]:
    """(recall, answer in context: None where the query's answer words are in none of its gold chunks)."""
    inside = float(flat(ask.answer or "") in flat(context)) if answerable else None
    return len(sources & ask.gold) / len(ask.gold), inside


def f(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


async def run(args: argparse.Namespace) -> None:
    budgets = [int(b) for b in args.budgets.split(",")]
    names = args.corpora.split(",")
    embedder = LocalEmbedder()
    embedder.load()
    variants = ["", *args.variants]
    splitting = Splitting()
    # (variant, corpus, budget) -> {mode: (recall, in context)}
    table: dict[tuple[str, str, int], dict[str, tuple[float, float | None]]] = {}
    async with bench_tenant(args.data) as (conn, tid):
        for corpus in corpora.load(names):
            if corpus.held_out and not args.held_out:
                raise SystemExit(f"{corpus.name} is held out: choose settings without it (or --held-out)")
            name, _, chunks, bm25, qv, answerable = await ready(conn, tid, corpus, embedder, splitting)

            per_query: dict[tuple[str, int, str], list[tuple[float, float | None]]] = {}
            for budget in budgets:
                for i, ask in enumerate(corpus.asks):
                    context, passages, _ = bm25_packed(bm25, chunks, ask.text, name, budget)
                    per_query.setdefault(("", budget, "bm25"), []).append(
                        score(ask, answerable[i], {p.source for p in passages}, context))
            for variant in variants:
                tuning = tuning_of(variant.split(","))
                searcher = Searcher(lambda n, d: embedder, tuning)
                touched = {kv.split("=", 1)[0] for kv in variant.split(",") if kv}
                modes = {m: how for m, how in MODES.items()
                         if not variant or m.startswith("hierarchical") or touched & FLAT_FIELDS}
                for budget in budgets:
                    for i, ask in enumerate(corpus.asks):
                        one = Embedded(qv.vectors[i:i + 1], 0, 0.0)
                        for m, (mode, hybrid) in modes.items():
                            q = Query(text=ask.text, context_tokens=budget, mode=mode, hybrid=hybrid)  # type: ignore[arg-type]
                            found = await searcher.search_with(conn, tid, name, q, one, embedder.name)
                            per_query.setdefault((variant, budget, m), []).append(
                                score(ask, answerable[i], {p.source for p in found.passages}, found.context))
            for variant in variants:
                for budget in budgets:
                    cell: dict[str, tuple[float, float | None]] = {}
                    for m in [*MODES, "bm25"]:
                        rows = per_query.get((variant if (variant, budget, m) in per_query else "", budget, m), [])
                        ctx = [x for _, x in rows if x is not None]
                        cell[m] = (statistics.mean(r for r, _ in rows), statistics.mean(ctx) if ctx else None)
                    table[(variant, corpus.name, budget)] = cell
            print(f"# {corpus.name}: {len(corpus.docs)} documents, {len(chunks)} chunks, {len(corpus.asks)} queries,"
                  f" {sum(answerable)} answerable", flush=True)
    print("\nrecall / answer in context of the default (hierarchical+lex); [fused flat]; (dense hier / flat); bm25")
    for variant in variants:
        print(f"\n## {variant or 'defaults'}")
        below = 0
        rel_r: dict[int, list[float]] = {b: [] for b in budgets}
        rel_c: dict[int, list[float]] = {b: [] for b in budgets}
        for corpus_name in names:
            for budget in budgets:
                c = table[(variant, corpus_name, budget)]
                d, fl, h, dfl, bm = (c["hierarchical+lex"], c["flat+lex"], c["hierarchical"], c["flat"], c["bm25"])
                for a, b in ((d, fl), (h, dfl)):
                    below += a[0] < b[0] - 1e-9
                    below += a[1] is not None and b[1] is not None and a[1] < b[1] - 1e-9
                rel_r[budget].append(d[0] / bm[0] - 1 if bm[0] else 0.0)
                if d[1] is not None and bm[1]:
                    rel_c[budget].append(d[1] / bm[1] - 1)
                print(f"{corpus_name:>8} {budget:>4}  {f(d[0])} / {f(d[1])}  [{f(fl[0])} / {f(fl[1])}]"
                      f"  ({f(h[0])} / {f(h[1])} vs {f(dfl[0])} / {f(dfl[1])})  bm25 {f(bm[0])} / {f(bm[1])}")
        means = " ".join(f"{b}: {statistics.mean(rel_r[b]):+.1%} / "
                         f"{statistics.mean(rel_c[b]) if rel_c[b] else 0:+.1%}" for b in budgets)
        print(f"  default vs bm25 (recall / in context), mean over corpora: {means}; hierarchical below flat: {below}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default="pydocs,faq,foldoc,banking", help="the tuning corpora (the default)")
    parser.add_argument("--budgets", default="150,300,600")
    parser.add_argument("--data", help="the folder versus_bm25.py --data keeps its database in")
    parser.add_argument("--variants", nargs="*", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]")
    parser.add_argument("--held-out", action="store_true", help="allow held-out corpora (not for choosing)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
