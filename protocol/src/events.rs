//! Events: worker reports to the coordinator (`worker.<id>.<kind>`) and the
//! public operation events clients follow (`operation.<id>.<event>`).
//!
//! Worker reports are applied idempotently: a duplicate changes nothing, and
//! reports from a run that no longer owns its chunk are ignored (fencing).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::archive::{KeyRange, PartInfo, SnapshotFacts, Totals};
use crate::message_family;
use crate::plan::EntitySpec;
use crate::progress::ProgressReport;

/// An entity was planned: its key type is known and its ranges chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityPlanned {
    /// Operation.
    pub operation_id: Uuid,
    /// The entity with its key type resolved.
    pub entity: EntitySpec,
    /// Rows in scope, counted inside the snapshot.
    pub rows_total: u64,
    /// Key ranges, in key order, covering the whole key space.
    pub ranges: Vec<KeyRange>,
    /// The shared snapshot, under `snapshot` consistency.
    #[serde(default)]
    pub snapshot: Option<SnapshotFacts>,
}

/// An entity could not be planned (missing table, bad key, unsupported type...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityFailed {
    /// Operation.
    pub operation_id: Uuid,
    /// Entity name.
    pub entity: String,
    /// Short stable code.
    pub code: String,
    /// What went wrong, naming the table or column.
    pub error: String,
}

/// A worker asks to own a chunk; the coordinator replies with [`ChunkClaim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimChunk {
    /// Operation.
    pub operation_id: Uuid,
    /// Entity name.
    pub entity: String,
    /// Chunk number.
    pub chunk: u32,
    /// Publication attempt of the job being run.
    pub attempt: u32,
    /// Unique id of this run of the job; part paths carry it (fencing token).
    pub run: String,
    /// Worker id, for status and logs.
    pub worker: String,
}

/// The coordinator's answer to [`ClaimChunk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkClaim {
    /// Whether the run now owns the chunk. When false, drop the job.
    pub granted: bool,
    /// Why not, when refused.
    #[serde(default)]
    pub reason: Option<String>,
    /// Parts already durable for this chunk: continue after the last one.
    #[serde(default)]
    pub resume_after: Option<ResumePoint>,
    /// Seconds the claim lasts without news from the run.
    #[serde(default)]
    pub lease_seconds: u64,
}

/// Where a chunk continues: after `last_key`, numbering parts from `next_part`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// Last key durably written.
    pub last_key: String,
    /// Number of the next part.
    pub next_part: u32,
    /// Rows already durable in the chunk.
    pub rows: u64,
}

/// Rows streamed by a run since its last durable part (for live progress).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkProgress {
    /// Operation.
    pub operation_id: Uuid,
    /// Entity name.
    pub entity: String,
    /// Chunk number.
    pub chunk: u32,
    /// Run id.
    pub run: String,
    /// Rows streamed and not yet in a durable part.
    pub rows_pending: u64,
    /// Bytes of JSON lines not yet in a durable part.
    pub raw_bytes_pending: u64,
}

/// A part is durable in storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartWritten {
    /// Operation.
    pub operation_id: Uuid,
    /// Entity name.
    pub entity: String,
    /// Chunk number.
    pub chunk: u32,
    /// Run id.
    pub run: String,
    /// The part.
    pub part: PartInfo,
}

/// Every row of the chunk's range is in durable parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDone {
    /// Operation.
    pub operation_id: Uuid,
    /// Entity name.
    pub entity: String,
    /// Chunk number.
    pub chunk: u32,
    /// Run id.
    pub run: String,
    /// Number of parts the chunk has (all runs together).
    pub parts: u32,
    /// The run's last part, reported here instead of in a `part_written` of
    /// its own: applied exactly as that `part_written` followed by this
    /// report. Absent when every part was reported already (older workers).
    #[serde(default)]
    pub part: Option<PartInfo>,
}

impl ChunkDone {
    /// The `part_written` this report carries ([`ChunkDone::part`]), as its own report.
    pub fn part_written(&self) -> Option<PartWritten> {
        self.part.as_ref().map(|part| PartWritten {
            operation_id: self.operation_id,
            entity: self.entity.clone(),
            chunk: self.chunk,
            run: self.run.clone(),
            part: part.clone(),
        })
    }
}

/// A run of a chunk failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkFailed {
    /// Operation.
    pub operation_id: Uuid,
    /// Entity name.
    pub entity: String,
    /// Chunk number.
    pub chunk: u32,
    /// Run id.
    pub run: String,
    /// Short stable code.
    pub code: String,
    /// What went wrong.
    pub error: String,
    /// False when retrying cannot help: the operation fails.
    pub retryable: bool,
}

/// The manifest is written: the backup is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestWritten {
    /// Operation.
    pub operation_id: Uuid,
    /// Manifest path.
    pub path: String,
    /// Totals as written.
    pub totals: Totals,
}

/// The manifest could not be written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalizeFailed {
    /// Operation.
    pub operation_id: Uuid,
    /// Short stable code.
    pub code: String,
    /// What went wrong.
    pub error: String,
    /// False when retrying cannot help.
    pub retryable: bool,
}

