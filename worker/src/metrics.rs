//! The worker's metrics (OpenTelemetry instruments of the meter
//! `koan-worker`; Prometheus names in brackets):
//!
//! | instrument | labels | what |
//! |---|---|---|
//! | `koan.worker.exported.rows` [`koan_worker_exported_rows_total`] | `entity` | rows in parts reported durable |
//! | `koan.worker.exported.bytes` [`koan_worker_exported_bytes_total`] | `entity`, `form` (`raw`, `compressed`) | JSON-line and stored bytes of those parts |
//! | `koan.worker.imported.rows` [`koan_worker_imported_rows_total`] | `entity`, `outcome` (`written`, `skipped`, `failed`) | rows of imported parts (staged rows in `replace` mode) |
//! | `koan.worker.imported.bytes` [`koan_worker_imported_bytes_total`] | `entity`, `form` | bytes of imported parts |
//! | `koan.worker.chunk.duration` [`koan_worker_chunk_duration_seconds`] | `entity`, `outcome` (`done`, `failed`) | from the granted claim to `chunk_done` or `chunk_failed` |
//! | `koan.worker.job.duration` [`koan_worker_job_duration_seconds`] | `kind`, `outcome` (`ack`, `requeue`) | every job, from start to its ack or requeue |
//! | `koan.worker.jobs.in_flight` [`koan_worker_jobs_in_flight`] | `kind` | jobs running now (export chunks are `kind="export_chunk"`) |
//! | `koan.worker.retries` [`koan_worker_retries_total`] | `kind` | deliveries handed back to the queue (retryable failure, hand-back, shutdown); 0 from a kind's first job |
//! | `koan.worker.dead_lettered` [`koan_worker_dead_lettered_total`] | | deliveries that were not jobs, dead-lettered (the reason is logged); 0 from the start |
//!
//! Rows and bytes are counted from the reports themselves ([`MeteredEvents`]),
//! once the broker confirmed them: the figures are what the coordinator was
//! told. Their sum over the workers equals the manifest's totals unless a
//! run was superseded (its late parts are refused by the coordinator but
//! were written and counted here). Labels never name operations, chunks or
//! parts, so the series stay few.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use koan_protocol::events::{ChunkClaim, ClaimChunk, WorkerEvent};
use koan_protocol::jobs::Job;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _, UpDownCounter};

use crate::error::WorkerError;
use crate::events::Events;
use crate::jobs::Outcome;

/// Bucket bounds of the chunk duration histogram, in seconds.
const CHUNK_SECONDS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Bucket bounds of the job duration histogram, in seconds.
const JOB_SECONDS: [f64; 15] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0,
];

/// The worker's instruments. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    inner: Arc<Instruments>,
}

#[derive(Debug)]
struct Instruments {
    exported_rows: Counter<u64>,
    exported_bytes: Counter<u64>,
    imported_rows: Counter<u64>,
    imported_bytes: Counter<u64>,
    chunk_duration: Histogram<f64>,
    job_duration: Histogram<f64>,
    jobs_in_flight: UpDownCounter<i64>,
    retries: Counter<u64>,
    dead_lettered: Counter<u64>,
}

