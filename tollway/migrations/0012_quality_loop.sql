-- The live quality loop: scored samples of live answers, the routes' sampling rates, model rollouts
-- changeable at run time, progressive prompt rollouts, and the tenant's content policy.

-- Content policy: whether prompts and answers of live samples, shadow samples and eval items may be
-- stored (default: scores and metadata only), and for how long.
ALTER TABLE tenant_policies
    ADD COLUMN store_content          boolean NOT NULL DEFAULT false,
    ADD COLUMN content_retention_days integer NOT NULL DEFAULT 30 CHECK (content_retention_days > 0);

-- One row per sampled live answer, written by the scorer off the request path.
CREATE TABLE quality_samples (
    id              bigserial PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    request_id      text NOT NULL,
    end_user        text,
    model           text NOT NULL,           -- the model that answered
    rollout_of      text,                    -- a canary's answer: the model it stands in for
    prompt_name     text,
    prompt_label    text,                    -- the label the request named (NULL: a version, or no prompt)
    prompt_version  text,
    passed          boolean,                 -- every reference-free check passed (NULL: none applied)
    judge_score     double precision,
    refusal         boolean NOT NULL,
    guard_failed    boolean NOT NULL,
    retrieval_score double precision,
    output_chars    integer NOT NULL,
    tokens          integer NOT NULL,
    cost_usd        numeric(20, 12) NOT NULL,
    feedback_score  double precision,
    checks          jsonb NOT NULL DEFAULT '[]',
    sample_rate     double precision NOT NULL,
    -- content, only where the tenant's policy lets it be stored
    prompt_text     text,
    output_text     text
);
CREATE INDEX quality_samples_model ON quality_samples (model, id);
CREATE INDEX quality_samples_prompt ON quality_samples (tenant_id, prompt_name, prompt_version, id);
CREATE INDEX quality_samples_request ON quality_samples (request_id);
CREATE INDEX quality_samples_content ON quality_samples (tenant_id, created_at) WHERE output_text IS NOT NULL;

-- Per sampling key ('model:<name>', 'prompt:<tenant>:<name>:<label>'), the rate the monitor asks for.
CREATE TABLE quality_rates (
    key         text PRIMARY KEY,
    rate        double precision NOT NULL CHECK (rate > 0 AND rate <= 1),
    progress    double precision NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Model canaries and shadows, changeable at run time (the config file's rollouts are the starting point).
CREATE TABLE rollouts (
    model           text PRIMARY KEY,
    candidate       text NOT NULL,
    canary_percent  double precision NOT NULL DEFAULT 0 CHECK (canary_percent BETWEEN 0 AND 100),
    shadow_percent  double precision NOT NULL DEFAULT 0 CHECK (shadow_percent BETWEEN 0 AND 100),
    steps           double precision[] NOT NULL DEFAULT '{}',   -- progressive: canary percent per step
    step            integer NOT NULL DEFAULT 0,
    min_samples     integer NOT NULL DEFAULT 200 CHECK (min_samples > 0),
    auto_rollback   boolean NOT NULL DEFAULT true,
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'complete', 'rolled_back')),
    step_started_at timestamptz NOT NULL DEFAULT now(),
    first_sample    bigint NOT NULL DEFAULT 0,  -- the first quality sample of the current step
    source          text NOT NULL DEFAULT 'api' CHECK (source IN ('config', 'api')),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- A prompt label moving in steps: split_percent of the label's users to the candidate version.
CREATE TABLE prompt_rollouts (
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name            text NOT NULL,
    label           text NOT NULL,
    candidate       text NOT NULL,              -- the version being rolled out
    previous        text NOT NULL,              -- the version the label held (the last good one)
    steps           double precision[] NOT NULL,
    step            integer NOT NULL DEFAULT 0,
    min_samples     integer NOT NULL DEFAULT 200 CHECK (min_samples > 0),
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'complete', 'rolled_back')),
    first_sample    bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name, label)
);

-- Shadow samples follow the content policy too: whose they are, for erasure.
ALTER TABLE shadow_samples ADD COLUMN end_user text;
CREATE INDEX shadow_samples_tenant ON shadow_samples (tenant_id, created_at);
