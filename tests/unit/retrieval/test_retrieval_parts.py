"""The pure parts of retrieval: documents into sections and chunks, merging overlaps, packing into a budget."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
from pgvector import HalfVector

from tollway.infra.fair import Turns
from tollway.retrieval import DocumentError, Splitting, decode, parse
from tollway.retrieval.documents import pack as pack_chunks
from tollway.retrieval.embedders import LocalEmbedder
from tollway.retrieval.search import PER_MESSAGE, Ranking, floor_at, merge_overlap, mmr, pack
from tollway.retrieval.store import Candidate, _vectors
from tollway.routing import count_text


def test_markdown_sections_follow_headings_not_code():
    text = ("# Guide\n\nIntro words.\n\n## Setup\n\nRun it.\n\n```\n# not a heading\n```\n\n"
            "### Deep\n\nDeeper.\n\n## Use\n\nUse it.")
    doc = parse(text, "markdown", title=None, source="docs/guide.md", splitting=Splitting(whole_tokens=0))
    assert doc.title == "Guide"
    assert [s.heading for s in doc.sections] == ["Guide", "Guide > Setup", "Guide > Setup > Deep", "Guide > Use"]
    assert "# not a heading" in doc.sections[1].text


def test_a_short_document_is_one_chunk_and_its_hash_names_the_settings():
    words = " ".join(f"Word {i}." for i in range(52))  # ~220 tokens of sentences: more than one chunk of 200
    text = f"# Note\n\n{words}\n\n## Detail\n\nMore words here."
    whole = parse(text, "markdown", title=None, source="n.md", splitting=Splitting())
    split = parse(text, "markdown", title=None, source="n.md", splitting=Splitting(whole_tokens=0))
    short = parse(text, "markdown", title=None, source="n.md", splitting=Splitting(whole_tokens=50))
    assert whole.tokens <= Splitting().whole_tokens
    assert [len(s.chunks) for s in whole.sections] == [1]
    assert "Word 0." in whole.sections[0].chunks[0].text and "More words here." in whole.sections[0].chunks[0].text
    assert split.chunks > 1 and short.chunks > 1  # off, or longer than the setting: split as before
    assert len({whole.content_hash, split.content_hash, short.content_hash}) == 3  # re-ingest re-splits
    assert Splitting().tag == "c200o32s1024w240"


def test_a_document_nested_deeper_than_python_recurses_is_parsed():
    """50,000 nested elements parse (html.parser keeps them); the walk over them used to raise RecursionError,
    a 500 for the ingestion that sent it."""
    html = "<html><body><h1>Deep</h1>" + "<div>" * 50_000 + "the text at the bottom" + "</div>" * 50_000 + "</body></html>"
    doc = parse(html, "html", title=None, source="deep.html", splitting=Splitting(whole_tokens=0))
    assert [s.heading for s in doc.sections] == ["Deep"]
    assert "the text at the bottom" in doc.sections[0].text


def test_html_drops_scripts_and_navigation_and_splits_by_headings():
    html = ("<html><head><title>T</title><style>p{}</style></head><body><nav>menu</nav><h1>A</h1><p>one</p>"
            "<script>evil()</script><h2>B</h2><ul><li>x</li><li>y</li></ul></body></html>")
    doc = parse(html, "html", title=None, source="a.html", splitting=Splitting(whole_tokens=0))
    assert doc.title == "T"
    assert [(s.heading, s.text) for s in doc.sections] == [("A", "A\none"), ("A > B", "B\nx\ny")]


def test_html_drops_the_permalinks_documentation_generators_add_and_keeps_other_links():
    html = ('<html><body><h1>json<a class="headerlink" href="#module-json" title="Link">¶</a></h1>'
            '<p>Read <a href="#basic-usage">Basic Usage</a> first.</p>'
            '<h2>Basic Usage<a class="headerlink" href="#basic-usage">¶</a></h2>'
            '<dl><dt id="json.dump">json.dump(obj, fp)<a class="headerlink" href="#json.dump">¶</a></dt>'
            '<dd>Serialize obj.</dd></dl><h2><a href="#x" aria-hidden="true">#</a>Notes</h2><p>See '
            '<a href="https://example.org/#top">the site</a>.</p></body></html>')
    doc = parse(html, "html", title=None, source="json.html", splitting=Splitting(whole_tokens=0))
    assert [s.heading for s in doc.sections] == ["json", "json > Basic Usage", "json > Notes"]
    text = "\n".join(s.text for s in doc.sections)
    assert "¶" not in text and "#" not in text
    assert "json.dump(obj, fp)" in text and "Read Basic Usage first." in text and "See the site." in text


def test_text_without_headings_is_cut_into_sections_by_size_and_chunks_overlap():
    paragraphs = [" ".join(f"word{j}" for j in range(i % 7, i % 7 + 20)) + "." for i in range(60)]
    doc = parse("\n\n".join(paragraphs), "text", title="Plain", source="p.txt",
                splitting=Splitting(chunk_tokens=120, chunk_overlap=60, section_tokens=400))
    assert len(doc.sections) > 1
    assert all(s.tokens <= 400 * 1.5 for s in doc.sections)
    for section in doc.sections:
        assert all(c.tokens <= 120 for c in section.chunks)
        assert len(section.chunks) > 1
        for a, b in zip(section.chunks, section.chunks[1:], strict=False):
            assert a.text.split("\n\n")[-1] == b.text.split("\n\n")[0]  # the overlap carried over


def test_a_run_on_text_is_cut_by_tokens_with_overlap():
    words = [f"w{i}" for i in range(400)]
    doc = parse(" ".join(words), "text", title="Run-on", source="r.txt",
                splitting=Splitting(chunk_tokens=100, chunk_overlap=20, section_tokens=4000))
    chunks = [c.text for c in doc.sections[0].chunks]
    assert len(chunks) > 3
    assert all(count_text(c) <= 100 for c in chunks)
    for a, b in itertools.pairwise(chunks):
        assert a.split()[-2] in b.split()[:12]  # neighbours share text
    assert chunks[-1].split()[-1] == "w399"


def test_chunks_are_packed_as_when_every_candidate_piece_was_counted():
    """Counting a piece only once the units' own counts pass the limit packs the same pieces, with the same
    counts, as counting every candidate: sentences ending in punctuation (which joins with the separator),
    list items, code, numbers, other scripts, token slices that start with a space."""
    rng = random.Random(11)
    shapes = [
        lambda: " ".join(rng.choice(["Refunds", "take", "five", "days.", "Cards", "are", "blocked", "at",
                                     "once!", "Why?", "(see", "page", "12)."]) for _ in range(rng.randint(1, 30))),
        lambda: "- " + rng.choice(["x", "item 7", "**bold**", "`code`"]),
        lambda: "def f(x):\n    return x * " + str(rng.randint(0, 10**6)),
        lambda: "".join(rng.choice("日本語のテキストです。 Ünïcödé ") for _ in range(rng.randint(1, 60))),
        lambda: " " + " ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(1, 20))),
        lambda: rng.choice([".", "...", "!!", ")", "\"quoted.\""]),
    ]
    compared = 0
    for _ in range(60):
        units = [(t, count_text(t)) for t in (rng.choice(shapes)() for _ in range(rng.randint(1, 120)))]
        for limit, overlap in ((200, 32), (64, 16), (1024, 0), (30, 0)):
            units_fit = [(t, n) for t, n in units if n <= limit]
            for sep in ("\n\n", " "):
                got = pack_chunks(units_fit, limit, overlap, sep)
                assert got == pack_chunks(units_fit, limit, overlap, sep, exact=True)
                assert all(n <= limit and n == count_text(t) for t, n in got)
                compared += len(got)
    assert compared > 2000


@pytest.mark.parametrize("raw", [b"", b"  \n\t ", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "caf\xe9".encode("latin-1")])
def test_empty_and_binary_documents_are_refused(raw):
    with pytest.raises(DocumentError):
        parse(decode(raw), "text", title=None, source="x", splitting=Splitting())


def test_merge_overlap_counts_shared_text_once():
    assert merge_overlap("alpha beta gamma", "beta gamma delta") == "alpha beta gamma delta"
    assert merge_overlap("alpha", "delta") == "alpha\n\ndelta"


def _merge_every_length(a: str, b: str) -> str:
    """The first form: every shared length tried, longest first."""
    for size in range(min(len(a), len(b)), 0, -1):
        if a.endswith(b[:size]) and (size == len(b) or b[size] in " \n"):
            return a + b[size:]
    return a + "\n\n" + b


def test_merge_overlap_finds_what_trying_every_length_finds():
    rng = np.random.default_rng(3)
    words = ["a", "ab", "b", "ba", "aa", "\n", "abba"]
    for _ in range(3000):
        a = " ".join(rng.choice(words, int(rng.integers(0, 12))))
        b = " ".join(rng.choice(words, int(rng.integers(0, 12))))
        if rng.random() < 0.5 and a:  # b starts with an end of a, as adjacent chunks do
            b = a[int(rng.integers(0, len(a))):] + b
        assert merge_overlap(a, b) == _merge_every_length(a, b), (a, b)


def _candidates(rng: random.Random, n: int) -> list[Candidate]:
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["fee", "card", "loan", "rate", "42", "é", "—"]) for _ in range(rng.randint(1, 90)))
        vector = np.asarray([rng.random() for _ in range(8)], dtype=np.float32)
        out.append(Candidate(chunk_id=i, document_id=i // 3, section_id=i // 2, ord=i % 2, text=words,
                             tokens=count_text(words), title=f"Doc {i // 3}", heading=f"Part {i // 2}",
                             source=f"d{i // 3}.md", vector=vector / np.linalg.norm(vector),
                             score=rng.random()))
    return out


def test_packing_never_exceeds_the_budget():
    rng = random.Random(5)
    for _ in range(200):
        cands = sorted(_candidates(rng, rng.randint(0, 30)), key=lambda c: -c.score)
        budget = rng.randint(1, 1500)
        context, passages, used = pack(cands, "kb", budget, limit=rng.randint(1, 40), floor=rng.choice([None, 0.5]),
                                       tails=rng.random() < 0.5)
        assert used <= budget
        assert used == (count_text(context) + PER_MESSAGE if context else 0)
        assert len({c for p in passages for c in p.chunk_ids}) == sum(len(p.chunk_ids) for p in passages)
        for p in passages:
            stored = {c.chunk_id: c.text for c in cands}
            if p.truncated:  # a cut passage is a leading part of one chunk's text
                assert len(p.chunk_ids) == 1
                assert stored[p.chunk_ids[0]].startswith(p.text.removesuffix(" …"))


def test_packing_passes_over_what_cannot_fit_without_counting_it_and_packs_the_same():
    """A candidate whose own text is longer than the budget's room is passed over uncounted; with the texts'
    token counts unknown (0: nothing is passed over early) the packing is the same, ties, headings repeated at
    a text's start, leading newlines and tails included."""
    rng = random.Random(11)
    for _ in range(300):
        cands = _candidates(rng, rng.randint(1, 40))
        for c in cands:
            shape = rng.random()
            if shape < 0.2:  # the text opens with the heading's last part: its block leaves that line out
                c.text = f"{c.heading}\n{c.text}"
            elif shape < 0.3:
                c.text = rng.choice(["\n", "\n\n", " ", " \n"]) + c.text
            elif shape < 0.6:  # the shortest header a block has: its text is nearly all of it
                c.title, c.heading = "T", ""
            c.tokens = count_text(c.text)
        cands.sort(key=lambda c: -c.score)
        budget, limit = rng.randint(1, 1200), rng.randint(1, 40)
        floor, tails = rng.choice([None, 0.5]), rng.random() < 0.5
        counted = [dataclasses.replace(c, tokens=0) for c in cands]
        assert (pack(cands, "kb", budget, limit=limit, floor=floor, tails=tails)
                == pack(counted, "kb", budget, limit=limit, floor=floor, tails=tails))


