//! Worker configuration: one serde struct, defaults that work on one machine,
//! `KOAN_*` environment overrides, validation that names the bad field.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use koan_protocol::names::check_name;

use crate::error::WorkerError;
use crate::storage::StorageRoot;

/// Default RabbitMQ URL.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Default archive storage: a directory beside the working directory.
pub const DEFAULT_STORAGE_URL: &str = "./koan-archives";
/// Default cap on a job's `part_bytes`: 64 MiB of JSON lines per part.
pub const DEFAULT_PART_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Smallest accepted `part_bytes_max`.
const MIN_PART_BYTES_MAX: u64 = 64 * 1024;
/// Largest accepted `concurrency` (it is also the AMQP prefetch).
const MAX_CONCURRENCY: usize = 1024;

/// Configuration of one worker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ URL.
    #[serde(default = "default_amqp_url")]
    pub amqp_url: String,
    /// PostgreSQL URL of the entity store (required).
    pub source_url: String,
    /// Archive storage: `file:///absolute/path` or a plain directory path.
    #[serde(default = "default_storage_url")]
    pub storage_url: String,
    /// Worker pools whose job queues this worker consumes.
    #[serde(default = "default_pools")]
    pub pools: Vec<String>,
    /// Jobs run at once (and the AMQP prefetch of each pool queue).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// This worker's id, recorded as a snapshot holder and in chunk claims.
    #[serde(default = "default_worker_id")]
    pub worker_id: String,
    /// Cap on a job's `part_bytes` (bytes of JSON lines per part).
    #[serde(default = "default_part_bytes_max")]
    pub part_bytes_max: u64,
    /// Longest time a snapshot is held open for an operation.
    #[serde(default = "default_snapshot_hold_max_seconds")]
    pub snapshot_hold_max_seconds: u64,
    /// How long to wait for the coordinator's reply to a chunk claim.
    #[serde(default = "default_claim_timeout_seconds")]
    pub claim_timeout_seconds: u64,
    /// How long in-flight jobs get to stop at shutdown.
    #[serde(default = "default_grace_seconds")]
    pub grace_seconds: u64,
    /// RabbitMQ's `consumer_timeout` in seconds: a running export hands its
    /// job back at a part boundary after half of it (see `design.md`).
    #[serde(default = "default_consumer_timeout_seconds")]
    pub consumer_timeout_seconds: u64,
    /// Where `GET /metrics` (Prometheus text) and `GET /healthz` are served
    /// (default: not served). Port 0 picks a free port (the bound one is logged).
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
}

fn default_amqp_url() -> String {
    DEFAULT_AMQP_URL.to_string()
}

fn default_storage_url() -> String {
    DEFAULT_STORAGE_URL.to_string()
}

fn default_pools() -> Vec<String> {
    vec![koan_protocol::plan::DEFAULT_POOL.to_string()]
}

fn default_concurrency() -> usize {
    2
}

fn default_part_bytes_max() -> u64 {
    DEFAULT_PART_BYTES_MAX
}

fn default_snapshot_hold_max_seconds() -> u64 {
    6 * 60 * 60
}

fn default_claim_timeout_seconds() -> u64 {
    30
}

fn default_grace_seconds() -> u64 {
    30
}

fn default_consumer_timeout_seconds() -> u64 {
    30 * 60
}

/// `hostname-pid-random`, reduced to the characters a name may hold.
pub fn default_worker_id() -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let hostname: String = hostname
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let hostname = match hostname.trim_start_matches(['-', '_']) {
        "" => "worker",
        trimmed => trimmed,
    };
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{hostname}-{}-{}", std::process::id(), &random[..6])
}

