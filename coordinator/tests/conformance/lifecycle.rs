//! Conformance checks: pause, resume and cancel are idempotent and move the
//! state only forward; claims are refused while paused or cancelled; a resume
//! re-publishes every unfinished chunk with the next attempt.

use uuid::Uuid;

use koan_coordinator::store::{Lifecycle, StateStore};
use koan_protocol::jobs::Job;
use koan_protocol::progress::OperationState;

use super::*;

fn refused_code(outcome: Lifecycle) -> &'static str {
    match outcome {
        Lifecycle::Refused { code, .. } => code,
        Lifecycle::Done { existing } => {
            panic!("expected a refusal, got done (existing {existing})")
        }
    }
}

pub async fn pause_resume_and_cancel_are_idempotent<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 3)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    let granted = claim(store, operation_id, "orders", 0, 1, "r1").await;
    assert!(granted.granted);
    changes(
        store,
        part(operation_id, "orders", 0, 0, "r1", 100, "k0100"),
    )
    .await;
    drain(store, 1_000).await;

    assert_eq!(
        store.pause(operation_id).await.unwrap(),
        Lifecycle::Done { existing: false }
    );
    assert_eq!(
        store.pause(operation_id).await.unwrap(),
        Lifecycle::Done { existing: true }
    );
    let paused = report(store, operation_id).await;
    assert_eq!(paused.state, OperationState::Paused);
    assert!(paused.continuation_token.is_some());
    let announced = events(&drain(store, 1_000).await);
    assert!(
        announced
            .iter()
            .any(|event| matches!(event, OperationEvent::Paused(_))),
        "a paused event is queued"
    );
    let refused = claim(store, operation_id, "orders", 1, 1, "r2").await;
    assert_eq!(
        (refused.granted, refused.reason.as_deref()),
        (false, Some("paused"))
    );

    assert_eq!(
        store.resume(operation_id).await.unwrap(),
        Lifecycle::Done { existing: false }
    );
    assert_eq!(
        store.resume(operation_id).await.unwrap(),
        Lifecycle::Done { existing: true }
    );
    assert_eq!(
        report(store, operation_id).await.state,
        OperationState::Running
    );
    let republished = jobs(&drain(store, 1_000).await);
    let exports: Vec<(String, u32, u32, Option<String>)> = republished
        .iter()
        .filter_map(|(_, job)| match job {
            Job::ExportChunk(export) => Some((
                export.entity.name.clone(),
                export.chunk,
                export.attempt,
                export.snapshot_id.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        exports.len(),
        4,
        "every unfinished chunk, once: {exports:?}"
    );
    assert!(
        exports
            .iter()
            .all(|(_, _, attempt, snapshot)| *attempt == 2 && snapshot.is_none()),
        "{exports:?}"
    );
    // The resumed chunk continues after its durable part.
    let resumed = claim(store, operation_id, "orders", 0, 2, "r3").await;
    assert!(resumed.granted);
    assert_eq!(resumed.resume_after.map(|point| point.next_part), Some(1));

    assert_eq!(
        store.cancel(operation_id).await.unwrap(),
        Lifecycle::Done { existing: false }
    );
    assert_eq!(
        store.cancel(operation_id).await.unwrap(),
        Lifecycle::Done { existing: true }
    );
    let cancelled = drain(store, 1_000).await;
    let discards: Vec<_> = jobs(&cancelled)
        .into_iter()
        .filter_map(|(pool, job)| match job {
            Job::Discard(discard) => Some((pool, discard.prefixes)),
            _ => None,
        })
        .collect();
    assert_eq!(discards.len(), 1, "one discard job");
    assert_eq!(discards[0].0, "default");
    assert_eq!(discards[0].1.len(), 2, "{:?}", discards[0].1);
    assert!(
        events(&cancelled)
            .iter()
            .any(|event| matches!(event, OperationEvent::Cancelled(_)))
    );
    assert_eq!(
        report(store, operation_id).await.state,
        OperationState::Cancelled
    );
    let late = claim(store, operation_id, "orders", 1, 2, "r4").await;
    assert_eq!(late.reason.as_deref(), Some("cancelled"));
    ignored(
        store,
        part(operation_id, "orders", 0, 1, "r3", 100, "k0200"),
    )
    .await;
    assert_eq!(
        refused_code(store.pause(operation_id).await.unwrap()),
        "not_running"
    );
    assert_eq!(
        refused_code(store.resume(operation_id).await.unwrap()),
        "not_paused"
    );
    assert_eq!(
        refused_code(store.cancel(Uuid::now_v7()).await.unwrap()),
        "unknown_operation"
    );
}
