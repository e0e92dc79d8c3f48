//! Pause, resume and cancel: one transaction each, under the operation's row
//! lock, with the jobs and events they cause queued in the outbox.

use std::collections::BTreeMap;

use tokio_postgres::types::Json;
use tracing::info;
use uuid::Uuid;

use koan_protocol::archive::KeyRange;
use koan_protocol::events::Discarded;
use koan_protocol::plan::{Consistency, EntitySpec};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{ExportContext, discard_job, export_job, resumed_note};
use crate::store::{Lifecycle, OperationRole};

use super::PgStateStore;
use super::db::{Db, get, int, int4, uint, uint4};
use super::finalize::finalize_if_done;
use super::operations::{Delta, OperationRow, apply_delta, lock_operation, save_operation};
use super::outbox::enqueue;

fn unknown(operation_id: Uuid) -> Lifecycle {
    Lifecycle::refused(
        "unknown_operation",
        format!("no operation {operation_id} is known"),
    )
}

pub(super) async fn pause(
    store: &PgStateStore,
    operation_id: Uuid,
) -> Result<Lifecycle, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let Some(mut operation) = lock_operation(&db, operation_id).await? else {
        return Ok(unknown(operation_id));
    };
    if operation.record.role != OperationRole::Backup {
        return Ok(Lifecycle::refused(
            "not_a_backup",
            format!(
                "operation {operation_id} is a {}; only backups can be paused (cancel it instead)",
                operation.record.role.as_str()
            ),
        ));
    }
    match operation.record.state {
        OperationState::Paused => return Ok(Lifecycle::Done { existing: true }),
        OperationState::Planning | OperationState::Running => {}
        other => {
            return Ok(Lifecycle::refused(
                "not_running",
                format!("operation {operation_id} is {}", other.as_str()),
            ));
        }
    }
    operation.record.state = OperationState::Paused;
    db.execute(
        "record pause",
        "UPDATE {s}.operations SET paused_at = $2 WHERE id = $1",
        &[&operation_id, &db.now],
    )
    .await?;
    save_operation(&db, &mut operation).await?;
    db.commit().await?;
    info!(%operation_id, "backup paused");
    Ok(Lifecycle::Done { existing: false })
}

pub(super) async fn resume(
    store: &PgStateStore,
    operation_id: Uuid,
) -> Result<Lifecycle, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let Some(mut operation) = lock_operation(&db, operation_id).await? else {
        return Ok(unknown(operation_id));
    };
    match operation.record.state {
        OperationState::Paused => {}
        OperationState::Planning | OperationState::Running
            if operation.record.role == OperationRole::Backup =>
        {
            return Ok(Lifecycle::Done { existing: true });
        }
        other => {
            return Ok(Lifecycle::refused(
                "not_paused",
                format!("operation {operation_id} is {}", other.as_str()),
            ));
        }
    }
    let record = &mut operation.record;
    record.state = if record.entities_planned >= record.entities_total {
        OperationState::Running
    } else {
        OperationState::Planning
    };
    let republished = republish_unfinished(&db, &mut operation).await?;
    if republished > 0 && operation.record.consistency == Consistency::Snapshot {
        let row = db
            .query_opt(
                "read pause time",
                "SELECT paused_at FROM {s}.operations WHERE id = $1",
                &[&operation_id],
            )
            .await?;
        let paused_at = row.map(|row| get(&row, "paused_at")).transpose()?.flatten();
        let note = resumed_note(paused_at, db.now);
        db.execute(
            "record consistency note",
            "UPDATE {s}.operations SET notes = notes || $2 WHERE id = $1",
            &[&operation_id, &Json(vec![note])],
        )
        .await?;
    }
    finalize_if_done(&db, &mut operation).await?;
    save_operation(&db, &mut operation).await?;
    db.commit().await?;
    info!(%operation_id, republished, "backup resumed");
    Ok(Lifecycle::Done { existing: false })
}

