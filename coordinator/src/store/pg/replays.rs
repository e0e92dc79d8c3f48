//! Replays: writing again a finished restore's unresolved failed rows, in
//! batches of one entity, and applying each batch's outcome once.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::types::Json;
use tracing::warn;
use uuid::Uuid;

use koan_protocol::events::ReplayDone;
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::restore_rules::{
    PendingRow, RestoreContext, check_replay, replay_batches, replay_job, replay_mode,
};
use crate::store::{Applied, EntityState, NewReplay, OperationRole, ReplaySubmission, Submitted};

use super::PgStateStore;
use super::db::{Db, get, shifted};
use super::operations::{Delta, OperationRow, apply_delta, lock_operation, save_operation};
use super::outbox::enqueue;
use super::submit::{OperationInsert, insert_entities, insert_operation};

const RESOLVED: &str = "resolved";
const FAILED: &str = "failed";

pub(super) async fn submit_replay(
    store: &PgStateStore,
    replay: &NewReplay,
) -> Result<ReplaySubmission, CoordinatorError> {
    let restore_id = replay.restore_id;
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    // Locking the restore serializes replays of one restore with each other.
    let Some(restore) = lock_operation(&db, restore_id).await? else {
        return Ok(ReplaySubmission::Refused {
            code: "unknown_operation",
            error: format!("no operation {restore_id}"),
        });
    };
    let restore = restore.record;
    let rows = if restore.role == OperationRole::Restore && restore.state.is_terminal() {
        unresolved_rows(&db, restore_id).await?
    } else {
        Vec::new()
    };
    let unresolved = u64::try_from(rows.len()).unwrap_or(u64::MAX);
    if let Err((code, error)) = check_replay(restore_id, restore.role, restore.state, unresolved) {
        return Ok(ReplaySubmission::Refused { code, error });
    }
    let restore_mode = restore
        .mode
        .ok_or_else(|| CoordinatorError::corrupt("restore", "no mode"))?;
    let plan_row = db
        .query_opt(
            "read restore plan",
            "SELECT plan FROM {s}.operations WHERE id = $1",
            &[&restore_id],
        )
        .await?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished while replaying"))?;
    let plan: serde_json::Value = get(&plan_row, "plan")?;
    let specs = restored_specs(&db, restore_id).await?;
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
        &db,
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
    )
    .await?;
    if submitted.existing {
        return Ok(ReplaySubmission::Submitted(submitted));
    }
    let operation_id = replay.operation_id;
    insert_entities(&db, operation_id, &entity_specs, EntityState::Running).await?;

    let mut entity_rows: HashMap<&str, (i64, i64)> = HashMap::new();
    let mut batch_numbers = Vec::with_capacity(batches.len());
    let mut batch_entities = Vec::with_capacity(batches.len());
    let mut item_ids = Vec::new();
    let mut item_batches = Vec::new();
    for batch in &batches {
        let number = i32::try_from(batch.batch).unwrap_or(i32::MAX);
        batch_numbers.push(number);
        batch_entities.push(batch.entity.as_str());
        let lines = i64::try_from(batch.lines.len()).unwrap_or(i64::MAX);
        let figures = entity_rows.entry(batch.entity.as_str()).or_default();
        *figures = (figures.0.saturating_add(lines), figures.1 + 1);
        for line in &batch.lines {
            item_ids.push(line.diagnostic_id);
            item_batches.push(number);
        }
    }
    let names: Vec<&str> = entity_rows.keys().copied().collect();
    let rows_totals: Vec<i64> = names.iter().map(|name| entity_rows[name].0).collect();
    let chunk_totals: Vec<i64> = names.iter().map(|name| entity_rows[name].1).collect();
    db.execute(
        "size replayed entities",
        "UPDATE {s}.entities e SET rows_total = sized.rows, chunks_total = sized.batches
         FROM unnest($2::text[], $3::bigint[], $4::bigint[]) AS sized(name, rows, batches)
         WHERE e.operation_id = $1 AND e.name = sized.name",
        &[&operation_id, &names, &rows_totals, &chunk_totals],
    )
    .await?;
    db.execute(
        "record replay batches",
        "INSERT INTO {s}.replay_batches (operation_id, batch, entity)
         SELECT $1, batch, entity FROM unnest($2::integer[], $3::text[]) AS planned(batch, entity)",
        &[&operation_id, &batch_numbers, &batch_entities],
    )
    .await?;
    db.execute(
        "record replay items",
        "INSERT INTO {s}.replay_items (operation_id, diagnostic_id, batch)
         SELECT $1, diagnostic_id, batch
         FROM unnest($2::bigint[], $3::integer[]) AS planned(diagnostic_id, batch)",
        &[&operation_id, &item_ids, &item_batches],
    )
    .await?;

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
    enqueue(&db, &jobs).await?;
    let mut operation = lock_operation(&db, operation_id)
        .await?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished after insert"))?;
    let record = &mut operation.record;
    record.entities_planned = record.entities_total;
    record.rows_total = unresolved;
    record.chunks_total = batch_count;
    record.running_since = Some(db.now);
    save_operation(&db, &mut operation).await?;
    db.commit().await?;
    Ok(ReplaySubmission::Submitted(Submitted {
        operation_id,
        existing: false,
    }))
}

