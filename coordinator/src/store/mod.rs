//! The state store: every operation, entity, chunk, part and outgoing message
//! the coordinator knows of, behind the backend-neutral [`StateStore`] trait.
//!
//! Backends implement whole, transactional steps (submit a backup, a restore,
//! a verify or a replay, apply one worker report, drain the outbox) and share
//! the decisions in [`rules`], [`restore_rules`] and [`crate::progress`], so
//! every backend behaves alike; one conformance suite (`tests/conformance`)
//! runs against each of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use koan_protocol::commands::{RestoreMode, RowDiagnostic};
use koan_protocol::events::{ChunkClaim, ClaimChunk, WorkerEvent};
use koan_protocol::plan::{BackupPlan, Consistency, EntitySpec};
use koan_protocol::progress::{OperationKind, OperationState, ProgressReport};
use koan_protocol::trace::TraceContext;

use crate::config::Config;
use crate::error::CoordinatorError;

pub mod dead_jobs;
pub mod pg;
pub mod restore_rules;
pub mod rules;
pub mod sqlite;
pub mod workload;

pub use pg::PgStateStore;
pub use sqlite::SqliteStateStore;
pub use workload::{FinishedOperation, OperationCount, PoolWorkload, Workload};

/// Retries of one chunk (failed runs or expired leases) before its operation fails.
pub const DEFAULT_MAX_CHUNK_ATTEMPTS: u32 = koan_protocol::topology::JOB_DELIVERY_LIMIT;

/// What the coordinator decides on behalf of a backend: sizes, leases, pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Target bytes of JSON lines per part, written into export jobs.
    pub part_bytes: u64,
    /// How long a chunk claim lasts without news from its run.
    pub lease: Duration,
    /// Least interval between two progress events of one operation.
    pub progress_interval: Duration,
    /// Failed runs or expired leases of one chunk before the operation fails.
    pub max_chunk_attempts: u32,
}

impl Policy {
    /// The policy a configuration asks for.
    pub fn from_config(config: &Config) -> Self {
        Self {
            part_bytes: config.part_bytes,
            lease: config.lease(),
            progress_interval: Duration::from_millis(config.progress_interval_ms),
            max_chunk_attempts: DEFAULT_MAX_CHUNK_ATTEMPTS,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            part_bytes: crate::config::DEFAULT_PART_BYTES,
            lease: Duration::from_secs(crate::config::DEFAULT_LEASE_SECONDS),
            progress_interval: Duration::from_millis(crate::config::DEFAULT_PROGRESS_INTERVAL_MS),
            max_chunk_attempts: DEFAULT_MAX_CHUNK_ATTEMPTS,
        }
    }
}

/// A backup to record: the plan is validated (and checked against the source) already.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBackup {
    /// Operation id (the client's, or a fresh UUIDv7); also the backup id.
    pub operation_id: Uuid,
    /// The AMQP `message_id` of the command, so a redelivered command finds its operation.
    pub command_id: Option<String>,
    /// The plan as run.
    pub plan: BackupPlan,
    /// Labels given at submission.
    pub labels: BTreeMap<String, String>,
    /// Description given at submission (or the plan's).
    pub description: Option<String>,
    /// Trace context of the span that accepted the command: every job and
    /// event of the operation is published with it.
    pub trace: Option<TraceContext>,
}

/// A completed backup, as recorded when it ran: what restores and verifies read.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupSource {
    /// The backup operation.
    pub operation_id: Uuid,
    /// The backup id (the archive written).
    pub backup_id: Uuid,
    /// Where the backup operation stands (only `completed` backups can be read).
    pub state: OperationState,
    /// The plan as run.
    pub plan: BackupPlan,
    /// Manifest path, once written.
    pub manifest: Option<String>,
    /// The entities as backed up (key types resolved), in plan order.
    pub entities: Vec<EntitySpec>,
}

impl BackupSource {
    /// Whether the backup is complete: its manifest is written.
    pub fn is_complete(&self) -> bool {
        self.state == OperationState::Completed && self.manifest.is_some()
    }

    /// The pool of the backup's first entity (where operation-wide jobs go).
    pub fn first_pool(&self) -> &str {
        self.entities
            .first()
            .map_or(koan_protocol::plan::DEFAULT_POOL, |entity| {
                entity.pool.as_str()
            })
    }
}

