//! Errors of entity sources, each with a short stable code and a retry verdict.
//!
//! Messages never contain a password: connection errors name the target as
//! `host:port/database as user`, built from the parsed configuration, never
//! from the URL text. SQLite errors name the database file.

use std::error::Error as _;

use koan_protocol::ProtocolError;
use tokio_postgres::error::SqlState;

/// How to start the local PostgreSQL cluster, quoted in connection errors.
pub const START_POSTGRES_HINT: &str =
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start";

/// Everything that can go wrong while reading entities from a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No connection could be made: the server is down, unreachable or too slow to answer.
    #[error(
        "postgresql at {target} unreachable: {reason}; start it with `{START_POSTGRES_HINT}` or fix the url"
    )]
    Unreachable {
        /// `host:port/database as user` (never the password).
        target: String,
        /// What the connection attempt reported.
        reason: String,
    },
    /// The server answered but refused the session (authentication, unknown database, too many clients).
    #[error("postgresql at {target} refused the connection: {reason}")]
    ConnectRejected {
        /// `host:port/database as user` (never the password).
        target: String,
        /// The server's message.
        reason: String,
        /// SQLSTATE of the refusal, when the server sent one.
        sqlstate: Option<String>,
    },
    /// The connection string or pool settings are unusable.
    #[error("invalid source configuration: {reason}")]
    Config {
        /// What is wrong (never echoes the password).
        reason: String,
    },
    /// Every pooled connection stayed busy past the wait timeout.
    #[error("no pooled connection to postgresql at {target} became free in time")]
    PoolTimeout {
        /// `host:port/database as user`.
        target: String,
    },
    /// The pool was closed (the process is shutting down).
    #[error("the connection pool to postgresql at {target} is closed")]
    PoolClosed {
        /// `host:port/database as user`.
        target: String,
    },
    /// The entity's table does not exist.
    #[error("table {schema}.{table} does not exist{}", hint_suffix(.hint))]
    MissingTable {
        /// Schema, as given.
        schema: String,
        /// Table, as given.
        table: String,
        /// What to do about it, when there is more to say
        /// (a restore cannot create a relational table from an archive).
        hint: Option<&'static str>,
    },
    /// The relation exists but cannot be read as a table (a sequence, an index, a composite type).
    #[error("{schema}.{table} is a {kind}, not a table")]
    NotATable {
        /// Schema, as given.
        schema: String,
        /// Relation name, as given.
        table: String,
        /// What it is instead.
        kind: String,
    },
    /// A column named by the entity (key, document, version, scope) does not exist.
    #[error("column {column} not found in table {table}")]
    MissingColumn {
        /// `schema.table`, as given.
        table: String,
        /// Column, as given.
        column: String,
    },
    /// The key column is neither the primary key alone nor a unique, not-null column.
    #[error(
        "key column {column} of table {table} is neither the single-column primary key nor a not-null column with a unique index of its own"
    )]
    KeyNotUnique {
        /// `schema.table`, as given.
        table: String,
        /// Key column, as given.
        column: String,
    },
    /// The key column's type cannot be used for key ranges.
    #[error(
        "key column {column} of table {table} has type {sql_type}; supported key types are text, varchar, uuid, bigint and integer"
    )]
    UnsupportedKeyType {
        /// `schema.table`, as given.
        table: String,
        /// Key column, as given.
        column: String,
        /// The column's SQL type.
        sql_type: String,
    },
    /// The document column of a Koan-layout entity is not json, jsonb or text.
    #[error(
        "document column {column} of table {table} has type {sql_type}; supported document types are jsonb, json and text"
    )]
    UnsupportedDocumentType {
        /// `schema.table`, as given.
        table: String,
        /// Document column, as given.
        column: String,
        /// The column's SQL type.
        sql_type: String,
    },
    /// A range bound or continuation key is not a valid value of the key type.
    #[error("key '{key}' is not a valid {key_type} value")]
    InvalidKey {
        /// The offending key (escaped, truncated).
        key: String,
        /// The key column's SQL type.
        key_type: &'static str,
    },
    /// A name or a plan failed validation.
    #[error(transparent)]
    Invalid(#[from] ProtocolError),
    /// The source lacks a capability the plan needs.
    #[error(
        "this source cannot honour consistency '{consistency}': it lacks the {capability} capability"
    )]
    Unsupported {
        /// Consistency mode asked for.
        consistency: &'static str,
        /// Name of the missing capability.
        capability: &'static str,
    },
    /// The exported snapshot can no longer be imported: its holder ended or died.
    #[error("snapshot {snapshot_id} is lost: {reason}")]
    SnapshotLost {
        /// The snapshot id as exported by `pg_export_snapshot()`.
        snapshot_id: String,
        /// What the server said.
        reason: String,
    },
    /// A statement failed.
    #[error("{context}: {}", describe(.source))]
    Query {
        /// What was being done (`export of entity orders`).
        context: String,
        /// The driver's error.
        source: tokio_postgres::Error,
    },
    /// An import session was used after one of its statements failed.
    #[error("{context}: the import already failed ({reason}); abort it and start again")]
    ImportFailed {
        /// Which import (`import of entity orders`).
        context: String,
        /// The first failure.
        reason: String,
        /// Whether the first failure was retryable.
        retryable: bool,
    },
    /// A typed load ([`StagingForm::Typed`](crate::StagingForm::Typed)) met a row
    /// it cannot load as it is: nothing of the part was loaded; stage it
    /// again as text, where each row is judged on its own.
    #[error("{context}: the part cannot be loaded typed: {reason}")]
    RowsRefused {
        /// Which import.
        context: String,
        /// The row and why (the client's check, or the server's message).
        reason: String,
    },
    /// The COPY stream is malformed or holds something that is not UTF-8 text.
    #[error("malformed copy stream: {reason}")]
    Decode {
        /// What is wrong.
        reason: String,
    },
    /// The SQLite database file cannot be opened (missing, unreadable, not a database).
    #[error("sqlite database {path} cannot be opened: {reason}")]
    SqliteOpen {
        /// The database file, as resolved from the URL.
        path: String,
        /// What SQLite reported.
        reason: String,
    },
    /// A SQLite statement failed.
    #[error("{context}: {}", describe_sqlite(.source))]
    Sqlite {
        /// What was being done (`export of entity orders`).
        context: String,
        /// The driver's error.
        source: rusqlite::Error,
    },
    /// The backend cannot do this at all (a layout, schema or key type it has no
    /// equivalent for); nothing was read or written.
    #[error("the {backend} source does not support {what}: {reason}")]
    NotSupported {
        /// `sqlite` or `postgresql`.
        backend: &'static str,
        /// What was asked for.
        what: String,
        /// Why it cannot be done, and what to do instead.
        reason: String,
    },
    /// A blocking task (a SQLite call run off the async runtime) panicked or was cancelled.
    #[error("{context}: the blocking task failed: {reason}")]
    TaskFailed {
        /// What was being done.
        context: String,
        /// The panic or cancellation.
        reason: String,
    },
}

