-- conveyor: no-transaction
-- The scans of 0008_flow, each outside a transaction so that writes to the tasks table go on
-- meanwhile: its priority check is validated (a SHARE UPDATE EXCLUSIVE lock), and the unique
-- index of `unique_for` is built CONCURRENTLY, preceded by a drop so that a run that failed
-- midway (leaving an invalid index) is simply run again.
ALTER TABLE {schema}.tasks VALIDATE CONSTRAINT tasks_priority_check;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_unique;
CREATE UNIQUE INDEX CONCURRENTLY tasks_unique ON {schema}.tasks (type, unique_key)
    WHERE unique_key IS NOT NULL;
