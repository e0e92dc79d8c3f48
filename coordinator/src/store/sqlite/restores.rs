//! Restores and verifies: reading the backup they read, and recording them
//! with their first job.

use std::collections::BTreeMap;

use uuid::Uuid;

use koan_protocol::plan::{BackupPlan, EntitySpec};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::restore_rules::{plan_restore_job, verify_job};
use crate::store::{BackupSource, EntityState, NewRestore, NewVerify, OperationRole, Submitted};

use super::db::{Db, get, get_json, get_uuid, json, text};
use super::outbox::enqueue;
use super::submit::{OperationInsert, announce_new, insert_entities, insert_operation};

/// The backup operation that wrote `backup_id` (a completed one first), with its entities.
pub(super) fn backup_source(
    db: &Db<'_>,
    backup_id: Uuid,
) -> Result<Option<BackupSource>, CoordinatorError> {
    let Some((operation_id, recorded_backup_id, state, plan, manifest)) = db.query_opt(
        "read backup",
        "SELECT id, backup_id, state, plan, manifest FROM operations
         WHERE backup_id = ?1 AND kind = 'backup'
         ORDER BY (state = 'completed') DESC, created_at DESC LIMIT 1",
        [text(backup_id)],
        |row| {
            Ok((
                get_uuid(row, "id")?,
                get_uuid(row, "backup_id")?,
                get::<String>(row, "state")?,
                get_json::<BackupPlan>(row, "plan")?,
                get::<Option<String>>(row, "manifest")?,
            ))
        },
    )?
    else {
        return Ok(None);
    };
    let entities = db.query(
        "read backup entities",
        "SELECT spec FROM entities WHERE operation_id = ?1 ORDER BY ordinal",
        [text(operation_id)],
        |row| get_json::<EntitySpec>(row, "spec"),
    )?;
    Ok(Some(BackupSource {
        operation_id,
        backup_id: recorded_backup_id,
        state: OperationState::parse(&state)
            .ok_or_else(|| CoordinatorError::corrupt("operation state", &state))?,
        plan,
        manifest,
        entities,
    }))
}

pub(super) fn submit_restore(
    db: &Db<'_>,
    restore: &NewRestore,
) -> Result<Submitted, CoordinatorError> {
    let backup = &restore.backup;
    let plan_json = json("plan", &backup.plan)?;
    let job = plan_restore_job(
        restore.operation_id,
        backup,
        restore.mode,
        &restore.filter,
        restore.target_scope.as_deref(),
        restore.pool.as_deref(),
    )?;
    let submitted = insert_operation(
        db,
        &OperationInsert {
            id: restore.operation_id,
            role: OperationRole::Restore,
            state: OperationState::Planning,
            plan: &plan_json,
            plan_id: &backup.plan.plan_id,
            backup_id: backup.backup_id,
            consistency: backup.plan.consistency,
            labels: &restore.labels,
            description: restore.description.as_deref(),
            command_id: restore.command_id.as_deref(),
            entities_total: u64::try_from(restore.entities.len()).unwrap_or(u64::MAX),
            mode: Some(restore.mode),
            source_operation: Some(backup.operation_id),
            target_scope: restore.target_scope.as_deref(),
            pool: restore.pool.as_deref(),
            trace: restore.trace.as_ref(),
        },
    )?;
    if submitted.existing {
        return Ok(submitted);
    }
    insert_entities(
        db,
        restore.operation_id,
        &restore.entities,
        EntityState::Planning,
    )?;
    enqueue(db, &[job])?;
    announce_new(db, restore.operation_id)?;
    Ok(submitted)
}

pub(super) fn submit_verify(
    db: &Db<'_>,
    verify: &NewVerify,
) -> Result<Submitted, CoordinatorError> {
    let backup = &verify.backup;
    let plan_json = json("plan", &backup.plan)?;
    let job = verify_job(verify.operation_id, backup)?;
    let submitted = insert_operation(
        db,
        &OperationInsert {
            id: verify.operation_id,
            role: OperationRole::Verify,
            state: OperationState::Planning,
            plan: &plan_json,
            plan_id: &backup.plan.plan_id,
            backup_id: backup.backup_id,
            consistency: backup.plan.consistency,
            labels: &BTreeMap::new(),
            description: None,
            command_id: verify.command_id.as_deref(),
            entities_total: 0,
            mode: None,
            source_operation: Some(backup.operation_id),
            target_scope: None,
            pool: None,
            trace: verify.trace.as_ref(),
        },
    )?;
    if submitted.existing {
        return Ok(submitted);
    }
    enqueue(db, &[job])?;
    announce_new(db, verify.operation_id)?;
    Ok(submitted)
}
