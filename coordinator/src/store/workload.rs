//! What the state store tells the coordinator's metrics: the work waiting
//! per pool, operations by state, and operations that ended.
//!
//! **Why from the state store and not the broker.** A pool's backlog is what
//! an autoscaler scales on: how many jobs wait and how long the oldest has
//! waited. RabbitMQ tells a queue's message count (passive declare) but not
//! the age of its oldest message (without the management plugin), the
//! in-process broker knows counts only, and every coordinator would have to
//! ask the broker for every pool. The state store knows both figures for
//! every pool, for either broker, consistently across coordinators: every
//! export chunk published and not yet claimed, every restore unit not yet
//! imported, and since when (the time it last became pending: planned,
//! handed back, its lease expired, or resumed). It does not count the few
//! bookkeeping jobs (plan, finalize, verify, apply, replay, discard).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use koan_protocol::progress::OperationState;

use super::OperationRole;

/// The data jobs of one pool's operations that are planning or running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWorkload {
    /// The pool.
    pub pool: String,
    /// Jobs waiting for a worker: export chunks published and not claimed,
    /// and restore units not imported yet (an import has no claim, so a part
    /// being imported counts as waiting until its report).
    pub waiting: u64,
    /// Export chunks claimed by a worker and not finished.
    pub running: u64,
    /// Since when the oldest waiting job has waited (`None` when none waits).
    pub oldest_waiting_since: Option<DateTime<Utc>>,
}

/// How many operations of one role are in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationCount {
    /// Backup, restore, replay or verify.
    pub role: OperationRole,
    /// The state.
    pub state: OperationState,
    /// How many.
    pub count: u64,
}

/// The store's figures at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// Pools with data jobs waiting or running, by name.
    pub pools: Vec<PoolWorkload>,
    /// Every operation ever recorded, counted by role and state.
    pub operations: Vec<OperationCount>,
}

/// An operation that ended, as taken once for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedOperation {
    /// Operation id.
    pub id: Uuid,
    /// Backup, restore, replay or verify.
    pub role: OperationRole,
    /// How it ended: completed, failed or cancelled.
    pub state: OperationState,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// Rows done (in durable parts for a backup; written, skipped or failed
    /// for a restore; checked for a verify).
    pub rows: u64,
    /// Bytes of JSON lines.
    pub bytes_raw: u64,
    /// Bytes stored (compressed).
    pub bytes_compressed: u64,
}
