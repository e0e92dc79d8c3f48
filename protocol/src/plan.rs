//! Backup plans: what to back up, from where, into which bucket and scope.
//!
//! A plan comes from a TOML file (`--plans DIR`), from the Rust API
//! ([`BackupPlan::new`], [`BackupEntity::new`]) or inline in a `start_backup`
//! command. [`BackupPlan::validate`] checks every name before anything moves;
//! [`BackupPlan::entity_specs`] applies the defaults and yields the concrete
//! [`EntitySpec`]s that travel in jobs and the manifest.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;
use crate::names::{check_ident, check_json_field, check_name};

/// Rows per chunk when neither the entity nor the plan says.
pub const DEFAULT_CHUNK_ROWS: u64 = 100_000;
/// Largest accepted `chunk_rows`.
pub const MAX_CHUNK_ROWS: u64 = 10_000_000;
/// Bucket used when neither the entity nor the plan names one.
pub const DEFAULT_BUCKET: &str = "default";
/// Pool used when the entity names none.
pub const DEFAULT_POOL: &str = "default";
/// Scope path segment for entities without a scope (the whole table).
pub const UNSCOPED: &str = "_all";
/// JSON field holding the tenant in Koan's shared-row tenancy.
pub const DEFAULT_SCOPE_FIELD: &str = "__koan_tenant";
/// Most entities one plan may hold.
pub const MAX_ENTITIES: usize = 1_000;

/// How chunks of one backup see the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Every chunk of an entity reads one exported snapshot (like `pg_dump -j`).
    #[default]
    Snapshot,
    /// Each chunk reads its own snapshot; no long-running transaction.
    PerChunk,
}

impl Consistency {
    /// The name used in plans and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::PerChunk => "per-chunk",
        }
    }
}

/// How an entity's rows are laid out in its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Koan's layout: a key column and a JSON document column.
    #[default]
    Koan,
    /// A plain table with a single-column primary key; the document is the row as JSON.
    Relational,
}

/// A backup plan: an id, a consistency mode and the entities it covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupPlan {
    /// Unique plan id, also a storage path segment (`orders:daily`).
    pub plan_id: String,
    /// Free text shown in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `snapshot` (default) or `per-chunk`.
    #[serde(default)]
    pub consistency: Consistency,
    /// Default bucket for entities that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Default scope (tenant) for entities that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Default rows per chunk for entities that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_rows: Option<u64>,
    /// The entities, backed up in this order.
    pub entities: Vec<BackupEntity>,
}

/// One entity of a plan, as written by the user (defaults not yet applied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupEntity {
    /// Entity name, unique in the plan; a storage path segment.
    pub name: String,
    /// Source table.
    pub table: String,
    /// Source schema (default `public`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// `koan` (default) or `relational`.
    #[serde(default)]
    pub layout: Layout,
    /// Key column (default `Id`): single-column primary key or unique, not null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Document column for the Koan layout (default `Json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    /// Version: a column name, or a JSON path into the document (`$.meta.version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Bucket (top-level archive folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Scope (tenant) to back up; without one, the whole table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// JSON field of the document holding the scope (default `__koan_tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_field: Option<String>,
    /// Column holding the scope, instead of a document field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_column: Option<String>,
    /// Worker pool whose queue receives this entity's jobs (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Target rows per chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_rows: Option<u64>,
}

/// Where an entity's version lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionSource {
    /// A column of the table.
    Column(String),
    /// A path of field names into the JSON document.
    JsonPath(Vec<String>),
}

/// How rows of a scope are recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeMatch {
    /// A top-level field of the JSON document.
    Field(String),
    /// A column of the table.
    Column(String),
}

/// The SQL type of a key column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    /// `text` or `varchar`.
    Text,
    /// `uuid`.
    Uuid,
    /// `bigint`.
    Bigint,
    /// `integer`.
    Integer,
}

impl KeyType {
    /// The SQL type name used in casts.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Uuid => "uuid",
            Self::Bigint => "bigint",
            Self::Integer => "integer",
        }
    }

    /// Whether keys of this type are JSON numbers in archive lines.
    pub fn is_numeric(self) -> bool {
        matches!(self, Self::Bigint | Self::Integer)
    }
}

/// An entity with every default applied: what jobs and manifests carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntitySpec {
    /// Entity name.
    pub name: String,
    /// Source schema.
    pub schema: String,
    /// Source table.
    pub table: String,
    /// Row layout.
    pub layout: Layout,
    /// Key column.
    pub key: String,
    /// Key type, known once the entity has been planned against the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<KeyType>,
    /// Document column (Koan layout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    /// Version source, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<VersionSource>,
    /// Bucket.
    pub bucket: String,
    /// Scope, if the entity is scoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// How the scope is matched.
    pub scope_match: ScopeMatch,
    /// Worker pool.
    pub pool: String,
    /// Target rows per chunk.
    pub chunk_rows: u64,
}

