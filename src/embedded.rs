//! Embedded mode: one deployment inside this process — a coordinator and its
//! workers over the in-process broker, state in one SQLite file (or the
//! PostgreSQL of `KOAN_DATABASE_URL`). The services run exactly the code they
//! run as separate processes; only the broker URL (`memory://…`) and the state
//! store differ. The CLI then talks to them like any client.
//!
//! One process at a time may run a deployment on a state file: the file is
//! locked (`<state>.lock`) for as long as the deployment runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use koan_transport::MemoryBroker;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::Client;

/// How long the in-process coordinator may take to answer its first command.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the services get to stop (workers hand their jobs back).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// Flags of the embedded mode (`--embedded` and what it needs).
#[derive(Debug, Clone, Args)]
pub struct EmbeddedArgs {
    /// Run the coordinator and workers inside this process, without RabbitMQ.
    #[arg(long, global = true)]
    pub embedded: bool,
    /// Embedded: the state file [env: KOAN_STATE_PATH, default: ./koan-state.db];
    /// `KOAN_DATABASE_URL` puts the state in PostgreSQL instead.
    #[arg(long, global = true)]
    pub state: Option<PathBuf>,
    /// Embedded: worker count [default: 2].
    #[arg(long, global = true)]
    pub workers: Option<usize>,
    /// Embedded: the entity source the workers read and restore into [env: KOAN_SOURCE_URL].
    #[arg(long, global = true)]
    pub source_url: Option<String>,
    /// Embedded: archive storage [env: KOAN_STORAGE_URL, default: ./koan-archives].
    #[arg(long, global = true)]
    pub storage_url: Option<String>,
}

/// Workers of one pool.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// What its workers read (backups) and write (restores).
    pub source_url: String,
    /// How many workers.
    pub workers: usize,
}

/// What an embedded deployment runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The coordinator's state: `sqlite://PATH` or a PostgreSQL URL.
    pub state_url: String,
    /// The lock file guarding a `sqlite://` state (none for PostgreSQL).
    pub lock_path: Option<PathBuf>,
    /// Archive storage.
    pub storage_url: String,
    /// The source plans are checked against.
    pub catalog_url: Option<String>,
    /// The worker pools.
    pub pools: Vec<Pool>,
    /// Bytes of JSON lines per part, when not the default.
    pub part_bytes: Option<u64>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

impl Settings {
    /// The deployment `koan-backup <command> --embedded` runs: flags, then
    /// `KOAN_*` variables, then defaults.
    pub fn from_args(args: &EmbeddedArgs) -> Result<Self> {
        let source_url = args
            .source_url
            .clone()
            .or_else(|| env("KOAN_SOURCE_URL"))
            .context(
                "--embedded needs an entity source: pass --source-url or set KOAN_SOURCE_URL",
            )?;
        let storage_url = args
            .storage_url
            .clone()
            .or_else(|| env("KOAN_STORAGE_URL"))
            .unwrap_or_else(|| "./koan-archives".to_string());
        let workers = args.workers.unwrap_or(2);
        if workers == 0 || workers > 64 {
            bail!("--workers must be between 1 and 64, got {workers}");
        }
        let (state_url, lock_path) = match env("KOAN_DATABASE_URL") {
            Some(url) if args.state.is_none() => (url, None),
            _ => {
                let path = args
                    .state
                    .clone()
                    .or_else(|| env("KOAN_STATE_PATH").map(PathBuf::from))
                    .unwrap_or_else(|| PathBuf::from("koan-state.db"));
                Self::sqlite_state(&path)
            }
        };
        Ok(Self {
            state_url,
            lock_path,
            storage_url,
            catalog_url: Some(source_url.clone()),
            pools: vec![Pool {
                name: koan_protocol::plan::DEFAULT_POOL.to_string(),
                source_url,
                workers,
            }],
            part_bytes: None,
        })
    }

    /// The state URL and lock file of a SQLite state at `path`.
    pub fn sqlite_state(path: &Path) -> (String, Option<PathBuf>) {
        let mut lock = path.as_os_str().to_owned();
        lock.push(".lock");
        (
            format!("sqlite://{}", path.display()),
            Some(PathBuf::from(lock)),
        )
    }
}

