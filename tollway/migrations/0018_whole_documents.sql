-- Chunking that fits the corpus: a document of at most `whole_tokens` tokens is one chunk, never split (0:
-- off). Existing collections get the new default too: their documents keep the chunks they have until they
-- are re-ingested (a document's content hash covers its splitting settings, so re-ingesting the same text
-- under other settings splits it anew); the index version names the settings.
ALTER TABLE rag_collections ADD COLUMN whole_tokens integer NOT NULL DEFAULT 240
    CHECK (whole_tokens BETWEEN 0 AND 8192);
