-- conveyor: no-transaction
-- The scans of 0007_workflows, each outside a transaction so that writes to the tasks table go
-- on meanwhile: the two checks 0007 added NOT VALID are validated (a SHARE UPDATE EXCLUSIVE
-- lock), and the indexes are built CONCURRENTLY, each preceded by a drop so that a run that
-- failed midway (leaving an invalid index) is simply run again. Validating an already valid
-- check is a no-op.
ALTER TABLE {schema}.tasks VALIDATE CONSTRAINT tasks_status_check;
ALTER TABLE {schema}.tasks VALIDATE CONSTRAINT tasks_on_upstream_failure_check;
-- A workflow's nodes, a parent's children, the waiting tasks: each a few rows of a big table.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_workflow;
CREATE INDEX CONCURRENTLY tasks_workflow ON {schema}.tasks (workflow_id)
    WHERE workflow_id IS NOT NULL;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_parent;
CREATE INDEX CONCURRENTLY tasks_parent ON {schema}.tasks (parent_id)
    WHERE parent_id IS NOT NULL;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_waiting;
CREATE INDEX CONCURRENTLY tasks_waiting ON {schema}.tasks (type, status, id)
    WHERE status = 'waiting';
