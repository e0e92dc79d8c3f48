//! Range planning in SQLite: the same ranking as PostgreSQL's (keys at row
//! numbers `N+1, 2N+1, ...` with `row_number() OVER (ORDER BY key)`), so every
//! chunk holds exactly `N` rows (the last one fewer) whatever the key
//! distribution. The count and the boundaries are read in one read
//! transaction, so they see the same data.

use koan_protocol::archive::KeyRange;
use koan_protocol::plan::{EntitySpec, KeyType};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, params_from_iter};

use crate::error::{SourceError, sqlite};
use crate::ranges::{RangePlan, ranges_from_boundaries, rows_per_chunk};
use crate::sqlite::catalog;
use crate::sqlite::sql::EntitySql;

/// Counts and chooses ranges of `entity` in a read transaction of its own.
pub(crate) fn plan_on(
    connection: &Connection,
    entity: &EntitySpec,
) -> Result<RangePlan, SourceError> {
    let context = || format!("plan ranges of entity {}", entity.name);
    connection
        .execute_batch("BEGIN DEFERRED")
        .map_err(|error| sqlite(context(), error))?;
    let planned = plan_in_transaction(connection, entity);
    let end = if planned.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = connection.execute_batch(end);
    let plan = planned?;
    ended.map_err(|error| sqlite(context(), error))?;
    Ok(plan)
}

fn plan_in_transaction(
    connection: &Connection,
    entity: &EntitySpec,
) -> Result<RangePlan, SourceError> {
    let context = || format!("plan ranges of entity {}", entity.name);
    let key_type = resolve_key_type(connection, entity)?;
    let sql = EntitySql::new(entity)?;
    let (count_query, params) = sql.count_query();
    let (count, average): (i64, f64) = connection
        .query_row(&count_query, params_from_iter(params.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .map_err(|error| sqlite(context(), error))?;
    let rows_total = u64::try_from(count).unwrap_or(0);
    let rows_per_chunk = rows_per_chunk(entity.chunk_rows, average);
    if rows_total <= rows_per_chunk {
        return Ok(RangePlan {
            rows_total,
            rows_per_chunk,
            ranges: vec![KeyRange::default()],
        });
    }
    let step = i64::try_from(rows_per_chunk).unwrap_or(i64::MAX);
    let (boundary_query, params) = sql.boundary_query(step);
    let mut statement = connection
        .prepare(&boundary_query)
        .map_err(|error| sqlite(context(), error))?;
    let mut rows = statement
        .query(params_from_iter(params.iter()))
        .map_err(|error| sqlite(context(), error))?;
    let mut boundaries = Vec::new();
    while let Some(row) = rows.next().map_err(|error| sqlite(context(), error))? {
        let value = row.get_ref(0).map_err(|error| sqlite(context(), error))?;
        boundaries.push(key_text(value, key_type, entity)?);
    }
    let ranges = ranges_from_boundaries(boundaries);
    tracing::debug!(
        entity = %entity.name,
        rows_total,
        rows_per_chunk,
        chunks = ranges.len(),
        "planned key ranges"
    );
    Ok(RangePlan {
        rows_total,
        rows_per_chunk,
        ranges,
    })
}

/// The entity's key type; inspected when the spec does not say yet.
pub(crate) fn resolve_key_type(
    connection: &Connection,
    entity: &EntitySpec,
) -> Result<KeyType, SourceError> {
    match entity.key_type {
        Some(key_type) => Ok(key_type),
        None => {
            tracing::debug!(entity = %entity.name, "key type unresolved, inspecting");
            catalog::inspect(connection, entity)?
                .key_type
                .ok_or_else(|| SourceError::UnsupportedKeyType {
                    table: format!("{}.{}", entity.schema, entity.table),
                    column: entity.key.clone(),
                    sql_type: "unknown".into(),
                })
        }
    }
}

/// A key value as text: a `bigint` key must hold integers, a `text` key text.
/// SQLite would store anything in any column; a value of another storage
/// class fails loudly rather than being archived under a key it does not have.
pub(crate) fn key_text(
    value: ValueRef<'_>,
    key_type: KeyType,
    entity: &EntitySpec,
) -> Result<String, SourceError> {
    match (value, key_type.is_numeric()) {
        (ValueRef::Integer(integer), true) => Ok(integer.to_string()),
        (ValueRef::Text(bytes), false) => std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|error| SourceError::decode(format!("key is not UTF-8: {error}"))),
        (ValueRef::Null, _) => Err(SourceError::decode(format!(
            "row with a NULL key in {}.{}",
            entity.table, entity.key
        ))),
        (other, _) => {
            let shown = match other {
                ValueRef::Integer(integer) => integer.to_string(),
                ValueRef::Real(real) => real.to_string(),
                ValueRef::Text(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                ValueRef::Blob(bytes) => format!("a blob of {} bytes", bytes.len()),
                ValueRef::Null => String::new(),
            };
            Err(SourceError::decode(format!(
                "key column {}.{} holds the {} value '{}', but its keys are {} values",
                entity.table,
                entity.key,
                other.data_type(),
                shown.escape_default().take(200).collect::<String>(),
                key_type.sql(),
            )))
        }
    }
}
