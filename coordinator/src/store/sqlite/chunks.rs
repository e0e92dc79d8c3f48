//! Chunk reports (progress, parts, done, failed), fenced by the run that owns the chunk.

use tracing::warn;
use uuid::Uuid;

use koan_protocol::events::{ChunkDone, ChunkFailed, ChunkProgress, PartWritten};
use koan_protocol::plan::EntitySpec;

use crate::error::CoordinatorError;
use crate::store::Applied;
use crate::store::rules::{
    ChunkState, check_part_path, chunk_failure, delta, fail, lease_until as lease_end,
};

use super::db::{Db, get, get_json, get_u32, get_u64, int, micros, text};
use super::finalize::finalize_if_done;
use super::operations::{Delta, OperationRow, apply_delta};

/// A chunk as read for a decision.
#[derive(Debug, Clone)]
pub(super) struct ChunkRow {
    pub state: ChunkState,
    pub attempt: u32,
    pub failures: u32,
    pub owner_run: Option<String>,
    pub rows_durable: u64,
    pub rows_pending: u64,
    pub raw_pending: u64,
    pub parts: u32,
    pub parts_expected: Option<u32>,
}

impl ChunkRow {
    pub fn owned_by(&self, run: &str) -> bool {
        self.owner_run.as_deref() == Some(run)
    }
}

/// Reads a chunk (the transaction holds the write lock).
pub(super) fn read_chunk(
    db: &Db<'_>,
    operation_id: Uuid,
    entity: &str,
    chunk: u32,
) -> Result<Option<ChunkRow>, CoordinatorError> {
    db.query_opt(
        "read chunk",
        "SELECT state, attempt, failures, owner_run, rows_durable, rows_pending, raw_pending,
                parts, parts_expected
         FROM chunks WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (text(operation_id), entity, i64::from(chunk)),
        |row| {
            let state: String = get(row, "state")?;
            Ok(ChunkRow {
                state: ChunkState::parse(&state)
                    .ok_or_else(|| CoordinatorError::corrupt("chunk state", &state))?,
                attempt: get_u32(row, "attempt")?,
                failures: get_u32(row, "failures")?,
                owner_run: get(row, "owner_run")?,
                rows_durable: get_u64(row, "rows_durable")?,
                rows_pending: get_u64(row, "rows_pending")?,
                raw_pending: get_u64(row, "raw_pending")?,
                parts: get_u32(row, "parts")?,
                parts_expected: get::<Option<i64>>(row, "parts_expected")?
                    .map(|parts| u32::try_from(parts).unwrap_or(0)),
            })
        },
    )
}

/// When a lease granted or extended in this transaction ends.
pub(super) fn lease_until(db: &Db<'_>) -> i64 {
    micros(lease_end(db.now, db.policy.lease))
}

/// Reads a chunk the report's run owns, or says why the report changes nothing.
fn owned_chunk(
    db: &Db<'_>,
    operation_id: Uuid,
    entity: &str,
    chunk: u32,
    run: &str,
) -> Result<Result<ChunkRow, &'static str>, CoordinatorError> {
    let Some(row) = read_chunk(db, operation_id, entity, chunk)? else {
        return Ok(Err("unknown chunk"));
    };
    if !row.owned_by(run) {
        return Ok(Err("report from a run that does not own the chunk"));
    }
    if matches!(row.state, ChunkState::Done | ChunkState::Failed) {
        return Ok(Err("chunk is finished"));
    }
    Ok(Ok(row))
}

pub(super) fn progress(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ChunkProgress,
) -> Result<Applied, CoordinatorError> {
    let operation_id = operation.record.id;
    let chunk = match owned_chunk(db, operation_id, &report.entity, report.chunk, &report.run)? {
        Ok(chunk) => chunk,
        Err(reason) => return Ok(Applied::Unchanged(reason)),
    };
    db.execute(
        "record chunk progress",
        "UPDATE chunks SET rows_pending = ?4, raw_pending = ?5, lease_until = ?6, updated_at = ?7
         WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (
            text(operation_id),
            &report.entity,
            i64::from(report.chunk),
            int(report.rows_pending),
            int(report.raw_bytes_pending),
            lease_until(db),
            micros(db.now),
        ),
    )?;
    let change = Delta {
        rows_pending: delta(report.rows_pending, chunk.rows_pending),
        bytes_raw_pending: delta(report.raw_bytes_pending, chunk.raw_pending),
        ..Delta::default()
    };
    apply_delta(db, operation, &report.entity, change)?;
    Ok(Applied::Changed)
}

