//! The coordinator's configuration: one serde struct with defaults that work on
//! one machine, `KOAN_*` environment overrides and a validation naming the bad field.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use koan_protocol::names::{check_ident, check_name};

use crate::error::CoordinatorError;

/// Default RabbitMQ URL.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default schema of the state store.
pub const DEFAULT_SCHEMA: &str = "koan";
/// Default target size of one part: 16 MiB of JSON lines.
pub const DEFAULT_PART_BYTES: u64 = 16 * 1024 * 1024;
/// Default lease of a chunk claim without news from its run.
pub const DEFAULT_LEASE_SECONDS: u64 = 60;
/// Default size of the state store's connection pool.
pub const DEFAULT_DB_POOL_SIZE: usize = 8;
/// Default least interval between two progress events of one operation.
pub const DEFAULT_PROGRESS_INTERVAL_MS: u64 = 250;
/// Default interval between two reads of the state store for the metrics.
pub const DEFAULT_METRICS_INTERVAL_MS: u64 = 5_000;

const MIN_PART_BYTES: u64 = 64 * 1024;
const MAX_PART_BYTES: u64 = 1024 * 1024 * 1024;

/// Configuration of one coordinator instance.
///
/// Every field but `database_url` has a default; [`Config::validate`] is
/// called by [`crate::run`] and names the first bad field.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ URL (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
    #[serde(default = "default_amqp_url")]
    pub amqp_url: String,
    /// The state store (required): a PostgreSQL URL, or `sqlite://PATH` for
    /// one SQLite file (the embedded single-node mode).
    pub database_url: String,
    /// Schema holding the coordinator's tables (default `koan`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Folder of `*.toml` backup plans registered at start.
    #[serde(default)]
    pub plans_dir: Option<PathBuf>,
    /// PostgreSQL URL of the entity source; when set, plans are checked
    /// against its catalog at submission, before any job is published.
    #[serde(default)]
    pub source_url: Option<String>,
    /// Target bytes of JSON lines per part (default 16 MiB).
    #[serde(default = "default_part_bytes")]
    pub part_bytes: u64,
    /// Seconds a chunk claim lasts without news from its run (default 60).
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// This instance's name in logs and connection names (default random).
    #[serde(default = "default_instance_id")]
    pub instance_id: String,
    /// Connections to the state store (default 8).
    #[serde(default = "default_db_pool_size")]
    pub db_pool_size: usize,
    /// Least milliseconds between two progress events of one operation (default 250).
    #[serde(default = "default_progress_interval_ms")]
    pub progress_interval_ms: u64,
    /// Where `GET /metrics` (Prometheus text) and `GET /healthz` are served
    /// (default: not served; the `coordinator` command defaults to
    /// `127.0.0.1:9464`). Port 0 picks a free port.
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Milliseconds between two reads of the state store for the pool and
    /// operation gauges and ended operations (default 5000).
    #[serde(default = "default_metrics_interval_ms")]
    pub metrics_interval_ms: u64,
}

fn default_amqp_url() -> String {
    DEFAULT_AMQP_URL.to_string()
}

fn default_schema() -> String {
    DEFAULT_SCHEMA.to_string()
}

fn default_part_bytes() -> u64 {
    DEFAULT_PART_BYTES
}

fn default_lease_seconds() -> u64 {
    DEFAULT_LEASE_SECONDS
}

fn default_instance_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("coordinator-{}", &id[..12])
}

fn default_db_pool_size() -> usize {
    DEFAULT_DB_POOL_SIZE
}

fn default_progress_interval_ms() -> u64 {
    DEFAULT_PROGRESS_INTERVAL_MS
}

fn default_metrics_interval_ms() -> u64 {
    DEFAULT_METRICS_INTERVAL_MS
}

