//! The progress report: what status replies and public events carry.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// A backup.
    Backup,
    /// A restore (or a replay of a restore's failed rows).
    Restore,
    /// A verification of a backup.
    Verify,
}

impl OperationKind {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backup => "backup",
            Self::Restore => "restore",
            Self::Verify => "verify",
        }
    }
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Accepted, entities not yet planned.
    Planning,
    /// Chunks are being exported.
    Running,
    /// Every chunk is done; the manifest is being written.
    Finalizing,
    /// The manifest is written: the backup is complete.
    Completed,
    /// The operation failed; `error` says why.
    Failed,
    /// Paused; resume with the continuation token.
    Paused,
    /// Cancelled.
    Cancelled,
}

impl OperationState {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planning => "planning",
            Self::Running => "running",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Paused => "paused",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::Planning,
            Self::Running,
            Self::Finalizing,
            Self::Completed,
            Self::Failed,
            Self::Paused,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|state| state.as_str() == name)
    }

    /// Whether the operation can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Progress of one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityProgress {
    /// Entity name.
    pub name: String,
    /// `planning`, `running` or `done`.
    pub state: String,
    /// Rows written so far.
    pub rows_done: u64,
    /// Rows in the entity (known once planned).
    pub rows_total: u64,
    /// Bytes of JSON lines written so far.
    pub bytes_done: u64,
    /// Chunks done.
    pub chunks_done: u64,
    /// Chunks planned.
    pub chunks_total: u64,
}

/// A snapshot of one operation's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport {
    /// Operation id.
    pub operation_id: Uuid,
    /// Backup or restore.
    pub kind: OperationKind,
    /// Current state.
    pub state: OperationState,
    /// Plan id.
    pub plan_id: String,
    /// The backup this operation writes (or restores).
    #[serde(default)]
    pub backup_id: Option<Uuid>,
    /// 0 to 100; monotonic; 100 only once the operation completed.
    pub percent: f64,
    /// Rows done.
    pub rows_done: u64,
    /// Rows in total (0 until every entity is planned).
    pub rows_total: u64,
    /// Bytes of JSON lines done.
    pub bytes_done: u64,
    /// Bytes stored so far.
    pub bytes_compressed: u64,
    /// Chunks done.
    pub chunks_done: u64,
    /// Chunks planned.
    pub chunks_total: u64,
    /// Per-entity figures.
    pub entities: Vec<EntityProgress>,
    /// Estimated seconds left, once there is a rate to go on.
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// Opaque, tamper-evident token naming this operation's durable position.
    #[serde(default)]
    pub continuation_token: Option<String>,
    /// Manifest path, once written.
    #[serde(default)]
    pub manifest: Option<String>,
    /// Why the operation failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Labels given at submission.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Description given at submission.
    #[serde(default)]
    pub description: Option<String>,
    /// When the operation was accepted.
    pub created_at: DateTime<Utc>,
    /// When its state last changed.
    pub updated_at: DateTime<Utc>,
    /// Increases with every change; lets a client order reports.
    pub sequence: u64,
    /// Restores: the reconciliation mode.
    #[serde(default)]
    pub mode: Option<String>,
    /// Restores: rows inserted or updated in the target.
    #[serde(default)]
    pub rows_written: u64,
    /// Restores: rows left as they were (newer in the target, or existing under `skip-existing`).
    #[serde(default)]
    pub rows_skipped: u64,
    /// Restores: rows that failed and were recorded as diagnostics.
    #[serde(default)]
    pub rows_failed: u64,
    /// Verify: each bad or missing part, named.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Restores and verifies: the operation this one replays, or the backup it reads.
    #[serde(default)]
    pub source_operation: Option<Uuid>,
}
