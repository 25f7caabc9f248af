-- Flow control (README, Flow control). `queue_settings`: a task type's limits as changed at run
-- time through the API, over those declared in code: a NULL column keeps the declared value,
-- 0 (or 'off' for a rate) lifts it. Owned by store/queue_settings.py.
CREATE TABLE {schema}.queue_settings (
    type                     text PRIMARY KEY,
    max_concurrency          integer CHECK (max_concurrency >= 0),
    max_concurrency_per_key  integer CHECK (max_concurrency_per_key >= 0),
    rate_limit               text,
    rate_limit_per_key       text,
    paused                   boolean NOT NULL DEFAULT false,
    updated_at               timestamptz NOT NULL DEFAULT now()
);
-- A task's priority ('high' or 'low'; NULL is 'default'), so a task republished (relay),
-- retried or put back goes to its level's ready set again; and its unique key for
-- `unique_for` (store/tasks.py): one task per (type, unique key) while it is queued or
-- running, or until `unique_until`, whichever is later.
-- Catalog changes only (nullable columns without a default, a check NOT VALID): the scans
-- that validate the check and build the unique index run in 0012_flow_indexes, outside a
-- transaction, while writes go on.
ALTER TABLE {schema}.tasks
    ADD COLUMN priority text,
    ADD COLUMN unique_key text,
    ADD COLUMN unique_until timestamptz;
ALTER TABLE {schema}.tasks ADD CONSTRAINT tasks_priority_check
    CHECK (priority IN ('high', 'low')) NOT VALID;
