//! Conformance checks for verifies at the state store: progress, and the
//! verdict with or without problems.

use uuid::Uuid;

use koan_coordinator::store::{NewVerify, StateStore};
use koan_protocol::archive::manifest_path;
use koan_protocol::jobs::Job;
use koan_protocol::progress::{OperationKind, OperationState};

use super::*;

pub async fn verify_done_with_and_without_problems<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let source = store.backup_source(backup_id).await.unwrap().unwrap();
    let whole = Uuid::now_v7();
    let submitted = store
        .submit_verify(&NewVerify {
            operation_id: whole,
            command_id: Some(format!("verify-{whole}")),
            backup: source.clone(),
            trace: None,
        })
        .await
        .unwrap();
    assert!(!submitted.existing);
    let again = store
        .submit_verify(&NewVerify {
            operation_id: whole,
            command_id: None,
            backup: source.clone(),
            trace: None,
        })
        .await
        .unwrap();
    assert!(again.existing);
    let messages = drain(store, 100).await;
    let queued = jobs(&messages);
    let [(pool, Job::Verify(job))] = queued.as_slice() else {
        panic!("one verify_backup job expected, got {queued:?}")
    };
    assert_eq!(pool, "default");
    assert_eq!(job.operation_id, whole);
    assert_eq!(job.backup_id, backup_id);
    assert_eq!(
        job.manifest_path,
        manifest_path(&plan(), backup_id).unwrap()
    );
    let started = report(store, whole).await;
    assert_eq!(started.kind, OperationKind::Verify);
    assert_eq!(started.source_operation, Some(backup_id));
    assert_eq!(started.mode, None);

    changes(store, verify_progress(whole, 2, 100)).await;
    ignored(store, verify_progress(whole, 1, 50)).await;
    let running = report(store, whole).await;
    assert_eq!(running.state, OperationState::Running);
    assert_eq!(
        (
            running.chunks_done,
            running.chunks_total,
            running.rows_done,
            running.rows_total
        ),
        (2, 6, 100, 300)
    );
    assert_eq!(running.percent, 33.0);
    changes(store, verify_done(whole, &[])).await;
    let completed = report(store, whole).await;
    assert_eq!(
        (completed.state, completed.percent),
        (OperationState::Completed, 100.0)
    );
    assert!(completed.problems.is_empty() && completed.error.is_none());
    assert_events_monotonic_to_100(&drain(store, 100).await);

    let broken = Uuid::now_v7();
    store
        .submit_verify(&NewVerify {
            operation_id: broken,
            command_id: None,
            backup: source.clone(),
            trace: None,
        })
        .await
        .unwrap();
    let problems = [
        "part a.jsonl.zst: blake3 differs from the manifest",
        "part b.jsonl.zst: missing",
        "part c.jsonl.zst: 49 rows, the manifest says 50",
        "part d.jsonl.zst: keys out of order",
    ];
    changes(store, verify_done(broken, &problems)).await;
    ignored(store, verify_done(broken, &[])).await;
    let failed = report(store, broken).await;
    assert_eq!(failed.state, OperationState::Failed);
    assert_eq!(failed.problems, problems);
    assert_eq!(
        failed.error.as_deref(),
        Some(
            "4 of 6 parts are bad: part a.jsonl.zst: blake3 differs from the manifest; \
             part b.jsonl.zst: missing; part c.jsonl.zst: 49 rows, the manifest says 50 \
             (and 1 more)"
        )
    );
    assert!(failed.percent < 100.0);

    let unreadable = Uuid::now_v7();
    store
        .submit_verify(&NewVerify {
            operation_id: unreadable,
            command_id: None,
            backup: source,
            trace: None,
        })
        .await
        .unwrap();
    changes(store, operation_failed(unreadable)).await;
    assert_eq!(
        report(store, unreadable).await.state,
        OperationState::Failed
    );
    let listed = store.list_reports(10).await.unwrap();
    let kinds: Vec<_> = listed.iter().map(|report| report.kind).collect();
    assert_eq!(
        kinds,
        [
            OperationKind::Verify,
            OperationKind::Verify,
            OperationKind::Verify,
            OperationKind::Backup
        ]
    );
}
