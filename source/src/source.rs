//! [`Source`]: one type for either backend, chosen by the URL's scheme, with
//! [`PgSource`]'s methods (same names, same signatures), so code written
//! against `PgSource` switches by renaming the types:
//!
//! | PostgreSQL only | either backend |
//! |---|---|
//! | [`PgSource`] | [`Source`] |
//! | [`RowStream`] | [`SourceRowStream`] |
//! | [`ImportSession`] | [`SourceImportSession`] |
//! | [`SnapshotHolder`] | [`SnapshotHolder`] (only PostgreSQL opens one) |

use deadpool_postgres::Status;
use koan_protocol::archive::KeyRange;
use koan_protocol::jobs::RestoreTarget;
use koan_protocol::plan::EntitySpec;

use crate::capabilities::AdapterCapabilities;
use crate::error::SourceError;
use crate::postgres::{ImportSession, PgSource, RowStream, SnapshotHolder};
use crate::ranges::RangePlan;
use crate::rows::{ApplyOutcome, ExportRow, ImportLine, ImportOutcome, StagingForm};
use crate::sqlite::{SqliteImportSession, SqliteRowStream, SqliteSource};

/// An entity source: PostgreSQL or SQLite. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Source {
    /// A PostgreSQL database, through a connection pool (boxed: it is much
    /// larger than a SQLite source).
    Postgres(Box<PgSource>),
    /// A SQLite database file.
    Sqlite(SqliteSource),
}

/// Which backend a [`Source`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

impl Backend {
    /// `postgresql` or `sqlite`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgresql",
            Self::Sqlite => "sqlite",
        }
    }
}