def test_the_budgets_remainder_takes_the_head_of_the_next_passage():
    rng = random.Random(9)
    cands = _candidates(rng, 4)
    long = "First sentence here. " + " ".join(["More words follow."] * 60)
    cands[1] = dataclasses.replace(cands[1], text=long, tokens=count_text(long), section_id=99, score=0.5)
    cands[0] = dataclasses.replace(cands[0], score=0.9)
    budget = count_text(pack(cands[:1], "kb", 10_000, limit=5, floor=None)[0]) + PER_MESSAGE + 60
    _, whole, _ = pack(cands[:2], "kb", budget, limit=5, floor=None)
    _, cut, used = pack(cands[:2], "kb", budget, limit=5, floor=None, tails=True)
    assert len(whole) == 1
    assert len(cut) == 2
    assert used <= budget
    assert cut[1].truncated
    assert cut[1].text.startswith("First sentence here.")
    assert cut[1].text.endswith(" …")


def test_mmr_drops_near_duplicates_and_prefers_novelty():
    base = np.asarray([1, 0, 0, 0], dtype=np.float32)
    other = np.asarray([0, 1, 0, 0], dtype=np.float32)

    def cand(i: int, v: np.ndarray, score: float) -> Candidate:
        return Candidate(i, i, i, 0, "t", 1, "T", "", "s", v, score=score)

    picked = mmr([cand(0, base, 0.9), cand(1, base, 0.89), cand(2, other, 0.7)], lam=0.75, duplicate=0.95, limit=5)
    assert [c.chunk_id for c in picked] == [0, 2]