impl SourceError {
    /// A short stable code for logs, events and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::ConnectRejected { .. } => "connect_rejected",
            Self::Config { .. } => "config",
            Self::PoolTimeout { .. } => "pool_timeout",
            Self::PoolClosed { .. } => "pool_closed",
            Self::MissingTable { .. } => "missing_table",
            Self::NotATable { .. } => "not_a_table",
            Self::MissingColumn { .. } => "missing_column",
            Self::KeyNotUnique { .. } => "key_not_unique",
            Self::UnsupportedKeyType { .. } => "unsupported_key_type",
            Self::UnsupportedDocumentType { .. } => "unsupported_document_type",
            Self::InvalidKey { .. } => "invalid_key",
            Self::Invalid(error) => error.code(),
            Self::Unsupported { .. } => "unsupported",
            Self::SnapshotLost { .. } => "snapshot_lost",
            Self::Query { source, .. } => query_code(source),
            Self::ImportFailed { .. } => "import_failed",
            Self::RowsRefused { .. } => "rows_refused",
            Self::Decode { .. } => "decode",
            Self::SqliteOpen { .. } => "open_failed",
            Self::Sqlite { source, .. } => sqlite_code(source),
            Self::NotSupported { .. } => "not_supported",
            Self::TaskFailed { .. } => "task_failed",
        }
    }

    /// Whether the same work may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::PoolTimeout { .. } => true,
            Self::ImportFailed { retryable, .. } => *retryable,
            Self::ConnectRejected { sqlstate, .. } => sqlstate
                .as_deref()
                .is_some_and(|code| code.starts_with("08") || RETRYABLE_STATES.contains(&code)),
            Self::Query { source, .. } => {
                matches!(
                    query_code(source),
                    "connection_lost"
                        | "serialization_failure"
                        | "server_shutdown"
                        | "insufficient_resources"
                        | "lock_timeout"
                        | "query_canceled"
                )
            }
            Self::Sqlite { source, .. } => matches!(
                sqlite_code(source),
                "lock_timeout" | "insufficient_resources" | "io_error"
            ),
            _ => false,
        }
    }

    /// A malformed-stream error.
    pub(crate) fn decode(reason: impl Into<String>) -> Self {
        Self::Decode {
            reason: reason.into(),
        }
    }

    /// A failed statement, with what was being done.
    pub(crate) fn query(context: impl Into<String>, source: tokio_postgres::Error) -> Self {
        Self::Query {
            context: context.into(),
            source,
        }
    }
}

