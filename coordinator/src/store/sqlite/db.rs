//! One transaction on the SQLite file, and the conversions between stored
//! and protocol values: UUIDs as TEXT, times as integer microseconds since
//! the Unix epoch (UTC), JSON as TEXT, booleans as 0 and 1.

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, SubsecRound, Utc};
use rusqlite::types::FromSql;
use rusqlite::{Connection, ErrorCode, Params, Row, TransactionBehavior};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::CoordinatorError;
use crate::store::Policy;

/// What every transaction shares: the one connection (transactions are
/// serialised by its mutex), the policy and the token secret.
pub(super) struct Shared {
    conn: Mutex<Connection>,
    /// The policy the store applies.
    pub policy: Policy,
    /// The deployment's token secret.
    pub secret: [u8; 32],
}

impl Shared {
    /// Wraps a migrated connection.
    pub fn new(conn: Connection, policy: Policy, secret: [u8; 32]) -> Self {
        Self {
            conn: Mutex::new(conn),
            policy,
            secret,
        }
    }

    /// Runs `work` in one transaction and commits it, unless `work` failed or
    /// asked for a rollback ([`Db::discard`]). `write` transactions begin
    /// `IMMEDIATE` (they take the write lock at once); reads are deferred and
    /// see one snapshot.
    pub fn transaction<T>(
        &self,
        write: bool,
        work: impl FnOnce(&Db<'_>) -> Result<T, CoordinatorError>,
    ) -> Result<T, CoordinatorError> {
        // A panic inside a transaction rolled it back (dropping it does): the
        // connection is still sound, so a poisoned lock is taken over.
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let behavior = if write {
            TransactionBehavior::Immediate
        } else {
            TransactionBehavior::Deferred
        };
        let tx = conn
            .transaction_with_behavior(behavior)
            .map_err(sql_error("begin"))?;
        let db = Db {
            conn: &tx,
            policy: &self.policy,
            secret: &self.secret,
            now: Utc::now().trunc_subsecs(6),
            keep: Cell::new(true),
        };
        let outcome = work(&db)?;
        if db.keep.get() {
            tx.commit().map_err(sql_error("commit"))?;
        }
        Ok(outcome)
    }
}

/// A transaction of the store (statements name tables directly).
pub(super) struct Db<'t> {
    conn: &'t Connection,
    /// The policy the store applies.
    pub policy: &'t Policy,
    /// The deployment's token secret.
    pub secret: &'t [u8; 32],
    /// The time of the transaction (to the microsecond), used for every timestamp it writes.
    pub now: DateTime<Utc>,
    keep: Cell<bool>,
}