def test_mmr_within_documents_penalises_a_second_passage_of_one_document_only():
    near = np.asarray([0.8, 0.6, 0, 0], dtype=np.float32)  # cosine 0.8 with ``base``: alike, not a duplicate
    base = np.asarray([1, 0, 0, 0], dtype=np.float32)
    other = np.asarray([0, 0, 1, 0], dtype=np.float32)

    def cand(i: int, doc: int, v: np.ndarray, score: float) -> Candidate:
        return Candidate(i, doc, i, 0, "t", 1, "T", "", "s", v, score=score)

    def order(within: bool) -> list[int]:
        also = np.asarray([0.8, 0, 0.6, 0], dtype=np.float32)  # alike ``base`` too, in its own document
        cands = [cand(0, 1, base, 0.9), cand(1, 2, near, 0.85), cand(2, 1, also, 0.84), cand(3, 3, other, 0.7)]
        return [c.chunk_id for c in mmr(cands, lam=0.75, duplicate=0.95, limit=5, within_documents=within)]

    assert order(within=False) == [0, 3, 1, 2]  # every alike passage pushed down, another document's too
    assert order(within=True) == [0, 1, 3, 2]  # only the first document's second passage is


def _mmr_every_round(cands: list[Candidate], lam: float, duplicate: float, limit: int,
                     within_documents: bool) -> list[tuple[int, float]]:
    """The textbook loop: every candidate's marginal value recomputed each round (mmr's first form). A chosen
    candidate's cosines are one matrix-vector product, as mmr computes them (a whole Gram matrix would round
    some of them differently in the last bit)."""
    vectors = np.stack([c.vector for c in cands])
    gram = np.stack([vectors @ v for v in vectors]) if len(vectors) else vectors
    scores = np.array([c.score for c in cands])
    documents = np.array([c.document_id for c in cands])
    chosen: list[tuple[int, float]] = []
    nearest = np.full(len(cands), -1.0)
    redundancy = np.full(len(cands), -1.0)
    alive = np.ones(len(cands), dtype=bool)
    while len(chosen) < limit and alive.any():
        value = np.where(alive, lam * scores - (1 - lam) * np.maximum(redundancy, 0), -np.inf)
        best = int(np.argmax(value))
        alive[best] = False
        if nearest[best] >= duplicate:
            continue
        chosen.append((best, float(value[best])))
        nearest = np.maximum(nearest, gram[best])
        redundancy = np.maximum(redundancy, np.where(documents == documents[best], gram[best], -1.0)
                                if within_documents else gram[best])
    return chosen


