//! Restore reports: the plan (one unit per archived part), parts imported or
//! failed, and the `replace` mode's per-entity apply. Each report applies once:
//! the first `restore_planned`, the first `part_imported` of a unit and the
//! first `restore_applied` of an entity win; later copies change nothing.

use tokio_postgres::types::Json;
use tracing::{info, warn};

use koan_protocol::archive::PartInfo;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{ImportFailed, PartImported, RestoreApplied, RestorePlanned};
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::restore_rules::{
    RestoreContext, apply_job, check_restore_plan, import_failure, import_job, restore_mode,
};
use crate::store::{Applied, EntityState};

use super::db::{Db, get, int, int4, uint, uint4};
use super::diagnostics::record_failures;
use super::operations::{OperationRow, fail};
use super::outbox::enqueue;

/// Records one unit per part and queues its import job; the first report wins.
pub(super) async fn restore_planned(
    db: &Db<'_>,
    operation: &mut OperationRow,
    planned: &RestorePlanned,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Planning {
        return Ok(Applied::Unchanged("restore already planned"));
    }
    let operation_id = operation.record.id;
    let recorded = db
        .query(
            "read restored entities",
            "SELECT name FROM {s}.entities WHERE operation_id = $1 ORDER BY ordinal",
            &[&operation_id],
        )
        .await?
        .iter()
        .map(|row| get::<String>(row, "name"))
        .collect::<Result<Vec<_>, _>>()?;
    let context = RestoreContext::of(&operation.record)?;
    let replace = context.mode == RestoreMode::Replace;
    check_restore_plan(context.mode, &recorded, planned)?;

    let mut jobs = Vec::new();
    let mut units_total = 0u64;
    let mut rows_total = 0u64;
    for entity in &planned.entities {
        let name = entity.spec.name.as_str();
        let staging_table = if replace {
            entity.staging_table.as_deref()
        } else {
            None
        };
        let units: Vec<i32> = (0..entity.parts.len())
            .map(|unit| i32::try_from(unit).unwrap_or(i32::MAX))
            .collect();
        let chunks: Vec<i32> = entity.parts.iter().map(|part| int4(part.chunk)).collect();
        let parts = entity
            .parts
            .iter()
            .map(|part| serde_json::to_value(&part.part))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| CoordinatorError::corrupt("part", error))?;
        let rows: Vec<i64> = entity
            .parts
            .iter()
            .map(|part| int(part.part.rows))
            .collect();
        db.execute(
            "record restore units",
            "INSERT INTO {s}.restore_units (operation_id, entity, unit, chunk, part, rows, state,
                 updated_at)
             SELECT $1, $2, unit, chunk, part, rows, 'pending', $7
             FROM unnest($3::integer[], $4::integer[], $5::jsonb[], $6::bigint[])
                  AS planned(unit, chunk, part, rows)",
            &[
                &operation_id,
                &name,
                &units,
                &chunks,
                &parts,
                &rows,
                &db.now,
            ],
        )
        .await?;
        let entity_rows = entity
            .parts
            .iter()
            .fold(0u64, |sum, part| sum.saturating_add(part.part.rows));
        let unit_count = u64::try_from(entity.parts.len()).unwrap_or(u64::MAX);
        // Replace mode: an entity is done once applied, even without parts.
        let state = if unit_count == 0 && !replace {
            EntityState::Done
        } else {
            EntityState::Running
        };
        db.execute(
            "record planned restore entity",
            "UPDATE {s}.entities SET spec = $3, staging_table = $4, rows_total = $5,
                 chunks_total = $6, state = $7
             WHERE operation_id = $1 AND name = $2",
            &[
                &operation_id,
                &name,
                &Json(&entity.spec),
                &staging_table,
                &int(entity_rows),
                &int(unit_count),
                &state.as_str(),
            ],
        )
        .await?;
        for (unit, part) in (0u32..).zip(&entity.parts) {
            jobs.push(import_job(
                &context,
                &entity.spec,
                staging_table,
                unit,
                part.chunk,
                &part.part,
            )?);
        }
        units_total = units_total.saturating_add(unit_count);
        rows_total = rows_total.saturating_add(entity_rows);
    }
    enqueue(db, &jobs).await?;
    let record = &mut operation.record;
    record.entities_planned = record.entities_total;
    record.rows_total = rows_total;
    record.chunks_total = units_total;
    record.running_since.get_or_insert(db.now);
    record.state = OperationState::Running;
    after_imports(db, operation).await?;
    Ok(Applied::Changed)
}

