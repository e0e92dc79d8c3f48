//! SQL text of restores: the tables a restore creates, and the statements that
//! write imported or staged rows into a target. Pure functions, unit-tested.
//!
//! Rows come from the import's `TEMP` table (all text, fed by `COPY`) or from
//! a `replace` staging table (typed). A write statement takes the `seq` range
//! `[$1, $2)` of the rows to write, so row isolation can retry any sub-range.
//! It returns one row per scope conflict, `(seq, key, line_no, part, raw,
//! found_scope, NULL)`, then one row `(NULL, ..., rows written)`.
//!
//! Casts happen here, never in the `COPY`: a bad key or document fails the
//! statement, and row isolation finds the row. Versions compare as `jsonb`.

use koan_protocol::ProtocolError;
use koan_protocol::commands::RestoreMode;
use koan_protocol::names::{check_ident, check_json_field, check_name, quote_ident, quote_literal};
use koan_protocol::plan::{EntitySpec, KeyType, Layout, ScopeMatch, VersionSource};

use crate::error::SourceError;
use crate::postgres::sql::path_literal;
pub(crate) use crate::staging::{check_staging_name, staging_table_name};

/// The import transaction's setup: its text staging table, dropped at commit.
pub(crate) const IMPORT_SETUP: &str = "SET LOCAL work_mem = '64MB'; \
     CREATE TEMP TABLE koan_import (seq bigint NOT NULL, k text, v text, d text, \
     line_no bigint, raw text, part text) ON COMMIT DROP";
/// The `COPY` that feeds it, in binary format (no escaping, no parsing).
pub(crate) const IMPORT_COPY: &str =
    "COPY pg_temp.koan_import (seq, k, v, d, line_no, raw, part) FROM STDIN (FORMAT binary)";
/// The columns a relational row is written through (generated ones are computed).
pub(crate) const COLUMNS_QUERY: &str = "SELECT a.attname::text FROM pg_catalog.pg_attribute a \
     JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
     AND a.attgenerated = '' ORDER BY a.attnum";

/// Where a write statement reads its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsFrom<'a> {
    /// The import's text table `pg_temp.koan_import`.
    Import,
    /// A `replace` staging table (typed key, `jsonb` document), in the target's schema.
    Staging(&'a str),
}

/// Where a write statement writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteTo<'a> {
    /// The target table, reconciling per mode (`replace`: plain inserts).
    Target(RestoreMode),
    /// A `replace` staging table; a key staged twice keeps its first row.
    Staging(&'a str),
}

/// Where the version is, names checked.
#[derive(Debug, Clone)]
enum Version {
    /// A column (unquoted name).
    Column(String),
    /// A document path, as a `text[]` literal.
    Path(String),
}

/// The restore statements of one entity and target.
#[derive(Debug, Clone)]
pub(crate) struct MergeSql {
    schema: String,
    table: String,
    key: String,
    key_type: KeyType,
    layout: Layout,
    document: String,
    version: Option<Version>,
    scope_match: ScopeMatch,
    /// `'{"field"}'::text[]` when the scope is a document field.
    scope_path: Option<String>,
    /// The effective scope as a quoted literal: the target scope, else the entity's.
    scope: Option<String>,
    /// Whether imported rows are re-stamped with the target scope.
    restamp: bool,
    /// Relational layout: the quoted columns a row is written through.
    columns: Vec<String>,
}

