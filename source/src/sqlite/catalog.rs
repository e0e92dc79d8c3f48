//! Checking an entity against a SQLite database's schema: the table, its
//! columns, the key's type and uniqueness.
//!
//! SQLite resolves table and column names case-insensitively (ASCII), quoted
//! or not, so lookups here do too. Names are bound as parameters of
//! `pragma_table_xinfo` and friends, never spliced into SQL. Types are
//! SQLite's declared types, read through its affinity rules: a key column of
//! INTEGER affinity is a `bigint` key, one of TEXT affinity a `text` key.

use koan_protocol::names::{check_ident, check_json_field};
use koan_protocol::plan::{EntitySpec, KeyType, Layout, ScopeMatch, VersionSource};
use rusqlite::{Connection, OptionalExtension};

use crate::error::{SourceError, sqlite};

/// The schema names that mean the database's only schema (`public` is the plans' default).
const SCHEMAS: [&str; 2] = ["public", "main"];

/// One column, as `pragma_table_xinfo` describes it.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) declared_type: String,
    pub(crate) not_null: bool,
    /// Position in the primary key (1-based), 0 when not part of it.
    pub(crate) primary_key: i64,
}

/// Refuses what the SQLite source has no equivalent for, before any statement runs.
pub(crate) fn check_supported(entity: &EntitySpec) -> Result<(), SourceError> {
    if entity.layout == Layout::Relational {
        return Err(not_supported(
            "the relational layout",
            "the SQLite source reads and writes Koan's layout (a key column and a JSON document column) only",
        ));
    }
    check_ident("schema", &entity.schema)?;
    if !SCHEMAS.contains(&entity.schema.as_str()) {
        return Err(not_supported(
            format!("schema '{}'", entity.schema),
            "a SQLite database has one schema; name it 'public' (the default) or 'main'",
        ));
    }
    Ok(())
}

/// A [`SourceError::NotSupported`] of the SQLite source.
pub(crate) fn not_supported(what: impl Into<String>, reason: impl Into<String>) -> SourceError {
    SourceError::NotSupported {
        backend: "sqlite",
        what: what.into(),
        reason: reason.into(),
    }
}

