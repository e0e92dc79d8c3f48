//! Holding an exported snapshot open so every chunk of a backup reads the same data.
//!
//! The holder owns a dedicated connection (outside the pool, so it never
//! competes with exports for a pooled slot) inside a `REPEATABLE READ READ
//! ONLY` transaction that called `pg_export_snapshot()`. The snapshot stays
//! importable (`SET TRANSACTION SNAPSHOT`) exactly as long as that transaction
//! is open; `idle_in_transaction_session_timeout` is switched off for the
//! session so the server does not end it while exports run.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use koan_protocol::plan::EntitySpec;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{SourceError, describe};
use crate::postgres::ranges::plan_on;
use crate::postgres::session::{SESSION_SETUP, connect_error};
use crate::ranges::RangePlan;

/// How long a liveness probe may take before the holder counts as dead.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive idle time of the holding connection, so a dead peer is noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// A transaction holding an exported snapshot open.
pub struct SnapshotHolder {
    client: Client,
    connection: JoinHandle<()>,
    snapshot_id: String,
    taken_at: DateTime<Utc>,
    target: String,
    /// Serialises planning, which runs inside a savepoint on the shared transaction.
    planning: Mutex<()>,
}

impl fmt::Debug for SnapshotHolder {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SnapshotHolder")
            .field("snapshot_id", &self.snapshot_id)
            .field("taken_at", &self.taken_at)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl SnapshotHolder {
    /// Connects, begins the transaction and exports its snapshot.
    pub(crate) async fn open(config: &Config, target: &str) -> Result<Self, SourceError> {
        let mut config = config.clone();
        config.keepalives(true).keepalives_idle(KEEPALIVE_IDLE);
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|error| connect_error(target, error))?;
        let connection = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(error = %describe(&error), "snapshot holder connection failed");
            }
        });
        let setup = format!(
            "{SESSION_SETUP}; SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0"
        );
        client
            .batch_execute(&setup)
            .await
            .map_err(|error| SourceError::query("prepare the snapshot session", error))?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|error| SourceError::query("open the snapshot transaction", error))?;
        let row = client
            .query_one(
                "SELECT pg_catalog.pg_export_snapshot(), pg_catalog.statement_timestamp()",
                &[],
            )
            .await
            .map_err(|error| SourceError::query("export the snapshot", error))?;
        let snapshot_id: String = row
            .try_get(0)
            .map_err(|error| SourceError::query("export the snapshot", error))?;
        let taken_at: DateTime<Utc> = row
            .try_get(1)
            .map_err(|error| SourceError::query("export the snapshot", error))?;
        tracing::info!(%snapshot_id, %taken_at, "snapshot exported");
        Ok(Self {
            client,
            connection,
            snapshot_id,
            taken_at,
            target: target.to_string(),
            planning: Mutex::new(()),
        })
    }

    /// The exported snapshot id, for `SET TRANSACTION SNAPSHOT` in other sessions.
    pub fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }

    /// When the snapshot was taken (server clock).
    pub fn taken_at(&self) -> DateTime<Utc> {
        self.taken_at
    }

    /// Counts and chooses ranges inside the held snapshot (same algorithm as
    /// [`PgSource::plan_ranges`](crate::PgSource::plan_ranges)).
    ///
    /// Runs inside a savepoint, so a failing statement (a table dropped since)
    /// does not abort the holding transaction.
    pub async fn plan_ranges(&self, entity: &EntitySpec) -> Result<RangePlan, SourceError> {
        let _planning = self.planning.lock().await;
        self.client
            .batch_execute("SAVEPOINT koan_plan")
            .await
            .map_err(|error| SourceError::query("plan inside the held snapshot", error))?;
        let planned = plan_on(&self.client, entity).await;
        let end = if planned.is_ok() {
            "RELEASE SAVEPOINT koan_plan"
        } else {
            "ROLLBACK TO SAVEPOINT koan_plan; RELEASE SAVEPOINT koan_plan"
        };
        let ended = self.client.batch_execute(end).await;
        let plan = planned?;
        ended.map_err(|error| SourceError::query("plan inside the held snapshot", error))?;
        Ok(plan)
    }

    /// Whether the holding connection and its transaction are still alive.
    ///
    /// Runs `SELECT 1` (at most five seconds); while a plan is running on the
    /// connection it only checks that the connection is open, so a long plan
    /// is not mistaken for a dead holder.
    pub async fn is_alive(&self) -> bool {
        if self.client.is_closed() {
            return false;
        }
        let Ok(_planning) = self.planning.try_lock() else {
            return true;
        };
        matches!(
            tokio::time::timeout(ALIVE_TIMEOUT, self.client.simple_query("SELECT 1")).await,
            Ok(Ok(_))
        )
    }

    /// Ends the transaction (the snapshot is no longer importable) and closes the connection.
    pub async fn release(self) {
        let Self {
            client,
            mut connection,
            snapshot_id,
            ..
        } = self;
        if let Err(error) = client.batch_execute("COMMIT").await {
            tracing::debug!(%snapshot_id, error = %describe(&error), "snapshot holder already gone");
        }
        drop(client);
        // Dropping the client makes the connection send Terminate and finish.
        if tokio::time::timeout(ALIVE_TIMEOUT, &mut connection)
            .await
            .is_err()
        {
            tracing::warn!(%snapshot_id, "snapshot holder connection did not close in time");
            connection.abort();
        }
        tracing::info!(%snapshot_id, "snapshot released");
    }
}
