//! SQL text of SQLite restores: the tables a restore creates, and the
//! statements that write one imported or staged row into a target. Pure
//! functions, unit-tested.
//!
//! PostgreSQL writes a whole range with one `INSERT ... ON CONFLICT`
//! statement; SQLite runs in-process, so `isolate.rs` writes the rows of a
//! range one by one, inside one savepoint, with these statements:
//!
//! | mode | conflict action |
//! |---|---|
//! | `overwrite` (and `merge` without a version) | `DO UPDATE SET doc = excluded.doc [, version col] WHERE <t in scope>` |
//! | `merge` | the same, `AND koan_newer(old, new)` (`coalesce(old < new, new IS NOT NULL)` in `jsonb` order) |
//! | `skip-existing` | `DO NOTHING` |
//! | `replace` (into staging) | `INSERT INTO koan_stage_... ON CONFLICT (k) DO NOTHING` |
//! | `replace` (apply) | `DELETE` the scope, then the staged rows with `DO NOTHING` |
//!
//! In a scope, a target row of another scope is never written: it is reported
//! as a `scope_conflict` (checked with [`MergePlan::found_statement`] first).
//! The version column takes the archived JSON through `json_extract(v, '$')`
//! (numbers become integers or reals, strings text), then the column's
//! affinity, as any SQLite insert would; `excluded.col` is that stored value.

use koan_protocol::ProtocolError;
use koan_protocol::commands::RestoreMode;
use koan_protocol::names::{check_ident, check_json_field, check_name, quote_ident, quote_literal};
use koan_protocol::plan::{EntitySpec, KeyType, ScopeMatch, VersionSource};

use crate::error::SourceError;
use crate::sqlite::catalog::{check_supported, not_supported};
use crate::sqlite::sql::{path_literal, scope_expr};
use crate::staging::check_staging_name;

/// The import's `TEMP` table (private to its connection, gone when it closes)
/// and the index the duplicate-key check uses. `nk` is the key as the
/// target's key type (NULL when it is not one); `k` the key as archived.
pub(crate) const IMPORT_SETUP: &str = "CREATE TEMP TABLE koan_import (seq INTEGER PRIMARY KEY, \
     k TEXT NOT NULL, nk, v TEXT, d TEXT NOT NULL, line_no INTEGER, raw TEXT, part TEXT); \
     CREATE INDEX temp.koan_import_nk ON koan_import (nk, seq)";
/// One staged line.
pub(crate) const IMPORT_INSERT: &str = "INSERT INTO temp.koan_import \
     (seq, k, nk, v, d, line_no, raw, part) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// Where a write reads its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsFrom<'a> {
    /// The import's `temp.koan_import`.
    Import,
    /// A `replace` staging table (typed key, validated JSON).
    Staging(&'a str),
}

/// Where a write writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteTo<'a> {
    /// The target table, reconciling per mode (`replace`: plain inserts).
    Target(RestoreMode),
    /// A `replace` staging table; a key staged twice keeps its first row.
    Staging(&'a str),
}

#[derive(Debug, Clone)]
enum Version {
    /// A quoted column.
    Column(String),
    /// A quoted JSON-array literal of field names.
    Path(String),
}

/// The restore statements of one entity and target.
#[derive(Debug, Clone)]
pub(crate) struct MergePlan {
    table: String,
    key: String,
    key_type: KeyType,
    document: String,
    version: Option<Version>,
    /// The effective scope: the target scope, else the entity's.
    scope: Option<String>,
    /// The scope of target row `t` as text, when scoped.
    found: Option<String>,
    /// A Koan row's scope column (quoted), set to the scope when written.
    scope_column: Option<String>,
    /// `'$."field"'` when imported documents are re-stamped with the target scope.
    restamp_path: Option<String>,
}

