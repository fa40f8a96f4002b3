"""Retrieval inside the gateway: collections, ingestion and search as metered requests (each a ledger row,
admitted against the tenant's budgets like any model call), and the chat path's retriever.

Who may: app keys search and chat with their own tenant's collections; writing (collections, documents)
needs an app key made with ``--ingest`` or an admin key, which names the tenant; prompt engineers may
search (they test prompts that retrieve); finance keys never read documents.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeVar

import numpy as np
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel, ConfigDict, Field

from tollway.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    ServiceUnavailable,
    TollwayError,
    UpstreamBadResponse,
)
from tollway.gateway.chat.calls import CallContext, Calls, reserved_input
from tollway.gateway.chat.exchange import ChatView, GuardOutcome, Retrieved, SideCall
from tollway.gateway.http.protocol import validate
from tollway.gateway.metering.accounting import Tally
from tollway.gateway.tenancy.keys import Principal
from tollway.gateway.tenancy.roles import Can, Role, may, require
from tollway.guardrails import PassageScreen
from tollway.infra.fair import FairGate
from tollway.jsontypes import JSON
from tollway.publicids import PublicIds
from tollway.retrieval import (
    LOCAL_NAME,
    RERANK_CANDIDATES,
    Collection,
    DocumentError,
    DocumentTooLarge,
    Embedded,
    Embedder,
    EmbedderError,
    Found,
    Gathered,
    LocalEmbedder,
    NewDocument,
    ParsePool,
    Query,
    Reranker,
    Searcher,
    Splitting,
    StoreError,
    UpstreamEmbedder,
    Written,
    check_filters,
    check_text,
    create_collection,
    ensure_index,
    to_embed,
    unchanged,
    write,
)
from tollway.retrieval import collection as get_collection
from tollway.retrieval import get_collection as get_collection_in
from tollway.routing import ChainFailed, ModelEntry, Price, Router, Usage, content_texts, count_text

T = TypeVar("T")

# The packaged embedder as a model: its calls are ledger rows like any other (they cost nothing).
LOCAL_ENTRY = ModelEntry(name=LOCAL_NAME, upstream="local", upstream_model="all-MiniLM-L6-v2-onnx-int8",
                         kind="embedding", tier="local", price=Price(source="local"))


SEARCH_SLOTS = 1 << 20  # searches at once across tenants: not limited here (the pool and the cores decide)


@dataclass(frozen=True, slots=True)
class RagSettings:
    default_embedder: str = "local"
    context_tokens: int = 1000
    max_context_tokens: int = 16_000
    max_document_tokens: int = 200_000
    on_failure: Literal["fail", "answer"] = "fail"
    search_concurrency: int = 8  # one tenant's searches at once in this process


def map_store_error(exc: StoreError) -> TollwayError:
    """The store's refusals in the OpenAI error shape (one place)."""
    if exc.kind in ("collection_not_found", "document_not_found"):
        return NotFound(str(exc), param=exc.param, code=exc.kind)
    if exc.kind == "exists":
        return Conflict(str(exc), param=exc.param, code="collection_exists")
    return InvalidRequest(str(exc), param=exc.param, code=exc.kind)


def may_write(principal: Principal) -> None:
    if may(principal.role, Can.ADMINISTER) or (principal.role == Role.APP and principal.ingest):
        return
    raise PermissionDenied(f"This {principal.role} key may not write documents; create an app key with "
                           "--ingest, or use an admin key.", code="ingest_not_allowed")


def may_search(principal: Principal) -> None:
    require(principal.role, Can.SEARCH, f"A {principal.role} key may not read documents.")


QUERY_CHARS = 32_000  # a retrieval query's length, given or taken from the last user message


class RetrievalSpec(BaseModel):
    """The ``retrieval`` object of a chat request."""

    model_config = ConfigDict(extra="forbid")
    collection: str = Field(min_length=1, max_length=64)
    context_tokens: int | None = Field(default=None, ge=1)
    query: str | None = Field(default=None, min_length=1, max_length=QUERY_CHARS)
    k: int | None = Field(default=None, ge=1, le=100)  # flat: chunks (8); hierarchical: most passages (50)
    filters: dict[str, Any] | None = None
    mode: Literal["hierarchical", "flat"] = "hierarchical"
    hybrid: bool = True  # dense and BM25 evidence fused (false: dense only)
    rerank: str | None = Field(default=None, min_length=1, max_length=256)  # a catalog model of kind rerank
    rerank_candidates: int | None = Field(default=None, ge=2, le=100)  # the best candidates it reorders (20)
    on_failure: Literal["fail", "answer"] | None = None


