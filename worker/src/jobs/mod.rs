//! The jobs a worker runs, and what they share.
//!
//! Each job function takes its message, what it reads from and writes to, and
//! returns an [`Outcome`]: the ack decision is a match, never string parsing.
//! A job reports its own failures as events (`EntityFailed`, `ChunkFailed`,
//! `FinalizeFailed`, `ImportFailed`, `OperationFailed`); `Err` is returned
//! only when it could not report at all (RabbitMQ unreachable), and then the
//! delivery goes back to the queue.
//!
//! Backups: [`plan`], [`export`], [`finalize`]. Restores: [`plan_restore`],
//! [`import`], [`apply`], [`replay`], writing through a [`RestoreStore`]
//! ([`target`]); and [`verify`]. Restore and verify read manifests through
//! `manifest` and parts through [`crate::part_reader`].

pub mod apply;
pub mod discard;
pub mod export;
pub mod finalize;
pub mod import;
mod manifest;
pub mod plan;
pub mod plan_restore;
pub mod replay;
pub mod target;
pub mod verify;

use std::future::Future;
use std::time::Duration;

use koan_protocol::archive::KeyRange;
use koan_protocol::events::{OperationFailed, WorkerEvent};
use koan_protocol::plan::EntitySpec;
use koan_protocol::topology::JOB_DELIVERY_LIMIT;
use koan_source::{ExportRow, Source, SourceError, SourceRowStream};
use tracing::warn;
use uuid::Uuid;

use crate::config::Config;
use crate::error::WorkerError;
use crate::events::Events;

pub use target::{ImportWriter, RestoreStore};

/// What to do with a job's delivery once the job returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The work is durable and reported, or failed for good and reported: acknowledge.
    Ack,
    /// Hand the delivery back to the queue so it runs again (here or elsewhere).
    Requeue,
}

/// The settings jobs read, taken from the worker's [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSettings {
    /// This worker's id (snapshot holder, chunk claims).
    pub worker_id: String,
    /// Cap on a job's `part_bytes`.
    pub part_bytes_max: u64,
    /// How long to wait for the answer to a chunk claim.
    pub claim_timeout: Duration,
    /// How often a running export reports progress (its lease heartbeat).
    pub progress_interval: Duration,
    /// Longest time a snapshot is held for an operation.
    pub snapshot_hold_max: Duration,
    /// How often a held snapshot's connection is checked.
    pub snapshot_check_interval: Duration,
    /// How long an export holds its delivery before it hands the job back at
    /// a part boundary (half of RabbitMQ's consumer timeout).
    pub hand_back_after: Duration,
}

impl JobSettings {
    /// The settings of a worker running with `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            worker_id: config.worker_id.clone(),
            part_bytes_max: config.part_bytes_max,
            claim_timeout: config.claim_timeout(),
            progress_interval: Duration::from_secs(1),
            snapshot_hold_max: config.snapshot_hold_max(),
            snapshot_check_interval: Duration::from_secs(30),
            hand_back_after: config.hand_back_after(),
        }
    }
}

/// Whether a delivery that has been delivered `delivery_count` times before is
/// the last one RabbitMQ makes: a failure now is final even if retryable.
pub fn is_last_delivery(delivery_count: u32) -> bool {
    delivery_count >= JOB_DELIVERY_LIMIT.saturating_sub(1)
}

/// A fresh run id: 12 hex characters, a valid name and a fencing token in part paths.
pub fn new_run_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    random[..12].to_string()
}

/// Why a restore, replay or verify job failed, as it is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Short stable code.
    pub(crate) code: String,
    /// What went wrong, naming the entity, table or part.
    pub(crate) error: String,
    /// Whether running the job again may succeed.
    pub(crate) retryable: bool,
}

impl Failure {
    /// A failure that running again cannot fix.
    pub(crate) fn permanent(code: &str, error: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            error: error.into(),
            retryable: false,
        }
    }

    /// A source error, prefixed with what was being done.
    pub(crate) fn source(context: &str, error: &SourceError) -> Self {
        Self {
            code: error.code().to_string(),
            error: format!("{context}: {error}"),
            retryable: error.is_retryable(),
        }
    }

    /// A worker error (its message names the path or table already).
    pub(crate) fn worker(error: &WorkerError) -> Self {
        Self {
            code: error.code().to_string(),
            error: error.to_string(),
            retryable: error.is_retryable(),
        }
    }
}

/// Settles a failed restore, replay or verify job: a retryable failure goes
/// back to the queue until the last delivery; any other is reported as
/// `OperationFailed` and acked.
pub(crate) async fn fail_operation<E: Events>(
    events: &E,
    operation_id: Uuid,
    job: &'static str,
    failure: Failure,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    let retry = failure.retryable && !is_last_delivery(delivery_count);
    warn!(
        %operation_id,
        job,
        code = %failure.code,
        delivery_count,
        retry,
        error = %failure.error,
        "job failed"
    );
    if retry {
        return Ok(Outcome::Requeue);
    }
    events
        .publish(&WorkerEvent::OperationFailed(OperationFailed {
            operation_id,
            code: failure.code,
            error: failure.error,
        }))
        .await?;
    Ok(Outcome::Ack)
}

/// Where an export reads rows from: PostgreSQL in production, fakes in tests.
pub trait ChunkSource: Send + Sync {
    /// The row stream of one range.
    type Rows: RowCursor;

    /// Rows of `entity` in `range` after `after_key`, in key order, read under
    /// `snapshot_id` when given.
    fn rows(
        &self,
        entity: &EntitySpec,
        range: &KeyRange,
        after_key: Option<&str>,
        snapshot_id: Option<&str>,
    ) -> impl Future<Output = Result<Self::Rows, SourceError>> + Send;
}

/// A stream of rows in key order.
pub trait RowCursor: Send {
    /// The next row; `None` at the end of the range.
    fn next_row(&mut self) -> impl Future<Output = Result<Option<ExportRow>, SourceError>> + Send;
}

impl ChunkSource for Source {
    type Rows = SourceRowStream;

    async fn rows(
        &self,
        entity: &EntitySpec,
        range: &KeyRange,
        after_key: Option<&str>,
        snapshot_id: Option<&str>,
    ) -> Result<SourceRowStream, SourceError> {
        self.export(entity, range, after_key, snapshot_id).await
    }
}

impl RowCursor for SourceRowStream {
    async fn next_row(&mut self) -> Result<Option<ExportRow>, SourceError> {
        self.next().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn last_delivery_and_run_ids() {
        assert!(!is_last_delivery(0));
        assert!(!is_last_delivery(JOB_DELIVERY_LIMIT - 2));
        assert!(is_last_delivery(JOB_DELIVERY_LIMIT - 1));
        let run = new_run_id();
        assert_eq!(run.len(), 12);
        koan_protocol::names::check_name("run", &run).unwrap();
        assert_ne!(run, new_run_id());
    }
}