/// Checks `entity` against the schema and returns it with `key_type` resolved.
///
/// Errors name the table and column: a missing table, a missing key,
/// document, version or scope column, a key that is neither the primary key
/// alone nor a not-null column with a unique index of its own, a key whose
/// declared type has neither INTEGER nor TEXT affinity, a document column
/// that is not text or JSON.
pub(crate) fn inspect(
    connection: &Connection,
    entity: &EntitySpec,
) -> Result<EntitySpec, SourceError> {
    check_supported(entity)?;
    check_ident("table", &entity.table)?;
    let qualified = format!("{}.{}", entity.schema, entity.table);
    let context = || format!("inspect table {qualified}");

    let kind: Option<String> = connection
        .query_row(
            "SELECT type FROM sqlite_schema WHERE name = ?1 COLLATE NOCASE \
             ORDER BY type = 'table' DESC, type = 'view' DESC LIMIT 1",
            [&entity.table],
            |row| row.get(0),
        )
        .optional()
        .map_err(|error| sqlite(context(), error))?;
    match kind.as_deref() {
        None => {
            return Err(SourceError::MissingTable {
                schema: entity.schema.clone(),
                table: entity.table.clone(),
                hint: None,
            });
        }
        Some("table" | "view") => {}
        Some(other) => {
            return Err(SourceError::NotATable {
                schema: entity.schema.clone(),
                table: entity.table.clone(),
                kind: other.to_string(),
            });
        }
    }

    let columns = columns(connection, &entity.table).map_err(|error| sqlite(context(), error))?;
    let find = |field: &str, name: &str| -> Result<&Column, SourceError> {
        check_ident(field, name)?;
        columns
            .iter()
            .find(|column| column.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| SourceError::MissingColumn {
                table: qualified.clone(),
                column: name.to_string(),
            })
    };

    let key = find("key", &entity.key)?;
    let key_type = key_type(&key.declared_type).ok_or_else(|| SourceError::UnsupportedKeyType {
        table: qualified.clone(),
        column: entity.key.clone(),
        sql_type: format!(
            "'{}' (in SQLite, declare the key TEXT or INTEGER)",
            key.declared_type
        ),
    })?;
    let sole_primary_key =
        key.primary_key > 0 && columns.iter().filter(|c| c.primary_key > 0).count() == 1;
    let unique = sole_primary_key
        || (key.not_null
            && has_unique_index(connection, &entity.table, &key.name)
                .map_err(|error| sqlite(context(), error))?);
    if !unique {
        return Err(SourceError::KeyNotUnique {
            table: qualified.clone(),
            column: entity.key.clone(),
        });
    }

    let Some(document_name) = &entity.document else {
        return Err(SourceError::MissingColumn {
            table: qualified.clone(),
            column: "<document>".into(),
        });
    };
    let document = find("document", document_name)?;
    if !is_document_type(&document.declared_type) {
        return Err(SourceError::UnsupportedDocumentType {
            table: qualified.clone(),
            column: document_name.clone(),
            sql_type: document.declared_type.clone(),
        });
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

/// The key type of a declared column type, by SQLite's affinity rules
/// (INTEGER affinity: a name containing `INT`; TEXT: `CHAR`, `CLOB` or `TEXT`).
pub(crate) fn key_type(declared: &str) -> Option<KeyType> {
    let upper = declared.to_ascii_uppercase();
    if upper.contains("INT") {
        Some(KeyType::Bigint)
    } else if ["CHAR", "CLOB", "TEXT"]
        .iter()
        .any(|name| upper.contains(name))
    {
        Some(KeyType::Text)
    } else {
        None
    }
}

/// Text affinity, `JSON`, `JSONB` or no declared type.
fn is_document_type(declared: &str) -> bool {
    let upper = declared.trim().to_ascii_uppercase();
    matches!(upper.as_str(), "" | "JSON" | "JSONB")
        || (!upper.contains("INT") && key_type(&upper) == Some(KeyType::Text))
}

fn columns(connection: &Connection, table: &str) -> rusqlite::Result<Vec<Column>> {
    let mut statement = connection
        .prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_xinfo(?1) ORDER BY cid")?;
    let rows = statement.query_map([table], |row| {
        Ok(Column {
            name: row.get(0)?,
            declared_type: row.get(1)?,
            not_null: row.get::<_, i64>(2)? != 0,
            primary_key: row.get(3)?,
        })
    })?;
    rows.collect()
}

/// Whether a unique, non-partial index has `column` as its only key column.
fn has_unique_index(connection: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut indexes = connection.prepare(
        "SELECT il.name FROM pragma_index_list(?1) AS il WHERE il.\"unique\" = 1 AND il.partial = 0",
    )?;
    let names: Vec<String> = indexes
        .query_map([table], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for index in names {
        let keys: Vec<Option<String>> = connection
            .prepare("SELECT name FROM pragma_index_info(?1)")?
            .query_map([&index], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if let [Some(name)] = keys.as_slice()
            && name.eq_ignore_ascii_case(column)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types_follow_affinity() {
        for (declared, expected) in [
            ("TEXT", Some(KeyType::Text)),
            ("varchar(40)", Some(KeyType::Text)),
            ("INTEGER", Some(KeyType::Bigint)),
            ("bigint", Some(KeyType::Bigint)),
            ("UUID", None),
            ("", None),
            ("REAL", None),
            ("BLOB", None),
        ] {
            assert_eq!(key_type(declared), expected, "{declared}");
        }
        assert!(is_document_type("TEXT") && is_document_type("json") && is_document_type(""));
        assert!(!is_document_type("INTEGER") && !is_document_type("BLOB"));
    }
}
