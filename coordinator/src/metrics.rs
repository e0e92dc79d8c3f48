//! The coordinator's metrics (OpenTelemetry instruments of the meter
//! `koan-coordinator`; Prometheus names in brackets):
//!
//! | instrument | labels | what |
//! |---|---|---|
//! | `koan.coordinator.pool.jobs.waiting` [`koan_coordinator_pool_jobs_waiting`] | `pool` | data jobs waiting for a worker (export chunks not claimed, restore units not imported) |
//! | `koan.coordinator.pool.jobs.running` [`koan_coordinator_pool_jobs_running`] | `pool` | export chunks claimed and not finished |
//! | `koan.coordinator.pool.oldest_waiting` [`koan_coordinator_pool_oldest_waiting_seconds`] | `pool` | how long the oldest waiting job has waited (0 when none) |
//! | `koan.coordinator.operations` [`koan_coordinator_operations`] | `kind`, `state` | operations recorded, by kind and state |
//! | `koan.coordinator.operation.duration` [`koan_coordinator_operation_duration_seconds`] | `kind`, `state` | accepted to ended, recorded when an operation ends |
//! | `koan.coordinator.operation.rows` [`koan_coordinator_operation_rows_total`] | `kind`, `state` | rows done by ended operations |
//! | `koan.coordinator.operation.bytes` [`koan_coordinator_operation_bytes_total`] | `kind`, `state`, `form` (`raw`, `compressed`) | bytes done by ended operations |
//! | `koan.coordinator.dead_letters` [`koan_coordinator_dead_letters_total`] | `kind`, `outcome` | dead-lettered messages handled |
//!
//! The pool and operation gauges come from the state store
//! ([`crate::store::workload`] says why not from the broker), read every
//! `metrics_interval_ms` (5 s by default). Every coordinator of a deployment reports the same
//! gauges (aggregate them with `max`). Ended operations are taken from the
//! store once per deployment, so their histogram and counters add up across
//! coordinators (aggregate with `sum`). Nothing is read from the store when
//! the metrics go nowhere (no endpoint and no OTLP collector).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider as _};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use koan_metrics::Endpoint;
use koan_protocol::progress::OperationState;

use crate::config::Config;
use crate::error::CoordinatorError;
use crate::store::{FinishedOperation, OperationRole, StateStore, Workload};

/// Ended operations taken per read.
const TAKE_BATCH: u32 = 500;
/// Bucket bounds of the operation duration histogram, in seconds (1 s to a day).
const OPERATION_SECONDS: [f64; 14] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0,
    86400.0,
];

/// The coordinator's instruments. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    inner: Arc<Instruments>,
}

#[derive(Debug)]
struct Instruments {
    jobs_waiting: Gauge<u64>,
    jobs_running: Gauge<u64>,
    oldest_waiting: Gauge<f64>,
    operations: Gauge<u64>,
    operation_duration: Histogram<f64>,
    operation_rows: Counter<u64>,
    operation_bytes: Counter<u64>,
    dead_letters: Counter<u64>,
    /// Pools and (kind, state) pairs reported so far: once gone from the
    /// store they are reported as 0, not left at their last value.
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    pools: BTreeSet<String>,
    operations: BTreeSet<(&'static str, &'static str)>,
}

/// What became of a dead-lettered message the coordinator handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterOutcome {
    /// A job whose unit (and so operation) failed.
    FailedUnit,
    /// A job that changed nothing (stale, or its operation had ended).
    Unchanged,
    /// A job that could not be applied and was dropped.
    Dropped,
    /// Not a job (acked; the copy in `koan.dead` stays).
    NotAJob,
}

impl DeadLetterOutcome {
    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailedUnit => "failed_unit",
            Self::Unchanged => "unchanged",
            Self::Dropped => "dropped",
            Self::NotAJob => "not_a_job",
        }
    }
}

