//! `export_chunk`: claim a chunk, stream its rows into durable parts, report.
//!
//! 1. Claim the chunk with a fresh run id (the fencing token in part paths);
//!    a refused claim is acked and dropped.
//! 2. Stream rows from the claim's resume point into [`PartWriter`]s, rolling
//!    to a new part when a part reaches the job's `part_bytes`. Each finished
//!    part is reported (`PartWritten`, confirmed) before it counts as durable.
//!    A heartbeat reports `ChunkProgress` every second meanwhile.
//! 3. At the end of the range: `ChunkDone` with the chunk's part count and
//!    its last part (not reported on its own: the coordinator applies it as
//!    that `PartWritten` followed by the `ChunkDone`), then ack. A chunk
//!    that ends within the first progress interval sends no `ChunkProgress`.
//!
//! Failures abort the open part (it never appears in storage). Retryable ones
//! are reported and requeued until the last delivery; a pause or cancel of the
//! operation stops at the next row boundary and acks (the coordinator
//! re-publishes on resume).
//!
//! **Hand-back.** When the worker shuts down, or the delivery has been held
//! for `hand_back_after` (half of RabbitMQ's consumer timeout), the export
//! seals its open part at the current row (a shorter part, reported like any
//! other) and requeues the job: the next run continues after that part, so
//! nothing is exported twice and no delivery outlives the consumer timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use koan_protocol::archive::{PartInfo, part_path};
use koan_protocol::events::{
    ChunkDone, ChunkFailed, ChunkProgress, ClaimChunk, PartWritten, ResumePoint, WorkerEvent,
};
use koan_protocol::jobs::ExportChunk;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ChunkSource, JobSettings, Outcome, RowCursor, is_last_delivery, new_run_id};
use crate::chunk_writer::PartWriter;
use crate::error::WorkerError;
use crate::events::Events;
use crate::halts::HaltGuard;
use crate::storage::Storage;

/// How a streaming pass ended without error.
enum Streamed {
    /// Every row of the range is in durable parts, each reported but the
    /// last, which `ChunkDone` carries.
    Done {
        parts: u32,
        rows: u64,
        last: Option<PartInfo>,
    },
    /// Stopped at a row boundary (shutdown or lost broker).
    Stopped,
    /// Stopped after sealing the open part, to give the job back.
    HandedBack {
        /// Why: the worker is shutting down, or the delivery is getting old.
        reason: &'static str,
    },
}

/// Rows and bytes streamed since the last durable part, and the gate that
/// orders progress reports against part reports (no stale progress after a part).
#[derive(Default)]
struct Pending {
    rows: AtomicU64,
    raw_bytes: AtomicU64,
    gate: Mutex<()>,
}

/// One run of one export job.
struct ChunkRun<'job, E> {
    job: &'job ExportChunk,
    run: String,
    events: &'job E,
    pending: Pending,
}

/// Runs an `export_chunk` job; see the module documentation.
#[allow(clippy::too_many_arguments)]
pub async fn export_chunk<S: ChunkSource, E: Events>(
    source: &S,
    storage: &Storage,
    events: &E,
    settings: &JobSettings,
    job: &ExportChunk,
    delivery_count: u32,
    cancel: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    export_chunk_until(
        source,
        storage,
        events,
        settings,
        job,
        delivery_count,
        cancel,
        None,
        &CancellationToken::new(),
    )
    .await
}