/// Re-publishes every chunk not done with the next attempt, as `pending`
/// without an owner; rows streamed by the interrupted runs leave the counters.
async fn republish_unfinished(
    db: &Db<'_>,
    operation: &mut OperationRow,
) -> Result<u64, CoordinatorError> {
    let operation_id = operation.record.id;
    let rows = db
        .query(
            "read unfinished chunks",
            "SELECT c.entity, c.chunk, c.lo, c.hi, c.attempt, c.rows_pending, c.raw_pending,
                    e.spec
             FROM {s}.chunks c
             JOIN {s}.entities e ON e.operation_id = c.operation_id AND e.name = c.entity
             WHERE c.operation_id = $1 AND c.state IN ('pending', 'running')
             ORDER BY e.ordinal, c.chunk
             FOR UPDATE OF c",
            &[&operation_id],
        )
        .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    let mut lost: BTreeMap<String, Delta> = BTreeMap::new();
    for row in &rows {
        let entity: String = get(row, "entity")?;
        let chunk = uint4(get(row, "chunk")?);
        let attempt = uint4(get(row, "attempt")?).saturating_add(1);
        let Json(spec): Json<EntitySpec> = get(row, "spec")?;
        // The snapshot the chunks were planned under was released on pause.
        let context = ExportContext {
            operation_id,
            plan_id: &operation.record.plan_id,
            backup_id: operation.record.backup_id.unwrap_or(operation_id),
            entity: &spec,
            consistency: operation.record.consistency,
            snapshot: None,
            part_bytes: db.store.policy().part_bytes,
        };
        let range = KeyRange {
            lo: get(row, "lo")?,
            hi: get(row, "hi")?,
        };
        jobs.push(export_job(&context, chunk, range, attempt)?);
        let entry = lost.entry(entity.clone()).or_default();
        entry.rows_pending -= int(uint(get(row, "rows_pending")?));
        entry.bytes_raw_pending -= int(uint(get(row, "raw_pending")?));
        db.execute(
            "re-publish chunk",
            "UPDATE {s}.chunks SET state = 'pending', attempt = $4, owner_run = NULL,
                 worker = NULL, lease_until = NULL, rows_pending = 0, raw_pending = 0,
                 parts_expected = NULL, updated_at = $5
             WHERE operation_id = $1 AND entity = $2 AND chunk = $3",
            &[
                &operation_id,
                &entity,
                &int4(chunk),
                &int4(attempt),
                &db.now,
            ],
        )
        .await?;
    }
    for (entity, delta) in lost {
        if delta.rows_pending != 0 || delta.bytes_raw_pending != 0 {
            apply_delta(db, operation, &entity, delta).await?;
        }
    }
    enqueue(db, &jobs).await?;
    Ok(u64::try_from(jobs.len()).unwrap_or(u64::MAX))
}

pub(super) async fn cancel(
    store: &PgStateStore,
    operation_id: Uuid,
) -> Result<Lifecycle, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let Some(mut operation) = lock_operation(&db, operation_id).await? else {
        return Ok(unknown(operation_id));
    };
    match operation.record.state {
        OperationState::Cancelled => return Ok(Lifecycle::Done { existing: true }),
        OperationState::Completed | OperationState::Failed => {
            return Ok(Lifecycle::refused(
                "not_running",
                format!(
                    "operation {operation_id} is {}",
                    operation.record.state.as_str()
                ),
            ));
        }
        OperationState::Finalizing if operation.record.role == OperationRole::Backup => {
            return Ok(Lifecycle::refused(
                "finalizing",
                format!("backup {operation_id} is writing its manifest; it completes in a moment"),
            ));
        }
        _ => {}
    }
    operation.record.state = OperationState::Cancelled;
    // The `cancelled` event goes first: workers stop their exports on it,
    // before the discard job removes what they wrote.
    save_operation(&db, &mut operation).await?;
    if operation.record.role == OperationRole::Backup {
        let rows = db
            .query(
                "read entity specs",
                "SELECT spec FROM {s}.entities WHERE operation_id = $1 ORDER BY ordinal",
                &[&operation_id],
            )
            .await?;
        let specs = rows
            .iter()
            .map(|row| get::<Json<EntitySpec>>(row, "spec").map(|Json(spec)| spec))
            .collect::<Result<Vec<_>, _>>()?;
        let backup_id = operation.record.backup_id.unwrap_or(operation_id);
        if let Some(job) = discard_job(operation_id, &operation.record.plan_id, backup_id, &specs)?
        {
            enqueue(&db, &[job]).await?;
        }
    }
    db.commit().await?;
    info!(%operation_id, role = operation.record.role.as_str(), "operation cancelled");
    Ok(Lifecycle::Done { existing: false })
}

/// A cancelled backup's output is removed: recorded, the state stays `cancelled`.
/// Records a discard in the transaction of `db` (kept even though it
/// changes nothing clients see).
pub(super) async fn discarded(db: &Db<'_>, report: &Discarded) -> Result<(), CoordinatorError> {
    db.execute(
        "record discard",
        "UPDATE {s}.operations SET discarded_objects = COALESCE(discarded_objects, 0) + $2
         WHERE id = $1 AND kind = 'backup' AND state = 'cancelled'",
        &[&report.operation_id, &int(report.objects_removed)],
    )
    .await?;
    info!(operation_id = %report.operation_id, objects_removed = report.objects_removed, "cancelled backup discarded");
    Ok(())
}