/// One row a restore could not write, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowFailure {
    /// The row's key, when the line could be read far enough.
    #[serde(default)]
    pub key: Option<String>,
    /// The part it came from.
    #[serde(default)]
    pub part: Option<String>,
    /// Line number in the part, from 1.
    #[serde(default)]
    pub line_no: Option<u64>,
    /// Short stable code (`unparsable_line`, `constraint_violation`, `type_mismatch`, `scope_conflict`, ...).
    pub code: String,
    /// The reason, from the parser or the database.
    pub reason: String,
    /// The raw archive line, to replay it.
    pub line: String,
}

/// A restore was planned from the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePlanned {
    /// The restore operation.
    pub operation_id: Uuid,
    /// The entities restored, in manifest order.
    pub entities: Vec<RestoreEntity>,
}

/// One entity of a planned restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreEntity {
    /// The entity as archived.
    pub spec: EntitySpec,
    /// `replace` mode: the staging table created for it.
    #[serde(default)]
    pub staging_table: Option<String>,
    /// Its parts, in archive order; their index is the import unit.
    pub parts: Vec<RestorePart>,
}

/// One part to import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePart {
    /// Chunk of the part.
    pub chunk: u32,
    /// The part as the manifest describes it.
    pub part: PartInfo,
}

/// A restore, replay or verify failed as a whole (bad manifest, missing table...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationFailed {
    /// The operation.
    pub operation_id: Uuid,
    /// Short stable code.
    pub code: String,
    /// What went wrong, naming the entity, table or part.
    pub error: String,
}

/// A part was imported (its transaction committed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartImported {
    /// The restore operation.
    pub operation_id: Uuid,
    /// Entity.
    pub entity: String,
    /// Import unit (index of the part among the entity's parts).
    pub unit: u32,
    /// Rows inserted or updated (staged, in `replace` mode).
    pub rows_written: u64,
    /// Rows left as they were.
    pub rows_skipped: u64,
    /// Rows that failed, isolated from the rest.
    #[serde(default)]
    pub failures: Vec<RowFailure>,
    /// Bytes of JSON lines read.
    pub raw_bytes: u64,
}

/// A part could not be imported; nothing from it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportFailed {
    /// The restore operation.
    pub operation_id: Uuid,
    /// Entity.
    pub entity: String,
    /// Import unit.
    pub unit: u32,
    /// Short stable code (`hash_mismatch`, `row_count_mismatch`, `missing_part`, ...).
    pub code: String,
    /// What went wrong, naming the part.
    pub error: String,
    /// False when retrying cannot help: the operation fails.
    pub retryable: bool,
}

/// `replace` mode: an entity's staged rows replaced its scope in the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreApplied {
    /// The restore operation.
    pub operation_id: Uuid,
    /// Entity.
    pub entity: String,
    /// Rows written.
    pub rows_written: u64,
    /// Staged rows left out (a key staged more than once is written once).
    #[serde(default)]
    pub rows_skipped: u64,
    /// Rows of the scope removed first.
    pub rows_removed: u64,
    /// Rows that could not be written.
    #[serde(default)]
    pub failures: Vec<RowFailure>,
}

/// A replay job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayDone {
    /// The replay operation.
    pub operation_id: Uuid,
    /// Diagnostics whose rows are now written.
    pub resolved: Vec<i64>,
    /// Diagnostics whose rows failed again, with the new reason.
    pub failed: Vec<ReplayFailure>,
}

/// A replayed row that failed again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayFailure {
    /// The diagnostic.
    pub diagnostic_id: i64,
    /// Why it failed this time.
    pub failure: RowFailure,
}

/// Verify progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProgress {
    /// The verify operation.
    pub operation_id: Uuid,
    /// Parts checked so far.
    pub parts_done: u64,
    /// Parts in the backup.
    pub parts_total: u64,
    /// Rows read so far.
    pub rows_done: u64,
    /// Rows in the backup.
    pub rows_total: u64,
}

/// Verify ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyDone {
    /// The verify operation.
    pub operation_id: Uuid,
    /// Parts checked.
    pub parts_checked: u64,
    /// Rows read.
    pub rows: u64,
    /// Each bad or missing part, named with what is wrong; empty when whole.
    pub problems: Vec<String>,
}

/// A cancelled backup's objects are removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discarded {
    /// The cancelled operation.
    pub operation_id: Uuid,
    /// Objects removed.
    pub objects_removed: u64,
}

