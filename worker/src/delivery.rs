//! One delivery from a pool queue: decode it, run its job, settle it.
//!
//! A delivery that cannot be a job (too large, malformed, unknown protocol
//! version or kind) goes to the dead-letter queue with a reason naming the
//! problem; the worker keeps serving. A decoded job runs to an
//! [`Outcome`] that becomes an ack or a requeue.

use std::sync::Arc;

use koan_protocol::ProtocolError;
use koan_protocol::jobs::{Job, PlanEntity};
use koan_protocol::plan::Consistency;
use koan_protocol::topology::{EVENTS_EXCHANGE, MAX_JOB_BYTES, operation_event_key};
use koan_source::Source;
use koan_transport::{Broker, Incoming, Subscription};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::error::WorkerError;
use crate::events::BrokerEvents;
use crate::halts::{HALT_EVENTS, Halts, operation_of};
use crate::job_span::JobSpan;
use crate::jobs::apply::apply_restore;
use crate::jobs::discard::discard_backup;
use crate::jobs::export::export_chunk_until;
use crate::jobs::import::import_part;
use crate::jobs::plan::{hold_snapshot, plan_entity};
use crate::jobs::plan_restore::plan_restore;
use crate::jobs::replay::replay_rows;
use crate::jobs::verify::verify_backup;
use crate::jobs::{JobSettings, Outcome, finalize::finalize};
use crate::metrics::{MeteredEvents, WorkerMetrics};

/// How long a discard waits before sweeping a cancelled backup's prefixes again
/// (an export may have been completing a part when the `cancelled` event came).
const DISCARD_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
use crate::storage::Storage;

/// Public operation events after which a held snapshot is released.
const SNAPSHOT_RELEASE_EVENTS: [&str; 4] = ["completed", "failed", "cancelled", "paused"];

/// The current RabbitMQ connection, `None` while reconnecting.
pub(crate) type BrokerWatch = watch::Receiver<Option<Arc<Broker>>>;

/// What every job of a worker shares.
#[derive(Debug)]
pub(crate) struct WorkerContext {
    pub(crate) settings: JobSettings,
    pub(crate) source: Source,
    pub(crate) storage: Storage,
    /// Jobs and snapshot holders, waited for at shutdown.
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) brokers: BrokerWatch,
    /// In-flight export and import jobs, stopped when their operation is paused or cancelled.
    pub(crate) halts: Halts,
    /// The worker's instruments.
    pub(crate) metrics: WorkerMetrics,
}

/// What a job reports through: RabbitMQ, counted by the metrics.
type JobEvents = MeteredEvents<BrokerEvents>;

/// Decodes a delivery into a job, or says why it cannot be one.
pub(crate) fn decode_job(payload: &[u8]) -> Result<Job, ProtocolError> {
    if payload.len() > MAX_JOB_BYTES {
        return Err(ProtocolError::TooLarge {
            size: payload.len(),
            limit: MAX_JOB_BYTES,
        });
    }
    koan_protocol::decode::<Job>(payload)
}

/// Runs the job a delivery carries and settles the delivery.
pub(crate) async fn handle_delivery(
    context: Arc<WorkerContext>,
    broker: Arc<Broker>,
    incoming: Incoming,
) {
    let job = match decode_job(&incoming.payload) {
        Ok(job) => job,
        Err(error) => {
            let reason = format!("{}: {error}", error.code());
            warn!(queue = %incoming.queue, message_id = ?incoming.message_id, %reason, "dead-lettering a delivery that is not a job");
            context.metrics.dead_lettered();
            if let Err(error) = incoming.dead_letter(&broker, &reason).await {
                warn!(%error, "dead-lettering failed; the delivery returns to the queue");
            }
            return;
        }
    };
    let job_span = Arc::new(JobSpan::start(
        &job,
        incoming.delivery_count,
        incoming.trace_context().as_ref(),
    ));
    let span = job_span.span().clone();
    span.in_scope(|| info!("job started"));
    let events = BrokerEvents::for_job(broker.clone(), Arc::clone(&job_span));
    let events = MeteredEvents::new(events, &context.metrics, &job);
    let timer = context
        .metrics
        .job_started(koan_protocol::codec::Message::kind(&job));
    let result = run_job(&context, &broker, &events, job, incoming.delivery_count)
        .instrument(span.clone())
        .await;
    job_span.settled(&result);
    timer.finish(&result);
    let settled = match result {
        Ok(Outcome::Ack) => incoming.ack().await,
        Ok(Outcome::Requeue) => incoming.requeue().await,
        Err(error) => {
            span.in_scope(
                || warn!(code = error.code(), %error, "job could not be reported, requeueing"),
            );
            incoming.requeue().await
        }
    };
    if let Err(error) = settled {
        span.in_scope(|| warn!(%error, "settling the delivery failed; rabbitmq redelivers it when the channel closes"));
    }
}

