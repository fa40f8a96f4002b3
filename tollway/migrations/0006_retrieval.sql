-- Retrieval: per-tenant collections of documents -> sections -> chunks, each level with an embedding.
--
-- Tenant isolation is PostgreSQL's job, not a WHERE clause's: every table here has row-level security
-- (forced, so it binds the tables' owner too) with one policy, "the row's tenant is the tenant set for
-- this transaction" (`SET LOCAL tollway.tenant_id`). The gateway reads and writes these tables as the
-- role tollway_rag (`SET LOCAL ROLE`), which is no superuser and cannot bypass row-level security; a
-- transaction that set no tenant sees no rows at all.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tollway_rag') THEN
        CREATE ROLE tollway_rag NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END $$;
-- The connecting user may switch to it (a superuser always may; others need the membership).
DO $$
BEGIN
    EXECUTE format('GRANT tollway_rag TO %I', current_user);
EXCEPTION WHEN others THEN
    RAISE NOTICE 'could not grant tollway_rag to %: %', current_user, SQLERRM;
END $$;

CREATE FUNCTION rag_tenant() RETURNS bigint LANGUAGE sql STABLE AS
$$ SELECT nullif(current_setting('tollway.tenant_id', true), '')::bigint $$;

-- One per tenant and name. `revision` moves with every change of content (in the same transaction);
-- the index version the gateway reports is (name, revision, embedder), so vectors of two embedding
-- models never mix and a cached answer grounded in old text is never served after a re-ingest.
CREATE TABLE rag_collections (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    embedder        text NOT NULL,
    dims            integer NOT NULL CHECK (dims BETWEEN 1 AND 4000),
    chunk_tokens    integer NOT NULL CHECK (chunk_tokens BETWEEN 16 AND 8192),
    chunk_overlap   integer NOT NULL CHECK (chunk_overlap >= 0),
    section_tokens  integer NOT NULL CHECK (section_tokens >= 16),
    revision        bigint NOT NULL DEFAULT 0,
    metadata        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    UNIQUE (id, tenant_id)
);

-- `source` is the caller's name for a document (a file path, a URL, an id): ingesting the same source
-- again replaces it, or does nothing when its content hash is unchanged.
CREATE TABLE rag_documents (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL,
    collection_id   bigint NOT NULL,
    source          text NOT NULL CHECK (length(source) BETWEEN 1 AND 1024),
    title           text NOT NULL,
    format          text NOT NULL CHECK (format IN ('text', 'markdown', 'html')),
    content_hash    text NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    token_count     integer NOT NULL,
    dims            integer NOT NULL,
    embedding       halfvec NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (collection_id, tenant_id) REFERENCES rag_collections (id, tenant_id) ON DELETE CASCADE,
    UNIQUE (collection_id, source),
    UNIQUE (id, tenant_id)
);

CREATE TABLE rag_sections (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL,
    collection_id   bigint NOT NULL,
    document_id     bigint NOT NULL,
    ord             integer NOT NULL,
    heading         text NOT NULL,       -- the heading path: "Fees > Overdraft"
    text            text NOT NULL,
    token_count     integer NOT NULL,
    dims            integer NOT NULL,
    embedding       halfvec NOT NULL,
    FOREIGN KEY (document_id, tenant_id) REFERENCES rag_documents (id, tenant_id) ON DELETE CASCADE,
    UNIQUE (id, tenant_id)
);
CREATE INDEX rag_sections_document ON rag_sections (document_id, ord);
CREATE INDEX rag_sections_collection ON rag_sections (collection_id);

-- Chunks carry their document's metadata (filters need no join) and a full-text vector (hybrid search).
CREATE TABLE rag_chunks (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL,
    collection_id   bigint NOT NULL,
    document_id     bigint NOT NULL,
    section_id      bigint NOT NULL,
    ord             integer NOT NULL,
    text            text NOT NULL,
    token_count     integer NOT NULL,
    metadata        jsonb NOT NULL DEFAULT '{}',
    dims            integer NOT NULL,
    embedding       halfvec NOT NULL,
    tsv             tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    FOREIGN KEY (section_id, tenant_id) REFERENCES rag_sections (id, tenant_id) ON DELETE CASCADE
);
CREATE INDEX rag_chunks_collection ON rag_chunks (collection_id);
CREATE INDEX rag_chunks_section ON rag_chunks (section_id, ord);
CREATE INDEX rag_chunks_document ON rag_chunks (document_id);
CREATE INDEX rag_chunks_tsv ON rag_chunks USING gin (tsv);
CREATE INDEX rag_chunks_metadata ON rag_chunks USING gin (metadata jsonb_path_ops);

-- HNSW (cosine) per embedding width, on halfvec: half the memory of vector at no measurable recall loss
-- for normalised sentence embeddings (bench/retrieval). The local embedder's 384 dimensions are indexed
-- here; a collection made with an embedder of another width creates its own (tollway.retrieval.store).
CREATE INDEX rag_chunks_hnsw_384 ON rag_chunks USING hnsw ((embedding::halfvec(384)) halfvec_cosine_ops)
    WHERE dims = 384;
CREATE INDEX rag_sections_hnsw_384 ON rag_sections USING hnsw ((embedding::halfvec(384)) halfvec_cosine_ops)
    WHERE dims = 384;
CREATE INDEX rag_documents_hnsw_384 ON rag_documents USING hnsw ((embedding::halfvec(384)) halfvec_cosine_ops)
    WHERE dims = 384;

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['rag_collections', 'rag_documents', 'rag_sections', 'rag_chunks'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY tenant_isolation ON %I USING (tenant_id = rag_tenant())'
                       ' WITH CHECK (tenant_id = rag_tenant())', t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO tollway_rag', t);
    END LOOP;
END $$;
GRANT USAGE ON SEQUENCE rag_collections_id_seq, rag_documents_id_seq, rag_sections_id_seq, rag_chunks_id_seq
    TO tollway_rag;
GRANT EXECUTE ON FUNCTION rag_tenant() TO tollway_rag;

-- App keys that may also write documents (`tollway keys create --ingest`); admin keys always may.
ALTER TABLE api_keys ADD COLUMN ingest boolean NOT NULL DEFAULT false;
