//! Operation and entity rows: reading, locking, counter deltas, and saving an
//! operation with its percent, sequence and public event.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::Json;
use uuid::Uuid;

use koan_protocol::plan::Consistency;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::progress;
use crate::store::rules::{self, QueuedMessage, event_for};
use crate::store::{EntityRecord, EntityState, OperationRecord, OperationRole, StateStore};

use super::db::{Db, get, int, shifted, uint};
use super::outbox::enqueue;

/// Columns of `operations` read into an [`OperationRow`], in order.
pub(super) const OPERATION_COLUMNS: &str = "id, kind, state, plan_id, backup_id, consistency, \
     labels, description, percent, entities_total, entities_planned, rows_total, rows_durable, \
     rows_pending, bytes_raw, bytes_raw_pending, bytes_compressed, parts_done, chunks_total, \
     chunks_done, manifest, error, sequence, created_at, updated_at, running_since, \
     published_sequence, published_at, mode, source_operation, target_scope, pool, \
     rows_written, rows_skipped, rows_failed, problems";

/// Columns of `entities` read into an [`EntityRecord`], in order.
pub(super) const ENTITY_COLUMNS: &str = "name, ordinal, state, rows_total, rows_durable, \
     rows_pending, bytes_raw, bytes_raw_pending, bytes_compressed, chunks_total, chunks_done";

/// An operation as read, with what the store needs to pace its events.
#[derive(Debug, Clone)]
pub(super) struct OperationRow {
    /// The figures.
    pub record: OperationRecord,
    /// The state when read.
    pub read_state: OperationState,
    /// Last sequence announced by a public event.
    pub published_sequence: u64,
    /// When it was announced.
    pub published_at: Option<DateTime<Utc>>,
}

/// Reads an operation row selected with [`OPERATION_COLUMNS`].
pub(super) fn operation_from_row(row: &Row) -> Result<OperationRow, CoordinatorError> {
    let kind: String = get(row, "kind")?;
    let state: String = get(row, "state")?;
    let consistency: String = get(row, "consistency")?;
    let state = OperationState::parse(&state)
        .ok_or_else(|| CoordinatorError::corrupt("operation state", &state))?;
    let Json(labels): Json<BTreeMap<String, String>> = get(row, "labels")?;
    let mode = get::<Option<String>>(row, "mode")?
        .map(|mode| rules::parse_mode(&mode).ok_or_else(|| CoordinatorError::corrupt("mode", mode)))
        .transpose()?;
    let Json(problems): Json<Vec<String>> = get(row, "problems")?;
    let record = OperationRecord {
        id: get(row, "id")?,
        role: OperationRole::parse(&kind)
            .ok_or_else(|| CoordinatorError::corrupt("operation kind", &kind))?,
        state,
        plan_id: get(row, "plan_id")?,
        backup_id: get(row, "backup_id")?,
        consistency: match consistency.as_str() {
            "snapshot" => Consistency::Snapshot,
            "per-chunk" => Consistency::PerChunk,
            other => return Err(CoordinatorError::corrupt("consistency", other)),
        },
        labels,
        description: get(row, "description")?,
        percent: get(row, "percent")?,
        entities_total: uint(get(row, "entities_total")?),
        entities_planned: uint(get(row, "entities_planned")?),
        rows_total: uint(get(row, "rows_total")?),
        rows_durable: uint(get(row, "rows_durable")?),
        rows_pending: uint(get(row, "rows_pending")?),
        bytes_raw: uint(get(row, "bytes_raw")?),
        bytes_raw_pending: uint(get(row, "bytes_raw_pending")?),
        bytes_compressed: uint(get(row, "bytes_compressed")?),
        parts_done: uint(get(row, "parts_done")?),
        chunks_total: uint(get(row, "chunks_total")?),
        chunks_done: uint(get(row, "chunks_done")?),
        manifest: get(row, "manifest")?,
        error: get(row, "error")?,
        sequence: uint(get(row, "sequence")?),
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
        running_since: get(row, "running_since")?,
        mode,
        source_operation: get(row, "source_operation")?,
        target_scope: get(row, "target_scope")?,
        pool: get(row, "pool")?,
        rows_written: uint(get(row, "rows_written")?),
        rows_skipped: uint(get(row, "rows_skipped")?),
        rows_failed: uint(get(row, "rows_failed")?),
        problems,
    };
    Ok(OperationRow {
        read_state: record.state,
        record,
        published_sequence: uint(get(row, "published_sequence")?),
        published_at: get(row, "published_at")?,
    })
}

