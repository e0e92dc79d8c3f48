//! The state store conformance suite: every backend of `StateStore` must pass it.
//!
//! Each check takes a fresh, empty store built with [`policy`].

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use koan_coordinator::store::{Applied, NewBackup, NewRestore, OutboxMessage, Policy, StateStore};
use koan_protocol::archive::{KeyRange, PartInfo, SnapshotFacts, manifest_path, part_path};
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{
    ChunkClaim, ChunkDone, ChunkFailed, ChunkProgress, ClaimChunk, EntityFailed, EntityPlanned,
    FinalizeFailed, ImportFailed, ManifestWritten, OperationEvent, OperationFailed, PartImported,
    PartWritten, ReplayDone, ReplayFailure, RestoreApplied, RestoreEntity, RestorePart,
    RestorePlanned, RowFailure, VerifyDone, VerifyProgress, WorkerEvent,
};
use koan_protocol::jobs::Job;
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec, KeyType};
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_protocol::topology::{EVENTS_EXCHANGE, JOBS_EXCHANGE};

use crate::common::Recorder;

pub mod batches;
pub mod checks;
pub mod dead_jobs;
pub mod flows;
pub mod lifecycle;
pub mod replays;
pub mod requests;
pub mod restores;
pub mod traces;
pub mod verifies;
pub mod workload;

/// The policy every conformance store is built with: every change announced.
pub fn policy() -> Policy {
    Policy {
        part_bytes: 1024 * 1024,
        lease: Duration::from_secs(30),
        progress_interval: Duration::ZERO,
        max_chunk_attempts: 3,
    }
}

/// Two entities: `orders` (pool `default`) and `invoices` (pool `billing`).
pub fn plan() -> BackupPlan {
    BackupPlan::new("orders:daily")
        .entity(BackupEntity::new("orders", "Order").in_scope("orders", "tenant-a"))
        .entity(BackupEntity::new("invoices", "Invoice").pool("billing"))
}

/// The entity spec of `name` in [`plan`].
pub fn spec(name: &str) -> EntitySpec {
    plan()
        .entity_specs()
        .into_iter()
        .find(|spec| spec.name == name)
        .expect("entity in plan")
}

/// Submits [`plan`] with labels, returning the operation id.
pub async fn submit<S: StateStore>(store: &S) -> Uuid {
    let operation_id = Uuid::now_v7();
    let submitted = store
        .submit_backup(&NewBackup {
            operation_id,
            command_id: Some(format!("cmd-{operation_id}")),
            plan: plan(),
            labels: BTreeMap::from([("env".to_string(), "test".to_string())]),
            description: Some("conformance".into()),
            trace: None,
        })
        .await
        .expect("submit");
    assert!(!submitted.existing);
    operation_id
}

/// `entity_planned` for `name` with `ranges` chunks of 100 rows each.
pub fn planned(operation_id: Uuid, name: &str, ranges: u32) -> WorkerEvent {
    let mut entity = spec(name);
    entity.key_type = Some(KeyType::Text);
    let bounds: Vec<Option<String>> = (0..=ranges)
        .map(|i| (i != 0 && i != ranges).then(|| format!("k{i:04}")))
        .collect();
    WorkerEvent::EntityPlanned(EntityPlanned {
        operation_id,
        entity,
        rows_total: u64::from(ranges) * 100,
        ranges: bounds
            .windows(2)
            .map(|pair| KeyRange {
                lo: pair[0].clone(),
                hi: pair[1].clone(),
            })
            .collect(),
        snapshot: Some(SnapshotFacts {
            entity: name.to_string(),
            snapshot_id: Some(format!("00000003-{name}")),
            taken_at: Utc::now(),
            holder: "worker-1".into(),
        }),
    })
}

/// A claim by `run` of attempt `attempt`.
pub async fn claim<S: StateStore>(
    store: &S,
    operation_id: Uuid,
    entity: &str,
    chunk: u32,
    attempt: u32,
    run: &str,
) -> ChunkClaim {
    store
        .claim_chunk(&ClaimChunk {
            operation_id,
            entity: entity.into(),
            chunk,
            attempt,
            run: run.into(),
            worker: format!("worker-{run}"),
        })
        .await
        .expect("claim")
}