impl EntitySpec {
    /// The scope as a path segment (`_all` when unscoped).
    pub fn scope_segment(&self) -> &str {
        self.scope.as_deref().unwrap_or(UNSCOPED)
    }
}

impl BackupPlan {
    /// A plan with an id and no entities yet.
    pub fn new(plan_id: impl Into<String>) -> Self {
        Self {
            plan_id: plan_id.into(),
            description: None,
            consistency: Consistency::default(),
            bucket: None,
            scope: None,
            chunk_rows: None,
            entities: Vec::new(),
        }
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Sets the consistency mode.
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Adds an entity.
    pub fn entity(mut self, entity: BackupEntity) -> Self {
        self.entities.push(entity);
        self
    }

    /// Parses a plan from TOML and validates it.
    pub fn from_toml(text: &str) -> Result<Self, ProtocolError> {
        let plan: Self = toml::from_str(text).map_err(|error| ProtocolError::InvalidPlan {
            plan_id: "<toml>".to_string(),
            reason: error.message().to_string(),
        })?;
        plan.validate()?;
        Ok(plan)
    }

    /// Checks every name and bound; the error names the offending field and value.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        check_name("plan_id", &self.plan_id)?;
        let invalid = |reason: String| ProtocolError::InvalidPlan {
            plan_id: self.plan_id.clone(),
            reason,
        };
        if self.entities.is_empty() {
            return Err(invalid("a plan needs at least one entity".into()));
        }
        if self.entities.len() > MAX_ENTITIES {
            return Err(invalid(format!("more than {MAX_ENTITIES} entities")));
        }
        if let Some(description) = &self.description
            && description.len() > 4096
        {
            return Err(invalid("description longer than 4096 bytes".into()));
        }
        if let Some(bucket) = &self.bucket {
            check_name("bucket", bucket)?;
        }
        if let Some(scope) = &self.scope {
            check_name("scope", scope)?;
        }
        check_chunk_rows(self.chunk_rows).map_err(invalid)?;
        let mut names = std::collections::BTreeSet::new();
        for entity in &self.entities {
            entity.validate().map_err(|error| match error {
                ProtocolError::InvalidPlan { reason, .. } => invalid(format!(
                    "entity '{}': {reason}",
                    entity.name.escape_default()
                )),
                other => other,
            })?;
            if !names.insert(entity.name.as_str()) {
                return Err(invalid(format!("entity '{}' appears twice", entity.name)));
            }
        }
        Ok(())
    }

    /// The entities with every default applied, in plan order.
    pub fn entity_specs(&self) -> Vec<EntitySpec> {
        self.entities
            .iter()
            .map(|entity| entity.spec(self))
            .collect()
    }
}

fn check_chunk_rows(chunk_rows: Option<u64>) -> Result<(), String> {
    match chunk_rows {
        Some(rows) if rows == 0 || rows > MAX_CHUNK_ROWS => Err(format!(
            "chunk_rows must be between 1 and {MAX_CHUNK_ROWS}, got {rows}"
        )),
        _ => Ok(()),
    }
}