/// A failed SQLite call, with what was being done.
pub(crate) fn sqlite(context: impl Into<String>, source: rusqlite::Error) -> SourceError {
    SourceError::Sqlite {
        context: context.into(),
        source,
    }
}

fn sqlite_code(error: &rusqlite::Error) -> &'static str {
    if let rusqlite::Error::SqlInputError { error, msg, .. } = error {
        return sqlite_failure_code(error, Some(msg));
    }
    let rusqlite::Error::SqliteFailure(failure, message) = error else {
        return match error {
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::Utf8Error(..)
            | rusqlite::Error::InvalidColumnType(..) => "data_exception",
            _ => "query",
        };
    };
    sqlite_failure_code(failure, message.as_deref())
}

fn sqlite_failure_code(failure: &rusqlite::ffi::Error, message: Option<&str>) -> &'static str {
    use rusqlite::ErrorCode;
    match failure.code {
        ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => "lock_timeout",
        ErrorCode::OutOfMemory | ErrorCode::DiskFull => "insufficient_resources",
        ErrorCode::SystemIoFailure => "io_error",
        ErrorCode::ReadOnly
        | ErrorCode::PermissionDenied
        | ErrorCode::AuthorizationForStatementDenied => "permission_denied",
        ErrorCode::OperationInterrupted => "query_canceled",
        ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => "corrupt_database",
        ErrorCode::ConstraintViolation => "constraint_violation",
        ErrorCode::TooBig | ErrorCode::TypeMismatch => "data_exception",
        _ => match message {
            Some(text) if text.starts_with("no such table") => "missing_table",
            Some(text) if text.starts_with("no such column") => "missing_column",
            Some(text)
                if text.contains("malformed JSON") || text.starts_with(DATA_ERROR_PREFIX) =>
            {
                "data_exception"
            }
            _ => "query",
        },
    }
}

/// Prefix of the errors koan's own SQLite functions raise on bad data (a
/// document that is not JSON), so they are told apart from statement errors.
pub(crate) const DATA_ERROR_PREFIX: &str = "koan: invalid data: ";

/// One line describing a SQLite error: its result code and message.
pub(crate) fn describe_sqlite(error: &rusqlite::Error) -> String {
    match error {
        rusqlite::Error::SqliteFailure(failure, Some(message)) => {
            format!("{message} (sqlite code {})", failure.extended_code)
        }
        rusqlite::Error::SqlInputError { error, msg, .. } => {
            format!("{msg} (sqlite code {})", error.extended_code)
        }
        other => other.to_string(),
    }
}

