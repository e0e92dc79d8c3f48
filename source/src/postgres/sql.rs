//! SQL text for one entity: every identifier checked and quoted, every literal quoted.
//!
//! `COPY` takes no bind parameters, so its range bounds and scope are inlined
//! as quoted literals with a cast to the key type (`t."Id" >= '42'::bigint`);
//! the planning queries bind the scope as a parameter instead. The table is
//! always aliased `t`, so the relational layout's document is `to_jsonb(t.*)`.

use koan_protocol::ProtocolError;
use koan_protocol::archive::KeyRange;
use koan_protocol::names::{check_ident, check_json_field, check_name, quote_ident, quote_literal};
use koan_protocol::plan::{EntitySpec, KeyType, Layout, ScopeMatch, VersionSource};

use crate::error::SourceError;

/// The SQL fragments of one entity.
#[derive(Debug, Clone)]
pub(crate) struct EntitySql {
    /// `"schema"."table" AS t`.
    from: String,
    /// `t."Id"`.
    key: String,
    /// The document as jsonb: `t."Json"::jsonb` or `to_jsonb(t.*)`.
    doc_jsonb: String,
    /// What `pg_column_size` measures for the average row size.
    doc_size: String,
    /// The version as JSON text, or `NULL::text`.
    version_text: String,
    /// Left-hand side of the scope comparison and the scope, when scoped.
    scope: Option<(String, String)>,
}

impl EntitySql {
    /// Checks every name of `entity` (again: it may have come off the wire) and builds the fragments.
    pub(crate) fn new(entity: &EntitySpec) -> Result<Self, SourceError> {
        check_ident("schema", &entity.schema)?;
        check_ident("table", &entity.table)?;
        check_ident("key", &entity.key)?;
        let column = |name: &str| format!("t.{}", quote_ident(name));
        let (doc_jsonb, doc_size) = match (entity.layout, &entity.document) {
            (Layout::Koan, Some(document)) => {
                check_ident("document", document)?;
                let doc = column(document);
                (format!("{doc}::jsonb"), format!("pg_column_size({doc})"))
            }
            (Layout::Koan, None) => {
                return Err(invalid_plan(
                    &entity.name,
                    "a koan-layout entity needs a document column",
                ));
            }
            (Layout::Relational, _) => (
                "to_jsonb(t.*)".to_string(),
                "pg_column_size(t.*)".to_string(),
            ),
        };
        let version_text = match &entity.version {
            None => "NULL::text".to_string(),
            Some(VersionSource::Column(name)) => {
                check_ident("version", name)?;
                format!("nullif(to_jsonb({}), 'null'::jsonb)::text", column(name))
            }
            Some(VersionSource::JsonPath(path)) => {
                format!(
                    "nullif(({doc_jsonb} #> {}), 'null'::jsonb)::text",
                    path_literal(path)?
                )
            }
        };
        let scope = match &entity.scope {
            None => None,
            Some(scope) => {
                check_name("scope", scope)?;
                let lhs = match &entity.scope_match {
                    ScopeMatch::Field(field) => {
                        check_json_field("scope_field", field)?;
                        format!("({doc_jsonb} ->> {})", quote_literal(field)?)
                    }
                    ScopeMatch::Column(name) => {
                        check_ident("scope_column", name)?;
                        format!("{}::text", column(name))
                    }
                };
                Some((lhs, scope.clone()))
            }
        };
        Ok(Self {
            from: format!(
                "{}.{} AS t",
                quote_ident(&entity.schema),
                quote_ident(&entity.table)
            ),
            key: column(&entity.key),
            doc_jsonb,
            doc_size,
            version_text,
            scope,
        })
    }

    /// `WHERE <scope> = $1` when scoped, else nothing; and whether `$1` is used.
    fn scope_where_param(&self) -> (String, bool) {
        match &self.scope {
            Some((lhs, _)) => (format!(" WHERE {lhs} = $1"), true),
            None => (String::new(), false),
        }
    }

    /// The scope value to bind as `$1` (planning queries), if scoped.
    pub(crate) fn scope_value(&self) -> Option<&str> {
        self.scope.as_ref().map(|(_, value)| value.as_str())
    }

    /// Row count and average stored document size; `$1` is the scope when scoped.
    pub(crate) fn count_query(&self) -> String {
        let (filter, _) = self.scope_where_param();
        format!(
            "SELECT count(*)::bigint, coalesce(avg({}), 0)::float8 FROM {}{filter}",
            self.doc_size, self.from
        )
    }

    /// Keys at row numbers `N+1, 2N+1, ...` in key order: the chunk boundaries.
    /// `$1` is the scope when scoped; the step `N` is the last parameter (bigint).
    pub(crate) fn boundary_query(&self) -> String {
        let (filter, scoped) = self.scope_where_param();
        let step = if scoped { "$2" } else { "$1" };
        format!(
            "SELECT s.k::text FROM (SELECT {key} AS k, row_number() OVER (ORDER BY {key}) AS rn \
             FROM {from}{filter}) AS s WHERE s.rn > 1 AND (s.rn - 1) % {step}::bigint = 0 ORDER BY s.rn",
            key = self.key,
            from = self.from,
        )
    }