/// Runs an `export_chunk` job that `halt` stops when its operation is paused
/// or cancelled: the open part is aborted (never reported) and the job acked,
/// since the coordinator re-publishes the chunk on resume. When `hand_back`
/// is cancelled (worker shutdown) or the delivery is `hand_back_after` old,
/// the open part is sealed and the job requeued.
#[allow(clippy::too_many_arguments)]
pub async fn export_chunk_until<S: ChunkSource, E: Events>(
    source: &S,
    storage: &Storage,
    events: &E,
    settings: &JobSettings,
    job: &ExportChunk,
    delivery_count: u32,
    cancel: &CancellationToken,
    halt: Option<&HaltGuard>,
    hand_back: &CancellationToken,
) -> Result<Outcome, WorkerError> {
    let run = ChunkRun {
        job,
        run: new_run_id(),
        events,
        pending: Pending::default(),
    };
    let request = ClaimChunk {
        operation_id: job.operation_id,
        entity: job.entity.name.clone(),
        chunk: job.chunk,
        attempt: job.attempt,
        run: run.run.clone(),
        worker: settings.worker_id.clone(),
    };
    let claim = events.claim(&request, settings.claim_timeout).await?;
    if !claim.granted {
        info!(
            operation_id = %job.operation_id,
            entity = %job.entity.name,
            chunk = job.chunk,
            attempt = job.attempt,
            reason = claim.reason.as_deref().unwrap_or("none given"),
            "chunk claim refused, dropping the job"
        );
        return Ok(Outcome::Ack);
    }
    let started = Instant::now();
    let hand_back_at = tokio::time::Instant::from_std(started) + settings.hand_back_after;
    let stop = cancel.child_token();
    let done = CancellationToken::new();
    let mut open = None;
    let streaming = async {
        let streamed = run
            .stream(
                source,
                storage,
                settings,
                claim.resume_after.as_ref(),
                Stops {
                    stop: &stop,
                    hand_back,
                    hand_back_at,
                },
                &mut open,
            )
            .await;
        done.cancel();
        streamed
    };
    let heartbeat = run.heartbeat(settings, &done, &stop);
    let (streamed, heartbeat_error) = tokio::join!(streaming, heartbeat);
    if let Some(writer) = open.take() {
        writer.abort().await;
    }
    if let Some(error) = heartbeat_error {
        warn!(operation_id = %job.operation_id, entity = %job.entity.name, chunk = job.chunk, %error, "chunk progress could not be reported, giving the job back");
        return Err(error);
    }
    match streamed {
        Ok(Streamed::Done { parts, rows, last }) => {
            run.report(WorkerEvent::ChunkDone(ChunkDone {
                operation_id: job.operation_id,
                entity: job.entity.name.clone(),
                chunk: job.chunk,
                run: run.run.clone(),
                parts,
                part: last,
            }))
            .await?;
            info!(
                operation_id = %job.operation_id,
                entity = %job.entity.name,
                chunk = job.chunk,
                rows,
                parts,
                run = %run.run,
                elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "chunk exported"
            );
            Ok(Outcome::Ack)
        }
        Ok(Streamed::HandedBack { reason }) => {
            info!(operation_id = %job.operation_id, entity = %job.entity.name, chunk = job.chunk,
                run = %run.run, reason, "chunk handed back at a part boundary, requeueing");
            Ok(Outcome::Requeue)
        }
        Ok(Streamed::Stopped) if halt.is_some_and(HaltGuard::halted) => {
            info!(operation_id = %job.operation_id, entity = %job.entity.name, chunk = job.chunk, "chunk export stopped: the operation is paused or cancelled");
            Ok(Outcome::Ack)
        }
        Ok(Streamed::Stopped) => {
            info!(operation_id = %job.operation_id, entity = %job.entity.name, chunk = job.chunk, "chunk export stopped by shutdown, requeueing");
            // Best effort: tells the coordinator the claim is free before its lease runs out.
            let released = run
                .failed("worker_shutdown", "the worker is shutting down", true)
                .await;
            if let Err(error) = released {
                debug!(%error, "reporting the interrupted run");
            }
            Ok(Outcome::Requeue)
        }
        Err(WorkerError::Transport(error)) => Err(WorkerError::Transport(error)),
        Err(error) => {
            let retryable = error.is_retryable() && !is_last_delivery(delivery_count);
            warn!(
                operation_id = %job.operation_id,
                entity = %job.entity.name,
                chunk = job.chunk,
                attempt = job.attempt,
                delivery_count,
                code = error.code(),
                retryable,
                %error,
                "chunk export failed"
            );
            run.failed(error.code(), &error.to_string(), retryable)
                .await?;
            Ok(if retryable {
                Outcome::Requeue
            } else {
                Outcome::Ack
            })
        }
    }
}

/// What ends a streaming pass early: `stop` at once (the open part is
/// aborted), `hand_back` or the `hand_back_at` deadline after sealing it.
struct Stops<'a> {
    stop: &'a CancellationToken,
    hand_back: &'a CancellationToken,
    hand_back_at: tokio::time::Instant,
}

impl Stops<'_> {
    /// Resolves with the reason once the job should be handed back.
    async fn handing_back(&self) -> &'static str {
        tokio::select! {
            () = self.hand_back.cancelled() => "worker shutting down",
            () = tokio::time::sleep_until(self.hand_back_at) => "delivery held for half the consumer timeout",
        }
    }
}

