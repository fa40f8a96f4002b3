-- API keys are stored as HMAC-SHA256(server secret, SHA-256(key)). Rows from before carry the plain
-- SHA-256 digest (key_secret_id NULL); every gateway re-keys them at start (HMAC over the stored digest),
-- and a lookup that still meets one re-keys it (tollway.gateway.keys.KeyHasher).
ALTER TABLE api_keys ADD COLUMN key_secret_id text;
