-- The trace context of the span that enqueued a task (W3C `traceparent`, and `tracestate` when
-- there is one), as the propagator writes it: {"traceparent": "00-…-…-01"}. NULL when tracing
-- is off. Kept with the task so every attempt, after a retry, a rebalance or a relay's
-- republish, is a child of the request that enqueued it. Owned by conveyor/tracing.py.
ALTER TABLE {schema}.tasks ADD COLUMN trace_context jsonb;
