"""Retrieval routes: collections, documents (JSON or multipart), search. Thin: parse, call ``Rag``, shape.

Every route acts on the caller's own tenant; an admin key names the tenant (``tenant`` in the body or the
query). Writes need an ingest key or an admin key (``tollway.gateway.parts.rag``)."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.responses import Response

from tollway.errors import InvalidJSON, InvalidRequest
from tollway.gateway.chat.calls import CallContext
from tollway.gateway.http.api import json_response
from tollway.gateway.http.deps import app_state
from tollway.gateway.http.protocol import parse_json_object, validate
from tollway.gateway.metering.accounting import format_cost
from tollway.gateway.parts.rag import Rag, map_store_error, may_search, may_write
from tollway.gateway.tenancy.keys import Principal, reachable_tenant
from tollway.retrieval import (
    RERANK_CANDIDATES,
    DocumentError,
    NewDocument,
    Query,
    Splitting,
    StoreError,
    check_filters,
    check_text,
    decode,
    delete_collection,
    delete_document,
    documents,
    guess_format,
)
from tollway.retrieval import collections as list_collections

router = APIRouter()
MAX_DOCUMENTS = 256  # per request


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str | None = None  # admin keys name the tenant


class CollectionBody(_Body):
    name: str = Field(min_length=1, max_length=64)
    embedder: str | None = None  # 'local' or an embedding model of the catalog (default: the gateway's)
    chunk_tokens: int = Field(default=200, ge=16, le=8192)
    chunk_overlap: int = Field(default=32, ge=0, le=4096)
    section_tokens: int = Field(default=1024, ge=16, le=65536)
    whole_tokens: int = Field(default=240, ge=0, le=8192)  # a document this short is one chunk (0: always split)


class DocumentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    source: str | None = Field(default=None, min_length=1, max_length=1024)
    format: Literal["text", "markdown", "html"] | None = None
    title: str | None = Field(default=None, max_length=512)
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsBody(_Body):
    documents: list[DocumentBody] = Field(min_length=1, max_length=MAX_DOCUMENTS)


class SearchBody(_Body):
    collection: str = Field(min_length=1, max_length=64)
    query: str = Field(min_length=1, max_length=32_000)
    context_tokens: int | None = Field(default=None, ge=1)
    k: int | None = Field(default=None, ge=1, le=100)  # flat: chunks (8); hierarchical: most passages (50)
    filters: dict[str, Any] | None = None
    mode: Literal["hierarchical", "flat"] = "hierarchical"
    hybrid: bool = True  # dense and BM25 evidence fused (false: dense only)
    rerank: str | None = Field(default=None, min_length=1, max_length=256)  # a catalog model of kind rerank
    rerank_candidates: int = Field(default=RERANK_CANDIDATES, ge=2, le=100)  # the best candidates it reorders


def _rag(request: Request) -> Rag:
    rag: Rag = app_state(request).rag
    return rag


def _ctx(request: Request) -> CallContext:
    return CallContext.of(request.state.request_id, request.state.principal, request.headers.get)


async def _tenant(request: Request, named: str | None) -> tuple[Principal, int]:
    principal: Principal = request.state.principal
    tid = await reachable_tenant(app_state(request).pool, principal, named,
                                 "reach its own tenant's collections")
    return principal, tid


def _usage(tokens: int, cost: Any) -> dict[str, Any]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "cost_usd": format_cost(cost)}


@router.post("/v1/collections", status_code=201, summary="Create a collection (its embedding model is fixed)")
async def post_collection(request: Request, body: CollectionBody) -> Response:
    principal, tid = await _tenant(request, body.tenant)
    may_write(principal)
    made = await _rag(request).create(_ctx(request), tid, body.name, embedder=body.embedder,
                                      splitting=Splitting(body.chunk_tokens, body.chunk_overlap, body.section_tokens,
                                                          body.whole_tokens))
    return json_response(made.as_json(_rag(request).ids), status=201)


@router.get("/v1/collections", summary="The tenant's collections with their document and chunk counts")
async def get_collections(request: Request, tenant: str | None = None) -> Response:
    principal, tid = await _tenant(request, tenant)
    may_search(principal)
    async with app_state(request).pool.connection() as conn:
        found = await list_collections(conn, tid)
    return json_response({"object": "list", "data": [c.as_json(_rag(request).ids) for c in found]})


@router.get("/v1/collections/{name}", summary="One collection")
async def get_collection(request: Request, name: str, tenant: str | None = None) -> Response:
    principal, tid = await _tenant(request, tenant)
    may_search(principal)
    rag = _rag(request)
    return json_response((await rag.collection(tid, name)).as_json(rag.ids))


@router.delete("/v1/collections/{name}", summary="Delete a collection and everything in it")
async def remove_collection(request: Request, name: str, tenant: str | None = None) -> Response:
    principal, tid = await _tenant(request, tenant)
    may_write(principal)
    async with app_state(request).pool.connection() as conn:
        if not await delete_collection(conn, tid, name):
            raise map_store_error(StoreError(f"collection {name!r} does not exist", "collection_not_found", "name"))
    return json_response({"object": "collection", "name": name, "deleted": True})


async def _documents(request: Request) -> tuple[str | None, list[NewDocument]]:
    """JSON (one document, or ``documents``) or multipart (``file`` parts; optional fields ``tenant``,
    ``format``, ``metadata`` as JSON for all of them)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form(max_files=MAX_DOCUMENTS, max_fields=16)
        files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
        if not files:
            raise InvalidRequest("multipart upload without a 'file' part", param="file")
        try:
            meta = orjson.loads(str(form.get("metadata") or "{}"))
        except orjson.JSONDecodeError:
            raise InvalidJSON("metadata must be a JSON object", param="metadata") from None
        if not isinstance(meta, dict):
            raise InvalidRequest("metadata must be a JSON object", param="metadata")
        declared = str(form["format"]) if form.get("format") else None
        out = []
        for f in files:
            name = f.filename or "upload"
            try:
                text = decode(await f.read())
                out.append(NewDocument(source=name, text=text, format=guess_format(name, declared), metadata=meta))
            except DocumentError as exc:
                raise InvalidRequest(f"{name}: {exc}", param="file", code="invalid_document") from None
        tenant = form.get("tenant")
        return (str(tenant) if tenant else None), out
    raw = parse_json_object(await request.body())
    if "documents" in raw:
        many = validate(DocumentsBody, raw)
        tenant, bodies = many.tenant, many.documents
    else:
        tenant = raw.pop("tenant", None)
        bodies = [validate(DocumentBody, raw)]
    out = []
    for d in bodies:
        source = d.source or f"text-{hashlib.sha256(d.text.encode()).hexdigest()[:16]}"  # same text, same name
        try:
            out.append(NewDocument(source=source, text=d.text, format=guess_format(source, d.format), title=d.title,
                                   metadata=d.metadata))
        except DocumentError as exc:
            raise InvalidRequest(str(exc), param="format") from None
    return tenant, out


