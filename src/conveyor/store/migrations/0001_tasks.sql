-- The durable record of every task. `{schema}` is replaced by Settings.database_schema.
CREATE TABLE {schema}.tasks (
    id               uuid PRIMARY KEY,           -- time-ordered (UUIDv7): keyset pages by id
    type             text NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')),
    payload          jsonb NOT NULL,
    idempotency_key  text,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    result           jsonb,
    last_error       text,
    worker           text,                        -- the worker that ran the latest attempt
    created_at       timestamptz NOT NULL DEFAULT now(),
    run_at           timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- POST /v1/tasks with an idempotency key: one task per (type, key).
CREATE UNIQUE INDEX tasks_idempotency ON {schema}.tasks (type, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- GET /v1/tasks?type=  /  ?status=  /  ?type=&status=  (newest first, keyset on id);
-- also the dead count per type in GET /v1/queues.
CREATE INDEX tasks_type_id ON {schema}.tasks (type, id);
CREATE INDEX tasks_status_id ON {schema}.tasks (status, id);
CREATE INDEX tasks_type_status_id ON {schema}.tasks (type, status, id);
-- The relay's scan and the oldest-queued age in GET /v1/queues: queued tasks only, so the
-- millions of finished rows never enter it.
CREATE INDEX tasks_queued_run_at ON {schema}.tasks (type, run_at, id) WHERE status = 'queued';
