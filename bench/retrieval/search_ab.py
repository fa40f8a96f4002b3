"""The search's speed against an earlier commit's, on a database kept by lexical_scale.py, in one process:
the two arms take turns query by query (which goes first alternates), so the machine's drift falls on both,
and every query's packed passages must be the same in both (a change meant to be faster, not different).

Only ``retrieval/search.py`` is taken from the earlier commit (``git show REV:retrieval/search.py``); the
store's queries are today's for both arms.

    .venv/bin/python bench/retrieval/lexical_scale.py --sizes 100000 --data DIR     # once: builds DIR/100000
    .venv/bin/python bench/retrieval/search_ab.py --before REV --data DIR [--size 100000] [--queries 300]
        [--embed]    # the query embedded by the packaged embedder while the search runs, as the gateway does

Then the ordering and the packing alone (``Searcher._order`` and ``pack``, the part of a search that runs in the
gateway after PostgreSQL has answered): each query's candidates as today's search read them, copied, ordered and
packed by each arm's code in turn (alternating, five rounds), the packed contexts compared.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector_async

sys.path.insert(0, str(Path(__file__).parents[1]))  # bench/common.py
from common import bench_tenant, module_at
from lexical_scale import DIMS, ms, sentences

from tollway.retrieval import Query, Tuning, search
from tollway.retrieval.embedders import Embedded, LocalEmbedder


async def run(args: argparse.Namespace) -> None:
    queries = random.Random(args.seed).sample(sentences(), args.queries)
    embedder = LocalEmbedder() if args.embed else None
    if embedder is not None:
        embedder.load()
    with tempfile.TemporaryDirectory(prefix="tollway-search-ab-") as tmp:
        modules = {"before": module_at(args.before, "retrieval/search.py", Path(tmp)), "now": search}
        arms = {name: module.Searcher(lambda name, dims: None, Tuning()) for name, module in modules.items()}
        took: dict[str, list[float]] = {name: [] for name in arms}
        inputs: list[Any] = []  # each query's candidates and the rest of what today's _order was given
        async with bench_tenant(Path(args.data) / str(args.size)) as (conn, tid):
            await register_vector_async(conn)
            for i, text in enumerate(queries):
                packed = {}
                for name in (["before", "now"] if i % 2 else ["now", "before"]):
                    began = time.perf_counter()
                    if embedder is not None:
                        embedding: Any = asyncio.ensure_future(embedder.embed([text], query=True))
                    else:
                        q = np.random.default_rng(len(text)).standard_normal(DIMS).astype(np.float32)
                        embedding = Embedded((q / np.linalg.norm(q))[None, :], 0, 0.0)
                        began = time.perf_counter()
                    found = await arms[name].search_with(conn, tid, f"shaped{args.size}",
                                                         Query(text=text, context_tokens=args.context_tokens),
                                                         embedding, "bench")
                    if i >= args.warmup:
                        took[name].append((time.perf_counter() - began) * 1000)
                    packed[name] = [(p.chunk_ids, p.text) for p in found.passages]
                assert packed["before"] == packed["now"], f"the arms packed different passages for {text!r}"
            # then, untimed, what today's search hands its ordering, copied before the ordering changes it
            recorder = search.Searcher(lambda name, dims: None, Tuning())
            ordering = recorder._order

            def recorded(cands: Any, *rest: Any, **named: Any) -> Any:
                inputs.append(copy.deepcopy((cands, rest, named)))
                return ordering(cands, *rest, **named)

            recorder._order = recorded  # type: ignore[method-assign]
            for text in queries[args.warmup:]:
                q = (await embedder.embed([text], query=True)).vectors[0] if embedder is not None else \
                    np.random.default_rng(len(text)).standard_normal(DIMS).astype(np.float32)
                await recorder.search_with(conn, tid, f"shaped{args.size}",
                                           Query(text=text, context_tokens=args.context_tokens),
                                           Embedded((q / np.linalg.norm(q))[None, :], 0, 0.0), "bench")
    print(f"# {args.queries - args.warmup} queries each at {args.size:,} chunks, {args.context_tokens} tokens, "
          f"{'embedded while searching' if args.embed else 'a given vector'}; the same passages in both arms")
    for name, values in took.items():
        print(f"  {name + (' (' + args.before + ')' if name == 'before' else ''):<24} {ms(values)}")
    print(f"# the ordering and the packing alone, {len(inputs)} searches' candidates x 5 rounds")
    alone: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(5):
        for i, (cands, rest, named) in enumerate(inputs):
            contexts = {}
            for name in (["before", "now"] if (i + round_) % 2 else ["now", "before"]):
                mine = copy.deepcopy(cands)
                began = time.perf_counter()
                ordered = modules[name].Searcher._order(arms[name], mine, *rest, **named)
                context, passages, used = modules[name].pack(ordered, "c", args.context_tokens, limit=rest[-1],
                                                             floor=Tuning().floor, tails=Tuning().tails)
                contexts[name] = (context, used, [(p.chunk_ids, p.text) for p in passages])
                alone[name].append((time.perf_counter() - began) * 1000)
            assert contexts["before"] == contexts["now"], "the arms packed different contexts"
    for name, values in alone.items():
        print(f"  {name + (' (' + args.before + ')' if name == 'before' else ''):<24} {ms(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit whose retrieval/search.py is the other arm")
    parser.add_argument("--data", required=True, help="the folder lexical_scale.py --data kept")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=320)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--context-tokens", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--embed", action="store_true")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
