//! Restores into a SQLite target: checking (or creating) the target table,
//! opening imports, and `replace` mode's staging tables and final swap.
//!
//! Every call that writes resolves the key type against the *target* table
//! first, whatever the archived spec says. Writers serialise on SQLite's
//! database lock (`BEGIN IMMEDIATE`, waiting up to the busy timeout).

use koan_protocol::commands::RestoreMode;
use koan_protocol::jobs::RestoreTarget;
use koan_protocol::plan::{EntitySpec, KeyType};
use rusqlite::Connection;

use crate::error::{SourceError, sqlite};
use crate::rows::ApplyOutcome;
use crate::sqlite::SqliteSource;
use crate::sqlite::catalog;
use crate::sqlite::connection::{Access, blocking, open};
use crate::sqlite::import::{Destination, Importer, SqliteImportSession};
use crate::sqlite::isolate::{Written, write_rows};
use crate::sqlite::merge::{self, MergePlan, RowsFrom, STAGING_EXISTS, WriteTo, invalid_plan};
use crate::staging::{check_staging_name, staging_table_name};

impl SqliteSource {
    /// Restore target check: returns `entity` with `key_type` resolved against
    /// the target table.
    ///
    /// A missing database file is created, and a missing table too: the key
    /// (`INTEGER` for numeric archived keys, else `TEXT`) as primary key, a
    /// `TEXT NOT NULL` document, an untyped version column and a `TEXT` scope
    /// column when the entity has them. Safe when workers race
    /// (`CREATE TABLE IF NOT EXISTS` under the database lock).
    pub async fn prepare_target(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        catalog::check_supported(entity)?;
        let entity = entity.clone();
        self.run(Access::Create, "prepare target", move |connection| {
            match catalog::inspect(connection, &entity) {
                Err(SourceError::MissingTable { .. }) => {
                    let statement = merge::create_target_statement(&entity)?;
                    connection.execute_batch(&statement).map_err(|error| {
                        sqlite(
                            format!("create table {} for entity {}", entity.table, entity.name),
                            error,
                        )
                    })?;
                    tracing::info!(entity = %entity.name, table = %entity.table, "created the missing target table");
                    catalog::inspect(connection, &entity)
                }
                other => other,
            }
        })
        .await
    }

    /// `replace` mode: creates (idempotently, safe when workers race) the
    /// staging table of this restore and entity, and returns its name
    /// (`koan_stage_<operation>_<entity>`).
    pub async fn create_staging(
        &self,
        entity: &EntitySpec,
        operation_id: uuid::Uuid,
    ) -> Result<String, SourceError> {
        let entity = entity.clone();
        self.run(Access::Write, "create staging", move |connection| {
            let key_type = target_key_type(connection, &entity)?;
            let table = staging_table_name(&entity.name, operation_id);
            let statement = merge::create_staging_statement(&table, key_type)?;
            connection.execute_batch(&statement).map_err(|error| {
                sqlite(
                    format!("create staging table {table} for entity {}", entity.name),
                    error,
                )
            })?;
            Ok(table)
        })
        .await
    }

    /// Starts importing one part (or a replay batch), in one transaction.
    ///
    /// `target.mode` says how rows are reconciled; with `target.staging_table`
    /// they go to that `replace` staging table instead. `replace` without a
    /// staging table is refused (replays of a `replace` restore use `overwrite`).
    pub async fn begin_import(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
    ) -> Result<SqliteImportSession, SourceError> {
        let destination = match (&target.staging_table, target.mode) {
            (Some(table), _) => {
                check_staging_name(table)?;
                Destination::Staging(table.clone())
            }
            (None, RestoreMode::Replace) => {
                return Err(invalid_plan(
                    entity,
                    "replace mode imports into a staging table, and none is given",
                ));
            }
            (None, mode) => Destination::Target(mode),
        };
        let context = match &destination {
            Destination::Target(mode) => {
                format!("import of entity {} ({})", entity.name, mode.as_str())
            }
            Destination::Staging(table) => format!("import of entity {} into {table}", entity.name),
        };
        let permit = self.permits.acquire().await?;
        let path = std::sync::Arc::clone(&self.path);
        let entity = entity.clone();
        let target_scope = target.target_scope.clone();
        let setup_context = context.clone();
        let importer = blocking(&context, move || {
            let connection = open(&path, Access::Write)?;
            let plan = target_plan(&connection, &entity, target_scope.as_deref())?;
            Importer::new(connection, plan, permit, &setup_context)
        })
        .await?;
        Ok(SqliteImportSession::new(importer, destination, context))
    }