message_family! {
    /// A report from a worker to the coordinator.
    pub enum WorkerEvent: "worker event" {
        /// `entity_planned`.
        EntityPlanned(EntityPlanned) = "entity_planned",
        /// `entity_failed`.
        EntityFailed(EntityFailed) = "entity_failed",
        /// `claim_chunk` (request; the reply is a [`ClaimReply`]).
        ClaimChunk(ClaimChunk) = "claim_chunk",
        /// `chunk_progress`.
        ChunkProgress(ChunkProgress) = "chunk_progress",
        /// `part_written`.
        PartWritten(PartWritten) = "part_written",
        /// `chunk_done`.
        ChunkDone(ChunkDone) = "chunk_done",
        /// `chunk_failed`.
        ChunkFailed(ChunkFailed) = "chunk_failed",
        /// `manifest_written`.
        ManifestWritten(ManifestWritten) = "manifest_written",
        /// `finalize_failed`.
        FinalizeFailed(FinalizeFailed) = "finalize_failed",
        /// `restore_planned`.
        RestorePlanned(RestorePlanned) = "restore_planned",
        /// `operation_failed`: a restore, replay or verify failed as a whole.
        OperationFailed(OperationFailed) = "operation_failed",
        /// `part_imported`.
        PartImported(PartImported) = "part_imported",
        /// `import_failed`.
        ImportFailed(ImportFailed) = "import_failed",
        /// `restore_applied`.
        RestoreApplied(RestoreApplied) = "restore_applied",
        /// `replay_done`.
        ReplayDone(ReplayDone) = "replay_done",
        /// `verify_progress`.
        VerifyProgress(VerifyProgress) = "verify_progress",
        /// `verify_done`.
        VerifyDone(VerifyDone) = "verify_done",
        /// `discarded`.
        Discarded(Discarded) = "discarded",
    }
}

impl WorkerEvent {
    /// The operation the report belongs to.
    pub fn operation_id(&self) -> Uuid {
        match self {
            Self::EntityPlanned(event) => event.operation_id,
            Self::EntityFailed(event) => event.operation_id,
            Self::ClaimChunk(event) => event.operation_id,
            Self::ChunkProgress(event) => event.operation_id,
            Self::PartWritten(event) => event.operation_id,
            Self::ChunkDone(event) => event.operation_id,
            Self::ChunkFailed(event) => event.operation_id,
            Self::ManifestWritten(event) => event.operation_id,
            Self::FinalizeFailed(event) => event.operation_id,
            Self::RestorePlanned(event) => event.operation_id,
            Self::OperationFailed(event) => event.operation_id,
            Self::PartImported(event) => event.operation_id,
            Self::ImportFailed(event) => event.operation_id,
            Self::RestoreApplied(event) => event.operation_id,
            Self::ReplayDone(event) => event.operation_id,
            Self::VerifyProgress(event) => event.operation_id,
            Self::VerifyDone(event) => event.operation_id,
            Self::Discarded(event) => event.operation_id,
        }
    }
}

message_family! {
    /// The coordinator's reply to a worker request.
    pub enum ClaimReply: "claim reply" {
        /// `chunk_claim`.
        ChunkClaim(ChunkClaim) = "chunk_claim",
    }
}

message_family! {
    /// A public event of one operation; every kind carries the full progress report.
    pub enum OperationEvent: "operation event" {
        /// `progress`.
        Progress(ProgressReport) = "progress",
        /// `completed`: the manifest is written; percent is 100.
        Completed(ProgressReport) = "completed",
        /// `failed`: `error` says why.
        Failed(ProgressReport) = "failed",
        /// `paused`.
        Paused(ProgressReport) = "paused",
        /// `cancelled`.
        Cancelled(ProgressReport) = "cancelled",
    }
}

impl OperationEvent {
    /// The progress report carried by every kind.
    pub fn report(&self) -> &ProgressReport {
        match self {
            Self::Progress(report)
            | Self::Completed(report)
            | Self::Failed(report)
            | Self::Paused(report)
            | Self::Cancelled(report) => report,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod chunk_done_tests {
    use super::*;

    fn done(part: Option<PartInfo>) -> WorkerEvent {
        WorkerEvent::ChunkDone(ChunkDone {
            operation_id: Uuid::nil(),
            entity: "orders".into(),
            chunk: 4,
            run: "abc".into(),
            parts: 1,
            part,
        })
    }

    #[test]
    fn chunk_done_without_part_decodes_as_before() {
        // What a worker that reports every part on its own sends.
        let old = crate::codec::encode_envelope(
            "chunk_done",
            &serde_json::json!({"operation_id": Uuid::nil(), "entity": "orders",
                "chunk": 4, "run": "abc", "parts": 1}),
        )
        .unwrap();
        assert_eq!(crate::decode::<WorkerEvent>(&old).unwrap(), done(None));
    }

    #[test]
    fn chunk_done_carries_its_last_part() {
        let part = PartInfo {
            part: 0,
            path: "b/_all/p/x/entities/orders/000004-0000-abc.jsonl.zst".into(),
            first_key: Some("a".into()),
            last_key: Some("z".into()),
            rows: 10,
            raw_bytes: 100,
            compressed_bytes: 50,
            blake3: "00".into(),
        };
        let event = done(Some(part.clone()));
        let bytes = crate::encode(&event).unwrap();
        assert_eq!(crate::decode::<WorkerEvent>(&bytes).unwrap(), event);
        let WorkerEvent::ChunkDone(report) = event else {
            unreachable!()
        };
        let written = report.part_written().unwrap();
        assert_eq!((written.chunk, written.run.as_str()), (4, "abc"));
        assert_eq!(written.part, part);
        assert!(
            matches!(done(None), WorkerEvent::ChunkDone(report) if report.part_written().is_none())
        );
    }
}
