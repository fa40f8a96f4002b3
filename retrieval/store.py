"""The pgvector store: collections, documents, sections and chunks, read and written only inside a
transaction that runs as the ``tollway_rag`` role with its tenant set, so row-level security decides what
any query here can see (see migration 0006). Nothing in this module filters by tenant itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, overload

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector_async
from psycopg.rows import dict_row

from tollway.publicids import PublicIds
from tollway.retrieval.documents import Parsed, Splitting
from tollway.retrieval.embedders import Vectors

ROLE = "tollway_rag"


class StoreError(Exception):
    """A collection or document that is not there, or a request the store refuses; ``kind`` says which."""

    def __init__(self, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.param = kind, param


@asynccontextmanager
async def tenant_tx(conn: psycopg.AsyncConnection[Any], tenant_id: int, *,
                    settings: Mapping[str, str] | None = None) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction as ``tollway_rag`` with ``tenant_id`` set: row-level security scopes every statement.
    ``settings``: more of the transaction's own settings (the code's names, never a client's), set in the same
    statement as the role and the tenant (one round trip: a search makes three or four such).

    It must be a transaction of its own: nested in another, it would be a savepoint, and the role and the
    tenant would outlive it until the outer transaction ends."""
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise RuntimeError("tenant_tx needs a connection outside any transaction")
    if conn.adapters.types.get("halfvec") is None:
        await register_vector_async(conn)
    extra = dict(settings or {})
    async with conn.transaction():
        # set_config('role', ..., true) is SET LOCAL ROLE (the same membership check, undone at the end)
        await conn.execute("SELECT " + ", ".join(["set_config(%s, %s, true)"] * (2 + len(extra))),
                           [v for pair in [("role", ROLE), ("tollway.tenant_id", str(tenant_id)), *extra.items()]
                            for v in pair])
        yield conn


@dataclass(frozen=True, slots=True)
class Collection:
    id: int
    tenant_id: int
    name: str
    embedder: str
    dims: int
    splitting: Splitting
    revision: int
    created_at: datetime
    documents: int | None = None
    chunks: int | None = None

    @property
    def index_version(self) -> str:
        """Changes whenever the collection's content does, with the embedding model and with the splitting
        settings that build its chunks (``Splitting.tag``)."""
        return f"{self.name}@{self.revision}+{self.embedder}+{self.splitting.tag}"

    def as_json(self, ids: PublicIds) -> dict[str, Any]:
        out = {"object": "collection", "id": ids.encode("col", self.id), "name": self.name, "embedder": self.embedder,
               "dims": self.dims, "chunk_tokens": self.splitting.chunk_tokens,
               "chunk_overlap": self.splitting.chunk_overlap, "section_tokens": self.splitting.section_tokens,
               "whole_tokens": self.splitting.whole_tokens,
               "index_version": self.index_version, "created_at": int(self.created_at.timestamp())}
        if self.documents is not None:
            out |= {"documents": self.documents, "chunks": self.chunks}
        return out


_COLLECTION = ("id, tenant_id, name, embedder, dims, chunk_tokens, chunk_overlap, section_tokens, whole_tokens,"
               " revision, created_at")


def _collection(row: dict[str, Any]) -> Collection:
    return Collection(id=row["id"], tenant_id=row["tenant_id"], name=row["name"], embedder=row["embedder"],
                      dims=row["dims"], splitting=Splitting(row["chunk_tokens"], row["chunk_overlap"],
                                                            row["section_tokens"], row["whole_tokens"]),
                      revision=row["revision"], created_at=row["created_at"], documents=row.get("documents"),
                      chunks=row.get("chunks"))


async def ensure_index(conn: psycopg.AsyncConnection[Any], dims: int) -> None:
    """HNSW indexes for vectors of ``dims`` dimensions (384 come with the migration). Runs as the
    connecting user, outside any tenant transaction."""
    for table in ("rag_chunks", "rag_sections", "rag_documents"):
        await conn.execute(
            f"CREATE INDEX IF NOT EXISTS {table}_hnsw_{int(dims)} ON {table} USING hnsw"
            f" ((embedding::halfvec({int(dims)})) halfvec_cosine_ops) WHERE dims = {int(dims)}")


