//! `replace` into a Koan-layout table that does not exist yet: the parts are
//! loaded, in parallel and already typed, into a hidden table of the target's
//! final shape (the *load table*, `koan_load_<operation>_<entity>`), and the
//! apply renames it into place and adds its key. PostgreSQL then parses every
//! document once, spread over the imports' connections, and writes every row
//! once; there is no second copy into the target (`source/design.md`,
//! "Into a missing table").
//!
//! The staging table of the restore still exists beside it: it keeps the
//! parts' marker rows (a part is loaded once, and the marker records how many
//! rows it loaded) and the rows of any part that could not be loaded typed,
//! staged as text and written after the swap with row isolation.

use bytes::{BufMut, BytesMut};
use koan_protocol::names::{check_ident, quote_ident, quote_literal};
use koan_protocol::plan::{EntitySpec, KeyType, Layout, ScopeMatch, VersionSource};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::error::SourceError;
use crate::postgres::merge::{self, check_staging_name};
use crate::rows::ImportLine;
use crate::staging::STAGING_PREFIX;

/// Every load table's name starts with this.
pub(crate) const LOAD_PREFIX: &str = "koan_load_";

const TABLE_EXISTS: &str = "SELECT 1 FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2";

/// The load table that goes with a staging table: `koan_load_` and the
/// staging table's suffix (one byte shorter, so it fits wherever that fits).
pub(crate) fn load_table_name(staging: &str) -> Result<String, SourceError> {
    check_staging_name(staging)?;
    Ok(format!("{LOAD_PREFIX}{}", &staging[STAGING_PREFIX.len()..]))
}

/// Whether a missing target of `entity` may be restored through a load
/// table: a Koan-layout entity with a known key type whose documents are
/// written as archived (no scope field to re-stamp).
pub(crate) fn loadable(entity: &EntitySpec, target_scope: Option<&str>) -> bool {
    entity.layout == Layout::Koan
        && entity.key_type.is_some()
        && entity.document.is_some()
        && !(target_scope.is_some() && matches!(entity.scope_match, ScopeMatch::Field(_)))
}

/// Whether `schema.table` exists (any relation kind).
pub(crate) async fn table_exists(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<bool, SourceError> {
    client
        .query_opt(TABLE_EXISTS, &[&schema, &table])
        .await
        .map(|row| row.is_some())
        .map_err(|error| SourceError::query(format!("look up table {schema}.{table}"), error))
}

/// One entity's load table: its names and how an archived line becomes one
/// of its rows (binary `COPY`, in the target's own types).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoadTable {
    /// Unquoted, for catalog lookups.
    schema: String,
    /// Unquoted.
    name: String,
    key_type: KeyType,
    /// `"schema"."koan_load_..."`.
    relation: String,
    /// The quoted columns, in `COPY` order: key, document, [version], [scope].
    columns: Vec<String>,
    version_column: bool,
    /// The value of the scope column, when the entity has one.
    scope_value: Option<String>,
}

impl LoadTable {
    /// The load table of `entity` beside `staging`; `None` when the entity is
    /// not [`loadable`] with this target scope.
    pub(crate) fn new(
        entity: &EntitySpec,
        staging: &str,
        target_scope: Option<&str>,
    ) -> Result<Option<Self>, SourceError> {
        if !loadable(entity, target_scope) {
            return Ok(None);
        }
        let (Some(key_type), Some(document)) = (entity.key_type, entity.document.as_deref()) else {
            return Ok(None);
        };
        check_ident("schema", &entity.schema)?;
        check_ident("key", &entity.key)?;
        check_ident("document", document)?;
        let name = load_table_name(staging)?;
        let relation = format!("{}.{}", quote_ident(&entity.schema), quote_ident(&name));
        let mut columns = vec![quote_ident(&entity.key), quote_ident(document)];
        let version_column = match &entity.version {
            Some(VersionSource::Column(column)) => {
                check_ident("version", column)?;
                columns.push(quote_ident(column));
                true
            }
            _ => false,
        };
        let scope_value = match &entity.scope_match {
            ScopeMatch::Column(column) => {
                check_ident("scope_column", column)?;
                let value = target_scope.or(entity.scope.as_deref());
                if value.is_some() {
                    columns.push(quote_ident(column));
                }
                value.map(str::to_string)
            }
            ScopeMatch::Field(_) => None,
        };
        Ok(Some(Self {
            schema: entity.schema.clone(),
            name,
            key_type,
            relation,
            columns,
            version_column,
            scope_value,
        }))
    }

    /// The table's name (unquoted).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Whether it exists: a restore that planned it (the target was missing) created it.
    pub(crate) async fn exists(&self, client: &Client) -> Result<bool, SourceError> {
        table_exists(client, &self.schema, &self.name).await
    }

