//! The PostgreSQL state store, over a deadpool-postgres pool.
//!
//! Tables live in one schema (default `koan`), created by the migrations in
//! `migrations/*.sql`, applied at connect under a transaction-scoped advisory
//! lock so coordinators starting together migrate once. Every worker report
//! is applied in one transaction that first locks its operation's row, so
//! reports of one operation apply one at a time, whichever coordinator
//! receives them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tracing::{info, warn};
use uuid::Uuid;

use koan_protocol::events::{ChunkClaim, ClaimChunk, WorkerEvent};
use koan_protocol::jobs::Job;
use koan_protocol::names::quote_ident;
use koan_protocol::progress::ProgressReport;

use crate::config::{Config, redact_postgres_url};
use crate::error::CoordinatorError;
use koan_protocol::commands::RowDiagnostic;

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
mod operations;
mod outbox;
mod replays;
mod restores;
mod submit;
mod workload;

use db::get;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "restore",
        sql: include_str!("migrations/0002_restore.sql"),
    },
    Migration {
        version: 3,
        name: "lifecycle",
        sql: include_str!("migrations/0003_lifecycle.sql"),
    },
    Migration {
        version: 4,
        name: "trace_context",
        sql: include_str!("migrations/0004_trace_context.sql"),
    },
    Migration {
        version: 5,
        name: "metrics",
        sql: include_str!("migrations/0005_metrics.sql"),
    },
];

/// The coordinator's state in PostgreSQL.
pub struct PgStateStore {
    pool: Pool,
    schema: String,
    quoted_schema: String,
    secret: [u8; 32],
    policy: Policy,
}