async def create_collection(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str, *, embedder: str,
                            dims: int, splitting: Splitting) -> Collection:
    try:
        async with tenant_tx(conn, tenant_id):
            cur = await conn.cursor(row_factory=dict_row).execute(
                "INSERT INTO rag_collections (tenant_id, name, embedder, dims, chunk_tokens, chunk_overlap,"
                " section_tokens, whole_tokens) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING " + _COLLECTION,
                (tenant_id, name, embedder, dims, splitting.chunk_tokens, splitting.chunk_overlap,
                 splitting.section_tokens, splitting.whole_tokens))
            row = await cur.fetchone()
    except psycopg.errors.UniqueViolation:
        raise StoreError(f"collection {name!r} already exists", "exists", "name") from None
    except psycopg.errors.CheckViolation:
        raise StoreError(f"collection name {name!r} is invalid (1-64 of letters, digits, _ . -)", "invalid",
                         "name") from None
    assert row is not None
    return _collection(row | {"documents": 0, "chunks": 0})


async def get_collection(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str, *,
                         lock: bool = False) -> Collection:
    """Inside a tenant transaction."""
    cur = await conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_COLLECTION} FROM rag_collections WHERE name = %s" + (" FOR UPDATE" if lock else ""), (name,))
    row = await cur.fetchone()
    if row is None:
        raise StoreError(f"collection {name!r} does not exist", "collection_not_found", "collection")
    return _collection(row)


async def collection(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str) -> Collection:
    async with tenant_tx(conn, tenant_id):
        return await get_collection(conn, tenant_id, name)


async def collections(conn: psycopg.AsyncConnection[Any], tenant_id: int) -> list[Collection]:
    async with tenant_tx(conn, tenant_id):
        cur = await conn.cursor(row_factory=dict_row).execute(
            f"SELECT {', '.join('c.' + c.strip() for c in _COLLECTION.split(','))},"
            " (SELECT count(*) FROM rag_documents d WHERE d.collection_id = c.id) AS documents,"
            " (SELECT count(*) FROM rag_chunks k WHERE k.collection_id = c.id) AS chunks"
            " FROM rag_collections c ORDER BY c.name")
        return [_collection(r) for r in await cur.fetchall()]


async def delete_collection(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str) -> bool:
    async with tenant_tx(conn, tenant_id):
        cur = await conn.execute("DELETE FROM rag_collections WHERE name = %s", (name,))
        return cur.rowcount > 0


# -- documents -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Written:
    id: int
    source: str
    status: str  # 'created', 'replaced', 'unchanged'
    sections: int
    chunks: int
    tokens: int
    index_version: str

    def as_json(self, ids: PublicIds) -> dict[str, Any]:
        return {"object": "document", "id": ids.encode("doc", self.id), "source": self.source, "status": self.status,
                "sections": self.sections, "chunks": self.chunks, "tokens": self.tokens}


