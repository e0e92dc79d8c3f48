//! The SQLite state store, for the embedded single-node mode: one process
//! owns the file.
//!
//! One connection behind a mutex serialises every transaction; each runs on
//! tokio's blocking pool. Write transactions begin `IMMEDIATE`, so a report
//! reads and changes a state nobody else touches meanwhile (what the
//! PostgreSQL store gets from locking the operation's row). The file is in
//! WAL mode with full sync and a busy timeout; tables are created by the
//! migrations in `migrations/*.sql`. Semantics are the PostgreSQL store's:
//! the same idempotency, fencing by owning run, outbox in the same
//! transaction, and the shared rules of [`crate::store::rules`],
//! [`crate::store::restore_rules`] and [`crate::progress`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use koan_protocol::commands::RowDiagnostic;
use koan_protocol::events::{ChunkClaim, ClaimChunk, WorkerEvent};
use koan_protocol::jobs::Job;
use koan_protocol::progress::ProgressReport;

use crate::error::CoordinatorError;
use crate::store::{
    Applied, BackupSource, BatchOutcome, Drained, Lifecycle, NewBackup, NewReplay, NewRestore,
    NewVerify, OperationRecord, OutboxSink, Policy, ReplaySubmission, StateStore, Submitted,
};

mod apply;
mod batch;
mod chunks;
mod claims;
mod db;
mod dead_jobs;
mod diagnostics;
mod finalize;
mod imports;
mod lifecycle;
mod migrate;
mod operations;
mod outbox;
mod replays;
mod restores;
mod submit;
mod workload;

use db::{Db, Shared};

/// The coordinator's state in one SQLite file (or in memory, for tests).
pub struct SqliteStateStore {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    drain_key: String,
}

impl std::fmt::Debug for SqliteStateStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SqliteStateStore")
            .field("path", &self.path)
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl SqliteStateStore {
    /// Opens the database at `path` (creating the file if needed), applies
    /// pending migrations and loads the token secret (created once, on the
    /// first open, and kept in the file). Blocks while it migrates.
    pub fn open(path: &Path, policy: Policy) -> Result<Self, CoordinatorError> {
        let store = Self::build(Some(path), policy)?;
        // Two stores on one file in this process share its drain turn.
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(Self {
            drain_key: format!("file:{}", key.display()),
            ..store
        })
    }

    /// A fresh database in memory, private to this store (for tests).
    pub fn in_memory(policy: Policy) -> Result<Self, CoordinatorError> {
        Self::build(None, policy)
    }

    fn build(path: Option<&Path>, policy: Policy) -> Result<Self, CoordinatorError> {
        let mut conn = migrate::open(path)?;
        let secret = migrate::migrate(&mut conn)?;
        Ok(Self {
            shared: Arc::new(Shared::new(conn, policy, secret)),
            path: path.map(Path::to_path_buf),
            drain_key: format!("memory:{}", Uuid::new_v4()),
        })
    }

    /// The database file (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The policy the store applies.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    fn drain_key(&self) -> &str {
        &self.drain_key
    }

    /// Runs `work` in one `IMMEDIATE` transaction on the blocking pool and commits it.
    async fn write<T, F>(&self, work: F) -> Result<T, CoordinatorError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, CoordinatorError> + Send + 'static,
    {
        self.run(true, work).await
    }

    /// Runs `work` in one read transaction (one snapshot) on the blocking pool.
    async fn read<T, F>(&self, work: F) -> Result<T, CoordinatorError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, CoordinatorError> + Send + 'static,
    {
        self.run(false, work).await
    }

    async fn run<T, F>(&self, write: bool, work: F) -> Result<T, CoordinatorError>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T, CoordinatorError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.transaction(write, work))
            .await
            .map_err(|error| CoordinatorError::Store {
                operation: "run sqlite transaction",
                retryable: false,
                source: Box::new(error),
            })?
    }
}

impl StateStore for SqliteStateStore {
    fn token_secret(&self) -> &[u8; 32] {
        &self.shared.secret
    }

    async fn find_submission(
        &self,
        operation_id: Option<Uuid>,
        command_id: Option<&str>,
    ) -> Result<Option<Uuid>, CoordinatorError> {
        let command_id = command_id.map(str::to_string);
        self.read(move |db| submit::find_submission(db, operation_id, command_id.as_deref()))
            .await
    }

