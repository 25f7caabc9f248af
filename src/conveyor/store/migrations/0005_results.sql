-- Results you can wait for: a running task's cancel request, its latest progress, and the
-- history of its attempts that did not succeed (a successful attempt is the row itself:
-- attempts, worker, started_at, finished_at), appended by the UPDATE that records the
-- attempt, so the success path writes nothing more than before. Owned by store/tasks.py.
ALTER TABLE {schema}.tasks
    ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false,
    ADD COLUMN progress jsonb,                          -- {fraction, message, data, at}
    ADD COLUMN attempt_log jsonb NOT NULL DEFAULT '[]'; -- [{number, worker, started_at,
                                                        --   finished_at, outcome, error}]