impl MergeSql {
    /// Checks every name again (specs come off the wire). `columns` are the
    /// target's writable columns, from [`COLUMNS_QUERY`] (relational layout only).
    pub(crate) fn new(
        entity: &EntitySpec,
        key_type: KeyType,
        target_scope: Option<&str>,
        columns: &[String],
    ) -> Result<Self, SourceError> {
        check_ident("schema", &entity.schema)?;
        check_ident("table", &entity.table)?;
        check_ident("key", &entity.key)?;
        let document = match (entity.layout, &entity.document) {
            (Layout::Koan, Some(document)) => {
                check_ident("document", document)?;
                quote_ident(document)
            }
            (Layout::Koan, None) => return Err(invalid_plan(entity, "no document column")),
            (Layout::Relational, _) => String::new(),
        };
        let version = match &entity.version {
            Some(VersionSource::Column(column)) => {
                check_ident("version", column)?;
                Some(Version::Column(column.clone()))
            }
            Some(VersionSource::JsonPath(path)) => Some(Version::Path(path_literal(path)?)),
            None => None,
        };
        let scope_path = match &entity.scope_match {
            ScopeMatch::Field(field) => {
                check_json_field("scope_field", field)?;
                Some(path_literal(std::slice::from_ref(field))?)
            }
            ScopeMatch::Column(column) => {
                check_ident("scope_column", column)?;
                None
            }
        };
        let scope = match target_scope.or(entity.scope.as_deref()) {
            Some(scope) => {
                check_name("scope", scope)?;
                Some(quote_literal(scope)?)
            }
            None => None,
        };
        if entity.layout == Layout::Relational && columns.is_empty() {
            return Err(invalid_plan(
                entity,
                "the target table has no writable column",
            ));
        }
        Ok(Self {
            schema: quote_ident(&entity.schema),
            table: format!(
                "{}.{}",
                quote_ident(&entity.schema),
                quote_ident(&entity.table)
            ),
            key: quote_ident(&entity.key),
            key_type,
            layout: entity.layout,
            document,
            version,
            scope_match: entity.scope_match.clone(),
            scope_path,
            scope,
            restamp: target_scope.is_some(),
            columns: columns.iter().map(|column| quote_ident(column)).collect(),
        })
    }

    /// Whether a row whose document is not a JSON object cannot be written
    /// (it is the row, or its scope field is re-stamped): its failure is then
    /// `invalid_document` rather than `type_mismatch`.
    pub(crate) fn needs_object_documents(&self) -> bool {
        self.layout == Layout::Relational
            || (self.restamp && matches!(self.scope_match, ScopeMatch::Field(_)))
    }

    /// Writes the rows `seq` in `[$1, $2)` of `rows` to `to`.
    pub(crate) fn write_statement(&self, rows: RowsFrom<'_>, to: WriteTo<'_>) -> String {
        let source = self.source_rows(rows, to);
        let insert = match to {
            WriteTo::Target(mode) => self.insert_into_target(mode),
            WriteTo::Staging(table) => format!(
                "INSERT INTO {}.{} AS t (k, v, d, line_no, raw, part) \
                 SELECT src.key, src.ver, src.doc, src.line_no, src.raw, src.part FROM src \
                 ON CONFLICT (k) DO NOTHING RETURNING 1",
                self.schema,
                quote_ident(table)
            ),
        };
        let count = "SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::text, \
                     NULL::text, count(*) FROM written";
        match (to, &self.scope) {
            (WriteTo::Target(_), Some(scope)) => {
                let found = self.target_scope_expr();
                format!(
                    "WITH src AS ({source}), \
                     conflicts AS (SELECT src.seq, src.k_text, src.line_no, src.part, src.raw, \
                     {found} AS found FROM src JOIN {table} AS t ON t.{key} = src.key \
                     WHERE {found} IS DISTINCT FROM {scope}), \
                     written AS ({insert}) \
                     SELECT c.seq, c.k_text, c.line_no, c.part, c.raw, c.found, NULL::bigint \
                     FROM conflicts AS c UNION ALL {count}",
                    table = self.table,
                    key = self.key,
                )
            }
            _ => format!("WITH src AS ({source}), written AS ({insert}) {count}"),
        }
    }