impl Config {
    /// A configuration with every default and the given state store.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            amqp_url: default_amqp_url(),
            database_url: database_url.into(),
            schema: default_schema(),
            plans_dir: None,
            source_url: None,
            part_bytes: DEFAULT_PART_BYTES,
            lease_seconds: DEFAULT_LEASE_SECONDS,
            instance_id: default_instance_id(),
            db_pool_size: DEFAULT_DB_POOL_SIZE,
            progress_interval_ms: DEFAULT_PROGRESS_INTERVAL_MS,
            metrics_addr: None,
            metrics_interval_ms: DEFAULT_METRICS_INTERVAL_MS,
        }
    }

    /// Parses a TOML configuration file's text and validates it.
    pub fn from_toml(text: &str) -> Result<Self, CoordinatorError> {
        let config: Self = toml::from_str(text)
            .map_err(|error| CoordinatorError::config("<toml>", error.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `KOAN_AMQP_URL`, `KOAN_DATABASE_URL`, `KOAN_SCHEMA`,
    /// `KOAN_PLANS_DIR`, `KOAN_SOURCE_URL`, `KOAN_PART_BYTES`,
    /// `KOAN_LEASE_SECONDS`, `KOAN_INSTANCE_ID`, `KOAN_DB_POOL_SIZE`,
    /// `KOAN_PROGRESS_INTERVAL_MS`, `KOAN_METRICS_ADDR` (`off` for none) and
    /// `KOAN_METRICS_INTERVAL_MS` from the process environment.
    pub fn with_env_overrides(self) -> Result<Self, CoordinatorError> {
        self.with_overrides(|name| std::env::var(name).ok())
    }

    /// Applies overrides looked up by `KOAN_*` name through `lookup`.
    pub fn with_overrides(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CoordinatorError> {
        if let Some(value) = lookup("KOAN_AMQP_URL") {
            self.amqp_url = value;
        }
        if let Some(value) = lookup("KOAN_DATABASE_URL") {
            self.database_url = value;
        }
        if let Some(value) = lookup("KOAN_SCHEMA") {
            self.schema = value;
        }
        if let Some(value) = lookup("KOAN_PLANS_DIR") {
            self.plans_dir = Some(PathBuf::from(value));
        }
        if let Some(value) = lookup("KOAN_SOURCE_URL") {
            self.source_url = Some(value);
        }
        if let Some(value) = lookup("KOAN_PART_BYTES") {
            self.part_bytes = parse_number("part_bytes", &value)?;
        }
        if let Some(value) = lookup("KOAN_LEASE_SECONDS") {
            self.lease_seconds = parse_number("lease_seconds", &value)?;
        }
        if let Some(value) = lookup("KOAN_INSTANCE_ID") {
            self.instance_id = value;
        }
        if let Some(value) = lookup("KOAN_DB_POOL_SIZE") {
            self.db_pool_size = parse_number("db_pool_size", &value)?;
        }
        if let Some(value) = lookup("KOAN_PROGRESS_INTERVAL_MS") {
            self.progress_interval_ms = parse_number("progress_interval_ms", &value)?;
        }
        if let Some(value) = lookup("KOAN_METRICS_ADDR") {
            self.metrics_addr = koan_metrics::parse_address(&value)
                .map_err(|error| CoordinatorError::config("metrics_addr", error.to_string()))?;
        }
        if let Some(value) = lookup("KOAN_METRICS_INTERVAL_MS") {
            self.metrics_interval_ms = parse_number("metrics_interval_ms", &value)?;
        }
        Ok(self)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        if !["amqp://", "amqps://", koan_transport::MEMORY_SCHEME]
            .iter()
            .any(|scheme| self.amqp_url.starts_with(scheme))
        {
            return Err(CoordinatorError::config(
                "amqp_url",
                "must start with amqp://, amqps:// or (embedded) memory://",
            ));
        }
        match sqlite_path(&self.database_url) {
            Some(path) if path.as_os_str().is_empty() => {
                return Err(CoordinatorError::config(
                    "database_url",
                    "sqlite:// needs a file path (sqlite:///abs/state.db or sqlite://rel/state.db)",
                ));
            }
            Some(_) => {}
            None => check_postgres_url("database_url", &self.database_url)?,
        }
        check_ident("schema", &self.schema)
            .map_err(|error| CoordinatorError::config("schema", error.to_string()))?;
        if let Some(source_url) = &self.source_url
            && !source_url.starts_with("sqlite:")
        {
            check_postgres_url("source_url", source_url)?;
        }
        if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&self.part_bytes) {
            return Err(CoordinatorError::config(
                "part_bytes",
                format!("must be between {MIN_PART_BYTES} and {MAX_PART_BYTES}"),
            ));
        }
        if !(5..=3600).contains(&self.lease_seconds) {
            return Err(CoordinatorError::config(
                "lease_seconds",
                "must be between 5 and 3600",
            ));
        }
        check_name("instance_id", &self.instance_id)
            .map_err(|error| CoordinatorError::config("instance_id", error.to_string()))?;
        if !(1..=256).contains(&self.db_pool_size) {
            return Err(CoordinatorError::config(
                "db_pool_size",
                "must be between 1 and 256",
            ));
        }
        if self.progress_interval_ms > 60_000 {
            return Err(CoordinatorError::config(
                "progress_interval_ms",
                "must be at most 60000",
            ));
        }
        if !(100..=600_000).contains(&self.metrics_interval_ms) {
            return Err(CoordinatorError::config(
                "metrics_interval_ms",
                "must be between 100 and 600000",
            ));
        }
        Ok(())
    }

    /// The metrics interval as a duration.
    pub fn metrics_interval(&self) -> Duration {
        Duration::from_millis(self.metrics_interval_ms)
    }

    /// The lease as a duration.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_seconds)
    }
}

fn parse_number<T: std::str::FromStr>(
    field: &'static str,
    value: &str,
) -> Result<T, CoordinatorError> {
    value.trim().parse().map_err(|_| {
        CoordinatorError::config(
            field,
            format!("'{}' is not a number", value.escape_default()),
        )
    })
}

/// The state file a `sqlite://` state URL names (`sqlite:///abs/path.db` is
/// absolute, `sqlite://rel/path.db` relative); `None` for any other URL.
pub fn sqlite_path(url: &str) -> Option<&std::path::Path> {
    url.strip_prefix("sqlite://").map(std::path::Path::new)
}

fn check_postgres_url(field: &'static str, url: &str) -> Result<(), CoordinatorError> {
    if url.trim().is_empty() {
        return Err(CoordinatorError::config(field, "is required"));
    }
    url.parse::<tokio_postgres::Config>()
        .map(|_| ())
        .map_err(|error| CoordinatorError::config(field, format!("not a PostgreSQL URL: {error}")))
}

/// Removes the password from a PostgreSQL URL or key-value connection string.
pub fn redact_postgres_url(url: &str) -> String {
    if url.contains("://") {
        return koan_transport::error::redact_url(url);
    }
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Debug for Config {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Config")
            .field(
                "amqp_url",
                &koan_transport::error::redact_url(&self.amqp_url),
            )
            .field("database_url", &redact_postgres_url(&self.database_url))
            .field("schema", &self.schema)
            .field("plans_dir", &self.plans_dir)
            .field(
                "source_url",
                &self.source_url.as_deref().map(redact_postgres_url),
            )
            .field("part_bytes", &self.part_bytes)
            .field("lease_seconds", &self.lease_seconds)
            .field("instance_id", &self.instance_id)
            .field("db_pool_size", &self.db_pool_size)
            .field("progress_interval_ms", &self.progress_interval_ms)
            .field("metrics_addr", &self.metrics_addr)
            .field("metrics_interval_ms", &self.metrics_interval_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let config =
            Config::from_toml("database_url = \"postgres://postgres@127.0.0.1/postgres\"").unwrap();
        assert_eq!(config.schema, "koan");
        assert_eq!(config.part_bytes, 16 * 1024 * 1024);
        assert_eq!(config.lease_seconds, 60);
        assert_eq!(config.amqp_url, DEFAULT_AMQP_URL);
        assert!(config.instance_id.starts_with("coordinator-"));
    }

    #[test]
    fn names_the_bad_field() {
        let error =
            Config::from_toml("database_url = \"postgres://x\"\nschemaa = \"k\"").unwrap_err();
        assert!(error.to_string().contains("schemaa"), "{error}");
        let mut config = Config::new("postgres://postgres@127.0.0.1/postgres");
        config.schema = "k\"; drop schema public; --".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`schema`")
        );
        let mut config = Config::new("");
        config.schema = "koan".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`database_url`")
        );
        let mut config = Config::new("postgres://postgres@127.0.0.1/postgres");
        config.lease_seconds = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("`lease_seconds`")
        );
    }

    #[test]
    fn environment_overrides() {
        let config = Config::new("postgres://a@b/c")
            .with_overrides(|name| match name {
                "KOAN_SCHEMA" => Some("other".into()),
                "KOAN_LEASE_SECONDS" => Some("30".into()),
                "KOAN_METRICS_ADDR" => Some("0.0.0.0:9464".into()),
                "KOAN_METRICS_INTERVAL_MS" => Some("250".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.schema, "other");
        assert_eq!(config.lease_seconds, 30);
        assert_eq!(config.metrics_addr, Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(config.metrics_interval(), Duration::from_millis(250));
        config.validate().unwrap();
        let mut fast = config.clone();
        fast.metrics_interval_ms = 10;
        assert!(
            fast.validate()
                .unwrap_err()
                .to_string()
                .contains("`metrics_interval_ms`")
        );
        let off = Config::new("postgres://a@b/c")
            .with_overrides(|name| (name == "KOAN_METRICS_ADDR").then(|| "off".into()))
            .unwrap();
        assert_eq!(off.metrics_addr, None);
        let error = Config::new("postgres://a@b/c")
            .with_overrides(|name| (name == "KOAN_METRICS_ADDR").then(|| "port 9464".into()))
            .unwrap_err();
        assert!(error.to_string().contains("`metrics_addr`"), "{error}");
        let error = Config::new("postgres://a@b/c")
            .with_overrides(|name| (name == "KOAN_PART_BYTES").then(|| "lots".into()))
            .unwrap_err();
        assert!(error.to_string().contains("part_bytes"));
    }

    #[test]
    fn never_shows_passwords() {
        let config = Config::new("postgres://koan:s3cret@db/koan");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("guest:guest"), "{shown}");
        assert_eq!(
            redact_postgres_url("host=db user=koan password=s3cret"),
            "host=db user=koan password=***"
        );
    }
}
