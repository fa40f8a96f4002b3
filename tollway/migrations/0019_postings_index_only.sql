-- BM25 reads a term's postings from the index alone. Row-level security checks every posting's tenant_id,
-- which the postings' key did not carry, so each posting read was a heap fetch (random reads across the
-- table): at 100k chunks a short query's BM25 took p95 53 ms. With tenant_id in the key's INCLUDE list the
-- plan is an index-only scan (8 ms; bench/RESULTS.md, "BM25 at 100k chunks"). Index-only scans skip the
-- heap for pages the visibility map marks all-visible: autovacuum marks pages after inserts (PostgreSQL 13+).
-- The key is rebuilt whole: on a large deployment this migration takes as long as an index build of the
-- postings (about 10 s per 100k chunks here) and holds the table's lock meanwhile.
ALTER TABLE rag_postings DROP CONSTRAINT rag_postings_pkey,
    ADD CONSTRAINT rag_postings_pkey PRIMARY KEY (collection_id, term, chunk_id) INCLUDE (tf, len, tenant_id);