impl MergePlan {
    /// Checks every name again (specs come off the wire); `key_type` is the target's.
    pub(crate) fn new(
        entity: &EntitySpec,
        key_type: KeyType,
        target_scope: Option<&str>,
    ) -> Result<Self, SourceError> {
        check_supported(entity)?;
        check_ident("table", &entity.table)?;
        check_ident("key", &entity.key)?;
        let Some(document) = &entity.document else {
            return Err(invalid_plan(entity, "no document column"));
        };
        check_ident("document", document)?;
        let version = match &entity.version {
            Some(VersionSource::Column(column)) => {
                check_ident("version", column)?;
                Some(Version::Column(quote_ident(column)))
            }
            Some(VersionSource::JsonPath(path)) => Some(Version::Path(path_literal(path)?)),
            None => None,
        };
        let scope = match target_scope.or(entity.scope.as_deref()) {
            Some(scope) => {
                check_name("scope", scope)?;
                Some(scope.to_string())
            }
            None => None,
        };
        let found = match &scope {
            Some(_) => Some(scope_expr(&entity.scope_match, "t", document)?),
            None => None,
        };
        let scope_column = match (&entity.scope_match, &scope) {
            (ScopeMatch::Column(column), Some(_)) => {
                check_ident("scope_column", column)?;
                Some(quote_ident(column))
            }
            _ => None,
        };
        let restamp_path = match (&entity.scope_match, target_scope) {
            (ScopeMatch::Field(field), Some(_)) => {
                check_json_field("scope_field", field)?;
                if field.parse::<i64>().is_ok() {
                    // jsonb_set would index an array document with it; SQLite's
                    // json_set cannot, so the results would differ.
                    return Err(not_supported(
                        format!("re-stamping the scope field '{field}'"),
                        "a scope field that reads as an array index cannot be re-stamped the way PostgreSQL does",
                    ));
                }
                Some(quote_literal(&format!("$.\"{field}\""))?)
            }
            _ => None,
        };
        Ok(Self {
            table: quote_ident(&entity.table),
            key: quote_ident(&entity.key),
            key_type,
            document: quote_ident(document),
            version,
            scope,
            found,
            scope_column,
            restamp_path,
        })
    }

    /// The target's key type.
    pub(crate) fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The effective scope, when scoped.
    pub(crate) fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// Whether a document must be a JSON object to be written (it is re-stamped):
    /// its failure is then `invalid_document` rather than `type_mismatch`.
    pub(crate) fn needs_object_documents(&self) -> bool {
        self.restamp_path.is_some()
    }

    /// The document to store: the imported one minified (and re-stamped), or a staged one.
    fn doc_expr(&self, rows: RowsFrom<'_>, doc: &str) -> String {
        match (rows, &self.restamp_path) {
            (RowsFrom::Import, Some(path)) => format!("json_set(json({doc}), {path}, :scope)"),
            _ => format!("json({doc})"),
        }
    }

    /// The scope of the target row with key `:key` (no row: nothing), when scoped.
    pub(crate) fn found_statement(&self) -> Option<String> {
        self.found.as_ref().map(|found| {
            format!(
                "SELECT {found} FROM {table} AS t WHERE t.{key} = :key",
                table = self.table,
                key = self.key
            )
        })
    }

    /// Writes one row into the target (`:key`, `:doc`, `:ver` as JSON text, `:scope`).
    pub(crate) fn upsert_statement(&self, rows: RowsFrom<'_>, mode: RestoreMode) -> String {
        let mut columns = vec![self.key.clone(), self.document.clone()];
        let mut values = vec![":key".to_string(), self.doc_expr(rows, ":doc")];
        let mut updates = vec![format!("{0} = excluded.{0}", self.document)];
        if let Some(Version::Column(column)) = &self.version {
            columns.push(column.clone());
            values.push("json_extract(:ver, '$')".into());
            updates.push(format!("{column} = excluded.{column}"));
        }
        if let Some(column) = &self.scope_column {
            columns.push(column.clone());
            values.push(":scope".into());
        }
        let action = match mode {
            RestoreMode::SkipExisting | RestoreMode::Replace => "DO NOTHING".to_string(),
            RestoreMode::Overwrite | RestoreMode::Merge => {
                let mut conditions = Vec::new();
                if let Some(found) = &self.found {
                    conditions.push(format!("{found} = :scope"));
                }
                if mode == RestoreMode::Merge {
                    match &self.version {
                        Some(Version::Column(column)) => {
                            conditions.push(format!("koan_newer(t.{column}, excluded.{column})"));
                        }
                        Some(Version::Path(path)) => conditions.push(format!(
                            "koan_newer_path(t.{doc}, excluded.{doc}, {path})",
                            doc = self.document
                        )),
                        None => {}
                    }
                }
                let filter = if conditions.is_empty() {
                    String::new()
                } else {
                    format!(" WHERE {}", conditions.join(" AND "))
                };
                format!("DO UPDATE SET {}{filter}", updates.join(", "))
            }
        };
        format!(
            "INSERT INTO {table} AS t ({columns}) VALUES ({values}) ON CONFLICT ({key}) {action}",
            table = self.table,
            columns = columns.join(", "),
            values = values.join(", "),
            key = self.key,
        )
    }