impl WorkerMetrics {
    /// Instruments on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let inner = Instruments {
            exported_rows: meter
                .u64_counter("koan.worker.exported.rows")
                .with_description("Rows in exported parts reported durable")
                .with_unit("{row}")
                .build(),
            exported_bytes: meter
                .u64_counter("koan.worker.exported.bytes")
                .with_description(
                    "Bytes of exported parts reported durable (JSON lines raw, stored compressed)",
                )
                .with_unit("By")
                .build(),
            imported_rows: meter
                .u64_counter("koan.worker.imported.rows")
                .with_description("Rows of imported parts, by outcome")
                .with_unit("{row}")
                .build(),
            imported_bytes: meter
                .u64_counter("koan.worker.imported.bytes")
                .with_description("Bytes of imported parts (JSON lines raw, stored compressed)")
                .with_unit("By")
                .build(),
            chunk_duration: meter
                .f64_histogram("koan.worker.chunk.duration")
                .with_description(
                    "Time from a granted chunk claim to its chunk_done or chunk_failed",
                )
                .with_unit("s")
                .with_boundaries(CHUNK_SECONDS.to_vec())
                .build(),
            job_duration: meter
                .f64_histogram("koan.worker.job.duration")
                .with_description("Time from a job's start to its ack or requeue")
                .with_unit("s")
                .with_boundaries(JOB_SECONDS.to_vec())
                .build(),
            jobs_in_flight: meter
                .i64_up_down_counter("koan.worker.jobs.in_flight")
                .with_description("Jobs running now")
                .with_unit("{job}")
                .build(),
            retries: meter
                .u64_counter("koan.worker.retries")
                .with_description("Deliveries handed back to their queue to run again")
                .with_unit("{delivery}")
                .build(),
            dead_lettered: meter
                .u64_counter("koan.worker.dead_lettered")
                .with_description("Deliveries that were not jobs, dead-lettered")
                .with_unit("{delivery}")
                .build(),
        };
        // Shown from the start, so an alert on it has a series to watch.
        inner.dead_lettered.add(0, &[]);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Instruments that record nothing.
    pub fn disabled() -> Self {
        Self::new(&opentelemetry::metrics::NoopMeterProvider::new().meter("koan-worker"))
    }

    /// A job of `kind` starts: it is in flight until the timer finishes (or drops).
    pub fn job_started(&self, kind: &'static str) -> JobTimer {
        let labels = [KeyValue::new("kind", kind)];
        self.inner.jobs_in_flight.add(1, &labels);
        self.inner.retries.add(0, &labels);
        JobTimer {
            metrics: self.clone(),
            kind,
            started: Instant::now(),
            running: true,
        }
    }

    /// A delivery that is not a job was dead-lettered.
    pub fn dead_lettered(&self) {
        self.inner.dead_lettered.add(1, &[]);
    }

    /// Counts what a confirmed report says.
    fn reported(&self, event: &WorkerEvent, import_compressed: Option<u64>) {
        let instruments = &self.inner;
        // The chunk's last part travels with its chunk_done: counted the same.
        let exported = match event {
            WorkerEvent::PartWritten(written) => Some((&written.entity, &written.part)),
            WorkerEvent::ChunkDone(done) => done.part.as_ref().map(|part| (&done.entity, part)),
            _ => None,
        };
        if let Some((entity, part)) = exported {
            let entity = KeyValue::new("entity", entity.clone());
            instruments
                .exported_rows
                .add(part.rows, std::slice::from_ref(&entity));
            for (form, bytes) in [
                ("raw", part.raw_bytes),
                ("compressed", part.compressed_bytes),
            ] {
                instruments
                    .exported_bytes
                    .add(bytes, &[entity.clone(), KeyValue::new("form", form)]);
            }
        }
        if let WorkerEvent::PartImported(imported) = event {
            let entity = KeyValue::new("entity", imported.entity.clone());
            let failed = u64::try_from(imported.failures.len()).unwrap_or(u64::MAX);
            for (outcome, rows) in [
                ("written", imported.rows_written),
                ("skipped", imported.rows_skipped),
                ("failed", failed),
            ] {
                instruments
                    .imported_rows
                    .add(rows, &[entity.clone(), KeyValue::new("outcome", outcome)]);
            }
            instruments.imported_bytes.add(
                imported.raw_bytes,
                &[entity.clone(), KeyValue::new("form", "raw")],
            );
            if let Some(compressed) = import_compressed {
                instruments
                    .imported_bytes
                    .add(compressed, &[entity, KeyValue::new("form", "compressed")]);
            }
        }
    }

    fn chunk_ended(&self, entity: &str, outcome: &'static str, took: Duration) {
        self.inner.chunk_duration.record(
            took.as_secs_f64(),
            &[
                KeyValue::new("entity", entity.to_string()),
                KeyValue::new("outcome", outcome),
            ],
        );
    }
}

/// A running job, as the metrics see it.
#[derive(Debug)]
pub struct JobTimer {
    metrics: WorkerMetrics,
    kind: &'static str,
    started: Instant,
    running: bool,
}

impl JobTimer {
    /// The job returned `result`: records its duration, and a retry when its
    /// delivery goes back to the queue (a requeue, or an error reporting it).
    pub fn finish(mut self, result: &Result<Outcome, WorkerError>) {
        let outcome = match result {
            Ok(Outcome::Ack) => "ack",
            Ok(Outcome::Requeue) | Err(_) => "requeue",
        };
        let instruments = &self.metrics.inner;
        let kind = KeyValue::new("kind", self.kind);
        instruments.job_duration.record(
            self.started.elapsed().as_secs_f64(),
            &[kind.clone(), KeyValue::new("outcome", outcome)],
        );
        if outcome == "requeue" {
            instruments.retries.add(1, std::slice::from_ref(&kind));
        }
        instruments.jobs_in_flight.add(-1, &[kind]);
        self.running = false;
    }
}

