//! Finalizing: once every chunk of every entity is done, assemble the manifest
//! from the accepted parts and queue the `finalize` job.

use std::collections::HashMap;

use koan_protocol::archive::{KeyRange, ManifestChunk, PartInfo, SnapshotFacts};
use koan_protocol::plan::{BackupPlan, EntitySpec};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{BackupFacts, StoredEntity, finalize_job, ready_to_finalize};

use super::db::{Db, get, get_json, get_opt_json, get_u32, get_u64, text};
use super::operations::OperationRow;
use super::outbox::enqueue;

/// Moves the operation to `finalizing` and queues its `finalize` job when
/// every entity is planned and every chunk done.
pub(super) fn finalize_if_done(
    db: &Db<'_>,
    operation: &mut OperationRow,
) -> Result<(), CoordinatorError> {
    if !ready_to_finalize(&operation.record) {
        return Ok(());
    }
    let operation_id = operation.record.id;
    let (plan, notes) = db
        .query_opt(
            "read plan",
            "SELECT plan, notes FROM operations WHERE id = ?1",
            [text(operation_id)],
            |row| {
                Ok((
                    get_json::<BackupPlan>(row, "plan")?,
                    get_json::<Vec<String>>(row, "notes")?,
                ))
            },
        )?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished while finalizing"))?;
    let entities = stored_entities(db, operation)?;
    let facts = BackupFacts {
        backup_id: operation.record.backup_id.unwrap_or(operation_id),
        plan,
        labels: operation.record.labels.clone(),
        started_at: operation.record.created_at,
        completed_at: db.now,
        notes,
    };
    enqueue(db, &[finalize_job(operation_id, facts, entities)?])?;
    operation.record.state = OperationState::Finalizing;
    Ok(())
}

/// Every entity in plan order with its chunks in order, each with its parts in order.
fn stored_entities(
    db: &Db<'_>,
    operation: &OperationRow,
) -> Result<Vec<StoredEntity>, CoordinatorError> {
    let operation_id = text(operation.record.id);
    let mut parts: HashMap<(String, u32), Vec<PartInfo>> = HashMap::new();
    let part_rows = db.query(
        "read parts",
        "SELECT entity, chunk, part, path, first_key, last_key, rows, raw_bytes,
                compressed_bytes, blake3
         FROM parts WHERE operation_id = ?1 ORDER BY entity, chunk, part",
        [&operation_id],
        |row| {
            let key = (get::<String>(row, "entity")?, get_u32(row, "chunk")?);
            let part = PartInfo {
                part: get_u32(row, "part")?,
                path: get(row, "path")?,
                first_key: get(row, "first_key")?,
                last_key: get(row, "last_key")?,
                rows: get_u64(row, "rows")?,
                raw_bytes: get_u64(row, "raw_bytes")?,
                compressed_bytes: get_u64(row, "compressed_bytes")?,
                blake3: get(row, "blake3")?,
            };
            Ok((key, part))
        },
    )?;
    for (key, part) in part_rows {
        parts.entry(key).or_default().push(part);
    }
    let mut chunks: HashMap<String, Vec<ManifestChunk>> = HashMap::new();
    let chunk_rows = db.query(
        "read chunks",
        "SELECT entity, chunk, lo, hi FROM chunks
         WHERE operation_id = ?1 ORDER BY entity, chunk",
        [&operation_id],
        |row| {
            let range = KeyRange {
                lo: get(row, "lo")?,
                hi: get(row, "hi")?,
            };
            Ok((get::<String>(row, "entity")?, get_u32(row, "chunk")?, range))
        },
    )?;
    for (entity, chunk, range) in chunk_rows {
        let chunk_parts = parts.remove(&(entity.clone(), chunk)).unwrap_or_default();
        let rows = chunk_parts
            .iter()
            .fold(0u64, |sum, part| sum.saturating_add(part.rows));
        chunks.entry(entity).or_default().push(ManifestChunk {
            chunk,
            range,
            rows,
            parts: chunk_parts,
        });
    }
    let entity_rows = db.query(
        "read entity specs",
        "SELECT name, spec, snapshot FROM entities
         WHERE operation_id = ?1 ORDER BY ordinal",
        [&operation_id],
        |row| {
            Ok((
                get::<String>(row, "name")?,
                get_json::<EntitySpec>(row, "spec")?,
                get_opt_json::<SnapshotFacts>(row, "snapshot")?,
            ))
        },
    )?;
    Ok(entity_rows
        .into_iter()
        .map(|(name, spec, snapshot)| StoredEntity {
            spec,
            snapshot,
            chunks: chunks.remove(&name).unwrap_or_default(),
        })
        .collect())
}
