//! Submissions and reads: recording an operation (a backup with its plan
//! jobs here; restores, verifies and replays build on the same helpers),
//! status and listings.

use std::collections::HashMap;

use tokio_postgres::types::Json;
use uuid::Uuid;

use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::{OperationState, ProgressReport};
use koan_protocol::trace::TraceContext;

use crate::error::CoordinatorError;
use crate::progress;
pub(super) use crate::store::rules::OperationInsert;
use crate::store::rules::plan_jobs;
use crate::store::{EntityState, NewBackup, OperationRecord, OperationRole, StateStore, Submitted};

use super::PgStateStore;
use super::db::{Db, get, int};
use super::operations::{
    ENTITY_COLUMNS, OPERATION_COLUMNS, OperationRow, entity_from_row, load_entities,
    lock_operation, operation_from_row, save_operation,
};
use super::outbox::enqueue;

/// Most operations one listing returns.
pub(super) const MAX_LIST: u32 = 1_000;

pub(super) async fn find_submission(
    store: &PgStateStore,
    operation_id: Option<Uuid>,
    command_id: Option<&str>,
) -> Result<Option<Uuid>, CoordinatorError> {
    if operation_id.is_none() && command_id.is_none() {
        return Ok(None);
    }
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let row = db
        .query_opt(
            "find submission",
            "SELECT id FROM {s}.operations WHERE id = $1 OR command_id = $2
             ORDER BY (id = $1) DESC NULLS LAST LIMIT 1",
            &[&operation_id, &command_id],
        )
        .await?;
    row.map(|row| get(&row, "id")).transpose()
}

pub(super) async fn submit_backup(
    store: &PgStateStore,
    backup: &NewBackup,
) -> Result<Submitted, CoordinatorError> {
    let plan_json = serde_json::to_value(&backup.plan)
        .map_err(|error| CoordinatorError::corrupt("plan", error))?;
    let specs = backup.plan.entity_specs();
    let jobs = plan_jobs(backup.operation_id, &backup.plan)?;
    let mut client = store.client().await?;
    let db = Db::begin(&mut client, store).await?;
    let submitted = insert_operation(
        &db,
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
    )
    .await?;
    if submitted.existing {
        return Ok(submitted);
    }
    insert_entities(&db, backup.operation_id, &specs, EntityState::Planning).await?;
    enqueue(&db, &jobs).await?;
    announce_new(&db, backup.operation_id).await?;
    db.commit().await?;
    Ok(submitted)
}

/// Inserts an operation; when its id or command id is known already, inserts
/// nothing and names the existing operation.
pub(super) async fn insert_operation(
    db: &Db<'_>,
    operation: &OperationInsert<'_, serde_json::Value>,
) -> Result<Submitted, CoordinatorError> {
    let inserted = db
        .execute(
            "record operation",
            "INSERT INTO {s}.operations (id, kind, state, plan, plan_id, backup_id, consistency,
                 labels, description, command_id, entities_total, created_at, updated_at,
                 mode, source_operation, target_scope, pool, traceparent, tracestate)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15, $16,
                     $17, $18)
             ON CONFLICT DO NOTHING",
            &[
                &operation.id,
                &operation.role.as_str(),
                &operation.state.as_str(),
                operation.plan,
                &operation.plan_id,
                &operation.backup_id,
                &operation.consistency.as_str(),
                &Json(operation.labels),
                &operation.description,
                &operation.command_id,
                &int(operation.entities_total),
                &db.now,
                &operation.mode.map(RestoreMode::as_str),
                &operation.source_operation,
                &operation.target_scope,
                &operation.pool,
                &operation.trace.map(TraceContext::traceparent),
                &operation.trace.and_then(TraceContext::tracestate),
            ],
        )
        .await?;
    if inserted > 0 {
        return Ok(Submitted {
            operation_id: operation.id,
            existing: false,
        });
    }
    // The conflicting row is committed (ON CONFLICT waited for it): this statement sees it.
    let existing = db
        .query_opt(
            "find submission",
            "SELECT id FROM {s}.operations WHERE id = $1 OR command_id = $2
             ORDER BY (id = $1) DESC NULLS LAST LIMIT 1",
            &[&operation.id, &operation.command_id],
        )
        .await?
        .map(|row| get(&row, "id"))
        .transpose()?
        .unwrap_or(operation.id);
    Ok(Submitted {
        operation_id: existing,
        existing: true,
    })
}