async def unchanged(conn: psycopg.AsyncConnection[Any], tenant_id: int, collection_name: str,
                    documents: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Of ``documents`` (source, content hash), those stored with this very content, by source: their ids
    (re-ingesting them is a no-op). One query for the whole request."""
    async with tenant_tx(conn, tenant_id):
        cur = await conn.execute(
            "SELECT d.source, d.id FROM rag_documents d JOIN rag_collections c ON c.id = d.collection_id"
            " JOIN unnest(%s::text[], %s::text[]) AS given (source, content_hash)"
            " ON given.source = d.source AND given.content_hash = d.content_hash WHERE c.name = %s",
            ([s for s, _ in documents], [h for _, h in documents], collection_name))
        return {str(r[0]): int(r[1]) for r in await cur.fetchall()}


def _halfvec(v: np.ndarray[Any, Any]) -> HalfVector:
    return HalfVector(v.astype(np.float16))


def _centroid(vectors: Vectors) -> np.ndarray[Any, Any]:
    mean: np.ndarray[Any, Any] = vectors.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


async def write_document(conn: psycopg.AsyncConnection[Any], tenant_id: int, collection_name: str, *,
                         source: str, parsed: Parsed, metadata: dict[str, Any], vectors: Vectors,
                         embedder: str) -> Written:
    """Store ``parsed`` (its chunks' ``vectors`` in order) as ``source``, replacing what was stored under
    that name, in one transaction: readers see the old document or the new one, never half of either.

    The collection's row is locked first, so concurrent writers of one collection take turns and each
    moves the revision once. Sections and the document get the centroid of their chunks' vectors."""
    async with tenant_tx(conn, tenant_id):
        coll = await get_collection(conn, tenant_id, collection_name, lock=True)
        if coll.embedder != embedder or vectors.shape[1] != coll.dims:
            raise StoreError(f"collection {coll.name!r} is embedded with {coll.embedder}", "embedder_mismatch")
        cur = await conn.execute("SELECT id, content_hash FROM rag_documents WHERE collection_id = %s AND source = %s",
                                 (coll.id, source))
        old = await cur.fetchone()
        if old is not None and old[1] == parsed.content_hash:
            return Written(int(old[0]), source, "unchanged", len(parsed.sections), parsed.chunks, parsed.tokens,
                           coll.index_version)
        if old is not None:
            await conn.execute("DELETE FROM rag_documents WHERE id = %s", (old[0],))
        meta = json.dumps(metadata)
        cur = await conn.execute(
            "INSERT INTO rag_documents (tenant_id, collection_id, source, title, format, content_hash, metadata,"
            " token_count, dims, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (tenant_id, coll.id, source, parsed.title, parsed.format, parsed.content_hash, meta, parsed.tokens,
             coll.dims, _halfvec(_centroid(vectors))))
        doc = await cur.fetchone()
        assert doc is not None
        offset, rows = 0, []
        async with conn.cursor() as cur:
            for ord_, section in enumerate(parsed.sections):
                mine = vectors[offset:offset + len(section.chunks)]
                await cur.execute(
                    "INSERT INTO rag_sections (tenant_id, collection_id, document_id, ord, heading, text,"
                    " token_count, dims, embedding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (tenant_id, coll.id, doc[0], ord_, section.heading, section.text, section.tokens, coll.dims,
                     _halfvec(_centroid(mine))))
                sec = await cur.fetchone()
                assert sec is not None
                head = f"{parsed.title} {section.heading}"
                rows += [(tenant_id, coll.id, doc[0], sec[0], j, chunk.text, head, chunk.tokens, meta, coll.dims,
                          _halfvec(mine[j])) for j, chunk in enumerate(section.chunks)]
                offset += len(section.chunks)
            # a few statements for the whole document: the term statistics' trigger runs once per statement
            for start in range(0, len(rows), CHUNK_ROWS):
                batch = rows[start:start + CHUNK_ROWS]
                await cur.execute(
                    "INSERT INTO rag_chunks (tenant_id, collection_id, document_id, section_id, ord, text, lex_head,"
                    " token_count, metadata, dims, embedding) VALUES "
                    + ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(batch)),
                    [v for row in batch for v in row])
        revision = await _bump(conn, coll.id)
    status = "created" if old is None else "replaced"
    return Written(int(doc[0]), source, status, len(parsed.sections), parsed.chunks, parsed.tokens,
                   f"{coll.name}@{revision}+{coll.embedder}")


CHUNK_ROWS = 2000  # rows per INSERT (11 parameters each, under PostgreSQL's 65,535)


async def _bump(conn: psycopg.AsyncConnection[Any], collection_id: int) -> int:
    cur = await conn.execute("UPDATE rag_collections SET revision = revision + 1, updated_at = now()"
                             " WHERE id = %s RETURNING revision", (collection_id,))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def delete_document(conn: psycopg.AsyncConnection[Any], tenant_id: int, collection_name: str,
                          document_id: int | None, *, source: str | None = None) -> tuple[str, int]:
    """Delete a document by its row id or, where the id is None, by its source (the name a user gave it).
    Returns the collection's new index version and the deleted row's id."""
    if "\x00" in (source or ""):
        raise StoreError("a document source holds no NUL character", "invalid_value", "document")
    async with tenant_tx(conn, tenant_id):
        coll = await get_collection(conn, tenant_id, collection_name, lock=True)
        cur = await conn.execute("DELETE FROM rag_documents WHERE collection_id = %s AND"
                                 " CASE WHEN %s::bigint IS NULL THEN source = %s ELSE id = %s END RETURNING id",
                                 (coll.id, document_id, source, document_id))
        row = await cur.fetchone()
        if row is None:
            what = repr(source) if document_id is None else "with that id"
            raise StoreError(f"no document {what} in collection {collection_name!r}", "document_not_found",
                             "document")
        revision = await _bump(conn, coll.id)
    return f"{coll.name}@{revision}+{coll.embedder}", int(row[0])


