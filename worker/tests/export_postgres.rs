//! Plan, export and finalize against a real PostgreSQL, without RabbitMQ:
//! jobs report to `MemoryEvents` and write to a temporary directory.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 with trust auth for user `postgres`.
//! Each test creates its own database and drops it afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use koan_protocol::archive::{
    ConsistencyFacts, FORMAT_VERSION, KeyRange, Manifest, ManifestChunk, ManifestEntity, PartInfo,
    Totals, entity_prefix, manifest_path,
};
use koan_protocol::events::WorkerEvent;
use koan_protocol::jobs::{ExportChunk, Finalize, PlanEntity};
use koan_protocol::plan::{BackupEntity, BackupPlan, Consistency, EntitySpec};
use koan_source::Source;
use koan_worker::jobs::export::export_chunk;
use koan_worker::jobs::finalize::finalize;
use koan_worker::jobs::plan::plan_entity;
use koan_worker::jobs::{JobSettings, Outcome};
use koan_worker::{MemoryEvents, Storage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::TestDatabase;

fn settings() -> JobSettings {
    JobSettings {
        worker_id: "test-worker".into(),
        part_bytes_max: 64 * 1024 * 1024,
        claim_timeout: Duration::from_secs(5),
        progress_interval: Duration::from_secs(1),
        snapshot_hold_max: Duration::from_secs(60),
        snapshot_check_interval: Duration::from_secs(60),
        hand_back_after: Duration::from_secs(900),
    }
}

fn planned(events: &MemoryEvents) -> (EntitySpec, Vec<KeyRange>, u64, Option<String>) {
    match events.events().as_slice() {
        [WorkerEvent::EntityPlanned(planned)] => (
            planned.entity.clone(),
            planned.ranges.clone(),
            planned.rows_total,
            planned
                .snapshot
                .as_ref()
                .and_then(|snapshot| snapshot.snapshot_id.clone()),
        ),
        other => panic!("expected one EntityPlanned, got {other:?}"),
    }
}

/// Exports every range; returns the parts of each chunk.
async fn export_all(
    source: &Source,
    storage: &Storage,
    plan: &BackupPlan,
    backup_id: Uuid,
    entity: &EntitySpec,
    ranges: &[KeyRange],
    snapshot_id: Option<String>,
) -> Vec<Vec<PartInfo>> {
    let mut chunks = Vec::new();
    for (chunk, range) in ranges.iter().enumerate() {
        let events = MemoryEvents::granting();
        let job = ExportChunk {
            operation_id: backup_id,
            plan_id: plan.plan_id.clone(),
            backup_id,
            entity: entity.clone(),
            chunk: u32::try_from(chunk).unwrap(),
            range: range.clone(),
            snapshot_id: snapshot_id.clone(),
            attempt: 1,
            part_bytes: 16 * 1024,
        };
        let outcome = export_chunk(
            source,
            storage,
            &events,
            &settings(),
            &job,
            0,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(outcome, Outcome::Ack, "{:?}", events.events());
        let recorded = events.events();
        let parts: Vec<PartInfo> = recorded
            .iter()
            .filter_map(|event| match event {
                WorkerEvent::PartWritten(written) => Some(written.part.clone()),
                // The last part travels with chunk_done.
                WorkerEvent::ChunkDone(done) => done.part.clone(),
                _ => None,
            })
            .collect();
        assert!(
            matches!(recorded.last(), Some(WorkerEvent::ChunkDone(done)) if done.parts as usize == parts.len()),
            "{recorded:?}"
        );
        chunks.push(parts);
    }
    chunks
}

/// Every line of every part, in order.
async fn read_lines(storage: &Storage, chunks: &[Vec<PartInfo>]) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    for part in chunks.iter().flatten() {
        let stored = storage.get(&part.path).await.unwrap();
        assert_eq!(blake3::hash(&stored).to_hex().to_string(), part.blake3);
        let raw = zstd::decode_all(stored.as_ref()).unwrap();
        for line in String::from_utf8(raw).unwrap().lines() {
            lines.push(serde_json::from_str(line).unwrap());
        }
    }
    lines
}

#[tokio::test]
async fn snapshot_backup_sees_only_the_snapshot_and_finalizes() {
    let database = TestDatabase::create().await;
    let client = database.client().await;
    client
        .batch_execute(
            r#"CREATE TABLE "Order" ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
               INSERT INTO "Order" SELECT 'order-' || lpad(n::text, 5, '0') || CASE WHEN n % 7 = 0 THEN ' "ü\' ELSE '' END,
                                          jsonb_build_object('n', n, 'text', E'multi\nline "quoted"')
                                   FROM generate_series(1, 2000) n;"#,
        )
        .await
        .unwrap();
    let plan = BackupPlan::new("orders:nightly")
        .entity(BackupEntity::new("orders", "Order").chunk_rows(300));
    let source = Source::new(&database.url, 4).unwrap();
    let storage = Storage::open(&database.directory.display().to_string()).unwrap();
    let backup_id = Uuid::now_v7();
    let plan_job = PlanEntity {
        operation_id: backup_id,
        plan_id: plan.plan_id.clone(),
        backup_id,
        entity: plan.entity_specs().remove(0),
        consistency: Consistency::Snapshot,
    };
    let events = MemoryEvents::granting();
    let outcome = plan_entity(
        &source,
        &events,
        &settings(),
        &plan_job,
        0,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome.outcome, Outcome::Ack);
    let holder = outcome
        .holder
        .expect("a snapshot is held under snapshot consistency");
    let (entity, ranges, rows_total, snapshot_id) = planned(&events);
    assert_eq!(rows_total, 2000);
    assert!(ranges.len() >= 5, "{ranges:?}");
    assert!(snapshot_id.is_some());

    // Changes after the snapshot must not appear in the backup.
    client
        .batch_execute(
            r#"INSERT INTO "Order" SELECT 'zz-late-' || n, '{}'::jsonb FROM generate_series(1, 50) n;
               DELETE FROM "Order" WHERE "Id" = 'order-00002';"#,
        )
        .await
        .unwrap();
    let chunks = export_all(
        &source,
        &storage,
        &plan,
        backup_id,
        &entity,
        &ranges,
        snapshot_id,
    )
    .await;
    holder.release().await;
    let lines = read_lines(&storage, &chunks).await;
    assert_eq!(lines.len(), 2000);
    let ids: Vec<&str> = lines
        .iter()
        .map(|line| line["id"].as_str().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 2000, "no row twice");
    assert!(ids.contains(&"order-00002"));
    assert!(ids.contains(&"order-00007 \"ü\\"));
    assert!(!ids.iter().any(|id| id.starts_with("zz-late")));
    assert_eq!(lines[0]["doc"]["text"], "multi\nline \"quoted\"");
    assert!(lines.iter().all(|line| line.get("v").is_none()));

    // A leftover of a superseded run, then finalize.
    let prefix = entity_prefix(&entity, &plan.plan_id, backup_id).unwrap();
    let leftover = format!("{prefix}/000000-0000-deadbeef0000.jsonl.zst");
    storage.put(&leftover, b"stale".to_vec()).await.unwrap();
    let manifest = manifest_for(&plan, backup_id, &entity, &ranges, &chunks);
    let path = manifest_path(&plan, backup_id).unwrap();
    let job = Finalize {
        operation_id: backup_id,
        path: path.clone(),
        manifest: manifest.clone(),
    };
    let events = MemoryEvents::granting();
    assert_eq!(
        finalize(&storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::ManifestWritten(written)] if written.path == path && written.totals.rows == 2000)
    );
    let written: Manifest = serde_json::from_slice(&storage.get(&path).await.unwrap()).unwrap();
    assert_eq!(written, manifest);
    assert!(
        storage.get(&leftover).await.is_err(),
        "the leftover part must be deleted"
    );

    // A manifest referencing a part that is gone is refused, and nothing is written.
    let first_part = chunks[0][0].path.clone();
    storage.delete(&path).await.unwrap();
    storage.delete(&first_part).await.unwrap();
    let events = MemoryEvents::granting();
    assert_eq!(
        finalize(&storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::FinalizeFailed(failed)] if !failed.retryable && failed.error.contains(&first_part))
    );
    assert!(storage.get(&path).await.is_err());
}

