"""Search a collection and pack what it finds into a context budget measured in tokens.

Hierarchical (the default):
  1. the sections nearest the query (their vectors are the centroids of their chunks), and the chunks
     nearest it (HNSW; with ``hybrid``, the default, also the chunks BM25 ranks first, each level's dense
     evidence fused with its lexical evidence);
  2. the chunks inside the best sections join the candidates; each candidate is scored by its own
     evidence and its section's and document's, so a chunk that merely looks alike in an unrelated
     section sinks; lexical evidence weighs by how much of the query BM25 read (``Lexical.coverage``);
  3. maximal marginal relevance orders them, dropping near-duplicates; novelty is measured within a
     document (a second passage of one document weighs less; another document's never does); adjacent
     chunks of one section are merged (their overlap counted once);
  4. passages go into the budget best first, with a citation header each; a candidate scoring under half
     the best one's is left out even when it would fit: a budget is a ceiling, not a target.
  5. optionally (``rerank``), a reranking model orders the best candidates before packing: a cross-encoder an
     upstream serves (``/v1/rerank``, a catalog model of kind ``rerank``); it reorders, the fused scores stay
     the scale the floor is measured on, and a failing reranker leaves the fused order (``rerank_error``).
The settings (bench/retrieval/versus_bm25.py) were chosen on four corpora and checked on three held out.
Flat: the ``k`` nearest chunks in order, cut at the budget: the baseline it is compared with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import psycopg

from tollway.publicids import PublicIds
from tollway.retrieval import store
from tollway.retrieval.embedders import Embedded, Embedder
from tollway.retrieval.store import Candidate, Collection
from tollway.tokens import count_text

FLAT_K = 8
# Bumped when ranking or packing changes with no setting changing (part of ``Tuning.tag``): 2, the floor where
# every score is negative (``floor_at``)
REVISION = 2
PER_MESSAGE = 4  # what a system message costs besides its text (routing.tokens' count)
Mode = Literal["hierarchical", "flat"]
# (collection's embedder name, its dims) -> the embedder
EmbedderFor = Callable[[str, int], Embedder]
# (query, candidate texts) -> a relevance score per text, higher is better (a reranking model's call)
Reranker = Callable[[str, list[str]], Awaitable[list[float]]]
RERANK_CANDIDATES = 20  # the best candidates a reranker reorders, unless the request says
# a second connection for a search's reads, in the search's transaction (``Searcher.transaction``) as its own,
# or ``None`` where the pool has none to spare now (``Searcher.gather``)
Side = Callable[[], AbstractAsyncContextManager["psycopg.AsyncConnection[Any] | None"]]


@dataclass(frozen=True, slots=True)
class Tuning:
    """Round numbers chosen on the sum of the tuning corpora, of different shapes, not on one (floor, density,
    lexical_weight and the MMR's scope by bench/retrieval/versus_bm25.py, the MMR's weight by
    bench/retrieval/sweep.py with answer in context beside recall; see bench/RESULTS.md), checked on three
    held out."""

    candidates: int = 64  # nearest chunks read per query (flat: at least k)
    sections: int = 12  # nearest sections whose chunks join the candidates
    section_chunks: int = 240  # at most this many chunks read from those sections
    # a candidate's score: its own similarity (the rest), its section's and its document's (centroids)
    section_weight: float = 0.2
    document_weight: float = 0.2
    passages: int = 50  # hierarchical: at most this many passages unless the request says (k)
    mmr_lambda: float = 0.9  # relevance vs novelty (0.75 until 2026-12-05: long pages' answers lost to it)
    mmr_within_documents: bool = True  # novelty against the same document's chosen passages only
    duplicate: float = 0.95  # cosine above which a candidate repeats one already chosen
    floor: float = 0.5  # candidates scoring under floor x the best score are not packed
    density: bool = False  # True: pack by relevance per token (a knapsack's greedy order), not relevance alone
    gain_floor: float = 0.5  # relevance counts from this share of the best score up
    tails: bool = True  # the budget's remainder takes the leading sentences of the next passage
    lexical_weight: float = 0.65  # hybrid: the lexical (BM25) share of each level's fused evidence, at most
    lexical_postings: int = store.QUERY_POSTINGS  # hybrid: the postings a query reads, rarest terms first
    ef_search: int = 100

    @property
    def tag(self) -> str:
        """These settings in a few characters (a hash of every field): part of a RAG answer's cache key, so
        an upgrade that changes how contexts are ranked or packed never serves an answer packed the old way."""
        digest = hashlib.blake2b(repr((dataclasses.astuple(self), REVISION)).encode(), digest_size=5).hexdigest()
        return f"search:{digest}"


MAX_FILTER_KEYS = 16
MAX_FILTER_OPTIONS = 100


def check_text(value: str, param: str) -> None:
    """Text that goes into a query: PostgreSQL text holds no NUL character."""
    if "\x00" in value:
        raise store.StoreError(f"'{param}' may not contain a NUL character", "invalid_value", param)


def check_filters(filters: dict[str, Any] | None, param: str = "filters") -> None:
    """Metadata filters a query may carry: up to 16 keys, each a scalar or a non-empty list of up to 100
    scalars (strings, numbers, booleans); no NUL characters. Refused with a 400 naming the key."""
    if filters is None:
        return
    if not isinstance(filters, dict) or len(filters) > MAX_FILTER_KEYS:
        raise store.StoreError(f"'{param}' is an object of at most {MAX_FILTER_KEYS} keys", "invalid_filter", param)
    for key, value in filters.items():
        where = f"{param}.{key}"
        if not key or len(key) > 128 or "\x00" in key:
            raise store.StoreError(f"'{param}' keys are 1-128 characters without NUL", "invalid_filter", param)
        options = value if isinstance(value, list) else [value]
        if not options or len(options) > MAX_FILTER_OPTIONS:
            raise store.StoreError(f"'{where}' lists 1 to {MAX_FILTER_OPTIONS} values (an empty list matches "
                                   "nothing; leave the key out instead)", "invalid_filter", where)
        for option in options:
            if not isinstance(option, str | int | float | bool) or (isinstance(option, str) and (
                    "\x00" in option or len(option) > 1024)):
                raise store.StoreError(f"'{where}' values are strings (at most 1024 characters, no NUL), numbers "
                                       "or booleans", "invalid_filter", where)


@dataclass(frozen=True, slots=True)
class Query:
    text: str
    context_tokens: int
    k: int | None = None  # flat: chunks (default 8); hierarchical: at most this many passages (default 50)
    filters: dict[str, Any] | None = None
    mode: Mode = "hierarchical"
    hybrid: bool = True  # dense and BM25 evidence fused at every level (False: dense only)
    rerank_candidates: int = RERANK_CANDIDATES  # with a reranker: the best candidates it reorders


@dataclass(frozen=True, slots=True)
class Passage:
    n: int
    document_id: int
    section_id: int
    chunk_ids: tuple[int, ...]
    title: str
    heading: str
    source: str
    text: str
    score: float
    truncated: bool = False  # only its leading sentences fit the budget

    def as_json(self, ids: PublicIds) -> dict[str, Any]:
        chunks = [ids.encode("chk", c) for c in self.chunk_ids]
        out = {"n": self.n, "document_id": ids.encode("doc", self.document_id),
               "section_id": ids.encode("sec", self.section_id), "chunk_id": chunks[0], "chunk_ids": chunks,
               "title": self.title,
               "heading": self.heading, "source": self.source, "score": round(self.score, 4), "text": self.text}
        return out | ({"truncated": True} if self.truncated else {})


Screen = Callable[[str], "str | None"]  # why a passage's text must not be trusted (None: it may be)


@dataclass(frozen=True, slots=True)
class Flagged:
    """A passage the screen flagged on its way into the context (dropped, or kept and flagged)."""

    document_id: int
    section_id: int
    chunk_id: int
    title: str
    source: str
    reason: str
    dropped: bool

    def as_json(self, ids: PublicIds) -> dict[str, Any]:
        return {"n": None, "document_id": ids.encode("doc", self.document_id),
                "section_id": ids.encode("sec", self.section_id), "chunk_id": ids.encode("chk", self.chunk_id),
                "title": self.title, "source": self.source, "flagged": self.reason, "dropped": self.dropped}


@dataclass(frozen=True, slots=True)
class Found:
    collection: Collection
    index_version: str
    context: str  # the system message's text ("" when nothing fit or nothing was found)
    passages: tuple[Passage, ...]
    context_tokens: int  # of the system message, framing included: never above the budget
    embedded: Embedded
    embedder: str
    flagged: tuple[Flagged, ...] = ()  # by the screen, in the order they were met
    screen_ms: float = 0.0
    rerank_error: str | None = None  # the reranker failed: the fused order was packed (its error's message)

    def as_json(self, ids: PublicIds, *, texts: bool = True) -> dict[str, Any]:
        sources = [p.as_json(ids) for p in self.passages]
        if not texts:
            for s in sources:
                s.pop("text")
        out = {"object": "retrieval.result", "collection": self.collection.name,
               "index_version": self.index_version, "context": self.context, "sources": sources,
               "context_tokens_used": self.context_tokens, "embedding_tokens": self.embedded.tokens}
        return out | ({"rerank_error": self.rerank_error} if self.rerank_error else {})


@dataclass(slots=True)
class Gathered:
    """What a search read from PostgreSQL (``Searcher.gather``): its candidates and the evidence the ordering
    needs. Nothing in it needs the connection it came from."""

    coll: Collection
    cands: list[Candidate]
    q: np.ndarray[Any, Any]  # the query's vector
    sections: list[tuple[int, float]]  # the nearest sections (id, cosine)
    docs: list[tuple[int, float]]  # the nearest documents (id, cosine)
    lexical: store.Lexical
    embedded: Embedded
    k: int  # at most this many passages (hierarchical) or chunks (flat)


def _seen(task: asyncio.Future[Any]) -> None:
    """A side task's outcome read (its error is not the one raised), so none is logged as never retrieved."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True, slots=True)