    /// Its schema, then the table: the target's columns as `prepare_target`
    /// would create them, but no key constraint yet (added at the swap).
    pub(crate) fn create_statements(
        entity: &EntitySpec,
        staging: &str,
    ) -> Result<[String; 2], SourceError> {
        let name = load_table_name(staging)?;
        merge::koan_table_statements(entity, &name, false)
    }

    /// Streams one part's rows into the table.
    pub(crate) fn copy_statement(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            self.relation,
            self.columns.join(", ")
        )
    }

    /// Appends `line` as one binary `COPY` tuple, or returns why it cannot be
    /// loaded typed (then nothing was appended): a key not in its type's
    /// canonical text form, or a document or version with a `\u` escape
    /// (`jsonb` refuses `\u0000` and lone surrogates, and a text cast judges
    /// each row where a failed `COPY` would judge the whole part).
    pub(crate) fn encode_row(
        &self,
        buffer: &mut BytesMut,
        line: &ImportLine<'_>,
    ) -> Result<(), String> {
        let key = TypedKey::parse(self.key_type, line.key).ok_or_else(|| {
            format!(
                "line {}: key {:?} is not a canonical {}",
                line.line_no,
                line.key,
                self.key_type.sql()
            )
        })?;
        let version = line
            .version
            .filter(|version| *version != "null" && self.version_column);
        if line.doc.contains("\\u") || version.is_some_and(|version| version.contains("\\u")) {
            return Err(format!(
                "line {}: a \\u escape, which jsonb may refuse",
                line.line_no
            ));
        }
        buffer.reserve(32 + line.key.len() + line.doc.len() + version.map_or(0, str::len));
        buffer.put_i16(i16::try_from(self.columns.len()).unwrap_or(i16::MAX));
        key.put(buffer);
        put_jsonb(buffer, line.doc);
        if self.version_column {
            match version {
                Some(version) => put_jsonb(buffer, version),
                None => buffer.put_i32(-1),
            }
        }
        if let Some(scope) = &self.scope_value {
            put_bytes(buffer, scope.as_bytes());
        }
        Ok(())
    }

    /// The swap, inside the apply's transaction: when the target is still
    /// missing, the load table becomes it and gets its primary key, and the
    /// rows every part loaded are counted from the staging table's markers;
    /// `None` (everything since undone) when the target exists by now or a
    /// key was loaded twice: then the loaded rows are folded into the staging
    /// table as text ([`Self::fold_into_staging`]).
    pub(crate) async fn swap(
        &self,
        client: &Client,
        entity: &EntitySpec,
        staging: &str,
        context: &str,
    ) -> Result<Option<u64>, SourceError> {
        let query = |error| SourceError::query(context, error);
        if table_exists(client, &entity.schema, &entity.table).await? {
            tracing::info!(
                context,
                "the target exists by now: writing the loaded rows into it"
            );
            return Ok(None);
        }
        check_ident("table", &entity.table)?;
        let target = format!(
            "{}.{}",
            quote_ident(&entity.schema),
            quote_ident(&entity.table)
        );
        let statements = format!(
            "SAVEPOINT koan_swap; ALTER TABLE {} RENAME TO {}; ALTER TABLE {target} ADD PRIMARY KEY ({})",
            self.relation,
            quote_ident(&entity.table),
            quote_ident(&entity.key),
        );
        match client.batch_execute(&statements).await {
            Ok(()) => {}
            Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                tracing::info!(context, %error, "a key was loaded twice: writing the loaded rows deduplicated");
                client
                    .batch_execute("ROLLBACK TO SAVEPOINT koan_swap; RELEASE SAVEPOINT koan_swap")
                    .await
                    .map_err(query)?;
                return Ok(None);
            }
            Err(error) => return Err(query(error)),
        }
        client
            .batch_execute("RELEASE SAVEPOINT koan_swap")
            .await
            .map_err(query)?;
        let markers = format!(
            "SELECT coalesce(sum(loaded), 0)::bigint FROM {}.{} WHERE k IS NULL",
            quote_ident(&entity.schema),
            quote_ident(staging)
        );
        let loaded: i64 = client
            .query_one(&markers, &[])
            .await
            .map_err(query)?
            .try_get(0)
            .map_err(query)?;
        Ok(Some(u64::try_from(loaded).unwrap_or(0)))
    }

    /// Moves the loaded rows into the staging table as text rows (keys in
    /// their canonical text, part named after the load table, no line number)
    /// and drops the load table, inside the apply's transaction: they are then
    /// written like any staged row (deduplicated, other scopes refused,
    /// failures isolated).
    pub(crate) async fn fold_into_staging(
        &self,
        client: &Client,
        entity: &EntitySpec,
        staging: &str,
        context: &str,
    ) -> Result<(), SourceError> {
        let version = if self.version_column {
            format!("l.{}::text", self.columns[2])
        } else {
            "NULL".to_string()
        };
        let statement = format!(
            "INSERT INTO {}.{} (k, v, d, line_no, part) \
             SELECT l.{}::text, {version}, l.{}::text, NULL, {} FROM {} AS l; DROP TABLE {}",
            quote_ident(&entity.schema),
            quote_ident(staging),
            self.columns[0],
            self.columns[1],
            quote_literal(&self.name)?,
            self.relation,
            self.relation,
        );
        client
            .batch_execute(&statement)
            .await
            .map_err(|error| SourceError::query(context, error))
    }
}