/// Reads an entity row selected with [`ENTITY_COLUMNS`].
pub(super) fn entity_from_row(row: &Row) -> Result<EntityRecord, CoordinatorError> {
    let state: String = get(row, "state")?;
    Ok(EntityRecord {
        name: get(row, "name")?,
        ordinal: u32::try_from(get::<i32>(row, "ordinal")?).unwrap_or(0),
        state: EntityState::parse(&state)
            .ok_or_else(|| CoordinatorError::corrupt("entity state", &state))?,
        rows_total: uint(get(row, "rows_total")?),
        rows_durable: uint(get(row, "rows_durable")?),
        rows_pending: uint(get(row, "rows_pending")?),
        bytes_raw: uint(get(row, "bytes_raw")?),
        bytes_raw_pending: uint(get(row, "bytes_raw_pending")?),
        bytes_compressed: uint(get(row, "bytes_compressed")?),
        chunks_total: uint(get(row, "chunks_total")?),
        chunks_done: uint(get(row, "chunks_done")?),
    })
}

/// Locks and reads an operation: reports of one operation apply one at a time.
pub(super) async fn lock_operation(
    db: &Db<'_>,
    operation_id: Uuid,
) -> Result<Option<OperationRow>, CoordinatorError> {
    let text = format!("SELECT {OPERATION_COLUMNS} FROM {{s}}.operations WHERE id = $1 FOR UPDATE");
    db.query_opt("lock operation", &text, &[&operation_id])
        .await?
        .as_ref()
        .map(operation_from_row)
        .transpose()
}

/// The entities of an operation, in plan order.
pub(super) async fn load_entities(
    db: &Db<'_>,
    operation_id: Uuid,
) -> Result<Vec<EntityRecord>, CoordinatorError> {
    let text = format!(
        "SELECT {ENTITY_COLUMNS} FROM {{s}}.entities WHERE operation_id = $1 ORDER BY ordinal"
    );
    db.query("read entities", &text, &[&operation_id])
        .await?
        .iter()
        .map(entity_from_row)
        .collect()
}

/// Signed changes to the counters of an entity and its operation.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Delta {
    pub rows_durable: i64,
    pub rows_pending: i64,
    pub bytes_raw: i64,
    pub bytes_raw_pending: i64,
    pub bytes_compressed: i64,
    pub parts: i64,
    pub chunks_done: i64,
}

/// Applies `delta` to `entity` (in the table) and to the operation (in memory).
/// An entity whose last chunk is done becomes `done`.
pub(super) async fn apply_delta(
    db: &Db<'_>,
    operation: &mut OperationRow,
    entity: &str,
    delta: Delta,
) -> Result<(), CoordinatorError> {
    db.execute(
        "update entity counters",
        "UPDATE {s}.entities SET
             rows_durable = GREATEST(rows_durable + $3, 0),
             rows_pending = GREATEST(rows_pending + $4, 0),
             bytes_raw = GREATEST(bytes_raw + $5, 0),
             bytes_raw_pending = GREATEST(bytes_raw_pending + $6, 0),
             bytes_compressed = GREATEST(bytes_compressed + $7, 0),
             chunks_done = chunks_done + $8,
             state = CASE WHEN state = 'running' AND chunks_done + $8 >= chunks_total
                          THEN 'done' ELSE state END
         WHERE operation_id = $1 AND name = $2",
        &[
            &operation.record.id,
            &entity,
            &delta.rows_durable,
            &delta.rows_pending,
            &delta.bytes_raw,
            &delta.bytes_raw_pending,
            &delta.bytes_compressed,
            &delta.chunks_done,
        ],
    )
    .await?;
    let record = &mut operation.record;
    record.rows_durable = shifted(record.rows_durable, delta.rows_durable);
    record.rows_pending = shifted(record.rows_pending, delta.rows_pending);
    record.bytes_raw = shifted(record.bytes_raw, delta.bytes_raw);
    record.bytes_raw_pending = shifted(record.bytes_raw_pending, delta.bytes_raw_pending);
    record.bytes_compressed = shifted(record.bytes_compressed, delta.bytes_compressed);
    record.parts_done = shifted(record.parts_done, delta.parts);
    record.chunks_done = shifted(record.chunks_done, delta.chunks_done);
    Ok(())
}

