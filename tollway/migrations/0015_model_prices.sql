-- Prices set at run time (tollway.routing.prices): over the config file's, for every replica, without a
-- restart. The price is the config file's `price:` object (one scheme: per token, gpu_hour_usd,
-- cpu_hour_usd or a litellm key).
CREATE TABLE model_prices (
    model       text PRIMARY KEY,
    price       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