/// `part_written` of `rows` rows ending at `last_key`, at the layout's path.
pub fn part(
    operation_id: Uuid,
    entity: &str,
    chunk: u32,
    part: u32,
    run: &str,
    rows: u64,
    last_key: &str,
) -> WorkerEvent {
    WorkerEvent::PartWritten(PartWritten {
        operation_id,
        entity: entity.into(),
        chunk,
        run: run.into(),
        part: PartInfo {
            part,
            path: part_path(
                &spec(entity),
                "orders:daily",
                operation_id,
                chunk,
                part,
                run,
            )
            .expect("part path"),
            first_key: Some(format!("{last_key}-first")),
            last_key: Some(last_key.into()),
            rows,
            raw_bytes: rows * 10,
            compressed_bytes: rows * 3,
            blake3: format!("hash-{entity}-{chunk}-{part}"),
        },
    })
}

/// `chunk_progress` of `rows` pending rows.
pub fn progress(operation_id: Uuid, entity: &str, chunk: u32, run: &str, rows: u64) -> WorkerEvent {
    WorkerEvent::ChunkProgress(ChunkProgress {
        operation_id,
        entity: entity.into(),
        chunk,
        run: run.into(),
        rows_pending: rows,
        raw_bytes_pending: rows * 10,
    })
}

/// `chunk_done` with `parts` parts.
pub fn done(operation_id: Uuid, entity: &str, chunk: u32, run: &str, parts: u32) -> WorkerEvent {
    WorkerEvent::ChunkDone(ChunkDone {
        operation_id,
        entity: entity.into(),
        chunk,
        run: run.into(),
        parts,
        part: None,
    })
}

/// `chunk_done` with `parts` parts, carrying the last one (`part`'s report).
pub fn done_with_part(written: &WorkerEvent, parts: u32) -> WorkerEvent {
    let WorkerEvent::PartWritten(written) = written else {
        panic!("not a part_written: {written:?}");
    };
    WorkerEvent::ChunkDone(ChunkDone {
        operation_id: written.operation_id,
        entity: written.entity.clone(),
        chunk: written.chunk,
        run: written.run.clone(),
        parts,
        part: Some(written.part.clone()),
    })
}

/// `chunk_failed`.
pub fn chunk_failed(
    operation_id: Uuid,
    entity: &str,
    chunk: u32,
    run: &str,
    retryable: bool,
) -> WorkerEvent {
    WorkerEvent::ChunkFailed(ChunkFailed {
        operation_id,
        entity: entity.into(),
        chunk,
        run: run.into(),
        code: "copy_failed".into(),
        error: "connection reset".into(),
        retryable,
    })
}

/// `entity_failed`.
pub fn entity_failed(operation_id: Uuid, entity: &str) -> WorkerEvent {
    WorkerEvent::EntityFailed(EntityFailed {
        operation_id,
        entity: entity.into(),
        code: "missing_table".into(),
        error: "table public.\"Invoice\" does not exist".into(),
    })
}

/// `manifest_written`.
pub fn manifest_written(operation_id: Uuid, path: &str) -> WorkerEvent {
    WorkerEvent::ManifestWritten(ManifestWritten {
        operation_id,
        path: path.into(),
        totals: Default::default(),
    })
}

/// `finalize_failed`.
pub fn finalize_failed(operation_id: Uuid, retryable: bool) -> WorkerEvent {
    WorkerEvent::FinalizeFailed(FinalizeFailed {
        operation_id,
        code: "storage".into(),
        error: "bucket unavailable".into(),
        retryable,
    })
}

/// Applies `event`, expecting it to change the state.
pub async fn changes<S: StateStore>(store: &S, event: WorkerEvent) {
    let applied = store.apply(&event).await.expect("apply");
    assert_eq!(applied, Applied::Changed, "{event:?}");
}

/// Applies `event`, expecting it to change nothing.
pub async fn ignored<S: StateStore>(store: &S, event: WorkerEvent) {
    let applied = store.apply(&event).await.expect("apply");
    assert!(
        matches!(applied, Applied::Unchanged(_)),
        "{event:?} changed state"
    );
}

/// The report of an operation that exists.
pub async fn report<S: StateStore>(store: &S, operation_id: Uuid) -> ProgressReport {
    store
        .report(operation_id)
        .await
        .expect("report")
        .expect("operation exists")
}

/// Drains the whole outbox, in batches of `batch`.
pub async fn drain<S: StateStore>(store: &S, batch: usize) -> Vec<OutboxMessage> {
    let recorder = Recorder::default();
    loop {
        let drained = store.drain_outbox(&recorder, batch).await.expect("drain");
        assert!(!drained.busy, "nobody else drains this outbox");
        if drained.published == 0 {
            return recorder.taken();
        }
    }
}

/// The jobs among `messages`, with their routing keys.
pub fn jobs(messages: &[OutboxMessage]) -> Vec<(String, Job)> {
    messages
        .iter()
        .filter(|message| message.exchange == JOBS_EXCHANGE)
        .map(|message| {
            let job = koan_protocol::decode::<Job>(&message.payload).expect("job decodes");
            assert_eq!(message.kind, koan_protocol::codec::Message::kind(&job));
            (message.routing_key.clone(), job)
        })
        .collect()
}

