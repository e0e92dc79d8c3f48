//! One transaction on the state store, its schema-qualified statements and
//! the conversions between stored and protocol values.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{IsolationLevel, Row};

use crate::error::CoordinatorError;

use super::PgStateStore;

/// Statement parameters.
pub(super) type Params<'p> = [&'p (dyn ToSql + Sync)];

/// A transaction of the store. Statements name tables as `{s}.table`;
/// `{s}` becomes the store's quoted schema.
pub(super) struct Db<'c> {
    tx: Transaction<'c>,
    /// The store the transaction belongs to.
    pub store: &'c PgStateStore,
    /// The time of the transaction, used for every timestamp it writes.
    pub now: DateTime<Utc>,
}

impl<'c> Db<'c> {
    /// Begins a read-write transaction.
    pub async fn begin(
        client: &'c mut Object,
        store: &'c PgStateStore,
    ) -> Result<Self, CoordinatorError> {
        let tx = client.transaction().await.map_err(db_error("begin"))?;
        Ok(Self {
            tx,
            store,
            now: Utc::now(),
        })
    }

    /// Begins a read-only transaction seeing one snapshot.
    pub async fn begin_read(
        client: &'c mut Object,
        store: &'c PgStateStore,
    ) -> Result<Self, CoordinatorError> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_error("begin"))?;
        Ok(Self {
            tx,
            store,
            now: Utc::now(),
        })
    }

    fn sql(&self, text: &str) -> String {
        text.replace("{s}", self.store.quoted_schema())
    }

    /// Prepares (once per connection) a statement with the schema filled in.
    async fn prepare(
        &self,
        operation: &'static str,
        text: &str,
    ) -> Result<tokio_postgres::Statement, CoordinatorError> {
        self.tx
            .prepare_cached(&self.sql(text))
            .await
            .map_err(db_error(operation))
    }

    /// Rows of a statement.
    pub async fn query(
        &self,
        operation: &'static str,
        text: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, CoordinatorError> {
        let statement = self.prepare(operation, text).await?;
        self.tx
            .query(&statement, params)
            .await
            .map_err(db_error(operation))
    }

    /// At most one row of a statement.
    pub async fn query_opt(
        &self,
        operation: &'static str,
        text: &str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, CoordinatorError> {
        let statement = self.prepare(operation, text).await?;
        self.tx
            .query_opt(&statement, params)
            .await
            .map_err(db_error(operation))
    }

    /// Runs a statement; returns the rows it changed.
    pub async fn execute(
        &self,
        operation: &'static str,
        text: &str,
        params: &Params<'_>,
    ) -> Result<u64, CoordinatorError> {
        let statement = self.prepare(operation, text).await?;
        self.tx
            .execute(&statement, params)
            .await
            .map_err(db_error(operation))
    }

    /// Runs statements without parameters (savepoint control) in one round trip.
    pub async fn batch_execute(
        &self,
        operation: &'static str,
        text: &str,
    ) -> Result<(), CoordinatorError> {
        self.tx
            .batch_execute(text)
            .await
            .map_err(db_error(operation))
    }

    /// Takes a transaction-scoped advisory lock named `name` (within the store's
    /// schema) if free; false when another session holds it.
    pub async fn try_lock(&self, name: &str) -> Result<bool, CoordinatorError> {
        let key = format!("koan-coordinator {name} {}", self.store.schema());
        let row = self
            .tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock(('x' || left(md5($1), 16))::bit(64)::bigint)",
                &[&key],
            )
            .await
            .map_err(db_error("advisory lock"))?;
        get(&row, 0)
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), CoordinatorError> {
        self.tx.commit().await.map_err(db_error("commit"))
    }
}

/// Maps a driver error from `operation`, deciding whether retrying can help.
pub(super) fn db_error(
    operation: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> CoordinatorError {
    move |error| CoordinatorError::Store {
        operation,
        retryable: is_retryable(&error),
        source: Box::new(error),
    }
}

fn is_retryable(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    let Some(code) = error.code() else {
        // No SQLSTATE: the connection or the socket failed.
        return true;
    };
    code.code().starts_with("08")
        || [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
        ]
        .contains(code)
}

/// Reads column `index` (a name or a position), naming it when unreadable.
pub(super) fn get<'r, T: FromSql<'r>>(
    row: &'r Row,
    index: impl tokio_postgres::row::RowIndex + std::fmt::Display,
) -> Result<T, CoordinatorError> {
    let what = format!("column {index}");
    row.try_get(index)
        .map_err(|error| CoordinatorError::corrupt(what, error))
}

/// A stored counter (never negative in practice) as a protocol figure.
pub(super) fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A protocol figure as a stored counter, saturating.
pub(super) fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A small protocol number (chunk, part, attempt) as a stored integer, saturating.
pub(super) fn int4(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// A stored integer as a small protocol number.
pub(super) fn uint4(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

pub(super) use crate::store::rules::{delta, shifted};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_saturate() {
        assert_eq!(uint(-5), 0);
        assert_eq!(int(u64::MAX), i64::MAX);
        assert_eq!(int4(u32::MAX), i32::MAX);
        assert_eq!(shifted(10, -15), 0);
        assert_eq!(shifted(10, 5), 15);
        assert_eq!(delta(3, 10), -7);
    }
}
