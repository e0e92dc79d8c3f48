//! Replays: writing again a finished restore's unresolved failed rows, in
//! batches of one entity, and applying each batch's outcome once.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tracing::warn;
use uuid::Uuid;

use koan_protocol::events::ReplayDone;
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::restore_rules::{
    PendingRow, RestoreContext, check_replay, replay_batches, replay_job, replay_mode,
};
use crate::store::rules::shifted;
use crate::store::{Applied, EntityState, NewReplay, OperationRole, ReplaySubmission, Submitted};

use super::db::{Db, get, get_json, get_u32, micros, text};
use super::operations::{Delta, OperationRow, apply_delta, read_operation, save_operation};
use super::outbox::enqueue;
use super::submit::{OperationInsert, insert_entities, insert_operation};

const RESOLVED: &str = "resolved";
const FAILED: &str = "failed";

/// Records a replay of the restore's unresolved diagnostics, or says why not.
pub(super) fn submit_replay(
    db: &Db<'_>,
    replay: &NewReplay,
) -> Result<ReplaySubmission, CoordinatorError> {
    let restore_id = replay.restore_id;
    let refuse = |code: &'static str, error: String| {
        db.discard();
        Ok(ReplaySubmission::Refused { code, error })
    };
    let Some(restore) = read_operation(db, restore_id)? else {
        return refuse("unknown_operation", format!("no operation {restore_id}"));
    };
    let restore = restore.record;
    let rows = if restore.role == OperationRole::Restore && restore.state.is_terminal() {
        unresolved_rows(db, restore_id)?
    } else {
        Vec::new()
    };
    let unresolved = u64::try_from(rows.len()).unwrap_or(u64::MAX);
    if let Err((code, error)) = check_replay(restore_id, restore.role, restore.state, unresolved) {
        return refuse(code, error);
    }
    let restore_mode = restore
        .mode
        .ok_or_else(|| CoordinatorError::corrupt("restore", "no mode"))?;
    let plan: String = db
        .query_opt(
            "read restore plan",
            "SELECT plan FROM operations WHERE id = ?1",
            [text(restore_id)],
            |row| get(row, "plan"),
        )?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished while replaying"))?;
    let specs = restored_specs(db, restore_id)?;
    let batches = replay_batches(rows);
    let mut entity_names: Vec<&str> = Vec::new();
    for batch in &batches {
        if !entity_names.contains(&batch.entity.as_str()) {
            entity_names.push(&batch.entity);
        }
    }
    let entity_specs = entity_names
        .iter()
        .map(|name| {
            specs.get(*name).cloned().ok_or_else(|| {
                CoordinatorError::corrupt("diagnostic", format!("entity '{name}' not restored"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mode = replay_mode(restore_mode);
    let submitted = insert_operation(
        db,
        &OperationInsert {
            id: replay.operation_id,
            role: OperationRole::Replay,
            state: OperationState::Running,
            plan: &plan,
            plan_id: &restore.plan_id,
            backup_id: restore.backup_id.unwrap_or(restore_id),
            consistency: restore.consistency,
            labels: &BTreeMap::new(),
            description: None,
            command_id: replay.command_id.as_deref(),
            entities_total: u64::try_from(entity_specs.len()).unwrap_or(u64::MAX),
            mode: Some(mode),
            source_operation: Some(restore_id),
            target_scope: restore.target_scope.as_deref(),
            pool: restore.pool.as_deref(),
            trace: replay.trace.as_ref(),
        },
    )?;
    if submitted.existing {
        return Ok(ReplaySubmission::Submitted(submitted));
    }
    let operation_id = replay.operation_id;
    let replay_id = text(operation_id);
    insert_entities(db, operation_id, &entity_specs, EntityState::Running)?;

    // Per entity: lines and batches, the entity's rows and chunks.
    let mut sizes: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for batch in &batches {
        let lines = i64::try_from(batch.lines.len()).unwrap_or(i64::MAX);
        let size = sizes.entry(batch.entity.as_str()).or_default();
        *size = (size.0.saturating_add(lines), size.1 + 1);
        db.execute(
            "record replay batch",
            "INSERT INTO replay_batches (operation_id, batch, entity) VALUES (?1, ?2, ?3)",
            (&replay_id, i64::from(batch.batch), &batch.entity),
        )?;
        for line in &batch.lines {
            db.execute(
                "record replay item",
                "INSERT INTO replay_items (operation_id, diagnostic_id, batch) VALUES (?1, ?2, ?3)",
                (&replay_id, line.diagnostic_id, i64::from(batch.batch)),
            )?;
        }
    }
    for (name, (rows, batch_count)) in &sizes {
        db.execute(
            "size replayed entity",
            "UPDATE entities SET rows_total = ?3, chunks_total = ?4
             WHERE operation_id = ?1 AND name = ?2",
            (&replay_id, name, rows, batch_count),
        )?;
    }

    let context = RestoreContext {
        operation_id,
        mode,
        target_scope: restore.target_scope.as_deref(),
        pool: restore.pool.as_deref(),
    };
    let batch_count = u64::try_from(batches.len()).unwrap_or(u64::MAX);
    let mut jobs = Vec::with_capacity(batches.len());
    for batch in batches {
        let spec = specs
            .get(&batch.entity)
            .ok_or_else(|| CoordinatorError::corrupt("diagnostic", "entity not restored"))?;
        jobs.push(replay_job(&context, restore_id, spec, batch.lines)?);
    }
    enqueue(db, &jobs)?;
    let mut operation = read_operation(db, operation_id)?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished after insert"))?;
    let record = &mut operation.record;
    record.entities_planned = record.entities_total;
    record.rows_total = unresolved;
    record.chunks_total = batch_count;
    record.running_since = Some(db.now);
    save_operation(db, &mut operation)?;
    Ok(ReplaySubmission::Submitted(Submitted {
        operation_id,
        existing: false,
    }))
}

/// The restore's unresolved diagnostics, by entity (plan order), then id.
fn unresolved_rows(db: &Db<'_>, restore_id: Uuid) -> Result<Vec<PendingRow>, CoordinatorError> {
    db.query(
        "read unresolved diagnostics",
        "SELECT d.id, d.entity, d.line FROM restore_diagnostics d
         LEFT JOIN entities e ON e.operation_id = d.operation_id AND e.name = d.entity
         WHERE d.operation_id = ?1 AND d.resolved = 0
         ORDER BY e.ordinal NULLS LAST, d.entity, d.id",
        [text(restore_id)],
        |row| {
            Ok(PendingRow {
                diagnostic_id: get(row, "id")?,
                entity: get(row, "entity")?,
                line: get(row, "line")?,
            })
        },
    )
}

/// The specs a restore archived (stored when it was planned), by entity.
fn restored_specs(
    db: &Db<'_>,
    restore_id: Uuid,
) -> Result<HashMap<String, EntitySpec>, CoordinatorError> {
    Ok(db
        .query(
            "read restored specs",
            "SELECT name, spec FROM entities WHERE operation_id = ?1",
            [text(restore_id)],
            |row| {
                Ok((
                    get::<String>(row, "name")?,
                    get_json::<EntitySpec>(row, "spec")?,
                ))
            },
        )?
        .into_iter()
        .collect())
}

/// One replayed diagnostic as read for a decision.
struct Item {
    batch: u32,
    entity: String,
    outcome: Option<String>,
}

/// Applies a batch's outcome: a row's first outcome wins, except that
/// `resolved` replaces `failed` (the row is in the target now). A batch is
/// done at its first report; rows it did not mention count as failed.
pub(super) fn replay_done(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ReplayDone,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("replay is not running"));
    }
    let operation_id = operation.record.id;
    let replay_id = text(operation_id);
    let restore_id = text(
        operation
            .record
            .source_operation
            .ok_or_else(|| CoordinatorError::corrupt("replay", "no restore"))?,
    );
    let reported: Vec<i64> = report
        .resolved
        .iter()
        .copied()
        .chain(report.failed.iter().map(|failed| failed.diagnostic_id))
        .collect();
    let mut items: HashMap<i64, Item> = HashMap::new();
    for id in &reported {
        let item = db.query_opt(
            "read replay item",
            "SELECT i.batch, i.outcome, b.entity FROM replay_items i
             JOIN replay_batches b ON b.operation_id = i.operation_id AND b.batch = i.batch
             WHERE i.operation_id = ?1 AND i.diagnostic_id = ?2",
            (&replay_id, id),
            |row| {
                Ok(Item {
                    batch: get_u32(row, "batch")?,
                    entity: get(row, "entity")?,
                    outcome: get(row, "outcome")?,
                })
            },
        )?;
        let Some(item) = item else {
            return Err(CoordinatorError::InvalidReport(format!(
                "diagnostic {id} is not replayed by operation {operation_id}"
            )));
        };
        items.insert(*id, item);
    }

    // Per entity: rows newly done; overall: written and failed moves.
    let mut done: BTreeMap<String, i64> = BTreeMap::new();
    let mut written = 0i64;
    let mut failed = 0i64;
    for id in &report.resolved {
        let Some(item) = items.get_mut(id) else {
            continue;
        };
        match item.outcome.as_deref() {
            Some(RESOLVED) => continue,
            Some(_) => failed -= 1,
            None => *done.entry(item.entity.clone()).or_default() += 1,
        }
        written += 1;
        item.outcome = Some(RESOLVED.to_string());
        set_outcome(db, &replay_id, *id, RESOLVED)?;
        db.execute(
            "resolve diagnostic",
            "UPDATE restore_diagnostics SET resolved = 1, resolved_by = ?3, updated_at = ?4
             WHERE operation_id = ?1 AND id = ?2",
            (&restore_id, id, &replay_id, micros(db.now)),
        )?;
    }
    for failure in &report.failed {
        let id = failure.diagnostic_id;
        let Some(item) = items.get_mut(&id) else {
            continue;
        };
        if item.outcome.is_some() {
            continue;
        }
        item.outcome = Some(FAILED.to_string());
        *done.entry(item.entity.clone()).or_default() += 1;
        failed += 1;
        set_outcome(db, &replay_id, id, FAILED)?;
        db.execute(
            "record replay failure",
            "UPDATE restore_diagnostics SET code = ?3, reason = ?4, key = coalesce(?5, key),
                 updated_at = ?6
             WHERE operation_id = ?1 AND id = ?2 AND resolved = 0",
            (
                &restore_id,
                id,
                &failure.failure.code,
                &failure.failure.reason,
                &failure.failure.key,
                micros(db.now),
            ),
        )?;
    }

    // Batches reported for the first time: done, their unmentioned rows failed.
    let touched: BTreeSet<u32> = items.values().map(|item| item.batch).collect();
    let mut batches_done: BTreeMap<String, i64> = BTreeMap::new();
    let mut silent_rows = 0usize;
    for batch in touched {
        let first_report = db.query_opt(
            "mark batch reported",
            "UPDATE replay_batches SET reported = 1
             WHERE operation_id = ?1 AND batch = ?2 AND reported = 0
             RETURNING entity",
            (&replay_id, i64::from(batch)),
            |row| get::<String>(row, "entity"),
        )?;
        let Some(entity) = first_report else {
            continue;
        };
        let silent = db.execute(
            "fail unreported rows",
            "UPDATE replay_items SET outcome = 'failed'
             WHERE operation_id = ?1 AND batch = ?2 AND outcome IS NULL",
            (&replay_id, i64::from(batch)),
        )?;
        let silent_count = i64::try_from(silent).unwrap_or(i64::MAX);
        if silent > 0 {
            *done.entry(entity.clone()).or_default() += silent_count;
            failed += silent_count;
            silent_rows += silent;
        }
        *batches_done.entry(entity).or_default() += 1;
    }
    if silent_rows > 0 {
        warn!(%operation_id, rows = silent_rows, "replay job reported no outcome for some rows; they stay unresolved");
    }
    if done.is_empty() && batches_done.is_empty() && written == 0 {
        return Ok(Applied::Unchanged("replayed rows already reported"));
    }
    let entities: BTreeSet<String> = done.keys().chain(batches_done.keys()).cloned().collect();
    for entity in entities {
        let batches = batches_done.get(&entity).copied().unwrap_or(0);
        let change = Delta {
            rows_durable: done.get(&entity).copied().unwrap_or(0),
            parts: batches,
            chunks_done: batches,
            ..Delta::default()
        };
        apply_delta(db, operation, &entity, change)?;
    }
    let record = &mut operation.record;
    record.rows_written = shifted(record.rows_written, written);
    record.rows_failed = shifted(record.rows_failed, failed);
    if record.chunks_done >= record.chunks_total {
        record.state = OperationState::Completed;
    }
    Ok(Applied::Changed)
}

fn set_outcome(
    db: &Db<'_>,
    replay_id: &str,
    diagnostic_id: i64,
    outcome: &str,
) -> Result<(), CoordinatorError> {
    db.execute(
        "record replay outcome",
        "UPDATE replay_items SET outcome = ?3 WHERE operation_id = ?1 AND diagnostic_id = ?2",
        (replay_id, diagnostic_id, outcome),
    )?;
    Ok(())
}
