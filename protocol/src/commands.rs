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

message_family! {
    /// A command to the coordinator; the envelope kind is also the routing key.
    pub enum Command: "command" {
        /// `start_backup`.
        StartBackup(StartBackup) = "start_backup",
        /// `status`: reply with the operation's progress report.
        Status(OperationRef) = "status",
        /// `list`: reply with recent operations.
        List(ListOperations) = "list",
    }
}

/// The command was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The operation it started or names.
    pub operation_id: Uuid,
    /// True when the operation already existed (a repeated submission).
    #[serde(default)]
    pub existing: bool,
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
    }
}
