//! Conformance checks: every outbox message of an operation carries the trace
//! context recorded with the operation, however much later it is queued.

use std::collections::BTreeMap;

use uuid::Uuid;

use koan_coordinator::store::{NewBackup, NewVerify, StateStore};
use koan_protocol::commands::RestoreMode;
use koan_protocol::trace::TraceContext;

use super::*;

const BACKUP_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const VERIFY_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

pub async fn outbox_messages_carry_their_operations_trace<S: StateStore>(store: &S) {
    let traced = TraceContext::new(BACKUP_TRACE, Some("vendor=a")).unwrap();
    let operation_id = Uuid::now_v7();
    store
        .submit_backup(&NewBackup {
            operation_id,
            command_id: None,
            plan: plan(),
            labels: BTreeMap::new(),
            description: None,
            trace: Some(traced.clone()),
        })
        .await
        .unwrap();
    let untraced = submit(store).await;

    // Queued at submission, then by reports, by lease expiry and by the last chunk.
    changes(store, planned(operation_id, "orders", 2)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    assert!(
        claim(store, operation_id, "invoices", 0, 1, "r0")
            .await
            .granted
    );
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(store.reap_expired_leases(later).await.unwrap(), 1);
    for (entity, chunk, attempt) in [("orders", 0, 1), ("orders", 1, 1), ("invoices", 0, 2)] {
        assert!(
            claim(store, operation_id, entity, chunk, attempt, "r1")
                .await
                .granted
        );
        let last_key = format!("{entity}-{chunk}");
        changes(
            store,
            part(operation_id, entity, chunk, 0, "r1", 100, &last_key),
        )
        .await;
        changes(store, done(operation_id, entity, chunk, "r1", 1)).await;
    }
    let messages = drain(store, 500).await;
    let of = |id: Uuid| -> Vec<&OutboxMessage> {
        messages
            .iter()
            .filter(|message| operation_of(message) == id)
            .collect()
    };
    let traced_messages = of(operation_id);
    let kinds: Vec<&str> = traced_messages
        .iter()
        .map(|message| message.kind.as_str())
        .collect();
    for kind in ["plan_entity", "export_chunk", "finalize", "progress"] {
        assert!(kinds.contains(&kind), "{kind} queued: {kinds:?}");
    }
    let exports = kinds.iter().filter(|kind| **kind == "export_chunk").count();
    assert_eq!(
        exports, 4,
        "3 chunks and one re-published after its lease: {kinds:?}"
    );
    for message in &traced_messages {
        assert_eq!(message.trace.as_ref(), Some(&traced), "{}", message.kind);
    }
    let untraced_messages = of(untraced);
    assert!(!untraced_messages.is_empty());
    for message in untraced_messages {
        assert_eq!(message.trace, None, "{}", message.kind);
    }
}

pub async fn restores_and_verifies_carry_their_own_trace<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let source = store.backup_source(backup_id).await.unwrap().unwrap();
    let traced = TraceContext::new(VERIFY_TRACE, None).unwrap();
    let verify_id = Uuid::now_v7();
    store
        .submit_verify(&NewVerify {
            operation_id: verify_id,
            command_id: None,
            backup: source,
            trace: Some(traced.clone()),
        })
        .await
        .unwrap();
    let restore_id = restore(store, backup_id, RestoreMode::Merge, &[], None).await;
    let messages = drain(store, 100).await;
    let verify_job = messages
        .iter()
        .find(|message| message.kind == "verify_backup")
        .expect("verify job queued");
    assert_eq!(operation_of(verify_job), verify_id);
    assert_eq!(verify_job.trace.as_ref(), Some(&traced));
    let restore_job = messages
        .iter()
        .find(|message| message.kind == "plan_restore")
        .expect("restore job queued");
    assert_eq!(operation_of(restore_job), restore_id);
    assert_eq!(
        restore_job.trace, None,
        "the restore was submitted without a trace"
    );
}

/// The operation a queued job or event belongs to.
fn operation_of(message: &OutboxMessage) -> Uuid {
    if message.exchange == koan_protocol::topology::JOBS_EXCHANGE {
        koan_protocol::decode::<Job>(&message.payload)
            .expect("job decodes")
            .operation_id()
    } else {
        koan_protocol::decode::<OperationEvent>(&message.payload)
            .expect("event decodes")
            .report()
            .operation_id
    }
}
