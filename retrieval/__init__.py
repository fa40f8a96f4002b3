"""Hierarchical retrieval (document -> section -> chunk) on pgvector, packed to a token budget: ingestion,
embedders (a local CPU default and any embedding model of the catalog), the store with row-level security
per tenant, and search. Other parts import from here."""

if __name__ != "tollway.retrieval":
    raise ImportError("This folder is Tollway's 'tollway.retrieval' package; import it by that name "
                      "(pip install -e . maps it), not as a top-level 'retrieval'.")

from tollway.retrieval.documents import (
    FORMATS,
    DocumentError,
    DocumentTooLarge,
    Parsed,
    Splitting,
    decode,
    guess_format,
    parse,
)
from tollway.retrieval.embedders import (
    LOCAL_DIMS,
    LOCAL_NAME,
    Embedded,
    Embedder,
    EmbedderError,
    LocalEmbedder,
    UpstreamEmbedder,
)
from tollway.retrieval.ingest import (
    NewDocument,
    Prepared,
    parse_all,
    parse_documents,
    prepare,
    to_embed,
    unchanged,
    write,
)
from tollway.retrieval.parsing import ParseLimit, ParsePool
from tollway.retrieval.search import (
    RERANK_CANDIDATES,
    Found,
    Gathered,
    Passage,
    Query,
    Reranker,
    Searcher,
    Tuning,
    check_filters,
    check_text,
)
from tollway.retrieval.store import (
    Collection,
    StoreError,
    Written,
    collection,
    collections,
    create_collection,
    delete_collection,
    delete_document,
    documents,
    ensure_index,
    get_collection,
    stored_text,
    tenant_tx,
)

__all__ = ["FORMATS", "LOCAL_DIMS", "LOCAL_NAME", "RERANK_CANDIDATES", "Collection", "DocumentError", "DocumentTooLarge", "Embedded", "Embedder",
           "EmbedderError", "Found", "Gathered", "LocalEmbedder", "NewDocument", "ParseLimit", "ParsePool", "Parsed", "Passage", "Prepared", "Query",
           "Reranker", "Searcher", "Splitting", "StoreError", "Tuning", "UpstreamEmbedder", "Written", "check_filters", "check_text", "collection",
           "collections", "create_collection", "decode", "delete_collection", "delete_document", "documents",
           "ensure_index", "get_collection", "guess_format", "parse", "parse_all", "parse_documents", "prepare", "stored_text", "tenant_tx", "to_embed", "unchanged", "write"]
