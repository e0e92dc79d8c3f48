//! Applying worker reports: one transaction per report, holding the write
//! lock from its first statement. Entity-level reports live here; chunk
//! reports in `chunks`, restore reports in `imports`, replay reports in
//! `replays`; reports that only move the operation's figures (manifest,
//! verify, operation failed) are decided in [`crate::store::rules`].

use tracing::{debug, warn};

use koan_protocol::archive::{KeyRange, SnapshotFacts};
use koan_protocol::events::{EntityFailed, EntityPlanned, WorkerEvent};
use koan_protocol::plan::EntitySpec;

use crate::error::CoordinatorError;
use crate::store::rules::{
    ExportContext, check_ranges, count_planned_entity, entity_failure, export_job, fail,
    finalize_failed, manifest_written, operation_failed, report_role, verify_done, verify_progress,
};
use crate::store::{Applied, EntityState};

use super::db::{Db, get, get_json, int, json, micros, text};
use super::finalize::finalize_if_done;
use super::operations::{OperationRow, read_operation, save_operation};
use super::outbox::enqueue;
use super::{chunks, imports, lifecycle, replays};

/// Applies one worker report; rolls back when it changes nothing.
pub(super) fn apply(db: &Db<'_>, event: &WorkerEvent) -> Result<Applied, CoordinatorError> {
    let operation_id = event.operation_id();
    if let WorkerEvent::Discarded(report) = event {
        // Arrives after the operation ended (`cancelled`): recorded, nothing to announce.
        lifecycle::discarded(db, report)?;
        return Ok(Applied::Unchanged("discard recorded"));
    }
    let Some(mut operation) = read_operation(db, operation_id)? else {
        debug!(%operation_id, "report for an unknown operation ignored");
        db.discard();
        return Ok(Applied::Unchanged("unknown operation"));
    };
    if operation.record.state.is_terminal() {
        debug!(%operation_id, state = operation.record.state.as_str(), "report for a finished operation ignored");
        db.discard();
        return Ok(Applied::Unchanged("operation is finished"));
    }
    if let Some(role) = report_role(event)
        && role != operation.record.role
    {
        return Err(CoordinatorError::InvalidReport(format!(
            "{kind} concerns a {}, but operation {operation_id} is a {}",
            role.as_str(),
            operation.record.role.as_str(),
            kind = koan_protocol::codec::Message::kind(event),
        )));
    }
    let applied = match event {
        WorkerEvent::EntityPlanned(planned) => entity_planned(db, &mut operation, planned)?,
        WorkerEvent::EntityFailed(failed) => entity_failed(db, &mut operation, failed)?,
        WorkerEvent::ClaimChunk(_) => {
            return Err(CoordinatorError::InvalidReport(
                "claim_chunk is a request, not a report".into(),
            ));
        }
        WorkerEvent::ChunkProgress(report) => chunks::progress(db, &mut operation, report)?,
        WorkerEvent::PartWritten(report) => chunks::part_written(db, &mut operation, report)?,
        WorkerEvent::ChunkDone(report) => chunks::done(db, &mut operation, report)?,
        WorkerEvent::ChunkFailed(report) => chunks::failed(db, &mut operation, report)?,
        WorkerEvent::ManifestWritten(written) => manifest_written(&mut operation.record, written),
        WorkerEvent::FinalizeFailed(failed) => finalize_failed(&mut operation.record, failed),
        WorkerEvent::RestorePlanned(planned) => {
            imports::restore_planned(db, &mut operation, planned)?
        }
        WorkerEvent::PartImported(report) => imports::part_imported(db, &mut operation, report)?,
        WorkerEvent::ImportFailed(report) => imports::import_failed(db, &mut operation, report)?,
        WorkerEvent::RestoreApplied(report) => {
            imports::restore_applied(db, &mut operation, report)?
        }
        WorkerEvent::ReplayDone(report) => replays::replay_done(db, &mut operation, report)?,
        WorkerEvent::VerifyProgress(report) => {
            verify_progress(&mut operation.record, report, db.now)
        }
        WorkerEvent::VerifyDone(report) => verify_done(&mut operation.record, report),
        WorkerEvent::OperationFailed(failed) => operation_failed(&mut operation.record, failed),
        WorkerEvent::Discarded(_) => Applied::Unchanged("discard recorded"),
    };
    save_if_changed(db, &mut operation, applied)
}

