-- A cap on requests in flight at once, per tenant and per key (none: no cap). Counted in Redis by the
-- admission script, across every gateway process and replica (tollway.gateway.metering.quota).
ALTER TABLE tenant_policies ADD COLUMN max_parallel_requests integer CHECK (max_parallel_requests > 0);
ALTER TABLE api_keys ADD COLUMN max_parallel_requests integer CHECK (max_parallel_requests > 0);
