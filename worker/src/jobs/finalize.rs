//! `finalize`: check the archive against the manifest, remove leftovers of
//! superseded runs, then write `manifest.json` — last, since its presence
//! marks a complete backup.
//!
//! Before writing, every part the manifest references must be in storage
//! with the size the manifest records; part files under an entity's prefix
//! that the manifest does not reference (runs that lost their claim, parts
//! written but never reported) are deleted.

use std::collections::HashMap;

use koan_protocol::archive::{PART_EXTENSION, entity_prefix, manifest_path};
use koan_protocol::events::{FinalizeFailed, ManifestWritten, WorkerEvent};
use koan_protocol::jobs::Finalize;
use tracing::{info, warn};

use super::{Outcome, is_last_delivery};
use crate::error::WorkerError;
use crate::events::Events;
use crate::storage::Storage;

/// Runs a `finalize` job; see the module documentation.
pub async fn finalize<E: Events>(
    storage: &Storage,
    events: &E,
    job: &Finalize,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    match write_manifest(storage, job).await {
        Ok(removed) => {
            events
                .publish(&WorkerEvent::ManifestWritten(ManifestWritten {
                    operation_id: job.operation_id,
                    path: job.path.clone(),
                    totals: job.manifest.totals,
                }))
                .await?;
            info!(
                operation_id = %job.operation_id,
                path = %job.path,
                parts = job.manifest.totals.parts,
                rows = job.manifest.totals.rows,
                leftovers_removed = removed,
                "manifest written"
            );
            Ok(Outcome::Ack)
        }
        Err(WorkerError::Transport(error)) => Err(WorkerError::Transport(error)),
        Err(error) => {
            let retryable = error.is_retryable() && !is_last_delivery(delivery_count);
            warn!(
                operation_id = %job.operation_id,
                path = %job.path,
                code = error.code(),
                retryable,
                %error,
                "finalize failed"
            );
            events
                .publish(&WorkerEvent::FinalizeFailed(FinalizeFailed {
                    operation_id: job.operation_id,
                    code: error.code().to_string(),
                    error: error.to_string(),
                    retryable,
                }))
                .await?;
            Ok(if retryable {
                Outcome::Requeue
            } else {
                Outcome::Ack
            })
        }
    }
}

/// Checks, cleans and writes; returns how many leftover parts were deleted.
async fn write_manifest(storage: &Storage, job: &Finalize) -> Result<usize, WorkerError> {
    let manifest = &job.manifest;
    let expected = manifest_path(&manifest.plan, manifest.backup_id)?;
    if job.path != expected {
        return Err(WorkerError::Manifest(format!(
            "path '{}' is not where the plan's manifest lives ('{expected}')",
            job.path.escape_default()
        )));
    }
    let mut referenced: HashMap<&str, u64> = HashMap::new();
    for (_, _, part) in manifest.parts() {
        referenced.insert(part.path.as_str(), part.compressed_bytes);
    }
    let mut found = 0_usize;
    let mut leftovers = Vec::new();
    for entity in &manifest.entities {
        let prefix = entity_prefix(&entity.spec, &manifest.plan.plan_id, manifest.backup_id)?;
        for object in storage.list(&prefix).await? {
            let path = object.location.to_string();
            match referenced.get(path.as_str()) {
                Some(&size) if size == object.size => found += 1,
                Some(&size) => {
                    return Err(WorkerError::Manifest(format!(
                        "part '{path}' holds {} bytes, the manifest records {size}",
                        object.size
                    )));
                }
                None if path.ends_with(&format!(".{PART_EXTENSION}")) => leftovers.push(path),
                None => {}
            }
        }
    }
    if found != referenced.len() {
        let missing = missing_part(storage, &referenced).await?;
        return Err(WorkerError::Manifest(format!(
            "{} of {} referenced parts are not in storage under their entity's prefix (first: '{missing}')",
            referenced.len() - found,
            referenced.len()
        )));
    }
    for path in &leftovers {
        storage.delete(path).await?;
        info!(operation_id = %job.operation_id, path, "removed a part no run reported");
    }
    let bytes = serde_json::to_vec_pretty(manifest)
        .map_err(|error| WorkerError::Manifest(format!("cannot be serialized: {error}")))?;
    storage.put(&job.path, bytes).await?;
    Ok(leftovers.len())
}

/// The first referenced part that storage does not hold.
async fn missing_part(
    storage: &Storage,
    referenced: &HashMap<&str, u64>,
) -> Result<String, WorkerError> {
    let mut paths: Vec<&str> = referenced.keys().copied().collect();
    paths.sort_unstable();
    for path in paths {
        let Some(parent) = path.rsplit_once('/').map(|(parent, _)| parent) else {
            return Ok(path.to_string());
        };
        let present = storage
            .list(parent)
            .await?
            .iter()
            .any(|object| object.location.as_ref() == path);
        if !present {
            return Ok(path.to_string());
        }
    }
    Ok(String::from("none"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::events::MemoryEvents;

    // The end-to-end finalize test (real parts, leftovers, missing parts)
    // lives in tests/export_postgres.rs; here only the path check.
    #[tokio::test]
    async fn refuses_a_path_outside_the_backup() {
        let plan = koan_protocol::plan::BackupPlan::new("p")
            .entity(koan_protocol::plan::BackupEntity::new("e", "t"));
        let backup_id = uuid::Uuid::now_v7();
        let now = chrono::Utc::now();
        let job = Finalize {
            operation_id: backup_id,
            path: "elsewhere/manifest.json".into(),
            manifest: koan_protocol::archive::Manifest {
                format_version: koan_protocol::archive::FORMAT_VERSION,
                backup_id,
                plan,
                consistency: koan_protocol::archive::ConsistencyFacts {
                    mode: koan_protocol::plan::Consistency::PerChunk,
                    snapshots: Vec::new(),
                    notes: Vec::new(),
                },
                base_backup: None,
                labels: Default::default(),
                started_at: now,
                completed_at: now,
                totals: Default::default(),
                entities: Vec::new(),
            },
        };
        let storage =
            Storage::from_store(std::sync::Arc::new(object_store::memory::InMemory::new()));
        let events = MemoryEvents::granting();
        assert_eq!(
            finalize(&storage, &events, &job, 0).await.unwrap(),
            Outcome::Ack
        );
        match events.events().as_slice() {
            [WorkerEvent::FinalizeFailed(failed)] => {
                assert_eq!(failed.code, "manifest");
                assert!(!failed.retryable);
                assert!(
                    failed.error.contains("elsewhere/manifest.json"),
                    "{}",
                    failed.error
                );
            }
            other => panic!("unexpected events {other:?}"),
        }
        assert!(storage.list("elsewhere").await.unwrap().is_empty());
    }
}
