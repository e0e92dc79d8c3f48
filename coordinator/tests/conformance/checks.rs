//! Conformance checks: idempotent submission and planning, fencing, claims, outbox order.

use std::collections::BTreeMap;

use uuid::Uuid;

use koan_coordinator::store::{NewBackup, StateStore};
use koan_protocol::jobs::Job;
use koan_protocol::progress::OperationState;

use super::*;

pub async fn submission_is_idempotent<S: StateStore>(store: &S) {
    let operation_id = Uuid::now_v7();
    let backup = NewBackup {
        operation_id,
        command_id: Some("message-1".into()),
        plan: plan(),
        labels: BTreeMap::from([("env".to_string(), "test".to_string())]),
        description: Some("nightly".into()),
        trace: None,
    };
    let first = store.submit_backup(&backup).await.unwrap();
    assert_eq!((first.operation_id, first.existing), (operation_id, false));
    let again = store.submit_backup(&backup).await.unwrap();
    assert_eq!((again.operation_id, again.existing), (operation_id, true));

    // A redelivered command without a client id finds its operation by message id.
    assert_eq!(
        store
            .find_submission(None, Some("message-1"))
            .await
            .unwrap(),
        Some(operation_id)
    );
    assert_eq!(
        store
            .find_submission(Some(operation_id), None)
            .await
            .unwrap(),
        Some(operation_id)
    );
    assert_eq!(
        store
            .find_submission(Some(Uuid::now_v7()), Some("other"))
            .await
            .unwrap(),
        None
    );
    let redelivered = NewBackup {
        operation_id: Uuid::now_v7(),
        ..backup.clone()
    };
    let found = store.submit_backup(&redelivered).await.unwrap();
    assert_eq!((found.operation_id, found.existing), (operation_id, true));

    let messages = drain(store, 100).await;
    let jobs = jobs(&messages);
    assert_eq!(jobs.len(), 2, "one plan job per entity, once");
    let pools: Vec<_> = jobs.iter().map(|(pool, _)| pool.as_str()).collect();
    assert_eq!(pools, ["default", "billing"]);
    for (_, job) in &jobs {
        let Job::PlanEntity(plan_job) = job else {
            panic!("expected plan_entity, got {job:?}")
        };
        assert_eq!(plan_job.operation_id, operation_id);
        assert_eq!(plan_job.backup_id, operation_id);
        assert_eq!(plan_job.plan_id, "orders:daily");
    }
    let events = events(&messages);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].report().state, OperationState::Planning);
    assert_eq!(events[0].report().percent, 0.0);

    let report = report(store, operation_id).await;
    assert_eq!(report.backup_id, Some(operation_id));
    assert_eq!(report.labels.get("env").map(String::as_str), Some("test"));
    assert_eq!(report.description.as_deref(), Some("nightly"));
    let states: Vec<_> = report
        .entities
        .iter()
        .map(|e| (e.name.as_str(), e.state.as_str()))
        .collect();
    assert_eq!(states, [("orders", "planning"), ("invoices", "planning")]);
    assert!(report.continuation_token.is_some());
    assert!(store.report(Uuid::now_v7()).await.unwrap().is_none());
}

pub async fn entity_planned_twice_creates_chunks_once<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    drain(store, 100).await;
    changes(store, planned(operation_id, "orders", 3)).await;
    ignored(store, planned(operation_id, "orders", 5)).await;
    let report = report(store, operation_id).await;
    assert_eq!(report.chunks_total, 3);
    assert_eq!(report.rows_total, 300);
    assert_eq!(
        report.state,
        OperationState::Planning,
        "invoices still planning"
    );
    assert_eq!(report.percent, 0.0);
    let jobs = jobs(&drain(store, 100).await);
    assert_eq!(jobs.len(), 3, "one export job per chunk, once");
    for (chunk, (pool, job)) in jobs.iter().enumerate() {
        let Job::ExportChunk(export) = job else {
            panic!("expected export_chunk, got {job:?}")
        };
        assert_eq!(pool, "default");
        assert_eq!(export.chunk as usize, chunk);
        assert_eq!(export.attempt, 1);
        assert_eq!(export.part_bytes, 1024 * 1024);
        assert_eq!(export.snapshot_id.as_deref(), Some("00000003-orders"));
        assert_eq!(
            export.entity.key_type,
            Some(koan_protocol::plan::KeyType::Text)
        );
    }
    // A redelivered plan job failing for a planned entity fails nothing.
    ignored(store, entity_failed(operation_id, "orders")).await;
    // Ranges that leave rows out are refused, and change nothing.
    let mut gap = planned(operation_id, "invoices", 3);
    if let koan_protocol::events::WorkerEvent::EntityPlanned(event) = &mut gap {
        event.ranges.remove(1);
    }
    let error = store.apply(&gap).await.unwrap_err();
    assert_eq!(error.code(), "invalid_report", "{error}");
    changes(store, planned(operation_id, "invoices", 1)).await;
    let report = super::report(store, operation_id).await;
    assert_eq!(report.state, OperationState::Running);
    assert_eq!((report.chunks_total, report.rows_total), (4, 400));
}

