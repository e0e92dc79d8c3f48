//! The source catalog check: a plan's tables, columns and consistency mode
//! checked against the entity source before a backup is accepted.

use koan_protocol::plan::BackupPlan;
use koan_source::{Source, SourceError};

use crate::config::redact_postgres_url;
use crate::error::CoordinatorError;

/// Connections the catalog check may hold on the source.
const CATALOG_CONNECTIONS: usize = 2;

/// The entity source's catalog, as seen by the coordinator.
#[derive(Debug, Clone)]
pub struct SourceCatalog {
    source: Source,
}

impl SourceCatalog {
    /// A catalog over the PostgreSQL source at `url` (connections open on first use).
    pub fn connect(url: &str) -> Result<Self, CoordinatorError> {
        let source = Source::from_url(url, CATALOG_CONNECTIONS).map_err(|error| {
            CoordinatorError::config(
                "source_url",
                format!("{} ({error})", redact_postgres_url(url)),
            )
        })?;
        Ok(Self { source })
    }

    /// Where the source is (`host:port/database as user`, no password).
    pub fn target(&self) -> &str {
        self.source.target()
    }

    /// Checks every entity of `plan`: the source honours its consistency mode,
    /// and its table, key, document, version and scope columns exist.
    pub async fn check(&self, plan: &BackupPlan) -> Result<(), CoordinatorError> {
        for entity in plan.entity_specs() {
            self.source
                .capabilities()
                .check(plan.consistency)
                .map_err(|error| source_error(&entity.name, &error))?;
            self.source
                .inspect(&entity)
                .await
                .map_err(|error| source_error(&entity.name, &error))?;
        }
        Ok(())
    }
}

fn source_error(entity: &str, error: &SourceError) -> CoordinatorError {
    CoordinatorError::Source {
        entity: entity.to_string(),
        code: error.code(),
        message: error.to_string(),
        retryable: error.is_retryable(),
    }
}