    /// `COPY (SELECT key, version, doc ... ORDER BY key) TO STDOUT (FORMAT binary)` for one range.
    pub(crate) fn copy_statement(
        &self,
        key_type: KeyType,
        range: &KeyRange,
        after_key: Option<&str>,
    ) -> Result<String, SourceError> {
        let mut conditions = Vec::new();
        if let Some(lo) = &range.lo {
            conditions.push(format!("{} >= {}", self.key, key_literal(key_type, lo)?));
        }
        if let Some(hi) = &range.hi {
            conditions.push(format!("{} < {}", self.key, key_literal(key_type, hi)?));
        }
        if let Some(after) = after_key {
            conditions.push(format!("{} > {}", self.key, key_literal(key_type, after)?));
        }
        if let Some((lhs, value)) = &self.scope {
            conditions.push(format!("{lhs} = {}", quote_literal(value)?));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        Ok(format!(
            "COPY (SELECT {key}::text, {version}, coalesce({doc}::text, 'null') FROM {from}{filter} \
             ORDER BY {key}) TO STDOUT (FORMAT binary)",
            key = self.key,
            version = self.version_text,
            doc = self.doc_jsonb,
            from = self.from,
        ))
    }
}

fn invalid_plan(entity: &str, reason: &str) -> SourceError {
    SourceError::Invalid(ProtocolError::InvalidPlan {
        plan_id: String::new(),
        reason: format!("entity '{}': {reason}", entity.escape_default()),
    })
}

/// `'{"a","b"}'::text[]` for a JSON path of checked field names.
pub(crate) fn path_literal(path: &[String]) -> Result<String, SourceError> {
    if path.is_empty() {
        return Err(SourceError::Invalid(ProtocolError::InvalidName {
            field: "version".into(),
            value: "$.".into(),
            reason: "a JSON path needs at least one field",
        }));
    }
    let mut elements = Vec::with_capacity(path.len());
    for field in path {
        check_json_field("version", field)?;
        // Array-literal quoting; the field check already refuses '"' and '\\'.
        let escaped = field.replace('\\', "\\\\").replace('"', "\\\"");
        elements.push(format!("\"{escaped}\""));
    }
    Ok(format!(
        "{}::text[]",
        quote_literal(&format!("{{{}}}", elements.join(",")))?
    ))
}

/// A key as a quoted literal cast to the key type, after checking it parses as one.
pub(crate) fn key_literal(key_type: KeyType, key: &str) -> Result<String, SourceError> {
    let valid = match key_type {
        KeyType::Text => true,
        KeyType::Uuid => uuid::Uuid::parse_str(key).is_ok(),
        KeyType::Bigint => key.parse::<i64>().is_ok(),
        KeyType::Integer => key.parse::<i32>().is_ok(),
    };
    if !valid {
        return Err(SourceError::InvalidKey {
            key: key.escape_default().take(200).collect(),
            key_type: key_type.sql(),
        });
    }
    Ok(format!("{}::{}", quote_literal(key)?, key_type.sql()))
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
    fn copy_statement_quotes_everything() {
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
        let copy = sql
            .copy_statement(KeyType::Text, &range, Some("x\\y"))
            .expect("copy");
        assert_eq!(
            copy,
            "COPY (SELECT t.\"Id\"::text, nullif((t.\"Json\"::jsonb #> '{\"meta\",\"v\"}'::text[]), 'null'::jsonb)::text, \
             coalesce(t.\"Json\"::jsonb::text, 'null') FROM \"public\".\"Order#archive\" AS t \
             WHERE t.\"Id\" >= 'it''s'::text AND t.\"Id\" > 'x\\y'::text AND (t.\"Json\"::jsonb ->> '__koan_tenant') = 'tenant-a' \
             ORDER BY t.\"Id\") TO STDOUT (FORMAT binary)"
        );
    }

    #[test]
    fn relational_scope_column_and_planning_queries() {
        let mut entity = BackupEntity::new("people", "people").in_scope("b", "t1");
        entity.layout = Layout::Relational;
        entity.key = Some("person_id".into());
        entity.scope_column = Some("tenant".into());
        entity.version = Some("updated_at".into());
        let sql = EntitySql::new(&spec(entity)).expect("sql");
        assert_eq!(
            sql.count_query(),
            "SELECT count(*)::bigint, coalesce(avg(pg_column_size(t.*)), 0)::float8 FROM \"public\".\"people\" AS t \
             WHERE t.\"tenant\"::text = $1"
        );
        assert!(sql.boundary_query().contains("% $2::bigint"));
        assert_eq!(sql.scope_value(), Some("t1"));
        let copy = sql
            .copy_statement(KeyType::Bigint, &KeyRange::default(), None)
            .expect("copy");
        assert!(
            copy.contains("nullif(to_jsonb(t.\"updated_at\"), 'null'::jsonb)::text"),
            "{copy}"
        );
        assert!(
            copy.contains("coalesce(to_jsonb(t.*)::text, 'null')"),
            "{copy}"
        );
        assert!(
            copy.contains("WHERE t.\"tenant\"::text = 't1' ORDER BY"),
            "{copy}"
        );
    }

    #[test]
    fn refuses_hostile_names_and_bad_keys() {
        let mut entity = spec(BackupEntity::new("e", "t"));
        entity.table = "t\"; drop table x; --".into();
        assert!(EntitySql::new(&entity).is_err());
        let entity = spec(BackupEntity::new("e", "t"));
        let sql = EntitySql::new(&entity).expect("sql");
        assert_eq!(
            key_literal(KeyType::Bigint, "42").expect("int"),
            "'42'::bigint"
        );
        for (key_type, bad) in [
            (KeyType::Bigint, "1; drop"),
            (KeyType::Integer, "99999999999"),
            (KeyType::Uuid, "zz"),
        ] {
            let error = sql
                .copy_statement(
                    key_type,
                    &KeyRange {
                        lo: Some(bad.into()),
                        hi: None,
                    },
                    None,
                )
                .expect_err("invalid key");
            assert_eq!(error.code(), "invalid_key");
        }
        assert!(key_literal(KeyType::Text, "a\0b").is_err());
    }
}