pub(super) fn part_written(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &PartWritten,
) -> Result<Applied, CoordinatorError> {
    let operation_id = operation.record.id;
    let chunk = match owned_chunk(db, operation_id, &report.entity, report.chunk, &report.run)? {
        Ok(chunk) => chunk,
        Err(reason) => return Ok(Applied::Unchanged(reason)),
    };
    let spec: EntitySpec = db
        .query_opt(
            "read entity spec",
            "SELECT spec FROM entities WHERE operation_id = ?1 AND name = ?2",
            (text(operation_id), &report.entity),
            |row| get_json(row, "spec"),
        )?
        .ok_or_else(|| CoordinatorError::corrupt("entity", "chunk without entity"))?;
    let part = &report.part;
    let backup_id = operation.record.backup_id.unwrap_or(operation_id);
    check_part_path(
        &spec,
        &operation.record.plan_id,
        backup_id,
        report.chunk,
        &report.run,
        part,
    )?;
    // Same range as the PostgreSQL store's `integer` column.
    let part_number = i32::try_from(part.part).map_err(|_| {
        CoordinatorError::InvalidReport(format!("part number {} is out of range", part.part))
    })?;
    let inserted = db.execute(
        "record part",
        "INSERT INTO parts (operation_id, entity, chunk, part, run, path, first_key,
             last_key, rows, raw_bytes, compressed_bytes, blake3, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT DO NOTHING",
        (
            text(operation_id),
            &report.entity,
            i64::from(report.chunk),
            part_number,
            &report.run,
            &part.path,
            &part.first_key,
            &part.last_key,
            int(part.rows),
            int(part.raw_bytes),
            int(part.compressed_bytes),
            &part.blake3,
            micros(db.now),
        ),
    )?;
    if inserted == 0 {
        return Ok(Applied::Unchanged("part already recorded"));
    }
    let rows_pending = chunk.rows_pending.saturating_sub(part.rows);
    let raw_pending = chunk.raw_pending.saturating_sub(part.raw_bytes);
    let parts = chunk.parts.saturating_add(1);
    db.execute(
        "add part to chunk",
        "UPDATE chunks SET rows_durable = rows_durable + ?4, raw_bytes = raw_bytes + ?5,
             compressed_bytes = compressed_bytes + ?6, parts = ?7, rows_pending = ?8,
             raw_pending = ?9, lease_until = ?10, updated_at = ?11
         WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (
            text(operation_id),
            &report.entity,
            i64::from(report.chunk),
            int(part.rows),
            int(part.raw_bytes),
            int(part.compressed_bytes),
            i64::from(parts),
            int(rows_pending),
            int(raw_pending),
            lease_until(db),
            micros(db.now),
        ),
    )?;
    let change = Delta {
        rows_durable: int(part.rows),
        rows_pending: delta(rows_pending, chunk.rows_pending),
        bytes_raw: int(part.raw_bytes),
        bytes_raw_pending: delta(raw_pending, chunk.raw_pending),
        bytes_compressed: int(part.compressed_bytes),
        parts: 1,
        chunks_done: 0,
    };
    apply_delta(db, operation, &report.entity, change)?;
    if chunk
        .parts_expected
        .is_some_and(|expected| parts >= expected)
    {
        complete(
            db,
            operation,
            &report.entity,
            report.chunk,
            rows_pending,
            raw_pending,
        )?;
    }
    Ok(Applied::Changed)
}

/// `chunk_done`, with the part it carries applied first, exactly as the
/// `part_written` it replaces followed by the `chunk_done` (one change).
pub(super) fn done(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ChunkDone,
) -> Result<Applied, CoordinatorError> {
    let part = match report.part_written() {
        Some(written) => part_written(db, operation, &written)?,
        None => Applied::Unchanged("no part carried"),
    };
    let done = all_parts_done(db, operation, report)?;
    Ok(if part == Applied::Changed { part } else { done })
}

fn all_parts_done(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ChunkDone,
) -> Result<Applied, CoordinatorError> {
    let operation_id = operation.record.id;
    let chunk = match owned_chunk(db, operation_id, &report.entity, report.chunk, &report.run)? {
        Ok(chunk) => chunk,
        Err(reason) => return Ok(Applied::Unchanged(reason)),
    };
    if chunk.parts >= report.parts {
        if chunk.parts > report.parts {
            warn!(%operation_id, entity = %report.entity, chunk = report.chunk,
                recorded = chunk.parts, reported = report.parts, "chunk reports fewer parts than recorded");
        }
        complete(
            db,
            operation,
            &report.entity,
            report.chunk,
            chunk.rows_pending,
            chunk.raw_pending,
        )?;
        return Ok(Applied::Changed);
    }
    // Some part_written reports are still on their way: done once they are in.
    db.execute(
        "expect parts",
        "UPDATE chunks SET parts_expected = ?4, lease_until = ?5, updated_at = ?6
         WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (
            text(operation_id),
            &report.entity,
            i64::from(report.chunk),
            i64::from(report.parts),
            lease_until(db),
            micros(db.now),
        ),
    )?;
    Ok(Applied::Changed)
}

