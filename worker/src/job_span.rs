//! The span of one job: named for what the job does, the child of the
//! coordinator span whose operation queued it (the job's `traceparent`), and
//! filled in with what the job reported.
//!
//! | job | span (`otel.name`) | attributes set at start |
//! |---|---|---|
//! | `plan_entity` | `plan_entity` | `plan`, `entity`, `scope`, `backup_id` |
//! | `export_chunk` | `export_chunk` | `plan`, `entity`, `scope`, `chunk`, `key_range`, `attempt` |
//! | `finalize` | `finalize` | `path` |
//! | `plan_restore` | `plan_restore` | `backup_id`, `mode`, `scope` (the target scope) |
//! | `import_part` | `import_chunk` | `entity`, `scope`, `chunk`, `unit`, `mode` |
//! | `apply_restore`, `replay_rows` | `apply_restore`, `replay_rows` | `entity`, `scope`, `mode` |
//! | `verify_backup`, `discard_backup` | `verify_backup`, `discard_backup` | `backup_id` |
//!
//! Every span also has `operation_id`, `delivery_count` (earlier deliveries
//! of the job) and `trace_id`. The results come from the job's own reports
//! ([`JobSpan::observe`]), so the span says exactly what the coordinator was
//! told: `rows`, `parts`, `bytes_raw`, `bytes_compressed` (an export's
//! parts, a plan's count, a manifest's totals), `chunks` (ranges planned),
//! `rows_merged`, `rows_skipped`, `rows_failed` (imports, applies, replays),
//! `problems` (verifies). A failure report (`entity_failed`, `chunk_failed`,
//! `finalize_failed`, `import_failed`, `operation_failed`, a verify with
//! problems) marks the span as an error with its code and reason.

use std::sync::{Mutex, PoisonError};

use tracing::{Span, field};

use koan_protocol::Message;
use koan_protocol::archive::{KeyRange, Totals};
use koan_protocol::events::WorkerEvent;
use koan_protocol::jobs::Job;
use koan_protocol::plan::EntitySpec;
use koan_protocol::trace::TraceContext;

use crate::error::WorkerError;
use crate::jobs::Outcome;

/// The code of the `chunk_failed` a stopping worker sends to free its claim:
/// not a failure of the chunk.
const SHUTDOWN_CODE: &str = "worker_shutdown";

/// One job's span and what its reports added up to so far.
#[derive(Debug)]
pub struct JobSpan {
    span: Span,
    trace: Option<TraceContext>,
    written: Mutex<Written>,
}

/// Parts reported by an export run.
#[derive(Debug, Default, Clone, Copy)]
struct Written {
    parts: u64,
    rows: u64,
    raw_bytes: u64,
    compressed_bytes: u64,
}

impl JobSpan {
    /// The span of `job`, a child of `parent` (the trace context its delivery
    /// carried; a root without one), delivered `delivery_count` times before.
    pub fn start(job: &Job, delivery_count: u32, parent: Option<&TraceContext>) -> Self {
        let span = tracing::info_span!(
            "job",
            otel.name = span_name(job),
            otel.kind = "consumer",
            kind = job.kind(),
            operation_id = %job.operation_id(),
            plan = field::Empty,
            backup_id = field::Empty,
            entity = field::Empty,
            scope = field::Empty,
            chunk = field::Empty,
            key_range = field::Empty,
            unit = field::Empty,
            mode = field::Empty,
            path = field::Empty,
            attempt = field::Empty,
            delivery_count = i64::from(delivery_count),
            rows = field::Empty,
            parts = field::Empty,
            chunks = field::Empty,
            bytes_raw = field::Empty,
            bytes_compressed = field::Empty,
            rows_merged = field::Empty,
            rows_skipped = field::Empty,
            rows_failed = field::Empty,
            problems = field::Empty,
            outcome = field::Empty,
            trace_id = field::Empty,
        );
        describe(&span, job);
        koan_telemetry::adopt(&span, parent);
        let trace = koan_telemetry::context_of(&span);
        Self {
            span,
            trace,
            written: Mutex::new(Written::default()),
        }
    }