def _cands(vectors: np.ndarray, scores: np.ndarray, docs: np.ndarray) -> list[Candidate]:
    return [Candidate(i, int(docs[i]), i, 0, "t", 1, "T", "", "s", vectors[i], score=float(scores[i]))
            for i in range(len(scores))]


@pytest.mark.parametrize("within", [True, False])
def test_mmr_gives_the_same_order_and_values_as_recomputing_every_round(within):
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(1, 120))
        vectors = rng.standard_normal((n, 8)).astype(np.float32)
        if trial % 3 == 0:  # near-duplicates and exact repeats
            vectors[n // 2:] = vectors[: n - n // 2] + 0.01 * rng.standard_normal((n - n // 2, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = np.round(rng.uniform(0.2, 0.9, n), 2 if trial % 2 else 6)  # ties when rounded coarsely
        docs = rng.integers(0, max(1, n // 6), n)

        limit = int(rng.integers(1, n + 5))
        expected = _mmr_every_round(_cands(vectors, scores, docs), 0.75, 0.95, limit, within)
        got = mmr(_cands(vectors, scores, docs), 0.75, 0.95, limit, within_documents=within)
        assert [(c.chunk_id, c.value) for c in got] == expected


def _worded(vectors: np.ndarray, scores: np.ndarray, docs: np.ndarray, words: list[str]) -> list[Candidate]:
    out = _cands(vectors, scores, docs)
    for c in out:
        c.text, c.tokens, c.section_id = words[c.chunk_id], count_text(words[c.chunk_id]), c.chunk_id
    return out


@pytest.mark.parametrize("within", [True, False])
def test_mmr_ending_at_the_packers_floor_packs_the_same(within):
    """``below``: the order stops once every candidate left scores under the packer's floor; what comes
    before is the whole order's beginning, and the packer, which passes over the rest, packs the same."""
    rng = np.random.default_rng(12)
    texts = random.Random(12)
    for trial in range(60):
        n = int(rng.integers(1, 150))
        vectors = rng.standard_normal((n, 8)).astype(np.float32)
        if trial % 3 == 0:
            vectors[n // 2:] = vectors[: n - n // 2] + 0.01 * rng.standard_normal((n - n // 2, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = np.sort(np.round(rng.uniform(0.05, 0.9, n), 2 if trial % 2 else 6))[::-1]  # best first, as sorted
        docs = rng.integers(0, max(1, n // 6), n)

        words = [" ".join(texts.choice(["fee", "card", "loan", "42"]) for _ in range(texts.randint(1, 40)))
                 for _ in range(n)]

        limit = int(rng.integers(1, n + 5))
        whole = mmr(_worded(vectors, scores, docs, words), 0.75, 0.95, limit, within_documents=within)
        ended = mmr(_worded(vectors, scores, docs, words), 0.75, 0.95, limit, within_documents=within,
                    below=0.5 * float(scores[0]))
        assert [c.chunk_id for c in ended] == [c.chunk_id for c in whole[:len(ended)]]
        assert all(c.score < 0.5 * scores[0] for c in whole[len(ended):])
        budget = int(rng.integers(50, 3000))
        assert (pack(ended, "kb", budget, limit=limit, floor=0.5)
                == pack(whole, "kb", budget, limit=limit, floor=0.5))


def test_the_floor_holds_where_every_score_is_negative():
    """An embedder whose cosines with a query are all negative (an upstream model's unrelated texts, a
    scripted upstream's random vectors): the best candidate is still packed, and the floor keeps its meaning
    (within half the best's magnitude of it: -0.2 keeps -0.25, not -0.35). Where the best is positive the
    floor is half of it, as before."""
    assert floor_at(0.8, 0.5) == pytest.approx(0.4)
    assert floor_at(-0.2, 0.5) == pytest.approx(-0.3)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((4, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = np.array([-0.2, -0.25, -0.35, -0.9])
    words = ["fee card", "loan 42", "card fee loan", "42"]
    for below in (None, floor_at(-0.2, 0.5)):
        ranked = mmr(_worded(vectors, scores, np.arange(4), words), 1.0, 0.999, 10, below=below)
        context, passages, used = pack(ranked, "kb", 600, limit=10, floor=0.5)
        assert sorted(c for p in passages for c in p.chunk_ids) == [0, 1]
        assert "fee card" in context and 0 < used <= 600


def _sectioned(rng: np.random.Generator, texts: random.Random, n: int) -> list[Candidate]:
    """Candidates as a search meets them: sections of adjacent chunks (each starting with the last words of
    the one before, as chunk overlap does), some opening with their heading's line, a few tiny ones."""
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out: list[Candidate] = []
    previous = ""
    for i in range(n):
        section, ord_ = i // 4, int(rng.integers(0, 3)) + (i % 4) * 2 if texts.random() < 0.3 else i % 4
        size = texts.choice([1, 2, 5, 20, 60, 150])
        words = " ".join(texts.choice(["Fee", "card.", "loan", "rate", "42", "é", "it is."]) for _ in range(size))
        if ord_ and previous and texts.random() < 0.5:
            words = " ".join(previous.split()[-3:]) + " " + words
        heading = f"Part {section}"
        if texts.random() < 0.2:
            words = f"{heading}\n{words}"
        previous = words
        out.append(Candidate(chunk_id=i, document_id=section // 2, section_id=section, ord=ord_, text=words,
                             tokens=count_text(words), title=f"Doc {section // 2}", heading=heading,
                             source=f"d{section // 2}.md", vector=vectors[i], score=float(rng.uniform(0.05, 0.9))))
    out.sort(key=lambda c: -c.score)
    return out


@pytest.mark.parametrize("within", [True, False])
def test_packing_a_ranking_as_it_is_read_packs_the_same_as_its_whole_order(within):
    """The packer reads a Ranking only while a candidate it may still yield could enter: the context, the
    passages and the tokens are the same as over the whole order, adjacent chunks, headings, tails, the floor
    and the passage limit included."""
    rng = np.random.default_rng(21)
    texts = random.Random(21)
    read_less = 0
    for _ in range(150):
        cands = _sectioned(rng, texts, int(rng.integers(1, 120)))
        limit = int(rng.integers(1, 60))
        below = 0.5 * cands[0].score if texts.random() < 0.5 else None
        budget, passages = int(rng.integers(1, 1500)), int(rng.integers(1, 40))
        floor, tails = texts.choice([None, 0.5]), texts.random() < 0.7
        whole = mmr([dataclasses.replace(c) for c in cands], 0.9, 0.95, limit, within_documents=within, below=below)
        ranking = Ranking([dataclasses.replace(c) for c in cands], 0.9, 0.95, limit, within_documents=within,
                          below=below)
        assert (pack(ranking, "kb", budget, limit=passages, floor=floor, tails=tails)
                == pack(whole, "kb", budget, limit=passages, floor=floor, tails=tails))
        read_less += ranking.chosen < len(whole)
    assert read_less > 50  # and most of the time without ranking the whole order


@pytest.mark.parametrize("sentence", [10, 1000])
def test_a_full_budget_stops_the_ranking(sentence):
    """600 tokens of room and 200 candidates of about 150 tokens in sentences of ten words (the budget's
    remainder takes a tail) or in one sentence (no tail can be cut): the packer reads a handful."""
    rng = np.random.default_rng(3)
    texts = random.Random(3)
    cands = _sectioned(rng, texts, 200)
    for c in cands:
        words = [texts.choice(["fee", "card", "loan", "rate"]) for _ in range(150)]
        c.text = " ".join(w + ("." if (i + 1) % sentence == 0 else "") for i, w in enumerate(words))
        c.tokens = count_text(c.text)
    ranking = Ranking(cands, 0.9, 0.95, 200, within_documents=True)
    _, passages, used = pack(ranking, "kb", 600, limit=50, floor=0.5, tails=True)
    assert passages and used <= 600
    assert ranking.chosen <= 10


def test_a_reranker_reorders_the_best_candidates_and_keeps_the_fused_scale():
    import asyncio

    from tollway.retrieval.search import reranked

    def cand(i: int, score: float) -> Candidate:
        return Candidate(chunk_id=i, document_id=i, section_id=i, ord=0, text=f"text {i}", tokens=3, title="t",
                         heading="h", source="s", vector=np.zeros(2, np.float32), score=score)

    ordered = [cand(1, 0.9), cand(2, 0.8), cand(3, 0.7), cand(4, 0.1)]

    async def rerank(query: str, texts: list[str]) -> list[float]:
        assert query == "q"
        return [{"text 1": -2.0, "text 2": 5.0, "text 3": 1.0}[t] for t in texts]

    out = asyncio.run(reranked(ordered, "q", rerank, 3))
    assert [(c.chunk_id, c.score) for c in out] == [(2, 0.9), (3, 0.8), (1, 0.7), (4, 0.1)]

    async def short(query: str, texts: list[str]) -> list[float]:
        return [1.0]

    with pytest.raises(ValueError):
        asyncio.run(reranked(ordered, "q", short, 3))


def test_the_local_embedder_keeps_each_texts_vector_and_a_query_does_not_wait_for_an_ingestion():
    """The packaged model (no network): batches sorted by length, cut at a budget of padded word pieces, come
    back in the caller's order, the same vectors and word pieces as each text alone; concurrent queries each
    get their own answer; a light call (a query) runs while a heavy one (an ingestion) holds its turn, and
    heavy calls take turns batch by batch."""
    words = ["refund", "card", "loan", "branch", "wire", "fee", "account", "overdraft", "statement", "limit"]
    rng = random.Random(5)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(37)]
    heavy = [t * 20 for t in texts]  # past LIGHT_CHARS
    embedder = LocalEmbedder(batch_size=4, batch_tokens=64)  # batches of 1 to 4 texts, padded to their longest
    try:
        batched, tokens = embedder.embed_sync(texts)
        singles = [embedder.embed_sync([t]) for t in texts]
        alone = np.concatenate([v for v, _ in singles])

        async def calls() -> tuple[list[np.ndarray], np.ndarray, bool]:
            queries = await asyncio.gather(*(embedder.embed(texts[i:i + 3]) for i in range(0, 12, 3)))
            with embedder._turns.turn():  # an ingestion's batch is running
                second = asyncio.create_task(embedder.embed(heavy))
                query = await asyncio.wait_for(embedder.embed(texts[:2]), 30)
                await asyncio.sleep(0.3)
                waited = not second.done()
            await asyncio.wait_for(second, 60)
            return [q.vectors for q in queries], query.vectors, waited

        queries, query, waited = asyncio.run(calls())

        # Two heavy calls take turns batch by batch: a short one started after a long one ends first.
        session = embedder._session
        ended: list[str] = []

        class Slow:  # each batch 20 ms longer, so that the order does not hang on the machine's speed
            def run(self, *args: object) -> object:
                threading.Event().wait(0.02)
                return session.run(*args)

        embedder.__dict__["_session"] = Slow()

        async def ingestions() -> None:
            async def one(name: str, texts: list[str]) -> None:
                await embedder.embed(texts)
                ended.append(name)

            long = asyncio.create_task(one("long", heavy * 2))  # 74 batches of one text
            await asyncio.sleep(0.1)
            await asyncio.wait_for(asyncio.gather(long, one("short", heavy[:6])), 120)

        asyncio.run(ingestions())
    finally:
        embedder.close()
    assert batched.shape == (37, 384) and tokens == sum(n for _, n in singles) > 37 * 3
    assert float((batched * alone).sum(axis=1).min()) > 0.9999  # each text's own vector, in the caller's order
    assert float((batched[0] * batched[1:]).sum(axis=1).max()) < 0.9999  # the texts differ: the check can fail
    assert float((batched[:12] * np.concatenate(queries)).sum(axis=1).min()) > 0.9999
    assert float((batched[:2] * query).sum(axis=1).min()) > 0.9999
    assert waited  # the heavy call waited for its turn; the query did not
    assert ended == ["short", "long"]


def test_turns_are_handed_out_in_the_order_they_were_asked_for():
    """The holder releasing hands its turn to the first waiter; a waiter never loses its place to a newcomer
    or to the holder asking again (a lock would let either barge)."""
    turns = Turns()
    order: list[str] = []

    def take(name: str) -> None:
        with turns.turn():
            order.append(name)

    waiters = []
    with turns.turn():
        for name in ["a", "b", "c"]:
            t = threading.Thread(target=take, args=(name,))
            t.start()
            waiters.append(t)
            while turns.waiting < len(waiters):  # queued before the next one starts
                threading.Event().wait(0.001)
    take("again")  # the holder's next turn comes after the three that waited
    for t in waiters:
        t.join(10)
    assert order == ["a", "b", "c", "again"]


def test_the_search_settings_tag_names_every_setting():
    from tollway.retrieval import Tuning

    assert Tuning().tag == Tuning().tag and Tuning().tag.startswith("search:")
    tags = {Tuning().tag, Tuning(mmr_lambda=0.75).tag, Tuning(floor=0.6).tag, Tuning(ef_search=40).tag}
    assert len(tags) == 4


def test_a_query_goes_through_the_int8_query_model_built_once_and_near_the_stored_vectors(tmp_path, caplog):
    """The query model is built from the packaged one (a process of its own, started in the background as a
    gateway starts: ``prepare_soon``) into the folder given, read from there by the next embedder, and its
    vectors stay near the packaged model's (what collections store); where it cannot be built, a query takes
    the packaged model."""
    rng = random.Random(11)
    words = ["refund", "card", "loan", "Überweisung", "wire", "fee", "PostgreSQL", "snapshot", "git", "push"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(20)]
    first = LocalEmbedder(models=tmp_path / "models")
    try:
        building = first.prepare_soon()
        assert building is not None
        building.join(120)
        assert len(list((tmp_path / "models").glob("minilm-query-*.onnx"))) == 1  # before any query
        assert "_query_session" not in first.__dict__  # built, not loaded: a gateway that never searches holds none
        exact, _ = first.embed_sync(texts)
        fast, _ = first.embed_sync(texts, query=True)
        built = list((tmp_path / "models").glob("minilm-query-*.onnx"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        embedded = asyncio.run(first.embed(texts[:1], query=True))
    finally:
        first.close()
    cosines = (exact * fast).sum(axis=1)
    assert float(cosines.min()) > 0.98
    assert float(cosines.max()) < 0.99999  # another model: the check can fail
    assert float((embedded.vectors[0] * fast[0]).sum()) > 0.9999
    assert float((fast[0] * fast[1:]).sum(axis=1).max()) < 0.9999  # the texts differ

    again = LocalEmbedder(models=tmp_path / "models")
    try:
        assert float((again.embed_sync(texts[:3], query=True)[0] * fast[:3]).sum(axis=1).min()) > 0.9999
    finally:
        again.close()
    assert built[0].stat().st_mtime_ns == stamp  # read, not built again
    # an image's build step prepares it where the gateway will look (TOLLWAY_MODELS_DIR): found, not rebuilt
    prepared = subprocess.run([sys.executable, "-m", "tollway.retrieval.quantize", "--prepare"], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "TOLLWAY_MODELS_DIR": str(tmp_path / "models")})
    assert prepared.returncode == 0, prepared.stderr
    assert prepared.stdout.strip() == str(built[0]) and "Warning" not in prepared.stderr
    assert built[0].stat().st_mtime_ns == stamp

    (tmp_path / "blocked").write_text("a file where the folder would be")
    for embedder in (LocalEmbedder(models=tmp_path / "blocked" / "models"),
                     LocalEmbedder(models=tmp_path / "models", query_model=False)):
        try:
            with caplog.at_level("WARNING", logger="tollway.retrieval"):
                if (building := embedder.prepare_soon()) is not None:
                    building.join(120)
                plain, _ = embedder.embed_sync(texts[:3], query=True)
        finally:
            embedder.close()
        assert float((plain * exact[:3]).sum(axis=1).min()) > 0.9999
    assert "query model could not be built" in caplog.text  # once, as the gateway starts
    assert "query model is unavailable" in caplog.text  # and the query takes the packaged model


def test_candidate_vectors_decoded_at_once_equal_pgvectors_own_loader():
    """A candidate's vector comes as halfvec's binary send format and is decoded for all rows at once: the same
    float32 values as pgvector's HalfVector gives, in row order, rows of one width or of several."""
    rng = np.random.default_rng(3)
    vectors = [rng.standard_normal(384).astype(np.float16) for _ in range(50)]
    vectors[7][:3] = [np.inf, -0.0, 6.1e-05]  # the edges of half floats survive too
    blobs = [HalfVector(v).to_binary() for v in vectors]
    decoded = _vectors(blobs)
    assert [d.dtype for d in decoded] == [np.float32] * 50
    assert all(np.array_equal(d, HalfVector.from_binary(b).to_numpy().astype(np.float32))
               for d, b in zip(decoded, blobs, strict=True))
    assert not np.array_equal(decoded[0], decoded[1])  # rows in their order, not one row repeated
    mixed = _vectors([blobs[0], HalfVector(vectors[1][:8]).to_binary()])
    assert mixed[1].shape == (8,) and np.array_equal(mixed[1], vectors[1][:8].astype(np.float32))
    assert _vectors([]) == []


def test_a_rag_answers_search_settings_name_how_queries_are_embedded():
    """Replicas that embed queries differently (the query model on or off) never share a cached RAG answer: the
    settings in its key name the query model's recipe when it is on (nothing is loaded to say so)."""
    from tollway.gateway.parts.rag import Rag, RagSettings

    def settings_of(local: LocalEmbedder | None) -> str:
        return Rag(None, None, None, local, RagSettings(), None).search_settings()  # type: ignore[arg-type]

    on, off, none = (settings_of(LocalEmbedder()), settings_of(LocalEmbedder(query_model=False)),
                     settings_of(None))
    assert off == none and on.startswith(off + "+query:") and len({on, off}) == 2