/// The public events among `messages`; checks their routing keys.
pub fn events(messages: &[OutboxMessage]) -> Vec<OperationEvent> {
    messages
        .iter()
        .filter(|message| message.exchange == EVENTS_EXCHANGE)
        .map(|message| {
            let event =
                koan_protocol::decode::<OperationEvent>(&message.payload).expect("event decodes");
            let expected = koan_protocol::topology::operation_event_key(
                event.report().operation_id,
                koan_protocol::codec::Message::kind(&event),
            );
            assert_eq!(message.routing_key, expected);
            event
        })
        .collect()
}

/// Runs `orders` (2 chunks) and `invoices` (1 chunk) to `finalizing` with run `r1`
/// and returns the finalize job's routing key and job.
pub async fn run_to_finalizing<S: StateStore>(store: &S, operation_id: Uuid) -> (String, Job) {
    changes(store, planned(operation_id, "orders", 2)).await;
    changes(store, planned(operation_id, "invoices", 1)).await;
    for (entity, chunk) in [("orders", 0), ("orders", 1), ("invoices", 0)] {
        assert!(
            claim(store, operation_id, entity, chunk, 1, "r1")
                .await
                .granted
        );
        changes(
            store,
            part(
                operation_id,
                entity,
                chunk,
                0,
                "r1",
                60,
                &format!("{entity}-{chunk}-a"),
            ),
        )
        .await;
        changes(
            store,
            part(
                operation_id,
                entity,
                chunk,
                1,
                "r1",
                40,
                &format!("{entity}-{chunk}-b"),
            ),
        )
        .await;
        changes(store, done(operation_id, entity, chunk, "r1", 2)).await;
    }
    assert_eq!(
        report(store, operation_id).await.state,
        OperationState::Finalizing
    );
    jobs(&drain(store, 500).await)
        .into_iter()
        .find(|(_, job)| matches!(job, Job::Finalize(_)))
        .expect("finalize job queued")
}

/// A backup of [`plan`] run to `completed` (2 + 1 chunks of 100 rows), its outbox drained.
pub async fn completed_backup<S: StateStore>(store: &S) -> Uuid {
    let operation_id = submit(store).await;
    run_to_finalizing(store, operation_id).await;
    let path = manifest_path(&plan(), operation_id).expect("manifest path");
    changes(store, manifest_written(operation_id, &path)).await;
    drain(store, 1000).await;
    operation_id
}

/// Records a restore of `backup_id` into scope `tenant-z` (every entity unless `filter` names some).
pub async fn restore<S: StateStore>(
    store: &S,
    backup_id: Uuid,
    mode: RestoreMode,
    filter: &[&str],
    pool: Option<&str>,
) -> Uuid {
    let backup = store
        .backup_source(backup_id)
        .await
        .expect("backup source")
        .expect("backup known");
    let filter: Vec<String> = filter.iter().map(|name| name.to_string()).collect();
    let entities = backup
        .entities
        .iter()
        .filter(|entity| filter.is_empty() || filter.contains(&entity.name))
        .cloned()
        .collect();
    let operation_id = Uuid::now_v7();
    let submitted = store
        .submit_restore(&NewRestore {
            operation_id,
            command_id: None,
            backup,
            mode,
            filter,
            entities,
            target_scope: Some("tenant-z".into()),
            pool: pool.map(str::to_string),
            labels: BTreeMap::new(),
            description: None,
            trace: None,
        })
        .await
        .expect("submit restore");
    assert!(!submitted.existing);
    operation_id
}

/// The archived path of a restore unit (any path: the coordinator passes it on).
pub fn unit_path(entity: &str, unit: u32) -> String {
    format!("default/tenant-a/orders:daily/backup/{entity}/part-{unit:04}.jsonl.zst")
}

/// `restore_planned`: each `(entity, parts)` with parts of 50 rows, two per chunk;
/// staging tables named `stage_<entity>` when `staged`.
pub fn restore_planned(operation_id: Uuid, layout: &[(&str, u32)], staged: bool) -> WorkerEvent {
    WorkerEvent::RestorePlanned(RestorePlanned {
        operation_id,
        entities: layout
            .iter()
            .map(|(name, parts)| {
                let mut entity = spec(name);
                entity.key_type = Some(KeyType::Text);
                RestoreEntity {
                    spec: entity,
                    staging_table: staged.then(|| format!("stage_{name}")),
                    parts: (0..*parts)
                        .map(|unit| RestorePart {
                            chunk: unit / 2,
                            part: PartInfo {
                                part: unit % 2,
                                path: unit_path(name, unit),
                                first_key: Some(format!("{name}-{unit}-a")),
                                last_key: Some(format!("{name}-{unit}-z")),
                                rows: 50,
                                raw_bytes: 500,
                                compressed_bytes: 150,
                                blake3: format!("hash-{name}-{unit}"),
                            },
                        })
                        .collect(),
                }
            })
            .collect(),
    })
}