impl<E: Events> ChunkRun<'_, E> {
    async fn stream<S: ChunkSource>(
        &self,
        source: &S,
        storage: &Storage,
        settings: &JobSettings,
        resume: Option<&ResumePoint>,
        stops: Stops<'_>,
        open: &mut Option<PartWriter>,
    ) -> Result<Streamed, WorkerError> {
        let stop = stops.stop;
        let handing_back = stops.handing_back();
        tokio::pin!(handing_back);
        let job = self.job;
        let mut next_part = resume.map_or(0, |point| point.next_part);
        let mut rows_done = resume.map_or(0, |point| point.rows);
        let after_key = resume.map(|point| point.last_key.as_str());
        let part_bytes = job.part_bytes.min(settings.part_bytes_max).max(1);
        let mut rows = tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(Streamed::Stopped),
            rows = source.rows(&job.entity, &job.range, after_key, job.snapshot_id.as_deref()) => rows?,
        };
        loop {
            let next = tokio::select! {
                biased;
                () = stop.cancelled() => return Ok(Streamed::Stopped),
                reason = &mut handing_back => {
                    if let Some(last) = open.take() {
                        self.seal(last).await?;
                    }
                    return Ok(Streamed::HandedBack { reason });
                }
                next = rows.next_row() => next?,
            };
            let Some(row) = next else {
                break;
            };
            let writer = match open.take() {
                Some(writer) => writer,
                None => {
                    let path = part_path(
                        &job.entity,
                        &job.plan_id,
                        job.backup_id,
                        job.chunk,
                        next_part,
                        &self.run,
                    )?;
                    PartWriter::create(storage, &job.entity, next_part, path).await?
                }
            };
            let writer = open.insert(writer);
            let line_bytes = writer
                .write_row(&row.key, row.version.as_deref(), &row.doc)
                .await?;
            rows_done += 1;
            self.pending.rows.fetch_add(1, Ordering::Relaxed);
            self.pending
                .raw_bytes
                .fetch_add(line_bytes, Ordering::Relaxed);
            if writer.raw_bytes() >= part_bytes
                && let Some(full) = open.take()
            {
                self.seal(full).await?;
                next_part += 1;
            }
            tokio::task::consume_budget().await;
        }
        // The last part is completed here and reported by `ChunkDone`: one
        // report fewer per chunk, and the chunk is done in the same step.
        let last = match open.take() {
            Some(writer) => {
                let part = writer.finish().await?;
                debug!(
                    operation_id = %job.operation_id,
                    entity = %job.entity.name,
                    chunk = job.chunk,
                    part = part.part,
                    rows = part.rows,
                    compressed_bytes = part.compressed_bytes,
                    "last part written"
                );
                next_part += 1;
                Some(part)
            }
            None => None,
        };
        Ok(Streamed::Done {
            parts: next_part,
            rows: rows_done,
            last,
        })
    }

    /// Completes a part and reports it; from then on its rows are durable.
    async fn seal(&self, writer: PartWriter) -> Result<(), WorkerError> {
        let part: PartInfo = writer.finish().await?;
        let _gate = self.pending.gate.lock().await;
        debug!(
            operation_id = %self.job.operation_id,
            entity = %self.job.entity.name,
            chunk = self.job.chunk,
            part = part.part,
            rows = part.rows,
            compressed_bytes = part.compressed_bytes,
            "part written"
        );
        self.report(WorkerEvent::PartWritten(PartWritten {
            operation_id: self.job.operation_id,
            entity: self.job.entity.name.clone(),
            chunk: self.job.chunk,
            run: self.run.clone(),
            part,
        }))
        .await?;
        self.pending.rows.store(0, Ordering::Relaxed);
        self.pending.raw_bytes.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Reports progress every `progress_interval` until `done`; on a failed
    /// report, stops the stream and returns the error.
    async fn heartbeat(
        &self,
        settings: &JobSettings,
        done: &CancellationToken,
        stop: &CancellationToken,
    ) -> Option<WorkerError> {
        let period = settings.progress_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = done.cancelled() => return None,
                _ = ticker.tick() => {}
            }
            let _gate = self.pending.gate.lock().await;
            let progress = WorkerEvent::ChunkProgress(ChunkProgress {
                operation_id: self.job.operation_id,
                entity: self.job.entity.name.clone(),
                chunk: self.job.chunk,
                run: self.run.clone(),
                rows_pending: self.pending.rows.load(Ordering::Relaxed),
                raw_bytes_pending: self.pending.raw_bytes.load(Ordering::Relaxed),
            });
            if let Err(error) = self.report(progress).await {
                stop.cancel();
                return Some(error);
            }
        }
    }

    async fn failed(&self, code: &str, error: &str, retryable: bool) -> Result<(), WorkerError> {
        self.report(WorkerEvent::ChunkFailed(ChunkFailed {
            operation_id: self.job.operation_id,
            entity: self.job.entity.name.clone(),
            chunk: self.job.chunk,
            run: self.run.clone(),
            code: code.to_string(),
            error: error.to_string(),
            retryable,
        }))
        .await
    }

    async fn report(&self, event: WorkerEvent) -> Result<(), WorkerError> {
        self.events.publish(&event).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "export_tests.rs"]
mod tests;