async def documents(conn: psycopg.AsyncConnection[Any], tenant_id: int, collection_name: str, *,
                    limit: int = 100, after: int = 0) -> list[dict[str, Any]]:
    async with tenant_tx(conn, tenant_id):
        coll = await get_collection(conn, tenant_id, collection_name)
        cur = await conn.cursor(row_factory=dict_row).execute(
            "SELECT d.id, d.source, d.title, d.format, d.metadata, d.token_count AS tokens, d.created_at,"
            " (SELECT count(*) FROM rag_sections s WHERE s.document_id = d.id) AS sections,"
            " (SELECT count(*) FROM rag_chunks k WHERE k.document_id = d.id) AS chunks"
            " FROM rag_documents d WHERE d.collection_id = %s AND d.id > %s ORDER BY d.id LIMIT %s",
            (coll.id, after, limit))
        rows = await cur.fetchall()
    return [{"object": "document", **r, "created_at": int(r["created_at"].timestamp())} for r in rows]


# -- reading for search --------------------------------------------------------------------------
@dataclass(slots=True)
class Candidate:
    chunk_id: int
    document_id: int
    section_id: int
    ord: int
    text: str
    tokens: int
    title: str
    heading: str
    source: str
    vector: np.ndarray[Any, Any]
    similarity: float = 0.0  # cosine with the query
    score: float = 0.0  # after fusion and the hierarchy's evidence
    value: float = 0.0  # its marginal relevance when chosen (novelty counted)
    truncated: bool = False  # cut to its leading sentences to fit a budget


@overload
def filter_sql(filters: dict[str, Any] | None, alias: str) -> tuple[str, list[Any]]: ...
@overload
def filter_sql(filters: dict[str, Any] | None, alias: str, *, named: Literal[True]) -> tuple[str, dict[str, Any]]: ...


def filter_sql(filters: dict[str, Any] | None, alias: str, *, named: bool = False) -> tuple[str, Any]:
    """Metadata filters -> SQL: every key must match; a list is any of its values (GIN, containment).
    Positional parameters, or ``named`` ones (``%(f0)s``...) for a query that names its others."""
    if not filters:
        return "", {} if named else []
    clauses: list[str] = []
    values: list[str] = []
    for key, value in filters.items():
        options = value if isinstance(value, list) else [value]
        ors = []
        for option in options:
            ors.append(f"{alias}.metadata @> %({'f' + str(len(values))})s::jsonb" if named
                       else f"{alias}.metadata @> %s::jsonb")
            values.append(json.dumps({key: option}))
        clauses.append("(" + " OR ".join(ors) + ")")
    where = " AND " + " AND ".join(clauses)
    return (where, {f"f{i}": v for i, v in enumerate(values)}) if named else (where, values)


# The vector as halfvec's binary send format (two int16: dimensions, unused; then each half float, big-endian),
# decoded for all rows at once (_vectors): pgvector's loader builds one HalfVector per row, which took half the
# time of reading a search's ~370 candidates (bench/RESULTS.md).
_CANDIDATE = ("k.id, k.document_id, k.section_id, k.ord, k.text, k.token_count, d.title, s.heading, d.source,"
              " halfvec_send(k.embedding)")


def _vectors(blobs: Sequence[bytes]) -> list[np.ndarray[Any, Any]]:
    """halfvec_send's bytes -> float32 vectors (rows of one array where all have the same width)."""
    if not blobs:
        return []
    width = len(blobs[0])
    if any(len(b) != width for b in blobs):
        return [np.frombuffer(b, dtype=">f2", offset=4).astype(np.float32) for b in blobs]
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), width)[:, 4:]
    return list(np.ascontiguousarray(raw).view(">f2").astype(np.float32))