/// Fails the operation with `error` (its `failed` event goes out on save).
pub(super) fn fail(operation: &mut OperationRow, error: String) {
    rules::fail(&mut operation.record, error);
}

/// Saves a changed operation: next percent (never lower), next sequence, and
/// its public event when the state changed or the progress interval passed.
pub(super) async fn save_operation(
    db: &Db<'_>,
    operation: &mut OperationRow,
) -> Result<(), CoordinatorError> {
    let due = rules::advance_operation(
        &mut operation.record,
        operation.read_state,
        operation.published_at,
        db.now,
        db.store.policy().progress_interval,
    );
    if due {
        announce(db, operation).await?;
    }
    write_operation(db, operation).await
}

/// Queues the public event of the operation's current figures.
pub(super) async fn announce(
    db: &Db<'_>,
    operation: &mut OperationRow,
) -> Result<(), CoordinatorError> {
    let entities = load_entities(db, operation.record.id).await?;
    let report = progress::report(
        &operation.record,
        &entities,
        db.store.token_secret(),
        db.now,
    );
    enqueue(db, &[QueuedMessage::event(&event_for(report))?]).await?;
    operation.published_sequence = operation.record.sequence;
    operation.published_at = Some(db.now);
    Ok(())
}

async fn write_operation(db: &Db<'_>, operation: &OperationRow) -> Result<(), CoordinatorError> {
    let record = &operation.record;
    let finished = record.state.is_terminal();
    db.execute(
        "save operation",
        "UPDATE {s}.operations SET
             state = $2, percent = GREATEST(percent, $3), entities_planned = $4,
             rows_total = $5, rows_durable = $6, rows_pending = $7, bytes_raw = $8,
             bytes_raw_pending = $9, bytes_compressed = $10, parts_done = $11,
             chunks_total = $12, chunks_done = $13, manifest = $14, error = $15,
             sequence = $16, updated_at = $17, running_since = $18,
             published_sequence = $19, published_at = $20,
             finished_at = CASE WHEN $21 THEN COALESCE(finished_at, $17) ELSE finished_at END,
             entities_total = $22, rows_written = $23, rows_skipped = $24, rows_failed = $25,
             problems = $26
         WHERE id = $1",
        &[
            &record.id,
            &record.state.as_str(),
            &record.percent,
            &int(record.entities_planned),
            &int(record.rows_total),
            &int(record.rows_durable),
            &int(record.rows_pending),
            &int(record.bytes_raw),
            &int(record.bytes_raw_pending),
            &int(record.bytes_compressed),
            &int(record.parts_done),
            &int(record.chunks_total),
            &int(record.chunks_done),
            &record.manifest,
            &record.error,
            &int(record.sequence),
            &record.updated_at,
            &record.running_since,
            &int(operation.published_sequence),
            &operation.published_at,
            &finished,
            &int(record.entities_total),
            &int(record.rows_written),
            &int(record.rows_skipped),
            &int(record.rows_failed),
            &Json(&record.problems),
        ],
    )
    .await?;
    Ok(())
}