class Rag:
    def __init__(self, pool: AsyncConnectionPool, calls: Calls, router: Router, local: LocalEmbedder | None,
                 settings: RagSettings, ids: PublicIds,
                 screen_for: Callable[[ChatView], PassageScreen | None] | None = None,
                 parser: ParsePool | None = None) -> None:
        self.pool, self.calls, self.router, self.local, self.settings = pool, calls, router, local, settings
        self.ids = ids  # the ids clients see (tollway.publicids)
        self.screen_for = screen_for  # the guard policy's passage_injection screen for a chat request
        self.searcher = Searcher(self.embedder_for)
        self.parser = parser or ParsePool()  # documents parsed in worker processes, tenant by tenant
        # One tenant's searches at once (the API's and chats'): its flood waits behind itself, holding no pooled
        # connection, while another tenant's search starts at once. No cap across tenants: many tenants searching
        # at once keep the throughput that concurrency buys (the event loop's batches, PostgreSQL's cores).
        self.searching = FairGate(SEARCH_SLOTS, per_owner=settings.search_concurrency)

    def _quiet(self) -> bool:
        """Few enough searches in flight in this process (this one included) that a second connection's reads
        run on cores that would otherwise wait (``_Held.side``); under more, the extra checkout and transaction
        only cost."""
        return self.searching.in_use <= SIDE_SEARCHES

    # -- embedders ---------------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        if name in ("local", LOCAL_NAME):
            if self.local is None:
                raise InvalidRequest("The local embedder is not enabled on this gateway.", param="embedder",
                                     code="embedder_unavailable")
            return LOCAL_ENTRY
        entry = self.calls.catalog.get(name)
        if entry is None or entry.kind != "embedding":
            raise InvalidRequest(f"{name!r} is not an embedding model of this gateway ('local' is the packaged "
                                 "one).", param="embedder", code="embedder_unavailable")
        return entry

    def embedder_for(self, name: str, dims: int) -> Embedder:
        entry = self.entry(name)
        if entry is LOCAL_ENTRY:
            assert self.local is not None
            return self.local
        return UpstreamEmbedder(entry.name, dims, self._upstream(entry), count_text)

    def _upstream(self, entry: ModelEntry) -> Callable[[list[str]], Awaitable[tuple[list[list[float]], int | None,
                                                                                   str | None]]]:
        async def call(texts: list[str]) -> tuple[list[list[float]], int | None, str | None]:
            try:
                served = await self.router.call(self.router.direct(entry), {"model": entry.name, "input": texts},
                                                stream=False, endpoint="embeddings")
            except ChainFailed as failed:
                raise failed.error from None
            served.release(True)
            response = served.response or {}
            try:
                rows = sorted(response["data"], key=lambda d: d.get("index", 0))
                vectors = [list(map(float, d["embedding"])) for d in rows]
            except (KeyError, TypeError, ValueError, AttributeError):
                raise UpstreamBadResponse(f"{entry.name} answered embeddings without vectors") from None
            usage = response.get("usage")
            tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            return vectors, int(tokens) if isinstance(tokens, int) else None, served.replica

        return call

    def reranker(self, principal: Principal, name: str | None, record: Callable[[SideCall], None],
                 param: str = "rerank") -> Reranker | None:
        """The reranking model a search names (a catalog model of kind ``rerank`` this key may use), as a
        call that records what it cost (``record``: a side row of role ``retrieval``); None when none is named."""
        if name is None:
            return None
        try:
            entry = self.calls.resolve(principal, name, "rerank")
        except TollwayError as exc:
            exc.param = param
            raise
        assert entry is not None

        async def call(query: str, texts: list[str]) -> list[float]:
            started = time.perf_counter()
            try:
                served = await self.router.call(self.router.direct(entry), {
                    "model": entry.name, "query": query, "documents": texts}, stream=False, endpoint="rerank")
            except ChainFailed as failed:
                record(SideCall(role="retrieval", model=entry, usage=Usage(), status=failed.error.status,
                                latency_ms=(time.perf_counter() - started) * 1000, error_code=failed.error.code))
                raise failed.error from None
            served.release(True)
            response = served.response or {}
            usage = response.get("usage")
            tokens = (usage.get("total_tokens") or usage.get("prompt_tokens")) if isinstance(usage, dict) else None
            if not isinstance(tokens, int):  # an upstream that says nothing is charged what it read
                tokens = count_text(query) * len(texts) + sum(count_text(t) for t in texts)
            record(SideCall(role="retrieval", model=entry, usage=Usage(input_tokens=tokens), replica=served.replica,
                            latency_ms=(time.perf_counter() - started) * 1000))
            scores = [float("-inf")] * len(texts)
            try:
                for result in response["results"]:
                    scores[int(result["index"])] = float(result["relevance_score"])
            except (KeyError, TypeError, ValueError, IndexError):
                raise UpstreamBadResponse(f"{entry.name} answered a rerank without results") from None
            return scores

        return call

    async def _embed(self, embedder: Embedder, texts: Sequence[str], owner: int, *,
                     query: bool = False) -> Embedded:
        """``owner``: the tenant the call is for (the local embedder serves tenants in turn)."""
        try:
            return await embedder.embed(texts, query=query, owner=owner)
        except EmbedderError as exc:
            raise (exc.cause if isinstance(exc.cause, TollwayError) else
                   ServiceUnavailable(f"The embedding model failed: {exc}", code="embedder_failed")) from exc

    # -- metered requests --------------------------------------------------------------------------
    async def _metered(self, ctx: CallContext, endpoint: str, body: bytes, entry: ModelEntry, tokens: int,
                       work: Callable[[Tally], Awaitable[tuple[T, Embedded | None]]],
                       held: _Held | None = None) -> tuple[T, Decimal]:
        """One request's ledger row: admitted for ``tokens`` of ``entry`` at worst, closed with what the
        embedding model actually used. ``held``: a search's transaction, open while it is admitted (its
        collection was read in it), which ends if the admission is slow (``_let_go_after``)."""
        calls = self.calls
        tally = calls.open(ctx, endpoint)
        with tally.closed_on_error():
            tally.bind(entry)
            rules = await calls.rules(ctx.principal.tenant_id)
            worst = Usage(input_tokens=reserved_input(tokens)) if calls.bounded(rules, ctx.principal) else None
            admission = calls.admit(ctx, tally, rules, body, [entry], worst)
            await (admission if held is None else _let_go_after(admission, held))
            result, embedded = await work(tally)
            if embedded is not None and embedded.replica:
                tally.replica(embedded.replica)
            usage = Usage(input_tokens=embedded.tokens if embedded is not None else 0)
            cost = tally.close(200, usage=usage, usage_source="local" if entry is LOCAL_ENTRY else "upstream")
        return result, cost

    async def create(self, ctx: CallContext, tenant_id: int, name: str, *, embedder: str | None,
                     splitting: Splitting) -> Collection:
        entry = self.entry(embedder or self.settings.default_embedder)
        if splitting.chunk_overlap >= splitting.chunk_tokens:
            raise InvalidRequest("chunk_overlap must be smaller than chunk_tokens", param="chunk_overlap")
        if entry is LOCAL_ENTRY:
            dims = self.local.dims if self.local is not None else 0
        else:  # the width of a catalog model's vectors: one probe (a ledger row of its own)
            probe = self.embedder_for(entry.name, 0)

            async def measure(_: Tally) -> tuple[int, Embedded | None]:
                got = await self._embed(probe, ["dimension probe"], ctx.principal.tenant_id)
                return int(got.vectors.shape[1]), got

            dims, _ = await self._metered(ctx, "collections", f"collections:{name}".encode(), entry, 8, measure)
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    await ensure_index(conn, dims)
                return await create_collection(conn, tenant_id, name, embedder=entry.name, dims=dims,
                                               splitting=splitting)
            except StoreError as exc:
                raise map_store_error(exc) from None

    async def collection(self, tenant_id: int, name: str, *, param: str = "collection") -> Collection:
        async with self.pool.connection() as conn:
            return await _collection_in(conn, tenant_id, name, param, lookup=get_collection)

    async def ingest(self, ctx: CallContext, body: bytes, tenant_id: int, name: str,
                     docs: Sequence[NewDocument]) -> tuple[list[Written], str, Embedded | None, Decimal]:
        """Parse everything first (a bad document writes nothing), skip unchanged ones, embed the rest in
        batches off the event loop, write each changed document in one transaction."""
        coll = await self.collection(tenant_id, name)
        embedder = self.embedder_for(coll.embedder, coll.dims)
        limit = self.settings.max_document_tokens
        try:
            # in a worker process, tenants taking turns for the workers, with no connection held
            parsed = await self.parser.parse(coll.splitting, docs, max_tokens=limit, owner=ctx.principal.tenant_id)
        except DocumentError as exc:
            raise (PayloadTooLarge(str(exc), param="documents") if isinstance(exc, DocumentTooLarge) else
                   InvalidRequest(str(exc), param="documents", code="invalid_document")) from None
        async with self.pool.connection() as conn:
            prepared = await unchanged(conn, coll, parsed)
        texts = to_embed(prepared)
        worst = await asyncio.to_thread(lambda: sum(count_text(t) for t in texts)) if texts else 0

        async def run(tally: Tally) -> tuple[tuple[list[Written], str, Embedded | None], Embedded | None]:
            embedded = await self._embed(embedder, texts, ctx.principal.tenant_id) if texts else None
            if embedded is not None:  # spent even if writing fails now: the row charges it either way
                tally.usage = Usage(input_tokens=embedded.tokens)
            async with self.pool.connection() as conn:
                try:
                    vectors = embedded.vectors if embedded is not None else np.zeros((0, coll.dims), np.float32)
                    written = await write(conn, coll, prepared, vectors, embedder)
                except StoreError as exc:
                    raise map_store_error(exc) from None
                latest = await get_collection(conn, tenant_id, name)
            return (written, latest.index_version, embedded), embedded

        entry = self.entry(coll.embedder)
        (written, version, embedded), cost = await self._metered(ctx, "ingest", body, entry, worst, run)
        return written, version, embedded, cost

    async def search(self, ctx: CallContext, body: bytes, tenant_id: int, name: str, query: Query, *,
                     rerank: str | None = None) -> tuple[Found, Decimal]:
        sides: list[SideCall] = []
        reranker = self.reranker(ctx.principal, rerank, sides.append)
        # the tenant's rules (admission reads them) in their cache before a connection is held: a load takes
        # a connection of the same pool, which a burst of searches holding theirs would leave it none of
        await self.calls.rules(ctx.principal.tenant_id)
        async with (self.searching.slot(ctx.principal.tenant_id),
                    _Held(self.pool, self.searcher, tenant_id, self._quiet) as held):
            # the collection's lookup in the search's transaction (read once, on one connection)
            coll = await _collection_in(await held.begin(), tenant_id, name)
            embedder = self.embedder_for(coll.embedder, coll.dims)

            async def embed(tally: Tally) -> Embedded:
                embedded = await self._embed(embedder, [query.text], ctx.principal.tenant_id, query=True)
                tally.usage = Usage(input_tokens=embedded.tokens)  # spent whatever the search does next
                return embedded

            async def run(tally: Tally) -> tuple[Found, Embedded | None]:
                embedding = asyncio.ensure_future(embed(tally))
                try:
                    try:
                        got = await self._gathered(held, coll, query, embedding)
                        found = await self.searcher.finish(got, query, embedder.name, rerank=reranker)
                    except StoreError as exc:
                        raise map_store_error(exc) from None
                    finally:
                        for side in sides:  # the reranker's call, a row of its own
                            tally.side_call(side.role, side.model, side.usage, side.latency_ms,
                                            replica=side.replica, status=side.status, error_code=side.error_code)
                finally:
                    await asyncio.wait({embedding})  # spent even when the search failed first: its row charges it
                    if not embedding.cancelled():
                        embedding.exception()  # seen: the search's error, if any, is the one raised
                return found, embedding.result()

            return await self._metered(ctx, "retrieval.search", body, self.entry(coll.embedder),
                                       count_text(query.text), run, held)

    async def _gathered(self, held: _Held, coll: Collection, query: Query, embedding: asyncio.Future[Embedded],
                        param: str = "collection") -> Gathered:
        """The search's reads from PostgreSQL, inside ``held``'s transaction, which ends (and its connection goes
        back to the pool) before anything slow outside PostgreSQL is awaited: the packaged embedder computes
        the query's vector while PostgreSQL ranks it lexically, in one transaction; a remote embedder's answer
        is awaited with no connection held, then the collection is read again in a transaction of its own (a
        tenant whose embedding upstream hangs holds none of the connections other tenants need), as it is
        where a slow admission ended the first transaction. A reranker answers after this (``Searcher.finish``)."""
        vector: asyncio.Future[Embedded] | Embedded = embedding
        if self.entry(coll.embedder) is not LOCAL_ENTRY:
            await held.end()
            vector = await embedding
        conn = await held.begin()
        if held.reopened:  # the transaction the collection was read in has ended (above, or while admitted)
            again = await _collection_in(conn, held.tenant_id, coll.name, param)
            if (again.id, again.embedder, again.dims) != (coll.id, coll.embedder, coll.dims):
                raise Conflict(f"collection {coll.name!r} was replaced during the search; send it again",
                               param=param)
            coll = again
        got = await self.searcher.gather(conn, coll, query, vector, held.side)
        await held.end()
        return got

    # -- the chat path's retriever (tollway.gateway.chat.exchange.Retriever) ------------------------------
    def spec(self, raw: JSON) -> RetrievalSpec:
        if not isinstance(raw, dict):
            raise InvalidRequest("retrieval must be an object: {\"collection\": ..., \"context_tokens\": ...}",
                                 param="retrieval")
        spec = validate(RetrievalSpec, raw, at="retrieval")
        try:
            check_filters(spec.filters, "retrieval.filters")
            check_text(spec.collection, "retrieval.collection")
            if spec.query is not None:
                check_text(spec.query, "retrieval.query")
        except StoreError as exc:
            raise map_store_error(exc) from None
        if spec.context_tokens is not None and spec.context_tokens > self.settings.max_context_tokens:
            raise InvalidRequest(f"retrieval.context_tokens may be at most {self.settings.max_context_tokens}",
                                 param="retrieval.context_tokens")
        return spec

    def context_budget(self, view: ChatView, spec: JSON) -> int:
        may_search(view.principal)
        parsed = self.spec(spec)
        return parsed.context_tokens or self.settings.context_tokens

    async def index_version(self, view: ChatView, spec: JSON) -> str:
        found = await self.collection(view.tenant_id, self.spec(spec).collection,
                                      param="retrieval.collection")
        return found.index_version

    async def retrieve(self, view: ChatView, spec: JSON, calls: list[SideCall]) -> Retrieved | None:
        parsed = self.spec(spec)
        # the explicit query is at most QUERY_CHARS long; one taken from the messages is cut to as many (the
        # embedder reads fewer word pieces than that; the lexical ranking would otherwise read megabytes)
        text = (parsed.query or _last_user_text(view.messages)[:QUERY_CHARS]).replace("\x00", "")
        if not text:
            raise InvalidRequest("retrieval needs a query: the request has no user message text; give "
                                 "retrieval.query", param="retrieval.query")
        query = Query(text=text, context_tokens=view.context_budget, k=parsed.k, filters=parsed.filters,
                      mode=parsed.mode, hybrid=parsed.hybrid,
                      rerank_candidates=parsed.rerank_candidates or RERANK_CANDIDATES)
        reranker = self.reranker(view.principal, parsed.rerank, calls.append, "retrieval.rerank")
        tenant = view.tenant_id
        screen = self.screen_for(view) if self.screen_for is not None else None
        return await self._retrieve(parsed, query, reranker, screen, calls, tenant, text)

    async def _retrieve(self, parsed: RetrievalSpec, query: Query, reranker: Reranker | None,
                        screen: PassageScreen | None, calls: list[SideCall], tenant: int, text: str) -> Retrieved:
        coll: Collection | None = None  # looked up (inside the search's transaction: read once)
        entry = LOCAL_ENTRY  # its embedder's, once looked up
        started = time.perf_counter()
        embedded: Embedded | None = None
        embedding: asyncio.Future[Embedded] | None = None

        def spent(done: asyncio.Future[Embedded]) -> None:
            """The embedding's side row as soon as it is known (before the reranker's, as calls are made)."""
            nonlocal embedded
            if not done.cancelled() and done.exception() is None:
                embedded = done.result()
                calls.append(SideCall(role="retrieval", model=entry, usage=Usage(input_tokens=embedded.tokens),
                                      latency_ms=embedded.latency_ms, replica=embedded.replica))

        try:
            # one connection for the collection's lookup and the search (one checkout, not two),
            # given back before a reranker (or a remote embedder) is waited for
            async with self.searching.slot(tenant), _Held(self.pool, self.searcher, tenant, self._quiet) as held:
                named = await _collection_in(await held.begin(), tenant, parsed.collection, "retrieval.collection")
                entry = self.entry(named.embedder)
                coll = named
                started = time.perf_counter()
                embedder = self.embedder_for(coll.embedder, coll.dims)
                embedding = asyncio.ensure_future(self._embed(embedder, [text], tenant, query=True))
                embedding.add_done_callback(spent)
                got = await self._gathered(held, coll, query, embedding, "retrieval.collection")
            found = await self.searcher.finish(got, query, embedder.name,
                                               screen=screen.reason if screen is not None else None,
                                               drop=screen is None or screen.action == "drop", rerank=reranker)
        except (TollwayError, psycopg.Error, StoreError) as exc:
            if coll is None:
                raise  # a wrong name is the caller's error (404), and a store that cannot look it up fails, whatever
                # the failure policy
            if embedding is not None:  # spent even when the search failed first: its side row says what it cost
                await asyncio.wait({embedding})
            error = exc if isinstance(exc, TollwayError) else \
                map_store_error(exc) if isinstance(exc, StoreError) else \
                ServiceUnavailable("The retrieval store is unavailable.", code="retrieval_unavailable")
            if embedded is None:  # the failed embedding call is a side row too (what it cost, if anything)
                calls.append(SideCall(role="retrieval", model=entry, usage=Usage(),
                                      latency_ms=(time.perf_counter() - started) * 1000, status=error.status,
                                      error_code=error.code))
            if (parsed.on_failure or self.settings.on_failure) == "fail" or isinstance(exc, StoreError):
                raise error from exc
            return Retrieved(collection=coll.name, index_version=coll.index_version, messages=(), sources=(),
                             context_tokens=0, error=error.code)
        messages = ({"role": "system", "content": found.context},) if found.context else ()
        guards: tuple[GuardOutcome, ...] = ()
        if screen is not None:
            flagged = found.flagged
            guards = (GuardOutcome("passage_injection", screen.action if flagged else "pass", len(flagged),
                                   found.screen_ms, "; ".join(f.reason for f in flagged) or None),)
        return Retrieved(collection=coll.name, index_version=found.index_version, messages=messages,
                         sources=(*(p.as_json(self.ids) for p in found.passages),
                                  *(f.as_json(self.ids) for f in found.flagged)),
                         context_tokens=found.context_tokens, guards=guards, rerank_error=found.rerank_error)

    def search_settings(self) -> str:
        """The search's settings (``Tuning.tag``) and how the packaged embedder embeds queries: an answer packed
        under other settings, or from a query embedded another way, is another answer."""
        recipe = self.local.query_recipe if self.local is not None else None
        return f"{self.searcher.tag}+query:{recipe}" if recipe else self.searcher.tag

    def screening(self, view: ChatView) -> str | None:
        """How this request's passages are screened (part of the response cache key with the index version:
        the same question under another screen is another context)."""
        screen = self.screen_for(view) if self.screen_for is not None else None
        return screen.key if screen is not None else None