impl Config {
    /// A configuration reading `source_url`, every other field at its default.
    pub fn new(source_url: impl Into<String>) -> Self {
        Self {
            amqp_url: default_amqp_url(),
            source_url: source_url.into(),
            storage_url: default_storage_url(),
            pools: default_pools(),
            concurrency: default_concurrency(),
            worker_id: default_worker_id(),
            part_bytes_max: default_part_bytes_max(),
            snapshot_hold_max_seconds: default_snapshot_hold_max_seconds(),
            claim_timeout_seconds: default_claim_timeout_seconds(),
            grace_seconds: default_grace_seconds(),
            consumer_timeout_seconds: default_consumer_timeout_seconds(),
            metrics_addr: None,
        }
    }

    /// Applies `KOAN_AMQP_URL`, `KOAN_SOURCE_URL`, `KOAN_STORAGE_URL`,
    /// `KOAN_POOLS` (comma separated), `KOAN_CONCURRENCY`, `KOAN_WORKER_ID`,
    /// `KOAN_PART_BYTES_MAX`, `KOAN_SNAPSHOT_HOLD_MAX_SECONDS`,
    /// `KOAN_CLAIM_TIMEOUT_SECONDS`, `KOAN_GRACE_SECONDS`,
    /// `KOAN_CONSUMER_TIMEOUT_SECONDS` and `KOAN_METRICS_ADDR` (`off` for
    /// none) from `lookup`
    /// (usually `|name| std::env::var(name).ok()`).
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), WorkerError> {
        if let Some(value) = lookup("KOAN_AMQP_URL") {
            self.amqp_url = value;
        }
        if let Some(value) = lookup("KOAN_SOURCE_URL") {
            self.source_url = value;
        }
        if let Some(value) = lookup("KOAN_STORAGE_URL") {
            self.storage_url = value;
        }
        if let Some(value) = lookup("KOAN_POOLS") {
            self.pools = value
                .split(',')
                .map(str::trim)
                .filter(|pool| !pool.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(value) = lookup("KOAN_WORKER_ID") {
            self.worker_id = value;
        }
        if let Some(value) = lookup("KOAN_METRICS_ADDR") {
            self.metrics_addr =
                koan_metrics::parse_address(&value).map_err(|error| WorkerError::Config {
                    field: "metrics_addr",
                    reason: error.to_string(),
                })?;
        }
        let number = |name: &str, field: &'static str| -> Result<Option<u64>, WorkerError> {
            lookup(name)
                .map(|value| {
                    value
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| WorkerError::Config {
                            field,
                            reason: format!(
                                "{name}='{}' is not a whole number",
                                value.escape_default()
                            ),
                        })
                })
                .transpose()
        };
        if let Some(value) = number("KOAN_CONCURRENCY", "concurrency")? {
            self.concurrency = usize::try_from(value).unwrap_or(usize::MAX);
        }
        if let Some(value) = number("KOAN_PART_BYTES_MAX", "part_bytes_max")? {
            self.part_bytes_max = value;
        }
        if let Some(value) = number(
            "KOAN_SNAPSHOT_HOLD_MAX_SECONDS",
            "snapshot_hold_max_seconds",
        )? {
            self.snapshot_hold_max_seconds = value;
        }
        if let Some(value) = number("KOAN_CLAIM_TIMEOUT_SECONDS", "claim_timeout_seconds")? {
            self.claim_timeout_seconds = value;
        }
        if let Some(value) = number("KOAN_GRACE_SECONDS", "grace_seconds")? {
            self.grace_seconds = value;
        }
        if let Some(value) = number("KOAN_CONSUMER_TIMEOUT_SECONDS", "consumer_timeout_seconds")? {
            self.consumer_timeout_seconds = value;
        }
        Ok(())
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |field: &'static str, reason: String| Err(WorkerError::Config { field, reason });
        if !["amqp://", "amqps://", koan_transport::MEMORY_SCHEME]
            .iter()
            .any(|scheme| self.amqp_url.starts_with(scheme))
        {
            return bad(
                "amqp_url",
                "must start with amqp://, amqps:// or (embedded) memory://".to_string(),
            );
        }
        if self.source_url.trim().is_empty() {
            return bad(
                "source_url",
                "is required (postgres://user@host:5432/database)".to_string(),
            );
        }
        StorageRoot::parse(&self.storage_url)?;
        if self.pools.is_empty() {
            return bad("pools", "must name at least one pool".to_string());
        }
        for (index, pool) in self.pools.iter().enumerate() {
            if let Err(error) = check_name("pool", pool) {
                return bad("pools", error.to_string());
            }
            if self.pools[..index].contains(pool) {
                return bad("pools", format!("pool '{pool}' is listed twice"));
            }
        }
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return bad(
                "concurrency",
                format!(
                    "must be between 1 and {MAX_CONCURRENCY}, got {}",
                    self.concurrency
                ),
            );
        }
        if let Err(error) = check_name("worker_id", &self.worker_id) {
            return bad("worker_id", error.to_string());
        }
        if self.part_bytes_max < MIN_PART_BYTES_MAX {
            return bad(
                "part_bytes_max",
                format!(
                    "must be at least {MIN_PART_BYTES_MAX}, got {}",
                    self.part_bytes_max
                ),
            );
        }
        for (field, value) in [
            ("snapshot_hold_max_seconds", self.snapshot_hold_max_seconds),
            ("claim_timeout_seconds", self.claim_timeout_seconds),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".to_string());
            }
        }
        if self.consumer_timeout_seconds < 2 {
            return bad(
                "consumer_timeout_seconds",
                format!(
                    "must be at least 2 (RabbitMQ's consumer_timeout in seconds), got {}",
                    self.consumer_timeout_seconds
                ),
            );
        }
        Ok(())
    }

    /// [`Config::snapshot_hold_max_seconds`] as a duration.
    pub fn snapshot_hold_max(&self) -> Duration {
        Duration::from_secs(self.snapshot_hold_max_seconds)
    }

    /// [`Config::claim_timeout_seconds`] as a duration.
    pub fn claim_timeout(&self) -> Duration {
        Duration::from_secs(self.claim_timeout_seconds)
    }

    /// [`Config::grace_seconds`] as a duration.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_seconds)
    }

    /// How long an export may hold its delivery before handing the job back:
    /// half of [`Config::consumer_timeout_seconds`].
    pub fn hand_back_after(&self) -> Duration {
        Duration::from_secs(self.consumer_timeout_seconds) / 2
    }
}

