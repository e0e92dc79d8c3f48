//! `plan_entity`: inspect the source, take the snapshot, choose key ranges,
//! report them; then hold the snapshot until the operation no longer needs it.
//!
//! Under `snapshot` consistency the worker that planned an entity keeps the
//! REPEATABLE READ transaction that exported the snapshot open, because an
//! exported snapshot can be imported only while its exporter lives. Holding is
//! done by [`hold_snapshot`] in a background task that takes no job slot; see
//! `worker/design.md`.

use std::future::Future;
use std::time::Duration;

use koan_protocol::archive::SnapshotFacts;
use koan_protocol::events::{EntityFailed, EntityPlanned, WorkerEvent};
use koan_protocol::jobs::PlanEntity;
use koan_protocol::plan::{Consistency, EntitySpec};
use koan_source::{RangePlan, SnapshotHolder, Source, SourceError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::{JobSettings, Outcome, is_last_delivery};
use crate::error::WorkerError;
use crate::events::Events;

/// What planning produced: the ack decision and, under `snapshot`
/// consistency, the snapshot to keep open.
#[derive(Debug)]
pub struct Planned {
    /// What to do with the delivery.
    pub outcome: Outcome,
    /// The open snapshot, once reported; hand it to [`hold_snapshot`].
    pub holder: Option<SnapshotHolder>,
}

impl Planned {
    fn without_snapshot(outcome: Outcome) -> Self {
        Self {
            outcome,
            holder: None,
        }
    }
}

/// Runs a `plan_entity` job; see the module documentation.
pub async fn plan_entity<E: Events>(
    source: &Source,
    events: &E,
    settings: &JobSettings,
    job: &PlanEntity,
    delivery_count: u32,
    cancel: &CancellationToken,
) -> Result<Planned, WorkerError> {
    let planning = tokio::select! {
        biased;
        () = cancel.cancelled() => {
            info!(operation_id = %job.operation_id, entity = %job.entity.name, "planning stopped by shutdown, requeueing");
            return Ok(Planned::without_snapshot(Outcome::Requeue));
        }
        planning = plan_in_source(source, job) => planning,
    };
    let (resolved, ranges, holder) = match planning {
        Ok(planned) => planned,
        Err(error) => {
            return report_failure(events, job, delivery_count, error)
                .await
                .map(Planned::without_snapshot);
        }
    };
    let snapshot = holder.as_ref().map(|holder| SnapshotFacts {
        entity: job.entity.name.clone(),
        snapshot_id: Some(holder.snapshot_id().to_string()),
        taken_at: holder.taken_at(),
        holder: settings.worker_id.clone(),
    });
    let chunks = ranges.ranges.len();
    let event = WorkerEvent::EntityPlanned(EntityPlanned {
        operation_id: job.operation_id,
        entity: resolved,
        rows_total: ranges.rows_total,
        ranges: ranges.ranges,
        snapshot,
    });
    if let Err(error) = events.publish(&event).await {
        if let Some(holder) = holder {
            holder.release().await;
        }
        return Err(error);
    }
    info!(
        operation_id = %job.operation_id,
        entity = %job.entity.name,
        rows_total = ranges.rows_total,
        rows_per_chunk = ranges.rows_per_chunk,
        chunks,
        snapshot_id = holder.as_ref().map(|holder| holder.snapshot_id()),
        "entity planned"
    );
    Ok(Planned {
        outcome: Outcome::Ack,
        holder,
    })
}

async fn plan_in_source(
    source: &Source,
    job: &PlanEntity,
) -> Result<(EntitySpec, RangePlan, Option<SnapshotHolder>), SourceError> {
    let resolved = source.inspect(&job.entity).await?;
    source.capabilities().check(job.consistency)?;
    match job.consistency {
        Consistency::Snapshot => {
            let holder = source.open_snapshot().await?;
            match holder.plan_ranges(&resolved).await {
                Ok(ranges) => Ok((resolved, ranges, Some(holder))),
                Err(error) => {
                    holder.release().await;
                    Err(error)
                }
            }
        }
        Consistency::PerChunk => {
            let ranges = source.plan_ranges(&resolved).await?;
            Ok((resolved, ranges, None))
        }
    }
}

/// Requeues a retryable failure, or reports `EntityFailed` when retrying
/// cannot help or this was the last delivery.
async fn report_failure<E: Events>(
    events: &E,
    job: &PlanEntity,
    delivery_count: u32,
    error: SourceError,
) -> Result<Outcome, WorkerError> {
    let retry = error.is_retryable() && !is_last_delivery(delivery_count);
    warn!(
        operation_id = %job.operation_id,
        entity = %job.entity.name,
        code = error.code(),
        delivery_count,
        retry,
        %error,
        "entity planning failed"
    );
    if retry {
        return Ok(Outcome::Requeue);
    }
    events
        .publish(&WorkerEvent::EntityFailed(EntityFailed {
            operation_id: job.operation_id,
            entity: job.entity.name.clone(),
            code: error.code().to_string(),
            error: error.to_string(),
        }))
        .await?;
    Ok(Outcome::Ack)
}

/// Keeps `holder` open until `ended` resolves (the operation completed,
/// failed, was cancelled or paused), `settings.snapshot_hold_max` elapses,
/// the worker shuts down or the snapshot's connection dies; then releases it.
pub async fn hold_snapshot(
    holder: SnapshotHolder,
    operation_id: Uuid,
    entity: String,
    ended: impl Future<Output = String>,
    settings: &JobSettings,
    shutdown: CancellationToken,
) {
    let snapshot_id = holder.snapshot_id().to_string();
    info!(%operation_id, entity, snapshot_id, "holding snapshot");
    let reason = tokio::select! {
        reason = ended => reason,
        () = tokio::time::sleep(settings.snapshot_hold_max) => "the hold limit was reached".to_string(),
        () = shutdown.cancelled() => "the worker is shutting down".to_string(),
        () = watch_connection(&holder, settings.snapshot_check_interval) => {
            warn!(%operation_id, entity, snapshot_id, "the snapshot's connection died; chunks reading it will fail");
            "its connection died".to_string()
        }
    };
    holder.release().await;
    info!(%operation_id, entity, snapshot_id, reason, "snapshot released");
}

async fn watch_connection(holder: &SnapshotHolder, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if !holder.is_alive().await {
            return;
        }
    }
}
