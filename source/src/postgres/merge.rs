//! SQL text of restores: the tables a restore creates, and the statements that
//! write imported or staged rows into a target. Pure functions, unit-tested.
//!
//! Rows come from the import's `TEMP` table or from a `replace` staging table:
//! both are all text, fed by binary `COPY`. A write statement takes the `seq` range
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
    /// A `replace` staging table in the target's schema: the same text
    /// columns, plus one marker row per staged part (`k IS NULL`).
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

    /// Writes the rows `seq` in `[$1, $2)` of `rows` into the target, per
    /// `mode` (`replace`: plain inserts into the emptied scope).
    pub(crate) fn write_statement(&self, rows: RowsFrom<'_>, mode: RestoreMode) -> String {
        self.write_into(rows, Some(mode))
    }

    /// `replace` into a target that is empty and has no key index for now
    /// (see `restore.rs`): plain inserts of every staged row, with no
    /// deduplication, arbiter or scope conflicts. The key constraint, added
    /// back afterwards, fails if a key came twice, and the rows are then
    /// written again with [`Self::write_statement`].
    pub(crate) fn load_statement(&self, rows: RowsFrom<'_>) -> String {
        self.write_into(rows, None)
    }

    fn write_into(&self, rows: RowsFrom<'_>, mode: Option<RestoreMode>) -> String {
        let source = self.source_rows(rows, mode.is_some());
        let insert = self.insert_into_target(mode);
        let count = "SELECT NULL::bigint, NULL::text, NULL::bigint, NULL::text, NULL::text, \
                     NULL::text, count(*) FROM written";
        match self.scope.as_ref().filter(|_| mode.is_some()) {
            Some(scope) => {
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

    /// The rows to write, one per key: within an import the last line wins,
    /// within a staging table the first row staged. Rows stay in `seq` order: an
    /// archive part is in key order already. `dedup: false` leaves duplicate
    /// keys in (a load into an empty target, where adding the key constraint
    /// back finds them).
    fn source_rows(&self, rows: RowsFrom<'_>, dedup: bool) -> String {
        let relation = self.relation(rows);
        let key = format!("s.k::{}", self.key_type.sql());
        let doc = self.restamped("s.d::jsonb");
        let ver = "nullif(s.v::jsonb, 'null'::jsonb)";
        let common = format!(
            "s.seq, s.k AS k_text, s.line_no, s.part, {}",
            self.raw_line(rows)
        );
        // Staging marker rows (`k IS NULL`) are never written.
        let bounds = match rows {
            RowsFrom::Import => "s.seq >= $1 AND s.seq < $2",
            RowsFrom::Staging(_) => "s.seq >= $1 AND s.seq < $2 AND s.k IS NOT NULL",
        };
        let rows_sql = if self.layout == Layout::Relational {
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
        if !dedup {
            return rows_sql;
        }
        // A key twice: the last line wins. An anti-join on the key hashes keys
        // only; sorting whole rows would spill to disk.
        match rows {
            // Within an import, bounded to the range: a bad key elsewhere must
            // not fail this range's cast.
            RowsFrom::Import => format!(
                "{rows_sql} AND NOT EXISTS (SELECT 1 FROM {relation} AS later \
                 WHERE later.seq >= $1 AND later.seq < $2 AND later.seq > s.seq \
                 AND later.k::{key_type} = s.k::{key_type})",
                key_type = self.key_type.sql()
            ),
            // Across the whole staging table, comparing the keys' text (archived
            // keys are in their canonical text form): the first staged copy
            // wins, as in SQLite, even when row isolation writes the rows in
            // several ranges.
            RowsFrom::Staging(_) => format!(
                "{rows_sql} AND NOT EXISTS (SELECT 1 FROM {relation} AS earlier \
                 WHERE earlier.seq < s.seq AND earlier.k = s.k)"
            ),
        }
    }

    /// The row's archive line: as imported, or, from a staging table (which
    /// keeps no raw lines), rebuilt from its fields in the archive's line format.
    fn raw_line(&self, rows: RowsFrom<'_>) -> String {
        if rows == RowsFrom::Import {
            return "s.raw".to_string();
        }
        let id = if self.key_type.is_numeric() {
            "s.k"
        } else {
            "to_json(s.k)::text"
        };
        format!(
            "'{{\"id\":' || {id} || coalesce(',\"v\":' || s.v, '') || ',\"doc\":' || s.d || '}}' AS raw"
        )
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

    /// The `INSERT` of `src` into the target; `None`: no `ON CONFLICT` clause.
    fn insert_into_target(&self, mode: Option<RestoreMode>) -> String {
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
            None => String::new(),
            Some(RestoreMode::SkipExisting | RestoreMode::Replace) => {
                format!(" ON CONFLICT ({}) DO NOTHING", self.key)
            }
            Some(mode @ (RestoreMode::Overwrite | RestoreMode::Merge)) => {
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
                format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}{filter}",
                    self.key,
                    updates.join(", ")
                )
            }
        };
        format!(
            "INSERT INTO {table} AS t ({columns}){overriding} SELECT {values} FROM src{lateral}\
             {action} RETURNING 1",
            table = self.table,
            columns = columns.join(", "),
            values = values.join(", "),
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
            "SELECT s.k, s.line_no, s.part, {} FROM {} AS s WHERE s.seq = $1",
            self.raw_line(rows),
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

    /// `min(seq), max(seq)` and the number of rows (staging markers not counted).
    pub(crate) fn bounds_statement(&self, rows: RowsFrom<'_>) -> String {
        format!(
            "SELECT min(s.seq), max(s.seq), count(s.k) FROM {} AS s",
            self.relation(rows)
        )
    }

    /// Streams one part's rows into a `replace` staging table (binary, no
    /// casts: every column is text, so no value can break it).
    pub(crate) fn staging_copy_statement(&self, table: &str) -> String {
        format!(
            "COPY {}.{} (k, v, d, line_no, part) FROM STDIN (FORMAT binary)",
            self.schema,
            quote_ident(table)
        )
    }

    /// Records that part `$1` is staged (`$2`: the rows it loaded into the
    /// load table, NULL when they are in the staging table); inserts nothing
    /// when it already was (the table's exclusion constraint; a concurrent
    /// import of the same part waits for the first to end).
    pub(crate) fn staging_marker_statement(&self, table: &str) -> String {
        format!(
            "INSERT INTO {}.{} (part, loaded) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            self.schema,
            quote_ident(table)
        )
    }

    /// The target's one index, when it is the key's own primary key or unique
    /// constraint, nothing refers to it, and its index has neither storage
    /// parameters nor its own tablespace (which the constraint's definition
    /// would not carry), with the constraint's name and definition: `(name,
    /// definition)`, or no row. Only such a target may have its key
    /// constraint dropped for a load and added back after.
    pub(crate) fn sole_key_constraint_statement(&self) -> String {
        format!(
            "SELECT c.conname::text, pg_catalog.pg_get_constraintdef(c.oid) \
             FROM pg_catalog.pg_constraint AS c JOIN pg_catalog.pg_class AS r ON r.oid = c.conrelid \
             JOIN pg_catalog.pg_class AS ci ON ci.oid = c.conindid \
             WHERE c.conrelid = {name}::regclass AND c.contype IN ('p', 'u') AND r.relkind = 'r' \
             AND ci.reloptions IS NULL AND ci.reltablespace = 0 \
             AND (SELECT count(*) FROM pg_catalog.pg_index AS i WHERE i.indrelid = c.conrelid) = 1 \
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint AS f WHERE f.confrelid = c.conrelid) \
             AND NOT EXISTS (SELECT 1 FROM {table})",
            table = self.table,
            name = literal(&self.table),
        )
    }

    /// Drops the key constraint `name` found by [`Self::sole_key_constraint_statement`].
    pub(crate) fn drop_constraint_statement(&self, name: &str) -> String {
        format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            self.table,
            quote_ident(name)
        )
    }

    /// Adds it back, as it was defined.
    pub(crate) fn add_constraint_statement(&self, name: &str, definition: &str) -> String {
        format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {definition}",
            self.table,
            quote_ident(name)
        )
    }
}

/// Serialises applies of one staging table (a second one finds it gone).
pub(crate) fn lock_staging_statement(
    entity: &EntitySpec,
    table: &str,
) -> Result<String, SourceError> {
    check_ident("schema", &entity.schema)?;
    check_staging_name(table)?;
    Ok(format!(
        "LOCK TABLE {}.{} IN ACCESS EXCLUSIVE MODE",
        quote_ident(&entity.schema),
        quote_ident(table)
    ))
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

/// The `replace` staging table: the import table's text columns but the raw
/// line (rebuilt when a row fails), no index on the rows, and one marker row
/// per staged part (`k IS NULL`) that an exclusion constraint keeps unique,
/// so a part imported twice is staged once. A part loaded into the restore's
/// load table (`load.rs`) has only its marker here, with the rows it loaded
/// in `loaded`.
pub(crate) fn create_staging_statement(
    entity: &EntitySpec,
    table: &str,
) -> Result<String, SourceError> {
    check_ident("schema", &entity.schema)?;
    check_staging_name(table)?;
    Ok(format!(
        "CREATE UNLOGGED TABLE IF NOT EXISTS {}.{} (seq bigserial NOT NULL, k text, v text, \
         d text, line_no bigint, part text NOT NULL, loaded bigint, \
         EXCLUDE USING btree (part WITH =) WHERE (k IS NULL))",
        quote_ident(&entity.schema),
        quote_ident(table),
    ))
}

/// A missing Koan-layout table: its schema, then the table (key, `jsonb`
/// document, a `jsonb` version column and a `text` scope column when the entity has them).
pub(crate) fn create_target_statements(entity: &EntitySpec) -> Result<[String; 2], SourceError> {
    check_ident("table", &entity.table)?;
    koan_table_statements(entity, &entity.table, true)
}

/// The schema and a Koan-layout table named `table` with the columns a
/// missing target gets, its key the primary key or, without
/// `key_constraint`, only `NOT NULL` (a `replace` load table, keyed when it
/// becomes the target).
pub(crate) fn koan_table_statements(
    entity: &EntitySpec,
    table: &str,
    key_constraint: bool,
) -> Result<[String; 2], SourceError> {
    check_ident("schema", &entity.schema)?;
    check_ident("table", table)?;
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
    let key = if key_constraint {
        "PRIMARY KEY"
    } else {
        "NOT NULL"
    };
    let mut columns = vec![
        format!("{} {} {key}", quote_ident(&entity.key), key_type.sql()),
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
            quote_ident(table),
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
