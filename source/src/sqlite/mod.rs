//! The SQLite source: Koan-layout entities in one SQLite database file, read
//! for backups and written by restores, with the same operations (and, where
//! SQLite can, the same results) as the PostgreSQL source.
//!
//! # Layout
//! - `url`: `sqlite:///absolute/path.db` and `sqlite://relative/path.db`.
//! - `connection`: opening connections (busy timeout, foreign keys, functions)
//!   and running blocking calls off the async runtime.
//! - `functions`: SQL functions giving scopes and versions PostgreSQL's
//!   meaning (`->>`, `#>`, `to_jsonb`, `jsonb` ordering).
//! - `catalog`: [`SqliteSource::inspect`] against `sqlite_schema` and the
//!   table pragmas.
//! - `sql`: the export and planning statements, names checked and quoted,
//!   values bound.
//! - `ranges`: [`RangePlan`] boundaries by ranking, as in PostgreSQL.
//! - `stream`: [`SqliteRowStream`], a reader thread feeding a bounded channel.
//! - `restore`: [`SqliteSource::prepare_target`], [`SqliteSource::begin_import`],
//!   `replace` mode's staging tables and swap.
//! - `import`: [`SqliteImportSession`], one import staged in a `TEMP` table
//!   and merged in one write transaction.
//! - `merge`: the restore statements per mode.
//! - `isolate`: row isolation, splitting a failing range as PostgreSQL's does.
//!
//! What SQLite cannot do: share a snapshot between processes (so no
//! `snapshot` consistency: [`SqliteSource::open_snapshot`] and an export with
//! a snapshot id are refused), and the relational layout (refused). See
//! `design.md` for the rest.
//!
//! Connections: at most `max_connections` open at once. Each live
//! [`SqliteRowStream`] and each open [`SqliteImportSession`] holds one;
//! every other call holds one while it runs.

mod catalog;
mod connection;
mod functions;
mod import;
mod isolate;
mod merge;
mod ranges;
mod restore;
mod sql;
mod stream;
mod url;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::Status;
use koan_protocol::archive::KeyRange;
use koan_protocol::plan::EntitySpec;

use crate::capabilities::AdapterCapabilities;
use crate::error::SourceError;
use crate::postgres::SnapshotHolder;
use crate::ranges::RangePlan;

pub use import::SqliteImportSession;
pub use stream::{BATCH_BYTES, BATCH_ROWS, CHANNEL_BATCHES, SqliteRowStream};

use connection::{Access, Permits, blocking, open};
use stream::ExportRequest;

/// An entity source backed by one SQLite database file.
///
/// Cheap to clone: clones share the connection limit. Building one opens
/// nothing; each call opens its own connection.
#[derive(Clone)]
pub struct SqliteSource {
    path: Arc<PathBuf>,
    target: String,
    permits: Permits,
}

impl fmt::Debug for SqliteSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SqliteSource")
            .field("target", &self.target)
            .field("max_connections", &self.permits.max())
            .field("in_use", &self.permits.in_use())
            .finish()
    }
}

impl SqliteSource {
    /// A source over the database file named by a `sqlite://` URL, with at most
    /// `max_connections` connections open at once (no file is opened yet).
    ///
    /// `sqlite:///var/lib/app.db` is an absolute path; `sqlite://app.db` is
    /// relative to the working directory, resolved now. The path is
    /// percent-decoded; a query string, a fragment and `:memory:` are refused.
    pub fn new(url: &str, max_connections: usize) -> Result<Self, SourceError> {
        let path = url::parse_url(url)?;
        let permits = Permits::new(max_connections)?;
        Ok(Self {
            target: path.display().to_string(),
            path: Arc::new(path),
            permits,
        })
    }

    /// Whether `url` is a `sqlite://` URL.
    pub fn accepts_url(url: &str) -> bool {
        url::is_sqlite_url(url)
    }

    /// What this adapter can do: no shared snapshot, no bulk protocol.
    pub fn capabilities(&self) -> AdapterCapabilities {
        AdapterCapabilities::SQLITE
    }

    /// The database file, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connection occupancy, in the pool's terms: `max_size` is the limit,
    /// `size` the connections open now; none are kept idle.
    pub fn pool_status(&self) -> Status {
        let in_use = self.permits.in_use();
        Status {
            max_size: self.permits.max(),
            size: in_use,
            available: 0,
            waiting: 0,
        }
    }

    /// Checks the entity against the schema and returns it with `key_type` resolved.
    ///
    /// Errors name the table and column: a missing table, a missing key,
    /// document, version or scope column, a key that is not the primary key
    /// alone nor a not-null column with a unique index, a key without INTEGER
    /// or TEXT affinity, a document column that is not text or JSON. The
    /// relational layout and schemas other than `public`/`main` are
    /// [`SourceError::NotSupported`].
    pub async fn inspect(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        let entity = entity.clone();
        self.run(Access::Read, "inspect", move |connection| {
            catalog::inspect(connection, &entity)
        })
        .await
    }