impl CoordinatorMetrics {
    /// Instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let inner = Instruments {
            jobs_waiting: meter
                .u64_gauge("koan.coordinator.pool.jobs.waiting")
                .with_description(
                    "Data jobs waiting for a worker: export chunks not claimed, restore units not imported",
                )
                .with_unit("{job}")
                .build(),
            jobs_running: meter
                .u64_gauge("koan.coordinator.pool.jobs.running")
                .with_description("Export chunks claimed by a worker and not finished")
                .with_unit("{job}")
                .build(),
            oldest_waiting: meter
                .f64_gauge("koan.coordinator.pool.oldest_waiting")
                .with_description("How long the oldest waiting data job of the pool has waited")
                .with_unit("s")
                .build(),
            operations: meter
                .u64_gauge("koan.coordinator.operations")
                .with_description("Operations recorded, by kind and state")
                .with_unit("{operation}")
                .build(),
            operation_duration: meter
                .f64_histogram("koan.coordinator.operation.duration")
                .with_description("Time from accepting an operation to its end")
                .with_unit("s")
                .with_boundaries(OPERATION_SECONDS.to_vec())
                .build(),
            operation_rows: meter
                .u64_counter("koan.coordinator.operation.rows")
                .with_description("Rows done by ended operations, by kind and final state")
                .with_unit("{row}")
                .build(),
            operation_bytes: meter
                .u64_counter("koan.coordinator.operation.bytes")
                .with_description(
                    "Bytes done by ended operations (JSON lines raw, stored compressed)",
                )
                .with_unit("By")
                .build(),
            dead_letters: meter
                .u64_counter("koan.coordinator.dead_letters")
                .with_description("Dead-lettered messages handled, by job kind and outcome")
                .with_unit("{message}")
                .build(),
            seen: Mutex::new(Seen::default()),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Instruments that record nothing.
    pub fn disabled() -> Self {
        Self::new(&opentelemetry::metrics::NoopMeterProvider::new().meter("koan-coordinator"))
    }

    /// Sets the pool and operation gauges from the store's figures at `now`.
    pub fn record_workload(&self, workload: &Workload, now: DateTime<Utc>) {
        let instruments = &self.inner;
        let mut seen = instruments
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut idle: BTreeSet<String> = seen.pools.clone();
        for pool in &workload.pools {
            idle.remove(&pool.pool);
            seen.pools.insert(pool.pool.clone());
            let labels = [KeyValue::new("pool", pool.pool.clone())];
            instruments.jobs_waiting.record(pool.waiting, &labels);
            instruments.jobs_running.record(pool.running, &labels);
            let waited = pool
                .oldest_waiting_since
                .map_or(0.0, |since| seconds_between(since, now));
            instruments.oldest_waiting.record(waited, &labels);
        }
        for pool in idle {
            let labels = [KeyValue::new("pool", pool)];
            instruments.jobs_waiting.record(0, &labels);
            instruments.jobs_running.record(0, &labels);
            instruments.oldest_waiting.record(0.0, &labels);
        }
        let mut absent = seen.operations.clone();
        for count in &workload.operations {
            let key = (count.role.as_str(), count.state.as_str());
            absent.remove(&key);
            seen.operations.insert(key);
            instruments
                .operations
                .record(count.count, &operation_labels(count.role, count.state));
        }
        for (kind, state) in absent {
            instruments.operations.record(
                0,
                &[KeyValue::new("kind", kind), KeyValue::new("state", state)],
            );
        }
    }

    /// Records an operation that ended: its duration, rows and bytes.
    pub fn record_finished(&self, finished: &FinishedOperation) {
        let labels = operation_labels(finished.role, finished.state);
        self.inner.operation_duration.record(
            seconds_between(finished.created_at, finished.finished_at),
            &labels,
        );
        self.inner.operation_rows.add(finished.rows, &labels);
        for (form, bytes) in [
            ("raw", finished.bytes_raw),
            ("compressed", finished.bytes_compressed),
        ] {
            let mut labels = labels.to_vec();
            labels.push(KeyValue::new("form", form));
            self.inner.operation_bytes.add(bytes, &labels);
        }
    }

