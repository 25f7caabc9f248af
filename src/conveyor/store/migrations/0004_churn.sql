-- conveyor: no-transaction
-- A tasks table built for churn and retention (see docs/design/retention.md).
--
-- `status` leaves the full-table indexes: each state change wrote (status, id) and
-- (type, status, id) for every row ever kept. Two partial indexes replace them: one over the
-- live rows (queued, running), small whatever the table holds, and one over the finished rows
-- ordered by id, which serves the finished listings, the dead count and the janitor's
-- retention scan (ids are UUIDv7, so "created before the cutoff" is a range of it;
-- finished_at rides along so the scan filters on it without visiting the heap).
--
-- Built CONCURRENTLY (writes go on meanwhile); each build is preceded by a drop, so a run
-- that failed midway (leaving an invalid index) is simply run again.
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_live;
CREATE INDEX CONCURRENTLY tasks_live ON {schema}.tasks (type, status, id)
    WHERE status IN ('queued', 'running');
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_finished;
CREATE INDEX CONCURRENTLY tasks_finished ON {schema}.tasks (type, status, id)
    INCLUDE (finished_at) WHERE status IN ('succeeded', 'dead', 'cancelled');
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_status_id;
DROP INDEX CONCURRENTLY IF EXISTS {schema}.tasks_type_status_id;
-- Vacuum after 1 % of the rows changed rather than 20 %, so the dead versions that updates and
-- the janitor's deletes leave are reclaimed while they are few and the visibility map stays
-- fresh for the index-only counts. (No fillfactor below 100: nearly every row is a finished
-- one that is never updated again, and the space held back on its page would be lost; see
-- the design notes for the figures.) SET (...) takes a SHARE UPDATE EXCLUSIVE lock: reads
-- and writes go on.
ALTER TABLE {schema}.tasks SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);