class _Levels:
    """A hierarchical search's reads above the chunks: the nearest sections and documents (id, cosine) and the
    chunks of those sections."""

    sections: list[tuple[int, float]]
    docs: list[tuple[int, float]]
    chunks: list[Candidate]


# -- scoring -------------------------------------------------------------------------------------
def _normalised(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    low, high = float(values.min()), float(values.max())
    span = high - low
    if span > 0:
        return np.asarray((values - low) / span)
    return np.full(len(values), 1.0 if high > 0 else 0.0)


def _fuse(dense: np.ndarray[Any, Any], lexical: np.ndarray[Any, Any], weight: float) -> np.ndarray[Any, Any]:
    """Dense and lexical evidence of the same items, each min-max normalised over them, mixed ``weight`` to
    lexical (a convex combination of normalised scores), then put back on the dense scores' range: with no
    lexical weight the scores are the cosines, so the floor and the packing read them the same either way."""
    d, lex = _normalised(dense), _normalised(lexical)
    low, high = float(dense.min()), float(dense.max())
    return np.asarray(low + (high - low) * ((1 - weight) * d + weight * lex))


def floor_at(best: float, share: float) -> float:
    """The score a candidate needs to be packed beside the best one: ``share`` of it, measured as a distance
    from it (the best's magnitude times 1 - share below it), so that it holds where the best score is
    negative too (an embedder whose unrelated texts have negative cosines; ``share * best`` would then lie
    above the best itself and leave nothing packed). The same figure as ``share * best`` where best >= 0."""
    return best - (1 - share) * abs(best)


class Ranking:
    """Candidates in maximal-marginal-relevance order (by ``score``), each chosen as it is read: an iterator
    (``mmr`` reads it whole). Near-duplicates are dropped (a cosine of ``duplicate`` or more with one already
    chosen, in any document). ``within_documents``: novelty is measured against the chosen passages of the same
    document only, so another document's passage is never pushed down for resembling this one (what a reader
    gains from a second passage of one document is what the penalty is for). ``below``: stop once every
    candidate left scores under it (the packer's floor: it would pass over the rest), the order up to there
    unchanged.

    The packer reads it only while a candidate it has not yet yielded could still enter the context
    (``left``): at 600 tokens a search packs from its first few of the 200 the whole order would rank."""

    def __init__(self, cands: list[Candidate], lam: float, duplicate: float, limit: int, *,
                 within_documents: bool = False, below: float | None = None,
                 vectors: np.ndarray[Any, Any] | None = None) -> None:
        self.cands = cands
        self.duplicate, self.limit, self.within, self.below = duplicate, limit, within_documents, below
        n = len(cands)
        self.scores = np.array([c.score for c in cands], dtype=np.float64)
        # the candidates' vectors, a row each (given: already stacked in this order); a chosen one's cosines
        # with the rest are computed when it is chosen, not the whole matrix for the few a packer reads
        self.vectors = vectors if vectors is not None else (
            np.stack([c.vector for c in cands]) if n else np.zeros((0, 1), dtype=np.float32))
        self.documents = np.array([c.document_id for c in cands], dtype=np.int64)
        # the candidates whose novelty a choice changes: its document's (within_documents, found when a passage
        # of it is first chosen) or all of them
        self.everyone = np.arange(n)
        self.members: dict[int, np.ndarray[Any, Any]] = {}
        self.chosen = 0
        self.nearest = np.full(n, -1.0)  # to any chosen passage: the duplicate test
        self.redundancy = np.full(n, -1.0)  # to the chosen passages that count for novelty
        self.gone = np.zeros(n, dtype=bool)  # taken (chosen or dropped)
        self.relevance, self.novelty = lam * self.scores, 1 - lam
        # each candidate's marginal value, kept up to date where a choice changes it (the rest stand as they
        # were: the same numbers as recomputing every value each round, for a fraction of the work); -inf: taken
        self.value = self.relevance - self.novelty * np.maximum(self.redundancy, 0)
        self.remaining = n
        self.above = n if below is None else int((self.scores >= below).sum())  # of those left, the packer reads

    def __iter__(self) -> Ranking:
        return self

    @property
    def ended(self) -> bool:
        return not (self.chosen < self.limit and self.remaining and self.above)

    def left(self) -> np.ndarray[Any, Any]:
        """The indexes (into the candidates) of those it may still yield."""
        return np.zeros(0, dtype=np.int64) if self.ended else np.flatnonzero(~self.gone)

    def __next__(self) -> Candidate:
        value, gone = self.value, self.gone
        while not self.ended:
            best = int(np.argmax(value))
            taken = float(value[best])
            value[best] = -np.inf
            gone[best] = True
            self.remaining -= 1
            if self.below is None or self.scores[best] >= self.below:
                self.above -= 1
            if self.nearest[best] >= self.duplicate:
                continue
            self.chosen += 1
            cand = self.cands[best]
            cand.value = taken
            row = self.vectors @ self.vectors[best]
            np.maximum(self.nearest, row, out=self.nearest)
            if self.within:
                doc = int(self.documents[best])
                idx = self.members.get(doc)
                if idx is None:
                    idx = self.members[doc] = np.flatnonzero(self.documents == doc)
                if len(idx) == 1:
                    return cand  # the document's only candidate, just taken: no other value changes
            else:
                idx = self.everyone
            grown = np.maximum(self.redundancy[idx], row[idx])
            self.redundancy[idx] = grown
            fresh = self.relevance[idx] - self.novelty * np.maximum(grown, 0)
            fresh[gone[idx]] = -np.inf
            value[idx] = fresh
            return cand
        raise StopIteration


def mmr(cands: list[Candidate], lam: float, duplicate: float, limit: int, *, within_documents: bool = False,
        below: float | None = None) -> list[Candidate]:
    """The whole of ``Ranking``'s order."""
    return list(Ranking(cands, lam, duplicate, limit, within_documents=within_documents, below=below))


def merge_overlap(a: str, b: str) -> str:
    """``b`` appended to ``a`` with the text they share (a chunk's overlap with the one before) once: the
    longest end of ``a`` that ``b`` starts with (ending at a word boundary of ``b``). Only the places in
    ``a`` that hold ``b``'s first character are tried, longest first (testing every length was quadratic in
    the chunk's length: 7% of the gateway's time on a flat search at 100k chunks)."""
    if not b:
        return a + "\n\n" + b
    at = a.find(b[0], max(len(a) - len(b), 0))
    while at != -1:
        size = len(a) - at
        if b.startswith(a[at:]) and (size == len(b) or b[size] in " \n"):
            return a + b[size:]
        at = a.find(b[0], at + 1)
    return a + "\n\n" + b


# -- packing -------------------------------------------------------------------------------------
def header(collection: str) -> str:
    return (f"Context retrieved from collection {collection!r} for this request. Use it where it answers the "
            "question and cite it as [n].")


def _where(title: str, heading: str) -> str:
    if not heading or heading == title:
        return title
    return heading if heading.startswith(title + " > ") else f"{title} > {heading}"


def _heading_line(heading: str, text: str) -> int:
    """The length of the line ``text`` opens with when it repeats the heading's last part (0: it does not):
    the block leaves that line out, since its header already names the section."""
    last = heading.rsplit(" > ", 1)[-1]
    return len(last) + 1 if last and text.startswith(last + "\n") else 0


def _block(n: int, title: str, heading: str, text: str) -> str:
    if cut := _heading_line(heading, text):
        text = text[cut:].lstrip("\n")
    return f"[{n}] {_where(title, heading)}\n{text}"


def pack(ordered: Sequence[Candidate] | Ranking, collection: str, budget: int, *, limit: int,
         floor: float | None, tails: bool = False, screen: Screen | None = None, drop: bool = True,
         flagged: list[Flagged] | None = None) -> tuple[str, list[Passage], int]:
    """Passages in ``ordered``'s order into ``budget`` tokens (the system message's text plus its framing),
    then shown most relevant first. Adjacent chunks of one section become one passage. Each block is
    counted on its own as it is added (counting the whole context again for every candidate is what a
    search would spend its time on); the whole is counted exactly at the end and trimmed if the seams
    between blocks tokenised longer. Returns (context, passages, tokens used).

    A ``Ranking`` is read only while one of the candidates it has not yet yielded could still enter (``_Room``):
    the packing is the same as over its whole order, without ranking what could never be packed.

    ``screen`` (an injection check) reads each candidate as it would enter the context: a flagged one is
    appended to ``flagged`` and, with ``drop``, left out, so its room goes to the next candidate."""
    top = header(collection)
    it = iter(ordered)
    first = next(it, None)
    best = first.score if first is not None else 0.0
    groups: list[list[Candidate]] = []
    sizes: list[int] = []
    total = count_text(top) + PER_MESSAGE
    room = _Room(ordered, budget, limit, None if floor is None else floor_at(best, floor), tails) \
        if isinstance(ordered, Ranking) else None

    def read() -> Iterator[Candidate]:
        """The candidates in order; a Ranking's only while one left could enter the context as it stands."""
        cand = first
        while cand is not None:
            yield cand
            if room is not None and not room.open(groups, sizes, total):
                return
            cand = next(it, None)

    least = None if floor is None else floor_at(best, floor)
    for cand in read():
        if least is not None and cand.score < least:
            continue
        at = _joins(cand, groups)
        if at is None and len(groups) >= limit:
            continue
        if at is None and _passed_over(cand, budget - total, tails):
            continue  # its block is longer than its text (a header of 4+ tokens): it cannot fit, and counting it
            # is most of a search's packing once the budget is full
        group, size, grown = _entering(cand, at, groups, sizes, total, budget, tails)
        if grown > budget:
            continue
        if screen is not None:
            entering = group[0] if at is None else cand
            reason = screen(entering.text)
            if reason is not None:
                if flagged is not None and all(f.chunk_id != entering.chunk_id for f in flagged):
                    flagged.append(Flagged(entering.document_id, entering.section_id, entering.chunk_id,
                                           entering.title, entering.source, reason, drop))
                if drop:
                    continue
        if at is None:
            groups.append(group)
            sizes.append(size)
        else:
            groups[at], sizes[at] = group, size
        total = grown
    ranked = sorted(groups, key=lambda g: -max(c.score for c in g))  # the most relevant first
    while ranked:
        used = count_text(_render(top, ranked)) + PER_MESSAGE
        if used <= budget:
            return _render(top, ranked), [_passage(i + 1, g) for i, g in enumerate(ranked)], used
        ranked.pop()  # the seams counted longer than the blocks did: the least relevant goes
    return "", [], 0


def _passed_over(cand: Candidate, room: int, tails: bool) -> bool:
    """A new passage whose text alone is longer than the room left, which no tail may take and whose block keeps
    its whole text: the packer passes over it uncounted."""
    return (cand.tokens > room and not (tails and room >= MIN_TAIL)
            and not _heading_line(cand.heading, cand.text))


def _entering(cand: Candidate, at: int | None, groups: list[list[Candidate]], sizes: list[int], total: int,
              budget: int, tails: bool) -> tuple[list[Candidate], int, int]:
    """What ``cand`` would make of the context: its passage (a new one, or the group ``at`` it joins), that
    passage's size and the context's size after it (over ``budget``: it does not fit)."""
    group = [cand] if at is None else sorted([*groups[at], cand], key=lambda c: c.ord)
    n = len(groups) + 1 if at is None else at + 1
    size = count_text("\n\n" + _block(n, group[0].title, group[0].heading, _text(group)))
    grown = total + size - (0 if at is None else sizes[at])
    if grown > budget and at is None and tails and budget - total >= MIN_TAIL:
        # the rest of the budget takes the head of this passage, cut at a sentence
        head = _head(cand, n, budget - total)
        if head is not None:
            group, size = [head], count_text("\n\n" + _block(n, head.title, head.heading, head.text))
            grown = total + size
    return group, size, grown


def _joins(cand: Candidate, groups: list[list[Candidate]]) -> int | None:
    """The passage ``cand`` extends (an adjacent chunk of its section, not cut to a tail), if any."""
    return next((i for i, g in enumerate(groups) if g[0].section_id == cand.section_id and not g[0].truncated
                 and any(abs(c.ord - cand.ord) == 1 for c in g)), None)


class _Room:
    """Whether any candidate a ``Ranking`` may still yield could enter the context as it stands: the packer
    stops reading it when none could. Exact: a candidate the packer would pass over now it passes over later
    too (the room only shrinks; a passage it could join only appears by another candidate entering, which
    this finds first). Each candidate is judged as the packer would: the floor, the passage limit, the
    uncounted pass-over, and otherwise its block counted (cached per state)."""

    def __init__(self, ranking: Ranking, budget: int, limit: int, least: float | None, tails: bool) -> None:
        self.ranking, self.budget, self.limit, self.tails = ranking, budget, limit, tails
        cands = ranking.cands
        self.eligible = (np.ones(len(cands), dtype=bool) if least is None
                         else ranking.scores >= least)  # the packer's floor
        self.tokens = np.array([c.tokens for c in cands], dtype=np.int64)
        self.keys = np.array([(c.section_id << 20) | (c.ord & 0xFFFFF) for c in cands], dtype=np.int64)
        self._cut: np.ndarray[Any, Any] | None = None  # whose block leaves its text's first line out
        self._sentences: dict[int, bool] = {}
        self.state: tuple[int, int] | None = None  # (passages, total) when ``witness`` was found
        self.witness = -1  # a candidate that could enter in that state
        self.grows: dict[tuple[int, int, int], int] = {}  # (candidate, passage, its length) -> tokens it adds

    def sentence(self, i: int) -> bool:
        """Whether the candidate's text has a sentence's end (after its first character) where a tail could cut
        it (looked for once, when asked)."""
        found = self._sentences.get(i)
        if found is None:
            found = self._sentences[i] = _SENTENCE_END.search(self.ranking.cands[i].text, 1) is not None
        return found

    def cut(self) -> np.ndarray[Any, Any]:
        if self._cut is None:
            self._cut = np.array([bool(_heading_line(c.heading, c.text)) for c in self.ranking.cands], dtype=bool)
        return self._cut

    def open(self, groups: list[list[Candidate]], sizes: list[int], total: int) -> bool:
        state = (sum(len(g) for g in groups), total)
        if (state == self.state and self.witness >= 0 and not self.ranking.gone[self.witness]
                and not self.ranking.ended):
            return True
        self.state, self.witness = state, self._find(groups, sizes, total)
        return self.witness >= 0

    def _find(self, groups: list[list[Candidate]], sizes: list[int], total: int) -> int:
        left = self.ranking.left()
        left = left[self.eligible[left]]
        if not len(left):
            return -1
        room = self.budget - total
        new = len(groups) < self.limit
        if new and self.tails and room >= MIN_TAIL:
            for i in left:  # a tail may take its head (whether one fits is counted when it is read)
                if self.sentence(int(i)):
                    return int(i)
        neighbours = np.array([(c.section_id << 20) | ((c.ord + d) & 0xFFFFF) for g in groups if not g[0].truncated
                               for c in g for d in (-1, 1)], dtype=np.int64)
        joining = np.isin(self.keys[left], neighbours) if len(neighbours) else np.zeros(len(left), dtype=bool)
        maybe = joining | (new & ((self.tokens[left] <= room) | self.cut()[left]))
        cands = self.ranking.cands
        for i in left[maybe]:
            cand = cands[i]
            at = _joins(cand, groups)
            if at is None and (not new or _passed_over(cand, room, self.tails)):
                continue
            # what it adds depends on the passage it makes or joins, never on the room (no tail is cut here)
            key = (int(i), -1 if at is None else at, len(groups) if at is None else len(groups[at]))
            adds = self.grows.get(key)
            if adds is None:
                adds = self.grows[key] = _entering(cand, at, groups, sizes, total, self.budget, self.tails)[2] - total
            if total + adds <= self.budget:
                return int(i)
        return -1


MIN_TAIL = 32  # tokens: less than this left in the budget is not worth a cut passage
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+|\n+")


def _head(cand: Candidate, n: int, room: int) -> Candidate | None:
    """The candidate cut after its last whole sentence (or line) that fits ``room`` tokens with its citation
    (marked with an ellipsis), or None when not even its first sentence does."""
    fixed = count_text("\n\n" + _block(n, cand.title, cand.heading, " …"))
    cut = None
    for boundary in _SENTENCE_END.finditer(cand.text):
        if boundary.start() == 0:
            continue
        if count_text(cand.text[:boundary.start()]) + fixed > room:
            break
        cut = boundary.start()
    if cut is None:
        return None
    text = cand.text[:cut] + " …"
    return dataclasses.replace(cand, text=text, tokens=count_text(text), truncated=True)


def _text(group: list[Candidate]) -> str:
    text = group[0].text
    for c in group[1:]:
        text = merge_overlap(text, c.text)
    return text


def _render(top: str, groups: list[list[Candidate]]) -> str:
    blocks = [_block(i + 1, g[0].title, g[0].heading, _text(g)) for i, g in enumerate(groups)]
    return "\n\n".join([top, *blocks])


def _passage(n: int, group: list[Candidate]) -> Passage:
    first = group[0]
    return Passage(n=n, document_id=first.document_id, section_id=first.section_id,
                   chunk_ids=tuple(c.chunk_id for c in group), title=first.title, heading=first.heading,
                   source=first.source, text=_text(group), score=max(c.score for c in group),
                   truncated=any(c.truncated for c in group))


# -- the search ----------------------------------------------------------------------------------
async def reranked(ordered: list[Candidate], text: str, rerank: Reranker, n: int) -> list[Candidate]:
    """The best ``n`` candidates in the reranker's order, then the rest as they were. The reordered ones take
    the fused scores in order (the best score to the reranker's first), so the packer's floor keeps its
    scale whatever range the reranker's scores have."""
    top, rest = ordered[:n], ordered[n:]
    scores = await rerank(text, [c.text for c in top])
    if len(scores) != len(top):
        raise ValueError(f"the reranker scored {len(scores)} of {len(top)} passages")
    fused = sorted((c.score for c in top), reverse=True)
    order = sorted(range(len(top)), key=lambda i: -scores[i])
    out = [top[i] for i in order]
    for c, score in zip(out, fused, strict=True):
        c.score = score
    return out + rest


class Searcher:
    def __init__(self, embedder_for: EmbedderFor, tuning: Tuning | None = None) -> None:
        self.embedder_for = embedder_for
        self.tuning = tuning or Tuning()
        self.tag = self.tuning.tag  # its settings' hash, computed once (a RAG answer's cache key reads it)

    def transaction(self, conn: psycopg.AsyncConnection[Any],
                    tenant_id: int) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A search's transaction: the tenant's, with the vector index's settings. A caller that looks its
        collection up inside it (``store.get_collection``: this transaction's revision) and then calls
        ``search_in`` reads the collection once."""
        return store.tenant_tx(conn, tenant_id, settings=store.search_settings(self.tuning.ef_search))

    async def search_with(self, conn: psycopg.AsyncConnection[Any], tenant_id: int, collection: str, query: Query,
                          embedding: Embedded | Awaitable[Embedded], embedder: str, *, screen: Screen | None = None,
                          drop: bool = True, rerank: Reranker | None = None) -> Found:
        """``search_in`` in a transaction of its own."""
        async with self.transaction(conn, tenant_id):
            coll = await store.get_collection(conn, tenant_id, collection)
            return await self.search_in(conn, coll, query, embedding, embedder, screen=screen, drop=drop,
                                        rerank=rerank)

    async def search_in(self, conn: psycopg.AsyncConnection[Any], coll: Collection, query: Query,
                        embedding: Embedded | Awaitable[Embedded], embedder: str, *, screen: Screen | None = None,
                        drop: bool = True, rerank: Reranker | None = None) -> Found:
        """Inside ``transaction``, ``coll`` as it reads it: ``gather`` then ``finish`` (a caller that must not
        hold its connection while a reranker answers calls the two itself, ending the transaction between)."""
        got = await self.gather(conn, coll, query, embedding)
        return await self.finish(got, query, embedder, screen=screen, drop=drop, rerank=rerank)

    async def gather(self, conn: psycopg.AsyncConnection[Any], coll: Collection, query: Query,
                     embedding: Embedded | Awaitable[Embedded], side: Side | None = None) -> Gathered:
        """What the search reads from PostgreSQL, inside ``transaction``. ``embedding``: the query's, or one still
        being computed (a task): the lexical ranking needs none, so it runs in PostgreSQL while the embedder
        works, and the vector queries wait for the vector. ``side``: a second connection in the same tenant's
        search transaction, where the pool has one to spare (``None`` where it has not): a hierarchical search
        reads its sections there (their centroids, then their chunks) while this one reads the nearest chunks,
        on another core of PostgreSQL's. The candidates and their order are the same either way."""
        t = self.tuning
        k = query.k or (t.passages if query.mode == "hierarchical" else FLAT_K)
        n = t.candidates if query.mode == "hierarchical" else max(t.candidates, k)
        levels: asyncio.Future[_Levels | None] | None = None
        if side is not None and query.mode == "hierarchical":
            # the side transaction opens (a checkout, the tenant's settings) while BM25 ranks
            levels = asyncio.ensure_future(self._levels_beside(side, coll, query, embedding))
        try:
            # While the query is still being embedded, the lexical candidates' rows are read with their ranking,
            # off the critical path; with the vector already here, only those the nearest chunks do not bring
            early = not isinstance(embedding, Embedded)
            lexical, worded = store.Lexical([]), list[Candidate]()
            if query.hybrid and early:
                lexical, worded = await store.lexical_candidates(conn, coll, query.text, n, query.filters,
                                                                 t.lexical_postings)
            elif query.hybrid:
                lexical = await store.lexical_chunks(conn, coll, query.text, n, query.filters, t.lexical_postings)
            embedded = embedding if isinstance(embedding, Embedded) else await embedding
            q = embedded.vectors[0]
            near = await store.nearest_chunks(conn, coll, q, n, query.filters)
            known = {c.chunk_id for c in near}
            if early:
                cands = near + [c for c in worded if c.chunk_id not in known]
            else:
                extra = [i for i, _ in lexical.scores if i not in known]
                cands = near + (await store.chunks_by_id(conn, extra) if extra else [])
            # shielded: a search cancelled here (its client gone) leaves the side's statement to finish
            found = await asyncio.shield(levels) if levels is not None else None
        except BaseException:
            if levels is not None:  # its transaction ends before this one's error goes on (never cancelled
                levels.add_done_callback(_seen)  # mid-statement: a connection the pool can take back)
                await asyncio.wait({levels})
            raise
        if found is None and query.mode == "hierarchical":  # no connection to spare: the sections here, after
            found = await self._levels(conn, coll, query, q)
        seen = {c.chunk_id for c in cands}
        if found is not None:
            cands += [c for c in found.chunks if c.chunk_id not in seen]
        sections, docs = (found.sections, found.docs) if found is not None else ([], [])
        return Gathered(coll, cands, q, sections, docs, lexical, embedded, k)

    async def _levels(self, conn: psycopg.AsyncConnection[Any], coll: Collection, query: Query,
                      q: np.ndarray[Any, Any]) -> _Levels:
        """A hierarchical search's sections and documents nearest the query, and the chunks of those sections."""
        t = self.tuning
        sections = await store.nearest_centroids(conn, coll, "sections", q, t.sections, query.filters)
        docs = (await store.nearest_centroids(conn, coll, "documents", q, t.sections, query.filters)
                if t.document_weight else [])
        chunks = (await store.chunks_of_sections(conn, [s for s, _ in sections], t.section_chunks)
                  if sections else [])
        return _Levels(sections, docs, chunks)

    async def _levels_beside(self, side: Side, coll: Collection, query: Query,
                             embedding: Embedded | Awaitable[Embedded]) -> _Levels | None:
        """``_levels`` on the side connection, its transaction ended before this returns; ``None`` where the
        pool had none to spare."""
        async with side() as other:
            if other is None:
                return None
            embedded = embedding if isinstance(embedding, Embedded) else await embedding
            return await self._levels(other, coll, query, embedded.vectors[0])

    async def finish(self, got: Gathered, query: Query, embedder: str, *, screen: Screen | None = None,
                     drop: bool = True, rerank: Reranker | None = None) -> Found:
        """The candidates ``gather`` read, ordered (and reranked), screened and packed: no database, so the
        search's transaction may have ended (a reranker's answer is awaited here)."""
        t = self.tuning
        coll, k = got.coll, got.k
        ordered: list[Candidate] | Ranking = self._order(got.cands, got.q, got.sections, got.docs, query,
                                                         got.lexical, k, floor_ends=rerank is None)
        rerank_error = None
        if rerank is not None and (whole := list(ordered)):  # the reranker reads the best of the whole order
            ordered = whole
            try:
                ordered = await reranked(whole, query.text, rerank, query.rerank_candidates)
            except Exception as exc:  # a reranker is an improvement, never a dependency: pack the fused order
                rerank_error = str(exc) or type(exc).__name__
        floor = t.floor if query.mode == "hierarchical" else None
        limit = k  # flat: its k candidates at most
        flagged: list[Flagged] = []
        spent = [0.0]  # seconds in the screen

        def timed(text: str) -> str | None:
            assert screen is not None
            began = time.perf_counter()
            try:
                return screen(text)
            finally:
                spent[0] += time.perf_counter() - began

        context, passages, used = pack(ordered, coll.name, query.context_tokens, limit=limit, floor=floor,
                                       tails=query.mode == "hierarchical" and t.tails,
                                       screen=timed if screen is not None else None, drop=drop, flagged=flagged)
        return Found(coll, coll.index_version, context, tuple(passages), used, got.embedded, embedder,
                     tuple(flagged), spent[0] * 1000, rerank_error)

    def _order(self, cands: list[Candidate], q: np.ndarray[Any, Any], sections: list[tuple[int, float]],
               docs: list[tuple[int, float]], query: Query, lexical: store.Lexical, k: int, *,
               floor_ends: bool = False) -> list[Candidate] | Ranking:
        t = self.tuning
        if not cands:
            return []
        # arrays over the candidates (a level's evidence per section or document, indexed back to each chunk):
        # the same numbers the per-candidate form computed, for a fraction of a search's time
        vectors = np.stack([c.vector for c in cands])
        chunk = (vectors @ q).astype(np.float64)
        n = len(cands)
        section_keys, at_section = np.unique(np.fromiter((c.section_id for c in cands), np.int64, n),
                                             return_inverse=True)
        doc_keys, at_doc = np.unique(np.fromiter((c.document_id for c in cands), np.int64, n), return_inverse=True)
        section_sim, doc_sim = dict(sections), dict(docs)
        s_floor = min(section_sim.values()) if section_sim else 0.0
        d_floor = min(doc_sim.values()) if doc_sim else 0.0
        section = np.array([section_sim.get(int(key), s_floor) for key in section_keys], dtype=np.float64)
        document = np.array([doc_sim.get(int(key), d_floor) for key in doc_keys], dtype=np.float64)
        if query.hybrid:
            # each level's dense evidence fused with its lexical evidence (a section's or document's: its best
            # chunk's BM25), both min-max normalised over this query's candidates: a confident lexical match
            # (a rare term) stands out as far as a confident dense one does, which rank fusion flattens
            bm25 = dict(lexical.scores)
            lex = np.fromiter((bm25.get(c.chunk_id, 0.0) for c in cands), np.float64, n)
            # lexical evidence weighs as much of its share as the query it read: all of a short question's
            # terms, a few of a 500-word scenario's
            weight = t.lexical_weight * min(1.0, lexical.coverage)
            lex_section = np.zeros(len(section_keys))
            np.maximum.at(lex_section, at_section, lex)
            lex_doc = np.zeros(len(doc_keys))
            np.maximum.at(lex_doc, at_doc, lex)
            chunk = _fuse(chunk, lex, weight)
            section = _fuse(section, lex_section, weight)
            document = _fuse(document, lex_doc, weight)
        for c, similarity in zip(cands, chunk.tolist(), strict=True):
            c.similarity = similarity
        if query.mode == "flat":
            for c in cands:
                c.score = c.similarity
            return sorted(cands, key=lambda c: -c.score)[:k]
        own = 1 - t.section_weight - t.document_weight
        scores = own * chunk + t.section_weight * section[at_section] + t.document_weight * document[at_doc]
        for c, score in zip(cands, scores.tolist(), strict=True):
            c.score = score
        order = np.argsort(-scores, kind="stable")
        cands = [cands[i] for i in order]
        # with the packer's floor as the ordering's end (a reranker reorders past it; density re-sorts)
        below = floor_at(cands[0].score, t.floor) if floor_ends and not t.density else None
        ranking = Ranking(cands, t.mmr_lambda, t.duplicate, limit=max(k * 4, 16),
                          within_documents=t.mmr_within_documents, below=below, vectors=vectors[order])
        if not t.density:
            return ranking  # ranked as the packer reads it
        picked = list(ranking)
        if picked:
            # relevance above gain_floor x the best, per token the passage costs with its citation header
            base = floor_at(max(c.score for c in picked), t.gain_floor)
            picked.sort(key=lambda c: -max(c.score - base, 0.0) / (c.tokens + count_text(_where(c.title, c.heading)) + 4))
        return picked