pub async fn stale_runs_are_fenced<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 1)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;

    let first = claim(store, operation_id, "orders", 0, 1, "runa").await;
    assert!(first.granted);
    assert_eq!(first.resume_after, None);
    assert_eq!(first.lease_seconds, 30);
    changes(store, part(operation_id, "orders", 0, 0, "runa", 30, "k30")).await;
    ignored(store, part(operation_id, "orders", 0, 0, "runa", 30, "k30")).await;
    changes(store, progress(operation_id, "orders", 0, "runa", 20)).await;
    assert_eq!(report(store, operation_id).await.rows_done, 50);

    // The broker redelivered the job: run B supersedes run A and resumes after part 0.
    let second = claim(store, operation_id, "orders", 0, 1, "runb").await;
    assert!(second.granted);
    let resume = second.resume_after.expect("resume point");
    assert_eq!(
        (resume.last_key.as_str(), resume.next_part, resume.rows),
        ("k30", 1, 30)
    );
    assert_eq!(
        report(store, operation_id).await.rows_done,
        30,
        "run A's streamed rows are gone"
    );

    ignored(store, part(operation_id, "orders", 0, 1, "runa", 70, "k99")).await;
    ignored(store, progress(operation_id, "orders", 0, "runa", 50)).await;
    ignored(store, done(operation_id, "orders", 0, "runa", 2)).await;
    ignored(
        store,
        chunk_failed(operation_id, "orders", 0, "runa", false),
    )
    .await;
    let report_now = report(store, operation_id).await;
    assert_eq!(report_now.rows_done, 30);
    assert_eq!(report_now.chunks_done, 0);
    assert_eq!(report_now.state, OperationState::Running);

    changes(store, part(operation_id, "orders", 0, 1, "runb", 70, "k99")).await;
    changes(store, done(operation_id, "orders", 0, "runb", 2)).await;
    let report_now = report(store, operation_id).await;
    assert_eq!((report_now.rows_done, report_now.chunks_done), (100, 1));
    assert_eq!(report_now.entities[0].state, "done");

    // A part outside the layout is refused, not recorded.
    let mut hostile = part(operation_id, "invoices", 0, 0, "runc", 1, "x");
    assert!(
        claim(store, operation_id, "invoices", 0, 1, "runc")
            .await
            .granted
    );
    if let koan_protocol::events::WorkerEvent::PartWritten(written) = &mut hostile {
        written.part.path = "../../elsewhere/part.jsonl.zst".into();
    }
    let error = store.apply(&hostile).await.unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    assert!(error.to_string().contains("elsewhere"), "{error}");
}

pub async fn claim_rules<S: StateStore>(store: &S) {
    let unknown = claim(store, Uuid::now_v7(), "orders", 0, 1, "r1").await;
    assert!(!unknown.granted);
    assert!(unknown.reason.unwrap().contains("unknown operation"));

    let operation_id = submit(store).await;
    let not_planned = claim(store, operation_id, "orders", 0, 1, "r1").await;
    assert!(!not_planned.granted);
    assert!(not_planned.reason.unwrap().contains("no chunk 0"));

    changes(store, planned(operation_id, "orders", 2)).await;
    assert!(
        !claim(store, operation_id, "orders", 7, 1, "r1")
            .await
            .granted
    );
    assert!(!claim(store, operation_id, "nope", 0, 1, "r1").await.granted);
    // Claims are granted while other entities are still planning.
    assert!(
        claim(store, operation_id, "orders", 0, 2, "r1")
            .await
            .granted
    );
    // Attempt 2 owns it now: a redelivery of attempt 1 is refused.
    let superseded = claim(store, operation_id, "orders", 0, 1, "r2").await;
    assert!(!superseded.granted);
    assert!(superseded.reason.unwrap().contains("superseded"));
    // The same run claiming again (a retried request) is granted.
    assert!(
        claim(store, operation_id, "orders", 0, 2, "r1")
            .await
            .granted
    );

    changes(store, part(operation_id, "orders", 0, 0, "r1", 100, "k")).await;
    changes(store, done(operation_id, "orders", 0, "r1", 1)).await;
    let finished = claim(store, operation_id, "orders", 0, 3, "r3").await;
    assert!(!finished.granted);
    assert!(finished.reason.unwrap().contains("done"));

    changes(store, entity_failed(operation_id, "invoices")).await;
    let failed = claim(store, operation_id, "orders", 1, 1, "r4").await;
    assert!(!failed.granted);
    assert!(failed.reason.unwrap().contains("failed"));
}

pub async fn outbox_keeps_order<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 5)).await;
    changes(store, planned(operation_id, "invoices", 2)).await;

    // A sink that refuses after 3 messages: those 3 are gone, the rest stay, in order.
    let refusing = crate::common::Recorder {
        fail_after: Some(3),
        ..Default::default()
    };
    assert!(store.drain_outbox(&refusing, 100).await.is_err());
    let first = refusing.taken();
    assert_eq!(first.len(), 3);

    let rest = drain(store, 2).await;
    let all: Vec<_> = first.iter().chain(rest.iter()).collect();
    assert!(
        all.windows(2).all(|pair| pair[0].id < pair[1].id),
        "published in id order"
    );
    let mut message_ids: Vec<_> = all.iter().map(|message| message.message_id).collect();
    message_ids.sort();
    message_ids.dedup();
    assert_eq!(message_ids.len(), all.len(), "each message once");

    // Causal order: plan jobs, then the events and export jobs of each report.
    let kinds: Vec<_> = all.iter().map(|message| message.kind.as_str()).collect();
    assert_eq!(&kinds[..3], ["plan_entity", "plan_entity", "progress"]);
    let orders_exports = kinds[3..]
        .iter()
        .take_while(|kind| **kind == "export_chunk")
        .count();
    assert_eq!(orders_exports, 5);
    assert_eq!(jobs(&rest).len() + jobs(&first.clone()).len(), 2 + 5 + 2);
    let sequences: Vec<_> = events(&all.into_iter().cloned().collect::<Vec<_>>())
        .iter()
        .map(|event| event.report().sequence)
        .collect();
    assert!(
        sequences.windows(2).all(|pair| pair[0] < pair[1]),
        "{sequences:?}"
    );
    assert!(drain(store, 10).await.is_empty());
}
