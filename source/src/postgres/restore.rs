//! Restores into a PostgreSQL target: checking (or creating) the target table,
//! opening imports, and `replace` mode's staging tables, load tables
//! (`load.rs`) and final swap.
//!
//! Every statement that writes the target resolves the key type and columns
//! against the *target* catalog first, whatever the archived spec says.

use koan_protocol::ProtocolError;
use koan_protocol::commands::RestoreMode;
use koan_protocol::jobs::RestoreTarget;
use koan_protocol::names::quote_ident;
use koan_protocol::plan::{EntitySpec, KeyType, Layout};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::error::SourceError;
use crate::postgres::PgSource;
use crate::postgres::catalog;
use crate::postgres::import::{Destination, ImportSession};
use crate::postgres::isolate::{Written, is_row_error, write_rows};
use crate::postgres::load::{self, LoadTable};
use crate::postgres::merge::{self, COLUMNS_QUERY, MergeSql, RowsFrom};
use crate::postgres::session::Session;
use crate::rows::{ApplyOutcome, StagingForm};

/// Why a missing relational table is not created.
const RELATIONAL_HINT: &str = "a restore cannot create a relational table from an archive \
     (the archive holds rows, not the table's definition); create the table first";

impl PgSource {
    /// Restore target check: returns `entity` with `key_type` resolved against
    /// the target database.
    ///
    /// A missing Koan-layout table is created (schema too): the key with the
    /// archived key type as primary key, a `jsonb NOT NULL` document, a `jsonb`
    /// version column and a `text` scope column when the entity has them. Safe
    /// when workers race. A missing relational table is
    /// [`SourceError::MissingTable`], saying it cannot be created from an archive.
    pub async fn prepare_target(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        let session = Session::checkout(&self.pool, &self.target).await?;
        match catalog::inspect(session.client(), entity).await {
            Err(SourceError::MissingTable { schema, table, .. }) => {
                if entity.layout == Layout::Relational {
                    return Err(SourceError::MissingTable {
                        schema,
                        table,
                        hint: Some(RELATIONAL_HINT),
                    });
                }
                let context = format!("create table {schema}.{table} for entity {}", entity.name);
                for statement in merge::create_target_statements(entity)? {
                    execute_idempotent(session.client(), &statement, &context).await?;
                }
                tracing::info!(entity = %entity.name, %schema, %table, "created the missing target table");
                catalog::inspect(session.client(), entity).await
            }
            other => other,
        }
    }

    /// `replace` mode: creates (idempotently, safe when workers race) the
    /// `UNLOGGED` staging table of this restore and entity in the target's
    /// schema, and returns its name (`koan_stage_<operation>_<entity>`).
    pub async fn create_staging(
        &self,
        entity: &EntitySpec,
        operation_id: uuid::Uuid,
    ) -> Result<String, SourceError> {
        let session = Session::checkout(&self.pool, &self.target).await?;
        // The target must exist and have a usable key before rows are staged for it.
        target_key_type(session.client(), entity).await?;
        let table = merge::staging_table_name(&entity.name, operation_id);
        let statement = merge::create_staging_statement(entity, &table)?;
        let context = format!("create staging table {table} for entity {}", entity.name);
        execute_idempotent(session.client(), &statement, &context).await?;
        Ok(table)
    }

    /// `replace` mode, when a restore is planned: checks the target and
    /// creates the restore's staging table (as [`Self::create_staging`]);
    /// returns `entity` with the target's key type, and the staging table.
    ///
    /// A missing Koan-layout target whose documents are written as archived
    /// is not created: a *load table* of its final shape is, beside the
    /// staging table, and the parts are loaded into it typed; the apply
    /// renames it into place ([`Self::apply_staged`]). A missing target of
    /// any other entity is created as [`Self::prepare_target`] does.
    pub async fn prepare_replace(
        &self,
        entity: &EntitySpec,
        operation_id: uuid::Uuid,
        target_scope: Option<&str>,
    ) -> Result<(EntitySpec, String), SourceError> {
        let session = Session::checkout(&self.pool, &self.target).await?;
        let prepared = match catalog::inspect(session.client(), entity).await {
            Err(SourceError::MissingTable { .. }) if load::loadable(entity, target_scope) => {
                let table = merge::staging_table_name(&entity.name, operation_id);
                let context = format!(
                    "create load table for entity {} ({}.{} is missing)",
                    entity.name, entity.schema, entity.table
                );
                for statement in LoadTable::create_statements(entity, &table)? {
                    execute_idempotent(session.client(), &statement, &context).await?;
                }
                let statement = merge::create_staging_statement(entity, &table)?;
                let context = format!("create staging table {table} for entity {}", entity.name);
                execute_idempotent(session.client(), &statement, &context).await?;
                tracing::info!(entity = %entity.name, schema = %entity.schema, table = %entity.table,
                    "target missing: parts are loaded into a table renamed into place when applied");
                return Ok((entity.clone(), table));
            }
            Err(SourceError::MissingTable { .. }) => {
                drop(session);
                self.prepare_target(entity).await?
            }
            other => other?,
        };
        let table = self.create_staging(entity, operation_id).await?;
        Ok((prepared, table))
    }

