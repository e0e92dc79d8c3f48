//! Running the long-lived services until SIGINT or SIGTERM.
//!
//! Configuration is layered: defaults, then `KOAN_*` environment variables
//! (applied by each crate's config), then command-line flags.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;

/// Flags of `koan-backup coordinator`.
#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// PostgreSQL URL of the state store [env: KOAN_DATABASE_URL].
    #[arg(long)]
    database_url: Option<String>,
    /// Schema of the state store [env: KOAN_SCHEMA, default: koan].
    #[arg(long)]
    schema: Option<String>,
    /// Folder of `*.toml` plans to register [env: KOAN_PLANS_DIR].
    #[arg(long)]
    plans: Option<PathBuf>,
    /// Entity source, for catalog checks before a plan is accepted [env: KOAN_SOURCE_URL].
    #[arg(long)]
    source_url: Option<String>,
    /// Bytes of JSON lines per part [env: KOAN_PART_BYTES, default: 16 MiB].
    #[arg(long)]
    part_bytes: Option<u64>,
    /// Seconds a chunk claim lasts without news [env: KOAN_LEASE_SECONDS, default: 60].
    #[arg(long)]
    lease_seconds: Option<u64>,
    /// Serve GET /metrics and /healthz at IP:PORT, or `off`
    /// [env: KOAN_METRICS_ADDR, default: 127.0.0.1:9464].
    #[arg(long)]
    metrics_addr: Option<String>,
}

/// Flags of `koan-backup worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Entity source (PostgreSQL URL) [env: KOAN_SOURCE_URL].
    #[arg(long)]
    source_url: Option<String>,
    /// Archive storage: `file:///absolute/path` or a plain path [env: KOAN_STORAGE_URL, default: ./koan-archives].
    #[arg(long)]
    storage_url: Option<String>,
    /// Pool to consume; repeat for several [env: KOAN_POOLS, comma separated, default: default].
    #[arg(long = "pool")]
    pools: Vec<String>,
    /// Jobs run at once [env: KOAN_CONCURRENCY, default: 2].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Name of this worker in status and logs [env: KOAN_WORKER_ID].
    #[arg(long)]
    worker_id: Option<String>,
    /// Serve GET /metrics and /healthz at IP:PORT (port 0: any free port, logged),
    /// or `off` [env: KOAN_METRICS_ADDR, default: off].
    #[arg(long)]
    metrics_addr: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

/// Where a coordinator serves its metrics unless told otherwise: a fixed,
/// well-known port (workers serve none by default, so they never collide with it).
pub const DEFAULT_COORDINATOR_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Runs a service with the process's metrics installed under `service_name`,
/// then pushes what is left over OTLP (when configured) before returning.
async fn with_metrics<T>(service_name: &str, service: impl Future<Output = T>) -> T {
    koan_metrics::init(service_name);
    let outcome = service.await;
    if let Err(error) = tokio::task::spawn_blocking(koan_metrics::shutdown).await {
        tracing::warn!(%error, "flushing the metrics failed");
    }
    outcome
}

/// A token cancelled on SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    shutdown
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut terminate), Ok(mut interrupt)) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs a coordinator until a signal.
pub async fn coordinator(amqp_url: &str, args: CoordinatorArgs) -> Result<u8> {
    let database_url = args
        .database_url
        .clone()
        .or_else(|| env("KOAN_DATABASE_URL"))
        .context(
            "the coordinator needs a state store: pass --database-url or set KOAN_DATABASE_URL",
        )?;
    let mut config = koan_coordinator::Config::new(database_url.clone()).with_env_overrides()?;
    config.database_url = database_url;
    config.amqp_url = amqp_url.to_string();
    if let Some(schema) = args.schema {
        config.schema = schema;
    }
    if let Some(plans) = args.plans {
        config.plans_dir = Some(plans);
    }
    if let Some(source_url) = args.source_url {
        config.source_url = Some(source_url);
    }
    if let Some(part_bytes) = args.part_bytes {
        config.part_bytes = part_bytes;
    }
    if let Some(lease_seconds) = args.lease_seconds {
        config.lease_seconds = lease_seconds;
    }
    match args.metrics_addr {
        Some(address) => config.metrics_addr = koan_metrics::parse_address(&address)?,
        None if env("KOAN_METRICS_ADDR").is_none() => {
            config.metrics_addr = koan_metrics::parse_address(DEFAULT_COORDINATOR_METRICS_ADDR)?;
        }
        None => {}
    }
    config.validate()?;
    with_metrics(
        "koan-coordinator",
        koan_coordinator::run(config, shutdown_on_signal()),
    )
    .await?;
    Ok(0)
}

/// Runs a worker until a signal.
pub async fn worker(amqp_url: &str, args: WorkerArgs) -> Result<u8> {
    let source_url = args
        .source_url
        .clone()
        .or_else(|| env("KOAN_SOURCE_URL"))
        .context("the worker needs an entity source: pass --source-url or set KOAN_SOURCE_URL")?;
    let mut config = koan_worker::Config::new(source_url.clone());
    config.apply_env(env)?;
    config.source_url = source_url;
    config.amqp_url = amqp_url.to_string();
    if let Some(storage_url) = args.storage_url {
        config.storage_url = storage_url;
    }
    if !args.pools.is_empty() {
        config.pools = args.pools;
    }
    if let Some(concurrency) = args.concurrency {
        config.concurrency = concurrency;
    }
    if let Some(worker_id) = args.worker_id {
        config.worker_id = worker_id;
    }
    if let Some(address) = args.metrics_addr {
        config.metrics_addr = koan_metrics::parse_address(&address)?;
    }
    config.validate()?;
    with_metrics(
        "koan-worker",
        koan_worker::run(config, shutdown_on_signal()),
    )
    .await?;
    Ok(0)
}
