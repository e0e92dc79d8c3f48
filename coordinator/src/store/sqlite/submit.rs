//! Submissions and reads: recording an operation (a backup with its plan
//! jobs here; restores, verifies and replays build on the same helpers),
//! status and listings.

use std::collections::HashMap;

use uuid::Uuid;

use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_protocol::trace::TraceContext;

use crate::error::CoordinatorError;
use crate::progress;
pub(super) use crate::store::rules::OperationInsert;
use crate::store::rules::plan_jobs;
use crate::store::{
    EntityRecord, EntityState, NewBackup, OperationRecord, OperationRole, Submitted,
};

use super::db::{Db, get_uuid, int, json, micros, text};
use super::operations::{
    ENTITY_COLUMNS, OPERATION_COLUMNS, OperationRow, entity_from_row, load_entities,
    operation_from_row, read_operation, save_operation,
};
use super::outbox::enqueue;

/// Most operations one listing returns.
const MAX_LIST: u32 = 1_000;

/// The operation with `operation_id`, else the one recorded for `command_id`.
pub(super) fn find_submission(
    db: &Db<'_>,
    operation_id: Option<Uuid>,
    command_id: Option<&str>,
) -> Result<Option<Uuid>, CoordinatorError> {
    if operation_id.is_none() && command_id.is_none() {
        return Ok(None);
    }
    db.query_opt(
        "find submission",
        "SELECT id FROM operations WHERE id = ?1 OR command_id = ?2
         ORDER BY (id = ?1) DESC NULLS LAST LIMIT 1",
        (operation_id.map(text), command_id),
        |row| get_uuid(row, "id"),
    )
}

pub(super) fn submit_backup(
    db: &Db<'_>,
    backup: &NewBackup,
) -> Result<Submitted, CoordinatorError> {
    let plan_json = json("plan", &backup.plan)?;
    let specs = backup.plan.entity_specs();
    let jobs = plan_jobs(backup.operation_id, &backup.plan)?;
    let submitted = insert_operation(
        db,
        &OperationInsert {
            id: backup.operation_id,
            role: OperationRole::Backup,
            state: OperationState::Planning,
            plan: &plan_json,
            plan_id: &backup.plan.plan_id,
            backup_id: backup.operation_id,
            consistency: backup.plan.consistency,
            labels: &backup.labels,
            description: backup.description.as_deref(),
            command_id: backup.command_id.as_deref(),
            entities_total: u64::try_from(specs.len()).unwrap_or(u64::MAX),
            mode: None,
            source_operation: None,
            target_scope: None,
            pool: None,
            trace: backup.trace.as_ref(),
        },
    )?;
    if submitted.existing {
        return Ok(submitted);
    }
    insert_entities(db, backup.operation_id, &specs, EntityState::Planning)?;
    enqueue(db, &jobs)?;
    announce_new(db, backup.operation_id)?;
    Ok(submitted)
}

/// Inserts an operation; when its id or command id is known already, inserts
/// nothing and names the existing operation.
pub(super) fn insert_operation(
    db: &Db<'_>,
    operation: &OperationInsert<'_, str>,
) -> Result<Submitted, CoordinatorError> {
    let inserted = db.execute(
        "record operation",
        "INSERT INTO operations (id, kind, state, plan, plan_id, backup_id, consistency,
             labels, description, command_id, entities_total, created_at, updated_at,
             mode, source_operation, target_scope, pool, traceparent, tracestate)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14, ?15, ?16,
                 ?17, ?18)
         ON CONFLICT DO NOTHING",
        rusqlite::params![
            text(operation.id),
            operation.role.as_str(),
            operation.state.as_str(),
            operation.plan,
            operation.plan_id,
            text(operation.backup_id),
            operation.consistency.as_str(),
            json("labels", operation.labels)?,
            operation.description,
            operation.command_id,
            int(operation.entities_total),
            micros(db.now),
            operation.mode.map(RestoreMode::as_str),
            operation.source_operation.map(text),
            operation.target_scope,
            operation.pool,
            operation.trace.map(TraceContext::traceparent),
            operation.trace.and_then(TraceContext::tracestate),
        ],
    )?;
    if inserted > 0 {
        return Ok(Submitted {
            operation_id: operation.id,
            existing: false,
        });
    }
    let existing = find_submission(db, Some(operation.id), operation.command_id)?;
    Ok(Submitted {
        operation_id: existing.unwrap_or(operation.id),
        existing: true,
    })
}

/// Records the entities of a new operation, in order, all in `state`.
pub(super) fn insert_entities(
    db: &Db<'_>,
    operation_id: Uuid,
    specs: &[EntitySpec],
    state: EntityState,
) -> Result<(), CoordinatorError> {
    for (ordinal, spec) in (0i64..).zip(specs) {
        db.execute(
            "record entity",
            "INSERT INTO entities (operation_id, name, ordinal, spec, state)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            (
                text(operation_id),
                &spec.name,
                ordinal,
                json("entity spec", spec)?,
                state.as_str(),
            ),
        )?;
    }
    Ok(())
}

/// Saves a just-inserted operation once: its first sequence and public event.
pub(super) fn announce_new(
    db: &Db<'_>,
    operation_id: Uuid,
) -> Result<OperationRow, CoordinatorError> {
    let mut operation = read_operation(db, operation_id)?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished after insert"))?;
    save_operation(db, &mut operation)?;
    Ok(operation)
}

pub(super) fn operation(
    db: &Db<'_>,
    operation_id: Uuid,
) -> Result<Option<OperationRecord>, CoordinatorError> {
    Ok(read_operation(db, operation_id)?.map(|operation| operation.record))
}

pub(super) fn report(
    db: &Db<'_>,
    operation_id: Uuid,
) -> Result<Option<ProgressReport>, CoordinatorError> {
    let Some(operation) = read_operation(db, operation_id)? else {
        return Ok(None);
    };
    let entities = load_entities(db, operation_id)?;
    Ok(Some(progress::report(
        &operation.record,
        &entities,
        db.secret,
        db.now,
    )))
}

pub(super) fn list_reports(
    db: &Db<'_>,
    limit: u32,
) -> Result<Vec<ProgressReport>, CoordinatorError> {
    let limit = i64::from(limit.clamp(1, MAX_LIST));
    let sql = format!(
        "SELECT {OPERATION_COLUMNS} FROM operations
         ORDER BY created_at DESC, id DESC LIMIT ?1"
    );
    let operations = db.query("list operations", &sql, [limit], operation_from_row)?;
    let sql = format!(
        "SELECT operation_id, {ENTITY_COLUMNS} FROM entities
         WHERE operation_id IN (
             SELECT id FROM operations ORDER BY created_at DESC, id DESC LIMIT ?1
         )
         ORDER BY operation_id, ordinal"
    );
    let mut entities: HashMap<Uuid, Vec<EntityRecord>> = HashMap::new();
    for (operation_id, entity) in db.query("list entities", &sql, [limit], |row| {
        Ok((get_uuid(row, "operation_id")?, entity_from_row(row)?))
    })? {
        entities.entry(operation_id).or_default().push(entity);
    }
    Ok(operations
        .iter()
        .map(|operation| {
            let of_operation = entities
                .get(&operation.record.id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            progress::report(&operation.record, of_operation, db.secret, db.now)
        })
        .collect())
}
