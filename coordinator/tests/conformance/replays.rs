//! Conformance checks for replays at the state store: a restore's failed
//! rows written again in batches, each outcome applied once, no duplicates.

use uuid::Uuid;

use koan_coordinator::store::{NewReplay, OperationRole, ReplaySubmission, StateStore};
use koan_protocol::commands::RestoreMode;
use koan_protocol::jobs::Job;
use koan_protocol::progress::{OperationKind, OperationState};

use super::*;

async fn replay<S: StateStore>(store: &S, restore_id: Uuid) -> ReplaySubmission {
    store
        .submit_replay(&NewReplay {
            operation_id: Uuid::now_v7(),
            command_id: None,
            restore_id,
            trace: None,
        })
        .await
        .expect("submit replay")
}

fn submitted(submission: ReplaySubmission) -> Uuid {
    match submission {
        ReplaySubmission::Submitted(submitted) => {
            assert!(!submitted.existing);
            submitted.operation_id
        }
        refused => panic!("replay refused: {refused:?}"),
    }
}

fn refused(submission: ReplaySubmission) -> (&'static str, String) {
    match submission {
        ReplaySubmission::Refused { code, error } => (code, error),
        other => panic!("replay not refused: {other:?}"),
    }
}

pub async fn replay_resolves_without_duplicates<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::Replace, &[], None).await;
    changes(
        store,
        restore_planned(restore_id, &[("orders", 1), ("invoices", 1)], true),
    )
    .await;
    let failures = vec![
        row_failure("orders", "a", "constraint_violation"),
        row_failure("orders", "b", "constraint_violation"),
    ];
    changes(store, imported(restore_id, "orders", 0, 48, failures)).await;
    let failures = vec![row_failure("invoices", "c", "unparsable_line")];
    changes(store, imported(restore_id, "invoices", 0, 49, failures)).await;
    let (code, error) = refused(replay(store, restore_id).await);
    assert_eq!(code, "restore_running", "{error}");
    changes(store, applied(restore_id, "orders", 48, Vec::new())).await;
    changes(store, applied(restore_id, "invoices", 49, Vec::new())).await;
    assert_eq!(
        report(store, restore_id).await.state,
        OperationState::Completed
    );
    drain(store, 1000).await;
    let ids: Vec<i64> = store
        .diagnostics(restore_id, false, 100)
        .await
        .unwrap()
        .iter()
        .map(|row| row.id)
        .collect();
    let [a, b, c] = ids[..] else {
        panic!("three diagnostics expected, got {ids:?}")
    };

    let replay_id = submitted(replay(store, restore_id).await);
    let again = store
        .submit_replay(&NewReplay {
            operation_id: replay_id,
            command_id: None,
            restore_id,
            trace: None,
        })
        .await
        .unwrap();
    assert_eq!(
        again,
        ReplaySubmission::Submitted(koan_coordinator::store::Submitted {
            operation_id: replay_id,
            existing: true
        })
    );
    let messages = drain(store, 100).await;
    let batches: Vec<_> = jobs(&messages)
        .into_iter()
        .map(|(pool, job)| match job {
            Job::Replay(replay) => {
                assert_eq!(replay.operation_id, replay_id);
                assert_eq!(replay.restore_id, restore_id);
                assert_eq!(
                    replay.target.mode,
                    RestoreMode::Overwrite,
                    "replace replays as overwrite"
                );
                assert_eq!(replay.target.target_scope.as_deref(), Some("tenant-z"));
                assert_eq!(replay.target.staging_table, None);
                assert_eq!(replay.entity.key_type, Some(KeyType::Text), "archived spec");
                let first_key = if replay.entity.name == "orders" {
                    "a"
                } else {
                    "c"
                };
                assert_eq!(replay.lines[0].line, format!("{{\"id\":\"{first_key}\"}}"));
                let lines: Vec<_> = replay.lines.iter().map(|line| line.diagnostic_id).collect();
                (pool, replay.entity.name, lines)
            }
            other => panic!("expected replay_rows, got {other:?}"),
        })
        .collect();
    assert_eq!(
        batches,
        [
            ("default".to_string(), "orders".to_string(), vec![a, b]),
            ("billing".to_string(), "invoices".to_string(), vec![c]),
        ]
    );
    let started = report(store, replay_id).await;
    assert_eq!(started.kind, OperationKind::Restore);
    assert_eq!(started.state, OperationState::Running);
    assert_eq!(started.mode.as_deref(), Some("overwrite"));
    assert_eq!(started.source_operation, Some(restore_id));
    assert_eq!((started.rows_total, started.chunks_total), (3, 2));
    assert_eq!(
        store.operation(replay_id).await.unwrap().unwrap().role,
        OperationRole::Replay
    );

    // A report naming a diagnostic this replay does not carry is refused.
    let error = store
        .apply(&replay_done(replay_id, &[c + 1_000], &[]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");

    changes(store, replay_done(replay_id, &[a], &[b])).await;
    ignored(store, replay_done(replay_id, &[a], &[b])).await;
    let halfway = report(store, replay_id).await;
    assert_eq!(
        (
            halfway.rows_done,
            halfway.rows_written,
            halfway.rows_failed,
            halfway.chunks_done
        ),
        (2, 1, 1, 1)
    );
    assert_eq!(halfway.percent, 66.0);
    // A redelivered batch found `b` writable after all: resolved replaces failed.
    changes(store, replay_done(replay_id, &[a, b], &[])).await;
    let upgraded = report(store, replay_id).await;
    assert_eq!(
        (
            upgraded.rows_done,
            upgraded.rows_written,
            upgraded.rows_failed
        ),
        (2, 2, 0)
    );
    changes(store, replay_done(replay_id, &[], &[c])).await;
    let done = report(store, replay_id).await;
    assert_eq!(done.state, OperationState::Completed);
    assert_eq!(done.percent, 100.0);
    assert_eq!(
        (done.rows_done, done.rows_written, done.rows_failed),
        (3, 2, 1)
    );
    assert_events_monotonic_to_100(&drain(store, 1000).await);

    let unresolved = store.diagnostics(restore_id, false, 100).await.unwrap();
    assert_eq!(unresolved.len(), 1);
    assert_eq!(unresolved[0].id, c);
    assert_eq!(unresolved[0].failure.code, "still_broken");
    assert!(
        unresolved[0]
            .failure
            .reason
            .contains("order_status_allowed")
    );
    assert_eq!(
        unresolved[0].failure.key.as_deref(),
        Some("c"),
        "the key is kept"
    );
    assert_eq!(
        unresolved[0].failure.line, "{\"id\":\"c\"}",
        "the raw line is kept"
    );
    let all = store.diagnostics(restore_id, true, 100).await.unwrap();
    let resolved: Vec<_> = all.iter().map(|row| (row.id, row.resolved)).collect();
    assert_eq!(resolved, [(a, true), (b, true), (c, false)]);

    // Replaying again carries only what is still unresolved, then nothing.
    let second = submitted(replay(store, restore_id).await);
    let queued = jobs(&drain(store, 100).await);
    let [(_, Job::Replay(job))] = queued.as_slice() else {
        panic!("one replay job expected, got {queued:?}")
    };
    assert_eq!(job.lines.len(), 1);
    assert_eq!(job.lines[0].diagnostic_id, c);
    changes(store, replay_done(second, &[c], &[])).await;
    assert_eq!(report(store, second).await.state, OperationState::Completed);
    assert!(
        store
            .diagnostics(restore_id, false, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        refused(replay(store, restore_id).await).0,
        "nothing_to_replay"
    );
    assert_eq!(refused(replay(store, backup_id).await).0, "not_a_restore");
    assert_eq!(refused(replay(store, second).await).0, "not_a_restore");
    assert_eq!(
        refused(replay(store, Uuid::now_v7()).await).0,
        "unknown_operation"
    );
}

pub async fn replays_are_batched_per_entity<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::Merge, &["orders"], None).await;
    changes(store, restore_planned(restore_id, &[("orders", 12)], false)).await;
    for unit in 0..12 {
        let failures = (0..50)
            .map(|row| row_failure("orders", &format!("k{unit}-{row}"), "type_mismatch"))
            .collect();
        changes(store, imported(restore_id, "orders", unit, 0, failures)).await;
    }
    assert_eq!(report(store, restore_id).await.rows_failed, 600);
    drain(store, 1000).await;
    let replay_id = submitted(replay(store, restore_id).await);
    let queued = jobs(&drain(store, 1000).await);
    let sizes: Vec<usize> = queued
        .iter()
        .map(|(_, job)| match job {
            Job::Replay(replay) => {
                assert_eq!(replay.target.mode, RestoreMode::Merge);
                replay.lines.len()
            }
            other => panic!("expected replay_rows, got {other:?}"),
        })
        .collect();
    assert_eq!(sizes, [500, 100]);
    assert_eq!(report(store, replay_id).await.chunks_total, 2);
}
