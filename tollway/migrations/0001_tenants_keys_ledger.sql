-- Tenants, API keys (hashes only), and the cost ledger (partitioned by month).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE tenants (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants(id),
    key_hash        bytea NOT NULL UNIQUE,
    prefix          text NOT NULL,
    name            text,
    role            text NOT NULL CHECK (role IN ('app', 'finance', 'admin')),
    allowed_models  text[],
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE ledger (
    request_id      text NOT NULL,
    created_at      timestamptz NOT NULL,
    tenant_id       bigint NOT NULL,
    key_id          bigint NOT NULL,
    end_user        text,
    endpoint        text NOT NULL,
    model           text,
    upstream        text,
    upstream_model  text,
    route_reason    text,
    prompt_version  text,
    index_version   text,
    input_tokens    integer NOT NULL DEFAULT 0,
    output_tokens   integer NOT NULL DEFAULT 0,
    cached_tokens   integer NOT NULL DEFAULT 0,
    cost_usd        numeric(20, 12) NOT NULL DEFAULT 0,
    price_source    text,
    usage_source    text,
    latency_ms      double precision NOT NULL,
    ttft_ms         double precision,
    stream          boolean NOT NULL DEFAULT false,
    status          integer NOT NULL,
    error_code      text,
    PRIMARY KEY (request_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE ledger_default PARTITION OF ledger DEFAULT;
CREATE INDEX ledger_tenant_time ON ledger (tenant_id, created_at);

CREATE FUNCTION ledger_ensure_month(month_start date) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part text := format('ledger_%s', to_char(month_start, 'YYYY_MM'));
BEGIN
    IF to_regclass(part) IS NULL THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF ledger FOR VALUES FROM (%L) TO (%L)',
                       part, month_start, (month_start + interval '1 month')::date);
    END IF;
END $$;