    /// The rows to write, one per key (the last line wins within an import).
    /// Rows stay in `seq` order: an archive part is in key order already.
    fn source_rows(&self, rows: RowsFrom<'_>, to: WriteTo<'_>) -> String {
        let (relation, k_text, key, doc, ver) = match rows {
            RowsFrom::Import => (
                "pg_temp.koan_import".to_string(),
                "s.k",
                format!("s.k::{}", self.key_type.sql()),
                self.restamped("s.d::jsonb"),
                "nullif(s.v::jsonb, 'null'::jsonb)",
            ),
            RowsFrom::Staging(table) => (
                format!("{}.{}", self.schema, quote_ident(table)),
                "s.k::text",
                "s.k".to_string(),
                "s.d".to_string(),
                "s.v",
            ),
        };
        let common = format!("s.seq, {k_text} AS k_text, s.line_no, s.part, s.raw");
        let bounds = "s.seq >= $1 AND s.seq < $2";
        let rows_sql = if self.layout == Layout::Relational && matches!(to, WriteTo::Target(_)) {
            format!(
                "SELECT {common}, (r).{key_column} AS key, r AS rec FROM {relation} AS s \
                 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, {doc}) AS r WHERE {bounds}",
                key_column = self.key,
                table = self.table,
            )
        } else {
            format!(
                "SELECT {common}, {key} AS key, {doc} AS doc, {ver} AS ver \
                 FROM {relation} AS s WHERE {bounds}"
            )
        };
        match rows {
            // A key twice in one import: the last line wins. An anti-join on the
            // key hashes keys only; sorting whole rows would spill to disk. Bounded
            // to the range too: a bad key elsewhere must not fail this range's cast.
            RowsFrom::Import => format!(
                "{rows_sql} AND NOT EXISTS (SELECT 1 FROM pg_temp.koan_import AS later \
                 WHERE later.seq >= $1 AND later.seq < $2 AND later.seq > s.seq \
                 AND later.k::{key_type} = s.k::{key_type})",
                key_type = self.key_type.sql()
            ),
            RowsFrom::Staging(_) => rows_sql,
        }
    }

    /// The imported document, its scope marker re-stamped when restoring into another scope.
    fn restamped(&self, doc: &str) -> String {
        let Some(scope) = self.scope.as_ref().filter(|_| self.restamp) else {
            return doc.to_string();
        };
        match (&self.scope_path, &self.scope_match, self.layout) {
            (Some(path), _, _) => format!("jsonb_set({doc}, {path}, to_jsonb({scope}::text))"),
            (None, ScopeMatch::Column(column), Layout::Relational) => format!(
                "({doc} || jsonb_build_object({}, {scope}::text))",
                literal(column)
            ),
            // A Koan row's scope column is set when it is written.
            _ => doc.to_string(),
        }
    }

    /// The scope of the existing target row `t`, as text.
    fn target_scope_expr(&self) -> String {
        match (&self.scope_match, self.layout) {
            (ScopeMatch::Field(field), Layout::Koan) => {
                format!("(t.{}::jsonb ->> {})", self.document, literal(field))
            }
            (ScopeMatch::Field(field), Layout::Relational) => {
                format!("(to_jsonb(t.*) ->> {})", literal(field))
            }
            (ScopeMatch::Column(column), _) => format!("t.{}::text", quote_ident(column)),
        }
    }

