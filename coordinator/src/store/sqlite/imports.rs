//! Restore reports: the plan (one unit per archived part), parts imported or
//! failed, and the `replace` mode's per-entity apply. Each report applies once:
//! the first `restore_planned`, the first `part_imported` of a unit and the
//! first `restore_applied` of an entity win; later copies change nothing.

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
use crate::store::rules::fail;
use crate::store::{Applied, EntityState};

use super::db::{Db, get, get_json, get_u32, get_u64, int, json, micros, text};
use super::diagnostics::record_failures;
use super::operations::OperationRow;
use super::outbox::enqueue;

/// Records one unit per part and queues its import job; the first report wins.
pub(super) fn restore_planned(
    db: &Db<'_>,
    operation: &mut OperationRow,
    planned: &RestorePlanned,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Planning {
        return Ok(Applied::Unchanged("restore already planned"));
    }
    let operation_id = text(operation.record.id);
    let recorded = db.query(
        "read restored entities",
        "SELECT name FROM entities WHERE operation_id = ?1 ORDER BY ordinal",
        [&operation_id],
        |row| get::<String>(row, "name"),
    )?;
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
        for (unit, part) in (0i64..).zip(&entity.parts) {
            db.execute(
                "record restore unit",
                "INSERT INTO restore_units (operation_id, entity, unit, chunk, part, rows, state,
                     updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7)",
                (
                    &operation_id,
                    name,
                    unit,
                    i64::from(part.chunk),
                    json("part", &part.part)?,
                    int(part.part.rows),
                    micros(db.now),
                ),
            )?;
        }
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
            "UPDATE entities SET spec = ?3, staging_table = ?4, rows_total = ?5,
                 chunks_total = ?6, state = ?7
             WHERE operation_id = ?1 AND name = ?2",
            (
                &operation_id,
                name,
                json("entity spec", &entity.spec)?,
                staging_table,
                int(entity_rows),
                int(unit_count),
                state.as_str(),
            ),
        )?;
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
    enqueue(db, &jobs)?;
    let record = &mut operation.record;
    record.entities_planned = record.entities_total;
    record.rows_total = rows_total;
    record.chunks_total = units_total;
    record.running_since.get_or_insert(db.now);
    record.state = OperationState::Running;
    after_imports(db, operation)?;
    Ok(Applied::Changed)
}

/// A unit as read for a decision.
struct UnitRow {
    state: String,
    chunk: u32,
    part: PartInfo,
    failures: u32,
}

fn read_unit(
    db: &Db<'_>,
    operation: &OperationRow,
    entity: &str,
    unit: u32,
) -> Result<UnitRow, CoordinatorError> {
    db.query_opt(
        "read restore unit",
        "SELECT state, chunk, part, failures FROM restore_units
         WHERE operation_id = ?1 AND entity = ?2 AND unit = ?3",
        (text(operation.record.id), entity, i64::from(unit)),
        |row| {
            Ok(UnitRow {
                state: get(row, "state")?,
                chunk: get_u32(row, "chunk")?,
                part: get_json(row, "part")?,
                failures: get_u32(row, "failures")?,
            })
        },
    )?
    .ok_or_else(|| {
        CoordinatorError::InvalidReport(format!(
            "entity '{}' of restore {} has no unit {unit}",
            entity.escape_default(),
            operation.record.id
        ))
    })
}

/// A part is imported: its unit's figures and failed rows are recorded once.
pub(super) fn part_imported(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &PartImported,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("restore is not importing"));
    }
    let replace = restore_mode(&operation.record)? == RestoreMode::Replace;
    let unit = read_unit(db, operation, &report.entity, report.unit)?;
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
    let operation_id = text(operation.record.id);
    db.execute(
        "record imported unit",
        "UPDATE restore_units SET state = 'imported', rows_written = ?4, rows_skipped = ?5,
             rows_failed = ?6, raw_bytes = ?7, error = NULL, updated_at = ?8
         WHERE operation_id = ?1 AND entity = ?2 AND unit = ?3",
        (
            &operation_id,
            &report.entity,
            i64::from(report.unit),
            int(report.rows_written),
            int(report.rows_skipped),
            int(failed),
            int(report.raw_bytes),
            micros(db.now),
        ),
    )?;
    record_failures(db, operation.record.id, &report.entity, &report.failures)?;
    let compressed = unit.part.compressed_bytes;
    db.execute(
        "count imported unit",
        "UPDATE entities SET rows_durable = rows_durable + ?3, bytes_raw = bytes_raw + ?4,
             bytes_compressed = bytes_compressed + ?5, chunks_done = chunks_done + 1,
             state = CASE WHEN state = 'running' AND NOT ?6 AND chunks_done + 1 >= chunks_total
                          THEN 'done' ELSE state END
         WHERE operation_id = ?1 AND name = ?2",
        (
            &operation_id,
            &report.entity,
            int(rows_done),
            int(report.raw_bytes),
            int(compressed),
            replace,
        ),
    )?;
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
    after_imports(db, operation)?;
    Ok(Applied::Changed)
}