/// Removes the password from a PostgreSQL connection string (URL or
/// `key=value` form) for logs and errors.
pub fn redact_source_url(url: &str) -> String {
    if url.contains("://") {
        let redacted = koan_transport::error::redact_url(url);
        return match redacted.find("password=") {
            Some(at) => redact_key_value(&redacted, at),
            None => redacted,
        };
    }
    match url.find("password=") {
        Some(at) => redact_key_value(url, at),
        None => url.to_string(),
    }
}

fn redact_key_value(text: &str, at: usize) -> String {
    let value_start = at + "password=".len();
    let rest = &text[value_start..];
    let value_len = match rest.strip_prefix('\'') {
        Some(quoted) => quoted.find('\'').map_or(rest.len(), |end| end + 2),
        None => rest.find([' ', '&']).unwrap_or(rest.len()),
    };
    let value_end = value_start + value_len;
    let mut redacted = format!("{}***{}", &text[..value_start], &text[value_end..]);
    if let Some(next) = redacted[value_start + 3..].find("password=") {
        redacted = redact_key_value(&redacted, value_start + 3 + next);
    }
    redacted
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config_from_json(value: serde_json::Value) -> Result<Config, serde_json::Error> {
        serde_json::from_value(value)
    }

    #[test]
    fn applies_defaults() {
        let config = config_from_json(serde_json::json!({"source_url": "postgres://db"})).unwrap();
        assert_eq!(config.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(config.storage_url, "./koan-archives");
        assert_eq!(config.pools, vec!["default".to_string()]);
        assert_eq!(config.concurrency, 2);
        assert_eq!(config.part_bytes_max, 64 * 1024 * 1024);
        assert_eq!(config.snapshot_hold_max(), Duration::from_secs(21_600));
        assert_eq!(config.claim_timeout(), Duration::from_secs(30));
        assert_eq!(config.grace(), Duration::from_secs(30));
        config.validate().unwrap();
    }

    #[test]
    fn refuses_unknown_and_missing_fields() {
        let error = config_from_json(serde_json::json!({"source_url": "x", "concurency": 3}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("concurency"), "{error}");
        let error = config_from_json(serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("source_url"), "{error}");
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("amqp_url", Box::new(|c| c.amqp_url = "http://x".into())),
            ("source_url", Box::new(|c| c.source_url = " ".into())),
            ("pools", Box::new(|c| c.pools = vec!["../x".into()])),
            ("pools", Box::new(|c| c.pools = vec![])),
            (
                "pools",
                Box::new(|c| c.pools = vec!["a".into(), "a".into()]),
            ),
            ("concurrency", Box::new(|c| c.concurrency = 0)),
            ("worker_id", Box::new(|c| c.worker_id = "a b".into())),
            ("part_bytes_max", Box::new(|c| c.part_bytes_max = 10)),
            (
                "claim_timeout_seconds",
                Box::new(|c| c.claim_timeout_seconds = 0),
            ),
        ];
        for (field, mutate) in cases {
            let mut config = Config::new("postgres://db");
            mutate(&mut config);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(&format!("`{field}`")), "{field}: {error}");
        }
        let mut config = Config::new("postgres://db");
        config.storage_url = "s3://bucket/x".into();
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("unsupported storage url scheme 's3'"),
            "{error}"
        );
    }

    #[test]
    fn default_worker_id_is_a_valid_name() {
        let id = default_worker_id();
        check_name("worker_id", &id).unwrap();
        assert_ne!(id, default_worker_id());
    }

    #[test]
    fn env_overrides() {
        let mut config = Config::new("postgres://db");
        let vars = [
            ("KOAN_POOLS", "a, b"),
            ("KOAN_CONCURRENCY", "7"),
            ("KOAN_STORAGE_URL", "/tmp/x"),
            ("KOAN_METRICS_ADDR", "127.0.0.1:9465"),
        ];
        config
            .apply_env(|name| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.to_string())
            })
            .unwrap();
        assert_eq!(config.pools, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(config.concurrency, 7);
        assert_eq!(config.storage_url, "/tmp/x");
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9465".parse().unwrap()));
        config
            .apply_env(|name| (name == "KOAN_METRICS_ADDR").then(|| "off".to_string()))
            .unwrap();
        assert_eq!(config.metrics_addr, None);
        let error = config
            .apply_env(|name| (name == "KOAN_METRICS_ADDR").then(|| "9465".to_string()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("`metrics_addr`"), "{error}");
        let error = config
            .apply_env(|name| (name == "KOAN_GRACE_SECONDS").then(|| "soon".to_string()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("`grace_seconds`"), "{error}");
    }

    #[test]
    fn redacts_source_passwords() {
        assert_eq!(
            redact_source_url("postgres://app:hunter2@db:5432/koan"),
            "postgres://app:***@db:5432/koan"
        );
        assert_eq!(
            redact_source_url("host=db user=app password=hunter2 dbname=koan"),
            "host=db user=app password=*** dbname=koan"
        );
        assert_eq!(
            redact_source_url("host=db password='a b' user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(
            redact_source_url("postgres://db/koan?password=hunter2&sslmode=require"),
            "postgres://db/koan?password=***&sslmode=require"
        );
        assert_eq!(
            redact_source_url("postgres://db/koan"),
            "postgres://db/koan"
        );
    }
}
