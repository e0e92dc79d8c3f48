//! The coordinator service: state store, plans, broker sessions, consumers,
//! outbox drainer and lease keeping, until shutdown.
//!
//! A broker session consumes `koan.commands`, `koan.coordinator` and
//! `koan.coordinator.dead` and
//! drains the outbox; when the connection drops the session ends and a new
//! one starts after a backoff. Lease expiry and held-back progress events are
//! handled beside the sessions: they only touch the state store.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use koan_protocol::plan::DEFAULT_POOL;
use koan_protocol::topology::{COMMANDS_QUEUE, COORDINATOR_DEAD_QUEUE, COORDINATOR_QUEUE};
use koan_transport::{Broker, topology};

use crate::broker::{BrokerSink, consume, drain_loop, drain_now};
use crate::commands::{Commands, SourceCatalog};
use crate::config::{Config, sqlite_path};
use crate::dead_letters::DeadLetters;
use crate::error::CoordinatorError;
use crate::plans::PlanRegistry;
use crate::reports::Reports;
use crate::store::{PgStateStore, Policy, SqliteStateStore, StateStore};

/// Unacked commands per coordinator.
pub const COMMANDS_PREFETCH: u16 = 32;
/// Unacked worker reports per coordinator.
pub const REPORTS_PREFETCH: u16 = 64;
/// Unacked dead-lettered messages per coordinator.
pub const DEAD_PREFETCH: u16 = 16;
/// How long the first broker connection may take before `run` gives up.
pub const FIRST_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often held-back progress events are flushed.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often expired leases are looked for.
const REAP_INTERVAL: Duration = Duration::from_secs(5);
/// How long the last drain on shutdown may take.
const FINAL_DRAIN: Duration = Duration::from_secs(5);

/// Runs a coordinator until `shutdown` is cancelled, its state in PostgreSQL
/// or, for a `sqlite://` `database_url`, in one SQLite file (embedded mode).
///
/// Validates `config`, loads the plans, migrates the state store and checks
/// the source URL before connecting to RabbitMQ; any of those failing is an
/// error. Once running, broker failures are retried (reconnecting with
/// backoff) and do not end the service.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), CoordinatorError> {
    config.validate()?;
    let plans = match &config.plans_dir {
        Some(dir) => PlanRegistry::load_dir(dir)?,
        None => PlanRegistry::new(),
    };
    info!(plans = plans.len(), "plans loaded");
    let catalog = config
        .source_url
        .as_deref()
        .map(SourceCatalog::connect)
        .transpose()?;
    if let Some(catalog) = &catalog {
        info!(source = %catalog.target(), "plans are checked against the source catalog");
    }
    if let Some(path) = sqlite_path(&config.database_url) {
        let store = Arc::new(SqliteStateStore::open(path, Policy::from_config(&config))?);
        info!(path = %path.display(), "state store ready (sqlite)");
        return run_with_store(&config, store, plans, catalog, shutdown).await;
    }
    let store = Arc::new(PgStateStore::from_config(&config).await?);
    info!(schema = %config.schema, "state store ready");
    let outcome = run_with_store(&config, Arc::clone(&store), plans, catalog, shutdown).await;
    store.close();
    outcome
}

/// Runs a coordinator on any state store until `shutdown` is cancelled
/// (the embedded mode uses this with its own store).
pub async fn run_with_store<S: StateStore>(
    config: &Config,
    store: Arc<S>,
    plans: PlanRegistry,
    catalog: Option<SourceCatalog>,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let metrics = crate::metrics::Recording::start(config).await?;
    let coordinator = Coordinator {
        commands: Commands::new(Arc::clone(&store), Arc::new(plans), catalog),
        reports: Reports::new(Arc::clone(&store)),
        dead_letters: DeadLetters::new(Arc::clone(&store)).with_metrics(metrics.metrics().clone()),
        store,
        wake: Notify::new(),
    };
    let (sessions, (), ()) = tokio::join!(
        coordinator.sessions(config, &shutdown),
        coordinator.keep_leases(&shutdown),
        metrics.observe(coordinator.store.as_ref(), &shutdown)
    );
    info!(instance_id = %config.instance_id, "coordinator stopped");
    sessions
}

struct Coordinator<S> {
    store: Arc<S>,
    commands: Commands<S>,
    reports: Reports<S>,
    dead_letters: DeadLetters<S>,
    wake: Notify,
}