/// A unit as read (and locked) for a decision.
struct UnitRow {
    state: String,
    chunk: u32,
    part: PartInfo,
    failures: u32,
}

async fn lock_unit(
    db: &Db<'_>,
    operation: &OperationRow,
    entity: &str,
    unit: u32,
) -> Result<UnitRow, CoordinatorError> {
    let row = db
        .query_opt(
            "lock restore unit",
            "SELECT state, chunk, part, failures FROM {s}.restore_units
             WHERE operation_id = $1 AND entity = $2 AND unit = $3 FOR UPDATE",
            &[&operation.record.id, &entity, &int4(unit)],
        )
        .await?
        .ok_or_else(|| {
            CoordinatorError::InvalidReport(format!(
                "entity '{}' of restore {} has no unit {unit}",
                entity.escape_default(),
                operation.record.id
            ))
        })?;
    let Json(part): Json<PartInfo> = get(&row, "part")?;
    Ok(UnitRow {
        state: get(&row, "state")?,
        chunk: uint4(get(&row, "chunk")?),
        part,
        failures: uint4(get(&row, "failures")?),
    })
}

/// A part is imported: its unit's figures and failed rows are recorded once.
pub(super) async fn part_imported(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &PartImported,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("restore is not importing"));
    }
    let replace = restore_mode(&operation.record)? == RestoreMode::Replace;
    let unit = lock_unit(db, operation, &report.entity, report.unit).await?;
    if unit.state != "pending" {
        return Ok(Applied::Unchanged("part already imported"));
    }
    let failed = u64::try_from(report.failures.len()).unwrap_or(u64::MAX);
    let rows_done = report
        .rows_written
        .saturating_add(report.rows_skipped)
        .saturating_add(failed);
    if rows_done != unit.part.rows {
        warn!(operation_id = %operation.record.id, entity = %report.entity, unit = report.unit,
            reported = rows_done, archived = unit.part.rows, "imported rows differ from the part's rows");
    }
    db.execute(
        "record imported unit",
        "UPDATE {s}.restore_units SET state = 'imported', rows_written = $4, rows_skipped = $5,
             rows_failed = $6, raw_bytes = $7, error = NULL, updated_at = $8
         WHERE operation_id = $1 AND entity = $2 AND unit = $3",
        &[
            &operation.record.id,
            &report.entity,
            &int4(report.unit),
            &int(report.rows_written),
            &int(report.rows_skipped),
            &int(failed),
            &int(report.raw_bytes),
            &db.now,
        ],
    )
    .await?;
    record_failures(db, operation.record.id, &report.entity, &report.failures).await?;
    let compressed = unit.part.compressed_bytes;
    db.execute(
        "count imported unit",
        "UPDATE {s}.entities SET rows_durable = rows_durable + $3, bytes_raw = bytes_raw + $4,
             bytes_compressed = bytes_compressed + $5, chunks_done = chunks_done + 1,
             state = CASE WHEN state = 'running' AND NOT $6 AND chunks_done + 1 >= chunks_total
                          THEN 'done' ELSE state END
         WHERE operation_id = $1 AND name = $2",
        &[
            &operation.record.id,
            &report.entity,
            &int(rows_done),
            &int(report.raw_bytes),
            &int(compressed),
            &replace,
        ],
    )
    .await?;
    let record = &mut operation.record;
    record.rows_durable = record.rows_durable.saturating_add(rows_done);
    record.bytes_raw = record.bytes_raw.saturating_add(report.raw_bytes);
    record.bytes_compressed = record.bytes_compressed.saturating_add(compressed);
    record.parts_done = record.parts_done.saturating_add(1);
    record.chunks_done = record.chunks_done.saturating_add(1);
    if !replace {
        // Replace mode: rows are only staged; `restore_applied` says how many were written.
        record.rows_written = record.rows_written.saturating_add(report.rows_written);
    }
    record.rows_skipped = record.rows_skipped.saturating_add(report.rows_skipped);
    record.rows_failed = record.rows_failed.saturating_add(failed);
    after_imports(db, operation).await?;
    Ok(Applied::Changed)
}

