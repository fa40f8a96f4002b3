-- Guardrails: a tenant's guard policy (which validators run on input and output, what a failure does,
-- its restricted terms and topics), as the JSON the admin API and `tollway tenants guards` write.
-- Changes go through the change channel (kind 'guards'), so every gateway applies them at once.
CREATE TABLE guard_policies (
    tenant_id   bigint PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    policy      jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