/// A key in its binary `COPY` form, parsed only from its canonical text (what
/// PostgreSQL's `::text` of the type prints), so a typed load never accepts
/// a spelling that a text cast would judge differently.
enum TypedKey<'a> {
    Text(&'a str),
    Bigint(i64),
    Integer(i32),
    Uuid([u8; 16]),
}

impl<'a> TypedKey<'a> {
    fn parse(key_type: KeyType, text: &'a str) -> Option<Self> {
        match key_type {
            KeyType::Text => Some(Self::Text(text)),
            KeyType::Bigint => canonical_integer(text)
                .and_then(|digits| digits.parse().ok())
                .map(Self::Bigint),
            KeyType::Integer => canonical_integer(text)
                .and_then(|digits| digits.parse().ok())
                .map(Self::Integer),
            KeyType::Uuid => {
                let bytes = text.as_bytes();
                let hyphens = [8, 13, 18, 23];
                let shaped = bytes.len() == 36
                    && bytes.iter().enumerate().all(|(index, byte)| {
                        if hyphens.contains(&index) {
                            *byte == b'-'
                        } else {
                            byte.is_ascii_digit() || (b'a'..=b'f').contains(byte)
                        }
                    });
                if !shaped {
                    return None;
                }
                uuid::Uuid::try_parse(text)
                    .ok()
                    .map(|id| Self::Uuid(*id.as_bytes()))
            }
        }
    }

    fn put(&self, buffer: &mut BytesMut) {
        match self {
            Self::Text(text) => put_bytes(buffer, text.as_bytes()),
            Self::Bigint(value) => {
                buffer.put_i32(8);
                buffer.put_i64(*value);
            }
            Self::Integer(value) => {
                buffer.put_i32(4);
                buffer.put_i32(*value);
            }
            Self::Uuid(bytes) => {
                buffer.put_i32(16);
                buffer.put_slice(bytes);
            }
        }
    }
}

/// `text` when it is an integer as PostgreSQL prints one: `0`, or an
/// optional minus and digits without a leading zero.
fn canonical_integer(text: &str) -> Option<&str> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|byte| byte.is_ascii_digit())
        && (digits == "0" && digits.len() == text.len() || !digits.starts_with('0'));
    canonical.then_some(text)
}

/// A `jsonb` field in binary form: format version 1, then the JSON text.
fn put_jsonb(buffer: &mut BytesMut, json: &str) {
    buffer.put_i32(i32::try_from(json.len() + 1).unwrap_or(i32::MAX));
    buffer.put_u8(1);
    buffer.put_slice(json.as_bytes());
}

