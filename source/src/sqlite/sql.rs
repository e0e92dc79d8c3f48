//! SQL text for reading one entity out of SQLite: counting, boundaries and the
//! export query. Identifiers are checked and quoted (`"..."`, as in
//! PostgreSQL); field names and paths are checked and inlined as quoted
//! literals; every value (bounds, scope, step) is a bound parameter.
//!
//! The table is aliased `t`. The document is `json(t."Json")`: SQLite
//! validates it (a document that is not JSON fails the export loudly) and
//! minifies it. The scope and version go through koan's functions
//! (`functions.rs`), so they mean what they mean in PostgreSQL.

use koan_protocol::archive::KeyRange;
use koan_protocol::names::{check_ident, check_json_field, check_name, quote_ident, quote_literal};
use koan_protocol::plan::{EntitySpec, KeyType, ScopeMatch, VersionSource};
use rusqlite::types::Value;

use crate::error::SourceError;
use crate::sqlite::catalog::{check_supported, not_supported};

/// The SQL fragments of one entity.
#[derive(Debug, Clone)]
pub(crate) struct EntitySql {
    /// `"table" AS t`.
    from: String,
    /// `t."Id"`.
    key: String,
    /// `t."Json"`.
    doc: String,
    /// The version as JSON text, or `NULL`.
    version_json: String,
    /// Left-hand side of the scope comparison and the scope, when scoped.
    scope: Option<(String, String)>,
}

impl EntitySql {
    /// Checks every name of `entity` (again: it may have come off the wire) and builds the fragments.
    pub(crate) fn new(entity: &EntitySpec) -> Result<Self, SourceError> {
        check_supported(entity)?;
        check_ident("table", &entity.table)?;
        check_ident("key", &entity.key)?;
        let column = |name: &str| format!("t.{}", quote_ident(name));
        let Some(document) = &entity.document else {
            return Err(not_supported(
                "an entity without a document column",
                "a Koan-layout entity needs a document column",
            ));
        };
        check_ident("document", document)?;
        let doc = column(document);
        let version_json = match &entity.version {
            None => "NULL".to_string(),
            Some(VersionSource::Column(name)) => {
                check_ident("version", name)?;
                format!("koan_value_json({})", column(name))
            }
            Some(VersionSource::JsonPath(path)) => {
                format!("koan_path_json({doc}, {})", path_literal(path)?)
            }
        };
        let scope = match &entity.scope {
            None => None,
            Some(scope) => {
                check_name("scope", scope)?;
                Some((
                    scope_expr(&entity.scope_match, "t", document)?,
                    scope.clone(),
                ))
            }
        };
        Ok(Self {
            from: format!("{} AS t", quote_ident(&entity.table)),
            key: column(&entity.key),
            doc,
            version_json,
            scope,
        })
    }

    /// ` WHERE <scope> = ?1` when scoped, with its parameter.
    fn scope_filter(&self, params: &mut Vec<Value>) -> String {
        match &self.scope {
            Some((lhs, value)) => {
                params.push(Value::Text(value.clone()));
                format!(" WHERE {lhs} = ?{}", params.len())
            }
            None => String::new(),
        }
    }

    /// Row count and average document size in bytes, over the scope.
    pub(crate) fn count_query(&self) -> (String, Vec<Value>) {
        let mut params = Vec::new();
        let filter = self.scope_filter(&mut params);
        let sql = format!(
            "SELECT count(*), coalesce(avg(octet_length({})), 0.0) FROM {}{filter}",
            self.doc, self.from
        );
        (sql, params)
    }

    /// Keys at row numbers `N+1, 2N+1, ...` in key order: the chunk boundaries.
    pub(crate) fn boundary_query(&self, step: i64) -> (String, Vec<Value>) {
        let mut params = Vec::new();
        let filter = self.scope_filter(&mut params);
        params.push(Value::Integer(step));
        let sql = format!(
            "SELECT s.k FROM (SELECT {key} AS k, row_number() OVER (ORDER BY {key}) AS rn \
             FROM {from}{filter}) AS s WHERE s.rn > 1 AND (s.rn - 1) % ?{step} = 0 ORDER BY s.rn",
            key = self.key,
            from = self.from,
            step = params.len(),
        );
        (sql, params)
    }

