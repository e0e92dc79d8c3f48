//! Applying worker reports: one transaction per report, after locking its
//! operation's row. Entity and operation-level reports live here; chunk
//! reports in `chunks`, restore reports in `imports`, replay reports in
//! `replays` and verify reports in `verifies`.

use tokio_postgres::types::Json;
use tracing::{debug, warn};

use koan_protocol::archive::KeyRange;
use koan_protocol::events::{EntityFailed, EntityPlanned, WorkerEvent};
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::{ExportContext, check_ranges, entity_failure, export_job, report_role};
use crate::store::{Applied, EntityState, rules};

use super::PgStateStore;
use super::db::{Db, get, int};
use super::finalize::finalize_if_done;
use super::operations::{OperationRow, fail, lock_operation, save_operation};
use super::outbox::enqueue;
use super::{chunks, imports, replays};

pub(super) async fn apply(
    store: &PgStateStore,
    event: &WorkerEvent,
) -> Result<Applied, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let (applied, keep) = apply_in(&db, event).await?;
    if keep {
        db.commit().await?;
    }
    Ok(applied)
}

/// Applies one report inside the transaction of `db`; true when what it
/// wrote is to be kept (committed), false when it changed nothing and is to
/// be rolled back.
pub(super) async fn apply_in(
    db: &Db<'_>,
    event: &WorkerEvent,
) -> Result<(Applied, bool), CoordinatorError> {
    let operation_id = event.operation_id();
    if let WorkerEvent::Discarded(report) = event {
        // Arrives after the operation ended (`cancelled`): recorded, nothing to announce.
        super::lifecycle::discarded(db, report).await?;
        return Ok((Applied::Unchanged("discard recorded"), true));
    }
    let Some(mut operation) = lock_operation(db, operation_id).await? else {
        debug!(%operation_id, "report for an unknown operation ignored");
        return Ok((Applied::Unchanged("unknown operation"), false));
    };
    if operation.record.state.is_terminal() {
        debug!(%operation_id, state = operation.record.state.as_str(), "report for a finished operation ignored");
        return Ok((Applied::Unchanged("operation is finished"), false));
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
        WorkerEvent::EntityPlanned(planned) => entity_planned(db, &mut operation, planned).await?,
        WorkerEvent::EntityFailed(failed) => entity_failed(db, &mut operation, failed).await?,
        WorkerEvent::ClaimChunk(_) => {
            return Err(CoordinatorError::InvalidReport(
                "claim_chunk is a request, not a report".into(),
            ));
        }
        WorkerEvent::ChunkProgress(report) => chunks::progress(db, &mut operation, report).await?,
        WorkerEvent::PartWritten(report) => {
            chunks::part_written(db, &mut operation, report).await?
        }
        WorkerEvent::ChunkDone(report) => chunks::done(db, &mut operation, report).await?,
        WorkerEvent::ChunkFailed(report) => chunks::failed(db, &mut operation, report).await?,
        WorkerEvent::ManifestWritten(written) => {
            rules::manifest_written(&mut operation.record, written)
        }
        WorkerEvent::FinalizeFailed(failed) => {
            rules::finalize_failed(&mut operation.record, failed)
        }
        WorkerEvent::RestorePlanned(planned) => {
            imports::restore_planned(db, &mut operation, planned).await?
        }
        WorkerEvent::PartImported(report) => {
            imports::part_imported(db, &mut operation, report).await?
        }
        WorkerEvent::ImportFailed(report) => {
            imports::import_failed(db, &mut operation, report).await?
        }
        WorkerEvent::RestoreApplied(report) => {
            imports::restore_applied(db, &mut operation, report).await?
        }
        WorkerEvent::ReplayDone(report) => replays::replay_done(db, &mut operation, report).await?,
        WorkerEvent::VerifyProgress(report) => {
            rules::verify_progress(&mut operation.record, report, db.now)
        }
        WorkerEvent::VerifyDone(report) => rules::verify_done(&mut operation.record, report),
        WorkerEvent::OperationFailed(failed) => {
            rules::operation_failed(&mut operation.record, failed)
        }
        WorkerEvent::Discarded(_) => Applied::Unchanged("discard recorded"),
    };
    if applied == Applied::Changed {
        save_operation(db, &mut operation).await?;
    }
    Ok((applied, applied == Applied::Changed))
}