    /// `replace` mode, in one transaction: deletes the scope's rows from the
    /// target (scope: `target.target_scope`, else the entity's; every row when
    /// unscoped), inserts the staged rows (failing rows isolated), drops the
    /// staging table. Any other failure leaves the target as it was. Once it
    /// has succeeded, the staging table is gone and running it again returns
    /// zero counts; concurrent runs are serialised by the database lock.
    pub async fn apply_staged(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
    ) -> Result<ApplyOutcome, SourceError> {
        let Some(staging) = target.staging_table.clone() else {
            return Err(invalid_plan(entity, "apply_staged needs the staging table"));
        };
        check_staging_name(&staging)?;
        let entity = entity.clone();
        let target_scope = target.target_scope.clone();
        self.run(Access::Write, "apply staged rows", move |connection| {
            let context = format!("apply of entity {} from {staging}", entity.name);
            let plan = target_plan(connection, &entity, target_scope.as_deref())?;
            connection
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(|error| sqlite(&context, error))?;
            let applied = apply_on(connection, &plan, &staging, &context);
            match &applied {
                Ok(Some(_)) => connection
                    .execute_batch("COMMIT")
                    .map_err(|error| sqlite(&context, error))?,
                _ => {
                    let _ = connection.execute_batch("ROLLBACK");
                }
            }
            match applied? {
                Some(outcome) => {
                    tracing::info!(
                        context,
                        written = outcome.rows_written,
                        removed = outcome.rows_removed,
                        failed = outcome.failures.len(),
                        "staged rows applied"
                    );
                    Ok(outcome)
                }
                None => {
                    tracing::debug!(context, "staging table gone: already applied");
                    Ok(ApplyOutcome::default())
                }
            }
        })
        .await
    }

    /// Drops a staging table if it exists (only `koan_stage_*` names are accepted).
    pub async fn drop_staging(&self, entity: &EntitySpec, table: &str) -> Result<(), SourceError> {
        catalog::check_supported(entity)?;
        let statement = merge::drop_staging_statement(table)?;
        let context = format!("drop staging table {table}");
        self.run(Access::Write, "drop staging", move |connection| {
            connection
                .execute_batch(&statement)
                .map_err(|error| sqlite(context, error))
        })
        .await
    }
}

/// The swap, inside the caller's write transaction; `None` when the staging table is gone.
fn apply_on(
    connection: &Connection,
    plan: &MergePlan,
    staging: &str,
    context: &str,
) -> Result<Option<ApplyOutcome>, SourceError> {
    let query = |error| sqlite(context, error);
    let exists: i64 = connection
        .query_row(STAGING_EXISTS, [staging], |row| row.get(0))
        .map_err(query)?;
    if exists == 0 {
        return Ok(None);
    }
    let rows_removed = {
        let mut statement = connection
            .prepare(&plan.delete_scope_statement())
            .map_err(query)?;
        if let Some(index) = statement.parameter_index(":scope").map_err(query)? {
            statement
                .raw_bind_parameter(index, plan.scope())
                .map_err(query)?;
        }
        statement.raw_execute().map_err(query)?
    };
    let rows = RowsFrom::Staging(staging);
    let (lowest, highest): (Option<i64>, Option<i64>) = connection
        .query_row(&plan.bounds_statement(rows), [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .map_err(query)?;
    let written = match (lowest, highest) {
        (Some(lowest), Some(highest)) => {
            let to = WriteTo::Target(RestoreMode::Replace);
            let range = (lowest, highest.saturating_add(1));
            write_rows(connection, plan, rows, to, range, context)?
        }
        _ => Written::default(),
    };
    connection
        .execute_batch(&merge::drop_staging_statement(staging)?)
        .map_err(query)?;
    Ok(Some(ApplyOutcome {
        rows_written: written.rows_written,
        // Keys are unique in a SQLite staging table: a second copy was skipped when staged.
        rows_skipped: 0,
        rows_removed: rows_removed as u64,
        failures: written.failures,
    }))
}

/// The write statements of `entity` into its target table, against the target's schema.
fn target_plan(
    connection: &Connection,
    entity: &EntitySpec,
    target_scope: Option<&str>,
) -> Result<MergePlan, SourceError> {
    let key_type = target_key_type(connection, entity)?;
    MergePlan::new(entity, key_type, target_scope)
}

/// The key type of the target's table (checks the table and its columns too).
fn target_key_type(connection: &Connection, entity: &EntitySpec) -> Result<KeyType, SourceError> {
    catalog::inspect(connection, entity)?
        .key_type
        .ok_or_else(|| SourceError::UnsupportedKeyType {
            table: format!("{}.{}", entity.schema, entity.table),
            column: entity.key.clone(),
            sql_type: "unknown".into(),
        })
}
