//! Conformance flows: percent, manifest, failures, leases, empty entities, event pacing.

use chrono::Utc;

use koan_coordinator::store::StateStore;
use koan_protocol::archive::manifest_path;
use koan_protocol::events::OperationEvent;
use koan_protocol::jobs::Job;
use koan_protocol::progress::OperationState;

use super::*;

pub async fn percent_is_monotonic_and_100_only_at_completion<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    let mut seen = vec![report(store, operation_id).await.percent];
    changes(store, planned(operation_id, "orders", 2)).await;
    seen.push(report(store, operation_id).await.percent);
    assert_eq!(seen.last(), Some(&0.0), "0 while an entity is planning");
    changes(store, planned(operation_id, "invoices", 1)).await;

    assert!(
        claim(store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    changes(store, progress(operation_id, "orders", 0, "r1", 90)).await;
    let streamed = report(store, operation_id).await;
    assert_eq!(streamed.percent, 29.7, "99 × 90 / 300");
    seen.push(streamed.percent);
    // The run is superseded: its streamed rows are lost, percent holds.
    assert!(
        claim(store, operation_id, "orders", 0, 1, "r2")
            .await
            .granted
    );
    let superseded = report(store, operation_id).await;
    assert_eq!(superseded.rows_done, 0);
    assert_eq!(superseded.percent, 29.7);
    seen.push(superseded.percent);

    for (entity, chunk) in [("orders", 0), ("orders", 1), ("invoices", 0)] {
        assert!(
            claim(store, operation_id, entity, chunk, 1, "r2")
                .await
                .granted
        );
        changes(store, part(operation_id, entity, chunk, 0, "r2", 100, "k")).await;
        seen.push(report(store, operation_id).await.percent);
        changes(store, done(operation_id, entity, chunk, "r2", 1)).await;
        seen.push(report(store, operation_id).await.percent);
    }
    let finalizing = report(store, operation_id).await;
    assert_eq!(finalizing.state, OperationState::Finalizing);
    assert_eq!(finalizing.percent, 99.0);
    assert!(seen.windows(2).all(|pair| pair[0] <= pair[1]), "{seen:?}");
    assert!(seen.iter().all(|percent| *percent < 100.0), "{seen:?}");

    ignored(store, finalize_failed(operation_id, true)).await;
    let path = manifest_path(&plan(), operation_id).unwrap();
    changes(store, manifest_written(operation_id, &path)).await;
    let completed = report(store, operation_id).await;
    assert_eq!(completed.state, OperationState::Completed);
    assert_eq!(completed.percent, 100.0);
    assert_eq!(completed.manifest.as_deref(), Some(path.as_str()));
    ignored(store, manifest_written(operation_id, &path)).await;

    let events = events(&drain(store, 1000).await);
    let last = events.last().expect("events");
    assert!(matches!(last, OperationEvent::Completed(report) if report.percent == 100.0));
    let percents: Vec<_> = events.iter().map(|event| event.report().percent).collect();
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "{percents:?}"
    );
    assert_eq!(
        percents.iter().filter(|percent| **percent == 100.0).count(),
        1
    );
}

pub async fn manifest_is_assembled_from_accepted_parts<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    let (pool, job) = run_to_finalizing(store, operation_id).await;
    assert_eq!(pool, "default", "the first entity's pool");
    let Job::Finalize(finalize) = job else {
        panic!("expected finalize")
    };
    assert_eq!(finalize.path, manifest_path(&plan(), operation_id).unwrap());
    let manifest = finalize.manifest;
    assert_eq!(manifest.format_version, 1);
    assert_eq!(manifest.backup_id, operation_id);
    assert_eq!(manifest.plan, plan());
    assert_eq!(manifest.labels.get("env").map(String::as_str), Some("test"));
    assert!(manifest.started_at <= manifest.completed_at);
    let names: Vec<_> = manifest
        .entities
        .iter()
        .map(|entity| entity.spec.name.as_str())
        .collect();
    assert_eq!(names, ["orders", "invoices"], "plan order");
    let snapshots: Vec<_> = manifest
        .consistency
        .snapshots
        .iter()
        .map(|s| s.entity.as_str())
        .collect();
    assert_eq!(snapshots, ["orders", "invoices"]);
    let orders = &manifest.entities[0];
    assert_eq!(
        orders.spec.key_type,
        Some(koan_protocol::plan::KeyType::Text)
    );
    assert_eq!(orders.rows, 200);
    assert_eq!(orders.chunks.len(), 2);
    assert_eq!(orders.chunks[0].range.lo, None);
    assert_eq!(orders.chunks[0].range.hi.as_deref(), Some("k0001"));
    assert_eq!(orders.chunks[1].range.lo.as_deref(), Some("k0001"));
    assert_eq!(orders.chunks[1].range.hi, None);
    let chunk = &orders.chunks[1];
    assert_eq!(chunk.rows, 100);
    let parts: Vec<_> = chunk
        .parts
        .iter()
        .map(|part| (part.part, part.rows))
        .collect();
    assert_eq!(parts, [(0, 60), (1, 40)]);
    assert_eq!(chunk.parts[1].last_key.as_deref(), Some("orders-1-b"));
    assert!(chunk.parts[0].path.ends_with("000001-0000-r1.jsonl.zst"));
    let totals = manifest.totals;
    assert_eq!(
        (totals.entities, totals.chunks, totals.parts, totals.rows),
        (2, 3, 6, 300)
    );
    assert_eq!((totals.raw_bytes, totals.compressed_bytes), (3000, 900));
    // The finalize job is queued once.
    changes(store, manifest_written(operation_id, &finalize.path)).await;
    assert!(jobs(&drain(store, 100).await).is_empty());
}