/// The restore's unresolved diagnostics, by entity (plan order), then id.
async fn unresolved_rows(
    db: &Db<'_>,
    restore_id: Uuid,
) -> Result<Vec<PendingRow>, CoordinatorError> {
    db.query(
        "read unresolved diagnostics",
        "SELECT d.id, d.entity, d.line FROM {s}.restore_diagnostics d
         LEFT JOIN {s}.entities e ON e.operation_id = d.operation_id AND e.name = d.entity
         WHERE d.operation_id = $1 AND NOT d.resolved
         ORDER BY e.ordinal NULLS LAST, d.entity, d.id",
        &[&restore_id],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(PendingRow {
            diagnostic_id: get(row, "id")?,
            entity: get(row, "entity")?,
            line: get(row, "line")?,
        })
    })
    .collect()
}

/// The specs a restore archived (stored when it was planned), by entity.
async fn restored_specs(
    db: &Db<'_>,
    restore_id: Uuid,
) -> Result<HashMap<String, EntitySpec>, CoordinatorError> {
    let mut specs = HashMap::new();
    for row in db
        .query(
            "read restored specs",
            "SELECT name, spec FROM {s}.entities WHERE operation_id = $1",
            &[&restore_id],
        )
        .await?
    {
        let Json(spec): Json<EntitySpec> = get(&row, "spec")?;
        specs.insert(get(&row, "name")?, spec);
    }
    Ok(specs)
}

/// One replayed diagnostic as read (and locked) for a decision.
struct Item {
    batch: i32,
    entity: String,
    outcome: Option<String>,
}