fn hint_suffix(hint: &Option<&'static str>) -> String {
    hint.map(|hint| format!("; {hint}")).unwrap_or_default()
}

/// SQLSTATEs after which retrying later is expected to work.
const RETRYABLE_STATES: &[&str] = &["53300", "57P01", "57P02", "57P03", "40001", "40P01"];

/// Whether a driver error is about the connection rather than the statement.
pub(crate) fn is_connection_error(error: &tokio_postgres::Error) -> bool {
    if error.as_db_error().is_some() {
        return false;
    }
    error.is_closed()
        || error
            .source()
            .is_some_and(|cause| cause.downcast_ref::<std::io::Error>().is_some())
        || error.to_string().starts_with("timeout")
}

fn query_code(error: &tokio_postgres::Error) -> &'static str {
    let Some(state) = error.code() else {
        return if is_connection_error(error) {
            "connection_lost"
        } else {
            "query"
        };
    };
    let code = state.code();
    if code.starts_with("08") {
        return "connection_lost";
    }
    match *state {
        SqlState::T_R_SERIALIZATION_FAILURE | SqlState::T_R_DEADLOCK_DETECTED => {
            "serialization_failure"
        }
        SqlState::ADMIN_SHUTDOWN | SqlState::CRASH_SHUTDOWN | SqlState::CANNOT_CONNECT_NOW => {
            "server_shutdown"
        }
        SqlState::TOO_MANY_CONNECTIONS | SqlState::OUT_OF_MEMORY | SqlState::DISK_FULL => {
            "insufficient_resources"
        }
        SqlState::LOCK_NOT_AVAILABLE => "lock_timeout",
        SqlState::QUERY_CANCELED => "query_canceled",
        SqlState::INSUFFICIENT_PRIVILEGE => "permission_denied",
        SqlState::UNDEFINED_TABLE => "missing_table",
        SqlState::UNDEFINED_COLUMN => "missing_column",
        _ if code.starts_with("22") => "data_exception",
        _ if code.starts_with("23") => "constraint_violation",
        _ => "query",
    }
}

/// One line describing a driver error: the server's SQLSTATE, message, detail
/// and hint, or the driver's error and its cause.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!("{} {}", db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    match error.source() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_retry_verdicts() {
        let unreachable = SourceError::Unreachable {
            target: "127.0.0.1:5432/app as postgres".into(),
            reason: "connection refused".into(),
        };
        assert!(unreachable.is_retryable());
        assert_eq!(unreachable.code(), "unreachable");
        let message = unreachable.to_string();
        assert!(
            message.contains("postgresql at 127.0.0.1:5432/app"),
            "{message}"
        );
        assert!(message.contains("unreachable"), "{message}");
        assert!(message.contains("pg_ctlcluster"), "{message}");

        let missing = SourceError::MissingTable {
            schema: "public".into(),
            table: "nope".into(),
            hint: None,
        };
        assert!(!missing.is_retryable());
        assert_eq!(missing.to_string(), "table public.nope does not exist");
        let relational = SourceError::MissingTable {
            schema: "public".into(),
            table: "people".into(),
            hint: Some("create it first"),
        };
        assert_eq!(
            relational.to_string(),
            "table public.people does not exist; create it first"
        );

        let lost = SourceError::SnapshotLost {
            snapshot_id: "00000003-0000001B-1".into(),
            reason: "invalid snapshot identifier".into(),
        };
        assert!(!lost.is_retryable());
        assert_eq!(lost.code(), "snapshot_lost");

        for (state, retryable) in [
            ("53300", true),
            ("57P03", true),
            ("08006", true),
            ("28P01", false),
        ] {
            let rejected = SourceError::ConnectRejected {
                target: "t".into(),
                reason: "r".into(),
                sqlstate: Some(state.into()),
            };
            assert_eq!(rejected.is_retryable(), retryable, "{state}");
        }
        assert!(!SourceError::decode("x").is_retryable());
    }
}