fn manifest_for(
    plan: &BackupPlan,
    backup_id: Uuid,
    entity: &EntitySpec,
    ranges: &[KeyRange],
    chunks: &[Vec<PartInfo>],
) -> Manifest {
    let manifest_chunks: Vec<ManifestChunk> = chunks
        .iter()
        .zip(ranges)
        .enumerate()
        .map(|(number, (parts, range))| ManifestChunk {
            chunk: u32::try_from(number).unwrap(),
            range: range.clone(),
            rows: parts.iter().map(|part| part.rows).sum(),
            parts: parts.clone(),
        })
        .collect();
    let all_parts = || chunks.iter().flatten();
    let totals = Totals {
        entities: 1,
        chunks: chunks.len() as u64,
        parts: all_parts().count() as u64,
        rows: all_parts().map(|part| part.rows).sum(),
        raw_bytes: all_parts().map(|part| part.raw_bytes).sum(),
        compressed_bytes: all_parts().map(|part| part.compressed_bytes).sum(),
    };
    let now = chrono::Utc::now();
    Manifest {
        format_version: FORMAT_VERSION,
        backup_id,
        plan: plan.clone(),
        consistency: ConsistencyFacts {
            mode: plan.consistency,
            snapshots: Vec::new(),
            notes: Vec::new(),
        },
        base_backup: None,
        labels: BTreeMap::new(),
        started_at: now,
        completed_at: now,
        totals,
        entities: vec![ManifestEntity {
            spec: entity.clone(),
            rows: totals.rows,
            raw_bytes: totals.raw_bytes,
            compressed_bytes: totals.compressed_bytes,
            chunks: manifest_chunks,
        }],
    }
}