    /// Counts a dead-lettered message of job kind `kind` (`none` for a non-job).
    pub fn dead_letter(&self, kind: &'static str, outcome: DeadLetterOutcome) {
        self.inner.dead_letters.add(
            1,
            &[
                KeyValue::new("kind", kind),
                KeyValue::new("outcome", outcome.as_str()),
            ],
        );
    }
}

fn operation_labels(role: OperationRole, state: OperationState) -> [KeyValue; 2] {
    [
        KeyValue::new("kind", role.as_str()),
        KeyValue::new("state", state.as_str()),
    ]
}

/// Seconds from `from` to `to`, never negative.
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    // Exact below 2^53 ms (285,000 years).
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

/// Reads the store once: gauges, then every ended operation not yet taken.
pub async fn observe_once<S: StateStore>(
    store: &S,
    metrics: &CoordinatorMetrics,
) -> Result<(), CoordinatorError> {
    let workload = store.workload().await?;
    metrics.record_workload(&workload, Utc::now());
    loop {
        let finished = store.take_finished(TAKE_BATCH).await?;
        for operation in &finished {
            debug!(operation_id = %operation.id, kind = operation.role.as_str(),
                state = operation.state.as_str(), "ended operation recorded in the metrics");
            metrics.record_finished(operation);
        }
        if finished.len() < usize::try_from(TAKE_BATCH).unwrap_or(usize::MAX) {
            return Ok(());
        }
    }
}

/// The coordinator's metrics as one service runs them: instruments, the
/// endpoint when configured, and whether the store is read for them.
#[derive(Debug)]
pub struct Recording {
    metrics: CoordinatorMetrics,
    endpoint: Option<Endpoint>,
    observed: bool,
    interval: Duration,
}

impl Recording {
    /// Instruments on the process's meter provider; binds the endpoint of
    /// `config.metrics_addr` (an address that cannot be bound is an error
    /// naming it).
    pub async fn start(config: &Config) -> Result<Self, CoordinatorError> {
        let process = koan_metrics::global();
        let metrics = CoordinatorMetrics::new(&process.meter("koan-coordinator"));
        let endpoint = match config.metrics_addr {
            Some(address) => Some(koan_metrics::serve(address, process.clone()).await?),
            None => None,
        };
        let observed = endpoint.is_some() || process.exports_otlp();
        Ok(Self {
            metrics,
            endpoint,
            observed,
            interval: config.metrics_interval(),
        })
    }

    /// The instruments.
    pub fn metrics(&self) -> &CoordinatorMetrics {
        &self.metrics
    }

    /// Where the endpoint listens, if it runs.
    pub fn endpoint(&self) -> Option<std::net::SocketAddr> {
        self.endpoint.as_ref().map(Endpoint::address)
    }