impl Drop for JobTimer {
    fn drop(&mut self) {
        if self.running {
            // The job's task ended without a result (aborted): no longer in flight.
            self.metrics
                .inner
                .jobs_in_flight
                .add(-1, &[KeyValue::new("kind", self.kind)]);
        }
    }
}

/// An [`Events`] sink that counts what one job reports, once the inner sink
/// confirmed it: rows and bytes exported and imported, and the chunk's
/// duration from its granted claim. One per job; clones share its state.
#[derive(Debug, Clone)]
pub struct MeteredEvents<E> {
    inner: E,
    metrics: WorkerMetrics,
    /// An import job's stored part size (the report gives the raw size only).
    import_compressed: Option<u64>,
    /// The run whose claim was granted, and when.
    claimed: Arc<Mutex<Option<(String, Instant)>>>,
}

impl<E: Events> MeteredEvents<E> {
    /// Counts the reports of `job` sent through `inner`.
    pub fn new(inner: E, metrics: &WorkerMetrics, job: &Job) -> Self {
        let import_compressed = match job {
            Job::ImportPart(import) => Some(import.part.compressed_bytes),
            _ => None,
        };
        Self {
            inner,
            metrics: metrics.clone(),
            import_compressed,
            claimed: Arc::new(Mutex::new(None)),
        }
    }

    /// The sink reports go through.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    fn claim_ended(&self, run: &str, entity: &str, outcome: &'static str) {
        let mut claimed = self.claimed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((owner, since)) = claimed.as_ref()
            && owner == run
        {
            self.metrics.chunk_ended(entity, outcome, since.elapsed());
            *claimed = None;
        }
    }
}

impl<E: Events> Events for MeteredEvents<E> {
    async fn publish(&self, event: &WorkerEvent) -> Result<(), WorkerError> {
        self.inner.publish(event).await?;
        self.metrics.reported(event, self.import_compressed);
        match event {
            WorkerEvent::ChunkDone(done) => self.claim_ended(&done.run, &done.entity, "done"),
            WorkerEvent::ChunkFailed(failed) => {
                self.claim_ended(&failed.run, &failed.entity, "failed");
            }
            _ => {}
        }
        Ok(())
    }

    async fn claim(
        &self,
        request: &ClaimChunk,
        timeout: Duration,
    ) -> Result<ChunkClaim, WorkerError> {
        let claim = self.inner.claim(request, timeout).await?;
        if claim.granted {
            *self.claimed.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((request.run.clone(), Instant::now()));
        }
        Ok(claim)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use koan_protocol::archive::{KeyRange, PartInfo};
    use koan_protocol::commands::RestoreMode;
    use koan_protocol::events::{ChunkDone, PartImported, PartWritten, RowFailure};
    use koan_protocol::jobs::{ExportChunk, ImportPart, RestoreTarget};
    use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec};
    use uuid::Uuid;

    use super::*;
    use crate::events::MemoryEvents;

    fn spec() -> EntitySpec {
        BackupPlan::new("orders:daily")
            .entity(BackupEntity::new("orders", "Order"))
            .entity_specs()
            .remove(0)
    }

    fn part(rows: u64) -> PartInfo {
        PartInfo {
            part: 0,
            path: "p".into(),
            first_key: None,
            last_key: None,
            rows,
            raw_bytes: rows * 100,
            compressed_bytes: rows * 20,
            blake3: "h".into(),
        }
    }

    fn has(text: &str, expected: &str) {
        assert!(
            text.lines().any(|line| line == expected),
            "missing `{expected}` in\n{text}"
        );
    }

