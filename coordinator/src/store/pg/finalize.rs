//! Finalizing: once every chunk of every entity is done, assemble the manifest
//! from the accepted parts and queue the `finalize` job.

use std::collections::HashMap;

use tokio_postgres::types::Json;

use koan_protocol::archive::{KeyRange, ManifestChunk, PartInfo, SnapshotFacts, manifest_path};
use koan_protocol::jobs::{Finalize, Job};
use koan_protocol::plan::{BackupPlan, EntitySpec};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{BackupFacts, QueuedMessage, StoredEntity, assemble_manifest};

use super::db::{Db, get, uint, uint4};
use super::operations::OperationRow;
use super::outbox::enqueue;

/// Moves the operation to `finalizing` and queues its `finalize` job when
/// every entity is planned and every chunk done.
pub(super) async fn finalize_if_done(
    db: &Db<'_>,
    operation: &mut OperationRow,
) -> Result<(), CoordinatorError> {
    let record = &operation.record;
    let all_done = record.entities_planned >= record.entities_total
        && record.chunks_done >= record.chunks_total;
    if !all_done
        || !matches!(
            record.state,
            OperationState::Planning | OperationState::Running
        )
    {
        return Ok(());
    }
    let operation_id = record.id;
    let backup_id = record.backup_id.unwrap_or(operation_id);
    let row = db
        .query_opt(
            "read plan",
            "SELECT plan, notes FROM {s}.operations WHERE id = $1",
            &[&operation_id],
        )
        .await?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished while finalizing"))?;
    let Json(plan): Json<BackupPlan> = get(&row, "plan")?;
    let Json(notes): Json<Vec<String>> = get(&row, "notes")?;
    let entities = stored_entities(db, operation).await?;
    let manifest = assemble_manifest(
        BackupFacts {
            backup_id,
            plan: plan.clone(),
            labels: operation.record.labels.clone(),
            started_at: operation.record.created_at,
            completed_at: db.now,
            notes,
        },
        entities,
    );
    let path = manifest_path(&plan, backup_id)?;
    let pool = plan
        .entity_specs()
        .into_iter()
        .next()
        .map(|spec| spec.pool)
        .ok_or_else(|| CoordinatorError::corrupt("plan", "no entities"))?;
    let job = Job::Finalize(Finalize {
        operation_id,
        path,
        manifest,
    });
    enqueue(db, &[QueuedMessage::job(&pool, &job)?]).await?;
    operation.record.state = OperationState::Finalizing;
    Ok(())
}

/// Every entity in plan order with its chunks in order, each with its parts in order.
async fn stored_entities(
    db: &Db<'_>,
    operation: &OperationRow,
) -> Result<Vec<StoredEntity>, CoordinatorError> {
    let operation_id = operation.record.id;
    let mut parts: HashMap<(String, i32), Vec<PartInfo>> = HashMap::new();
    let part_rows = db
        .query(
            "read parts",
            "SELECT entity, chunk, part, path, first_key, last_key, rows, raw_bytes,
                    compressed_bytes, blake3
             FROM {s}.parts WHERE operation_id = $1 ORDER BY entity, chunk, part",
            &[&operation_id],
        )
        .await?;
    for row in &part_rows {
        let key = (get::<String>(row, "entity")?, get::<i32>(row, "chunk")?);
        parts.entry(key).or_default().push(PartInfo {
            part: uint4(get(row, "part")?),
            path: get(row, "path")?,
            first_key: get(row, "first_key")?,
            last_key: get(row, "last_key")?,
            rows: uint(get(row, "rows")?),
            raw_bytes: uint(get(row, "raw_bytes")?),
            compressed_bytes: uint(get(row, "compressed_bytes")?),
            blake3: get(row, "blake3")?,
        });
    }
    let mut chunks: HashMap<String, Vec<ManifestChunk>> = HashMap::new();
    let chunk_rows = db
        .query(
            "read chunks",
            "SELECT entity, chunk, lo, hi FROM {s}.chunks
             WHERE operation_id = $1 ORDER BY entity, chunk",
            &[&operation_id],
        )
        .await?;
    for row in &chunk_rows {
        let entity: String = get(row, "entity")?;
        let chunk: i32 = get(row, "chunk")?;
        let chunk_parts = parts.remove(&(entity.clone(), chunk)).unwrap_or_default();
        let rows = chunk_parts
            .iter()
            .fold(0u64, |sum, part| sum.saturating_add(part.rows));
        chunks.entry(entity).or_default().push(ManifestChunk {
            chunk: uint4(chunk),
            range: KeyRange {
                lo: get(row, "lo")?,
                hi: get(row, "hi")?,
            },
            rows,
            parts: chunk_parts,
        });
    }
    let entity_rows = db
        .query(
            "read entity specs",
            "SELECT name, spec, snapshot FROM {s}.entities
             WHERE operation_id = $1 ORDER BY ordinal",
            &[&operation_id],
        )
        .await?;
    let mut entities = Vec::with_capacity(entity_rows.len());
    for row in &entity_rows {
        let name: String = get(row, "name")?;
        let Json(spec): Json<EntitySpec> = get(row, "spec")?;
        let snapshot: Option<Json<SnapshotFacts>> = get(row, "snapshot")?;
        entities.push(StoredEntity {
            spec,
            snapshot: snapshot.map(|Json(facts)| facts),
            chunks: chunks.remove(&name).unwrap_or_default(),
        });
    }
    Ok(entities)
}
