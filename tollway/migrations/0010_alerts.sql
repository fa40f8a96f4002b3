-- Alerts (budget thresholds, drift): stored once per dedupe key (a threshold and its window), shown with
-- their evidence, and delivered to an optional webhook by a sweep that retries with backoff.
CREATE TABLE alerts (
    id               bigserial PRIMARY KEY,
    tenant_id        bigint REFERENCES tenants (id) ON DELETE CASCADE,
    kind             text NOT NULL,          -- 'budget', 'drift', ...
    subject          text NOT NULL,          -- what it is about: a budget id, a route
    dedupe_key       text NOT NULL UNIQUE,   -- raised at most once per key (e.g. budget:12:80:2026-11-22)
    message          text NOT NULL,
    evidence         jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text
);
CREATE INDEX alerts_tenant_at ON alerts (tenant_id, created_at DESC);
CREATE INDEX alerts_undelivered ON alerts (next_attempt_at) WHERE delivered_at IS NULL;