async fn run_job(
    context: &Arc<WorkerContext>,
    broker: &Arc<Broker>,
    events: &JobEvents,
    job: Job,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    let events = events.clone();
    match job {
        Job::PlanEntity(job) => plan_and_hold(context, broker, &events, &job, delivery_count).await,
        Job::ExportChunk(job) => {
            // Shutdown does not stop an export outright: it hands the job back
            // after sealing the open part, so only a pause or cancel halts it.
            let guard = context
                .halts
                .register(job.operation_id, &CancellationToken::new());
            export_chunk_until(
                &context.source,
                &context.storage,
                &events,
                &context.settings,
                &job,
                delivery_count,
                guard.token(),
                Some(&guard),
                &context.shutdown,
            )
            .await
        }
        Job::Finalize(job) => finalize(&context.storage, &events, &job, delivery_count).await,
        Job::PlanRestore(job) => {
            plan_restore(
                &context.source,
                &context.storage,
                &events,
                &job,
                delivery_count,
            )
            .await
        }
        Job::ImportPart(job) => {
            let guard = context.halts.register(job.operation_id, &context.shutdown);
            let outcome = import_part(
                &context.source,
                &context.storage,
                &events,
                &job,
                delivery_count,
                guard.token(),
            )
            .await;
            if guard.halted() {
                // Rolled back; the cancelled restore wants no more of it.
                return Ok(Outcome::Ack);
            }
            outcome
        }
        Job::Discard(job) => {
            discard_backup(
                &context.storage,
                &events,
                &job,
                delivery_count,
                DISCARD_SETTLE,
            )
            .await
        }
        Job::ApplyRestore(job) => {
            apply_restore(
                &context.source,
                &events,
                &job,
                delivery_count,
                &context.shutdown,
            )
            .await
        }
        Job::Replay(job) => replay_rows(&context.source, &events, &job, delivery_count).await,
        Job::Verify(job) => {
            verify_backup(
                &context.storage,
                &events,
                &context.settings,
                &job,
                delivery_count,
                &context.shutdown,
            )
            .await
        }
    }
}

/// Plans an entity; under `snapshot` consistency, follows the operation's
/// events first (so no release event is missed) and hands the snapshot to a
/// background holder that takes no job slot.
async fn plan_and_hold(
    context: &Arc<WorkerContext>,
    broker: &Broker,
    events: &JobEvents,
    job: &PlanEntity,
    delivery_count: u32,
) -> Result<Outcome, WorkerError> {
    let follow = match job.consistency {
        Consistency::Snapshot => Some(
            broker
                .follow(EVENTS_EXCHANGE, &release_keys(job.operation_id))
                .await?,
        ),
        Consistency::PerChunk => None,
    };
    let planned = plan_entity(
        &context.source,
        events,
        &context.settings,
        job,
        delivery_count,
        &context.shutdown,
    )
    .await;
    let planned = match planned {
        Ok(planned) => planned,
        Err(error) => {
            if let Some(follow) = follow {
                follow.close().await;
            }
            return Err(error);
        }
    };
    match (planned.holder, follow) {
        (Some(holder), Some(follow)) => {
            let ended = operation_end(context.brokers.clone(), job.operation_id, follow);
            let holding = context.clone();
            let operation_id = job.operation_id;
            let entity = job.entity.name.clone();
            // A span of its own, not inside the job's: the job span ends with
            // the job, the hold lasts until the operation ends.
            let holding_span = info_span!(parent: None, "hold_snapshot", %operation_id,
                entity = %entity, trace_id = tracing::field::Empty);
            koan_telemetry::adopt(&holding_span, koan_telemetry::current().as_ref());
            context.tracker.spawn(
                async move {
                    let shutdown = holding.shutdown.clone();
                    hold_snapshot(
                        holder,
                        operation_id,
                        entity,
                        ended,
                        &holding.settings,
                        shutdown,
                    )
                    .await;
                }
                .instrument(holding_span),
            );
        }
        (holder, follow) => {
            if let Some(follow) = follow {
                follow.close().await;
            }
            if let Some(holder) = holder {
                holder.release().await;
            }
        }
    }
    Ok(planned.outcome)
}