/// Records the entities of a new operation, in order, all in `state`.
pub(super) async fn insert_entities(
    db: &Db<'_>,
    operation_id: Uuid,
    specs: &[EntitySpec],
    state: EntityState,
) -> Result<(), CoordinatorError> {
    let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
    let ordinals: Vec<i32> = (0..specs.len())
        .map(|ordinal| i32::try_from(ordinal).unwrap_or(i32::MAX))
        .collect();
    let spec_values = specs
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CoordinatorError::corrupt("entity spec", error))?;
    db.execute(
        "record entities",
        "INSERT INTO {s}.entities (operation_id, name, ordinal, spec, state)
         SELECT $1, name, ordinal, spec, $5
         FROM unnest($2::text[], $3::integer[], $4::jsonb[]) AS planned(name, ordinal, spec)",
        &[
            &operation_id,
            &names,
            &ordinals,
            &spec_values,
            &state.as_str(),
        ],
    )
    .await?;
    Ok(())
}

/// Saves a just-inserted operation once: its first sequence and public event.
pub(super) async fn announce_new(
    db: &Db<'_>,
    operation_id: Uuid,
) -> Result<OperationRow, CoordinatorError> {
    let mut operation = lock_operation(db, operation_id)
        .await?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished after insert"))?;
    save_operation(db, &mut operation).await?;
    Ok(operation)
}

pub(super) async fn operation(
    store: &PgStateStore,
    operation_id: Uuid,
) -> Result<Option<OperationRecord>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let text = format!("SELECT {OPERATION_COLUMNS} FROM {{s}}.operations WHERE id = $1");
    db.query_opt("read operation", &text, &[&operation_id])
        .await?
        .map(|row| operation_from_row(&row).map(|operation| operation.record))
        .transpose()
}

pub(super) async fn report(
    store: &PgStateStore,
    operation_id: Uuid,
) -> Result<Option<ProgressReport>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let text = format!("SELECT {OPERATION_COLUMNS} FROM {{s}}.operations WHERE id = $1");
    let Some(row) = db
        .query_opt("read operation", &text, &[&operation_id])
        .await?
    else {
        return Ok(None);
    };
    let operation = operation_from_row(&row)?;
    let entities = load_entities(&db, operation_id).await?;
    Ok(Some(progress::report(
        &operation.record,
        &entities,
        store.token_secret(),
        db.now,
    )))
}

pub(super) async fn list_reports(
    store: &PgStateStore,
    limit: u32,
) -> Result<Vec<ProgressReport>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let text = format!(
        "SELECT {OPERATION_COLUMNS} FROM {{s}}.operations
         ORDER BY created_at DESC, id DESC LIMIT $1"
    );
    let limit = i64::from(limit.clamp(1, MAX_LIST));
    let rows = db.query("list operations", &text, &[&limit]).await?;
    let operations = rows
        .iter()
        .map(operation_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<Uuid> = operations
        .iter()
        .map(|operation| operation.record.id)
        .collect();
    let text = format!(
        "SELECT operation_id, {ENTITY_COLUMNS} FROM {{s}}.entities
         WHERE operation_id = ANY($1) ORDER BY operation_id, ordinal"
    );
    let mut entities: HashMap<Uuid, Vec<_>> = HashMap::new();
    for row in db.query("list entities", &text, &[&ids]).await? {
        let operation_id: Uuid = get(&row, "operation_id")?;
        entities
            .entry(operation_id)
            .or_default()
            .push(entity_from_row(&row)?);
    }
    Ok(operations
        .iter()
        .map(|operation| {
            let of_operation = entities
                .get(&operation.record.id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            progress::report(
                &operation.record,
                of_operation,
                store.token_secret(),
                db.now,
            )
        })
        .collect())
}