    /// The span (enter it, or instrument the job's future with it).
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The trace context the job's reports carry: the job span's.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Records what a report of this job says: results, or a failure.
    pub fn observe(&self, event: &WorkerEvent) {
        let span = &self.span;
        match event {
            WorkerEvent::EntityPlanned(planned) => {
                span.record("rows", int(planned.rows_total));
                span.record("chunks", int(planned.ranges.len()));
            }
            WorkerEvent::PartWritten(written) => {
                let mut totals = self.written.lock().unwrap_or_else(PoisonError::into_inner);
                totals.parts += 1;
                totals.rows += written.part.rows;
                totals.raw_bytes += written.part.raw_bytes;
                totals.compressed_bytes += written.part.compressed_bytes;
            }
            WorkerEvent::ChunkDone(done) => {
                let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(part) = &done.part {
                    // The chunk's last part, carried by its chunk_done.
                    written.parts += 1;
                    written.rows += part.rows;
                    written.raw_bytes += part.raw_bytes;
                    written.compressed_bytes += part.compressed_bytes;
                }
                let totals = *written;
                drop(written);
                span.record("rows", int(totals.rows));
                span.record("parts", int(totals.parts));
                span.record("bytes_raw", int(totals.raw_bytes));
                span.record("bytes_compressed", int(totals.compressed_bytes));
            }
            WorkerEvent::ManifestWritten(manifest) => record_totals(span, &manifest.totals),
            WorkerEvent::RestorePlanned(planned) => {
                let parts: usize = planned
                    .entities
                    .iter()
                    .map(|entity| entity.parts.len())
                    .sum();
                span.record("parts", int(parts));
            }
            WorkerEvent::PartImported(imported) => {
                span.record("rows_merged", int(imported.rows_written));
                span.record("rows_skipped", int(imported.rows_skipped));
                span.record("rows_failed", int(imported.failures.len()));
                span.record("bytes_raw", int(imported.raw_bytes));
            }
            WorkerEvent::RestoreApplied(applied) => {
                span.record("rows_merged", int(applied.rows_written));
                span.record("rows_failed", int(applied.failures.len()));
            }
            WorkerEvent::ReplayDone(done) => {
                span.record("rows_merged", int(done.resolved.len()));
                span.record("rows_failed", int(done.failed.len()));
            }
            WorkerEvent::VerifyDone(done) => {
                span.record("rows", int(done.rows));
                span.record("parts", int(done.parts_checked));
                span.record("problems", int(done.problems.len()));
                if let Some(first) = done.problems.first() {
                    let reason = format!(
                        "{} bad or missing parts; first: {first}",
                        done.problems.len()
                    );
                    koan_telemetry::record_failure(span, "backup_damaged", &reason);
                }
            }
            WorkerEvent::ChunkFailed(failed) if failed.code == SHUTDOWN_CODE => {}
            WorkerEvent::ChunkFailed(failed) => self.failed(&failed.code, &failed.error),
            WorkerEvent::EntityFailed(failed) => self.failed(&failed.code, &failed.error),
            WorkerEvent::FinalizeFailed(failed) => self.failed(&failed.code, &failed.error),
            WorkerEvent::ImportFailed(failed) => self.failed(&failed.code, &failed.error),
            WorkerEvent::OperationFailed(failed) => self.failed(&failed.code, &failed.error),
            WorkerEvent::ClaimChunk(_)
            | WorkerEvent::ChunkProgress(_)
            | WorkerEvent::VerifyProgress(_)
            | WorkerEvent::Discarded(_) => {}
        }
    }

    /// Records how the delivery was settled; a job that could not report
    /// at all is an error.
    pub fn settled(&self, result: &Result<Outcome, WorkerError>) {
        let outcome = match result {
            Ok(Outcome::Ack) => "acked",
            Ok(Outcome::Requeue) => "requeued",
            Err(error) => {
                koan_telemetry::record_failure(&self.span, error.code(), &error.to_string());
                "requeued"
            }
        };
        self.span.record("outcome", outcome);
    }

    fn failed(&self, code: &str, reason: &str) {
        koan_telemetry::record_failure(&self.span, code, reason);
    }
}

/// The span name of a job: its kind, but `import_chunk` for an `import_part`
/// (a restore's unit of work, as `export_chunk` is a backup's).
fn span_name(job: &Job) -> &'static str {
    match job {
        Job::ImportPart(_) => "import_chunk",
        other => other.kind(),
    }
}

/// Records what the job is about.
fn describe(span: &Span, job: &Job) {
    match job {
        Job::PlanEntity(job) => {
            span.record("plan", job.plan_id.as_str());
            span.record("backup_id", field::display(job.backup_id));
            entity(span, &job.entity);
        }
        Job::ExportChunk(job) => {
            span.record("plan", job.plan_id.as_str());
            span.record("backup_id", field::display(job.backup_id));
            entity(span, &job.entity);
            span.record("chunk", i64::from(job.chunk));
            span.record("key_range", key_range(&job.range));
            span.record("attempt", i64::from(job.attempt));
        }
        Job::Finalize(job) => {
            span.record("path", job.path.as_str());
        }
        Job::PlanRestore(job) => {
            span.record("backup_id", field::display(job.backup_id));
            span.record("mode", job.mode.as_str());
            if let Some(scope) = &job.target_scope {
                span.record("scope", scope.as_str());
            }
        }
        Job::ImportPart(job) => {
            entity(span, &job.entity);
            span.record("chunk", i64::from(job.chunk));
            span.record("unit", i64::from(job.unit));
            span.record("mode", job.target.mode.as_str());
            if let Some(scope) = &job.target.target_scope {
                span.record("scope", scope.as_str());
            }
        }
        Job::ApplyRestore(job) => {
            entity(span, &job.entity);
            span.record("mode", job.target.mode.as_str());
        }
        Job::Replay(job) => {
            entity(span, &job.entity);
            span.record("mode", job.target.mode.as_str());
        }
        Job::Verify(job) => {
            span.record("backup_id", field::display(job.backup_id));
        }
        Job::Discard(_) => {}
    }
}

fn entity(span: &Span, spec: &EntitySpec) {
    span.record("entity", spec.name.as_str());
    if let Some(scope) = &spec.scope {
        span.record("scope", scope.as_str());
    }
}

fn record_totals(span: &Span, totals: &Totals) {
    span.record("rows", int(totals.rows));
    span.record("parts", int(totals.parts));
    span.record("chunks", int(totals.chunks));
    span.record("bytes_raw", int(totals.raw_bytes));
    span.record("bytes_compressed", int(totals.compressed_bytes));
}

/// A count as an OpenTelemetry integer attribute (`tracing` records `u64`
/// fields as text).
fn int<T: TryInto<i64>>(count: T) -> i64 {
    count.try_into().unwrap_or(i64::MAX)
}

/// `[lo, hi)`, an open end written `…`.
fn key_range(range: &KeyRange) -> String {
    format!(
        "[{}, {})",
        range.lo.as_deref().unwrap_or("…"),
        range.hi.as_deref().unwrap_or("…")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges_read_as_half_open_intervals() {
        let bounded = KeyRange {
            lo: Some("k0001".into()),
            hi: Some("k0500".into()),
        };
        assert_eq!(key_range(&bounded), "[k0001, k0500)");
        assert_eq!(key_range(&KeyRange { lo: None, hi: None }), "[…, …)");
    }
}
