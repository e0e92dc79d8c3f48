//! Whole backups and restores driven through the job functions, with
//! `MemoryEvents` instead of RabbitMQ.

use std::collections::BTreeMap;
use std::time::Duration;

use koan_protocol::archive::{
    ConsistencyFacts, FORMAT_VERSION, Manifest, ManifestChunk, ManifestEntity, Totals,
    manifest_path,
};
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{RestoreEntity, WorkerEvent};
use koan_protocol::jobs::{
    ApplyRestore, ExportChunk, Finalize, ImportPart, PlanEntity, PlanRestore, RestoreTarget,
    VerifyJob,
};
use koan_protocol::plan::BackupPlan;
use koan_source::Source;
use koan_worker::jobs::apply::apply_restore;
use koan_worker::jobs::export::export_chunk;
use koan_worker::jobs::finalize::finalize;
use koan_worker::jobs::import::import_part;
use koan_worker::jobs::plan::plan_entity;
use koan_worker::jobs::plan_restore::plan_restore;
use koan_worker::jobs::verify::verify_backup;
use koan_worker::jobs::{JobSettings, Outcome};
use koan_worker::{MemoryEvents, Storage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn settings() -> JobSettings {
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

/// Backs up every entity of `plan` (per-chunk consistency, parts of
/// `part_bytes`) and writes the manifest with the finalize job; returns the
/// manifest and its path.
pub async fn backup(
    source: &Source,
    storage: &Storage,
    plan: &BackupPlan,
    part_bytes: u64,
) -> (Manifest, String) {
    let backup_id = Uuid::now_v7();
    let started_at = chrono::Utc::now();
    let mut entities = Vec::new();
    for spec in plan.entity_specs() {
        let events = MemoryEvents::granting();
        let job = PlanEntity {
            operation_id: backup_id,
            plan_id: plan.plan_id.clone(),
            backup_id,
            entity: spec,
            consistency: koan_protocol::plan::Consistency::PerChunk,
        };
        let cancel = CancellationToken::new();
        let planned = plan_entity(source, &events, &settings(), &job, 0, &cancel)
            .await
            .unwrap();
        assert_eq!(planned.outcome, Outcome::Ack);
        let recorded = events.events();
        let [WorkerEvent::EntityPlanned(planned)] = recorded.as_slice() else {
            panic!("planning failed: {recorded:?}");
        };
        let mut chunks = Vec::new();
        for (number, range) in planned.ranges.iter().enumerate() {
            let events = MemoryEvents::granting();
            let job = ExportChunk {
                operation_id: backup_id,
                plan_id: plan.plan_id.clone(),
                backup_id,
                entity: planned.entity.clone(),
                chunk: u32::try_from(number).unwrap(),
                range: range.clone(),
                snapshot_id: None,
                attempt: 1,
                part_bytes,
            };
            let outcome = export_chunk(source, storage, &events, &settings(), &job, 0, &cancel)
                .await
                .unwrap();
            assert_eq!(outcome, Outcome::Ack, "{:?}", events.events());
            let parts: Vec<_> = events
                .events()
                .into_iter()
                .filter_map(|event| match event {
                    WorkerEvent::PartWritten(written) => Some(written.part),
                    // The last part travels with chunk_done.
                    WorkerEvent::ChunkDone(done) => done.part,
                    _ => None,
                })
                .collect();
            chunks.push(ManifestChunk {
                chunk: job.chunk,
                range: range.clone(),
                rows: parts.iter().map(|part| part.rows).sum(),
                parts,
            });
        }
        let parts = || chunks.iter().flat_map(|chunk| chunk.parts.iter());
        entities.push(ManifestEntity {
            spec: planned.entity.clone(),
            rows: parts().map(|part| part.rows).sum(),
            raw_bytes: parts().map(|part| part.raw_bytes).sum(),
            compressed_bytes: parts().map(|part| part.compressed_bytes).sum(),
            chunks,
        });
    }
    let totals = Totals {
        entities: entities.len() as u64,
        chunks: entities
            .iter()
            .map(|entity| entity.chunks.len() as u64)
            .sum(),
        parts: entities
            .iter()
            .flat_map(|entity| &entity.chunks)
            .map(|chunk| chunk.parts.len() as u64)
            .sum(),
        rows: entities.iter().map(|entity| entity.rows).sum(),
        raw_bytes: entities.iter().map(|entity| entity.raw_bytes).sum(),
        compressed_bytes: entities.iter().map(|entity| entity.compressed_bytes).sum(),
    };
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        backup_id,
        plan: plan.clone(),
        consistency: ConsistencyFacts {
            mode: koan_protocol::plan::Consistency::PerChunk,
            snapshots: Vec::new(),
            notes: Vec::new(),
        },
        base_backup: None,
        labels: BTreeMap::new(),
        started_at,
        completed_at: chrono::Utc::now(),
        totals,
        entities,
    };
    let path = manifest_path(plan, backup_id).unwrap();
    let events = MemoryEvents::granting();
    let job = Finalize {
        operation_id: backup_id,
        path: path.clone(),
        manifest: manifest.clone(),
    };
    assert_eq!(
        finalize(storage, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(
            events.events().as_slice(),
            [WorkerEvent::ManifestWritten(_)]
        ),
        "{:?}",
        events.events()
    );
    (manifest, path)
}

/// Plans a restore; returns the planned entities, or the events when planning did not succeed.
pub async fn plan(
    target: &Source,
    storage: &Storage,
    manifest: &Manifest,
    manifest_path: &str,
    mode: RestoreMode,
    operation_id: Uuid,
) -> Result<Vec<RestoreEntity>, Vec<WorkerEvent>> {
    let events = MemoryEvents::granting();
    let job = PlanRestore {
        operation_id,
        backup_id: manifest.backup_id,
        manifest_path: manifest_path.to_string(),
        mode,
        entities: Vec::new(),
        target_scope: None,
    };
    let outcome = plan_restore(target, storage, &events, &job, 0)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Ack);
    match events.events().as_slice() {
        [WorkerEvent::RestorePlanned(planned)] => Ok(planned.entities.clone()),
        other => Err(other.to_vec()),
    }
}

/// Imports every part of every planned entity, then applies `replace`
/// restores; returns every event reported.
pub async fn import_all(
    target: &Source,
    storage: &Storage,
    entities: &[RestoreEntity],
    mode: RestoreMode,
    operation_id: Uuid,
) -> Vec<WorkerEvent> {
    let events = MemoryEvents::granting();
    let cancel = CancellationToken::new();
    for entity in entities {
        let restore_target = RestoreTarget {
            mode,
            target_scope: None,
            staging_table: entity.staging_table.clone(),
        };
        for (unit, part) in entity.parts.iter().enumerate() {
            let job = ImportPart {
                operation_id,
                entity: entity.spec.clone(),
                target: restore_target.clone(),
                unit: u32::try_from(unit).unwrap(),
                chunk: part.chunk,
                part: part.part.clone(),
            };
            let outcome = import_part(target, storage, &events, &job, 0, &cancel)
                .await
                .unwrap();
            assert_eq!(outcome, Outcome::Ack, "{:?}", events.events());
        }
        if mode == RestoreMode::Replace {
            let job = ApplyRestore {
                operation_id,
                entity: entity.spec.clone(),
                target: restore_target,
            };
            let outcome = apply_restore(target, &events, &job, 0, &cancel)
                .await
                .unwrap();
            assert_eq!(outcome, Outcome::Ack, "{:?}", events.events());
        }
    }
    events.events()
}

/// Every row of a table as (key text, jsonb text), in key order: equal
/// strings mean jsonb-equal documents.
pub async fn dump(client: &tokio_postgres::Client, table: &str) -> Vec<(String, String)> {
    client
        .query(
            &format!(r#"SELECT "Id"::text, "Json"::jsonb::text FROM "{table}" ORDER BY "Id""#),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Runs a verify job; returns its events.
pub async fn verify(storage: &Storage, manifest: &Manifest, path: &str) -> Vec<WorkerEvent> {
    let events = MemoryEvents::granting();
    let job = VerifyJob {
        operation_id: Uuid::now_v7(),
        backup_id: manifest.backup_id,
        manifest_path: path.to_string(),
    };
    let outcome = verify_backup(
        storage,
        &events,
        &settings(),
        &job,
        0,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome, Outcome::Ack);
    events.events()
}

/// The problems of the `VerifyDone` that ends `events`.
pub fn verify_problems(events: &[WorkerEvent]) -> Vec<String> {
    match events.last() {
        Some(WorkerEvent::VerifyDone(done)) => done.problems.clone(),
        other => panic!("expected VerifyDone last, got {other:?} in {events:?}"),
    }
}
