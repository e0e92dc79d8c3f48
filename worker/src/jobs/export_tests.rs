//! Unit tests of `export_chunk` against a fake source, in-memory storage and
//! recorded events. The same job against PostgreSQL is in tests/export_postgres.rs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use koan_protocol::archive::KeyRange;
use koan_protocol::events::ChunkClaim;
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec, KeyType};
use koan_source::{ExportRow, SourceError};
use uuid::Uuid;

use super::*;
use crate::events::MemoryEvents;

type MakeError = fn() -> SourceError;

struct FakeSource {
    rows: Vec<String>,
    fail_after: Option<(usize, MakeError)>,
    delay: Duration,
    asked_after: Mutex<Vec<Option<String>>>,
}

impl FakeSource {
    fn new(count: usize) -> Self {
        Self {
            rows: (0..count).map(|n| format!("k{n:04}")).collect(),
            fail_after: None,
            delay: Duration::ZERO,
            asked_after: Mutex::new(Vec::new()),
        }
    }
}

struct FakeRows {
    rows: VecDeque<String>,
    fail_after: Option<(usize, MakeError)>,
    delay: Duration,
    emitted: usize,
}

impl ChunkSource for FakeSource {
    type Rows = FakeRows;

    async fn rows(
        &self,
        _entity: &EntitySpec,
        _range: &KeyRange,
        after_key: Option<&str>,
        _snapshot_id: Option<&str>,
    ) -> Result<FakeRows, SourceError> {
        if let Ok(mut asked) = self.asked_after.lock() {
            asked.push(after_key.map(str::to_string));
        }
        let rows = self
            .rows
            .iter()
            .filter(|key| after_key.is_none_or(|after| key.as_str() > after))
            .cloned()
            .collect();
        Ok(FakeRows {
            rows,
            fail_after: self.fail_after,
            delay: self.delay,
            emitted: 0,
        })
    }
}

