-- The chat stages: side rows for the calls a stage makes for a request, the prompt that answered it,
-- guard outcomes; and one change channel that is also the audit log.
--
-- role: 'answer' (one per request), 'attempt' (a failed fallback attempt), 'retrieval' (the retrieval's
-- embedding call), 'guard' (a guard's model call), 'shadow' (operator spend, not the tenant's), 'eval'
-- (live quality scoring, written after the answer).
ALTER TABLE ledger DROP CONSTRAINT IF EXISTS ledger_role_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_role_check
    CHECK (role IN ('answer', 'attempt', 'retrieval', 'guard', 'shadow', 'eval'));
ALTER TABLE ledger
    ADD COLUMN prompt_name    text,
    ADD COLUMN guard_outcome  jsonb;  -- [{validator, action, spans, ms}]

-- Every administrative change (budget, policy, key, and later guard policy, prompt label, rollout):
-- who, what, before, after, when, why. Written in the same transaction as the change, with a NOTIFY on
-- channel 'tollway_changes' that every gateway process LISTENs to.
CREATE TABLE changes (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    author     text NOT NULL,
    tenant_id  bigint REFERENCES tenants (id) ON DELETE SET NULL,
    kind       text NOT NULL,   -- 'budget', 'policy', 'key', 'key_limits', ...
    subject    text NOT NULL,   -- which one: a budget id, a key id, a policy's tenant
    action     text NOT NULL,   -- 'set', 'delete', 'reset', 'create', 'revoke'
    before     jsonb,
    after      jsonb,
    reason     text
);
CREATE INDEX changes_at ON changes (at DESC);
CREATE INDEX changes_tenant_at ON changes (tenant_id, at DESC);
