-- Ledger rows and reports by endpoint (chat.completions, completions, messages, responses, embeddings,
-- moderations): a rollup dimension of its own, backfilled from the ledger; and the Responses API's stored
-- responses (previous_response_id, GET and DELETE), kept under each tenant's content policy.

-- Writers wait while the rollup changes and the new dimension is backfilled, so no row is counted twice
-- or missed: rows committed before this point are in the backfill, rows after it go through the new rollup.
LOCK TABLE ledger IN SHARE ROW EXCLUSIVE MODE;

-- The rollup upsert of 0011 with the 'endpoint' dimension added (value: the ledger row's endpoint), and
-- `dims` to roll up only some dimensions (the backfill below; NULL: all of them).
DROP FUNCTION ledger_rollup_sql(text);
CREATE FUNCTION ledger_rollup_sql(source text, dims text[] DEFAULT NULL) RETURNS text LANGUAGE sql
    IMMUTABLE AS $fn$
    SELECT format($q$
    INSERT INTO ledger_daily AS d (day, tenant_id, dim, value, tier, spend_usd, input_tokens, output_tokens,
        cached_tokens, requests, errors, cache_hits, cache_saved_usd, failed_attempts, shadow_usd, guard_blocked,
        guard_fallbacks, guard_redacted, served_usd, baseline_usd)
    SELECT day, tenant_id, dim, value, tier,
        coalesce(sum(cost_usd) FILTER (WHERE role <> 'shadow'), 0),
        coalesce(sum(input_tokens) FILTER (WHERE role <> 'shadow'), 0),
        coalesce(sum(output_tokens) FILTER (WHERE role <> 'shadow'), 0),
        coalesce(sum(cached_tokens) FILTER (WHERE role <> 'shadow'), 0),
        count(*) FILTER (WHERE role = 'answer'),
        count(*) FILTER (WHERE role = 'answer' AND status >= 400),
        count(*) FILTER (WHERE cache_hit),
        coalesce(sum(saved_usd), 0),
        count(*) FILTER (WHERE role = 'attempt'),
        coalesce(sum(cost_usd) FILTER (WHERE role = 'shadow'), 0),
        count(*) FILTER (WHERE role = 'answer' AND guard_outcome @> '[{"action": "block"}]'),
        count(*) FILTER (WHERE role = 'answer' AND guard_outcome @> '[{"action": "fallback"}]'),
        count(*) FILTER (WHERE role = 'answer' AND guard_outcome @> '[{"action": "redact"}]'),
        coalesce(sum(cost_usd) FILTER (WHERE role = 'answer' AND NOT cache_hit AND status < 400), 0),
        coalesce(sum(baseline_usd), 0)
    FROM (
        SELECT (n.created_at AT TIME ZONE 'UTC')::date AS day, n.tenant_id, x.dim, x.value, x.tier, n.role,
               n.cost_usd, n.input_tokens, n.output_tokens, n.cached_tokens, n.status, n.cache_hit, n.saved_usd,
               n.guard_outcome, n.baseline_usd
        FROM %1$I n CROSS JOIN LATERAL (VALUES
            ('model', coalesce(n.model, '(none)'), coalesce(n.tier, '')),
            ('key', n.key_id::text, ''),
            ('user', coalesce(n.end_user, '(none)'), ''),
            ('prompt', coalesce(n.prompt_name || '@' || n.prompt_version, '(none)'), ''),
            ('route', ledger_route_kind(n.role, n.cache_hit, n.degraded, n.attempt, n.route_reason),
             coalesce(n.tier, '')),
            ('role', n.role, ''),
            ('endpoint', n.endpoint, '')) AS x (dim, value, tier)
        UNION ALL
        SELECT (n.created_at AT TIME ZONE 'UTC')::date, n.tenant_id, 'tag', t.tag, '', n.role,
               n.cost_usd, n.input_tokens, n.output_tokens, n.cached_tokens, n.status, n.cache_hit, n.saved_usd,
               n.guard_outcome, n.baseline_usd
        FROM %1$I n CROSS JOIN LATERAL unnest(coalesce(n.tags, ARRAY['(none)'])) AS t (tag)
    ) s
    WHERE %2$L::text[] IS NULL OR dim = ANY (%2$L::text[])
    GROUP BY day, tenant_id, dim, value, tier
    ORDER BY tenant_id, dim, day, value, tier
    ON CONFLICT (tenant_id, dim, day, value, tier) DO UPDATE SET
        spend_usd = d.spend_usd + excluded.spend_usd,
        input_tokens = d.input_tokens + excluded.input_tokens,
        output_tokens = d.output_tokens + excluded.output_tokens,
        cached_tokens = d.cached_tokens + excluded.cached_tokens,
        requests = d.requests + excluded.requests,
        errors = d.errors + excluded.errors,
        cache_hits = d.cache_hits + excluded.cache_hits,
        cache_saved_usd = d.cache_saved_usd + excluded.cache_saved_usd,
        failed_attempts = d.failed_attempts + excluded.failed_attempts,
        shadow_usd = d.shadow_usd + excluded.shadow_usd,
        guard_blocked = d.guard_blocked + excluded.guard_blocked,
        guard_fallbacks = d.guard_fallbacks + excluded.guard_fallbacks,
        guard_redacted = d.guard_redacted + excluded.guard_redacted,
        served_usd = d.served_usd + excluded.served_usd,
        baseline_usd = d.baseline_usd + excluded.baseline_usd
    $q$, source, dims)
$fn$;

DO $$ BEGIN EXECUTE ledger_rollup_sql('ledger', ARRAY['endpoint']); END $$;

-- One row per stored response: this turn's conversation as chat messages (its input, then its output;
-- the instructions are not carried to the next turn, as in OpenAI's API), the response object as it was
-- returned, and the response it continued. Content: deleted whole at the tenant's content retention, by an
-- erasure of the tenant or of its end user, or by DELETE /v1/responses/{id}.
CREATE TABLE stored_responses (
    tenant_id     bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            text NOT NULL,
    previous_id   text,
    end_user      text,
    request_id    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    turn          jsonb NOT NULL,
    response      jsonb NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX stored_responses_created ON stored_responses (created_at);
CREATE INDEX stored_responses_user ON stored_responses (tenant_id, end_user);