    /// Stages the imported row `:seq` (`:ver` as JSON text); a key staged before keeps its row.
    pub(crate) fn staging_insert_statement(&self, staging: &str) -> String {
        format!(
            "INSERT INTO {} (k, v, d, line_no, raw, part) \
             SELECT s.nk, :ver, {}, s.line_no, s.raw, s.part FROM temp.koan_import AS s \
             WHERE s.seq = :seq ON CONFLICT (k) DO NOTHING",
            quote_ident(staging),
            self.doc_expr(RowsFrom::Import, "s.d")
        )
    }

    /// `replace`: removes the scope's rows (every row when unscoped).
    pub(crate) fn delete_scope_statement(&self) -> String {
        match &self.found {
            Some(found) => format!("DELETE FROM {} AS t WHERE {found} = :scope", self.table),
            None => format!("DELETE FROM {}", self.table),
        }
    }

    /// The first row of `[?1, ?2)` whose key is not of the target's key type.
    pub(crate) fn bad_key_statement(&self) -> &'static str {
        "SELECT s.k FROM temp.koan_import AS s WHERE s.seq >= ?1 AND s.seq < ?2 \
         AND s.nk IS NULL ORDER BY s.seq LIMIT 1"
    }

    /// The rows of `[?1, ?2)` to write, in `seq` order, as `(seq, key text,
    /// key, version, doc)`: from an import, one per key (the last line wins).
    pub(crate) fn rows_statement(&self, rows: RowsFrom<'_>) -> String {
        match rows {
            RowsFrom::Import => "SELECT s.seq, s.k, s.nk, s.v, s.d FROM temp.koan_import AS s \
                 WHERE s.seq >= ?1 AND s.seq < ?2 AND NOT EXISTS (SELECT 1 FROM temp.koan_import AS later \
                 WHERE later.nk = s.nk AND later.seq > s.seq AND later.seq < ?2) ORDER BY s.seq"
                .to_string(),
            RowsFrom::Staging(table) => format!(
                "SELECT s.seq, CAST(s.k AS TEXT), s.k, s.v, s.d FROM {} AS s \
                 WHERE s.seq >= ?1 AND s.seq < ?2 ORDER BY s.seq",
                quote_ident(table)
            ),
        }
    }

    /// Key text, line number, part, raw line and document of the row `seq = ?1`.
    pub(crate) fn row_statement(&self, rows: RowsFrom<'_>) -> String {
        let (relation, key) = relation(rows);
        format!("SELECT {key}, s.line_no, s.part, s.raw, s.d FROM {relation} AS s WHERE s.seq = ?1")
    }

    /// `min(seq), max(seq)` of the rows.
    pub(crate) fn bounds_statement(&self, rows: RowsFrom<'_>) -> String {
        let (relation, _) = relation(rows);
        format!("SELECT min(s.seq), max(s.seq) FROM {relation} AS s")
    }
}

fn relation(rows: RowsFrom<'_>) -> (String, &'static str) {
    match rows {
        RowsFrom::Import => ("temp.koan_import".to_string(), "s.k"),
        RowsFrom::Staging(table) => (quote_ident(table), "CAST(s.k AS TEXT)"),
    }
}

/// Whether a staging table exists (`?1` is its name).
pub(crate) const STAGING_EXISTS: &str =
    "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1";

/// Drops a staging table, if it exists.
pub(crate) fn drop_staging_statement(table: &str) -> Result<String, SourceError> {
    check_staging_name(table)?;
    Ok(format!("DROP TABLE IF EXISTS {}", quote_ident(table)))
}