/// A restore to record: the backup is complete and the request checked already.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRestore {
    /// Operation id (the client's, or a fresh UUIDv7).
    pub operation_id: Uuid,
    /// The AMQP `message_id` of the command.
    pub command_id: Option<String>,
    /// The backup restored.
    pub backup: BackupSource,
    /// Reconciliation mode.
    pub mode: RestoreMode,
    /// The entity filter as given (empty: every entity), passed to the planning worker.
    pub filter: Vec<String>,
    /// The entities restored, in plan order (specs as backed up).
    pub entities: Vec<EntitySpec>,
    /// Scope to re-stamp rows with.
    pub target_scope: Option<String>,
    /// Pool every job of the restore goes to, instead of each entity's.
    pub pool: Option<String>,
    /// Labels given at submission.
    pub labels: BTreeMap<String, String>,
    /// Description given at submission.
    pub description: Option<String>,
    /// Trace context of the span that accepted the command: every job and
    /// event of the operation is published with it.
    pub trace: Option<TraceContext>,
}

/// A verify to record: the backup is complete.
#[derive(Debug, Clone, PartialEq)]
pub struct NewVerify {
    /// Operation id (the client's, or a fresh UUIDv7).
    pub operation_id: Uuid,
    /// The AMQP `message_id` of the command.
    pub command_id: Option<String>,
    /// The backup verified.
    pub backup: BackupSource,
    /// Trace context of the span that accepted the command: every job and
    /// event of the operation is published with it.
    pub trace: Option<TraceContext>,
}

/// A replay of a restore's unresolved diagnostics to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReplay {
    /// Operation id of the replay (the client's, or a fresh UUIDv7).
    pub operation_id: Uuid,
    /// The AMQP `message_id` of the command.
    pub command_id: Option<String>,
    /// The restore whose diagnostics are replayed.
    pub restore_id: Uuid,
    /// Trace context of the span that accepted the command: every job and
    /// event of the operation is published with it.
    pub trace: Option<TraceContext>,
}

/// The outcome of a replay submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplaySubmission {
    /// Recorded (or found, when it existed already).
    Submitted(Submitted),
    /// Refused: a stable code and a message naming the restore.
    Refused {
        /// `unknown_operation`, `not_a_restore`, `restore_running` or `nothing_to_replay`.
        code: &'static str,
        /// What is wrong.
        error: String,
    },
}

/// The outcome of a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    /// The operation.
    pub operation_id: Uuid,
    /// True when the operation already existed and nothing was created.
    pub existing: bool,
}

/// The outcome of `pause`, `resume` or `cancel`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Done; `existing` when the operation was in the asked state already.
    Done {
        /// True when nothing changed (a repeated command).
        existing: bool,
    },
    /// Refused: a stable code and a message naming the operation.
    Refused {
        /// `unknown_operation`, `not_running`, `not_paused`, `not_a_backup` or `finalizing`.
        code: &'static str,
        /// What is wrong.
        error: String,
    },
}

impl Lifecycle {
    /// A refusal.
    pub fn refused(code: &'static str, error: impl Into<String>) -> Self {
        Self::Refused {
            code,
            error: error.into(),
        }
    }
}

/// What applying a worker report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The state moved forward (messages may have been queued in the outbox).
    Changed,
    /// Nothing changed, and why (duplicate, stale run, finished operation...).
    Unchanged(&'static str),
}

/// What one report of a batch ([`StateStore::apply_batch`]) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// A report, as [`StateStore::apply`] would have applied it.
    Applied(Applied),
    /// A `claim_chunk` request, decided as [`StateStore::claim_chunk`] would.
    Claim(ChunkClaim),
}

/// One message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Position in the outbox (publication order).
    pub id: i64,
    /// Stable message id: a re-publication after a crash carries the same one.
    pub message_id: Uuid,
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Message kind (AMQP `type`).
    pub kind: String,
    /// Envelope bytes.
    pub payload: Vec<u8>,
    /// The trace context of its operation, published as `traceparent` and
    /// `tracestate` headers (none when the operation's command had none).
    pub trace: Option<TraceContext>,
}

