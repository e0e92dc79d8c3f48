//! Jobs the coordinator publishes to worker pools (`koan.jobs`, routing key = pool).
//!
//! Jobs carry everything a worker needs: workers keep no state of their own
//! between jobs. Unknown fields are tolerated so a newer coordinator can add
//! optional fields during a rolling upgrade.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::archive::{KeyRange, Manifest};
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

message_family! {
    /// A job for a worker pool.
    pub enum Job: "job" {
        /// `plan_entity`.
        PlanEntity(PlanEntity) = "plan_entity",
        /// `export_chunk`.
        ExportChunk(ExportChunk) = "export_chunk",
        /// `finalize`.
        Finalize(Finalize) = "finalize",
    }
}

impl Job {
    /// The operation the job belongs to.
    pub fn operation_id(&self) -> Uuid {
        match self {
            Self::PlanEntity(job) => job.operation_id,
            Self::ExportChunk(job) => job.operation_id,
            Self::Finalize(job) => job.operation_id,
        }
    }
}
