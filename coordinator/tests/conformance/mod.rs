//! The state store conformance suite: every backend of `StateStore` must pass it.
//!
//! Each check takes a fresh, empty store built with [`policy`].

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use koan_coordinator::store::{Applied, NewBackup, OutboxMessage, Policy, StateStore};
use koan_protocol::archive::{KeyRange, PartInfo, SnapshotFacts, part_path};
use koan_protocol::events::{
    ChunkClaim, ChunkDone, ChunkFailed, ChunkProgress, ClaimChunk, EntityFailed, EntityPlanned,
    FinalizeFailed, ManifestWritten, OperationEvent, PartWritten, WorkerEvent,
};
use koan_protocol::jobs::Job;
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec, KeyType};
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_protocol::topology::{EVENTS_EXCHANGE, JOBS_EXCHANGE};

use crate::common::Recorder;

pub mod checks;
pub mod flows;

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