fn release_keys(operation_id: Uuid) -> Vec<String> {
    SNAPSHOT_RELEASE_EVENTS
        .iter()
        .map(|event| operation_event_key(operation_id, event))
        .collect()
}

/// Resolves with a reason when the operation completes, fails, is cancelled
/// or paused. Follows again after a reconnect (events published while
/// disconnected are missed; the hold limit bounds that case).
async fn operation_end(
    mut brokers: BrokerWatch,
    operation_id: Uuid,
    first: Subscription,
) -> String {
    let keys = release_keys(operation_id);
    let mut subscription = Some(first);
    loop {
        if let Some(mut current) = subscription.take() {
            match current.next().await {
                Ok(incoming) => {
                    let event = incoming
                        .routing_key
                        .rsplit('.')
                        .next()
                        .unwrap_or("ended")
                        .to_string();
                    if let Err(error) = incoming.ack().await {
                        debug!(%error, "acking an operation event");
                    }
                    current.close().await;
                    return format!("the operation is {event}");
                }
                Err(error) => {
                    warn!(%operation_id, %error, "lost the operation's event stream; following it again after reconnecting");
                    current.close().await;
                }
            }
        }
        let connected = brokers
            .wait_for(|broker| broker.as_ref().is_some_and(|broker| broker.is_connected()))
            .await
            .map(|broker| broker.clone());
        let Ok(Some(broker)) = connected else {
            return "the worker stopped".to_string();
        };
        match broker.follow(EVENTS_EXCHANGE, &keys).await {
            Ok(followed) => subscription = Some(followed),
            Err(error) => {
                warn!(%operation_id, %error, "following the operation's events");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

/// Follows `operation.*.paused` and `operation.*.cancelled` on `subscription`
/// (a private queue of this session) and stops the named operations' jobs,
/// until the subscription ends (connection lost or worker stopping).
pub(crate) async fn follow_halts(halts: Halts, mut subscription: Subscription) {
    loop {
        let incoming = match subscription.next().await {
            Ok(incoming) => incoming,
            Err(error) => {
                debug!(%error, "operation events stream ended");
                return;
            }
        };
        if let Some(operation_id) = operation_of(&incoming.routing_key) {
            let stopped = halts.halt(operation_id);
            if stopped > 0 {
                info!(%operation_id, event = %incoming.routing_key, stopped, "stopping the jobs of a paused or cancelled operation");
            }
        }
        if let Err(error) = incoming.ack().await {
            debug!(%error, "acking an operation event");
        }
    }
}

/// Binding keys of the halt events of every operation.
pub(crate) fn halt_bindings() -> Vec<String> {
    HALT_EVENTS
        .iter()
        .map(|event| format!("operation.*.{event}"))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_wrong_with_a_delivery() {
        let garbage = decode_job(b"\xc1 not msgpack").unwrap_err();
        assert_eq!(garbage.code(), "malformed");
        let envelope = |protocol: u32, kind: &str| {
            rmp_serde::to_vec_named(
                &serde_json::json!({"protocol": protocol, "kind": kind, "body": {}}),
            )
            .unwrap()
        };
        assert_eq!(
            decode_job(&envelope(2, "finalize")).unwrap_err().code(),
            "unsupported_version"
        );
        let unknown = decode_job(&envelope(1, "reticulate")).unwrap_err();
        assert_eq!(unknown.to_string(), "unknown job kind 'reticulate'");
        let incomplete = decode_job(&envelope(1, "finalize")).unwrap_err();
        assert_eq!(incomplete.code(), "malformed");
        assert!(incomplete.to_string().contains("finalize"), "{incomplete}");
    }

    #[test]
    fn release_keys_cover_terminal_and_paused_events() {
        let id = Uuid::nil();
        assert_eq!(
            release_keys(id),
            ["completed", "failed", "cancelled", "paused"]
                .map(|event| format!("operation.{id}.{event}"))
        );
    }
}