/// A part could not be imported: the worker retries a retryable failure (up
/// to the delivery limit); any other fails the restore, naming the part.
pub(super) async fn import_failed(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ImportFailed,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("restore is not importing"));
    }
    let unit = lock_unit(db, operation, &report.entity, report.unit).await?;
    if unit.state != "pending" {
        return Ok(Applied::Unchanged("part already imported"));
    }
    let failures = unit.failures.saturating_add(1);
    let max_attempts = db.store.policy().max_chunk_attempts;
    db.execute(
        "record import failure",
        "UPDATE {s}.restore_units SET failures = $4, error = $5, updated_at = $6
         WHERE operation_id = $1 AND entity = $2 AND unit = $3",
        &[
            &operation.record.id,
            &report.entity,
            &int4(report.unit),
            &int4(failures),
            &report.error,
            &db.now,
        ],
    )
    .await?;
    if report.retryable && failures < max_attempts {
        warn!(operation_id = %operation.record.id, entity = %report.entity, unit = report.unit,
            failures, code = %report.code, error = %report.error, "part import failed, worker retries");
        return Ok(Applied::Changed);
    }
    let mut error = import_failure(
        &report.entity,
        unit.chunk,
        unit.part.part,
        &report.code,
        &report.error,
    );
    if report.retryable {
        error.push_str(&format!(" (gave up after {failures} failed attempts)"));
    }
    fail(operation, error);
    Ok(Applied::Changed)
}

/// `replace` mode: an entity's staged rows replaced its scope.
pub(super) async fn restore_applied(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &RestoreApplied,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Finalizing {
        warn!(operation_id = %operation.record.id, entity = %report.entity,
            state = operation.record.state.as_str(), "restore_applied for a restore that is not applying ignored");
        return Ok(Applied::Unchanged("restore is not applying"));
    }
    let operation_id = operation.record.id;
    let row = db
        .query_opt(
            "lock restored entity",
            "SELECT state FROM {s}.entities WHERE operation_id = $1 AND name = $2 FOR UPDATE",
            &[&operation_id, &report.entity],
        )
        .await?
        .ok_or_else(|| {
            CoordinatorError::InvalidReport(format!(
                "entity '{}' is not restored by operation {operation_id}",
                report.entity.escape_default()
            ))
        })?;
    if get::<String>(&row, "state")? == EntityState::Done.as_str() {
        return Ok(Applied::Unchanged("entity already applied"));
    }
    record_failures(db, operation_id, &report.entity, &report.failures).await?;
    db.execute(
        "record applied entity",
        "UPDATE {s}.entities SET state = 'done' WHERE operation_id = $1 AND name = $2",
        &[&operation_id, &report.entity],
    )
    .await?;
    info!(%operation_id, entity = %report.entity, rows_written = report.rows_written,
        rows_removed = report.rows_removed, failed = report.failures.len(), "staged rows applied");
    let failed = u64::try_from(report.failures.len()).unwrap_or(u64::MAX);
    let record = &mut operation.record;
    record.rows_written = record.rows_written.saturating_add(report.rows_written);
    record.rows_skipped = record.rows_skipped.saturating_add(report.rows_skipped);
    record.rows_failed = record.rows_failed.saturating_add(failed);
    let waiting = db
        .query_opt(
            "count entities to apply",
            "SELECT count(*) AS waiting FROM {s}.entities WHERE operation_id = $1 AND state <> 'done'",
            &[&operation_id],
        )
        .await?
        .map(|row| get::<i64>(&row, "waiting"))
        .transpose()?
        .map_or(0, uint);
    if waiting == 0 {
        operation.record.state = OperationState::Completed;
    }
    Ok(Applied::Changed)
}

/// Once every unit is imported: completes the restore, or in `replace` mode
/// queues one `apply_restore` per entity and waits for them (`finalizing`).
async fn after_imports(db: &Db<'_>, operation: &mut OperationRow) -> Result<(), CoordinatorError> {
    let record = &operation.record;
    if record.state != OperationState::Running || record.chunks_done < record.chunks_total {
        return Ok(());
    }
    let context = RestoreContext::of(&operation.record)?;
    if context.mode != RestoreMode::Replace {
        operation.record.state = OperationState::Completed;
        return Ok(());
    }
    let rows = db
        .query(
            "read entities to apply",
            "SELECT spec, staging_table FROM {s}.entities
             WHERE operation_id = $1 AND state <> 'done' ORDER BY ordinal",
            &[&context.operation_id],
        )
        .await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let Json(spec): Json<EntitySpec> = get(row, "spec")?;
        let staging_table: Option<String> = get(row, "staging_table")?;
        jobs.push(apply_job(&context, &spec, staging_table.as_deref())?);
    }
    enqueue(db, &jobs).await?;
    operation.record.state = if jobs.is_empty() {
        OperationState::Completed
    } else {
        OperationState::Finalizing
    };
    Ok(())
}