/// Where the outbox drainer hands messages (RabbitMQ in production).
pub trait OutboxSink: Send + Sync {
    /// Publishes one message; returns once the broker confirmed it.
    fn publish(
        &self,
        message: &OutboxMessage,
    ) -> impl Future<Output = Result<(), CoordinatorError>> + Send;

    /// Publishes `messages` in order; returns how many, from the first, the
    /// broker confirmed, and the error that stopped the rest. A sink that
    /// can awaits the confirms together; by default one at a time.
    fn publish_batch(
        &self,
        messages: &[OutboxMessage],
    ) -> impl Future<Output = (usize, Result<(), CoordinatorError>)> + Send {
        async move {
            for (published, message) in messages.iter().enumerate() {
                if let Err(error) = self.publish(message).await {
                    return (published, Err(error));
                }
            }
            (messages.len(), Ok(()))
        }
    }
}

/// What one drain pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Messages published and removed.
    pub published: usize,
    /// True when another coordinator held the outbox lock (nothing was read).
    pub busy: bool,
}

/// Where an entity stands within its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityState {
    /// Waiting for its `entity_planned` report.
    Planning,
    /// Chunks are being exported.
    Running,
    /// Every chunk is done.
    Done,
}

impl EntityState {
    /// Stored and reported name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planning => "planning",
            Self::Running => "running",
            Self::Done => "done",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Planning, Self::Running, Self::Done]
            .into_iter()
            .find(|state| state.as_str() == name)
    }
}

/// What an operation does, as stored: a replay is reported as a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationRole {
    /// Writes a backup.
    Backup,
    /// Restores a backup.
    Restore,
    /// Writes again the failed rows of a restore.
    Replay,
    /// Checks a backup against its manifest.
    Verify,
}

impl OperationRole {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Backup => "backup",
            Self::Restore => "restore",
            Self::Replay => "replay",
            Self::Verify => "verify",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Backup, Self::Restore, Self::Replay, Self::Verify]
            .into_iter()
            .find(|role| role.as_str() == name)
    }

    /// The kind clients see.
    pub fn kind(self) -> OperationKind {
        match self {
            Self::Backup => OperationKind::Backup,
            Self::Restore | Self::Replay => OperationKind::Restore,
            Self::Verify => OperationKind::Verify,
        }
    }
}

/// An operation's stored figures, as every backend returns them.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    /// Operation id.
    pub id: Uuid,
    /// Backup, restore, replay or verify.
    pub role: OperationRole,
    /// Current state.
    pub state: OperationState,
    /// Plan id (of the backup read, for restores and verifies).
    pub plan_id: String,
    /// Backup written (or read).
    pub backup_id: Option<Uuid>,
    /// Consistency mode of the plan.
    pub consistency: Consistency,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Description.
    pub description: Option<String>,
    /// Stored (monotonic) percent.
    pub percent: f64,
    /// Entities in the plan.
    pub entities_total: u64,
    /// Entities planned so far.
    pub entities_planned: u64,
    /// Rows counted by the planned entities.
    pub rows_total: u64,
    /// Rows in durable parts.
    pub rows_durable: u64,
    /// Rows streamed by live runs, not yet durable.
    pub rows_pending: u64,
    /// Bytes of JSON lines in durable parts.
    pub bytes_raw: u64,
    /// Bytes of JSON lines streamed, not yet durable.
    pub bytes_raw_pending: u64,
    /// Bytes stored.
    pub bytes_compressed: u64,
    /// Durable parts.
    pub parts_done: u64,
    /// Chunks planned.
    pub chunks_total: u64,
    /// Chunks done.
    pub chunks_done: u64,
    /// Manifest path, once written.
    pub manifest: Option<String>,
    /// Why the operation failed.
    pub error: Option<String>,
    /// Change counter.
    pub sequence: u64,
    /// When accepted.
    pub created_at: DateTime<Utc>,
    /// When last changed.
    pub updated_at: DateTime<Utc>,
    /// When the first entity was planned (chunks began to run).
    pub running_since: Option<DateTime<Utc>>,
    /// Restores and replays: the reconciliation mode.
    pub mode: Option<RestoreMode>,
    /// Restores and verifies: the backup operation read; replays: the restore replayed.
    pub source_operation: Option<Uuid>,
    /// Restores: the scope rows are re-stamped with.
    pub target_scope: Option<String>,
    /// Restores: the pool every job goes to, instead of each entity's.
    pub pool: Option<String>,
    /// Restores: rows inserted or updated.
    pub rows_written: u64,
    /// Restores: rows left as they were.
    pub rows_skipped: u64,
    /// Restores: rows recorded as diagnostics (replays: rows failing again).
    pub rows_failed: u64,
    /// Verifies: each bad or missing part.
    pub problems: Vec<String>,
}

