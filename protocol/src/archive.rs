//! The archive layout (format version 1) and the manifest schema.
//!
//! ```text
//! {bucket}/{scope}/{plan_id}/{backup_id}/
//!   manifest.json                               written last; its presence = complete
//!   entities/{entity}/{chunk:06}-{part:04}-{run}.jsonl.zst
//! ```
//!
//! `run` names the run of the export job that wrote the part (the fencing
//! token granted by the coordinator's chunk claim), so a stale run can never
//! overwrite a part another run wrote; the manifest references exact paths.
//!
//! A part is one zstd frame of JSON lines, one object per row:
//! `{"id": <key>, "v": <version, if any>, "doc": <document>}`, in key order.
//! Every path is built here from validated names: nothing in a plan, a
//! message or an archive can point outside its backup's prefix.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ProtocolError;
use crate::names::check_name;
use crate::plan::{BackupPlan, Consistency, EntitySpec};

/// Archive format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a backup's prefix.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Extension of part files.
pub const PART_EXTENSION: &str = "jsonl.zst";

/// The folder of one backup: `{bucket}/{scope}/{plan_id}/{backup_id}`.
pub fn backup_prefix(
    bucket: &str,
    scope_segment: &str,
    plan_id: &str,
    backup_id: Uuid,
) -> Result<String, ProtocolError> {
    check_name("bucket", bucket)?;
    check_name("scope", scope_segment)?;
    check_name("plan_id", plan_id)?;
    Ok(format!("{bucket}/{scope_segment}/{plan_id}/{backup_id}"))
}

/// Where a backup's manifest lives: under the first entity's bucket and scope.
pub fn manifest_path(plan: &BackupPlan, backup_id: Uuid) -> Result<String, ProtocolError> {
    let first =
        plan.entity_specs()
            .into_iter()
            .next()
            .ok_or_else(|| ProtocolError::InvalidPlan {
                plan_id: plan.plan_id.clone(),
                reason: "a plan needs at least one entity".into(),
            })?;
    let prefix = backup_prefix(
        &first.bucket,
        first.scope_segment(),
        &plan.plan_id,
        backup_id,
    )?;
    Ok(format!("{prefix}/{MANIFEST_FILE}"))
}

/// Where one part of one chunk of an entity lives.
pub fn part_path(
    entity: &EntitySpec,
    plan_id: &str,
    backup_id: Uuid,
    chunk: u32,
    part: u32,
    run: &str,
) -> Result<String, ProtocolError> {
    check_name("run", run)?;
    let prefix = entity_prefix(entity, plan_id, backup_id)?;
    Ok(format!(
        "{prefix}/{chunk:06}-{part:04}-{run}.{PART_EXTENSION}"
    ))
}

/// The folder holding every part of an entity in one backup.
pub fn entity_prefix(
    entity: &EntitySpec,
    plan_id: &str,
    backup_id: Uuid,
) -> Result<String, ProtocolError> {
    check_name("entity name", &entity.name)?;
    let prefix = backup_prefix(&entity.bucket, entity.scope_segment(), plan_id, backup_id)?;
    Ok(format!("{prefix}/entities/{}", entity.name))
}

/// A key range: `lo` inclusive, `hi` exclusive; `None` is unbounded.
/// Keys are the key column's text form (`key::text`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyRange {
    /// Inclusive lower bound.
    #[serde(default)]
    pub lo: Option<String>,
    /// Exclusive upper bound.
    #[serde(default)]
    pub hi: Option<String>,
}

/// One durable part of a chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    /// Part number within the chunk, from 0.
    pub part: u32,
    /// Storage path, relative to the storage root.
    pub path: String,
    /// First key in the part.
    #[serde(default)]
    pub first_key: Option<String>,
    /// Last key in the part: the continuation position once the part is durable.
    #[serde(default)]
    pub last_key: Option<String>,
    /// Rows (lines) in the part.
    pub rows: u64,
    /// Bytes of JSON lines before compression.
    pub raw_bytes: u64,
    /// Bytes stored.
    pub compressed_bytes: u64,
    /// blake3 of the stored (compressed) bytes, hex.
    pub blake3: String,
}

