-- When a key was last used: set by the gateway when it looks the key up (at most once a minute per key),
-- so `tollway keys list` and GET /v1/admin/keys can show it without reading the ledger.
ALTER TABLE api_keys ADD COLUMN last_used_at timestamptz;