impl OperationRecord {
    /// The kind clients see.
    pub fn kind(&self) -> OperationKind {
        self.role.kind()
    }
}

/// An entity's stored figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRecord {
    /// Entity name.
    pub name: String,
    /// Position in the plan.
    pub ordinal: u32,
    /// Where it stands.
    pub state: EntityState,
    /// Rows counted when planned.
    pub rows_total: u64,
    /// Rows in durable parts.
    pub rows_durable: u64,
    /// Rows streamed, not yet durable.
    pub rows_pending: u64,
    /// Bytes of JSON lines in durable parts.
    pub bytes_raw: u64,
    /// Bytes of JSON lines streamed, not yet durable.
    pub bytes_raw_pending: u64,
    /// Bytes stored.
    pub bytes_compressed: u64,
    /// Chunks planned.
    pub chunks_total: u64,
    /// Chunks done.
    pub chunks_done: u64,
}

/// The coordinator's durable state. Every method is one transaction.
///
/// Implementations apply worker reports idempotently (a duplicate changes
/// nothing), fence chunk reports by the owning run, keep counters
/// incrementally, and queue every job and public event in the outbox in the
/// same transaction as the change that caused it.
pub trait StateStore: Send + Sync + 'static {
    /// The deployment's secret for continuation tokens (created once, shared by every instance).
    fn token_secret(&self) -> &[u8; 32];

    /// The operation a submission already created: by its id, or by the command's message id.
    fn find_submission(
        &self,
        operation_id: Option<Uuid>,
        command_id: Option<&str>,
    ) -> impl Future<Output = Result<Option<Uuid>, CoordinatorError>> + Send;

    /// Records a backup (state `planning`), its entities, one `plan_entity`
    /// job per entity and a progress event; nothing when it exists already.
    fn submit_backup(
        &self,
        backup: &NewBackup,
    ) -> impl Future<Output = Result<Submitted, CoordinatorError>> + Send;

    /// The progress report of one operation.
    fn report(
        &self,
        operation_id: Uuid,
    ) -> impl Future<Output = Result<Option<ProgressReport>, CoordinatorError>> + Send;

    /// Reports of the newest `limit` operations, newest first.
    fn list_reports(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<ProgressReport>, CoordinatorError>> + Send;

    /// The stored figures of one operation.
    fn operation(
        &self,
        operation_id: Uuid,
    ) -> impl Future<Output = Result<Option<OperationRecord>, CoordinatorError>> + Send;

    /// The backup operation that wrote `backup_id`, whatever its state.
    fn backup_source(
        &self,
        backup_id: Uuid,
    ) -> impl Future<Output = Result<Option<BackupSource>, CoordinatorError>> + Send;

    /// Records a restore (state `planning`), its entities, its `plan_restore`
    /// job and a progress event; nothing when it exists already.
    fn submit_restore(
        &self,
        restore: &NewRestore,
    ) -> impl Future<Output = Result<Submitted, CoordinatorError>> + Send;

    /// Records a verify (state `planning`), its `verify_backup` job and a
    /// progress event; nothing when it exists already.
    fn submit_verify(
        &self,
        verify: &NewVerify,
    ) -> impl Future<Output = Result<Submitted, CoordinatorError>> + Send;

    /// Records a replay of the restore's unresolved diagnostics (state
    /// `running`), its `replay_rows` jobs in batches and a progress event;
    /// refused when the restore is unknown, not a restore, still running or
    /// has nothing unresolved; nothing when the replay exists already.
    fn submit_replay(
        &self,
        replay: &NewReplay,
    ) -> impl Future<Output = Result<ReplaySubmission, CoordinatorError>> + Send;

    /// The diagnostics of a restore in id order (unresolved only unless
    /// `include_resolved`), at most `limit` of them.
    fn diagnostics(
        &self,
        restore_id: Uuid,
        include_resolved: bool,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<RowDiagnostic>, CoordinatorError>> + Send;

    /// Applies one worker report (every kind but `claim_chunk`).
    fn apply(
        &self,
        event: &WorkerEvent,
    ) -> impl Future<Output = Result<Applied, CoordinatorError>> + Send;

    /// Applies worker reports and chunk claims (`claim_chunk` events) in
    /// order, in **one** transaction (one commit for all of them), each with
    /// exactly the effects [`StateStore::apply`] or
    /// [`StateStore::claim_chunk`] would have on its own: each runs inside a
    /// savepoint, so one that changes nothing or is invalid is rolled back
    /// alone. The outcome of each is returned in order; an invalid report's
    /// error (not retryable) is its own and the others still commit.
    ///
    /// An error that may pass (connection lost, deadlock, serialization
    /// failure) fails the whole batch and nothing is committed: apply the
    /// reports again (one at a time, or as a batch).
    fn apply_batch(
        &self,
        events: &[WorkerEvent],
    ) -> impl Future<Output = Result<Vec<Result<BatchOutcome, CoordinatorError>>, CoordinatorError>> + Send;

    /// A job dead-lettered after its delivery limit, with why: the unit it
    /// stood for fails and so does its operation (see [`dead_jobs`]). An
    /// export chunk fails only while it is still at the job's attempt and not
    /// finished; a stale job changes nothing.
    fn fail_dead_job(
        &self,
        job: &koan_protocol::jobs::Job,
        reason: &str,
    ) -> impl Future<Output = Result<Applied, CoordinatorError>> + Send;

    /// Decides a chunk claim; a granted claim makes the run the chunk's owner.
    fn claim_chunk(
        &self,
        claim: &ClaimChunk,
    ) -> impl Future<Output = Result<ChunkClaim, CoordinatorError>> + Send;

    /// Pauses a backup that is planning or running: no claim is granted until
    /// it is resumed, and its `paused` event (with the continuation token) is
    /// queued. Pausing a paused backup changes nothing (`existing`).
    fn pause(
        &self,
        operation_id: Uuid,
    ) -> impl Future<Output = Result<Lifecycle, CoordinatorError>> + Send;

    /// Resumes a paused backup: state `running` (or `planning`), every chunk
    /// not done re-published with the next attempt (claims continue after the
    /// last durable part). Under `snapshot` consistency the re-published
    /// chunks read at a new snapshot and a note is kept for the manifest.
    /// Resuming a running backup changes nothing (`existing`).
    fn resume(
        &self,
        operation_id: Uuid,
    ) -> impl Future<Output = Result<Lifecycle, CoordinatorError>> + Send;

    /// Cancels an operation that has not ended: state `cancelled` (claims
    /// refused, later reports ignored), its `cancelled` event, and for a
    /// backup a `discard_backup` job removing what it wrote. Cancelling a
    /// cancelled operation changes nothing (`existing`).
    fn cancel(
        &self,
        operation_id: Uuid,
    ) -> impl Future<Output = Result<Lifecycle, CoordinatorError>> + Send;

    /// Re-publishes chunks whose lease expired before `now` with the next attempt.
    fn reap_expired_leases(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, CoordinatorError>> + Send;

    /// Queues the progress event of operations whose last change was not yet
    /// announced (held back by the progress interval).
    fn flush_progress(
        &self,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, CoordinatorError>> + Send;

    /// Publishes up to `batch` outbox messages in order through `sink` and
    /// removes them, unless another coordinator is draining.
    fn drain_outbox<K: OutboxSink>(
        &self,
        sink: &K,
        batch: usize,
    ) -> impl Future<Output = Result<Drained, CoordinatorError>> + Send;

    /// The data jobs waiting and running per pool (of operations planning or
    /// running) and every operation counted by role and state; read-only,
    /// for the metrics ([`workload`] says why from the store).
    fn workload(&self) -> impl Future<Output = Result<Workload, CoordinatorError>> + Send;

    /// Up to `limit` operations that ended and were not taken yet, oldest
    /// end first, marking them taken: each ended operation is returned once
    /// per deployment, whichever coordinator asks (for the metrics recorded
    /// when an operation ends).
    fn take_finished(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<FinishedOperation>, CoordinatorError>> + Send;
}