    fn insert_into_target(&self, mode: RestoreMode) -> String {
        let mut columns: Vec<String> = Vec::new();
        let mut values: Vec<String> = Vec::new();
        let mut updates: Vec<String> = Vec::new();
        let mut lateral = String::new();
        let mut overriding = "";
        match self.layout {
            Layout::Koan => {
                columns.extend([self.key.clone(), self.document.clone()]);
                values.extend(["src.key".to_string(), "src.doc".to_string()]);
                updates.push(format!("{0} = EXCLUDED.{0}", self.document));
                // Version and scope columns take the archived JSON through the
                // table's own row type, so any column type converts as it would on input.
                let mut converted = Vec::new();
                if let Some(Version::Column(column)) = &self.version {
                    let quoted = quote_ident(column);
                    updates.push(format!("{quoted} = EXCLUDED.{quoted}"));
                    values.push(format!("e.{quoted}"));
                    columns.push(quoted);
                    converted.push(format!("{}, src.ver", literal(column)));
                }
                if let (ScopeMatch::Column(column), Some(scope)) = (&self.scope_match, &self.scope)
                {
                    let quoted = quote_ident(column);
                    values.push(format!("e.{quoted}"));
                    columns.push(quoted);
                    converted.push(format!("{}, {scope}::text", literal(column)));
                }
                if !converted.is_empty() {
                    lateral = format!(
                        " CROSS JOIN LATERAL jsonb_populate_record(NULL::{}, jsonb_build_object({})) AS e",
                        self.table,
                        converted.join(", ")
                    );
                }
            }
            Layout::Relational => {
                overriding = " OVERRIDING SYSTEM VALUE";
                for column in &self.columns {
                    values.push(format!("(src.rec).{column}"));
                    if *column != self.key {
                        updates.push(format!("{column} = EXCLUDED.{column}"));
                    }
                }
                columns.clone_from(&self.columns);
                if updates.is_empty() {
                    updates.push(format!("{0} = EXCLUDED.{0}", self.key));
                }
            }
        }
        let mut conditions = Vec::new();
        if let Some(scope) = &self.scope {
            conditions.push(format!("{} = {scope}", self.target_scope_expr()));
        }
        let action = match mode {
            RestoreMode::SkipExisting | RestoreMode::Replace => "DO NOTHING".to_string(),
            RestoreMode::Overwrite | RestoreMode::Merge => {
                if mode == RestoreMode::Merge
                    && let Some(newer) = self.newer_condition()
                {
                    conditions.push(newer);
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
            "INSERT INTO {table} AS t ({columns}){overriding} SELECT {values} FROM src{lateral} \
             ON CONFLICT ({key}) {action} RETURNING 1",
            table = self.table,
            columns = columns.join(", "),
            values = values.join(", "),
            key = self.key,
        )
    }

    /// `merge`: the archived row (`EXCLUDED`) is strictly newer than the target's
    /// row `t`. A missing or JSON-null version: the target's counts as older, an
    /// archived one never wins. `None` when the entity has no version.
    fn newer_condition(&self) -> Option<String> {
        let (old, new) = match (&self.version, self.layout) {
            (None, _) => return None,
            (Some(Version::Column(column)), _) => {
                let quoted = quote_ident(column);
                (
                    format!("to_jsonb(t.{quoted})"),
                    format!("to_jsonb(EXCLUDED.{quoted})"),
                )
            }
            (Some(Version::Path(path)), layout) => match layout {
                Layout::Koan => (
                    format!("(t.{}::jsonb #> {path})", self.document),
                    format!("(EXCLUDED.{}::jsonb #> {path})", self.document),
                ),
                Layout::Relational => (
                    format!("(to_jsonb(t.*) #> {path})"),
                    format!("(to_jsonb(EXCLUDED.*) #> {path})"),
                ),
            },
        };
        let old = format!("nullif({old}, 'null'::jsonb)");
        let new = format!("nullif({new}, 'null'::jsonb)");
        Some(format!("coalesce({old} < {new}, {new} IS NOT NULL)"))
    }

    /// `replace`: removes the scope's rows (every row when unscoped).
    pub(crate) fn delete_scope_statement(&self) -> String {
        match &self.scope {
            Some(scope) => format!(
                "DELETE FROM {} AS t WHERE {} = {scope}",
                self.table,
                self.target_scope_expr()
            ),
            None => format!("DELETE FROM {} AS t", self.table),
        }
    }

    fn relation(&self, rows: RowsFrom<'_>) -> String {
        match rows {
            RowsFrom::Import => "pg_temp.koan_import".to_string(),
            RowsFrom::Staging(table) => format!("{}.{}", self.schema, quote_ident(table)),
        }
    }

    /// Key, line number, part and raw line of the row `seq = $1`.
    pub(crate) fn row_statement(&self, rows: RowsFrom<'_>) -> String {
        format!(
            "SELECT s.k::text, s.line_no, s.part, s.raw FROM {} AS s WHERE s.seq = $1",
            self.relation(rows)
        )
    }

    /// The JSON type of the document of row `seq = $1` (fails when it is not JSON).
    pub(crate) fn document_probe(&self, rows: RowsFrom<'_>) -> String {
        format!(
            "SELECT jsonb_typeof(s.d::jsonb) FROM {} AS s WHERE s.seq = $1",
            self.relation(rows)
        )
    }

    /// Makes range retries cheap once row isolation starts.
    pub(crate) fn index_statement(&self, rows: RowsFrom<'_>) -> String {
        let relation = self.relation(rows);
        format!("CREATE INDEX ON {relation} (seq); ANALYZE {relation}")
    }

    /// `min(seq), max(seq)` of the rows.
    pub(crate) fn bounds_statement(&self, rows: RowsFrom<'_>) -> String {
        format!(
            "SELECT min(s.seq), max(s.seq) FROM {} AS s",
            self.relation(rows)
        )
    }

    /// Serialises applies of one staging table (a second one finds it gone).
    pub(crate) fn lock_staging_statement(&self, table: &str) -> String {
        format!(
            "LOCK TABLE {}.{} IN ACCESS EXCLUSIVE MODE",
            self.schema,
            quote_ident(table)
        )
    }
}

/// Drops a staging table, if it exists.
pub(crate) fn drop_staging_statement(
    entity: &EntitySpec,
    table: &str,
) -> Result<String, SourceError> {
    check_ident("schema", &entity.schema)?;
    check_staging_name(table)?;
    Ok(format!(
        "DROP TABLE IF EXISTS {}.{}",
        quote_ident(&entity.schema),
        quote_ident(table)
    ))
}

/// The `replace` staging table: typed key (the target's), `jsonb` document.
pub(crate) fn create_staging_statement(
    entity: &EntitySpec,
    table: &str,
    key_type: KeyType,
) -> Result<String, SourceError> {
    check_ident("schema", &entity.schema)?;
    check_staging_name(table)?;
    Ok(format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {}.{} (seq bigserial NOT NULL, k {} PRIMARY KEY, \
         v jsonb, d jsonb NOT NULL, line_no bigint, raw text, part text)",
        quote_ident(&entity.schema),
        quote_ident(table),
        key_type.sql()
    ))
}

/// A missing Koan-layout table: its schema, then the table (key, `jsonb`
/// document, a `jsonb` version column and a `text` scope column when the entity has them).
pub(crate) fn create_target_statements(entity: &EntitySpec) -> Result<[String; 2], SourceError> {
    check_ident("schema", &entity.schema)?;
    check_ident("table", &entity.table)?;
    check_ident("key", &entity.key)?;
    let Some(key_type) = entity.key_type else {
        return Err(invalid_plan(entity, "the archived entity has no key type"));
    };
    let Some(document) = entity
        .document
        .as_deref()
        .filter(|_| entity.layout == Layout::Koan)
    else {
        return Err(invalid_plan(
            entity,
            "only a koan-layout table can be created",
        ));
    };
    check_ident("document", document)?;
    let mut columns = vec![
        format!(
            "{} {} PRIMARY KEY",
            quote_ident(&entity.key),
            key_type.sql()
        ),
        format!("{} jsonb NOT NULL", quote_ident(document)),
    ];
    if let Some(VersionSource::Column(column)) = &entity.version {
        check_ident("version", column)?;
        columns.push(format!("{} jsonb", quote_ident(column)));
    }
    if let ScopeMatch::Column(column) = &entity.scope_match {
        check_ident("scope_column", column)?;
        columns.push(format!("{} text", quote_ident(column)));
    }
    let schema = quote_ident(&entity.schema);
    Ok([
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {schema}.{} ({})",
            quote_ident(&entity.table),
            columns.join(", ")
        ),
    ])
}

/// A checked name (JSON field or column) as a literal; names never hold quotes or NUL.
fn literal(name: &str) -> String {
    format!("'{}'", name.replace('\'', "''"))
}

fn invalid_plan(entity: &EntitySpec, reason: &str) -> SourceError {
    SourceError::Invalid(ProtocolError::InvalidPlan {
        plan_id: String::new(),
        reason: format!("entity '{}': {reason}", entity.name.escape_default()),
    })
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