/// The `replace` staging table: `seq` in staging order, the key typed as the
/// target's (unique: a key staged twice keeps its first row), the version as
/// JSON text, the document as minified JSON.
pub(crate) fn create_staging_statement(
    table: &str,
    key_type: KeyType,
) -> Result<String, SourceError> {
    check_staging_name(table)?;
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {} (seq INTEGER PRIMARY KEY, k {} NOT NULL UNIQUE, \
         v TEXT, d TEXT NOT NULL, line_no INTEGER, raw TEXT, part TEXT)",
        quote_ident(table),
        column_type(key_type)
    ))
}

/// A missing Koan-layout table: the key (`INTEGER` or `TEXT`, per the archived
/// key type) as primary key, a `TEXT NOT NULL` document, an untyped version
/// column (values keep their JSON type) and a `TEXT` scope column when the
/// entity has them.
pub(crate) fn create_target_statement(entity: &EntitySpec) -> Result<String, SourceError> {
    check_supported(entity)?;
    check_ident("table", &entity.table)?;
    check_ident("key", &entity.key)?;
    let Some(key_type) = entity.key_type else {
        return Err(invalid_plan(entity, "the archived entity has no key type"));
    };
    let Some(document) = entity.document.as_deref() else {
        return Err(invalid_plan(entity, "no document column"));
    };
    check_ident("document", document)?;
    let mut columns = vec![
        format!(
            "{} {} NOT NULL PRIMARY KEY",
            quote_ident(&entity.key),
            column_type(key_type)
        ),
        format!("{} TEXT NOT NULL", quote_ident(document)),
    ];
    if let Some(VersionSource::Column(column)) = &entity.version {
        check_ident("version", column)?;
        columns.push(quote_ident(column));
    }
    if let ScopeMatch::Column(column) = &entity.scope_match {
        check_ident("scope_column", column)?;
        columns.push(format!("{} TEXT", quote_ident(column)));
    }
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote_ident(&entity.table),
        columns.join(", ")
    ))
}

/// `INTEGER` for numeric keys (a rowid alias as primary key), else `TEXT`
/// (uuids are kept as their text).
fn column_type(key_type: KeyType) -> &'static str {
    if key_type.is_numeric() {
        "INTEGER"
    } else {
        "TEXT"
    }
}

