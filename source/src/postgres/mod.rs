//! The PostgreSQL source: catalog checks, exported snapshots, key-range
//! planning and `COPY` streaming of entities.
//!
//! # Layout
//! - `session`: connection string, pool, per-session settings, and
//!   the pooled session that is discarded if dropped inside a transaction.
//! - `catalog`: [`PgSource::inspect`] against `pg_catalog`.
//! - `sql`: every statement's text, names checked and quoted, literals quoted.
//! - `ranges`: the ranking query that picks [`RangePlan`] boundaries.
//! - `snapshot`: [`SnapshotHolder`], the transaction that keeps a snapshot importable.
//! - `stream` and `copy`: [`RowStream`] and its binary `COPY` parser.
//! - `restore`: restores into this database: [`PgSource::prepare_target`],
//!   [`PgSource::begin_import`], `replace` mode's staging tables and swap.
//! - `import`: [`ImportSession`], one import transaction fed by binary `COPY`.
//! - `load`: `replace` into a missing table, through a load table renamed into place.
//! - `merge`: every restore statement's text (merge per mode, staging, swap).
//! - `isolate`: row isolation, finding the rows a set-based write fails on.
//!
//! Connections: a [`PgSource`] pool of `max_connections`; each [`RowStream`]
//! holds one pooled connection until it ends or is dropped; `inspect` and
//! `plan_ranges` hold one briefly; each [`SnapshotHolder`] holds one more
//! dedicated connection outside the pool; each [`ImportSession`] holds one
//! pooled connection until it commits or aborts; the other restore calls hold
//! one while they run.

mod catalog;
mod copy;
mod import;
mod isolate;
mod load;
mod merge;
mod ranges;
mod restore;
mod session;
mod snapshot;
mod sql;
mod stream;

use std::fmt;

use deadpool_postgres::{Pool, Status};
use koan_protocol::archive::KeyRange;
use koan_protocol::plan::EntitySpec;
use tokio_postgres::Config;

use crate::capabilities::AdapterCapabilities;
use crate::error::SourceError;

pub use crate::ranges::{MAX_CHUNK_BYTES, RangePlan, ranges_from_boundaries, rows_per_chunk};
pub use crate::rows::{ApplyOutcome, ExportRow, ImportLine, ImportOutcome};
pub use import::{FLUSH_BYTES, ImportSession};
pub use snapshot::SnapshotHolder;
pub use stream::RowStream;

use session::Session;
use sql::EntitySql;

/// An entity source backed by one PostgreSQL database, through a connection pool.
///
/// Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PgSource {
    pool: Pool,
    config: Config,
    target: String,
}

impl fmt::Debug for PgSource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PgSource")
            .field("target", &self.target)
            .field("pool", &self.pool.status())
            .finish_non_exhaustive()
    }
}

impl PgSource {
    /// Builds a pool of at most `max_connections` (no connection is made yet).
    /// Accepts `postgres://` / `postgresql://` URLs and `key=value` strings.
    pub fn new(url: &str, max_connections: usize) -> Result<Self, SourceError> {
        let config = session::parse_config(url)?;
        let target = session::describe_target(&config);
        let pool = session::build_pool(config.clone(), max_connections)?;
        Ok(Self {
            pool,
            config,
            target,
        })
    }

    /// What this adapter can do: PostgreSQL can do everything.
    pub fn capabilities(&self) -> AdapterCapabilities {
        AdapterCapabilities::POSTGRES
    }

    /// The server as `host:port/database as user`, for logs (never the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Pool occupancy, for metrics.
    pub fn pool_status(&self) -> Status {
        self.pool.status()
    }

    /// Checks the entity against the catalog and returns it with `key_type` resolved.
    ///
    /// Errors name the schema, table and column: a missing table, a missing
    /// key, document, version or scope column, a key that is not a
    /// single-column primary key or unique not-null column, a key type other
    /// than text/varchar/uuid/bigint/integer, a document column (Koan layout)
    /// other than json/jsonb/text.
    pub async fn inspect(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        let session = Session::checkout(&self.pool, &self.target).await?;
        catalog::inspect(session.client(), entity).await
    }

    /// Opens a `REPEATABLE READ READ ONLY` transaction on a dedicated connection
    /// and exports its snapshot.
    pub async fn open_snapshot(&self) -> Result<SnapshotHolder, SourceError> {
        SnapshotHolder::open(&self.config, &self.target).await
    }

    /// Per-chunk consistency: counts and chooses ranges in a fresh `REPEATABLE READ` transaction.
    pub async fn plan_ranges(&self, entity: &EntitySpec) -> Result<RangePlan, SourceError> {
        let mut session = Session::checkout(&self.pool, &self.target).await?;
        session.begin(None).await?;
        match ranges::plan_on(session.client(), entity).await {
            Ok(plan) => {
                session.commit().await?;
                Ok(plan)
            }
            Err(error) => {
                session.abort().await;
                Err(error)
            }
        }
    }

    /// Streams the rows of `range` (`lo` inclusive, `hi` exclusive, `None`
    /// unbounded) in key order, starting strictly after `after_key` when given.
    ///
    /// With `snapshot_id` the rows are read inside that exported snapshot
    /// (`SET TRANSACTION SNAPSHOT`; [`SourceError::SnapshotLost`] when its
    /// holder is gone), else in a `REPEATABLE READ` transaction of their own.
    /// An entity whose `key_type` is not resolved yet is inspected first.
    pub async fn export(
        &self,
        entity: &EntitySpec,
        range: &KeyRange,
        after_key: Option<&str>,
        snapshot_id: Option<&str>,
    ) -> Result<RowStream, SourceError> {
        let key_type = match entity.key_type {
            Some(key_type) => key_type,
            None => {
                tracing::debug!(entity = %entity.name, "key type unresolved, inspecting");
                let inspected = self.inspect(entity).await?;
                inspected
                    .key_type
                    .ok_or_else(|| SourceError::UnsupportedKeyType {
                        table: format!("{}.{}", entity.schema, entity.table),
                        column: entity.key.clone(),
                        sql_type: "unknown".into(),
                    })?
            }
        };
        let statement = EntitySql::new(entity)?.copy_statement(key_type, range, after_key)?;
        let context = format!(
            "export of entity {} range [{}, {})",
            entity.name,
            range.lo.as_deref().unwrap_or("-inf"),
            range.hi.as_deref().unwrap_or("+inf"),
        );
        let mut session = Session::checkout(&self.pool, &self.target).await?;
        if let Err(error) = session.begin(snapshot_id).await {
            session.abort().await;
            return Err(error);
        }
        RowStream::start(session, &statement, context).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers move streams and holders across tasks: everything must be `Send`.
    #[test]
    fn handles_and_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<PgSource>();
        send_sync::<SnapshotHolder>();
        send_sync::<ExportRow>();
        send_sync::<ImportOutcome>();
        send_sync::<ApplyOutcome>();

        // Type-checked, never run.
        #[allow(dead_code)]
        async fn futures(source: PgSource, entity: EntitySpec, mut stream: RowStream) {
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
            send(&source.prepare_replace(&entity, uuid::Uuid::nil(), None));
            send(&source.drop_staging(&entity, "koan_stage_x"));
            send(&source.apply_staged(&entity, &target));
            send(&source.begin_import(&entity, &target, crate::StagingForm::Typed));
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
            if let Ok(holder) = source.open_snapshot().await {
                send(&holder.plan_ranges(&entity));
                send(&holder.is_alive());
                send(&holder.release());
            }
        }
    }
}
