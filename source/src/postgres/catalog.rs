//! Checking an entity against `pg_catalog`: the table, its columns, their types
//! and the uniqueness of the key. Names travel as bind parameters, compared
//! exactly (case-sensitive), as they are quoted everywhere else.

use std::collections::HashMap;

use koan_protocol::names::{check_ident, check_json_field};
use koan_protocol::plan::{EntitySpec, KeyType, Layout, ScopeMatch, VersionSource};
use tokio_postgres::Client;

use crate::error::SourceError;

const TABLE_QUERY: &str = "SELECT c.oid, c.relkind::text FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2";

/// Columns with their declared type and, for domains, the base type.
const COLUMNS_QUERY: &str = "SELECT a.attname::text, a.attnum, a.attnotnull, \
     pg_catalog.format_type(a.atttypid, a.atttypmod), \
     pg_catalog.format_type(CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE a.atttypid END, NULL) \
     FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid \
     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped";

/// Valid, non-partial, non-expression indexes whose only key column is `$2`.
const KEY_INDEX_QUERY: &str = "SELECT i.indisprimary, i.indisunique FROM pg_catalog.pg_index i \
     WHERE i.indrelid = $1 AND i.indnkeyatts = 1 AND i.indkey[0] = $2 \
     AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL";

struct Column {
    number: i16,
    not_null: bool,
    declared_type: String,
    base_type: String,
}

/// Checks `entity` against the catalog and returns it with `key_type` resolved.
pub(crate) async fn inspect(
    client: &Client,
    entity: &EntitySpec,
) -> Result<EntitySpec, SourceError> {
    check_ident("schema", &entity.schema)?;
    check_ident("table", &entity.table)?;
    let qualified = format!("{}.{}", entity.schema, entity.table);
    let context = || format!("inspect table {qualified}");

    let table_row = client
        .query_opt(TABLE_QUERY, &[&entity.schema, &entity.table])
        .await
        .map_err(|error| SourceError::query(context(), error))?;
    let Some(table_row) = table_row else {
        return Err(SourceError::MissingTable {
            schema: entity.schema.clone(),
            table: entity.table.clone(),
            hint: None,
        });
    };
    let oid: u32 = table_row
        .try_get(0)
        .map_err(|error| SourceError::query(context(), error))?;
    let relkind: String = table_row
        .try_get(1)
        .map_err(|error| SourceError::query(context(), error))?;
    if let Some(kind) = unreadable_kind(&relkind) {
        return Err(SourceError::NotATable {
            schema: entity.schema.clone(),
            table: entity.table.clone(),
            kind: kind.to_string(),
        });
    }

    let mut columns = HashMap::new();
    for row in client
        .query(COLUMNS_QUERY, &[&oid])
        .await
        .map_err(|error| SourceError::query(context(), error))?
    {
        let name: String = row
            .try_get(0)
            .map_err(|error| SourceError::query(context(), error))?;
        let column = Column {
            number: row
                .try_get(1)
                .map_err(|error| SourceError::query(context(), error))?,
            not_null: row
                .try_get(2)
                .map_err(|error| SourceError::query(context(), error))?,
            declared_type: row
                .try_get(3)
                .map_err(|error| SourceError::query(context(), error))?,
            base_type: row
                .try_get(4)
                .map_err(|error| SourceError::query(context(), error))?,
        };
        columns.insert(name, column);
    }
    let find = |field: &str, name: &str| -> Result<&Column, SourceError> {
        check_ident(field, name)?;
        columns.get(name).ok_or_else(|| SourceError::MissingColumn {
            table: qualified.clone(),
            column: name.to_string(),
        })
    };

    let key = find("key", &entity.key)?;
    let key_type = match key.base_type.as_str() {
        "text" | "character varying" => KeyType::Text,
        "uuid" => KeyType::Uuid,
        "bigint" => KeyType::Bigint,
        "integer" => KeyType::Integer,
        _ => {
            return Err(SourceError::UnsupportedKeyType {
                table: qualified.clone(),
                column: entity.key.clone(),
                sql_type: key.declared_type.clone(),
            });
        }
    };
    let mut unique = false;
    for row in client
        .query(KEY_INDEX_QUERY, &[&oid, &key.number])
        .await
        .map_err(|error| SourceError::query(context(), error))?
    {
        let primary: bool = row
            .try_get(0)
            .map_err(|error| SourceError::query(context(), error))?;
        let unique_index: bool = row
            .try_get(1)
            .map_err(|error| SourceError::query(context(), error))?;
        unique |= primary || (unique_index && key.not_null);
    }
    if !unique {
        return Err(SourceError::KeyNotUnique {
            table: qualified.clone(),
            column: entity.key.clone(),
        });
    }

    if entity.layout == Layout::Koan {
        let Some(document_name) = &entity.document else {
            return Err(SourceError::MissingColumn {
                table: qualified.clone(),
                column: "<document>".into(),
            });
        };
        let document = find("document", document_name)?;
        if !matches!(document.base_type.as_str(), "jsonb" | "json" | "text") {
            return Err(SourceError::UnsupportedDocumentType {
                table: qualified.clone(),
                column: document_name.clone(),
                sql_type: document.declared_type.clone(),
            });
        }
    }
    match &entity.version {
        Some(VersionSource::Column(name)) => {
            find("version", name)?;
        }
        Some(VersionSource::JsonPath(path)) => {
            for field in path {
                check_json_field("version", field)?;
            }
        }
        None => {}
    }
    if entity.scope.is_some() {
        match &entity.scope_match {
            ScopeMatch::Column(name) => {
                find("scope_column", name)?;
            }
            ScopeMatch::Field(field) => check_json_field("scope_field", field)?,
        }
    }

    let mut resolved = entity.clone();
    resolved.key_type = Some(key_type);
    Ok(resolved)
}

/// Relations that cannot be scanned as a table, by `relkind`.
fn unreadable_kind(relkind: &str) -> Option<&'static str> {
    match relkind {
        "r" | "p" | "v" | "m" | "f" => None,
        "S" => Some("sequence"),
        "i" | "I" => Some("index"),
        "c" => Some("composite type"),
        "t" => Some("toast table"),
        _ => Some("relation of an unsupported kind"),
    }
}
