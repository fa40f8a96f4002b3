-- Git-versioned prompts. PostgreSQL is the source of truth that every replica shares: the git objects of
-- each tenant's prompt repository (blobs, trees, commits, as git stores them), its head, one row per
-- prompt version (a commit that changed the prompt's file), and labels. Replicas serve git and render
-- from what they load here.
CREATE TABLE prompt_objects (
    tenant_id  bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    sha        text NOT NULL,
    type_num   smallint NOT NULL,   -- git's object type: 1 commit, 2 tree, 3 blob
    data       bytea NOT NULL,
    PRIMARY KEY (tenant_id, sha)
);

CREATE TABLE prompt_heads (
    tenant_id   bigint PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    head        text NOT NULL,      -- refs/heads/main
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE prompt_versions (
    tenant_id   bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL,
    version     text NOT NULL,      -- the commit that changed prompts' file <name>.yaml
    blob        text NOT NULL,
    content     text NOT NULL,
    message     text NOT NULL,
    author      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    seq         bigserial,
    PRIMARY KEY (tenant_id, name, version)
);
CREATE INDEX prompt_versions_latest ON prompt_versions (tenant_id, name, seq DESC);

CREATE TABLE prompt_labels (
    tenant_id      bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name           text NOT NULL,
    label          text NOT NULL CHECK (label ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    version        text NOT NULL,
    split_version  text,            -- a share of end users gets this version instead
    split_percent  double precision NOT NULL DEFAULT 0 CHECK (split_percent >= 0 AND split_percent <= 100),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name, label)
);

ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_role_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check
    CHECK (role IN ('app', 'finance', 'admin', 'prompt_engineer'));