    /// Starts importing one part (or a replay batch), in one transaction.
    ///
    /// `target.mode` says how rows are reconciled; with `target.staging_table`
    /// they go to that `replace` staging table instead, or, as `form` asks
    /// and when the restore has one, typed into its load table. `replace`
    /// without a staging table is refused (replays of a `replace` restore use
    /// `overwrite`).
    pub async fn begin_import(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
        form: StagingForm,
    ) -> Result<ImportSession, SourceError> {
        let session = Session::checkout(&self.pool, &self.target).await?;
        // With a load table the target does not exist yet: the archived key
        // type is the load table's.
        if let (Some(staging), RestoreMode::Replace) = (&target.staging_table, target.mode)
            && let Some(load) = LoadTable::new(entity, staging, target.target_scope.as_deref())?
            && load.exists(session.client()).await?
        {
            let Some(key_type) = entity.key_type else {
                return Err(invalid_plan(entity, "the archived entity has no key type"));
            };
            let sql = MergeSql::new(entity, key_type, target.target_scope.as_deref(), &[])?;
            let (context, destination) = match form {
                StagingForm::Typed => (
                    format!("import of entity {} into {}", entity.name, load.name()),
                    Destination::Load(Box::new(load), staging.clone()),
                ),
                StagingForm::Text => (
                    format!("import of entity {} into {staging}", entity.name),
                    Destination::Staging(staging.clone()),
                ),
            };
            return ImportSession::start(session, sql, destination, context).await;
        }
        let destination = match (&target.staging_table, target.mode) {
            (Some(table), _) => {
                merge::check_staging_name(table)?;
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
            Destination::Staging(table) | Destination::Load(_, table) => {
                format!("import of entity {} into {table}", entity.name)
            }
        };
        let sql = match target_sql(session.client(), entity, target).await {
            Ok(sql) => sql,
            Err(error) => {
                session.end_failed(&error).await;
                return Err(error);
            }
        };
        ImportSession::start(session, sql, destination, context).await
    }

    /// `replace` mode, in one transaction: deletes the scope's rows from the
    /// target (scope: `target.target_scope`, else the entity's; every row when
    /// unscoped), inserts the staged rows (failing rows isolated), drops the
    /// staging table. Any other failure leaves the target as it was. Once it
    /// has succeeded, the staging table is gone and running it again returns
    /// zero counts; concurrent runs are serialised by a lock on the staging table.
    ///
    /// With a load table (the target was missing when the restore was
    /// planned), the load table becomes the target instead, with its primary
    /// key, and only rows staged as text are written into it; if the target
    /// exists by then, or a key was loaded twice, the loaded rows are written
    /// like staged ones.
    pub async fn apply_staged(
        &self,
        entity: &EntitySpec,
        target: &RestoreTarget,
    ) -> Result<ApplyOutcome, SourceError> {
        let Some(staging) = target.staging_table.as_deref() else {
            return Err(invalid_plan(entity, "apply_staged needs the staging table"));
        };
        merge::check_staging_name(staging)?;
        let context = format!("apply of entity {} from {staging}", entity.name);
        let mut session = Session::checkout(&self.pool, &self.target).await?;
        if let Err(error) = session.begin_write().await {
            session.end_failed(&error).await;
            return Err(error);
        }
        match apply_in(session.client(), entity, target, staging, &context).await {
            Ok(Some(outcome)) => {
                session.commit().await?;
                tracing::info!(
                    context,
                    written = outcome.rows_written,
                    removed = outcome.rows_removed,
                    failed = outcome.failures.len(),
                    "staged rows applied"
                );
                Ok(outcome)
            }
            Ok(None) => {
                session.abort().await;
                tracing::debug!(context, "staging table gone: already applied");
                Ok(ApplyOutcome::default())
            }
            Err(error) => {
                session.end_failed(&error).await;
                Err(error)
            }
        }
    }

    /// Drops a staging table, and the load table beside it, if they exist
    /// (only `koan_stage_*` names are accepted).
    pub async fn drop_staging(&self, entity: &EntitySpec, table: &str) -> Result<(), SourceError> {
        let load = quote_ident(&load::load_table_name(table)?);
        let statement = format!(
            "{}; DROP TABLE IF EXISTS {}.{load}",
            merge::drop_staging_statement(entity, table)?,
            quote_ident(&entity.schema)
        );
        let session = Session::checkout(&self.pool, &self.target).await?;
        session
            .client()
            .batch_execute(&statement)
            .await
            .map_err(|error| SourceError::query(format!("drop staging table {table}"), error))
    }
}

/// The swap, inside the caller's transaction; `None` when the staging table is gone.
async fn apply_in(
    client: &Client,
    entity: &EntitySpec,
    target: &RestoreTarget,
    staging: &str,
    context: &str,
) -> Result<Option<ApplyOutcome>, SourceError> {
    let query = |error| SourceError::query(context, error);
    let lock = format!(
        "SET LOCAL work_mem = '64MB'; {}",
        merge::lock_staging_statement(entity, staging)?
    );
    match client.batch_execute(&lock).await {
        Ok(()) => {}
        Err(error) if error.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
        Err(error) => return Err(query(error)),
    }
    let mut loaded = None;
    if let Some(load) = LoadTable::new(entity, staging, target.target_scope.as_deref())?
        && load.exists(client).await?
    {
        loaded = load.swap(client, entity, staging, context).await?;
        if loaded.is_none() {
            load.fold_into_staging(client, entity, staging, context)
                .await?;
            for statement in merge::create_target_statements(entity)? {
                client.batch_execute(&statement).await.map_err(query)?;
            }
        }
    }
    let sql = target_sql(client, entity, target).await?;
    apply_on(client, &sql, entity, staging, loaded, context).await
}

/// Writes the staged rows into the target and drops the staging table. After
/// a swap (`loaded`: the rows the load table brought), the target holds
/// exactly what was loaded: nothing is deleted, and the rows staged as text
/// are written beside the loaded ones, which win a key both hold.
async fn apply_on(
    client: &Client,
    sql: &MergeSql,
    entity: &EntitySpec,
    staging: &str,
    loaded: Option<u64>,
    context: &str,
) -> Result<Option<ApplyOutcome>, SourceError> {
    let query = |error| SourceError::query(context, error);
    let rows_removed = match loaded {
        Some(_) => 0,
        None => client
            .execute(&sql.delete_scope_statement(), &[])
            .await
            .map_err(query)?,
    };
    let bounds = client
        .query_one(&sql.bounds_statement(RowsFrom::Staging(staging)), &[])
        .await
        .map_err(query)?;
    let lowest: Option<i64> = bounds.try_get(0).map_err(query)?;
    let highest: Option<i64> = bounds.try_get(1).map_err(query)?;
    let staged: i64 = bounds.try_get(2).map_err(query)?;
    let written = match (lowest, highest) {
        (Some(lowest), Some(highest)) => {
            let range = (lowest, highest.saturating_add(1));
            let bare = if rows_removed == 0 && loaded.is_none() {
                load_empty(client, sql, staging, range, context).await?
            } else {
                None
            };
            match bare {
                Some(written) => written,
                None => {
                    let rows = RowsFrom::Staging(staging);
                    let statement = sql.write_statement(rows, RestoreMode::Replace);
                    write_rows(client, sql, rows, &statement, range, context).await?
                }
            }
        }
        _ => Written::default(),
    };
    // A key staged twice is written once; the other copies are skipped.
    let settled = written.rows_written + written.failures.len() as u64;
    let rows_skipped = u64::try_from(staged).unwrap_or(0).saturating_sub(settled);
    client
        .batch_execute(&merge::drop_staging_statement(entity, staging)?)
        .await
        .map_err(query)?;
    Ok(Some(ApplyOutcome {
        rows_written: written.rows_written + loaded.unwrap_or(0),
        rows_skipped,
        rows_removed,
        failures: written.failures,
    }))
}

/// Loads the staged rows into an empty target the way `pg_restore` does:
/// rows into a bare heap, then the key's index built once, by sorting. Only
/// when the target has no row at all and its one index is its key constraint
/// with nothing referring to it; the constraint is dropped and added back with
/// its own name and definition, inside the apply's transaction (which holds
/// the target's `ACCESS EXCLUSIVE` lock until it commits: readers of the
/// empty table wait for the restored one). Rows are not deduplicated first:
/// the constraint finds a key staged twice. `None` when the target does not
/// qualify, or when the constraint cannot be added back (a key staged twice,
/// or two keys equal once cast): everything since is rolled back, and the
/// caller writes the rows with the key index in place, deduplicated, isolating
/// the failing rows.
async fn load_empty(
    client: &Client,
    sql: &MergeSql,
    staging: &str,
    range: (i64, i64),
    context: &str,
) -> Result<Option<Written>, SourceError> {
    let query = |error| SourceError::query(context, error);
    let Some(constraint) = client
        .query_opt(&sql.sole_key_constraint_statement(), &[])
        .await
        .map_err(query)?
    else {
        return Ok(None);
    };
    let name: String = constraint.try_get(0).map_err(query)?;
    let definition: String = constraint.try_get(1).map_err(query)?;
    client
        .batch_execute(&format!(
            "SAVEPOINT koan_load; {}",
            sql.drop_constraint_statement(&name)
        ))
        .await
        .map_err(query)?;
    let rows = RowsFrom::Staging(staging);
    let written = write_rows(client, sql, rows, &sql.load_statement(rows), range, context).await?;
    match client
        .batch_execute(&sql.add_constraint_statement(&name, &definition))
        .await
    {
        Ok(()) => {
            client
                .batch_execute("RELEASE SAVEPOINT koan_load")
                .await
                .map_err(query)?;
            Ok(Some(written))
        }
        Err(error) if is_row_error(&error) => {
            tracing::info!(context, constraint = %name, %error,
                "the key constraint does not hold on the loaded rows; writing them with it in place");
            client
                .batch_execute("ROLLBACK TO SAVEPOINT koan_load; RELEASE SAVEPOINT koan_load")
                .await
                .map_err(query)?;
            Ok(None)
        }
        Err(error) => Err(query(error)),
    }
}

/// The write statements of `entity` into `target`, against the target's catalog.
async fn target_sql(
    client: &Client,
    entity: &EntitySpec,
    target: &RestoreTarget,
) -> Result<MergeSql, SourceError> {
    let key_type = target_key_type(client, entity).await?;
    let mut columns = Vec::new();
    if entity.layout == Layout::Relational {
        let rows = client
            .query(COLUMNS_QUERY, &[&entity.schema, &entity.table])
            .await
            .map_err(|error| {
                SourceError::query(format!("list the columns of {}", entity.table), error)
            })?;
        for row in rows {
            columns.push(
                row.try_get::<_, String>(0)
                    .map_err(|error| SourceError::query("list columns", error))?,
            );
        }
    }
    MergeSql::new(entity, key_type, target.target_scope.as_deref(), &columns)
}

/// The key type of the target's table (checks the table and its columns too).
async fn target_key_type(client: &Client, entity: &EntitySpec) -> Result<KeyType, SourceError> {
    let inspected = catalog::inspect(client, entity).await?;
    inspected
        .key_type
        .ok_or_else(|| SourceError::UnsupportedKeyType {
            table: format!("{}.{}", entity.schema, entity.table),
            column: entity.key.clone(),
            sql_type: "unknown".into(),
        })
}

/// DDL that another worker may be running at the same moment: losing the race
/// (`IF NOT EXISTS` is not atomic against a concurrent creation) is success.
async fn execute_idempotent(
    client: &Client,
    statement: &str,
    context: &str,
) -> Result<(), SourceError> {
    match client.batch_execute(statement).await {
        Ok(()) => Ok(()),
        Err(error)
            if error.code().is_some_and(|state| {
                [
                    SqlState::UNIQUE_VIOLATION,
                    SqlState::DUPLICATE_TABLE,
                    SqlState::DUPLICATE_SCHEMA,
                    SqlState::DUPLICATE_OBJECT,
                ]
                .contains(state)
            }) =>
        {
            tracing::debug!(context, "created concurrently by another worker");
            Ok(())
        }
        Err(error) => Err(SourceError::query(context, error)),
    }
}

fn invalid_plan(entity: &EntitySpec, reason: &str) -> SourceError {
    SourceError::Invalid(ProtocolError::InvalidPlan {
        plan_id: String::new(),
        reason: format!("entity '{}': {reason}", entity.name.escape_default()),
    })
}
