//! `plan_restore`: read the backup's manifest, check every selected entity
//! against the target database, create `replace` staging tables, and report
//! the parts to import (`RestorePlanned`).
//!
//! 1. The manifest must be in storage, parse, and be of archive format 1
//!    (else `OperationFailed`: `manifest_missing`, `manifest_unreadable`,
//!    `unsupported_format`).
//! 2. Entities: those named by the job (an unknown name fails the restore,
//!    `unknown_entity`), or all, in manifest order.
//! 3. For each: `prepare_target` (creates a missing Koan-layout table; its
//!    errors name the entity and table), or in `replace` mode
//!    `prepare_replace` (the same check, then the staging table; a missing
//!    Koan-layout table becomes a load table, renamed into place when
//!    applied); the target's key type must equal the archived one
//!    (`key_type_mismatch`, naming the column).
//! 4. `RestorePlanned` lists each entity as archived, with its staging table
//!    and every part in manifest order (chunk by chunk): a part's index is
//!    its import unit.
//!
//! A failure after staging tables were created drops them again. Retryable
//! failures requeue the job until its last delivery.

use koan_protocol::archive::{Manifest, ManifestEntity};
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{RestoreEntity, RestorePart, RestorePlanned, WorkerEvent};
use koan_protocol::jobs::PlanRestore;
use koan_protocol::plan::EntitySpec;
use tracing::{info, warn};

use super::manifest::read_manifest;
use super::target::RestoreStore;
use super::{Failure, Outcome, fail_operation};
use crate::error::WorkerError;
use crate::events::Events;
use crate::storage::Storage;

/// Runs a `plan_restore` job; see the module documentation.
pub async fn plan_restore<S: RestoreStore, E: Events>(
    store: &S,
    storage: &Storage,
    events: &E,
    job: &PlanRestore,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    let manifest = match read_manifest(storage, &job.manifest_path).await {
        Ok(manifest) => manifest,
        Err(failure) => {
            return fail_operation(
                events,
                job.operation_id,
                "plan_restore",
                failure,
                delivery_count,
            )
            .await;
        }
    };
    let mut staged: Vec<(EntitySpec, String)> = Vec::new();
    let planned = plan_entities(store, job, &manifest, &mut staged).await;
    let entities = match planned {
        Ok(entities) => entities,
        Err(failure) => {
            drop_staging_tables(store, &staged).await;
            return fail_operation(
                events,
                job.operation_id,
                "plan_restore",
                failure,
                delivery_count,
            )
            .await;
        }
    };
    let parts: usize = entities.iter().map(|entity| entity.parts.len()).sum();
    let names: Vec<&str> = entities
        .iter()
        .map(|entity| entity.spec.name.as_str())
        .collect();
    info!(
        operation_id = %job.operation_id,
        backup_id = %job.backup_id,
        mode = job.mode.as_str(),
        entities = ?names,
        parts,
        "restore planned"
    );
    // Staging tables stay even if this publish fails: the report may have
    // reached the coordinator; a redelivery creates them again (idempotently).
    events
        .publish(&WorkerEvent::RestorePlanned(RestorePlanned {
            operation_id: job.operation_id,
            entities,
        }))
        .await?;
    Ok(Outcome::Ack)
}

/// Checks and prepares each selected entity; records the staging tables
/// created in `staged` so a failure can drop them.
async fn plan_entities<S: RestoreStore>(
    store: &S,
    job: &PlanRestore,
    manifest: &Manifest,
    staged: &mut Vec<(EntitySpec, String)>,
) -> Result<Vec<RestoreEntity>, Failure> {
    if manifest.backup_id != job.backup_id {
        return Err(Failure::permanent(
            "manifest_mismatch",
            format!(
                "manifest '{}' belongs to backup {}, not {}",
                job.manifest_path, manifest.backup_id, job.backup_id
            ),
        ));
    }
    let mut entities = Vec::new();
    for archived in select_entities(manifest, &job.entities)? {
        let spec = &archived.spec;
        let what = format!(
            "entity {} (table {}.{})",
            spec.name, spec.schema, spec.table
        );
        let (prepared, staging_table) = if job.mode == RestoreMode::Replace {
            let (prepared, table) = store
                .prepare_replace(spec, job.operation_id, job.target_scope.as_deref())
                .await
                .map_err(|error| Failure::source(&what, &error))?;
            staged.push((spec.clone(), table.clone()));
            (prepared, Some(table))
        } else {
            let prepared = store
                .prepare_target(spec)
                .await
                .map_err(|error| Failure::source(&what, &error))?;
            (prepared, None)
        };
        if let (Some(archived_type), Some(target_type)) = (spec.key_type, prepared.key_type)
            && archived_type != target_type
        {
            return Err(Failure::permanent(
                "key_type_mismatch",
                format!(
                    "{what}: key column {} is {} in the target but {} in the archive",
                    spec.key,
                    target_type.sql(),
                    archived_type.sql()
                ),
            ));
        }
        let parts = archived
            .chunks
            .iter()
            .flat_map(|chunk| {
                chunk.parts.iter().map(|part| RestorePart {
                    chunk: chunk.chunk,
                    part: part.clone(),
                })
            })
            .collect();
        entities.push(RestoreEntity {
            spec: spec.clone(),
            staging_table,
            parts,
        });
    }
    Ok(entities)
}

/// The manifest's entities named in `wanted` (all when empty), in manifest order.
fn select_entities<'a>(
    manifest: &'a Manifest,
    wanted: &[String],
) -> Result<Vec<&'a ManifestEntity>, Failure> {
    if wanted.is_empty() {
        return Ok(manifest.entities.iter().collect());
    }
    if let Some(unknown) = wanted.iter().find(|name| {
        !manifest
            .entities
            .iter()
            .any(|entity| &entity.spec.name == *name)
    }) {
        let known: Vec<&str> = manifest
            .entities
            .iter()
            .map(|entity| entity.spec.name.as_str())
            .collect();
        return Err(Failure::permanent(
            "unknown_entity",
            format!(
                "entity '{}' is not in backup {} (it holds: {})",
                unknown.escape_default(),
                manifest.backup_id,
                known.join(", ")
            ),
        ));
    }
    Ok(manifest
        .entities
        .iter()
        .filter(|entity| wanted.contains(&entity.spec.name))
        .collect())
}

async fn drop_staging_tables<S: RestoreStore>(store: &S, staged: &[(EntitySpec, String)]) {
    for (entity, table) in staged {
        if let Err(error) = store.drop_staging(entity, table).await {
            warn!(entity = %entity.name, table, %error, "dropping a staging table of a failed plan");
        }
    }
}
