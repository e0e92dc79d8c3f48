//! Pause, resume and cancel: one transaction each, with the jobs and events
//! they cause queued in the outbox.

use std::collections::BTreeMap;

use tracing::info;
use uuid::Uuid;

use koan_protocol::archive::KeyRange;
use koan_protocol::events::Discarded;
use koan_protocol::plan::{Consistency, EntitySpec};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{ExportContext, discard_job, export_job, resumed_note};
use crate::store::{Lifecycle, OperationRole};

use super::db::{Db, get, get_json, get_opt_time, get_u32, get_u64, int, json, micros, text};
use super::finalize::finalize_if_done;
use super::operations::{Delta, OperationRow, apply_delta, read_operation, save_operation};
use super::outbox::enqueue;

fn unknown(operation_id: Uuid) -> Lifecycle {
    Lifecycle::refused(
        "unknown_operation",
        format!("no operation {operation_id} is known"),
    )
}

/// Rolls back (nothing changed) and returns `outcome`.
fn unchanged(db: &Db<'_>, outcome: Lifecycle) -> Result<Lifecycle, CoordinatorError> {
    db.discard();
    Ok(outcome)
}

pub(super) fn pause(db: &Db<'_>, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
    let Some(mut operation) = read_operation(db, operation_id)? else {
        return unchanged(db, unknown(operation_id));
    };
    if operation.record.role != OperationRole::Backup {
        let refusal = Lifecycle::refused(
            "not_a_backup",
            format!(
                "operation {operation_id} is a {}; only backups can be paused (cancel it instead)",
                operation.record.role.as_str()
            ),
        );
        return unchanged(db, refusal);
    }
    match operation.record.state {
        OperationState::Paused => return unchanged(db, Lifecycle::Done { existing: true }),
        OperationState::Planning | OperationState::Running => {}
        other => {
            let refusal = Lifecycle::refused(
                "not_running",
                format!("operation {operation_id} is {}", other.as_str()),
            );
            return unchanged(db, refusal);
        }
    }
    operation.record.state = OperationState::Paused;
    db.execute(
        "record pause",
        "UPDATE operations SET paused_at = ?2 WHERE id = ?1",
        (text(operation_id), micros(db.now)),
    )?;
    save_operation(db, &mut operation)?;
    info!(%operation_id, "backup paused");
    Ok(Lifecycle::Done { existing: false })
}

pub(super) fn resume(db: &Db<'_>, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
    let Some(mut operation) = read_operation(db, operation_id)? else {
        return unchanged(db, unknown(operation_id));
    };
    match operation.record.state {
        OperationState::Paused => {}
        OperationState::Planning | OperationState::Running
            if operation.record.role == OperationRole::Backup =>
        {
            return unchanged(db, Lifecycle::Done { existing: true });
        }
        other => {
            let refusal = Lifecycle::refused(
                "not_paused",
                format!("operation {operation_id} is {}", other.as_str()),
            );
            return unchanged(db, refusal);
        }
    }
    let record = &mut operation.record;
    record.state = if record.entities_planned >= record.entities_total {
        OperationState::Running
    } else {
        OperationState::Planning
    };
    let republished = republish_unfinished(db, &mut operation)?;
    if republished > 0 && operation.record.consistency == Consistency::Snapshot {
        let (paused_at, mut notes) = db
            .query_opt(
                "read pause time",
                "SELECT paused_at, notes FROM operations WHERE id = ?1",
                [text(operation_id)],
                |row| {
                    Ok((
                        get_opt_time(row, "paused_at")?,
                        get_json::<Vec<String>>(row, "notes")?,
                    ))
                },
            )?
            .unwrap_or_default();
        notes.push(resumed_note(paused_at, db.now));
        db.execute(
            "record consistency note",
            "UPDATE operations SET notes = ?2 WHERE id = ?1",
            (text(operation_id), json("notes", &notes)?),
        )?;
    }
    finalize_if_done(db, &mut operation)?;
    save_operation(db, &mut operation)?;
    info!(%operation_id, republished, "backup resumed");
    Ok(Lifecycle::Done { existing: false })
}

/// A chunk not done yet, with what its export job needs.
struct Unfinished {
    entity: String,
    chunk: u32,
    range: KeyRange,
    attempt: u32,
    rows_pending: u64,
    raw_pending: u64,
    spec: EntitySpec,
}