def _candidates(rows: Sequence[tuple[Any, ...]]) -> list[Candidate]:
    return [Candidate(chunk_id=r[0], document_id=r[1], section_id=r[2], ord=r[3], text=r[4], tokens=r[5],
                      title=r[6], heading=r[7], source=r[8], vector=v)
            for r, v in zip(rows, _vectors([r[9] for r in rows]), strict=True)]


# A search's statements take milliseconds (at 1M chunks, p95 20 ms for the vector part); one still running after
# this much is a database in trouble: it ends (503 ``store_unavailable``) and gives its pooled connection back
# rather than hold it for every tenant's next search.
SEARCH_STATEMENT_TIMEOUT = "10s"


def search_settings(ef_search: int) -> dict[str, str]:
    """pgvector 0.8 iterative index scans: filters (tenant, collection, metadata) never starve the results;
    and each statement bounded in time (``tenant_tx``'s settings for a search)."""
    return {"hnsw.iterative_scan": "relaxed_order", "hnsw.ef_search": str(ef_search),
            "statement_timeout": SEARCH_STATEMENT_TIMEOUT}


async def set_search(conn: psycopg.AsyncConnection[Any], ef_search: int) -> None:
    """``search_settings`` inside a transaction already open."""
    settings = search_settings(ef_search)
    await conn.execute("SELECT " + ", ".join(["set_config(%s, %s, true)"] * len(settings)),
                       [v for pair in settings.items() for v in pair])


async def nearest_chunks(conn: psycopg.AsyncConnection[Any], coll: Collection, query: np.ndarray[Any, Any],
                         n: int, filters: dict[str, Any] | None) -> list[Candidate]:
    """Inside a tenant transaction: the ``n`` chunks nearest the query (HNSW, cosine)."""
    dims = int(coll.dims)
    where, params = filter_sql(filters, "c")
    cur = await conn.cursor(binary=True).execute(
        f"WITH nearest AS MATERIALIZED (SELECT c.id, c.embedding::halfvec({dims}) <=> %s AS distance"
        f" FROM rag_chunks c WHERE c.collection_id = %s AND c.dims = {dims}{where}"
        f" ORDER BY c.embedding::halfvec({dims}) <=> %s LIMIT %s)"
        f" SELECT {_CANDIDATE}, 1 - n.distance FROM nearest n JOIN rag_chunks k ON k.id = n.id"
        " JOIN rag_sections s ON s.id = k.section_id JOIN rag_documents d ON d.id = k.document_id"
        " ORDER BY n.distance",
        (_halfvec(query), coll.id, *params, _halfvec(query), n))
    rows = await cur.fetchall()
    found = _candidates(rows)
    for cand, row in zip(found, rows, strict=True):
        cand.similarity = float(row[10])
    return found