impl Db<'_> {
    /// Rolls the transaction back instead of committing it (nothing changed).
    pub fn discard(&self) {
        self.keep.set(false);
    }

    /// Whether the transaction is to be committed (nothing asked for a rollback).
    pub fn kept(&self) -> bool {
        self.keep.get()
    }

    /// Commits after all, once a savepoint undid what asked for the rollback.
    pub fn keep(&self) {
        self.keep.set(true);
    }

    /// Runs statements without parameters (savepoint control).
    pub fn execute_batch(
        &self,
        operation: &'static str,
        sql: &str,
    ) -> Result<(), CoordinatorError> {
        self.conn.execute_batch(sql).map_err(sql_error(operation))
    }

    /// Runs a statement; returns the rows it changed.
    pub fn execute(
        &self,
        operation: &'static str,
        sql: &str,
        params: impl Params,
    ) -> Result<usize, CoordinatorError> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut statement| statement.execute(params))
            .map_err(sql_error(operation))
    }

    /// Every row of a statement, each read by `read`.
    pub fn query<T>(
        &self,
        operation: &'static str,
        sql: &str,
        params: impl Params,
        mut read: impl FnMut(&Row<'_>) -> Result<T, CoordinatorError>,
    ) -> Result<Vec<T>, CoordinatorError> {
        let mut statement = self
            .conn
            .prepare_cached(sql)
            .map_err(sql_error(operation))?;
        let mut rows = statement.query(params).map_err(sql_error(operation))?;
        let mut read_rows = Vec::new();
        while let Some(row) = rows.next().map_err(sql_error(operation))? {
            read_rows.push(read(row)?);
        }
        Ok(read_rows)
    }

    /// The first row of a statement, if any, read by `read`.
    pub fn query_opt<T>(
        &self,
        operation: &'static str,
        sql: &str,
        params: impl Params,
        read: impl FnOnce(&Row<'_>) -> Result<T, CoordinatorError>,
    ) -> Result<Option<T>, CoordinatorError> {
        let mut statement = self
            .conn
            .prepare_cached(sql)
            .map_err(sql_error(operation))?;
        let mut rows = statement.query(params).map_err(sql_error(operation))?;
        match rows.next().map_err(sql_error(operation))? {
            Some(row) => read(row).map(Some),
            None => Ok(None),
        }
    }
}

/// Maps a driver error from `operation`, deciding whether retrying can help
/// (the file is busy or locked by another connection).
pub(super) fn sql_error(
    operation: &'static str,
) -> impl FnOnce(rusqlite::Error) -> CoordinatorError {
    move |error| CoordinatorError::Store {
        operation,
        retryable: matches!(
            error.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        ),
        source: Box::new(error),
    }
}

/// Reads column `column`, naming it when unreadable.
pub(super) fn get<T: FromSql>(row: &Row<'_>, column: &str) -> Result<T, CoordinatorError> {
    row.get(column)
        .map_err(|error| CoordinatorError::corrupt(format!("column {column}"), error))
}

/// Reads a counter column (never negative in practice) as a protocol figure.
pub(super) fn get_u64(row: &Row<'_>, column: &str) -> Result<u64, CoordinatorError> {
    get::<i64>(row, column).map(uint)
}

/// Reads a small number column (chunk, part, attempt) as a protocol number.
pub(super) fn get_u32(row: &Row<'_>, column: &str) -> Result<u32, CoordinatorError> {
    get::<i64>(row, column).map(|value| u32::try_from(value).unwrap_or(0))
}

/// Reads a UUID stored as TEXT.
pub(super) fn get_uuid(row: &Row<'_>, column: &str) -> Result<Uuid, CoordinatorError> {
    let text: String = get(row, column)?;
    parse_uuid(column, &text)
}

/// Reads a UUID stored as TEXT, or NULL.
pub(super) fn get_opt_uuid(row: &Row<'_>, column: &str) -> Result<Option<Uuid>, CoordinatorError> {
    get::<Option<String>>(row, column)?
        .map(|text| parse_uuid(column, &text))
        .transpose()
}

fn parse_uuid(column: &str, text: &str) -> Result<Uuid, CoordinatorError> {
    Uuid::parse_str(text)
        .map_err(|error| CoordinatorError::corrupt(format!("column {column}"), error))
}

/// Reads a time stored as microseconds since the epoch.
pub(super) fn get_time(row: &Row<'_>, column: &str) -> Result<DateTime<Utc>, CoordinatorError> {
    let micros: i64 = get(row, column)?;
    from_micros(column, micros)
}

/// Reads a time stored as microseconds since the epoch, or NULL.
pub(super) fn get_opt_time(
    row: &Row<'_>,
    column: &str,
) -> Result<Option<DateTime<Utc>>, CoordinatorError> {
    get::<Option<i64>>(row, column)?
        .map(|micros| from_micros(column, micros))
        .transpose()
}

fn from_micros(column: &str, micros: i64) -> Result<DateTime<Utc>, CoordinatorError> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| CoordinatorError::corrupt(format!("column {column}"), "time out of range"))
}

/// Reads a JSON document stored as TEXT.
pub(super) fn get_json<T: DeserializeOwned>(
    row: &Row<'_>,
    column: &str,
) -> Result<T, CoordinatorError> {
    let text: String = get(row, column)?;
    parse_json(column, &text)
}

/// Reads a JSON document stored as TEXT, or NULL.
pub(super) fn get_opt_json<T: DeserializeOwned>(
    row: &Row<'_>,
    column: &str,
) -> Result<Option<T>, CoordinatorError> {
    get::<Option<String>>(row, column)?
        .map(|text| parse_json(column, &text))
        .transpose()
}

fn parse_json<T: DeserializeOwned>(column: &str, text: &str) -> Result<T, CoordinatorError> {
    serde_json::from_str(text)
        .map_err(|error| CoordinatorError::corrupt(format!("column {column}"), error))
}

/// `value` as stored JSON text.
pub(super) fn json<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<String, CoordinatorError> {
    serde_json::to_string(value).map_err(|error| CoordinatorError::corrupt(what, error))
}

/// A time as stored: microseconds since the epoch.
pub(super) fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

/// A UUID as stored: lowercase hyphenated TEXT (sorts like its bytes).
pub(super) fn text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// A stored counter (never negative in practice) as a protocol figure.
pub(super) fn uint(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A protocol figure as a stored integer, saturating.
pub(super) fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_as_stored() {
        let now = Utc::now().trunc_subsecs(6);
        assert_eq!(from_micros("t", micros(now)).unwrap(), now);
        let id = Uuid::now_v7();
        assert_eq!(parse_uuid("id", &text(id)).unwrap(), id);
        assert!(parse_uuid("id", "not-a-uuid").is_err());
        assert_eq!(uint(-5), 0);
        assert_eq!(int(u64::MAX), i64::MAX);
        // Stored UUID text orders like the UUIDs themselves.
        let (a, b) = (Uuid::from_u128(1 << 64), Uuid::from_u128(u128::MAX - 1));
        assert_eq!(a < b, text(a) < text(b));
    }
}