/// Saves the operation when `applied` changed it; otherwise rolls back.
pub(super) fn save_if_changed(
    db: &Db<'_>,
    operation: &mut OperationRow,
    applied: Applied,
) -> Result<Applied, CoordinatorError> {
    if applied == Applied::Changed {
        save_operation(db, operation)?;
    } else {
        db.discard();
    }
    Ok(applied)
}

/// Records an entity's ranges as chunks and queues their export jobs; the
/// first report for an entity wins, later ones change nothing.
fn entity_planned(
    db: &Db<'_>,
    operation: &mut OperationRow,
    planned: &EntityPlanned,
) -> Result<Applied, CoordinatorError> {
    let operation_id = operation.record.id;
    let name = planned.entity.name.as_str();
    let Some((state, mut spec)) = db.query_opt(
        "read entity",
        "SELECT state, spec FROM entities WHERE operation_id = ?1 AND name = ?2",
        (text(operation_id), name),
        |row| {
            Ok((
                get::<String>(row, "state")?,
                get_json::<EntitySpec>(row, "spec")?,
            ))
        },
    )?
    else {
        return Err(CoordinatorError::InvalidReport(format!(
            "entity '{}' is not in the plan of operation {operation_id}",
            name.escape_default()
        )));
    };
    if state != EntityState::Planning.as_str() {
        return Ok(Applied::Unchanged("entity already planned"));
    }
    check_ranges(name, &planned.ranges)?;
    if let Some(snapshot) = &planned.snapshot
        && snapshot.entity != name
    {
        warn!(%operation_id, entity = name, snapshot_entity = %snapshot.entity, "snapshot facts name another entity");
    }
    // The stored spec is authoritative; the worker contributes the key type only.
    if spec.key_type.is_none() {
        spec.key_type = planned.entity.key_type;
    }
    for (chunk, range) in (0i64..).zip(&planned.ranges) {
        db.execute(
            "record chunk",
            "INSERT INTO chunks (operation_id, entity, chunk, lo, hi, state, attempt, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 1, ?6)",
            (
                text(operation_id),
                name,
                chunk,
                &range.lo,
                &range.hi,
                micros(db.now),
            ),
        )?;
    }
    let chunk_count = u64::try_from(planned.ranges.len()).unwrap_or(u64::MAX);
    let entity_state = if chunk_count == 0 {
        EntityState::Done
    } else {
        EntityState::Running
    };
    db.execute(
        "record planned entity",
        "UPDATE entities SET state = ?3, spec = ?4, rows_total = ?5, chunks_total = ?6,
             snapshot = ?7
         WHERE operation_id = ?1 AND name = ?2",
        (
            text(operation_id),
            name,
            entity_state.as_str(),
            json("entity spec", &spec)?,
            int(planned.rows_total),
            int(chunk_count),
            planned
                .snapshot
                .as_ref()
                .map(|snapshot| json::<SnapshotFacts>("snapshot", snapshot))
                .transpose()?,
        ),
    )?;
    let context = ExportContext {
        operation_id,
        plan_id: &operation.record.plan_id,
        backup_id: operation.record.backup_id.unwrap_or(operation_id),
        entity: &spec,
        consistency: operation.record.consistency,
        snapshot: planned.snapshot.as_ref(),
        part_bytes: db.policy.part_bytes,
    };
    let jobs = planned
        .ranges
        .iter()
        .zip(0u32..)
        .map(|(range, chunk)| export_job(&context, chunk, KeyRange::clone(range), 1))
        .collect::<Result<Vec<_>, _>>()?;
    enqueue(db, &jobs)?;
    count_planned_entity(
        &mut operation.record,
        planned.rows_total,
        chunk_count,
        db.now,
    );
    finalize_if_done(db, operation)?;
    Ok(Applied::Changed)
}

/// An entity could not be planned: the operation fails, naming it. A failure
/// reported by a redelivered plan job of an entity already planned changes nothing.
fn entity_failed(
    db: &Db<'_>,
    operation: &mut OperationRow,
    failed: &EntityFailed,
) -> Result<Applied, CoordinatorError> {
    let state = db.query_opt(
        "read entity",
        "SELECT state FROM entities WHERE operation_id = ?1 AND name = ?2",
        (text(operation.record.id), &failed.entity),
        |row| get::<String>(row, "state"),
    )?;
    if state.is_some_and(|state| state != EntityState::Planning.as_str()) {
        return Ok(Applied::Unchanged("entity already planned"));
    }
    fail(
        &mut operation.record,
        entity_failure(&failed.entity, &failed.code, &failed.error),
    );
    Ok(Applied::Changed)
}