    /// Reads the store every `metrics_interval_ms` until `shutdown` (returns
    /// at once when the metrics go nowhere). A failed read is logged and
    /// tried again at the next interval.
    pub async fn observe<S: StateStore>(&self, store: &S, shutdown: &CancellationToken) {
        if !self.observed {
            return;
        }
        info!("metrics: reading pool backlogs and ended operations from the state store");
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(error) = observe_once(store, &self.metrics).await {
                warn!(code = error.code(), %error, "reading the state store for the metrics failed");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use chrono::TimeDelta;
    use uuid::Uuid;

    use super::*;
    use crate::store::{OperationCount, PoolWorkload};

    fn line<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
        text.lines().find(|line| line.starts_with(prefix))
    }

    #[test]
    fn gauges_follow_the_store_and_drop_to_zero() {
        let process = koan_metrics::Metrics::new("test");
        let metrics = CoordinatorMetrics::new(&process.meter("koan-coordinator"));
        let now = Utc::now();
        metrics.record_workload(
            &Workload {
                pools: vec![PoolWorkload {
                    pool: "big-tenant".into(),
                    waiting: 12,
                    running: 4,
                    oldest_waiting_since: Some(now - TimeDelta::seconds(90)),
                }],
                operations: vec![OperationCount {
                    role: OperationRole::Backup,
                    state: OperationState::Running,
                    count: 2,
                }],
            },
            now,
        );
        let text = process.render().unwrap();
        assert_eq!(
            line(&text, "koan_coordinator_pool_jobs_waiting{"),
            Some("koan_coordinator_pool_jobs_waiting{pool=\"big-tenant\"} 12")
        );
        assert_eq!(
            line(&text, "koan_coordinator_pool_jobs_running{"),
            Some("koan_coordinator_pool_jobs_running{pool=\"big-tenant\"} 4")
        );
        assert_eq!(
            line(&text, "koan_coordinator_pool_oldest_waiting_seconds{"),
            Some("koan_coordinator_pool_oldest_waiting_seconds{pool=\"big-tenant\"} 90")
        );
        assert_eq!(
            line(&text, "koan_coordinator_operations{"),
            Some("koan_coordinator_operations{kind=\"backup\",state=\"running\"} 2")
        );

        metrics.record_workload(&Workload::default(), now);
        let text = process.render().unwrap();
        assert_eq!(
            line(&text, "koan_coordinator_pool_jobs_waiting{"),
            Some("koan_coordinator_pool_jobs_waiting{pool=\"big-tenant\"} 0")
        );
        assert_eq!(
            line(&text, "koan_coordinator_pool_oldest_waiting_seconds{"),
            Some("koan_coordinator_pool_oldest_waiting_seconds{pool=\"big-tenant\"} 0")
        );
        assert_eq!(
            line(&text, "koan_coordinator_operations{"),
            Some("koan_coordinator_operations{kind=\"backup\",state=\"running\"} 0")
        );
    }

    #[test]
    fn ended_operations_add_duration_rows_and_bytes() {
        let process = koan_metrics::Metrics::new("test");
        let metrics = CoordinatorMetrics::new(&process.meter("koan-coordinator"));
        let ended = Utc::now();
        metrics.record_finished(&FinishedOperation {
            id: Uuid::now_v7(),
            role: OperationRole::Backup,
            state: OperationState::Completed,
            created_at: ended - TimeDelta::seconds(45),
            finished_at: ended,
            rows: 66_667,
            bytes_raw: 9_000_000,
            bytes_compressed: 1_200_000,
        });
        metrics.dead_letter("export_chunk", DeadLetterOutcome::FailedUnit);
        let text = process.render().unwrap();
        for expected in [
            "koan_coordinator_operation_rows_total{kind=\"backup\",state=\"completed\"} 66667",
            "koan_coordinator_operation_bytes_total{form=\"compressed\",kind=\"backup\",state=\"completed\"} 1200000",
            "koan_coordinator_operation_bytes_total{form=\"raw\",kind=\"backup\",state=\"completed\"} 9000000",
            "koan_coordinator_operation_duration_seconds_bucket{kind=\"backup\",state=\"completed\",le=\"30\"} 0",
            "koan_coordinator_operation_duration_seconds_bucket{kind=\"backup\",state=\"completed\",le=\"60\"} 1",
            "koan_coordinator_operation_duration_seconds_sum{kind=\"backup\",state=\"completed\"} 45",
            "koan_coordinator_operation_duration_seconds_count{kind=\"backup\",state=\"completed\"} 1",
            "koan_coordinator_dead_letters_total{kind=\"export_chunk\",outcome=\"failed_unit\"} 1",
        ] {
            assert!(
                text.lines().any(|line| line == expected),
                "missing `{expected}` in\n{text}"
            );
        }
    }
}