BM25_K1, BM25_B = 1.2, 0.75  # the usual constants (Robertson and Zaragoza; Lucene's defaults)
QUERY_TERMS = 32  # at most this many of a query's terms rank, the rarest: a 250-word question costs what a short one does
QUERY_POSTINGS = 5_000  # and, rarest first, only while their postings add up to this (the first always ranks)
# The query's terms (English stemming, stop words out) that the collection holds, rarest first, while their
# postings fit; their idf from the collection's statistics; the postings of those terms, scored by Okapi BM25.
# A term past the postings budget is one most chunks hold: its idf is small, and reading its postings would
# cost more than all the others. Below the budget the score is exact Okapi BM25 (bench/retrieval/lexical_scale.py
# measures what the budget costs in agreement with exact BM25 at 100k chunks).
#
# The last term read may carry the sum past the budget (terms of 19, 681, 1,467, 2,720 and 30,401 postings: 35,288
# rows to score and group, the slowest searches; a rare word beside a common one costs the same). Where that term's
# own postings are more than the budget, it only scores, it does not recruit: its postings (``x``) are joined to the
# chunks the rarer terms found (``r``) instead of grouped with them, so the grouping and the sort hold the rarer
# terms' chunks alone. Among those chunks the order is the one scoring every posting of every term gives; a chunk
# that holds only that common term is no candidate (the query's rarer words found others; the dense side has its
# own). A term whose postings fit the budget recruits as before.
_BM25 = """
WITH q AS (SELECT DISTINCT u.lexeme FROM unnest(to_tsvector('english', %(text)s)) u),
t AS (SELECT r.term, r.df::float8 AS df, sum(r.df) OVER (ORDER BY r.df, r.term) - r.df AS before
      FROM rag_terms r JOIN q ON q.lexeme = r.term WHERE r.collection_id = %(coll)s ORDER BY r.df, r.term LIMIT %(terms)s),
k AS (SELECT lex_chunks::float8 AS n, greatest(lex_length::float8 / nullif(lex_chunks, 0), 1) AS avgdl
      FROM rag_collections WHERE id = %(coll)s),
w AS (SELECT t.term, ln(1 + (k.n - t.df + 0.5) / (t.df + 0.5)) AS idf,
             t.before = 0 OR t.df <= %(postings)s AS recruits FROM t, k
      WHERE t.before < %(postings)s),
r AS (SELECT p.chunk_id, sum(w.idf * p.tf * (%(k1)s + 1) / (p.tf + %(k1)s * (1 - %(b)s + %(b)s * p.len / k.avgdl))) AS score
      FROM w JOIN rag_postings p ON p.collection_id = %(coll)s AND p.term = w.term CROSS JOIN k {join}
      WHERE w.recruits GROUP BY p.chunk_id),
m AS (SELECT w.term, w.idf FROM w WHERE NOT w.recruits),
x AS (SELECT p.chunk_id, m.idf * p.tf * (%(k1)s + 1) / (p.tf + %(k1)s * (1 - %(b)s + %(b)s * p.len / k.avgdl)) AS score
      FROM m CROSS JOIN k JOIN rag_postings p ON p.collection_id = %(coll)s AND p.term = m.term)
SELECT r.chunk_id, r.score + coalesce(x.score, 0) AS score, (SELECT count(*) FROM w) AS ranked,
       (SELECT count(*) FROM q) AS asked
FROM r LEFT JOIN x ON x.chunk_id = r.chunk_id ORDER BY score DESC, r.chunk_id LIMIT %(n)s
"""


@dataclass(frozen=True, slots=True)
class Lexical:
    """BM25's answer: (chunk id, score) best first, and how much of the query it ranked on."""

    scores: list[tuple[int, float]]
    ranked_terms: int = 0  # the query's terms that ranked (the rarest, within the budgets)
    query_terms: int = 0  # the query's distinct terms (stop words out)

    @property
    def coverage(self) -> float:
        """The share of the query's terms the ranking read: a long, wordy question is ranked on its rarest
        few terms (names, numbers), which say less about what it asks than a short question's terms do."""
        return self.ranked_terms / self.query_terms if self.query_terms else 0.0


def _bm25(coll: Collection, text: str, n: int, filters: dict[str, Any] | None,
          postings: int) -> tuple[str, dict[str, Any]]:
    """The BM25 statement and its parameters; metadata filters apply to the chunks the postings name."""
    where, params = filter_sql(filters, "c", named=True)
    join = f"JOIN rag_chunks c ON c.id = p.chunk_id{where}" if where else ""  # the filters, on the chunk
    return _BM25.format(join=join), {"text": text, "coll": coll.id, "terms": QUERY_TERMS, "postings": postings,
                                     "k1": BM25_K1, "b": BM25_B, "n": n, **params}


async def lexical_chunks(conn: psycopg.AsyncConnection[Any], coll: Collection, text: str, n: int,
                         filters: dict[str, Any] | None, postings: int = QUERY_POSTINGS) -> Lexical:
    """(chunk id, BM25 score), best first: Okapi BM25 over the chunks' title, heading and text, with idf and
    average length from the collection's term statistics and the postings of the query's informative terms
    (kept at ingest, migration 0016). Metadata filters apply to the chunks the postings name."""
    sql, params = _bm25(coll, text, n, filters, postings)
    cur = await conn.execute(sql, params)
    rows = await cur.fetchall()
    if not rows:
        return Lexical([])
    return Lexical([(int(r[0]), float(r[1])) for r in rows], int(rows[0][2]), int(rows[0][3]))