#[tokio::test]
async fn per_chunk_backup_writes_numeric_keys_and_versions() {
    let database = TestDatabase::create().await;
    let client = database.client().await;
    client
        .batch_execute(
            r#"CREATE TABLE "Ledger" ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);
               INSERT INTO "Ledger" SELECT n::bigint * 1000000000, jsonb_build_object('meta', jsonb_build_object('version', n % 5), 'n', n)
                                    FROM generate_series(-50, 449) n;"#,
        )
        .await
        .unwrap();
    let plan = BackupPlan::new("ledger")
        .consistency(Consistency::PerChunk)
        .entity(
            BackupEntity::new("ledger", "Ledger")
                .version("$.meta.version")
                .chunk_rows(100),
        );
    let source = Source::new(&database.url, 4).unwrap();
    let storage = Storage::open(&format!("file://{}", database.directory.display())).unwrap();
    let backup_id = Uuid::now_v7();
    let plan_job = PlanEntity {
        operation_id: backup_id,
        plan_id: plan.plan_id.clone(),
        backup_id,
        entity: plan.entity_specs().remove(0),
        consistency: Consistency::PerChunk,
    };
    let events = MemoryEvents::granting();
    let outcome = plan_entity(
        &source,
        &events,
        &settings(),
        &plan_job,
        0,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome.outcome, Outcome::Ack);
    assert!(outcome.holder.is_none());
    let (entity, ranges, rows_total, snapshot_id) = planned(&events);
    assert_eq!(rows_total, 500);
    assert!(snapshot_id.is_none());
    let chunks = export_all(&source, &storage, &plan, backup_id, &entity, &ranges, None).await;
    let lines = read_lines(&storage, &chunks).await;
    assert_eq!(lines.len(), 500);
    for line in &lines {
        let id = line["id"].as_i64().expect("bigint keys are JSON numbers");
        let n = id / 1_000_000_000;
        assert_eq!(line["doc"]["n"], n);
        assert_eq!(line["v"], n % 5);
    }
    assert_eq!(lines[0]["id"], -50_000_000_000_i64);
}

#[tokio::test]
async fn planning_a_missing_table_fails_the_entity() {
    let database = TestDatabase::create().await;
    let plan = BackupPlan::new("p").entity(BackupEntity::new("ghost", "Ghost"));
    let source = Source::new(&database.url, 2).unwrap();
    let job = PlanEntity {
        operation_id: Uuid::now_v7(),
        plan_id: plan.plan_id.clone(),
        backup_id: Uuid::now_v7(),
        entity: plan.entity_specs().remove(0),
        consistency: Consistency::Snapshot,
    };
    let events = MemoryEvents::granting();
    let outcome = plan_entity(
        &source,
        &events,
        &settings(),
        &job,
        0,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome.outcome, Outcome::Ack);
    assert!(outcome.holder.is_none());
    match events.events().as_slice() {
        [WorkerEvent::EntityFailed(failed)] => {
            assert_eq!(failed.code, "missing_table");
            assert!(failed.error.contains("Ghost"), "{}", failed.error);
        }
        other => panic!("expected EntityFailed, got {other:?}"),
    }
}
