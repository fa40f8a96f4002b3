-- Budgets, tenant policies, key rate limits, breaker events and reconciliation runs.
ALTER TABLE ledger ADD COLUMN session_id text, ADD COLUMN tags text[];
ALTER TABLE api_keys ADD COLUMN rpm integer CHECK (rpm > 0), ADD COLUMN tpm integer CHECK (tpm > 0);

CREATE TABLE tenant_policies (
    tenant_id                   bigint PRIMARY KEY REFERENCES tenants(id),
    redis_failure               text NOT NULL DEFAULT 'closed' CHECK (redis_failure IN ('closed', 'open')),
    default_max_tokens          integer NOT NULL DEFAULT 4096 CHECK (default_max_tokens > 0),
    rpm                         integer CHECK (rpm > 0),
    tpm                         integer CHECK (tpm > 0),
    velocity_soft_usd_per_min   numeric(20, 10) CHECK (velocity_soft_usd_per_min > 0),
    velocity_hard_usd_per_min   numeric(20, 10) CHECK (velocity_hard_usd_per_min > 0),
    retry_storm_limit           integer NOT NULL DEFAULT 20 CHECK (retry_storm_limit >= 0),
    retry_storm_window_s        integer NOT NULL DEFAULT 10 CHECK (retry_storm_window_s > 0),
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

-- scope 'tenant' has subject ''; 'key' a key id; 'user' / 'session' an id; '*' means "each one".
CREATE TABLE budgets (
    id            bigserial PRIMARY KEY,
    tenant_id     bigint NOT NULL REFERENCES tenants(id),
    scope         text NOT NULL CHECK (scope IN ('tenant', 'key', 'user', 'session')),
    subject       text NOT NULL DEFAULT '',
    period        text NOT NULL CHECK (period IN ('minute', 'hour', 'day', 'month', 'lifetime')),
    limit_usd     numeric(20, 10) CHECK (limit_usd >= 0),
    limit_tokens  bigint CHECK (limit_tokens >= 0),
    -- a reset gives a fresh allowance for the rest of the window: usage counts from here on
    reset_at      timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, scope, subject, period),
    CHECK (limit_usd IS NOT NULL OR limit_tokens IS NOT NULL),
    CHECK ((scope = 'tenant') = (subject = ''))
);

CREATE TABLE breaker_events (
    id                bigserial PRIMARY KEY,
    tenant_id         bigint,
    kind              text NOT NULL,
    first_offense_at  timestamptz NOT NULL,
    contained_at      timestamptz NOT NULL,
    detail            jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX breaker_events_tenant ON breaker_events (tenant_id, contained_at);

CREATE TABLE reconciliation_runs (
    id          bigserial PRIMARY KEY,
    ran_at      timestamptz NOT NULL DEFAULT now(),
    checked     integer NOT NULL,
    corrected   integer NOT NULL,
    drift_usd   numeric(20, 10) NOT NULL,
    detail      jsonb NOT NULL DEFAULT '[]'
);