/// What the manifest records of how an entity's snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFacts {
    /// Entity the snapshot was taken for.
    pub entity: String,
    /// Exported snapshot id (`pg_export_snapshot()`), if one was shared.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// When the snapshot was taken.
    pub taken_at: DateTime<Utc>,
    /// Worker holding the snapshot open.
    pub holder: String,
}

/// Consistency facts of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyFacts {
    /// Mode requested by the plan.
    pub mode: Consistency,
    /// One entry per entity planned under a shared snapshot.
    #[serde(default)]
    pub snapshots: Vec<SnapshotFacts>,
    /// What happened to consistency on the way (for example: resumed after a
    /// pause, the remaining chunks read at a new snapshot).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Totals of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Entities.
    pub entities: u64,
    /// Chunks.
    pub chunks: u64,
    /// Parts.
    pub parts: u64,
    /// Rows.
    pub rows: u64,
    /// Bytes of JSON lines.
    pub raw_bytes: u64,
    /// Bytes stored.
    pub compressed_bytes: u64,
}

/// One chunk in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestChunk {
    /// Chunk number within the entity, from 0.
    pub chunk: u32,
    /// Key range the chunk covers.
    pub range: KeyRange,
    /// Rows in the chunk.
    pub rows: u64,
    /// Its parts, in order.
    pub parts: Vec<PartInfo>,
}

/// One entity in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntity {
    /// The entity as backed up (defaults applied, key type resolved).
    pub spec: EntitySpec,
    /// Rows.
    pub rows: u64,
    /// Bytes of JSON lines.
    pub raw_bytes: u64,
    /// Bytes stored.
    pub compressed_bytes: u64,
    /// Chunks in key order.
    pub chunks: Vec<ManifestChunk>,
}

/// The manifest: written last, its presence marks a complete backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Archive format version.
    pub format_version: u32,
    /// Backup id (the backup operation's id).
    pub backup_id: Uuid,
    /// The plan as run.
    pub plan: BackupPlan,
    /// Consistency mode and snapshot facts.
    pub consistency: ConsistencyFacts,
    /// Base backup, for incremental backups.
    #[serde(default)]
    pub base_backup: Option<Uuid>,
    /// Labels given at submission.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When the backup started.
    pub started_at: DateTime<Utc>,
    /// When the last chunk finished.
    pub completed_at: DateTime<Utc>,
    /// Totals.
    pub totals: Totals,
    /// Entities in plan order.
    pub entities: Vec<ManifestEntity>,
}

impl Manifest {
    /// Every part of the backup, with its entity name.
    pub fn parts(&self) -> impl Iterator<Item = (&ManifestEntity, &ManifestChunk, &PartInfo)> {
        self.entities.iter().flat_map(|entity| {
            entity
                .chunks
                .iter()
                .flat_map(move |chunk| chunk.parts.iter().map(move |part| (entity, chunk, part)))
        })
    }
}

/// One archive line, as read back.
#[derive(Debug, Deserialize)]
pub struct ArchiveLine {
    /// The key: a JSON string, or a number for integer keys.
    pub id: serde_json::Value,
    /// The version, when the entity has one.
    #[serde(default)]
    pub v: Option<serde_json::Value>,
    /// The document.
    pub doc: Box<serde_json::value::RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::BackupEntity;

    #[test]
    fn paths_stay_inside_the_backup() {
        let id = Uuid::nil();
        let plan = BackupPlan::new("orders:daily")
            .entity(BackupEntity::new("orders", "Order").in_scope("orders", "tenant-a"));
        let spec = &plan.entity_specs()[0];
        assert_eq!(
            part_path(spec, &plan.plan_id, id, 3, 12, "r1").unwrap(),
            format!("orders/tenant-a/orders:daily/{id}/entities/orders/000003-0012-r1.jsonl.zst")
        );
        assert_eq!(
            manifest_path(&plan, id).unwrap(),
            format!("orders/tenant-a/orders:daily/{id}/manifest.json")
        );
        let mut hostile = spec.clone();
        hostile.name = "../../etc".into();
        assert!(part_path(&hostile, "p", id, 0, 0, "r1").is_err());
        assert!(part_path(spec, "p", id, 0, 0, "../r").is_err());
        assert!(backup_prefix("..", "s", "p", id).is_err());
    }
}
