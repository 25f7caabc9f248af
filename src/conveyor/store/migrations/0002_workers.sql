-- Worker liveness, kept where a Redis wipe cannot fake it: a row per running worker process,
-- its beat refreshed every heartbeat interval, deleted on a clean stop. Owned by store/workers.py.
CREATE TABLE {schema}.workers (
    id          text PRIMARY KEY,
    host        text NOT NULL,
    pid         integer NOT NULL,
    types       text[] NOT NULL,
    concurrency integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now(),
    info        jsonb NOT NULL DEFAULT '{}'      -- what it reported at its last beat
);

-- Tasks running per worker: the lease check at each beat and live in-flight counts.
CREATE INDEX tasks_running_worker ON {schema}.tasks (worker) WHERE status = 'running';
