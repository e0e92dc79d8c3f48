//! Commands clients send to the coordinator, and the coordinator's replies.
//!
//! Command bodies refuse unknown fields: a misspelt field is an error that
//! names it, never silently ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::message_family;
use crate::plan::BackupPlan;
use crate::progress::ProgressReport;

/// Start a backup of a registered plan (`plan_id`) or an inline `plan`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBackup {
    /// Id of a plan registered with the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// An inline plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<BackupPlan>,
    /// Client-chosen operation id (UUID); submitting it twice is one operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<Uuid>,
    /// Free labels, kept with the operation and written to the manifest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Names one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationRef {
    /// The operation.
    pub operation_id: Uuid,
}

/// Lists recent operations, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListOperations {
    /// At most this many (default 50, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// How a restore reconciles archived rows with rows already in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestoreMode {
    /// Insert missing rows; replace a row only when the archived version is
    /// newer. Without a version it behaves as `overwrite`.
    #[default]
    Merge,
    /// Upsert every archived row.
    Overwrite,
    /// Insert only rows whose key is absent.
    SkipExisting,
    /// Empty the scope, then load, in one transaction.
    Replace,
}

impl RestoreMode {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Overwrite => "overwrite",
            Self::SkipExisting => "skip-existing",
            Self::Replace => "replace",
        }
    }
}

/// Restore a backup into the entity store.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRestore {
    /// The backup to restore (its backup id).
    pub backup_id: Uuid,
    /// Client-chosen operation id; submitting it twice is one operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<Uuid>,
    /// Reconciliation mode (default `merge`).
    #[serde(default)]
    pub mode: RestoreMode,
    /// Entities to restore; empty means every entity of the backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<String>,
    /// The scope this restore acts for. A backup of another scope is refused
    /// unless `target_scope` names this scope explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Restore into this scope instead of the backup's own, re-stamping every row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_scope: Option<String>,
    /// Worker pool whose workers write the rows (and whose source is the target);
    /// default: each entity's pool from the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Free labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Check that a backup is whole, without restoring it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyBackup {
    /// The backup to verify.
    pub backup_id: Uuid,
    /// Client-chosen operation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<Uuid>,
}

/// List the rows a restore could not write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticsQuery {
    /// The restore operation.
    pub operation_id: Uuid,
    /// Include rows already replayed successfully (default false).
    #[serde(default)]
    pub include_resolved: bool,
}

/// Retry the failed rows of a restore, after their cause was fixed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRows {
    /// The restore whose diagnostics to replay.
    pub operation_id: Uuid,
    /// Client-chosen id of the replay operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_id: Option<Uuid>,
}

/// Resume a paused operation, named by its id or by a continuation token.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeOperation {
    /// The operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<Uuid>,
    /// A continuation token from a progress report (tamper-evident).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

message_family! {
    /// A command to the coordinator; the envelope kind is also the routing key.
    pub enum Command: "command" {
        /// `start_backup`.
        StartBackup(StartBackup) = "start_backup",
        /// `start_restore`.
        StartRestore(StartRestore) = "start_restore",
        /// `verify`: start a verify operation.
        Verify(VerifyBackup) = "verify",
        /// `status`: reply with the operation's progress report.
        Status(OperationRef) = "status",
        /// `list`: reply with recent operations.
        List(ListOperations) = "list",
        /// `diagnostics`: reply with a restore's failed rows.
        Diagnostics(DiagnosticsQuery) = "diagnostics",
        /// `replay`: start a replay operation of a restore's failed rows.
        Replay(ReplayRows) = "replay",
        /// `pause`: no new chunks start; running chunks stop at their next part boundary.
        Pause(OperationRef) = "pause",
        /// `resume`: continue a paused operation from its durable position.
        Resume(ResumeOperation) = "resume",
        /// `cancel`: stop I/O, remove partial output, state `cancelled`.
        Cancel(OperationRef) = "cancel",
    }
}

/// One row a restore could not write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowDiagnostic {
    /// Stable id of the diagnostic within the coordinator.
    pub id: i64,
    /// Entity.
    pub entity: String,
    /// The failure.
    pub failure: crate::events::RowFailure,
    /// True once a replay wrote the row.
    #[serde(default)]
    pub resolved: bool,
}

/// A restore's failed rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// The restore operation.
    pub operation_id: Uuid,
    /// Its failed rows, in the order they were recorded.
    pub rows: Vec<RowDiagnostic>,
}

/// The command was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The operation it started or names.
    pub operation_id: Uuid,
    /// True when the operation already existed (a repeated submission).
    #[serde(default)]
    pub existing: bool,
    /// Things the client should tell its user (for example: `merge` on an
    /// entity without a version behaves as `overwrite`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Short stable code (`invalid_plan`, `unknown_plan`, `malformed`, ...).
    pub code: String,
    /// What was wrong, naming the offending field or value.
    pub error: String,
}

/// Recent operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operations {
    /// Newest first.
    pub operations: Vec<ProgressReport>,
}

message_family! {
    /// The coordinator's answer on `reply_to`, with the command's `correlation_id`.
    pub enum Reply: "reply" {
        /// `accepted`.
        Accepted(Accepted) = "accepted",
        /// `rejected`.
        Rejected(Rejected) = "rejected",
        /// `status`.
        Status(ProgressReport) = "status",
        /// `operations`.
        Operations(Operations) = "operations",
        /// `diagnostics`.
        Diagnostics(Diagnostics) = "diagnostics",
    }
}