/// A row that failed, keyed `key`, with code `code`.
pub fn row_failure(entity: &str, key: &str, code: &str) -> RowFailure {
    RowFailure {
        key: Some(key.into()),
        part: Some(unit_path(entity, 0)),
        line_no: Some(7),
        code: code.into(),
        reason: format!("{code} on {key}"),
        line: format!("{{\"id\":\"{key}\"}}"),
    }
}

/// `part_imported` of a unit of 50 rows: `written` written, `failures` failed, the rest skipped.
pub fn imported(
    operation_id: Uuid,
    entity: &str,
    unit: u32,
    written: u64,
    failures: Vec<RowFailure>,
) -> WorkerEvent {
    let failed = failures.len() as u64;
    WorkerEvent::PartImported(PartImported {
        operation_id,
        entity: entity.into(),
        unit,
        rows_written: written,
        rows_skipped: 50 - written - failed,
        failures,
        raw_bytes: 500,
    })
}

/// `import_failed` of a unit.
pub fn import_failed(operation_id: Uuid, entity: &str, unit: u32, retryable: bool) -> WorkerEvent {
    WorkerEvent::ImportFailed(ImportFailed {
        operation_id,
        entity: entity.into(),
        unit,
        code: "hash_mismatch".into(),
        error: format!(
            "part {} does not match the manifest",
            unit_path(entity, unit)
        ),
        retryable,
    })
}

/// `restore_applied` of an entity.
pub fn applied(
    operation_id: Uuid,
    entity: &str,
    written: u64,
    failures: Vec<RowFailure>,
) -> WorkerEvent {
    WorkerEvent::RestoreApplied(RestoreApplied {
        operation_id,
        entity: entity.into(),
        rows_written: written,
        rows_skipped: 0,
        rows_removed: 7,
        failures,
    })
}

/// `replay_done`: `resolved` written, `failed` failing again with code `still_broken`.
pub fn replay_done(operation_id: Uuid, resolved: &[i64], failed: &[i64]) -> WorkerEvent {
    WorkerEvent::ReplayDone(ReplayDone {
        operation_id,
        resolved: resolved.to_vec(),
        failed: failed
            .iter()
            .map(|id| ReplayFailure {
                diagnostic_id: *id,
                failure: RowFailure {
                    key: None,
                    part: None,
                    line_no: None,
                    code: "still_broken".into(),
                    reason: format!("row {id} still violates order_status_allowed"),
                    line: String::new(),
                },
            })
            .collect(),
    })
}

/// `verify_progress`.
pub fn verify_progress(operation_id: Uuid, parts_done: u64, rows_done: u64) -> WorkerEvent {
    WorkerEvent::VerifyProgress(VerifyProgress {
        operation_id,
        parts_done,
        parts_total: 6,
        rows_done,
        rows_total: 300,
    })
}

/// `verify_done` with `problems`.
pub fn verify_done(operation_id: Uuid, problems: &[&str]) -> WorkerEvent {
    WorkerEvent::VerifyDone(VerifyDone {
        operation_id,
        parts_checked: 6,
        rows: 300,
        problems: problems.iter().map(|problem| problem.to_string()).collect(),
    })
}

/// `operation_failed`.
pub fn operation_failed(operation_id: Uuid) -> WorkerEvent {
    WorkerEvent::OperationFailed(OperationFailed {
        operation_id,
        code: "missing_table".into(),
        error: "table public.\"Order\" does not exist and the layout is relational".into(),
    })
}

/// The percent of every event among `messages`, checked monotonic with exactly one 100 at the end.
pub fn assert_events_monotonic_to_100(messages: &[OutboxMessage]) {
    let events = events(messages);
    let percents: Vec<f64> = events.iter().map(|event| event.report().percent).collect();
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "{percents:?}"
    );
    assert_eq!(
        percents.iter().filter(|percent| **percent == 100.0).count(),
        1,
        "{percents:?}"
    );
    assert!(
        matches!(events.last(), Some(OperationEvent::Completed(report)) if report.percent == 100.0),
        "{percents:?}"
    );
}