impl RowCursor for FakeRows {
    async fn next_row(&mut self) -> Result<Option<ExportRow>, SourceError> {
        if let Some((after, make_error)) = self.fail_after
            && self.emitted == after
        {
            return Err(make_error());
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let Some(key) = self.rows.pop_front() else {
            return Ok(None);
        };
        self.emitted += 1;
        let doc = format!(r#"{{"key":"{key}","pad":"{}"}}"#, "x".repeat(100));
        Ok(Some(ExportRow {
            key: Bytes::from(key),
            version: None,
            doc: Bytes::from(doc),
        }))
    }
}

fn unreachable() -> SourceError {
    SourceError::Unreachable {
        target: "127.0.0.1:5432/test as postgres".into(),
        reason: "connection reset".into(),
    }
}

fn undecodable() -> SourceError {
    SourceError::Decode {
        reason: "not utf-8".into(),
    }
}

fn job(part_bytes: u64) -> ExportChunk {
    let plan = BackupPlan::new("p:daily").entity(BackupEntity::new("orders", "Order"));
    let mut entity = plan.entity_specs().remove(0);
    entity.key_type = Some(KeyType::Text);
    ExportChunk {
        operation_id: Uuid::now_v7(),
        plan_id: plan.plan_id,
        backup_id: Uuid::now_v7(),
        entity,
        chunk: 7,
        range: KeyRange::default(),
        snapshot_id: None,
        attempt: 1,
        part_bytes,
    }
}

fn settings() -> JobSettings {
    JobSettings {
        worker_id: "w1".into(),
        part_bytes_max: 64 * 1024 * 1024,
        claim_timeout: Duration::from_secs(1),
        progress_interval: Duration::from_secs(3600),
        snapshot_hold_max: Duration::from_secs(60),
        snapshot_check_interval: Duration::from_secs(60),
        hand_back_after: Duration::from_secs(900),
    }
}

fn memory_storage() -> Storage {
    Storage::from_store(Arc::new(object_store::memory::InMemory::new()))
}

async fn stored_paths(storage: &Storage) -> Vec<String> {
    let mut paths: Vec<String> = storage
        .list("default")
        .await
        .unwrap()
        .into_iter()
        .map(|meta| meta.location.to_string())
        .collect();
    paths.sort();
    paths
}

async fn keys_in(storage: &Storage, path: &str) -> Vec<String> {
    let stored = storage.get(path).await.unwrap();
    let raw = zstd::decode_all(stored.as_ref()).unwrap();
    String::from_utf8(raw)
        .unwrap()
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value["id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Every part reported: by `PartWritten`, and the last one by `ChunkDone`.
fn parts_written(events: &MemoryEvents) -> Vec<PartInfo> {
    events
        .events()
        .into_iter()
        .filter_map(|event| match event {
            WorkerEvent::PartWritten(written) => Some(written.part),
            WorkerEvent::ChunkDone(done) => done.part,
            _ => None,
        })
        .collect()
}

async fn run(
    source: &FakeSource,
    storage: &Storage,
    events: &MemoryEvents,
    job: &ExportChunk,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    let cancel = CancellationToken::new();
    export_chunk(
        source,
        storage,
        events,
        &settings(),
        job,
        delivery_count,
        &cancel,
    )
    .await
}

#[tokio::test]
async fn rolls_parts_and_reports_each_before_done() {
    let (source, storage, events, job) = (
        FakeSource::new(100),
        memory_storage(),
        MemoryEvents::granting(),
        job(2_000),
    );
    assert_eq!(
        run(&source, &storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    let claims = events.claims();
    let run_id = &claims[0].run;
    assert_eq!((claims[0].chunk, claims[0].worker.as_str()), (7, "w1"));
    let parts = parts_written(&events);
    assert!(parts.len() > 3, "{parts:?}");
    let mut keys = Vec::new();
    for (number, part) in parts.iter().enumerate() {
        assert_eq!(part.part as usize, number);
        assert!(
            part.path
                .ends_with(&format!("000007-{number:04}-{run_id}.jsonl.zst")),
            "{}",
            part.path
        );
        assert!(part.raw_bytes >= 2_000 || number == parts.len() - 1);
        let stored = keys_in(&storage, &part.path).await;
        assert_eq!(part.first_key.as_ref(), stored.first());
        assert_eq!(part.last_key.as_ref(), stored.last());
        keys.extend(stored);
    }
    assert_eq!(keys, source.rows);
    match events.events().last() {
        Some(WorkerEvent::ChunkDone(done)) => {
            assert_eq!(done.parts as usize, parts.len());
            assert_eq!(&done.run, run_id);
        }
        other => panic!("last event {other:?}"),
    }
    assert_eq!(stored_paths(&storage).await.len(), parts.len());
}

#[tokio::test]
async fn resumes_after_the_last_durable_part() {
    let source = FakeSource::new(60);
    let (storage, job) = (memory_storage(), job(1_000_000));
    let events = MemoryEvents::new(ChunkClaim {
        granted: true,
        reason: None,
        resume_after: Some(ResumePoint {
            last_key: "k0039".into(),
            next_part: 3,
            rows: 40,
        }),
        lease_seconds: 30,
    });
    assert_eq!(
        run(&source, &storage, &events, &job, 1).await.unwrap(),
        Outcome::Ack
    );
    assert_eq!(
        *source.asked_after.lock().unwrap(),
        vec![Some("k0039".to_string())]
    );
    let parts = parts_written(&events);
    assert_eq!(parts.len(), 1);
    assert_eq!((parts[0].part, parts[0].rows), (3, 20));
    assert_eq!(parts[0].first_key.as_deref(), Some("k0040"));
    assert!(
        matches!(events.events().last(), Some(WorkerEvent::ChunkDone(done)) if done.parts == 4)
    );
}

#[tokio::test]
async fn the_last_part_travels_with_chunk_done() {
    let (source, storage, events, job) = (
        FakeSource::new(100),
        memory_storage(),
        MemoryEvents::granting(),
        job(2_000),
    );
    assert_eq!(
        run(&source, &storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    let recorded = events.events();
    let separate = recorded
        .iter()
        .filter(|event| matches!(event, WorkerEvent::PartWritten(_)))
        .count();
    let Some(WorkerEvent::ChunkDone(done)) = recorded.last() else {
        panic!("last event {:?}", recorded.last());
    };
    let last = done
        .part
        .as_ref()
        .expect("chunk_done carries the last part");
    assert_eq!(last.part as usize, separate);
    assert_eq!(done.parts as usize, separate + 1);
    assert_eq!(
        keys_in(&storage, &last.path).await.last(),
        source.rows.last()
    );
}

#[tokio::test]
async fn a_quick_chunk_sends_one_report() {
    // Ten rows, one part, done well within the first progress interval:
    // no progress and no part_written, only chunk_done carrying the part.
    let (source, storage, events, job) = (
        FakeSource::new(10),
        memory_storage(),
        MemoryEvents::granting(),
        job(1_000_000),
    );
    assert_eq!(
        run(&source, &storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    match events.events().as_slice() {
        [WorkerEvent::ChunkDone(done)] => {
            assert_eq!(done.parts, 1);
            assert_eq!(done.part.as_ref().map(|part| part.rows), Some(10));
        }
        other => panic!("events {other:?}"),
    }
    assert_eq!(events.claims().len(), 1);
}

#[tokio::test]
async fn an_empty_chunk_has_no_parts() {
    let (source, storage, events, job) = (
        FakeSource::new(0),
        memory_storage(),
        MemoryEvents::granting(),
        job(1_000),
    );
    assert_eq!(
        run(&source, &storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    match events.events().as_slice() {
        [WorkerEvent::ChunkDone(done)] => {
            assert_eq!(done.parts, 0);
            assert!(done.part.is_none());
        }
        other => panic!("events {other:?}"),
    }
    assert!(stored_paths(&storage).await.is_empty());
}

#[tokio::test]
async fn a_refused_claim_is_acked_and_dropped() {
    let (source, storage, job) = (FakeSource::new(10), memory_storage(), job(1_000));
    let events = MemoryEvents::new(ChunkClaim {
        granted: false,
        reason: Some("chunk is done".into()),
        resume_after: None,
        lease_seconds: 0,
    });
    assert_eq!(
        run(&source, &storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    assert!(events.events().is_empty());
    assert!(source.asked_after.lock().unwrap().is_empty());
}

#[tokio::test]
async fn retryable_failures_requeue_until_the_last_delivery() {
    for (delivery_count, expected, retryable) in
        [(0, Outcome::Requeue, true), (4, Outcome::Ack, false)]
    {
        let mut source = FakeSource::new(100);
        source.fail_after = Some((50, unreachable));
        let (storage, events, job) = (memory_storage(), MemoryEvents::granting(), job(3_000));
        assert_eq!(
            run(&source, &storage, &events, &job, delivery_count)
                .await
                .unwrap(),
            expected
        );
        let sealed = parts_written(&events);
        assert!(!sealed.is_empty());
        // Only sealed parts are in storage: the open part was aborted.
        let sealed_paths: Vec<String> = sealed.iter().map(|part| part.path.clone()).collect();
        assert_eq!(stored_paths(&storage).await, sealed_paths);
        match events.events().last() {
            Some(WorkerEvent::ChunkFailed(failed)) => {
                assert_eq!(
                    (failed.code.as_str(), failed.retryable),
                    ("unreachable", retryable)
                );
                assert!(
                    failed.error.contains("connection reset"),
                    "{}",
                    failed.error
                );
            }
            other => panic!("last event {other:?}"),
        }
    }
}

#[tokio::test]
async fn permanent_failures_are_final() {
    let mut source = FakeSource::new(10);
    source.fail_after = Some((3, undecodable));
    let (storage, events, job) = (memory_storage(), MemoryEvents::granting(), job(1_000_000));
    assert_eq!(
        run(&source, &storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::ChunkFailed(failed)] if !failed.retryable && failed.code == "decode")
    );
    assert!(stored_paths(&storage).await.is_empty());
}

#[tokio::test]
async fn shutdown_stops_at_a_row_boundary_and_requeues() {
    let mut source = FakeSource::new(1_000);
    source.delay = Duration::from_millis(2);
    let (storage, events, job) = (memory_storage(), MemoryEvents::granting(), job(1_000_000));
    let cancel = CancellationToken::new();
    let stopper = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(60)).await;
        stopper.cancel();
    });
    let outcome = export_chunk(&source, &storage, &events, &settings(), &job, 0, &cancel).await;
    assert_eq!(outcome.unwrap(), Outcome::Requeue);
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::ChunkFailed(failed)] if failed.retryable && failed.code == "worker_shutdown")
    );
    assert!(stored_paths(&storage).await.is_empty());
}

#[tokio::test]
async fn reports_progress_while_streaming() {
    let mut source = FakeSource::new(40);
    source.delay = Duration::from_millis(5);
    let (storage, events, job) = (memory_storage(), MemoryEvents::granting(), job(2_000));
    let mut fast = settings();
    fast.progress_interval = Duration::from_millis(20);
    let cancel = CancellationToken::new();
    let outcome = export_chunk(&source, &storage, &events, &fast, &job, 0, &cancel).await;
    assert_eq!(outcome.unwrap(), Outcome::Ack);
    let recorded = events.events();
    let progress: Vec<&ChunkProgress> = recorded
        .iter()
        .filter_map(|event| match event {
            WorkerEvent::ChunkProgress(progress) => Some(progress),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 3, "{recorded:?}");
    // Pending rows never exceed one part's worth: durable rows are not pending.
    let rows_per_part = parts_written(&events)[0].rows;
    assert!(
        progress
            .iter()
            .all(|report| report.rows_pending <= rows_per_part)
    );
    assert!(matches!(recorded.last(), Some(WorkerEvent::ChunkDone(_))));
}

#[tokio::test]
async fn an_unreachable_broker_gives_the_job_back() {
    let (source, storage, events, job) = (
        FakeSource::new(100),
        memory_storage(),
        MemoryEvents::granting(),
        job(2_000),
    );
    events.fail_publish_after(1);
    let error = run(&source, &storage, &events, &job, 0).await.unwrap_err();
    assert_eq!(error.code(), "transport");
    assert_eq!(parts_written(&events).len(), 1);
}

/// Runs `job` with `hand_back_after` and the `hand_back` token.
async fn run_handing_back(
    source: &FakeSource,
    storage: &Storage,
    events: &MemoryEvents,
    job: &ExportChunk,
    hand_back_after: Duration,
    hand_back: &CancellationToken,
) -> Outcome {
    let settings = JobSettings {
        hand_back_after,
        ..settings()
    };
    export_chunk_until(
        source,
        storage,
        events,
        &settings,
        job,
        0,
        &CancellationToken::new(),
        None,
        hand_back,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn an_old_delivery_seals_its_open_part_and_is_handed_back() {
    let mut source = FakeSource::new(1_000);
    source.delay = Duration::from_millis(2);
    let (storage, events, job) = (memory_storage(), MemoryEvents::granting(), job(1 << 30));
    let outcome = run_handing_back(
        &source,
        &storage,
        &events,
        &job,
        Duration::from_millis(300),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(outcome, Outcome::Requeue);
    // One part, sealed early at a row boundary, reported and stored; no
    // chunk_done and no failure (a hand-back is not a failed run).
    let parts = parts_written(&events);
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(parts[0].rows > 0 && (parts[0].rows as usize) < source.rows.len());
    let stored = keys_in(&storage, &parts[0].path).await;
    assert_eq!(stored.len() as u64, parts[0].rows);
    assert_eq!(parts[0].last_key.as_ref(), stored.last());
    assert!(!events.events().iter().any(|event| matches!(
        event,
        WorkerEvent::ChunkDone(_) | WorkerEvent::ChunkFailed(_)
    )));
}

#[tokio::test]
async fn shutdown_hands_the_job_back_after_sealing_the_open_part() {
    let mut source = FakeSource::new(1_000);
    source.delay = Duration::from_millis(2);
    let (storage, events, job) = (memory_storage(), MemoryEvents::granting(), job(1 << 30));
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let outcome = run_handing_back(
        &source,
        &storage,
        &events,
        &job,
        Duration::from_secs(900),
        &shutdown,
    )
    .await;
    assert_eq!(outcome, Outcome::Requeue);
    let parts = parts_written(&events);
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert_eq!(
        keys_in(&storage, &parts[0].path).await.len() as u64,
        parts[0].rows
    );
    assert_eq!(stored_paths(&storage).await.len(), 1);
}
