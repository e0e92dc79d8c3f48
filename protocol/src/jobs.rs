//! Jobs the coordinator publishes to worker pools (`koan.jobs`, routing key = pool).
//!
//! Jobs carry everything a worker needs: workers keep no state of their own
//! between jobs. Unknown fields are tolerated so a newer coordinator can add
//! optional fields during a rolling upgrade.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::archive::{KeyRange, Manifest, PartInfo};
use crate::commands::RestoreMode;
use crate::message_family;
use crate::plan::{Consistency, EntitySpec};

/// Plan one entity: inspect the source, take the snapshot, choose key ranges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanEntity {
    /// Operation.
    pub operation_id: Uuid,
    /// Plan id (for paths and spans).
    pub plan_id: String,
    /// Backup being written.
    pub backup_id: Uuid,
    /// The entity, defaults applied.
    pub entity: EntitySpec,
    /// Consistency mode.
    pub consistency: Consistency,
}

/// Export one chunk of an entity to archive storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportChunk {
    /// Operation.
    pub operation_id: Uuid,
    /// Plan id.
    pub plan_id: String,
    /// Backup being written.
    pub backup_id: Uuid,
    /// The entity, with its key type resolved.
    pub entity: EntitySpec,
    /// Chunk number within the entity.
    pub chunk: u32,
    /// Key range of the chunk.
    pub range: KeyRange,
    /// Exported snapshot to read under, for `snapshot` consistency.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Publication attempt (1 for the first publish; re-publishes count up).
    pub attempt: u32,
    /// Target bytes of JSON lines per part.
    pub part_bytes: u64,
}

/// Write the manifest of a backup whose chunks are all done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finalize {
    /// Operation.
    pub operation_id: Uuid,
    /// Where to write the manifest.
    pub path: String,
    /// The manifest, assembled by the coordinator from the parts it accepted.
    pub manifest: Manifest,
}

/// Read a backup's manifest and plan its restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRestore {
    /// The restore operation.
    pub operation_id: Uuid,
    /// The backup restored.
    pub backup_id: Uuid,
    /// Its manifest.
    pub manifest_path: String,
    /// Reconciliation mode.
    pub mode: RestoreMode,
    /// Entities to restore; empty means all.
    #[serde(default)]
    pub entities: Vec<String>,
    /// Scope to re-stamp rows with, when restoring into another scope.
    #[serde(default)]
    pub target_scope: Option<String>,
}

/// Where and how imported rows are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreTarget {
    /// Reconciliation mode.
    pub mode: RestoreMode,
    /// Scope to re-stamp rows with.
    #[serde(default)]
    pub target_scope: Option<String>,
    /// `replace` mode: the staging table parts are loaded into before the swap.
    #[serde(default)]
    pub staging_table: Option<String>,
}

/// Import one archived part into the target (or its staging table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportPart {
    /// The restore operation.
    pub operation_id: Uuid,
    /// The entity as archived (from the manifest).
    pub entity: EntitySpec,
    /// Where and how to write.
    pub target: RestoreTarget,
    /// Index of this part among the entity's parts (the restore's unit of work).
    pub unit: u32,
    /// Chunk the part belongs to.
    pub chunk: u32,
    /// The part, as the manifest describes it (path, rows, hash).
    pub part: PartInfo,
}

/// `replace` mode: swap an entity's staged rows into the target in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyRestore {
    /// The restore operation.
    pub operation_id: Uuid,
    /// The entity as archived.
    pub entity: EntitySpec,
    /// Where and how to write (with the staging table).
    pub target: RestoreTarget,
}

/// One archived line to write again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayLine {
    /// The diagnostic it comes from.
    pub diagnostic_id: i64,
    /// The raw archive line.
    pub line: String,
}

/// Write again the lines a restore could not write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayJob {
    /// The replay operation.
    pub operation_id: Uuid,
    /// The restore replayed.
    pub restore_id: Uuid,
    /// The entity as archived.
    pub entity: EntitySpec,
    /// Where and how to write (`replace` replays as `overwrite`: the swap is done).
    pub target: RestoreTarget,
    /// The lines.
    pub lines: Vec<ReplayLine>,
}

/// Check every part of a backup against its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyJob {
    /// The verify operation.
    pub operation_id: Uuid,
    /// The backup verified.
    pub backup_id: Uuid,
    /// Its manifest.
    pub manifest_path: String,
}

/// Remove what a cancelled backup wrote: every object under its prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardBackup {
    /// The cancelled backup operation.
    pub operation_id: Uuid,
    /// Storage prefixes to empty (each `{bucket}/{scope}/{plan_id}/{backup_id}`).
    pub prefixes: Vec<String>,
}

message_family! {
    /// A job for a worker pool.
    pub enum Job: "job" {
        /// `plan_entity`.
        PlanEntity(PlanEntity) = "plan_entity",
        /// `export_chunk`.
        ExportChunk(ExportChunk) = "export_chunk",
        /// `finalize`.
        Finalize(Finalize) = "finalize",
        /// `plan_restore`.
        PlanRestore(PlanRestore) = "plan_restore",
        /// `import_part`.
        ImportPart(ImportPart) = "import_part",
        /// `apply_restore`.
        ApplyRestore(ApplyRestore) = "apply_restore",
        /// `replay_rows`.
        Replay(ReplayJob) = "replay_rows",
        /// `verify_backup`.
        Verify(VerifyJob) = "verify_backup",
        /// `discard_backup`.
        Discard(DiscardBackup) = "discard_backup",
    }
}

impl Job {
    /// The operation the job belongs to.
    pub fn operation_id(&self) -> Uuid {
        match self {
            Self::PlanEntity(job) => job.operation_id,
            Self::ExportChunk(job) => job.operation_id,
            Self::Finalize(job) => job.operation_id,
            Self::PlanRestore(job) => job.operation_id,
            Self::ImportPart(job) => job.operation_id,
            Self::ApplyRestore(job) => job.operation_id,
            Self::Replay(job) => job.operation_id,
            Self::Verify(job) => job.operation_id,
            Self::Discard(job) => job.operation_id,
        }
    }
}