/// A part could not be imported: the worker retries a retryable failure (up
/// to the delivery limit); any other fails the restore, naming the part.
pub(super) fn import_failed(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ImportFailed,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("restore is not importing"));
    }
    let unit = read_unit(db, operation, &report.entity, report.unit)?;
    if unit.state != "pending" {
        return Ok(Applied::Unchanged("part already imported"));
    }
    let failures = unit.failures.saturating_add(1);
    db.execute(
        "record import failure",
        "UPDATE restore_units SET failures = ?4, error = ?5, updated_at = ?6
         WHERE operation_id = ?1 AND entity = ?2 AND unit = ?3",
        (
            text(operation.record.id),
            &report.entity,
            i64::from(report.unit),
            i64::from(failures),
            &report.error,
            micros(db.now),
        ),
    )?;
    if report.retryable && failures < db.policy.max_chunk_attempts {
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
    fail(&mut operation.record, error);
    Ok(Applied::Changed)
}

/// `replace` mode: an entity's staged rows replaced its scope.
pub(super) fn restore_applied(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &RestoreApplied,
) -> Result<Applied, CoordinatorError> {
    let operation_id = operation.record.id;
    if operation.record.state != OperationState::Finalizing {
        warn!(%operation_id, entity = %report.entity,
            state = operation.record.state.as_str(), "restore_applied for a restore that is not applying ignored");
        return Ok(Applied::Unchanged("restore is not applying"));
    }
    let state = db
        .query_opt(
            "read restored entity",
            "SELECT state FROM entities WHERE operation_id = ?1 AND name = ?2",
            (text(operation_id), &report.entity),
            |row| get::<String>(row, "state"),
        )?
        .ok_or_else(|| {
            CoordinatorError::InvalidReport(format!(
                "entity '{}' is not restored by operation {operation_id}",
                report.entity.escape_default()
            ))
        })?;
    if state == EntityState::Done.as_str() {
        return Ok(Applied::Unchanged("entity already applied"));
    }
    record_failures(db, operation_id, &report.entity, &report.failures)?;
    db.execute(
        "record applied entity",
        "UPDATE entities SET state = 'done' WHERE operation_id = ?1 AND name = ?2",
        (text(operation_id), &report.entity),
    )?;
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
            "SELECT count(*) AS waiting FROM entities WHERE operation_id = ?1 AND state <> 'done'",
            [text(operation_id)],
            |row| get_u64(row, "waiting"),
        )?
        .unwrap_or(0);
    if waiting == 0 {
        record.state = OperationState::Completed;
    }
    Ok(Applied::Changed)
}

/// Once every unit is imported: completes the restore, or in `replace` mode
/// queues one `apply_restore` per entity and waits for them (`finalizing`).
fn after_imports(db: &Db<'_>, operation: &mut OperationRow) -> Result<(), CoordinatorError> {
    let record = &operation.record;
    if record.state != OperationState::Running || record.chunks_done < record.chunks_total {
        return Ok(());
    }
    let context = RestoreContext::of(&operation.record)?;
    if context.mode != RestoreMode::Replace {
        operation.record.state = OperationState::Completed;
        return Ok(());
    }
    let entities = db.query(
        "read entities to apply",
        "SELECT spec, staging_table FROM entities
         WHERE operation_id = ?1 AND state <> 'done' ORDER BY ordinal",
        [text(context.operation_id)],
        |row| {
            Ok((
                get_json::<EntitySpec>(row, "spec")?,
                get::<Option<String>>(row, "staging_table")?,
            ))
        },
    )?;
    let jobs = entities
        .iter()
        .map(|(spec, staging_table)| apply_job(&context, spec, staging_table.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    enqueue(db, &jobs)?;
    operation.record.state = if jobs.is_empty() {
        OperationState::Completed
    } else {
        OperationState::Finalizing
    };
    Ok(())
}