    /// `SELECT key, version, doc ... ORDER BY key` for one range, after `after_key`.
    pub(crate) fn export_query(
        &self,
        key_type: KeyType,
        range: &KeyRange,
        after_key: Option<&str>,
    ) -> Result<(String, Vec<Value>), SourceError> {
        let mut params = Vec::new();
        let mut conditions = Vec::new();
        for (operator, bound) in [
            (">=", range.lo.as_deref()),
            ("<", range.hi.as_deref()),
            (">", after_key),
        ] {
            if let Some(bound) = bound {
                params.push(key_value(key_type, bound)?);
                conditions.push(format!("{} {operator} ?{}", self.key, params.len()));
            }
        }
        if let Some((lhs, value)) = &self.scope {
            params.push(Value::Text(value.clone()));
            conditions.push(format!("{lhs} = ?{}", params.len()));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {key}, {version}, coalesce(json({doc}), 'null') FROM {from}{filter} ORDER BY {key}",
            key = self.key,
            version = self.version_json,
            doc = self.doc,
            from = self.from,
        );
        Ok((sql, params))
    }
}

/// The scope of row `alias` as text: `koan_field_text(alias."Json", 'field')`
/// (PostgreSQL's `->>`) or `CAST(alias."col" AS TEXT)`.
pub(crate) fn scope_expr(
    scope_match: &ScopeMatch,
    alias: &str,
    document: &str,
) -> Result<String, SourceError> {
    Ok(match scope_match {
        ScopeMatch::Field(field) => {
            check_json_field("scope_field", field)?;
            format!(
                "koan_field_text({alias}.{}, {})",
                quote_ident(document),
                quote_literal(field)?
            )
        }
        ScopeMatch::Column(name) => {
            check_ident("scope_column", name)?;
            format!("CAST({alias}.{} AS TEXT)", quote_ident(name))
        }
    })
}

/// A JSON path of checked field names as a quoted JSON-array literal: `'["meta","v"]'`.
pub(crate) fn path_literal(path: &[String]) -> Result<String, SourceError> {
    if path.is_empty() {
        return Err(SourceError::Invalid(
            koan_protocol::ProtocolError::InvalidName {
                field: "version".into(),
                value: "$.".into(),
                reason: "a JSON path needs at least one field",
            },
        ));
    }
    let mut fields = Vec::with_capacity(path.len());
    for field in path {
        check_json_field("version", field)?;
        // The field check refuses quotes and backslashes: nothing to escape.
        fields.push(format!("\"{field}\""));
    }
    Ok(quote_literal(&format!("[{}]", fields.join(",")))?)
}

/// A key bound as the key type's SQLite value, after checking it parses as one.
pub(crate) fn key_value(key_type: KeyType, key: &str) -> Result<Value, SourceError> {
    let invalid = || SourceError::InvalidKey {
        key: key.escape_default().take(200).collect(),
        key_type: key_type.sql(),
    };
    match key_type {
        KeyType::Text => {
            if key.contains('\0') {
                return Err(invalid());
            }
            Ok(Value::Text(key.to_string()))
        }
        KeyType::Uuid => {
            uuid::Uuid::parse_str(key).map_err(|_| invalid())?;
            Ok(Value::Text(key.to_string()))
        }
        KeyType::Bigint => parse_integer_key(key)
            .map(Value::Integer)
            .ok_or_else(invalid),
        KeyType::Integer => parse_integer_key(key)
            .filter(|value| i32::try_from(*value).is_ok())
            .map(Value::Integer)
            .ok_or_else(invalid),
    }
}