/// Records an entity's ranges as chunks and queues their export jobs; the
/// first report for an entity wins, later ones change nothing.
async fn entity_planned(
    db: &Db<'_>,
    operation: &mut OperationRow,
    planned: &EntityPlanned,
) -> Result<Applied, CoordinatorError> {
    let operation_id = operation.record.id;
    let name = planned.entity.name.as_str();
    let Some(row) = db
        .query_opt(
            "read entity",
            "SELECT state, spec FROM {s}.entities WHERE operation_id = $1 AND name = $2 FOR UPDATE",
            &[&operation_id, &name],
        )
        .await?
    else {
        return Err(CoordinatorError::InvalidReport(format!(
            "entity '{}' is not in the plan of operation {operation_id}",
            name.escape_default()
        )));
    };
    let state: String = get(&row, "state")?;
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
    let Json(mut spec): Json<EntitySpec> = get(&row, "spec")?;
    if spec.key_type.is_none() {
        spec.key_type = planned.entity.key_type;
    }
    let chunk_count = planned.ranges.len();
    let numbers: Vec<i32> = (0..chunk_count)
        .map(|chunk| i32::try_from(chunk).unwrap_or(i32::MAX))
        .collect();
    let lows: Vec<Option<&str>> = planned
        .ranges
        .iter()
        .map(|range| range.lo.as_deref())
        .collect();
    let highs: Vec<Option<&str>> = planned
        .ranges
        .iter()
        .map(|range| range.hi.as_deref())
        .collect();
    db.execute(
        "record chunks",
        "INSERT INTO {s}.chunks (operation_id, entity, chunk, lo, hi, state, attempt, updated_at)
         SELECT $1, $2, chunk, lo, hi, 'pending', 1, $6
         FROM unnest($3::integer[], $4::text[], $5::text[]) AS planned(chunk, lo, hi)",
        &[&operation_id, &name, &numbers, &lows, &highs, &db.now],
    )
    .await?;
    let entity_state = if chunk_count == 0 {
        EntityState::Done
    } else {
        EntityState::Running
    };
    let chunks_total = int(u64::try_from(chunk_count).unwrap_or(u64::MAX));
    db.execute(
        "record planned entity",
        "UPDATE {s}.entities SET state = $3, spec = $4, rows_total = $5, chunks_total = $6,
             snapshot = $7
         WHERE operation_id = $1 AND name = $2",
        &[
            &operation_id,
            &name,
            &entity_state.as_str(),
            &Json(&spec),
            &int(planned.rows_total),
            &chunks_total,
            &planned.snapshot.as_ref().map(Json),
        ],
    )
    .await?;
    let context = ExportContext {
        operation_id,
        plan_id: &operation.record.plan_id,
        backup_id: operation.record.backup_id.unwrap_or(operation_id),
        entity: &spec,
        consistency: operation.record.consistency,
        snapshot: planned.snapshot.as_ref(),
        part_bytes: db.store.policy().part_bytes,
    };
    let jobs = planned
        .ranges
        .iter()
        .zip(0u32..)
        .map(|(range, chunk)| export_job(&context, chunk, KeyRange::clone(range), 1))
        .collect::<Result<Vec<_>, _>>()?;
    enqueue(db, &jobs).await?;

    let record = &mut operation.record;
    record.entities_planned += 1;
    record.rows_total = record.rows_total.saturating_add(planned.rows_total);
    record.chunks_total = record
        .chunks_total
        .saturating_add(u64::try_from(chunk_count).unwrap_or(u64::MAX));
    record.running_since.get_or_insert(db.now);
    if record.entities_planned >= record.entities_total && record.state == OperationState::Planning
    {
        record.state = OperationState::Running;
    }
    finalize_if_done(db, operation).await?;
    Ok(Applied::Changed)
}

/// An entity could not be planned: the operation fails, naming it. A failure
/// reported by a redelivered plan job of an entity already planned changes nothing.
async fn entity_failed(
    db: &Db<'_>,
    operation: &mut OperationRow,
    failed: &EntityFailed,
) -> Result<Applied, CoordinatorError> {
    let row = db
        .query_opt(
            "read entity",
            "SELECT state FROM {s}.entities WHERE operation_id = $1 AND name = $2",
            &[&operation.record.id, &failed.entity],
        )
        .await?;
    if let Some(row) = row
        && get::<String>(&row, "state")? != EntityState::Planning.as_str()
    {
        return Ok(Applied::Unchanged("entity already planned"));
    }
    fail(
        operation,
        entity_failure(&failed.entity, &failed.code, &failed.error),
    );
    Ok(Applied::Changed)
}