impl<S: StateStore> Coordinator<S> {
    /// Broker sessions, one after the other, until shutdown.
    async fn sessions(
        &self,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> Result<(), CoordinatorError> {
        let name = format!("koan-coordinator {}", config.instance_id);
        let mut connected_once = false;
        let mut pause = Duration::from_secs(1);
        loop {
            let connecting =
                Broker::connect_with_retry(&config.amqp_url, &name, FIRST_CONNECT_TIMEOUT);
            let broker = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                broker = connecting => broker,
            };
            let broker = match broker {
                Ok(broker) => broker,
                Err(error) if !connected_once => return Err(error.into()),
                Err(error) => {
                    warn!(%error, "rabbitmq still unreachable");
                    continue;
                }
            };
            connected_once = true;
            info!(url = %broker.url(), instance_id = %config.instance_id, "coordinator connected");
            let outcome = self.session(&broker, shutdown).await;
            broker.close().await;
            match outcome {
                Ok(()) if shutdown.is_cancelled() => return Ok(()),
                Ok(()) => {}
                Err(error) => {
                    warn!(code = error.code(), %error, retry_in = ?pause, "rabbitmq session ended")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }

    /// One broker session: topology, both consumers and the drainer.
    async fn session(
        &self,
        broker: &Broker,
        shutdown: &CancellationToken,
    ) -> Result<(), CoordinatorError> {
        topology::declare_coordinator(broker).await?;
        topology::declare_pool(broker, DEFAULT_POOL).await?;
        let sink = BrokerSink::new(broker);
        sink.declared(DEFAULT_POOL);
        let stop = shutdown.child_token();
        let store = self.store.as_ref();
        let (commands, reports, dead, drainer) = tokio::join!(
            cancel_on_error(
                consume(
                    broker,
                    COMMANDS_QUEUE,
                    COMMANDS_PREFETCH,
                    &self.commands,
                    &stop,
                    &self.wake
                ),
                &stop
            ),
            cancel_on_error(
                consume(
                    broker,
                    COORDINATOR_QUEUE,
                    REPORTS_PREFETCH,
                    &self.reports,
                    &stop,
                    &self.wake
                ),
                &stop
            ),
            cancel_on_error(
                consume(
                    broker,
                    COORDINATOR_DEAD_QUEUE,
                    DEAD_PREFETCH,
                    &self.dead_letters,
                    &stop,
                    &self.wake
                ),
                &stop
            ),
            cancel_on_error(drain_loop(store, &sink, &self.wake, &stop), &stop),
        );
        commands.and(reports).and(dead).and(drainer)?;
        if shutdown.is_cancelled() {
            // Publish what the last messages queued, briefly.
            match tokio::time::timeout(FINAL_DRAIN, drain_now(store, &sink)).await {
                Ok(Ok(published)) => info!(published, "outbox drained on shutdown"),
                Ok(Err(error)) => warn!(%error, "last outbox drain failed"),
                Err(_) => {
                    warn!("last outbox drain timed out; the next coordinator publishes the rest")
                }
            }
        }
        Ok(())
    }

    /// Re-publishes chunks whose lease expired and flushes held-back progress events.
    async fn keep_leases(&self, shutdown: &CancellationToken) {
        let mut flush = tokio::time::interval(FLUSH_INTERVAL);
        let mut reap = tokio::time::interval(REAP_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = flush.tick() => match self.store.flush_progress(Utc::now()).await {
                    Ok(0) => {}
                    Ok(_) => self.wake.notify_one(),
                    Err(error) => warn!(code = error.code(), %error, "flushing progress events failed"),
                },
                _ = reap.tick() => match self.store.reap_expired_leases(Utc::now()).await {
                    Ok(0) => {}
                    Ok(republished) => {
                        info!(republished, "expired chunk leases re-published");
                        self.wake.notify_one();
                    }
                    Err(error) => warn!(code = error.code(), %error, "checking chunk leases failed"),
                },
            }
        }
    }
}

/// Cancels `stop` when `task` fails, so the session's other tasks end too.
async fn cancel_on_error<F>(task: F, stop: &CancellationToken) -> Result<(), CoordinatorError>
where
    F: std::future::Future<Output = Result<(), CoordinatorError>>,
{
    let outcome = task.await;
    if outcome.is_err() {
        stop.cancel();
    }
    outcome
}