pub async fn failures_fail_the_operation<S: StateStore>(store: &S) {
    // A retryable failure leaves the chunk for the requeued job; a fatal one fails.
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 2)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    assert!(
        claim(store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    changes(store, progress(operation_id, "orders", 0, "r1", 50)).await;
    changes(store, chunk_failed(operation_id, "orders", 0, "r1", true)).await;
    let after_retryable = report(store, operation_id).await;
    assert_eq!(after_retryable.state, OperationState::Running);
    assert_eq!(after_retryable.rows_done, 0);
    ignored(store, progress(operation_id, "orders", 0, "r1", 60)).await;
    assert!(
        claim(store, operation_id, "orders", 0, 1, "r2")
            .await
            .granted
    );
    changes(store, chunk_failed(operation_id, "orders", 0, "r2", false)).await;
    let failed = report(store, operation_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.expect("error");
    assert!(error.contains("entity 'orders' chunk 0"), "{error}");
    assert!(error.contains("connection reset"), "{error}");
    ignored(store, part(operation_id, "orders", 1, 0, "r1", 1, "k")).await;
    let events = events(&drain(store, 1000).await);
    assert!(matches!(events.last(), Some(OperationEvent::Failed(_))));

    // Retries run out.
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 1)).await;
    for run in ["a1", "a2", "a3"] {
        assert!(
            claim(store, operation_id, "orders", 0, 1, run)
                .await
                .granted
        );
        changes(store, chunk_failed(operation_id, "orders", 0, run, true)).await;
    }
    let exhausted = report(store, operation_id).await;
    assert_eq!(exhausted.state, OperationState::Failed);
    assert!(exhausted.error.unwrap().contains("gave up after 3"));

    // An entity that cannot be planned fails the operation, naming it.
    let operation_id = submit(store).await;
    changes(store, entity_failed(operation_id, "invoices")).await;
    let failed = report(store, operation_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.unwrap();
    assert!(
        error.contains("invoices") && error.contains("Invoice"),
        "{error}"
    );
    ignored(store, planned(operation_id, "orders", 1)).await;

    // A fatal manifest failure fails the operation.
    let operation_id = submit(store).await;
    run_to_finalizing(store, operation_id).await;
    changes(store, finalize_failed(operation_id, false)).await;
    assert_eq!(
        report(store, operation_id).await.state,
        OperationState::Failed
    );

    // Reports about operations nobody knows change nothing.
    ignored(store, planned(uuid::Uuid::now_v7(), "orders", 1)).await;
}

pub async fn expired_leases_republish_with_the_next_attempt<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 2)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    assert!(
        claim(store, operation_id, "orders", 0, 1, "slow")
            .await
            .granted
    );
    assert!(
        claim(store, operation_id, "orders", 1, 1, "fast")
            .await
            .granted
    );
    drain(store, 1000).await;

    assert_eq!(store.reap_expired_leases(Utc::now()).await.unwrap(), 0);
    changes(store, progress(operation_id, "orders", 1, "fast", 10)).await;
    let within = Utc::now() + chrono::Duration::seconds(20);
    assert_eq!(store.reap_expired_leases(within).await.unwrap(), 0);
    let expired = Utc::now() + chrono::Duration::seconds(31);
    assert_eq!(store.reap_expired_leases(expired).await.unwrap(), 2);
    assert_eq!(store.reap_expired_leases(expired).await.unwrap(), 0, "once");
    let jobs = jobs(&drain(store, 100).await);
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter()
            .all(|(_, job)| matches!(job, Job::ExportChunk(export) if export.attempt == 2))
    );
    assert!(
        !claim(store, operation_id, "orders", 0, 1, "late")
            .await
            .granted
    );
    assert!(
        claim(store, operation_id, "orders", 0, 2, "fresh")
            .await
            .granted
    );
    ignored(store, part(operation_id, "orders", 0, 0, "slow", 5, "k")).await;

    // Leases that keep expiring use up the attempts and fail the operation.
    for _ in 0..3 {
        store
            .reap_expired_leases(Utc::now() + chrono::Duration::seconds(3600))
            .await
            .unwrap();
        let _ = claim(store, operation_id, "orders", 0, 9, "again").await;
    }
    let failed = report(store, operation_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    assert!(failed.error.unwrap().contains("lease"));
}

pub async fn empty_entities_finalize_at_once<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 0)).await;
    assert_eq!(
        report(store, operation_id).await.state,
        OperationState::Planning
    );
    changes(store, planned(operation_id, "invoices", 0)).await;
    let finalizing = report(store, operation_id).await;
    assert_eq!(finalizing.state, OperationState::Finalizing);
    assert_eq!(finalizing.percent, 99.0);
    let jobs = jobs(&drain(store, 100).await);
    let Some((_, Job::Finalize(finalize))) = jobs.last() else {
        panic!("finalize job expected, got {jobs:?}")
    };
    assert_eq!(finalize.manifest.totals.chunks, 0);
    assert_eq!(finalize.manifest.entities.len(), 2);
}

pub async fn parts_may_arrive_after_chunk_done<S: StateStore>(store: &S) {
    let operation_id = submit(store).await;
    changes(store, planned(operation_id, "orders", 1)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    assert!(
        claim(store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    changes(store, part(operation_id, "orders", 0, 0, "r1", 50, "k50")).await;
    changes(store, done(operation_id, "orders", 0, "r1", 2)).await;
    assert_eq!(
        report(store, operation_id).await.chunks_done,
        0,
        "part 1 not in yet"
    );
    changes(store, part(operation_id, "orders", 0, 1, "r1", 50, "k99")).await;
    let report_now = report(store, operation_id).await;
    assert_eq!((report_now.chunks_done, report_now.rows_done), (1, 100));
}