/// Lengths were checked before (`import.rs`, `unstorable`): every field fits an `i32`.
fn put_bytes(buffer: &mut BytesMut, bytes: &[u8]) {
    buffer.put_i32(i32::try_from(bytes.len()).unwrap_or(i32::MAX));
    buffer.put_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    use koan_protocol::plan::Layout;

    fn entity() -> EntitySpec {
        EntitySpec {
            name: "orders".into(),
            schema: "public".into(),
            table: "Order".into(),
            layout: Layout::Koan,
            key: "Id".into(),
            key_type: Some(KeyType::Bigint),
            document: Some("Json".into()),
            version: Some(VersionSource::Column("Version".into())),
            bucket: "b".into(),
            scope: Some("tenant-a".into()),
            scope_match: ScopeMatch::Column("Tenant".into()),
            pool: "default".into(),
            chunk_rows: 1000,
        }
    }

    fn line<'a>(key: &'a str, version: Option<&'a str>, doc: &'a str) -> ImportLine<'a> {
        ImportLine {
            line_no: 4,
            part: "p",
            key,
            version,
            doc,
            raw: doc,
        }
    }

    #[test]
    fn the_load_table_is_named_after_the_staging_table() {
        let staging = merge::staging_table_name("orders", uuid::Uuid::nil());
        let load = load_table_name(&staging).unwrap();
        assert_eq!(load, "koan_load_000000000000_orders");
        assert!(load.len() < staging.len());
        assert!(load_table_name("orders").is_err());
        assert!(load_table_name("koan_stage_x\"; drop table t").is_err());
    }

    #[test]
    fn only_documents_written_as_archived_are_loaded() {
        let mut spec = entity();
        assert!(loadable(&spec, None));
        assert!(
            loadable(&spec, Some("tenant-b")),
            "a scope column is set, not re-stamped"
        );
        spec.scope_match = ScopeMatch::Field("__koan_tenant".into());
        assert!(loadable(&spec, None));
        assert!(!loadable(&spec, Some("tenant-b")), "re-stamped documents");
        spec.layout = Layout::Relational;
        assert!(!loadable(&spec, None));
        let mut unknown = entity();
        unknown.key_type = None;
        assert!(!loadable(&unknown, None));
    }

    #[test]
    fn copies_key_document_version_and_scope_in_their_types() {
        let table = LoadTable::new(&entity(), "koan_stage_0_orders", Some("tenant-b"))
            .unwrap()
            .unwrap();
        assert_eq!(
            table.copy_statement(),
            "COPY \"public\".\"koan_load_0_orders\" (\"Id\", \"Json\", \"Version\", \"Tenant\") FROM STDIN (FORMAT binary)"
        );
        let mut buffer = BytesMut::new();
        table
            .encode_row(&mut buffer, &line("-42", Some("3"), "{\"a\":1}"))
            .unwrap();
        let mut expected = BytesMut::new();
        expected.put_i16(4);
        expected.put_i32(8);
        expected.put_i64(-42);
        expected.put_i32(8);
        expected.put_u8(1);
        expected.put_slice(b"{\"a\":1}");
        expected.put_i32(2);
        expected.put_u8(1);
        expected.put_slice(b"3");
        expected.put_i32(8);
        expected.put_slice(b"tenant-b");
        assert_eq!(buffer, expected);

        let mut null_version = BytesMut::new();
        table
            .encode_row(&mut null_version, &line("7", Some("null"), "{}"))
            .unwrap();
        assert_eq!(
            &null_version[2 + 12 + 7..2 + 12 + 7 + 4],
            &(-1_i32).to_be_bytes()
        );
    }

    #[test]
    fn refuses_what_a_text_cast_would_judge_row_by_row() {
        let table = LoadTable::new(&entity(), "koan_stage_0_orders", None)
            .unwrap()
            .unwrap();
        for key in [
            "07",
            "+7",
            " 7",
            "7.0",
            "",
            "-",
            "-0",
            "99999999999999999999",
            "x",
        ] {
            let mut buffer = BytesMut::new();
            assert!(
                table
                    .encode_row(&mut buffer, &line(key, None, "{}"))
                    .is_err(),
                "{key:?}"
            );
            assert!(buffer.is_empty(), "nothing appended for {key:?}");
        }
        for key in ["0", "7", "-7", "9223372036854775807"] {
            let mut buffer = BytesMut::new();
            assert!(
                table
                    .encode_row(&mut buffer, &line(key, None, "{}"))
                    .is_ok(),
                "{key:?}"
            );
        }
        let mut buffer = BytesMut::new();
        assert!(
            table
                .encode_row(&mut buffer, &line("1", None, "{\"a\":\"\\u0000\"}"))
                .is_err()
        );
        assert!(
            table
                .encode_row(&mut buffer, &line("1", Some("\"\\ud800\""), "{}"))
                .is_err()
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn uuid_keys_only_in_canonical_form() {
        let id = "0193a3c0-7b2e-7c3d-8e4f-0123456789ab";
        let TypedKey::Uuid(bytes) = TypedKey::parse(KeyType::Uuid, id).unwrap() else {
            panic!("not a uuid key");
        };
        assert_eq!(uuid::Uuid::from_bytes(bytes).to_string(), id);
        for spelling in [
            "0193A3C0-7B2E-7C3D-8E4F-0123456789AB",
            "0193a3c07b2e7c3d8e4f0123456789ab",
            "{0193a3c0-7b2e-7c3d-8e4f-0123456789ab}",
            "urn:uuid:0193a3c0-7b2e-7c3d-8e4f-0123456789ab",
        ] {
            assert!(
                TypedKey::parse(KeyType::Uuid, spelling).is_none(),
                "{spelling}"
            );
        }
        assert!(TypedKey::parse(KeyType::Integer, "2147483648").is_none());
        assert!(TypedKey::parse(KeyType::Integer, "-2147483648").is_some());
    }
}
