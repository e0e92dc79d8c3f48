//! Submissions and reads: recording a backup with its plan jobs, status and listings.

use std::collections::HashMap;

use tokio_postgres::types::Json;
use uuid::Uuid;

use koan_protocol::progress::{OperationKind, OperationState, ProgressReport};

use crate::error::CoordinatorError;
use crate::progress;
use crate::store::rules::plan_jobs;
use crate::store::{EntityState, NewBackup, StateStore, Submitted};

use super::PgStateStore;
use super::db::{Db, get};
use super::operations::{
    ENTITY_COLUMNS, OPERATION_COLUMNS, entity_from_row, load_entities, lock_operation,
    operation_from_row, save_operation,
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
    let inserted = db
        .execute(
            "record operation",
            "INSERT INTO {s}.operations (id, kind, state, plan, plan_id, backup_id, consistency,
                 labels, description, command_id, entities_total, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $1, $6, $7, $8, $9, $10, $11, $11)
             ON CONFLICT DO NOTHING",
            &[
                &backup.operation_id,
                &OperationKind::Backup.as_str(),
                &OperationState::Planning.as_str(),
                &plan_json,
                &backup.plan.plan_id,
                &backup.plan.consistency.as_str(),
                &Json(&backup.labels),
                &backup.description,
                &backup.command_id,
                &i64::try_from(specs.len()).unwrap_or(i64::MAX),
                &db.now,
            ],
        )
        .await?;
    if inserted == 0 {
        // The conflicting row is committed (ON CONFLICT waited for it): this statement sees it.
        let existing = db
            .query_opt(
                "find submission",
                "SELECT id FROM {s}.operations WHERE id = $1 OR command_id = $2
                 ORDER BY (id = $1) DESC NULLS LAST LIMIT 1",
                &[&backup.operation_id, &backup.command_id],
            )
            .await?
            .map(|row| get(&row, "id"))
            .transpose()?
            .unwrap_or(backup.operation_id);
        return Ok(Submitted {
            operation_id: existing,
            existing: true,
        });
    }
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
            &backup.operation_id,
            &names,
            &ordinals,
            &spec_values,
            &EntityState::Planning.as_str(),
        ],
    )
    .await?;
    enqueue(&db, &jobs).await?;
    let mut operation = lock_operation(&db, backup.operation_id)
        .await?
        .ok_or_else(|| CoordinatorError::corrupt("operation", "vanished after insert"))?;
    save_operation(&db, &mut operation).await?;
    db.commit().await?;
    Ok(Submitted {
        operation_id: backup.operation_id,
        existing: false,
    })
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