/// A plan error naming the entity.
pub(crate) fn invalid_plan(entity: &EntitySpec, reason: &str) -> SourceError {
    SourceError::Invalid(ProtocolError::InvalidPlan {
        plan_id: String::new(),
        reason: format!("entity '{}': {reason}", entity.name.escape_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use koan_protocol::plan::{BackupEntity, BackupPlan};

    fn spec(entity: BackupEntity) -> EntitySpec {
        let plan = BackupPlan::new("p").entity(entity);
        plan.validate().expect("valid plan");
        let mut spec = plan.entity_specs().remove(0);
        spec.key_type = Some(KeyType::Text);
        spec
    }

    #[test]
    fn merge_by_json_path_in_a_scope() {
        let entity = spec(
            BackupEntity::new("orders", "Order")
                .in_scope("b", "tenant-a")
                .version("$.meta.v"),
        );
        let plan = MergePlan::new(&entity, KeyType::Text, None).expect("plan");
        assert_eq!(
            plan.upsert_statement(RowsFrom::Import, RestoreMode::Merge),
            "INSERT INTO \"Order\" AS t (\"Id\", \"Json\") VALUES (:key, json(:doc)) \
             ON CONFLICT (\"Id\") DO UPDATE SET \"Json\" = excluded.\"Json\" \
             WHERE koan_field_text(t.\"Json\", '__koan_tenant') = :scope \
             AND koan_newer_path(t.\"Json\", excluded.\"Json\", '[\"meta\",\"v\"]')"
        );
        assert_eq!(
            plan.found_statement().as_deref(),
            Some(
                "SELECT koan_field_text(t.\"Json\", '__koan_tenant') FROM \"Order\" AS t WHERE t.\"Id\" = :key"
            )
        );
        assert!(!plan.needs_object_documents());
    }

    #[test]
    fn modes_choose_the_conflict_action() {
        let plan = MergePlan::new(&spec(BackupEntity::new("e", "t")), KeyType::Bigint, None)
            .expect("plan");
        let overwrite = plan.upsert_statement(RowsFrom::Import, RestoreMode::Overwrite);
        assert!(
            overwrite.ends_with("ON CONFLICT (\"Id\") DO UPDATE SET \"Json\" = excluded.\"Json\""),
            "{overwrite}"
        );
        assert_eq!(
            plan.upsert_statement(RowsFrom::Import, RestoreMode::Merge),
            overwrite,
            "merge without a version is overwrite"
        );
        for mode in [RestoreMode::SkipExisting, RestoreMode::Replace] {
            assert!(
                plan.upsert_statement(RowsFrom::Import, mode)
                    .ends_with("ON CONFLICT (\"Id\") DO NOTHING")
            );
        }
        assert_eq!(plan.found_statement(), None, "unscoped: no conflicts");
        assert_eq!(plan.delete_scope_statement(), "DELETE FROM \"t\"");
    }

    #[test]
    fn version_and_scope_columns_and_restamping() {
        let mut entity = BackupEntity::new("e", "t")
            .in_scope("b", "a")
            .version("rev");
        entity.scope_column = Some("tenant".into());
        let plan = MergePlan::new(&spec(entity), KeyType::Text, Some("z")).expect("plan");
        assert_eq!(plan.scope(), Some("z"), "the target scope wins");
        assert_eq!(
            plan.upsert_statement(RowsFrom::Import, RestoreMode::Merge),
            "INSERT INTO \"t\" AS t (\"Id\", \"Json\", \"rev\", \"tenant\") \
             VALUES (:key, json(:doc), json_extract(:ver, '$'), :scope) \
             ON CONFLICT (\"Id\") DO UPDATE SET \"Json\" = excluded.\"Json\", \"rev\" = excluded.\"rev\" \
             WHERE CAST(t.\"tenant\" AS TEXT) = :scope AND koan_newer(t.\"rev\", excluded.\"rev\")"
        );
        assert!(
            !plan.needs_object_documents(),
            "a column scope re-stamps no document"
        );

        let field = spec(BackupEntity::new("e", "t").in_scope("b", "a"));
        let plan = MergePlan::new(&field, KeyType::Text, Some("z")).expect("plan");
        assert!(plan.needs_object_documents());
        assert!(
            plan.upsert_statement(RowsFrom::Import, RestoreMode::Overwrite)
                .contains("VALUES (:key, json_set(json(:doc), '$.\"__koan_tenant\"', :scope))")
        );
        assert!(
            plan.upsert_statement(RowsFrom::Staging("koan_stage_x"), RestoreMode::Replace)
                .contains("VALUES (:key, json(:doc))"),
            "staged rows were re-stamped when staged"
        );
        assert_eq!(
            plan.delete_scope_statement(),
            "DELETE FROM \"t\" AS t WHERE koan_field_text(t.\"Json\", '__koan_tenant') = :scope"
        );
        assert!(
            plan.staging_insert_statement("koan_stage_1_e")
                .contains("SELECT s.nk, :ver, json_set(json(s.d), '$.\"__koan_tenant\"', :scope)")
        );

        let mut digits = BackupEntity::new("e", "t").in_scope("b", "a");
        digits.scope_field = Some("0".into());
        let error = MergePlan::new(&spec(digits), KeyType::Text, Some("z")).expect_err("digits");
        assert_eq!(error.code(), "not_supported");
    }

    #[test]
    fn created_tables() {
        let mut entity = BackupEntity::new("e", "t")
            .in_scope("b", "a")
            .version("rev");
        entity.scope_column = Some("tenant".into());
        let mut entity = spec(entity);
        entity.key_type = Some(KeyType::Bigint);
        assert_eq!(
            create_target_statement(&entity).expect("create"),
            "CREATE TABLE IF NOT EXISTS \"t\" (\"Id\" INTEGER NOT NULL PRIMARY KEY, \
             \"Json\" TEXT NOT NULL, \"rev\", \"tenant\" TEXT)"
        );
        entity.key_type = None;
        assert_eq!(
            create_target_statement(&entity)
                .expect_err("no key type")
                .code(),
            "invalid_plan"
        );
        assert!(
            create_staging_statement("koan_stage_0123456789ab_e", KeyType::Uuid)
                .expect("staging")
                .contains("k TEXT NOT NULL UNIQUE")
        );
        assert!(create_staging_statement("orders", KeyType::Text).is_err());
        assert!(drop_staging_statement("orders").is_err());
    }
}
