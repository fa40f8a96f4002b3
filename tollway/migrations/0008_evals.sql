-- Evals: runs of a golden set against a (prompt version, model, index version), their per-item results,
-- and feedback from products joined to the ledger by request id.
CREATE TABLE eval_runs (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id          bigint,
    author          text NOT NULL,
    purpose         text NOT NULL DEFAULT 'run' CHECK (purpose IN ('run', 'gate')),
    set_name        text NOT NULL,
    set_digest      text NOT NULL,
    prompt          text,            -- the reference asked for: NAME, NAME@VERSION, NAME@LABEL
    prompt_version  text,            -- the version that answered (the first item's)
    model           text,            -- the model asked for
    models          text[],          -- the models that answered
    index_version   text,
    status          text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    items           integer NOT NULL,
    done            integer NOT NULL DEFAULT 0,
    passed          integer NOT NULL DEFAULT 0,
    summary         jsonb,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX eval_runs_tenant ON eval_runs (tenant_id, id DESC);

CREATE TABLE eval_results (
    run_id          bigint NOT NULL REFERENCES eval_runs (id) ON DELETE CASCADE,
    item_id         text NOT NULL,
    passed          boolean NOT NULL,
    score           double precision,
    result          jsonb NOT NULL,  -- checks, answer, request id, status, cost, latency, versions
    PRIMARY KEY (run_id, item_id)
);

CREATE TABLE feedback (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id          bigint,
    request_id      text NOT NULL,
    score           double precision,
    label           text,
    comment         text,
    -- copied from the request's ledger row when the feedback arrives
    prompt_name     text,
    prompt_version  text,
    model           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (score IS NOT NULL OR label IS NOT NULL)
);
CREATE INDEX feedback_tenant_at ON feedback (tenant_id, created_at);
CREATE INDEX feedback_request ON feedback (request_id);