impl Source {
    /// A source for `url`, with at most `max_connections` connections (none is
    /// made yet): `sqlite://...` is a [`SqliteSource`]; anything else
    /// (`postgres://`, `postgresql://`, a `key=value` string) a [`PgSource`].
    pub fn from_url(url: &str, max_connections: usize) -> Result<Self, SourceError> {
        // `sqlite:app.db` (no `//`) is a SQLite URL too: its error says the form.
        let sqlite_scheme = url
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("sqlite:"));
        if sqlite_scheme || SqliteSource::accepts_url(url) {
            SqliteSource::new(url, max_connections).map(Self::Sqlite)
        } else {
            PgSource::new(url, max_connections).map(Self::from)
        }
    }

    /// The same as [`Source::from_url`], named as [`PgSource::new`].
    pub fn new(url: &str, max_connections: usize) -> Result<Self, SourceError> {
        Self::from_url(url, max_connections)
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// What this adapter can do.
    pub fn capabilities(&self) -> AdapterCapabilities {
        match self {
            Self::Postgres(source) => source.capabilities(),
            Self::Sqlite(source) => source.capabilities(),
        }
    }

    /// `host:port/database as user`, or the SQLite file, for logs (never a password).
    pub fn target(&self) -> &str {
        match self {
            Self::Postgres(source) => source.target(),
            Self::Sqlite(source) => source.target(),
        }
    }

    /// Connection occupancy, for metrics.
    pub fn pool_status(&self) -> Status {
        match self {
            Self::Postgres(source) => source.pool_status(),
            Self::Sqlite(source) => source.pool_status(),
        }
    }

    /// Checks the entity against the catalog and returns it with `key_type` resolved.
    pub async fn inspect(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        match self {
            Self::Postgres(source) => source.inspect(entity).await,
            Self::Sqlite(source) => source.inspect(entity).await,
        }
    }

    /// Opens a snapshot other workers can read (PostgreSQL); SQLite refuses
    /// with [`SourceError::Unsupported`].
    pub async fn open_snapshot(&self) -> Result<SnapshotHolder, SourceError> {
        match self {
            Self::Postgres(source) => source.open_snapshot().await,
            Self::Sqlite(source) => source.open_snapshot().await,
        }
    }

    /// Per-chunk consistency: counts and chooses ranges in a transaction of their own.
    pub async fn plan_ranges(&self, entity: &EntitySpec) -> Result<RangePlan, SourceError> {
        match self {
            Self::Postgres(source) => source.plan_ranges(entity).await,
            Self::Sqlite(source) => source.plan_ranges(entity).await,
        }
    }

    /// Streams the rows of `range` in key order, after `after_key` when given,
    /// inside `snapshot_id` when given (PostgreSQL only).
    pub async fn export(
        &self,
        entity: &EntitySpec,
        range: &KeyRange,
        after_key: Option<&str>,
        snapshot_id: Option<&str>,
    ) -> Result<SourceRowStream, SourceError> {
        match self {
            Self::Postgres(source) => source
                .export(entity, range, after_key, snapshot_id)
                .await
                .map(|stream| SourceRowStream::Postgres(Box::new(stream))),
            Self::Sqlite(source) => source
                .export(entity, range, after_key, snapshot_id)
                .await
                .map(SourceRowStream::Sqlite),
        }
    }

    /// Restore target check (creating a missing Koan-layout table); returns
    /// `entity` with the target's `key_type`.
    pub async fn prepare_target(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        match self {
            Self::Postgres(source) => source.prepare_target(entity).await,
            Self::Sqlite(source) => source.prepare_target(entity).await,
        }
    }

    /// `replace` mode: creates the staging table of this restore and entity; returns its name.
    pub async fn create_staging(
        &self,
        entity: &EntitySpec,
        operation_id: uuid::Uuid,
    ) -> Result<String, SourceError> {
        match self {
            Self::Postgres(source) => source.create_staging(entity, operation_id).await,
            Self::Sqlite(source) => source.create_staging(entity, operation_id).await,
        }
    }

    /// `replace` mode, when a restore is planned: checks the target (a
    /// missing one is created, or, in PostgreSQL, replaced by a load table
    /// renamed into place at the apply) and creates the staging table;
    /// returns `entity` with the target's key type, and the staging table.
    pub async fn prepare_replace(
        &self,
        entity: &EntitySpec,
        operation_id: uuid::Uuid,
        target_scope: Option<&str>,
    ) -> Result<(EntitySpec, String), SourceError> {
        match self {
            Self::Postgres(source) => {
                source
                    .prepare_replace(entity, operation_id, target_scope)
                    .await
            }
            Self::Sqlite(source) => {
                let prepared = source.prepare_target(entity).await?;
                let table = source.create_staging(entity, operation_id).await?;
                Ok((prepared, table))
            }
        }
    }

    /// Starts importing one part (or a replay batch), in one transaction;
    /// `form` says how a PostgreSQL `replace` import stages the part.
    pub async fn begin_import(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
        form: StagingForm,
    ) -> Result<SourceImportSession, SourceError> {
        match self {
            Self::Postgres(source) => source
                .begin_import(entity, target, form)
                .await
                .map(SourceImportSession::Postgres),
            Self::Sqlite(source) => source
                .begin_import(entity, target)
                .await
                .map(SourceImportSession::Sqlite),
        }
    }

    /// `replace` mode: replaces the scope's rows with the staged ones, in one transaction.
    pub async fn apply_staged(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
    ) -> Result<ApplyOutcome, SourceError> {
        match self {
            Self::Postgres(source) => source.apply_staged(entity, target).await,
            Self::Sqlite(source) => source.apply_staged(entity, target).await,
        }
    }

    /// Drops a staging table if it exists (only `koan_stage_*` names are accepted).
    pub async fn drop_staging(&self, entity: &EntitySpec, table: &str) -> Result<(), SourceError> {
        match self {
            Self::Postgres(source) => source.drop_staging(entity, table).await,
            Self::Sqlite(source) => source.drop_staging(entity, table).await,
        }
    }
}

impl From<PgSource> for Source {
    fn from(source: PgSource) -> Self {
        Self::Postgres(Box::new(source))
    }
}

impl From<SqliteSource> for Source {
    fn from(source: SqliteSource) -> Self {
        Self::Sqlite(source)
    }
}

/// The rows of one key range, in key order, from either backend.
#[derive(Debug)]
pub enum SourceRowStream {
    /// A PostgreSQL `COPY` stream (boxed: it holds the parser's state).
    Postgres(Box<RowStream>),
    /// A SQLite reader thread.
    Sqlite(SqliteRowStream),
}

impl SourceRowStream {
    /// Next row, or `None` at the end of the range; after an error every later call fails too.
    pub async fn next(&mut self) -> Result<Option<ExportRow>, SourceError> {
        match self {
            Self::Postgres(stream) => stream.next().await,
            Self::Sqlite(stream) => stream.next().await,
        }
    }