/// An integer key as PostgreSQL's `int8in` reads it: surrounding whitespace,
/// an optional sign, decimal digits.
pub(crate) fn parse_integer_key(key: &str) -> Option<i64> {
    let trimmed = key.trim_matches(|c: char| c.is_ascii_whitespace());
    let digits = trimmed.strip_prefix(['+', '-']).unwrap_or(trimmed);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    trimmed.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use koan_protocol::plan::{BackupEntity, BackupPlan};

    fn spec(entity: BackupEntity) -> EntitySpec {
        let plan = BackupPlan::new("p").entity(entity);
        plan.validate().expect("valid plan");
        plan.entity_specs().remove(0)
    }

    #[test]
    fn export_query_binds_values_and_quotes_names() {
        let entity = spec(
            BackupEntity::new("orders", "Order#archive")
                .in_scope("b", "tenant-a")
                .version("$.meta.v"),
        );
        let sql = EntitySql::new(&entity).expect("sql");
        let range = KeyRange {
            lo: Some("it's".into()),
            hi: None,
        };
        let (query, params) = sql
            .export_query(KeyType::Text, &range, Some("x\\y"))
            .expect("query");
        assert_eq!(
            query,
            "SELECT t.\"Id\", koan_path_json(t.\"Json\", '[\"meta\",\"v\"]'), coalesce(json(t.\"Json\"), 'null') \
             FROM \"Order#archive\" AS t WHERE t.\"Id\" >= ?1 AND t.\"Id\" > ?2 \
             AND koan_field_text(t.\"Json\", '__koan_tenant') = ?3 ORDER BY t.\"Id\""
        );
        assert_eq!(
            params,
            vec![
                Value::Text("it's".into()),
                Value::Text("x\\y".into()),
                Value::Text("tenant-a".into())
            ]
        );
    }

    #[test]
    fn planning_queries_and_column_scope() {
        let mut entity = BackupEntity::new("e", "t")
            .in_scope("b", "t1")
            .version("rev");
        entity.scope_column = Some("tenant".into());
        let sql = EntitySql::new(&spec(entity)).expect("sql");
        let (count, params) = sql.count_query();
        assert_eq!(
            count,
            "SELECT count(*), coalesce(avg(octet_length(t.\"Json\")), 0.0) FROM \"t\" AS t \
             WHERE CAST(t.\"tenant\" AS TEXT) = ?1"
        );
        assert_eq!(params, vec![Value::Text("t1".into())]);
        let (boundaries, params) = sql.boundary_query(10);
        assert!(boundaries.contains("% ?2 = 0"), "{boundaries}");
        assert_eq!(params[1], Value::Integer(10));
        let (export, _) = sql
            .export_query(KeyType::Bigint, &KeyRange::default(), None)
            .expect("export");
        assert!(export.contains("koan_value_json(t.\"rev\")"), "{export}");
    }

    #[test]
    fn refuses_hostile_names_bad_keys_and_other_schemas() {
        let mut entity = spec(BackupEntity::new("e", "t"));
        entity.table = "t\"; drop table x; --".into();
        assert_eq!(
            EntitySql::new(&entity).expect_err("name").code(),
            "invalid_name"
        );
        let mut entity = spec(BackupEntity::new("e", "t"));
        entity.schema = "audit".into();
        let error = EntitySql::new(&entity).expect_err("schema");
        assert_eq!(error.code(), "not_supported");
        assert!(error.to_string().contains("schema 'audit'"), "{error}");
        let mut entity = spec(BackupEntity::new("e", "t"));
        entity.layout = koan_protocol::plan::Layout::Relational;
        assert_eq!(
            EntitySql::new(&entity).expect_err("layout").code(),
            "not_supported"
        );

        assert_eq!(
            key_value(KeyType::Bigint, " 42 ").expect("int"),
            Value::Integer(42)
        );
        assert_eq!(
            key_value(KeyType::Bigint, "-7").expect("int"),
            Value::Integer(-7)
        );
        for (key_type, bad) in [
            (KeyType::Bigint, "1; drop"),
            (KeyType::Bigint, "1.5"),
            (KeyType::Bigint, ""),
            (KeyType::Integer, "99999999999"),
            (KeyType::Uuid, "zz"),
            (KeyType::Text, "a\0b"),
        ] {
            assert_eq!(
                key_value(key_type, bad).expect_err(bad).code(),
                "invalid_key"
            );
        }
    }
}