/// Re-publishes every chunk not done with the next attempt, as `pending`
/// without an owner; rows streamed by the interrupted runs leave the counters.
fn republish_unfinished(
    db: &Db<'_>,
    operation: &mut OperationRow,
) -> Result<u64, CoordinatorError> {
    let operation_id = operation.record.id;
    let unfinished = db.query(
        "read unfinished chunks",
        "SELECT c.entity, c.chunk, c.lo, c.hi, c.attempt, c.rows_pending, c.raw_pending, e.spec
         FROM chunks c
         JOIN entities e ON e.operation_id = c.operation_id AND e.name = c.entity
         WHERE c.operation_id = ?1 AND c.state IN ('pending', 'running')
         ORDER BY e.ordinal, c.chunk",
        [text(operation_id)],
        |row| {
            Ok(Unfinished {
                entity: get(row, "entity")?,
                chunk: get_u32(row, "chunk")?,
                range: KeyRange {
                    lo: get(row, "lo")?,
                    hi: get(row, "hi")?,
                },
                attempt: get_u32(row, "attempt")?,
                rows_pending: get_u64(row, "rows_pending")?,
                raw_pending: get_u64(row, "raw_pending")?,
                spec: get_json(row, "spec")?,
            })
        },
    )?;
    let mut jobs = Vec::with_capacity(unfinished.len());
    let mut lost: BTreeMap<String, Delta> = BTreeMap::new();
    for chunk in unfinished {
        let attempt = chunk.attempt.saturating_add(1);
        // The snapshot the chunks were planned under was released on pause.
        let context = ExportContext {
            operation_id,
            plan_id: &operation.record.plan_id,
            backup_id: operation.record.backup_id.unwrap_or(operation_id),
            entity: &chunk.spec,
            consistency: operation.record.consistency,
            snapshot: None,
            part_bytes: db.policy.part_bytes,
        };
        jobs.push(export_job(&context, chunk.chunk, chunk.range, attempt)?);
        let entry = lost.entry(chunk.entity.clone()).or_default();
        entry.rows_pending -= int(chunk.rows_pending);
        entry.bytes_raw_pending -= int(chunk.raw_pending);
        db.execute(
            "re-publish chunk",
            "UPDATE chunks SET state = 'pending', attempt = ?4, owner_run = NULL,
                 worker = NULL, lease_until = NULL, rows_pending = 0, raw_pending = 0,
                 parts_expected = NULL, updated_at = ?5
             WHERE operation_id = ?1 AND entity = ?2 AND chunk = ?3",
            (
                text(operation_id),
                &chunk.entity,
                i64::from(chunk.chunk),
                i64::from(attempt),
                micros(db.now),
            ),
        )?;
    }
    for (entity, delta) in lost {
        if delta.rows_pending != 0 || delta.bytes_raw_pending != 0 {
            apply_delta(db, operation, &entity, delta)?;
        }
    }
    enqueue(db, &jobs)?;
    Ok(u64::try_from(jobs.len()).unwrap_or(u64::MAX))
}

pub(super) fn cancel(db: &Db<'_>, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
    let Some(mut operation) = read_operation(db, operation_id)? else {
        return unchanged(db, unknown(operation_id));
    };
    match operation.record.state {
        OperationState::Cancelled => return unchanged(db, Lifecycle::Done { existing: true }),
        OperationState::Completed | OperationState::Failed => {
            let refusal = Lifecycle::refused(
                "not_running",
                format!(
                    "operation {operation_id} is {}",
                    operation.record.state.as_str()
                ),
            );
            return unchanged(db, refusal);
        }
        OperationState::Finalizing if operation.record.role == OperationRole::Backup => {
            let refusal = Lifecycle::refused(
                "finalizing",
                format!("backup {operation_id} is writing its manifest; it completes in a moment"),
            );
            return unchanged(db, refusal);
        }
        _ => {}
    }
    operation.record.state = OperationState::Cancelled;
    // The `cancelled` event goes first: workers stop their exports on it,
    // before the discard job removes what they wrote.
    save_operation(db, &mut operation)?;
    if operation.record.role == OperationRole::Backup {
        let specs = db.query(
            "read entity specs",
            "SELECT spec FROM entities WHERE operation_id = ?1 ORDER BY ordinal",
            [text(operation_id)],
            |row| get_json::<EntitySpec>(row, "spec"),
        )?;
        let backup_id = operation.record.backup_id.unwrap_or(operation_id);
        if let Some(job) = discard_job(operation_id, &operation.record.plan_id, backup_id, &specs)?
        {
            enqueue(db, &[job])?;
        }
    }
    info!(%operation_id, role = operation.record.role.as_str(), "operation cancelled");
    Ok(Lifecycle::Done { existing: false })
}

/// A cancelled backup's output is removed: recorded, the state stays `cancelled`.
pub(super) fn discarded(db: &Db<'_>, report: &Discarded) -> Result<(), CoordinatorError> {
    db.execute(
        "record discard",
        "UPDATE operations SET discarded_objects = coalesce(discarded_objects, 0) + ?2
         WHERE id = ?1 AND kind = 'backup' AND state = 'cancelled'",
        (text(report.operation_id), int(report.objects_removed)),
    )?;
    info!(operation_id = %report.operation_id, objects_removed = report.objects_removed, "cancelled backup discarded");
    Ok(())
}
