// Every conformance check, listed once. `pg_store.rs` and `sqlite_store.rs`
// `include!` this file, so a check added here runs on every backend.
//
// `for_each_conformance_check!(store, commands)` invokes the macro `store`
// with the checks that take `&S`, and the macro `commands` with those that
// take `Arc<S>` (they drive the store through `Commands`). Each backend's
// test file defines both macros: how it builds a fresh store per check.
macro_rules! for_each_conformance_check {
    ($store:ident, $commands:ident) => {
        $store! {
            checks::submission_is_idempotent,
            checks::entity_planned_twice_creates_chunks_once,
            checks::stale_runs_are_fenced,
            checks::claim_rules,
            checks::outbox_keeps_order,
            flows::percent_is_monotonic_and_100_only_at_completion,
            flows::manifest_is_assembled_from_accepted_parts,
            flows::failures_fail_the_operation,
            flows::expired_leases_republish_with_the_next_attempt,
            flows::empty_entities_finalize_at_once,
            lifecycle::pause_resume_and_cancel_are_idempotent,
            flows::parts_may_arrive_after_chunk_done,
            batches::chunk_done_with_its_part_applies_once,
            batches::a_batch_applies_each_report_as_alone,
            restores::restore_planned_twice_creates_units_once,
            restores::part_imported_twice_counts_once,
            restores::diagnostics_are_recorded_and_listed,
            replays::replay_resolves_without_duplicates,
            replays::replays_are_batched_per_entity,
            restores::replace_mode_applies_each_entity,
            restores::restore_percent_is_monotonic_to_100,
            restores::empty_restores_complete_at_once,
            restores::import_failures_fail_the_restore,
            verifies::verify_done_with_and_without_problems,
            restores::reports_for_another_kind_are_invalid,
            dead_jobs::dead_lettered_jobs_fail_their_unit,
            workload::workload_per_pool_and_ended_operations_once,
            traces::outbox_messages_carry_their_operations_trace,
            traces::restores_and_verifies_carry_their_own_trace,
        }
        $commands! {
            requests::unknown_backups_are_refused,
            requests::cross_scope_restores_are_refused,
            requests::diagnostics_and_replays_by_command,
        }
    };
}
