//! The worker service: connect, declare, consume the pool queues, run jobs
//! within the concurrency limit, reconnect when RabbitMQ goes away, and shut
//! down in order (stop consuming, let jobs stop at a row boundary within the
//! grace period, release snapshots, close).

use std::sync::Arc;
use std::time::Duration;

use koan_protocol::topology::{EVENTS_EXCHANGE, pool_queue};
use koan_source::Source;
use koan_transport::error::redact_url;
use koan_transport::{Broker, Subscription, TransportError, topology};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, redact_source_url};
use crate::delivery::{WorkerContext, handle_delivery};
use crate::error::WorkerError;
use crate::jobs::JobSettings;
use crate::storage::Storage;

/// How long the first connection to RabbitMQ may take before `run` gives up.
const STARTUP_CONNECT_WINDOW: Duration = Duration::from_secs(60);
/// How long one reconnection attempt series lasts before it starts over.
const RECONNECT_WINDOW: Duration = Duration::from_secs(300);
/// Pause after a failed declaration or subscription before trying again.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);
/// Connections to PostgreSQL beyond one per job slot (inspection, planning).
const EXTRA_SOURCE_CONNECTIONS: usize = 2;

/// How a consuming session ended.
enum SessionEnd {
    /// `shutdown` was cancelled.
    Shutdown,
    /// The connection or a consumer went away.
    Lost(TransportError),
}

/// Runs a worker until `shutdown` is cancelled.
///
/// Fails only at start: invalid configuration, unusable storage or source
/// settings, or RabbitMQ unreachable for a minute. Once running, a lost
/// connection is re-established with backoff and consuming resumes.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    config.validate()?;
    let storage = Storage::open(&config.storage_url)?;
    let source = Source::from_url(
        &config.source_url,
        config.concurrency + EXTRA_SOURCE_CONNECTIONS,
    )?;
    info!(
        worker_id = %config.worker_id,
        pools = ?config.pools,
        concurrency = config.concurrency,
        amqp_url = %redact_url(&config.amqp_url),
        source_url = %redact_source_url(&config.source_url),
        storage_url = %config.storage_url,
        "worker starting"
    );
    let process_metrics = koan_metrics::global();
    // Served until `run` returns (dropping the endpoint stops it).
    let _endpoint = match config.metrics_addr {
        Some(address) => Some(koan_metrics::serve(address, process_metrics.clone()).await?),
        None => None,
    };
    let (brokers_tx, brokers_rx) = watch::channel(None);
    let context = Arc::new(WorkerContext {
        settings: JobSettings::from_config(&config),
        source,
        storage,
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        brokers: brokers_rx,
        halts: crate::halts::Halts::default(),
        metrics: crate::metrics::WorkerMetrics::new(&process_metrics.meter("koan-worker")),
    });
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let connection_name = format!("koan-worker {}", config.worker_id);
    let mut first_attempt = true;
    let mut last_session: Option<(Arc<Broker>, Vec<Subscription>)> = None;
    while !shutdown.is_cancelled() {
        let window = if first_attempt {
            STARTUP_CONNECT_WINDOW
        } else {
            RECONNECT_WINDOW
        };
        let connected = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            connected = Broker::connect_with_retry(&config.amqp_url, &connection_name, window) => connected,
        };
        let broker = match connected {
            Ok(broker) => Arc::new(broker),
            Err(error) if first_attempt => return Err(error.into()),
            Err(error) => {
                warn!(%error, "rabbitmq still unreachable, trying again");
                continue;
            }
        };
        first_attempt = false;
        let mut subscriptions = match subscribe(&broker, &config).await {
            Ok(subscriptions) => subscriptions,
            Err(error) => {
                warn!(%error, "declaring or consuming the pool queues failed, reconnecting");
                broker.close().await;
                pause(&shutdown, RESUBSCRIBE_PAUSE).await;
                continue;
            }
        };
        // Bound before consuming jobs, so a pause or cancel is never missed
        // by a job this session runs.
        let halts = match broker
            .follow(EVENTS_EXCHANGE, &crate::delivery::halt_bindings())
            .await
        {
            Ok(followed) => followed,
            Err(error) => {
                warn!(%error, "following pause and cancel events failed, reconnecting");
                for subscription in subscriptions {
                    subscription.close().await;
                }
                broker.close().await;
                pause(&shutdown, RESUBSCRIBE_PAUSE).await;
                continue;
            }
        };
        let halt_follower =
            tokio::spawn(crate::delivery::follow_halts(context.halts.clone(), halts));
        brokers_tx.send_replace(Some(broker.clone()));
        info!(url = %broker.url(), pools = ?config.pools, "consuming jobs");
        let ended = consume(&context, &broker, &mut subscriptions, &permits).await;
        halt_follower.abort();
        match ended {
            SessionEnd::Shutdown => {
                last_session = Some((broker, subscriptions));
                break;
            }
            SessionEnd::Lost(error) => {
                brokers_tx.send_replace(None);
                warn!(%error, "rabbitmq connection lost, reconnecting");
                for subscription in subscriptions {
                    subscription.close().await;
                }
                broker.close().await;
            }
        }
    }
    drain(&context, &config, last_session).await;
    drop(brokers_tx);
    Ok(())
}