    async fn submit_backup(&self, backup: &NewBackup) -> Result<Submitted, CoordinatorError> {
        let backup = backup.clone();
        self.write(move |db| submit::submit_backup(db, &backup))
            .await
    }

    async fn report(&self, operation_id: Uuid) -> Result<Option<ProgressReport>, CoordinatorError> {
        self.read(move |db| submit::report(db, operation_id)).await
    }

    async fn list_reports(&self, limit: u32) -> Result<Vec<ProgressReport>, CoordinatorError> {
        self.read(move |db| submit::list_reports(db, limit)).await
    }

    async fn operation(
        &self,
        operation_id: Uuid,
    ) -> Result<Option<OperationRecord>, CoordinatorError> {
        self.read(move |db| submit::operation(db, operation_id))
            .await
    }

    async fn backup_source(
        &self,
        backup_id: Uuid,
    ) -> Result<Option<BackupSource>, CoordinatorError> {
        self.read(move |db| restores::backup_source(db, backup_id))
            .await
    }

    async fn submit_restore(&self, restore: &NewRestore) -> Result<Submitted, CoordinatorError> {
        let restore = restore.clone();
        self.write(move |db| restores::submit_restore(db, &restore))
            .await
    }

    async fn submit_verify(&self, verify: &NewVerify) -> Result<Submitted, CoordinatorError> {
        let verify = verify.clone();
        self.write(move |db| restores::submit_verify(db, &verify))
            .await
    }

    async fn submit_replay(
        &self,
        replay: &NewReplay,
    ) -> Result<ReplaySubmission, CoordinatorError> {
        let replay = replay.clone();
        self.write(move |db| replays::submit_replay(db, &replay))
            .await
    }

    async fn diagnostics(
        &self,
        restore_id: Uuid,
        include_resolved: bool,
        limit: u32,
    ) -> Result<Vec<RowDiagnostic>, CoordinatorError> {
        self.read(move |db| diagnostics::list(db, restore_id, include_resolved, limit))
            .await
    }

    async fn apply(&self, event: &WorkerEvent) -> Result<Applied, CoordinatorError> {
        let event = event.clone();
        self.write(move |db| apply::apply(db, &event)).await
    }

    async fn apply_batch(
        &self,
        events: &[WorkerEvent],
    ) -> Result<Vec<Result<BatchOutcome, CoordinatorError>>, CoordinatorError> {
        let events = events.to_vec();
        self.write(move |db| batch::apply_batch(db, &events)).await
    }

    async fn fail_dead_job(&self, job: &Job, reason: &str) -> Result<Applied, CoordinatorError> {
        let (job, reason) = (job.clone(), reason.to_string());
        self.write(move |db| dead_jobs::fail_dead_job(db, &job, &reason))
            .await
    }

    async fn claim_chunk(&self, claim: &ClaimChunk) -> Result<ChunkClaim, CoordinatorError> {
        let claim = claim.clone();
        self.write(move |db| claims::claim(db, &claim)).await
    }

    async fn pause(&self, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
        self.write(move |db| lifecycle::pause(db, operation_id))
            .await
    }

    async fn resume(&self, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
        self.write(move |db| lifecycle::resume(db, operation_id))
            .await
    }

    async fn cancel(&self, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
        self.write(move |db| lifecycle::cancel(db, operation_id))
            .await
    }

    async fn reap_expired_leases(&self, now: DateTime<Utc>) -> Result<u64, CoordinatorError> {
        let operation_ids = self
            .read(move |db| claims::expired_operations(db, now))
            .await?;
        let mut republished = 0;
        for operation_id in operation_ids {
            republished += self
                .write(move |db| claims::reap_operation(db, operation_id, now))
                .await?;
        }
        Ok(republished)
    }

    async fn flush_progress(&self, now: DateTime<Utc>) -> Result<u64, CoordinatorError> {
        self.write(move |db| outbox::flush_progress(db, now)).await
    }

    async fn drain_outbox<K: OutboxSink>(
        &self,
        sink: &K,
        batch: usize,
    ) -> Result<Drained, CoordinatorError> {
        outbox::drain(self, sink, batch).await
    }

    async fn workload(&self) -> Result<crate::store::Workload, CoordinatorError> {
        self.read(workload::workload).await
    }

    async fn take_finished(
        &self,
        limit: u32,
    ) -> Result<Vec<crate::store::FinishedOperation>, CoordinatorError> {
        self.write(move |db| workload::take_finished(db, limit))
            .await
    }
}
