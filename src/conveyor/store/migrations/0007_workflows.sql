-- Workflows: dependencies between tasks, DAGs created whole, parent-child tasks. Owned by
-- store/workflows.py (see its docstring for the rules).
--
-- A task with unfinished dependencies is `waiting`: in no stream, in no partial index of
-- 0004. An edge (upstream, downstream) is a row of task_edges; `deps_left` on the downstream
-- counts its upstreams not yet final, and `has_dependents` on the upstream lets the trigger
-- below skip, by its WHEN alone, every task nothing depends on (the hot path: no function
-- call, no query), and every change that neither ends a task nor takes one back from its end
-- (a start, a retry's requeue).
--
-- Every statement here on the tasks table only changes the catalog (a brief exclusive lock,
-- no scan: the new columns have constant defaults, the checks are NOT VALID); the scans are in
-- 0011, outside a transaction: the checks' VALIDATE (which lets writes go on) and the indexes,
-- built CONCURRENTLY.
ALTER TABLE {schema}.tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE {schema}.tasks ADD CONSTRAINT tasks_status_check
    CHECK (status IN ('waiting', 'queued', 'running', 'succeeded', 'dead', 'cancelled'))
    NOT VALID;
ALTER TABLE {schema}.tasks
    ADD COLUMN depends_on uuid[],                    -- as given at enqueue; NULL: none
    ADD COLUMN on_upstream_failure text,             -- NULL: cancel; 'run'
    ADD COLUMN workflow_id uuid,                     -- the workflow it is a node of
    ADD COLUMN node_key text,                        -- its key in that workflow
    ADD COLUMN parent_id uuid,                       -- the task whose handler enqueued it
    ADD COLUMN has_dependents boolean NOT NULL DEFAULT false,
    ADD COLUMN deps_left integer NOT NULL DEFAULT 0;
ALTER TABLE {schema}.tasks ADD CONSTRAINT tasks_on_upstream_failure_check
    CHECK (on_upstream_failure IN ('cancel', 'run')) NOT VALID;

CREATE TABLE {schema}.task_edges (
    upstream   uuid NOT NULL REFERENCES {schema}.tasks (id) ON DELETE CASCADE,
    downstream uuid NOT NULL REFERENCES {schema}.tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (upstream, downstream)
);
CREATE INDEX task_edges_downstream ON {schema}.task_edges (downstream);

CREATE TABLE {schema}.workflows (
    id           uuid PRIMARY KEY,                   -- UUIDv7, like task ids
    name         text,
    nodes        integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    cancelled_at timestamptz                         -- POST /v1/workflows/{id}/cancel
);

-- The one owner of releasing dependents: whatever statement makes a task final (a worker's
-- record, a kill by the rebalancer or the relay, a cancel from the API) or takes it back from
-- final (a retry), its dependents are resolved by this trigger, in that statement's
-- transaction. Final (succeeded, dead, cancelled):
--   every dependent counts one upstream fewer; a waiting one whose last upstream that was is
--   released (`queued`, due now); a waiting one with `cancel` on upstream failure ends
--   `cancelled` when the upstream did not succeed, naming it (and its own dependents follow).
-- Back from final (retried): every dependent counts one more; one released and never started
--   goes back to `waiting`, one cancelled by an upstream waits again unless another upstream
--   still failed (and its own dependents follow).
-- "Follow" is a loop over a frontier, not the trigger firing again: the function's own updates
-- run at trigger depth 1, which the WHEN below skips, so a chain of any depth is one call (a
-- nested trigger per level would exhaust Postgres' stack some 600 levels down). Each round
-- locks the frontier's dependents in id order (fewer deadlocks between concurrent
-- completions), updates them, and takes those that became final (or left final, on a retry)
-- as the next frontier.
-- Each released or cancelled dependent is announced by a NOTIFY on the `enqueued` channel
-- (store/notify.py's payload, delivered on commit only): the relay publishes it to its stream
-- and its event; the relay's scan is the backstop for a NOTIFY nobody heard.
CREATE FUNCTION {schema}.tasks_resolve_dependents() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    now_final boolean := NEW.status IN ('succeeded', 'dead', 'cancelled');
    frontier uuid[] := ARRAY[NEW.id];
    notes text[];
BEGIN
    WHILE cardinality(frontier) > 0 LOOP
        PERFORM 1 FROM {schema}.tasks AS t
        WHERE t.id IN (SELECT e.downstream FROM {schema}.task_edges AS e
                       WHERE e.upstream = ANY (frontier))
        ORDER BY t.id FOR UPDATE;
        IF now_final THEN
            -- Per dependent: how many of its upstreams the frontier holds, and the first of
            -- them that failed (the reason a `cancel` dependent ends with).
            WITH o AS (
                SELECT t.id, t.status, count(*)::integer AS n,
                       (array_agg('upstream task ' || u.id || ' ended ' || u.status
                                  ORDER BY u.id)
                        FILTER (WHERE u.status IN ('dead', 'cancelled')))[1] AS reason
                FROM {schema}.task_edges AS e
                JOIN {schema}.tasks AS t ON t.id = e.downstream
                JOIN {schema}.tasks AS u ON u.id = e.upstream
                WHERE e.upstream = ANY (frontier)
                GROUP BY t.id, t.status
            ), moved AS (
                UPDATE {schema}.tasks AS d SET
                    deps_left = d.deps_left - o.n,
                    status = CASE
                        WHEN o.status <> 'waiting' THEN d.status
                        WHEN o.reason IS NOT NULL
                             AND d.on_upstream_failure IS DISTINCT FROM 'run' THEN 'cancelled'
                        WHEN d.deps_left <= o.n THEN 'queued'
                        ELSE 'waiting' END,
                    finished_at = CASE
                        WHEN o.status <> 'waiting' THEN d.finished_at
                        WHEN o.reason IS NOT NULL
                             AND d.on_upstream_failure IS DISTINCT FROM 'run' THEN now()
                        ELSE NULL END,
                    last_error = CASE
                        WHEN o.status = 'waiting' AND o.reason IS NOT NULL
                             AND d.on_upstream_failure IS DISTINCT FROM 'run' THEN o.reason
                        ELSE d.last_error END,
                    -- Only a release moves run_at (an indexed column): the count alone is
                    -- a HOT update, however many upstreams a fan-in counts down.
                    run_at = CASE
                        WHEN o.status = 'waiting' AND d.deps_left <= o.n
                             AND NOT (o.reason IS NOT NULL
                                      AND d.on_upstream_failure IS DISTINCT FROM 'run')
                        THEN greatest(d.run_at, now())
                        ELSE d.run_at END
                FROM o
                WHERE d.id = o.id
                RETURNING d.id, d.type, d.status, o.status AS was
            )
            SELECT coalesce(array_agg(m.id) FILTER (WHERE m.status = 'cancelled'), '{}'),
                   coalesce(array_agg(m.type || ':' || m.id || ':'
                                      || CASE WHEN m.status = 'cancelled' THEN 'cancelled'
                                              ELSE '' END || ':'), '{}')
            INTO frontier, notes
            FROM moved AS m
            WHERE m.was = 'waiting' AND m.status <> 'waiting';
            PERFORM pg_notify('{schema}_enqueued', note) FROM unnest(notes) AS note;
        ELSE
            WITH o AS (
                SELECT t.id, t.status, count(*)::integer AS n
                FROM {schema}.task_edges AS e
                JOIN {schema}.tasks AS t ON t.id = e.downstream
                WHERE e.upstream = ANY (frontier)
                GROUP BY t.id, t.status
            ), moved AS (
                UPDATE {schema}.tasks AS d SET
                    deps_left = d.deps_left + o.n,
                    status = CASE
                        WHEN d.status = 'queued' AND d.attempts = 0 THEN 'waiting'
                        WHEN d.status = 'cancelled' AND d.attempts = 0
                             AND d.last_error LIKE 'upstream task % ended %'
                             AND NOT EXISTS (
                                 SELECT 1 FROM {schema}.task_edges AS x
                                 JOIN {schema}.tasks AS u ON u.id = x.upstream
                                 WHERE x.downstream = d.id
                                   AND u.status IN ('dead', 'cancelled'))
                        THEN 'waiting'
                        ELSE d.status END,
                    finished_at = CASE
                        WHEN d.status = 'cancelled' AND d.attempts = 0
                             AND d.last_error LIKE 'upstream task % ended %'
                             AND NOT EXISTS (
                                 SELECT 1 FROM {schema}.task_edges AS x
                                 JOIN {schema}.tasks AS u ON u.id = x.upstream
                                 WHERE x.downstream = d.id
                                   AND u.status IN ('dead', 'cancelled'))
                        THEN NULL
                        ELSE d.finished_at END
                FROM o
                WHERE d.id = o.id
                RETURNING d.id, d.status, o.status AS was
            )
            SELECT coalesce(array_agg(m.id), '{}') INTO frontier
            FROM moved AS m
            WHERE m.was = 'cancelled' AND m.status = 'waiting';
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_resolve_dependents
    AFTER UPDATE OF status ON {schema}.tasks
    FOR EACH ROW
    WHEN (pg_trigger_depth() = 0
          AND NEW.has_dependents
          AND (OLD.status IN ('succeeded', 'dead', 'cancelled'))
              <> (NEW.status IN ('succeeded', 'dead', 'cancelled')))
    EXECUTE FUNCTION {schema}.tasks_resolve_dependents();
