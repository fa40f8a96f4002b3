"""Ingestion: documents parsed and split (all of a request's before anything is embedded, so one bad
document writes nothing), unchanged ones skipped by their hash, the rest embedded in batches and each
written in a transaction of its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from tollway.retrieval import store
from tollway.retrieval.documents import DocumentError, DocumentTooLarge, Parsed, Splitting, parse
from tollway.retrieval.embedders import Embedder
from tollway.retrieval.store import Collection, Written
from tollway.tokens import count_text


@dataclass(frozen=True, slots=True)
class NewDocument:
    source: str
    text: str
    format: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Prepared:
    doc: NewDocument
    parsed: Parsed
    unchanged_id: int | None  # stored with this content already: nothing to embed or write

    def embed_texts(self) -> list[str]:
        """What is embedded for each chunk: the chunk under its title and heading, so a chunk that says
        'the fee is waived' still carries which fee it is about."""
        out = []
        for section in self.parsed.sections:
            where = section.heading if section.heading.startswith(self.parsed.title) else \
                f"{self.parsed.title} > {section.heading}" if section.heading else self.parsed.title
            out += [f"{where}\n\n{chunk.text}" for chunk in section.chunks]
        return out


def metadata_key(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"))


def parse_all(coll: Collection, docs: Sequence[NewDocument], *, max_tokens: int) -> list[tuple[NewDocument, Parsed]]:
    """``check_documents``, then ``parse_documents`` with the collection's settings, each document beside its
    parse (in this process: what a bench or a script calls; the gateway's ``ParsePool`` does the same with the
    parse in a worker)."""
    check_documents(docs, max_tokens=max_tokens)
    return list(zip(docs, parse_documents(coll.splitting, docs, max_tokens=max_tokens), strict=True))


def check_documents(docs: Sequence[NewDocument], *, max_tokens: int) -> None:
    """What refuses a request's documents before any is parsed: a source twice, a document whose words alone
    are over ``max_tokens`` (``DocumentTooLarge``; counting costs a fraction of what parsing does)."""
    seen: set[str] = set()
    for i, doc in enumerate(docs):
        if doc.source in seen:
            raise DocumentError(f"documents[{i}]: source {doc.source!r} appears twice in one request")
        seen.add(doc.source)
        too_long = _too_long_to_parse(doc, max_tokens)
        if too_long is not None:
            raise DocumentTooLarge(f"documents[{i}] ({doc.source}) has {too_long} tokens; at most {max_tokens} "
                                   "are allowed per document (counted before parsing: its words alone are over)")


def parse_documents(splitting: Splitting, docs: Sequence[NewDocument], *, max_tokens: int) -> list[Parsed]:
    """Parse and split every document of a request ``check_documents`` passed, or raise ``DocumentError``
    naming the one that cannot be (``DocumentTooLarge`` past ``max_tokens``). CPU work (markdown, HTML, every
    chunk's tokens: seconds for a few megabytes): a gateway runs it in a worker process
    (``tollway.retrieval.parsing``)."""
    parsed_all: list[Parsed] = []
    for i, doc in enumerate(docs):
        try:
            parsed = parse(doc.text, doc.format, title=doc.title, source=doc.source, splitting=splitting,
                           metadata_key=metadata_key(doc.metadata))
        except DocumentError as exc:
            raise DocumentError(f"documents[{i}] ({doc.source}): {exc}") from None
        if parsed.tokens > max_tokens:
            raise DocumentTooLarge(f"documents[{i}] ({doc.source}) has {parsed.tokens} tokens; at most "
                                   f"{max_tokens} are allowed per document")
        parsed_all.append(parsed)
    return parsed_all


# Text and markdown keep their words when parsed (measured: at least 0.97 of a document's tokens stay, on 100
# documents of each), so one with twice the limit before parsing is over it after: refused before the parse,
# which costs seconds a megabyte (a megabyte of list items: about ten) where counting costs a fraction of one.
# HTML loses its markup (0.07 of the tokens stay, at least), so it is counted after parsing only.
_KEPT_WHEN_PARSED = {"text": 0.5, "markdown": 0.5}


def _too_long_to_parse(doc: NewDocument, max_tokens: int) -> int | None:
    """The document's tokens before parsing, where they alone put it over ``max_tokens``; else None."""
    kept = _KEPT_WHEN_PARSED.get(doc.format)
    if kept is None or len(doc.text) * kept <= max_tokens:  # a token holds one character at least
        return None
    tokens = count_text(doc.text)
    return tokens if tokens * kept > max_tokens else None


async def prepare(conn: psycopg.AsyncConnection[Any], coll: Collection, docs: Sequence[NewDocument],
                  *, max_tokens: int) -> list[Prepared]:
    """``parse_all`` in a thread, then ``unchanged``."""
    return await unchanged(conn, coll, await asyncio.to_thread(parse_all, coll, docs, max_tokens=max_tokens))


async def unchanged(conn: psycopg.AsyncConnection[Any], coll: Collection,
                    parsed: list[tuple[NewDocument, Parsed]]) -> list[Prepared]:
    """``parse_all``'s documents, each with the id of the stored document it repeats word for word, if any."""
    same = await store.unchanged(conn, coll.tenant_id, coll.name, [(doc.source, p.content_hash) for doc, p in parsed])
    return [Prepared(doc, p, same.get(doc.source)) for doc, p in parsed]


def to_embed(prepared: Sequence[Prepared]) -> list[str]:
    return [t for p in prepared if p.unchanged_id is None for t in p.embed_texts()]


async def write(conn: psycopg.AsyncConnection[Any], coll: Collection, prepared: Sequence[Prepared],
                vectors: np.ndarray[Any, Any], embedder: Embedder) -> list[Written]:
    """Each changed document in its own transaction; ``vectors``: those of ``to_embed(prepared)``, in order."""
    out = []
    offset = 0
    for p in prepared:
        if p.unchanged_id is not None:
            out.append(Written(p.unchanged_id, p.doc.source, "unchanged", len(p.parsed.sections), p.parsed.chunks,
                               p.parsed.tokens, coll.index_version))
            continue
        n = p.parsed.chunks
        out.append(await store.write_document(conn, coll.tenant_id, coll.name, source=p.doc.source, parsed=p.parsed,
                                              metadata=p.doc.metadata, vectors=vectors[offset:offset + n],
                                              embedder=embedder.name))
        offset += n
    return out