/// Marks a chunk done, moves its pending figures out, and finalizes when it was the last.
fn complete(
    db: &Db<'_>,
    operation: &mut OperationRow,
    entity: &str,
    chunk: u32,
    rows_pending: u64,
    raw_pending: u64,
) -> Result<(), CoordinatorError> {
    db.execute(
        "complete chunk",
        "UPDATE chunks SET state = 'done', rows_pending = 0, raw_pending = 0,
             lease_until = NULL, parts_expected = parts, updated_at = ?4
         WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (
            text(operation.record.id),
            entity,
            i64::from(chunk),
            micros(db.now),
        ),
    )?;
    let change = Delta {
        rows_pending: -int(rows_pending),
        bytes_raw_pending: -int(raw_pending),
        chunks_done: 1,
        ..Delta::default()
    };
    apply_delta(db, operation, entity, change)?;
    finalize_if_done(db, operation)
}

pub(super) fn failed(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ChunkFailed,
) -> Result<Applied, CoordinatorError> {
    let chunk = match owned_chunk(
        db,
        operation.record.id,
        &report.entity,
        report.chunk,
        &report.run,
    )? {
        Ok(chunk) => chunk,
        Err(reason) => return Ok(Applied::Unchanged(reason)),
    };
    let failures = chunk.failures.saturating_add(1);
    let gave_up = !report.retryable || failures >= db.policy.max_chunk_attempts;
    let mut error = report.error.clone();
    if gave_up && report.retryable {
        error.push_str(&format!(" (gave up after {failures} failed runs)"));
    }
    let failure = Failure {
        entity: &report.entity,
        chunk: report.chunk,
        code: &report.code,
        error: &error,
        gave_up,
    };
    record_failure(db, operation, &chunk, &failure)?;
    Ok(Applied::Changed)
}

/// Fails a chunk for good if it is still at `attempt` and not finished,
/// whoever owns it (a job dead-lettered at that attempt); otherwise nothing.
pub(super) fn fail_at_attempt(
    db: &Db<'_>,
    operation: &mut OperationRow,
    entity: &str,
    chunk_no: u32,
    attempt: u32,
    code: &str,
    error: &str,
) -> Result<Applied, CoordinatorError> {
    let Some(chunk) = read_chunk(db, operation.record.id, entity, chunk_no)? else {
        return Ok(Applied::Unchanged("unknown chunk"));
    };
    if matches!(chunk.state, ChunkState::Done | ChunkState::Failed) {
        return Ok(Applied::Unchanged("chunk is finished"));
    }
    if chunk.attempt != attempt {
        return Ok(Applied::Unchanged(
            "a later attempt of the chunk was published",
        ));
    }
    let failure = Failure {
        entity,
        chunk: chunk_no,
        code,
        error,
        gave_up: true,
    };
    record_failure(db, operation, &chunk, &failure)?;
    Ok(Applied::Changed)
}

/// A chunk run that failed: what, why, and whether the chunk is given up.
struct Failure<'a> {
    entity: &'a str,
    chunk: u32,
    code: &'a str,
    error: &'a str,
    gave_up: bool,
}

/// Releases the chunk (pending again, or failed when given up), takes its
/// pending figures back and, when given up, fails the operation naming it.
fn record_failure(
    db: &Db<'_>,
    operation: &mut OperationRow,
    chunk: &ChunkRow,
    failure: &Failure<'_>,
) -> Result<(), CoordinatorError> {
    let state = if failure.gave_up {
        ChunkState::Failed
    } else {
        ChunkState::Pending
    };
    db.execute(
        "record chunk failure",
        "UPDATE chunks SET state = ?4, failures = ?5, error = ?6, owner_run = NULL,
             worker = NULL, lease_until = NULL, rows_pending = 0, raw_pending = 0,
             parts_expected = NULL, updated_at = ?7
         WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
        (
            text(operation.record.id),
            failure.entity,
            i64::from(failure.chunk),
            state.as_str(),
            i64::from(chunk.failures.saturating_add(1)),
            failure.error,
            micros(db.now),
        ),
    )?;
    let lost = Delta {
        rows_pending: -int(chunk.rows_pending),
        bytes_raw_pending: -int(chunk.raw_pending),
        ..Delta::default()
    };
    apply_delta(db, operation, failure.entity, lost)?;
    if failure.gave_up {
        fail(
            &mut operation.record,
            chunk_failure(failure.entity, failure.chunk, failure.code, failure.error),
        );
    }
    Ok(())
}
