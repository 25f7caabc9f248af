"""The core contract, run again on a Redis Cluster (3 masters, 3 replicas): the tests below are
the single-Redis ones, collected here once more, with `settings` naming a cluster node (see
this directory's conftest). Enqueue and run, retries, dead letters, drain, duplicate and
undecodable messages, the Lua scripts, rebalance after a worker's death, and the relay after
a publish that never happened or a FLUSHALL (which the cluster client sends to every
master)."""

from __future__ import annotations

import pytest

from tests.integration.api import test_results as results
from tests.integration.cron import test_rebalance as rebalance
from tests.integration.cron import test_relay as relay
from tests.integration.queue import test_streams as streams
from tests.integration.worker import test_worker as worker

pytestmark = pytest.mark.slow

# enqueue, run, retry, dead letters, drain
test_never_more_handlers_than_concurrency = worker.test_never_more_handlers_than_concurrency
test_failure_is_retried_with_backoff_until_it_succeeds = (
    worker.test_failure_is_retried_with_backoff_until_it_succeeds)
test_always_failing_task_goes_dead_then_retry_brings_it_back = (
    worker.test_always_failing_task_goes_dead_then_retry_brings_it_back)
test_fail_is_dead_at_once = worker.test_fail_is_dead_at_once
test_undecodable_and_unknown_messages_are_dead_lettered_not_retried = (
    worker.test_undecodable_and_unknown_messages_are_dead_lettered_not_retried)
test_a_duplicate_message_runs_the_task_once = worker.test_a_duplicate_message_runs_the_task_once
test_drain_finishes_in_flight_work_and_acks_it = (
    worker.test_drain_finishes_in_flight_work_and_acks_it)

# the scripts: forward due delayed tasks, re-queue or dead-letter claimed entries
test_forward_moves_only_due_members_oldest_first = (
    streams.test_forward_moves_only_due_members_oldest_first)
test_forward_leaves_other_types_alone = streams.test_forward_leaves_other_types_alone
test_requeue_readds_with_one_more_requeue_and_acks_and_deletes_the_originals = (
    streams.test_requeue_readds_with_one_more_requeue_and_acks_and_deletes_the_originals)
test_requeue_dead_letters_past_the_limit = streams.test_requeue_dead_letters_past_the_limit
test_requeue_of_more_than_one_script_call_handles_every_entry = (
    streams.test_requeue_of_more_than_one_script_call_handles_every_entry)

# rebalance: a dead worker's messages go to a live one; one that keeps failing is dead-lettered
test_messages_of_a_dead_worker_are_handed_to_a_live_one = (
    rebalance.test_messages_of_a_dead_worker_are_handed_to_a_live_one)
test_a_live_worker_keeps_its_running_task_and_loses_what_it_never_started = (
    rebalance.test_a_live_worker_keeps_its_running_task_and_loses_what_it_never_started)
test_a_message_that_keeps_losing_workers_is_dead_lettered = (
    rebalance.test_a_message_that_keeps_losing_workers_is_dead_lettered)
test_trim_drops_acked_entries_only = rebalance.test_trim_drops_acked_entries_only

# relay: what Postgres committed reaches Redis after a lost publish or a lost dataset
test_tasks_committed_but_never_published_are_relayed = (
    relay.test_tasks_committed_but_never_published_are_relayed)
test_flushall_loses_nothing = relay.test_flushall_loses_nothing
test_running_task_of_a_dead_worker_whose_message_was_lost_is_requeued = (
    relay.test_running_task_of_a_dead_worker_whose_message_was_lost_is_requeued)

# results: waiting fed by the events stream, a running task's cancel over pub/sub (PUBLISH
# reaches every node's subscribers), and the task's event stream
client, quick, service = results.client, results.quick, results.service  # their fixtures
test_enqueue_and_wait_answers_with_the_final_task_across_retries = (
    results.test_enqueue_and_wait_answers_with_the_final_task_across_retries)
test_cancel_a_running_handler = results.test_cancel_a_running_handler
test_a_late_subscriber_gets_the_current_state_then_the_rest = (
    results.test_a_late_subscriber_gets_the_current_state_then_the_rest)
