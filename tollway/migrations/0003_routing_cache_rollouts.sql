-- Routing: the tier that answered, fallback attempts, cache hits and their saving, degraded answers,
-- canary and shadow rollouts; tenant routing policy; shadow samples for evaluation.
--
-- role: 'answer' (one per request), 'attempt' (a failed fallback attempt that reached an upstream),
-- 'shadow' (a sampled copy sent to a candidate model; operator spend, not the tenant's budget).
ALTER TABLE ledger
    ADD COLUMN tier       text,
    ADD COLUMN role       text NOT NULL DEFAULT 'answer' CHECK (role IN ('answer', 'attempt', 'shadow')),
    ADD COLUMN attempt    smallint NOT NULL DEFAULT 1,
    ADD COLUMN cache_hit  boolean NOT NULL DEFAULT false,
    ADD COLUMN saved_usd  numeric(20, 12) NOT NULL DEFAULT 0,
    ADD COLUMN degraded   boolean NOT NULL DEFAULT false,
    ADD COLUMN rollout    text;

ALTER TABLE tenant_policies
    -- the quality/cost dial for model 'auto': difficulty at or above it goes to the top tier
    ADD COLUMN route_threshold   double precision NOT NULL DEFAULT 0.5
        CHECK (route_threshold >= 0 AND route_threshold <= 1),
    -- models this tenant may be routed to (NULL: all); a quality floor: no tier below this one
    ADD COLUMN allowed_models    text[],
    ADD COLUMN quality_floor     text,
    -- the last resort when every tier failed: a templated answer that says it is degraded
    ADD COLUMN degraded_answers  boolean NOT NULL DEFAULT false,
    ADD COLUMN response_cache    boolean NOT NULL DEFAULT true;

CREATE TABLE shadow_samples (
    id                 bigserial PRIMARY KEY,
    request_id         text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    tenant_id          bigint NOT NULL,
    model              text NOT NULL,
    candidate          text NOT NULL,
    status             integer NOT NULL,
    error_code         text,
    primary_output     text,
    candidate_output   text,
    primary_latency_ms double precision,
    candidate_latency_ms double precision,
    candidate_cost_usd numeric(20, 12) NOT NULL DEFAULT 0
);
CREATE INDEX shadow_samples_model ON shadow_samples (model, candidate, created_at);
