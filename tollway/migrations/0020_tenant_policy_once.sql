-- Row-level security's tenant check, evaluated once per statement instead of once per row. The policies
-- compared each row's tenant_id with rag_tenant(), a STABLE SQL function that the planner inlines as
-- nullif(current_setting(...), '')::bigint and evaluates for every row it reads: 15,000 postings of one BM25
-- query read the setting and parsed it 15,000 times. As a scalar subquery, (SELECT rag_tenant()) is an
-- InitPlan: computed once, then compared. The same tenant, the same rows (a transaction that set none still
-- sees none: NULL equals nothing). At 100k chunks BM25 alone went from p50 / p95 5.2 / 11.5 to 3.7 / 7.6 ms
-- (bench/RESULTS.md, "One transaction per search").
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['rag_collections', 'rag_documents', 'rag_sections', 'rag_chunks', 'rag_terms',
                             'rag_postings'] LOOP
        EXECUTE format('ALTER POLICY tenant_isolation ON %I USING (tenant_id = (SELECT rag_tenant()))'
                       ' WITH CHECK (tenant_id = (SELECT rag_tenant()))', t);
    END LOOP;
END $$;