impl std::fmt::Debug for PgStateStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PgStateStore")
            .field("schema", &self.schema)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl PgStateStore {
    /// Connects with the configuration's URL, schema, pool size and policy, and migrates.
    pub async fn from_config(config: &Config) -> Result<Self, CoordinatorError> {
        Self::connect(
            &config.database_url,
            &config.schema,
            config.db_pool_size,
            Policy::from_config(config),
        )
        .await
    }

    /// Connects to `database_url`, applies pending migrations to `schema` and
    /// loads the token secret.
    pub async fn connect(
        database_url: &str,
        schema: &str,
        pool_size: usize,
        policy: Policy,
    ) -> Result<Self, CoordinatorError> {
        koan_protocol::names::check_ident("schema", schema)
            .map_err(|error| CoordinatorError::config("schema", error.to_string()))?;
        let pg_config: tokio_postgres::Config = database_url.parse().map_err(|error| {
            CoordinatorError::config("database_url", format!("not a PostgreSQL URL: {error}"))
        })?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|error| CoordinatorError::config("database_url", error.to_string()))?;
        let mut client = pool
            .get()
            .await
            .map_err(|error| CoordinatorError::StoreUnreachable {
                what: format!("postgresql at {}", redact_postgres_url(database_url)),
                source: Box::new(error),
            })?;
        let quoted_schema = quote_ident(schema);
        let secret = migrate(&mut client, schema, &quoted_schema).await?;
        Ok(Self {
            pool,
            schema: schema.to_string(),
            quoted_schema,
            secret,
            policy,
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The policy the store applies.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn quoted_schema(&self) -> &str {
        &self.quoted_schema
    }

    async fn client(&self) -> Result<Object, CoordinatorError> {
        self.pool
            .get()
            .await
            .map_err(|error| CoordinatorError::Store {
                operation: "connect",
                retryable: true,
                source: Box::new(error),
            })
    }

    /// Closes the pool: connections are dropped as they are returned.
    pub fn close(&self) {
        self.pool.close();
    }
}

/// Applies pending migrations and returns the token secret, creating it once.
async fn migrate(
    client: &mut Object,
    schema: &str,
    quoted_schema: &str,
) -> Result<[u8; 32], CoordinatorError> {
    let tx = client
        .transaction()
        .await
        .map_err(db::db_error("begin migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(('x' || left(md5($1), 16))::bit(64)::bigint)",
        &[&format!("koan-coordinator migrate {schema}")],
    )
    .await
    .map_err(db::db_error("migration lock"))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted_schema};
         CREATE TABLE IF NOT EXISTS {quoted_schema}.schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(db::db_error("create schema"))?;
    let rows = tx
        .query(
            &format!("SELECT version FROM {quoted_schema}.schema_migrations"),
            &[],
        )
        .await
        .map_err(db::db_error("read migrations"))?;
    let mut applied = Vec::with_capacity(rows.len());
    for row in &rows {
        applied.push(get::<i32>(row, 0)?);
    }
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        tx.batch_execute(&migration.sql.replace("{schema}", quoted_schema))
            .await
            .map_err(db::db_error("apply migration"))?;
        tx.execute(
            &format!(
                "INSERT INTO {quoted_schema}.schema_migrations (version, name) VALUES ($1, $2)"
            ),
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(db::db_error("record migration"))?;
        info!(
            schema,
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
    }
    let known = MIGRATIONS.iter().map(|migration| migration.version).max();
    if let Some(newest) = applied.iter().max()
        && Some(*newest) > known
    {
        warn!(
            schema,
            version = newest,
            "state store was migrated by a newer coordinator"
        );
    }
    let fresh: [u8; 32] = rand::random();
    tx.execute(
        &format!(
            "INSERT INTO {quoted_schema}.settings (name, value) VALUES ('token_secret', $1)
             ON CONFLICT (name) DO NOTHING"
        ),
        &[&fresh.as_slice()],
    )
    .await
    .map_err(db::db_error("create token secret"))?;
    let row = tx
        .query_one(
            &format!("SELECT value FROM {quoted_schema}.settings WHERE name = 'token_secret'"),
            &[],
        )
        .await
        .map_err(db::db_error("read token secret"))?;
    let stored: Vec<u8> = get(&row, 0)?;
    let secret: [u8; 32] = stored
        .try_into()
        .map_err(|_| CoordinatorError::corrupt("token_secret", "not 32 bytes"))?;
    tx.commit()
        .await
        .map_err(db::db_error("commit migration"))?;
    Ok(secret)
}

impl StateStore for PgStateStore {
    fn token_secret(&self) -> &[u8; 32] {
        &self.secret
    }

    async fn find_submission(
        &self,
        operation_id: Option<Uuid>,
        command_id: Option<&str>,
    ) -> Result<Option<Uuid>, CoordinatorError> {
        submit::find_submission(self, operation_id, command_id).await
    }

    async fn submit_backup(&self, backup: &NewBackup) -> Result<Submitted, CoordinatorError> {
        submit::submit_backup(self, backup).await
    }

    async fn report(&self, operation_id: Uuid) -> Result<Option<ProgressReport>, CoordinatorError> {
        submit::report(self, operation_id).await
    }

    async fn list_reports(&self, limit: u32) -> Result<Vec<ProgressReport>, CoordinatorError> {
        submit::list_reports(self, limit).await
    }

    async fn operation(
        &self,
        operation_id: Uuid,
    ) -> Result<Option<OperationRecord>, CoordinatorError> {
        submit::operation(self, operation_id).await
    }

    async fn backup_source(
        &self,
        backup_id: Uuid,
    ) -> Result<Option<BackupSource>, CoordinatorError> {
        restores::backup_source(self, backup_id).await
    }

    async fn submit_restore(&self, restore: &NewRestore) -> Result<Submitted, CoordinatorError> {
        restores::submit_restore(self, restore).await
    }

    async fn submit_verify(&self, verify: &NewVerify) -> Result<Submitted, CoordinatorError> {
        restores::submit_verify(self, verify).await
    }

    async fn submit_replay(
        &self,
        replay: &NewReplay,
    ) -> Result<ReplaySubmission, CoordinatorError> {
        replays::submit_replay(self, replay).await
    }

    async fn diagnostics(
        &self,
        restore_id: Uuid,
        include_resolved: bool,
        limit: u32,
    ) -> Result<Vec<RowDiagnostic>, CoordinatorError> {
        diagnostics::list(self, restore_id, include_resolved, limit).await
    }

    async fn apply(&self, event: &WorkerEvent) -> Result<Applied, CoordinatorError> {
        apply::apply(self, event).await
    }

    async fn apply_batch(
        &self,
        events: &[WorkerEvent],
    ) -> Result<Vec<Result<BatchOutcome, CoordinatorError>>, CoordinatorError> {
        batch::apply_batch(self, events).await
    }

    async fn fail_dead_job(&self, job: &Job, reason: &str) -> Result<Applied, CoordinatorError> {
        dead_jobs::fail_dead_job(self, job, reason).await
    }

    async fn claim_chunk(&self, claim: &ClaimChunk) -> Result<ChunkClaim, CoordinatorError> {
        claims::claim(self, claim).await
    }

    async fn pause(&self, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
        lifecycle::pause(self, operation_id).await
    }

    async fn resume(&self, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
        lifecycle::resume(self, operation_id).await
    }

    async fn cancel(&self, operation_id: Uuid) -> Result<Lifecycle, CoordinatorError> {
        lifecycle::cancel(self, operation_id).await
    }

    async fn reap_expired_leases(&self, now: DateTime<Utc>) -> Result<u64, CoordinatorError> {
        claims::reap_expired_leases(self, now).await
    }

    async fn flush_progress(&self, now: DateTime<Utc>) -> Result<u64, CoordinatorError> {
        outbox::flush_progress(self, now).await
    }

    async fn drain_outbox<K: OutboxSink>(
        &self,
        sink: &K,
        batch: usize,
    ) -> Result<Drained, CoordinatorError> {
        outbox::drain(self, sink, batch).await
    }

    async fn workload(&self) -> Result<crate::store::Workload, CoordinatorError> {
        workload::workload(self).await
    }

    async fn take_finished(
        &self,
        limit: u32,
    ) -> Result<Vec<crate::store::FinishedOperation>, CoordinatorError> {
        workload::take_finished(self, limit).await
    }
}