@router.post("/v1/collections/{name}/documents", summary="Add or replace documents (JSON or multipart)")
async def post_documents(request: Request, name: str) -> Response:
    named, docs = await _documents(request)
    principal, tid = await _tenant(request, named)
    may_write(principal)
    # what a retry of this very request would repeat (the retry-storm breaker's fingerprint)
    same = orjson.dumps([name, *[(d.source, hashlib.sha256(d.text.encode()).hexdigest()) for d in docs]])
    written, version, embedded, cost = await _rag(request).ingest(_ctx(request), same, tid, name, docs)
    tokens = embedded.tokens if embedded is not None else 0
    return json_response({"object": "list", "data": [w.as_json(_rag(request).ids) for w in written], "index_version": version,
                          "usage": _usage(tokens, cost)},
                         headers={"x-tollway-index-version": version, "x-tollway-cost-usd": format_cost(cost)})


@router.get("/v1/collections/{name}/documents", summary="A collection's documents, oldest first")
async def get_documents(request: Request, name: str, tenant: str | None = None, limit: int = 100,
                        after: str | None = None) -> Response:
    principal, tid = await _tenant(request, tenant)
    may_search(principal)
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be between 1 and 1000", param="limit")
    ids = _rag(request).ids
    start = 0 if after is None else ids.decode("doc", after)
    if start is None:
        raise InvalidRequest("'after' is a document id from an earlier page (doc_...)", param="after")
    async with app_state(request).pool.connection() as conn:
        try:
            found = await documents(conn, tid, name, limit=limit, after=start)
        except StoreError as exc:
            raise map_store_error(exc) from None
    data = [{**d, "id": ids.encode("doc", d["id"])} for d in found]
    return json_response({"object": "list", "data": data, "has_more": len(found) == limit,
                          "last_id": data[-1]["id"] if data else None})


@router.delete("/v1/collections/{name}/documents/{document:path}",
               summary="Delete a document (by its id, or by its source)")
async def remove_document(request: Request, name: str, document: str, tenant: str | None = None) -> Response:
    principal, tid = await _tenant(request, tenant)
    may_write(principal)
    ids = _rag(request).ids
    document_id = ids.decode("doc", document)
    async with app_state(request).pool.connection() as conn:
        try:
            version, document_id = await delete_document(conn, tid, name, document_id, source=document)
        except StoreError as exc:
            raise map_store_error(exc) from None
    return json_response({"object": "document", "id": ids.encode("doc", document_id), "deleted": True,
                          "index_version": version}, headers={"x-tollway-index-version": version})


@router.post("/v1/retrieval/search", summary="Search a collection; the context packed into a token budget")
async def search(request: Request, body: SearchBody) -> Response:
    principal, tid = await _tenant(request, body.tenant)
    may_search(principal)
    rag = _rag(request)
    budget = body.context_tokens or rag.settings.context_tokens
    if budget > rag.settings.max_context_tokens:
        raise InvalidRequest(f"context_tokens may be at most {rag.settings.max_context_tokens}",
                             param="context_tokens")
    try:
        check_filters(body.filters)
        check_text(body.query, "query")
    except StoreError as exc:
        raise map_store_error(exc) from None
    query = Query(text=body.query, context_tokens=budget, k=body.k, filters=body.filters, mode=body.mode,
                  hybrid=body.hybrid, rerank_candidates=body.rerank_candidates)
    found, cost = await rag.search(_ctx(request), orjson.dumps(body.model_dump()), tid, body.collection, query,
                                   rerank=body.rerank)
    return json_response(found.as_json(rag.ids) | {"usage": _usage(found.embedded.tokens, cost)},
                         headers={"x-tollway-index-version": found.index_version,
                                  "x-tollway-cost-usd": format_cost(cost)})