    /// Refused: a SQLite read transaction belongs to one connection of one
    /// process, so no snapshot can be shared with other workers
    /// ([`SourceError::Unsupported`], as `AdapterCapabilities::check` says for
    /// `snapshot` consistency).
    pub async fn open_snapshot(&self) -> Result<SnapshotHolder, SourceError> {
        Err(no_shared_snapshot())
    }

    /// Per-chunk consistency: counts and chooses ranges in one read transaction.
    pub async fn plan_ranges(&self, entity: &EntitySpec) -> Result<RangePlan, SourceError> {
        let entity = entity.clone();
        self.run(Access::Read, "plan ranges", move |connection| {
            ranges::plan_on(connection, &entity)
        })
        .await
    }

    /// Streams the rows of `range` (`lo` inclusive, `hi` exclusive, `None`
    /// unbounded) in key order, starting strictly after `after_key` when given.
    ///
    /// The range is read by one statement, from one consistent state of the
    /// database. A `snapshot_id` is refused ([`SourceError::Unsupported`]):
    /// SQLite has no snapshot to share. An entity whose `key_type` is not
    /// resolved yet is inspected first.
    pub async fn export(
        &self,
        entity: &EntitySpec,
        range: &KeyRange,
        after_key: Option<&str>,
        snapshot_id: Option<&str>,
    ) -> Result<SqliteRowStream, SourceError> {
        if snapshot_id.is_some() {
            return Err(no_shared_snapshot());
        }
        let context = format!(
            "export of entity {} range [{}, {})",
            entity.name,
            range.lo.as_deref().unwrap_or("-inf"),
            range.hi.as_deref().unwrap_or("+inf"),
        );
        let permit = self.permits.acquire().await?;
        let request = ExportRequest {
            path: self.path.as_ref().clone(),
            entity: entity.clone(),
            range: range.clone(),
            after_key: after_key.map(str::to_string),
            context,
        };
        SqliteRowStream::start(request, permit).await
    }

    /// Opens a connection and runs `work` on it off the async runtime, holding a connection slot.
    async fn run<T, F>(&self, access: Access, what: &str, work: F) -> Result<T, SourceError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> Result<T, SourceError> + Send + 'static,
    {
        let permit = self.permits.acquire().await?;
        let path = Arc::clone(&self.path);
        let context = format!("{what} on {}", self.target);
        blocking(&context, move || {
            let _permit = permit;
            let mut connection = open(&path, access)?;
            work(&mut connection)
        })
        .await
    }
}

/// What SQLite says to `snapshot` consistency.
fn no_shared_snapshot() -> SourceError {
    SourceError::Unsupported {
        consistency: "snapshot",
        capability: "shared_snapshot",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows::{ApplyOutcome, ExportRow, ImportLine, ImportOutcome};

    /// Workers move streams and sessions across tasks: everything must be `Send`.
    #[test]
    fn handles_and_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<SqliteSource>();
        send_sync::<ExportRow>();
        send_sync::<ImportOutcome>();
        send_sync::<ApplyOutcome>();

        // Type-checked, never run.
        #[allow(dead_code)]
        async fn futures(source: SqliteSource, entity: EntitySpec, mut stream: SqliteRowStream) {
            send(&source.inspect(&entity));
            send(&source.plan_ranges(&entity));
            send(&source.open_snapshot());
            send(&source.export(&entity, &KeyRange::default(), None, None));
            send(&stream.next());
            send(&stream);
            let target = koan_protocol::jobs::RestoreTarget {
                mode: koan_protocol::commands::RestoreMode::Merge,
                target_scope: None,
                staging_table: None,
            };
            send(&source.prepare_target(&entity));
            send(&source.create_staging(&entity, uuid::Uuid::nil()));
            send(&source.drop_staging(&entity, "koan_stage_x"));
            send(&source.apply_staged(&entity, &target));
            send(&source.begin_import(&entity, &target));
            if let Ok(mut session) = source.begin_import(&entity, &target).await {
                send(&session);
                let line = ImportLine {
                    line_no: 1,
                    part: "p",
                    key: "k",
                    version: None,
                    doc: "{}",
                    raw: "{}",
                };
                send(&session.push(&line));
                send(&session.commit());
            }
            if let Ok(session) = source.begin_import(&entity, &target).await {
                send(&session.abort());
            }
        }
    }

    #[test]
    fn builds_without_touching_the_file() {
        let source = SqliteSource::new("sqlite:///nonexistent/dir/app.db", 3).expect("source");
        assert_eq!(source.target(), "/nonexistent/dir/app.db");
        assert_eq!(source.pool_status().max_size, 3);
        assert!(SqliteSource::new("sqlite:///x.db", 0).is_err());
        assert!(SqliteSource::accepts_url("sqlite:///x.db"));
        assert!(!SqliteSource::accepts_url("postgresql://h/db"));
    }
}
