-- API keys: a row per key made by `conveyor keys create`. The key itself is never stored: only
-- its public id and the SHA-256 of its secret part. Owned by store/keys.py.
CREATE TABLE {schema}.api_keys (
    id            text PRIMARY KEY,            -- the id part of cvk_<id>_<secret>: not secret
    name          text NOT NULL UNIQUE,        -- revoked keys keep their names
    secret_sha256 bytea NOT NULL,
    scopes        text[] NOT NULL,
    types         text[],                      -- task types it may enqueue; NULL: every type
    rate_count    integer,                     -- its own rate limit (NULL: the default)
    rate_period_s integer,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,                 -- refreshed at most once a minute per process
    CHECK ((rate_count IS NULL) = (rate_period_s IS NULL)),
    CHECK (rate_count IS NULL OR (rate_count > 0 AND rate_period_s > 0))
);