/// A running embedded deployment.
#[derive(Debug)]
pub struct Embedded {
    hub: MemoryBroker,
    shutdown: CancellationToken,
    coordinator: JoinHandle<Result<(), koan_coordinator::CoordinatorError>>,
    workers: Vec<JoinHandle<Result<(), koan_worker::WorkerError>>>,
    _lock: Option<File>,
}

impl Embedded {
    /// Starts the coordinator and workers and waits until the coordinator answers.
    pub async fn start(settings: &Settings) -> Result<Self> {
        let lock = settings.lock_path.as_deref().map(lock_state).transpose()?;
        let name = format!(
            "koan-embedded-{}-{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let hub = MemoryBroker::new(&name);
        hub.register();
        let url = hub.url();
        let shutdown = CancellationToken::new();

        let mut coordinator =
            koan_coordinator::Config::new(settings.state_url.clone()).with_env_overrides()?;
        coordinator.database_url = settings.state_url.clone();
        coordinator.amqp_url = url.clone();
        coordinator.source_url = settings.catalog_url.clone();
        if let Some(part_bytes) = settings.part_bytes {
            coordinator.part_bytes = part_bytes;
        }
        coordinator.validate()?;
        let coordinator = tokio::spawn(koan_coordinator::run(coordinator, shutdown.child_token()));

        let mut workers = Vec::new();
        for pool in &settings.pools {
            for index in 0..pool.workers {
                let mut config = koan_worker::Config::new(pool.source_url.clone());
                config.apply_env(env)?;
                config.source_url = pool.source_url.clone();
                config.amqp_url = url.clone();
                config.storage_url = settings.storage_url.clone();
                config.pools = vec![pool.name.clone()];
                config.worker_id = format!("embedded-{}-{index}", pool.name);
                // One endpoint per process: the coordinator's (KOAN_METRICS_ADDR)
                // serves every service's metrics.
                config.metrics_addr = None;
                config.validate()?;
                workers.push(tokio::spawn(koan_worker::run(
                    config,
                    shutdown.child_token(),
                )));
            }
        }
        let embedded = Self {
            hub,
            shutdown,
            coordinator,
            workers,
            _lock: lock,
        };
        embedded.ready().await?;
        Ok(embedded)
    }

    /// The broker URL clients of this deployment use.
    pub fn amqp_url(&self) -> String {
        self.hub.url()
    }

    /// Waits until the coordinator answers a `list`, or says why it stopped.
    async fn ready(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.coordinator.is_finished() {
                bail!("the embedded coordinator stopped at start (see the log above)");
            }
            if let Ok(client) = Client::connect(&self.amqp_url()).await {
                let answered = tokio::time::timeout(Duration::from_secs(2), client.list(1)).await;
                client.close().await;
                if matches!(answered, Ok(Ok(_))) {
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "the embedded coordinator did not answer within {} s",
                    READY_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the services (workers hand their jobs back) and waits for them.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let mut failures = Vec::new();
        for worker in self.workers {
            match tokio::time::timeout(STOP_TIMEOUT, worker).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => failures.push(format!("worker: {error}")),
                Ok(Err(error)) => failures.push(format!("worker task: {error}")),
                Err(_) => failures.push("a worker did not stop in time".to_string()),
            }
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.coordinator).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => failures.push(format!("coordinator: {error}")),
            Ok(Err(error)) => failures.push(format!("coordinator task: {error}")),
            Err(_) => failures.push("the coordinator did not stop in time".to_string()),
        }
        // Push what was recorded to an OTLP collector, if one is configured.
        if let Err(error) = tokio::task::spawn_blocking(koan_metrics::flush).await {
            failures.push(format!("flushing the metrics: {error}"));
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("stopping the embedded services: {}", failures.join("; "))
        }
    }
}

/// Takes the state file's lock, or says which process holds it.
fn lock_state(path: &Path) -> Result<File> {
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the state folder {}", parent.display()))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening the state lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another embedded koan-backup is running on this state ({} is locked); wait for it or use another --state",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", path.display()))
        }
    }
}
