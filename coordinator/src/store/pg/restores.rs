//! Restores and verifies: reading the backup they read, and recording them
//! with their first job.

use std::collections::BTreeMap;

use tokio_postgres::types::Json;
use uuid::Uuid;

use koan_protocol::plan::{BackupPlan, EntitySpec};
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::restore_rules::{plan_restore_job, verify_job};
use crate::store::{BackupSource, EntityState, NewRestore, NewVerify, OperationRole, Submitted};

use super::PgStateStore;
use super::db::{Db, get};
use super::outbox::enqueue;
use super::submit::{OperationInsert, announce_new, insert_entities, insert_operation};

pub(super) async fn backup_source(
    store: &PgStateStore,
    backup_id: Uuid,
) -> Result<Option<BackupSource>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let Some(row) = db
        .query_opt(
            "read backup",
            "SELECT id, backup_id, state, plan, manifest FROM {s}.operations
             WHERE backup_id = $1 AND kind = 'backup'
             ORDER BY (state = 'completed') DESC, created_at DESC LIMIT 1",
            &[&backup_id],
        )
        .await?
    else {
        return Ok(None);
    };
    let operation_id: Uuid = get(&row, "id")?;
    let state: String = get(&row, "state")?;
    let Json(plan): Json<BackupPlan> = get(&row, "plan")?;
    let mut entities = Vec::new();
    for entity in db
        .query(
            "read backup entities",
            "SELECT spec FROM {s}.entities WHERE operation_id = $1 ORDER BY ordinal",
            &[&operation_id],
        )
        .await?
    {
        let Json(spec): Json<EntitySpec> = get(&entity, "spec")?;
        entities.push(spec);
    }
    Ok(Some(BackupSource {
        operation_id,
        backup_id: get(&row, "backup_id")?,
        state: OperationState::parse(&state)
            .ok_or_else(|| CoordinatorError::corrupt("operation state", &state))?,
        plan,
        manifest: get(&row, "manifest")?,
        entities,
    }))
}

pub(super) async fn submit_restore(
    store: &PgStateStore,
    restore: &NewRestore,
) -> Result<Submitted, CoordinatorError> {
    let backup = &restore.backup;
    let plan_json = serde_json::to_value(&backup.plan)
        .map_err(|error| CoordinatorError::corrupt("plan", error))?;
    let job = plan_restore_job(
        restore.operation_id,
        backup,
        restore.mode,
        &restore.filter,
        restore.target_scope.as_deref(),
        restore.pool.as_deref(),
    )?;
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let submitted = insert_operation(
        &db,
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
    )
    .await?;
    if submitted.existing {
        return Ok(submitted);
    }
    insert_entities(
        &db,
        restore.operation_id,
        &restore.entities,
        EntityState::Planning,
    )
    .await?;
    enqueue(&db, &[job]).await?;
    announce_new(&db, restore.operation_id).await?;
    db.commit().await?;
    Ok(submitted)
}

pub(super) async fn submit_verify(
    store: &PgStateStore,
    verify: &NewVerify,
) -> Result<Submitted, CoordinatorError> {
    let backup = &verify.backup;
    let plan_json = serde_json::to_value(&backup.plan)
        .map_err(|error| CoordinatorError::corrupt("plan", error))?;
    let job = verify_job(verify.operation_id, backup)?;
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let submitted = insert_operation(
        &db,
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
    )
    .await?;
    if submitted.existing {
        return Ok(submitted);
    }
    enqueue(&db, &[job]).await?;
    announce_new(&db, verify.operation_id).await?;
    db.commit().await?;
    Ok(submitted)
}