/// Declares the topology and subscribes to every pool queue.
async fn subscribe(broker: &Broker, config: &Config) -> Result<Vec<Subscription>, TransportError> {
    topology::declare_exchanges(broker).await?;
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX);
    let mut subscriptions = Vec::with_capacity(config.pools.len());
    for pool in &config.pools {
        topology::declare_pool(broker, pool).await?;
        subscriptions.push(broker.subscribe(&pool_queue(pool), prefetch).await?);
    }
    Ok(subscriptions)
}

/// Takes a job slot, then the next delivery of any pool, and runs it; until
/// shutdown or the connection is lost.
async fn consume(
    context: &Arc<WorkerContext>,
    broker: &Arc<Broker>,
    subscriptions: &mut [Subscription],
    permits: &Arc<Semaphore>,
) -> SessionEnd {
    let shutdown = &context.shutdown;
    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return SessionEnd::Shutdown,
            },
        };
        let next = tokio::select! {
            biased;
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            next = next_delivery(subscriptions) => next,
        };
        let incoming = match next {
            Ok(incoming) => incoming,
            Err(error) => return SessionEnd::Lost(error),
        };
        let job_context = context.clone();
        let job_broker = broker.clone();
        context.tracker.spawn(async move {
            handle_delivery(job_context, job_broker, incoming).await;
            drop(permit);
        });
    }
}

/// The next delivery from whichever pool queue has one.
async fn next_delivery(
    subscriptions: &mut [Subscription],
) -> Result<koan_transport::Incoming, TransportError> {
    if subscriptions.is_empty() {
        return std::future::pending().await;
    }
    let nexts = subscriptions
        .iter_mut()
        .map(|subscription| Box::pin(subscription.next()));
    let (next, _, _) = futures::future::select_all(nexts).await;
    next
}

/// Stops consuming, waits up to the grace period for jobs to stop (they
/// requeue themselves) and holders to release their snapshots, then closes.
async fn drain(
    context: &WorkerContext,
    config: &Config,
    session: Option<(Arc<Broker>, Vec<Subscription>)>,
) {
    info!(running = context.tracker.len(), "worker stopping");
    if let Some((_, subscriptions)) = &session {
        for subscription in subscriptions {
            subscription.cancel().await;
        }
    }
    context.tracker.close();
    let drained = tokio::time::timeout(config.grace(), context.tracker.wait()).await;
    if drained.is_err() {
        warn!(
            still_running = context.tracker.len(),
            grace_seconds = config.grace_seconds,
            "jobs still running after the grace period; abandoning them, rabbitmq redelivers their jobs"
        );
    }
    if let Some((broker, subscriptions)) = session {
        for subscription in subscriptions {
            subscription.close().await;
        }
        broker.close().await;
    }
    info!("worker stopped");
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(duration) => {}
    }
}
