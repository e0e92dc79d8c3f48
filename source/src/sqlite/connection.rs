//! Opening SQLite connections, and running blocking calls off the async runtime.
//!
//! SQLite connections are cheap to open (a file open and a schema read), so a
//! [`SqliteSource`](super::SqliteSource) opens one per call instead of pooling
//! them; a semaphore of `max_connections` permits bounds how many are open at
//! once, as the PostgreSQL pool does. Every connection waits up to
//! [`BUSY_TIMEOUT`] for a lock, enforces foreign keys when it may write (as
//! PostgreSQL always does), and has koan's functions registered.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{SourceError, describe_sqlite, sqlite};
use crate::sqlite::functions;

/// How long a statement waits for another connection's lock before failing
/// with the retryable `lock_timeout`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a connection may do to the database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read only (backups: inspect, plan, export).
    Read,
    /// Read and write an existing file (restores).
    Write,
    /// Read and write, creating the file if it is missing (`prepare_target`).
    Create,
}

/// Opens `path`; fails with [`SourceError::SqliteOpen`] when the file is
/// missing (unless `Create`), unreadable, or not a SQLite database.
pub(crate) fn open(path: &Path, access: Access) -> Result<Connection, SourceError> {
    let flags = OpenFlags::SQLITE_OPEN_NO_MUTEX
        | match access {
            Access::Read => OpenFlags::SQLITE_OPEN_READ_ONLY,
            Access::Write => OpenFlags::SQLITE_OPEN_READ_WRITE,
            Access::Create => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        };
    let shown = path.display().to_string();
    let open_error = |error: &rusqlite::Error| SourceError::SqliteOpen {
        path: shown.clone(),
        reason: describe_sqlite(error),
    };
    let connection = Connection::open_with_flags(path, flags).map_err(|e| open_error(&e))?;
    let context = || format!("set up a connection to {shown}");
    connection
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(|error| sqlite(context(), error))?;
    // Reading the header now makes a file that is not a database fail here,
    // naming the file, rather than at the first statement.
    if let Err(error) =
        connection.query_row("PRAGMA schema_version", [], |row| row.get::<_, i64>(0))
    {
        return Err(match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::CannotOpen | ErrorCode::DatabaseCorrupt) => {
                open_error(&error)
            }
            _ => sqlite(context(), error),
        });
    }
    if access != Access::Read {
        connection
            .pragma_update(None, "foreign_keys", true)
            .map_err(|error| sqlite(context(), error))?;
    }
    functions::register(&connection).map_err(|error| sqlite(context(), error))?;
    Ok(connection)
}

/// The permits bounding the connections one source has open.
#[derive(Debug, Clone)]
pub(crate) struct Permits {
    semaphore: Arc<Semaphore>,
    max: usize,
}

impl Permits {
    pub(crate) fn new(max_connections: usize) -> Result<Self, SourceError> {
        if max_connections == 0 {
            return Err(SourceError::Config {
                reason: "max_connections must be at least 1".into(),
            });
        }
        Ok(Self {
            semaphore: Arc::new(Semaphore::new(max_connections)),
            max: max_connections,
        })
    }

    /// Waits for a free connection slot.
    pub(crate) async fn acquire(&self) -> Result<OwnedSemaphorePermit, SourceError> {
        Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .map_err(|error| SourceError::TaskFailed {
                context: "wait for a sqlite connection slot".into(),
                reason: error.to_string(),
            })
    }

    /// Most connections open at once.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub(crate) fn in_use(&self) -> usize {
        self.max.saturating_sub(self.semaphore.available_permits())
    }
}

/// Runs `work` on the blocking pool; a panic or cancellation becomes
/// [`SourceError::TaskFailed`].
pub(crate) async fn blocking<T, F>(context: &str, work: F) -> Result<T, SourceError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, SourceError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| SourceError::TaskFailed {
            context: context.to_string(),
            reason: error.to_string(),
        })?
}