    /// Rows handed out so far.
    pub fn rows(&self) -> u64 {
        match self {
            Self::Postgres(stream) => stream.rows(),
            Self::Sqlite(stream) => stream.rows(),
        }
    }

    /// Bytes received from the backend so far.
    pub fn bytes_received(&self) -> u64 {
        match self {
            Self::Postgres(stream) => stream.bytes_received(),
            Self::Sqlite(stream) => stream.bytes_received(),
        }
    }
}

/// One import in progress, on either backend: end it with
/// [`commit`](Self::commit) or [`abort`](Self::abort); dropped, nothing is written.
#[derive(Debug)]
pub enum SourceImportSession {
    /// A PostgreSQL `COPY` into a `TEMP` table.
    Postgres(ImportSession),
    /// A SQLite `TEMP` table.
    Sqlite(SqliteImportSession),
}

impl SourceImportSession {
    /// Adds one row; an `Err` means the import cannot go on: abort it.
    pub async fn push(&mut self, line: &ImportLine<'_>) -> Result<(), SourceError> {
        match self {
            Self::Postgres(session) => session.push(line).await,
            Self::Sqlite(session) => session.push(line).await,
        }
    }

    /// Rows pushed so far (refused rows not counted).
    pub fn rows_staged(&self) -> u64 {
        match self {
            Self::Postgres(session) => session.rows_staged(),
            Self::Sqlite(session) => session.rows_staged(),
        }
    }

    /// Rolls back: nothing from this import is written.
    pub async fn abort(self) {
        match self {
            Self::Postgres(session) => session.abort().await,
            Self::Sqlite(session) => session.abort().await,
        }
    }

    /// Writes the rows per the target's mode (failing rows isolated) and commits.
    pub async fn commit(self) -> Result<ImportOutcome, SourceError> {
        match self {
            Self::Postgres(session) => session.commit().await,
            Self::Sqlite(session) => session.commit().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_chooses_the_backend() {
        let sqlite = Source::from_url("sqlite:///tmp/koan-x.db", 2).expect("sqlite");
        assert_eq!(sqlite.backend(), Backend::Sqlite);
        assert_eq!(sqlite.target(), "/tmp/koan-x.db");
        assert!(!sqlite.capabilities().shared_snapshot);
        let postgres =
            Source::new("postgresql://postgres@127.0.0.1:5432/app", 2).expect("postgres");
        assert_eq!(postgres.backend(), Backend::Postgres);
        assert!(postgres.capabilities().shared_snapshot);
        assert_eq!(postgres.target(), "127.0.0.1:5432/app as postgres");
        let key_value = Source::new("host=127.0.0.1 user=postgres dbname=app", 1).expect("kv");
        assert_eq!(key_value.backend(), Backend::Postgres);
        assert_eq!(
            Source::from_url("sqlite://", 1)
                .expect_err("no path")
                .code(),
            "config"
        );
        let error = Source::from_url("sqlite:app.db", 1).expect_err("no //");
        assert!(error.to_string().contains("sqlite:///absolute"), "{error}");
        assert_eq!(Backend::Sqlite.as_str(), "sqlite");
    }

    /// Workers move streams and sessions across tasks: everything must be `Send`.
    #[test]
    fn handles_and_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Source>();

        // Type-checked, never run.
        #[allow(dead_code)]
        async fn futures(source: Source, entity: EntitySpec, mut stream: SourceRowStream) {
            send(&source.inspect(&entity));
            send(&source.plan_ranges(&entity));
            send(&source.open_snapshot());
            send(&source.export(&entity, &KeyRange::default(), None, None));
            send(&stream.next());
            send(&stream);
            let target = RestoreTarget {
                mode: koan_protocol::commands::RestoreMode::Merge,
                target_scope: None,
                staging_table: None,
            };
            send(&source.prepare_target(&entity));
            send(&source.create_staging(&entity, uuid::Uuid::nil()));
            send(&source.prepare_replace(&entity, uuid::Uuid::nil(), None));
            send(&source.drop_staging(&entity, "koan_stage_x"));
            send(&source.apply_staged(&entity, &target));
            if let Ok(mut session) = source
                .begin_import(&entity, &target, crate::StagingForm::Typed)
                .await
            {
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
            if let Ok(session) = source
                .begin_import(&entity, &target, crate::StagingForm::Typed)
                .await
            {
                send(&session.abort());
            }
        }
    }
}
