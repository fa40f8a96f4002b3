-- The console: daily cost rollups kept by the ledger's own inserts, console sign-in sessions, per-budget
-- alert thresholds, and an index for the operations page's last failed attempts.

-- What each answer a model served would have cost at the top tier's prices (priced when it was written):
-- the routing savings finance sees are this minus what the answers cost.
ALTER TABLE ledger ADD COLUMN baseline_usd numeric(20, 12) NOT NULL DEFAULT 0;

-- One row per UTC day, tenant and dimension value, with the same sums the cost report makes from the
-- ledger. A statement trigger on the ledger adds every inserted batch in the same transaction, so the
-- rollup is exact at every commit: the console reads thousands of rows where the ledger has millions.
-- dim: 'model' (value: model, tier: its tier), 'key', 'user', 'tag' (a row per tag), 'prompt'
-- ('name@version'), 'route' (the route kind; tier: the answer's tier), 'role' (answer, attempt, ...).
CREATE TABLE ledger_daily (
    day              date NOT NULL,
    tenant_id        bigint NOT NULL,
    dim              text NOT NULL,
    value            text NOT NULL,
    tier             text NOT NULL DEFAULT '',
    spend_usd        numeric(24, 12) NOT NULL DEFAULT 0,   -- everything but shadow samples
    input_tokens     bigint NOT NULL DEFAULT 0,
    output_tokens    bigint NOT NULL DEFAULT 0,
    cached_tokens    bigint NOT NULL DEFAULT 0,
    requests         bigint NOT NULL DEFAULT 0,            -- answers
    errors           bigint NOT NULL DEFAULT 0,
    cache_hits       bigint NOT NULL DEFAULT 0,
    cache_saved_usd  numeric(24, 12) NOT NULL DEFAULT 0,
    failed_attempts  bigint NOT NULL DEFAULT 0,
    shadow_usd       numeric(24, 12) NOT NULL DEFAULT 0,
    guard_blocked    bigint NOT NULL DEFAULT 0,
    guard_fallbacks  bigint NOT NULL DEFAULT 0,
    guard_redacted   bigint NOT NULL DEFAULT 0,
    -- answers a model served (no cache hits, no errors): their cost, and their cost at the top tier's prices
    served_usd       numeric(24, 12) NOT NULL DEFAULT 0,
    baseline_usd     numeric(24, 12) NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, dim, day, value, tier)
);
CREATE INDEX ledger_daily_dim_day ON ledger_daily (dim, day);

-- The route kind of a ledger row: how its answer was reached (non-answer rows: their role).
CREATE FUNCTION ledger_route_kind(role text, cache_hit boolean, degraded boolean, attempt smallint,
                                  route_reason text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN role <> 'answer' THEN role
        WHEN cache_hit THEN 'cache_hit'
        WHEN degraded OR route_reason LIKE '%degraded:%' THEN 'degraded'
        WHEN route_reason LIKE 'guard_fallback:%' THEN 'guard_fallback'
        WHEN attempt > 1 THEN 'fallback'
        WHEN route_reason LIKE 'auto:%' THEN 'auto'
        ELSE 'requested' END
$$;

-- The rollup upsert for the rows of `source` (the trigger's transition table, or the ledger itself to
-- backfill). Rows are upserted in key order so concurrent batches lock them in the same order.
CREATE FUNCTION ledger_rollup_sql(source text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
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
            ('role', n.role, '')) AS x (dim, value, tier)
        UNION ALL
        SELECT (n.created_at AT TIME ZONE 'UTC')::date, n.tenant_id, 'tag', t.tag, '', n.role,
               n.cost_usd, n.input_tokens, n.output_tokens, n.cached_tokens, n.status, n.cache_hit, n.saved_usd,
               n.guard_outcome, n.baseline_usd
        FROM %1$I n CROSS JOIN LATERAL unnest(coalesce(n.tags, ARRAY['(none)'])) AS t (tag)
    ) s
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
    $q$, source)
$fn$;

CREATE FUNCTION ledger_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE ledger_rollup_sql('ledger_new_rows');
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_rollup AFTER INSERT ON ledger REFERENCING NEW TABLE AS ledger_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_rollup();

DO $$ BEGIN EXECUTE ledger_rollup_sql('ledger'); END $$;

-- Console sign-in: a session per sign-in, by the hash of its cookie's token; ends at expires_at, at
-- sign-out, or when its key is revoked.
CREATE TABLE console_sessions (
    token_hash  bytea PRIMARY KEY,
    key_id      bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- Per-budget alert thresholds (shares of the limit) and forecast alerts; NULL: the gateway's defaults.
ALTER TABLE budgets ADD COLUMN alert_thresholds double precision[]
        CHECK (alert_thresholds IS NULL OR 0 < ALL (alert_thresholds)),
    ADD COLUMN alert_forecast boolean;

-- The operations page lists the newest failed attempts of every tenant.
CREATE INDEX ledger_attempts_at ON ledger (created_at DESC) WHERE role = 'attempt';