impl BackupEntity {
    /// An entity backed up from `table` with Koan's defaults.
    pub fn new(name: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            table: table.into(),
            schema: None,
            layout: Layout::Koan,
            key: None,
            document: None,
            version: None,
            bucket: None,
            scope: None,
            scope_field: None,
            scope_column: None,
            pool: None,
            chunk_rows: None,
        }
    }

    /// Sets bucket and scope, as `BackupEntity.For<T>(bucket, scope)` does.
    pub fn in_scope(mut self, bucket: impl Into<String>, scope: impl Into<String>) -> Self {
        self.bucket = Some(bucket.into());
        self.scope = Some(scope.into());
        self
    }

    /// Sets the version source (column name or `$.json.path`).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Sets the worker pool.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }

    /// Sets the target rows per chunk.
    pub fn chunk_rows(mut self, rows: u64) -> Self {
        self.chunk_rows = Some(rows);
        self
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        check_name("entity name", &self.name)?;
        check_ident("table", &self.table)?;
        if let Some(schema) = &self.schema {
            check_ident("schema", schema)?;
        }
        if let Some(key) = &self.key {
            check_ident("key", key)?;
        }
        match (self.layout, &self.document) {
            (Layout::Koan, Some(document)) => check_ident("document", document)?,
            (Layout::Relational, Some(_)) => {
                return Err(ProtocolError::InvalidPlan {
                    plan_id: String::new(),
                    reason: "a relational entity has no document column (the row is the document)"
                        .into(),
                });
            }
            _ => {}
        }
        if let Some(version) = &self.version {
            parse_version(version)?;
        }
        if let Some(bucket) = &self.bucket {
            check_name("bucket", bucket)?;
        }
        if let Some(scope) = &self.scope {
            check_name("scope", scope)?;
        }
        if let Some(pool) = &self.pool {
            check_name("pool", pool)?;
        }
        if self.scope_field.is_some() && self.scope_column.is_some() {
            return Err(ProtocolError::InvalidPlan {
                plan_id: String::new(),
                reason: "scope_field and scope_column are exclusive".into(),
            });
        }
        if let Some(field) = &self.scope_field {
            check_json_field("scope_field", field)?;
        }
        if let Some(column) = &self.scope_column {
            check_ident("scope_column", column)?;
        }
        check_chunk_rows(self.chunk_rows).map_err(|reason| ProtocolError::InvalidPlan {
            plan_id: String::new(),
            reason,
        })
    }

    fn spec(&self, plan: &BackupPlan) -> EntitySpec {
        let scope_match = match (&self.scope_column, &self.scope_field) {
            (Some(column), _) => ScopeMatch::Column(column.clone()),
            (None, Some(field)) => ScopeMatch::Field(field.clone()),
            (None, None) => ScopeMatch::Field(DEFAULT_SCOPE_FIELD.to_string()),
        };
        EntitySpec {
            name: self.name.clone(),
            schema: self.schema.clone().unwrap_or_else(|| "public".into()),
            table: self.table.clone(),
            layout: self.layout,
            key: self.key.clone().unwrap_or_else(|| "Id".into()),
            key_type: None,
            document: match self.layout {
                Layout::Koan => Some(self.document.clone().unwrap_or_else(|| "Json".into())),
                Layout::Relational => None,
            },
            version: self
                .version
                .as_deref()
                .and_then(|version| parse_version(version).ok()),
            bucket: self
                .bucket
                .clone()
                .or_else(|| plan.bucket.clone())
                .unwrap_or_else(|| DEFAULT_BUCKET.into()),
            scope: self.scope.clone().or_else(|| plan.scope.clone()),
            scope_match,
            pool: self.pool.clone().unwrap_or_else(|| DEFAULT_POOL.into()),
            chunk_rows: self
                .chunk_rows
                .or(plan.chunk_rows)
                .unwrap_or(DEFAULT_CHUNK_ROWS),
        }
    }
}

/// Parses a version source: `$.a.b` is a JSON path, anything else a column.
pub fn parse_version(version: &str) -> Result<VersionSource, ProtocolError> {
    match version.strip_prefix("$.") {
        Some(path) => {
            let fields: Vec<String> = path.split('.').map(str::to_string).collect();
            if fields.len() > 16 {
                return Err(ProtocolError::InvalidName {
                    field: "version".into(),
                    value: version.escape_default().collect(),
                    reason: "a JSON path has at most 16 fields",
                });
            }
            for field in &fields {
                check_json_field("version", field)?;
            }
            Ok(VersionSource::JsonPath(fields))
        }
        None => {
            check_ident("version", version)?;
            Ok(VersionSource::Column(version.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_with_defaults() {
        let plan = BackupPlan::from_toml(
            r#"
            plan_id = "orders:daily"
            description = "orders"
            [[entities]]
            name = "orders"
            table = "Order"
            scope = "tenant-a"
            bucket = "orders"
            version = "$.meta.version"
            chunk_rows = 5000
            "#,
        )
        .unwrap();
        let spec = &plan.entity_specs()[0];
        assert_eq!(plan.consistency, Consistency::Snapshot);
        assert_eq!(spec.key, "Id");
        assert_eq!(spec.document.as_deref(), Some("Json"));
        assert_eq!(spec.schema, "public");
        assert_eq!(spec.pool, "default");
        assert_eq!(spec.scope_match, ScopeMatch::Field("__koan_tenant".into()));
        assert_eq!(
            spec.version,
            Some(VersionSource::JsonPath(vec![
                "meta".into(),
                "version".into()
            ]))
        );
        assert_eq!(spec.chunk_rows, 5000);
    }

    #[test]
    fn rejects_unknown_fields_and_hostile_names() {
        let error = BackupPlan::from_toml(
            "plan_id = \"p\"\nentitys = []\n[[entities]]\nname = \"a\"\ntable = \"t\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("entitys"), "{error}");

        let plan = BackupPlan::new("p").entity(BackupEntity::new("../x", "t"));
        assert!(plan.validate().unwrap_err().to_string().contains("../x"));

        let plan = BackupPlan::new("p").entity(BackupEntity::new("e", "a\"; drop table t; --"));
        let error = plan.validate().unwrap_err().to_string();
        assert!(error.contains("drop table"), "{error}");

        let plan = BackupPlan::new("p").entity(BackupEntity::new("e", "t").chunk_rows(0));
        assert!(
            plan.validate()
                .unwrap_err()
                .to_string()
                .contains("chunk_rows")
        );
    }

    #[test]
    fn rejects_duplicate_entities() {
        let plan = BackupPlan::new("p")
            .entity(BackupEntity::new("e", "t"))
            .entity(BackupEntity::new("e", "u"));
        assert!(plan.validate().unwrap_err().to_string().contains("twice"));
    }
}