    #[tokio::test]
    async fn counts_exported_parts_and_times_the_chunk() {
        let process = koan_metrics::Metrics::new("test");
        let metrics = WorkerMetrics::new(&process.meter("koan-worker"));
        let operation_id = Uuid::now_v7();
        let job = Job::ExportChunk(ExportChunk {
            operation_id,
            backup_id: operation_id,
            plan_id: "orders:daily".into(),
            entity: spec(),
            chunk: 3,
            range: KeyRange { lo: None, hi: None },
            attempt: 1,
            snapshot_id: None,
            part_bytes: 1024,
        });
        let memory = MemoryEvents::granting();
        let events = MeteredEvents::new(memory.clone(), &metrics, &job);
        let claim = ClaimChunk {
            operation_id,
            entity: "orders".into(),
            chunk: 3,
            attempt: 1,
            run: "run-1".into(),
            worker: "w".into(),
        };
        assert!(
            events
                .claim(&claim, Duration::from_secs(1))
                .await
                .unwrap()
                .granted
        );
        for rows in [600, 400] {
            events
                .publish(&WorkerEvent::PartWritten(PartWritten {
                    operation_id,
                    entity: "orders".into(),
                    chunk: 3,
                    run: "run-1".into(),
                    part: part(rows),
                }))
                .await
                .unwrap();
        }
        events
            .clone()
            .publish(&WorkerEvent::ChunkDone(ChunkDone {
                operation_id,
                entity: "orders".into(),
                chunk: 3,
                run: "run-1".into(),
                parts: 2,
                part: None,
            }))
            .await
            .unwrap();
        assert_eq!(memory.events().len(), 3, "every report went through");

        let text = process.render().unwrap();
        has(
            &text,
            "koan_worker_exported_rows_total{entity=\"orders\"} 1000",
        );
        has(
            &text,
            "koan_worker_exported_bytes_total{entity=\"orders\",form=\"raw\"} 100000",
        );
        has(
            &text,
            "koan_worker_exported_bytes_total{entity=\"orders\",form=\"compressed\"} 20000",
        );
        has(
            &text,
            "koan_worker_chunk_duration_seconds_count{entity=\"orders\",outcome=\"done\"} 1",
        );
    }

    #[tokio::test]
    async fn counts_imported_rows_by_outcome_and_nothing_unconfirmed() {
        let process = koan_metrics::Metrics::new("test");
        let metrics = WorkerMetrics::new(&process.meter("koan-worker"));
        let operation_id = Uuid::now_v7();
        let job = Job::ImportPart(ImportPart {
            operation_id,
            entity: spec(),
            target: RestoreTarget {
                mode: RestoreMode::Merge,
                target_scope: None,
                staging_table: None,
            },
            unit: 0,
            chunk: 0,
            part: part(50),
        });
        let memory = MemoryEvents::granting();
        let events = MeteredEvents::new(memory.clone(), &metrics, &job);
        let failure = RowFailure {
            key: Some("k".into()),
            part: None,
            line_no: Some(1),
            code: "constraint".into(),
            reason: "r".into(),
            line: "{}".into(),
        };
        let imported = WorkerEvent::PartImported(PartImported {
            operation_id,
            entity: "orders".into(),
            unit: 0,
            rows_written: 40,
            rows_skipped: 9,
            failures: vec![failure],
            raw_bytes: 5000,
        });
        events.publish(&imported).await.unwrap();
        memory.fail_publish_after(1);
        assert!(events.publish(&imported).await.is_err());

        let text = process.render().unwrap();
        for (outcome, rows) in [("written", 40), ("skipped", 9), ("failed", 1)] {
            has(
                &text,
                &format!(
                    "koan_worker_imported_rows_total{{entity=\"orders\",outcome=\"{outcome}\"}} {rows}"
                ),
            );
        }
        has(
            &text,
            "koan_worker_imported_bytes_total{entity=\"orders\",form=\"raw\"} 5000",
        );
        has(
            &text,
            "koan_worker_imported_bytes_total{entity=\"orders\",form=\"compressed\"} 1000",
        );
    }

    #[test]
    fn jobs_in_flight_retries_and_dead_letters() {
        let process = koan_metrics::Metrics::new("test");
        let metrics = WorkerMetrics::new(&process.meter("koan-worker"));
        let text = process.render().unwrap();
        has(&text, "koan_worker_dead_lettered_total 0");
        let first = metrics.job_started("export_chunk");
        let second = metrics.job_started("export_chunk");
        let third = metrics.job_started("import_part");
        let text = process.render().unwrap();
        has(&text, "koan_worker_jobs_in_flight{kind=\"export_chunk\"} 2");
        has(&text, "koan_worker_jobs_in_flight{kind=\"import_part\"} 1");

        first.finish(&Ok(Outcome::Requeue));
        second.finish(&Ok(Outcome::Ack));
        drop(third);
        metrics.dead_lettered();
        let text = process.render().unwrap();
        has(&text, "koan_worker_jobs_in_flight{kind=\"export_chunk\"} 0");
        has(&text, "koan_worker_jobs_in_flight{kind=\"import_part\"} 0");
        has(&text, "koan_worker_retries_total{kind=\"export_chunk\"} 1");
        has(
            &text,
            "koan_worker_job_duration_seconds_count{kind=\"export_chunk\",outcome=\"ack\"} 1",
        );
        has(
            &text,
            "koan_worker_job_duration_seconds_count{kind=\"export_chunk\",outcome=\"requeue\"} 1",
        );
        has(&text, "koan_worker_dead_lettered_total 1");
        has(&text, "koan_worker_retries_total{kind=\"import_part\"} 0");
    }
}