async def lexical_candidates(conn: psycopg.AsyncConnection[Any], coll: Collection, text: str, n: int,
                             filters: dict[str, Any] | None,
                             postings: int = QUERY_POSTINGS) -> tuple[Lexical, list[Candidate]]:
    """``lexical_chunks`` and the rows of the chunks it ranks, best first, in one statement (a search whose
    query vector is still being computed reads them all now)."""
    sql, params = _bm25(coll, text, n, filters, postings)
    cur = await conn.cursor(binary=True).execute(
        f"WITH top AS MATERIALIZED ({sql}) SELECT {_CANDIDATE}, top.score, top.ranked, top.asked FROM top"
        " JOIN rag_chunks k ON k.id = top.chunk_id JOIN rag_sections s ON s.id = k.section_id"
        " JOIN rag_documents d ON d.id = k.document_id ORDER BY top.score DESC, top.chunk_id", params)
    rows = await cur.fetchall()
    if not rows:
        return Lexical([]), []
    return (Lexical([(int(r[0]), float(r[10])) for r in rows], int(rows[0][11]), int(rows[0][12])),
            _candidates(rows))


# the levels above chunks whose centroid vectors are searched: (FROM clause, alias of the level's table)
_CENTROIDS = {"sections": ("rag_sections s JOIN rag_documents d ON d.id = s.document_id", "s"),
              "documents": ("rag_documents d", "d")}


async def nearest_centroids(conn: psycopg.AsyncConnection[Any], coll: Collection, level: str,
                            query: np.ndarray[Any, Any], n: int,
                            filters: dict[str, Any] | None) -> list[tuple[int, float]]:
    """(id, cosine similarity) of the ``n`` sections or documents whose centroids are nearest the query;
    metadata filters apply to their documents."""
    source, alias = _CENTROIDS[level]
    dims = int(coll.dims)
    where, params = filter_sql(filters, "d")
    cur = await conn.execute(
        f"WITH nearest AS MATERIALIZED (SELECT {alias}.id, {alias}.embedding::halfvec({dims}) <=> %s AS distance"
        f" FROM {source} WHERE {alias}.collection_id = %s AND {alias}.dims = {dims}{where}"
        f" ORDER BY {alias}.embedding::halfvec({dims}) <=> %s LIMIT %s) SELECT id, 1 - distance FROM nearest"
        " ORDER BY distance", (_halfvec(query), coll.id, *params, _halfvec(query), n))
    return [(int(r[0]), float(r[1])) for r in await cur.fetchall()]


async def chunks_by_id(conn: psycopg.AsyncConnection[Any], ids: Sequence[int]) -> list[Candidate]:
    cur = await conn.cursor(binary=True).execute(
        f"SELECT {_CANDIDATE} FROM rag_chunks k JOIN rag_sections s ON s.id = k.section_id"
        " JOIN rag_documents d ON d.id = k.document_id WHERE k.id = ANY(%s)", (list(ids),))
    return _candidates(await cur.fetchall())


async def chunks_of_sections(conn: psycopg.AsyncConnection[Any], section_ids: Sequence[int],
                             limit: int) -> list[Candidate]:
    cur = await conn.cursor(binary=True).execute(
        f"SELECT {_CANDIDATE} FROM rag_chunks k JOIN rag_sections s ON s.id = k.section_id"
        " JOIN rag_documents d ON d.id = k.document_id WHERE k.section_id = ANY(%s) ORDER BY k.section_id, k.ord"
        " LIMIT %s", (list(section_ids), limit))
    return _candidates(await cur.fetchall())


async def stored_text(conn: psycopg.AsyncConnection[Any], tenant_id: int, chunk_ids: Sequence[int]) -> dict[int, str]:
    async with tenant_tx(conn, tenant_id):
        cur = await conn.execute("SELECT id, text FROM rag_chunks WHERE id = ANY(%s)", (list(chunk_ids),))
        return {int(r[0]): r[1] for r in await cur.fetchall()}