class _Held:
    """One pooled connection for a search's reads, in the search's transaction (``Searcher.transaction``), taken
    when first needed and given back (the transaction committed) as soon as the reads are done, so that no
    connection waits with the search on anything outside PostgreSQL: the pool is every tenant's."""

    def __init__(self, pool: AsyncConnectionPool, searcher: Searcher, tenant_id: int,
                 quiet: Callable[[], bool]) -> None:
        self.pool = pool
        self.searcher = searcher
        self.tenant_id = tenant_id
        self.quiet = quiet  # whether the process is searching little enough to read beside (``side``)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._tx: AbstractAsyncContextManager[Any] | None = None
        self._ended = 0  # transactions ended so far
        self._begun_after = 0  # how many had ended when the open one began

    @property
    def reopened(self) -> bool:
        """The open transaction began after an earlier one ended: what was read in that one (the collection)
        is to be read again."""
        return self._begun_after > 0

    async def begin(self) -> psycopg.AsyncConnection[Any]:
        """The connection, inside the transaction (both started here unless they already are)."""
        if self._conn is None:
            self._conn = await self.pool.getconn()
        if self._tx is None:
            tx = self.searcher.transaction(self._conn, self.tenant_id)
            await tx.__aenter__()
            self._tx = tx
            self._begun_after = self._ended
        return self._conn

    @property
    def open(self) -> bool:
        return self._conn is not None

    @asynccontextmanager
    async def side(self) -> AsyncIterator[psycopg.AsyncConnection[Any] | None]:
        """A second connection in a search transaction of the same tenant, for reads that can run beside this
        one's (``Searcher.gather``), given back as they end; ``None`` where the pool has no idle connection to
        spare now (a busy pool is every tenant's: then the search reads on its one connection, as it always
        could), or where the process has more searches in flight than ``SIDE_SEARCHES`` (their reads already
        keep PostgreSQL's cores busy). Never waited for: a search that would have to queue for it reads
        sequentially instead."""
        stats = self.pool.get_stats()
        if not self.quiet() or stats.get("pool_available", 0) < SIDE_SPARE or stats.get("requests_waiting", 0):
            yield None
            return
        try:
            conn = await self.pool.getconn(timeout=SIDE_WAIT_S)
        except PoolTimeout:
            yield None
            return
        try:
            async with self.searcher.transaction(conn, self.tenant_id):
                yield conn
        finally:
            await self.pool.putconn(conn)

    async def end(self, exc: BaseException | None = None) -> None:
        """The transaction ended (committed; rolled back on ``exc``) and the connection back in the pool."""
        tx, self._tx = self._tx, None
        conn, self._conn = self._conn, None
        if tx is not None:
            self._ended += 1
        try:
            if tx is not None:
                await tx.__aexit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc else None)
        finally:
            if conn is not None:
                await self.pool.putconn(conn)

    async def __aenter__(self) -> _Held:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        await self.end(exc)


