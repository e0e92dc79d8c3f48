//! Opening the SQLite file (WAL, full sync, foreign keys, busy timeout) and
//! applying the migrations in `migrations/*.sql` in one transaction; the
//! token secret is created by the first one and read back on every open.

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use tracing::{info, warn};

use crate::error::CoordinatorError;

use super::db::{micros, sql_error};

/// How long a statement waits for a lock held by another connection to the file.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 128;

struct Migration {
    version: i64,
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
        name: "trace_context",
        sql: include_str!("migrations/0002_trace_context.sql"),
    },
    Migration {
        version: 3,
        name: "metrics",
        sql: include_str!("migrations/0003_metrics.sql"),
    },
];

/// Opens (creating it if needed) the database at `path`, or a private
/// in-memory database when `path` is `None`, and sets it up.
pub(super) fn open(path: Option<&Path>) -> Result<Connection, CoordinatorError> {
    let what = || match path {
        Some(path) => format!("sqlite at {}", path.display()),
        None => "sqlite in memory".to_string(),
    };
    let unreachable = |error: rusqlite::Error| CoordinatorError::StoreUnreachable {
        what: what(),
        source: Box::new(error),
    };
    let conn = match path {
        Some(path) => Connection::open(path),
        None => Connection::open_in_memory(),
    }
    .map_err(unreachable)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(unreachable)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if path.is_some() {
        // WAL: readers never block the writer; FULL: a committed report
        // survives a power loss (the broker delivery is acked after commit).
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(unreachable)?;
        if !mode.eq_ignore_ascii_case("wal") {
            warn!(store = %what(), mode, "SQLite did not switch to WAL journaling");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unreachable)?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unreachable)?;
    Ok(conn)
}

/// Applies pending migrations and returns the token secret, creating it once.
pub(super) fn migrate(conn: &mut Connection) -> Result<[u8; 32], CoordinatorError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql_error("begin migration"))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at INTEGER NOT NULL
         ) STRICT;",
    )
    .map_err(sql_error("create migrations table"))?;
    let applied: Vec<i64> = {
        let mut statement = tx
            .prepare("SELECT version FROM schema_migrations")
            .map_err(sql_error("read migrations"))?;
        statement
            .query_map([], |row| row.get(0))
            .and_then(|rows| rows.collect())
            .map_err(sql_error("read migrations"))?
    };
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        tx.execute_batch(migration.sql)
            .map_err(sql_error("apply migration"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            (migration.version, migration.name, micros(Utc::now())),
        )
        .map_err(sql_error("record migration"))?;
        info!(
            version = migration.version,
            name = migration.name,
            "sqlite migration applied"
        );
    }
    let known = MIGRATIONS.iter().map(|migration| migration.version).max();
    if let Some(newest) = applied.iter().max()
        && Some(*newest) > known
    {
        warn!(
            version = newest,
            "state store was migrated by a newer coordinator"
        );
    }
    let fresh: [u8; 32] = rand::random();
    tx.execute(
        "INSERT INTO settings (name, value) VALUES ('token_secret', ?1)
         ON CONFLICT (name) DO NOTHING",
        [fresh.as_slice()],
    )
    .map_err(sql_error("create token secret"))?;
    let stored: Option<Vec<u8>> = tx
        .query_row(
            "SELECT value FROM settings WHERE name = 'token_secret'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql_error("read token secret"))?;
    let secret: [u8; 32] = stored
        .ok_or_else(|| CoordinatorError::corrupt("token_secret", "missing"))?
        .try_into()
        .map_err(|_| CoordinatorError::corrupt("token_secret", "not 32 bytes"))?;
    tx.commit().map_err(sql_error("commit migration"))?;
    Ok(secret)
}