/// Applies a batch's outcome: a row's first outcome wins, except that
/// `resolved` replaces `failed` (the row is in the target now). A batch is
/// done at its first report; rows it did not mention count as failed.
pub(super) async fn replay_done(
    db: &Db<'_>,
    operation: &mut OperationRow,
    report: &ReplayDone,
) -> Result<Applied, CoordinatorError> {
    if operation.record.state != OperationState::Running {
        return Ok(Applied::Unchanged("replay is not running"));
    }
    let operation_id = operation.record.id;
    let restore_id = operation
        .record
        .source_operation
        .ok_or_else(|| CoordinatorError::corrupt("replay", "no restore"))?;
    let reported: Vec<i64> = report
        .resolved
        .iter()
        .copied()
        .chain(report.failed.iter().map(|failed| failed.diagnostic_id))
        .collect();
    let mut items: HashMap<i64, Item> = HashMap::new();
    for row in db
        .query(
            "lock replay items",
            "SELECT i.diagnostic_id, i.batch, i.outcome, b.entity FROM {s}.replay_items i
             JOIN {s}.replay_batches b ON b.operation_id = i.operation_id AND b.batch = i.batch
             WHERE i.operation_id = $1 AND i.diagnostic_id = ANY($2)
             ORDER BY i.diagnostic_id
             FOR UPDATE OF i",
            &[&operation_id, &reported],
        )
        .await?
    {
        items.insert(
            get(&row, "diagnostic_id")?,
            Item {
                batch: get(&row, "batch")?,
                entity: get(&row, "entity")?,
                outcome: get(&row, "outcome")?,
            },
        );
    }
    if let Some(stranger) = reported.iter().find(|id| !items.contains_key(id)) {
        return Err(CoordinatorError::InvalidReport(format!(
            "diagnostic {stranger} is not replayed by operation {operation_id}"
        )));
    }

    // Per entity: rows newly done; overall: written and failed moves.
    let mut done: BTreeMap<String, i64> = BTreeMap::new();
    let mut written = 0i64;
    let mut failed = 0i64;
    let mut resolved_ids = Vec::new();
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
        resolved_ids.push(*id);
    }
    let mut failed_ids = Vec::new();
    let mut codes = Vec::new();
    let mut reasons = Vec::new();
    let mut keys = Vec::new();
    for failure in &report.failed {
        let Some(item) = items.get_mut(&failure.diagnostic_id) else {
            continue;
        };
        if item.outcome.is_some() {
            continue;
        }
        item.outcome = Some(FAILED.to_string());
        *done.entry(item.entity.clone()).or_default() += 1;
        failed += 1;
        failed_ids.push(failure.diagnostic_id);
        codes.push(failure.failure.code.as_str());
        reasons.push(failure.failure.reason.as_str());
        keys.push(failure.failure.key.as_deref());
    }
    if !resolved_ids.is_empty() {
        set_outcome(db, operation_id, &resolved_ids, RESOLVED).await?;
        db.execute(
            "resolve diagnostics",
            "UPDATE {s}.restore_diagnostics SET resolved = true, resolved_by = $3, updated_at = $4
             WHERE operation_id = $1 AND id = ANY($2)",
            &[&restore_id, &resolved_ids, &operation_id, &db.now],
        )
        .await?;
    }
    if !failed_ids.is_empty() {
        set_outcome(db, operation_id, &failed_ids, FAILED).await?;
        db.execute(
            "record replay failures",
            "UPDATE {s}.restore_diagnostics d SET code = again.code, reason = again.reason,
                 key = COALESCE(again.key, d.key), updated_at = $6
             FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[])
                  AS again(id, code, reason, key)
             WHERE d.operation_id = $1 AND d.id = again.id AND NOT d.resolved",
            &[&restore_id, &failed_ids, &codes, &reasons, &keys, &db.now],
        )
        .await?;
    }

    // Batches reported for the first time: done, their unmentioned rows failed.
    let touched: Vec<i32> = items
        .values()
        .map(|item| item.batch)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let first_reports = db
        .query(
            "mark batches reported",
            "UPDATE {s}.replay_batches SET reported = true
             WHERE operation_id = $1 AND batch = ANY($2) AND NOT reported
             RETURNING batch, entity",
            &[&operation_id, &touched],
        )
        .await?;
    let mut batches_done: BTreeMap<String, i64> = BTreeMap::new();
    let mut first_batches = Vec::with_capacity(first_reports.len());
    for row in &first_reports {
        first_batches.push(get::<i32>(row, "batch")?);
        *batches_done.entry(get(row, "entity")?).or_default() += 1;
    }
    if !first_batches.is_empty() {
        let silent = db
            .query(
                "fail unreported rows",
                "UPDATE {s}.replay_items i SET outcome = 'failed'
                 FROM {s}.replay_batches b
                 WHERE i.operation_id = $1 AND i.batch = ANY($2) AND i.outcome IS NULL
                   AND b.operation_id = i.operation_id AND b.batch = i.batch
                 RETURNING b.entity",
                &[&operation_id, &first_batches],
            )
            .await?;
        if !silent.is_empty() {
            warn!(%operation_id, rows = silent.len(), "replay job reported no outcome for some rows; they stay unresolved");
        }
        for row in &silent {
            *done.entry(get(row, "entity")?).or_default() += 1;
            failed += 1;
        }
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
        apply_delta(db, operation, &entity, change).await?;
    }
    let record = &mut operation.record;
    record.rows_written = shifted(record.rows_written, written);
    record.rows_failed = shifted(record.rows_failed, failed);
    if record.chunks_done >= record.chunks_total {
        record.state = OperationState::Completed;
    }
    Ok(Applied::Changed)
}

async fn set_outcome(
    db: &Db<'_>,
    operation_id: Uuid,
    diagnostic_ids: &[i64],
    outcome: &str,
) -> Result<(), CoordinatorError> {
    db.execute(
        "record replay outcomes",
        "UPDATE {s}.replay_items SET outcome = $3
         WHERE operation_id = $1 AND diagnostic_id = ANY($2)",
        &[&operation_id, &diagnostic_ids, &outcome],
    )
    .await?;
    Ok(())
}