ADMISSION_HOLD_S = 0.05  # how long a search's transaction waits on its admission before it ends
SIDE_SPARE = 2  # a search takes a second connection only while at least this many are idle in the pool
SIDE_SEARCHES = 1  # and while it is the process's only search in flight (two at once already share the cores:
# bench/RESULTS.md, "A lone search reads on two connections")
SIDE_WAIT_S = 0.002  # and only one it gets at once (taken by another meanwhile: it reads on its one)


async def _let_go_after(work: Awaitable[T], held: _Held, after_s: float = ADMISSION_HOLD_S) -> T:
    """``work``'s result (a search's admission, a script in Redis: under a millisecond, or seconds while Redis
    is stalled); past ``after_s`` ``held``'s transaction ends meanwhile, its connection back in the pool every
    tenant shares, and the search opens another for its reads (its collection read again there)."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=after_s)
        if not done and held.open:
            await held.end()
        return await task
    except BaseException:
        task.cancel()
        raise


async def _collection_in(conn: psycopg.AsyncConnection[Any], tenant_id: int, name: str, param: str = "collection",
                         lookup: Callable[[psycopg.AsyncConnection[Any], int, str], Awaitable[Collection]]
                         = get_collection_in) -> Collection:
    """The collection by name, inside a tenant transaction already open (a search's: read once), or through
    ``lookup=get_collection`` in one of its own; a wrong name is a 404 naming ``param``."""
    try:
        check_text(name, param)
        return await lookup(conn, tenant_id, name)
    except StoreError as exc:
        exc.param = param
        raise map_store_error(exc) from None


def _last_user_text(messages: Sequence[JSON]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return "\n".join(content_texts(message.get("content"))).strip()
    return ""
