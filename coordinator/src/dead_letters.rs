//! Dead-lettered messages from `koan.coordinator.dead` (the coordinators' copy
//! of `koan.dead`): a job among them fails the unit it stood for, so an
//! operation whose job no worker could finish fails with a reason instead of
//! waiting for a report that will never come.
//!
//! Anything else (poison commands, reports, bodies that are not jobs) is
//! already in `koan.dead` for people to read and is only acked here. Nothing
//! from this queue is ever dead-lettered again: a failure that persists is
//! logged and the message dropped, or it would circle back here.

use std::sync::Arc;

use tracing::{Span, debug, info, warn};

use koan_protocol::codec::Message;
use koan_protocol::jobs::Job;
use koan_protocol::topology::{DEAD_REASON_HEADER, DEAD_SOURCE_HEADER};
use koan_transport::Incoming;

use crate::broker::{Decision, Handler};
use crate::error::CoordinatorError;
use crate::metrics::{CoordinatorMetrics, DeadLetterOutcome};
use crate::store::{Applied, StateStore};

/// RabbitMQ's header naming why a message was first dead-lettered.
const FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// RabbitMQ's header naming the queue a message was first dead-lettered from.
const FIRST_DEATH_QUEUE: &str = "x-first-death-queue";

/// Fails the units of dead-lettered jobs in a state store.
#[derive(Debug)]
pub struct DeadLetters<S> {
    store: Arc<S>,
    metrics: CoordinatorMetrics,
}

impl<S: StateStore> DeadLetters<S> {
    /// A handler over `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            metrics: CoordinatorMetrics::disabled(),
        }
    }

    /// Counts the messages handled in `metrics`.
    pub fn with_metrics(self, metrics: CoordinatorMetrics) -> Self {
        Self { metrics, ..self }
    }
}

/// Why and from where a message was dead-lettered, in words: the reason
/// header a koan service set, else RabbitMQ's first-death headers.
pub fn death_reason(incoming: &Incoming) -> String {
    let reason = incoming
        .header(DEAD_REASON_HEADER)
        .or_else(|| incoming.header(FIRST_DEATH_REASON))
        .unwrap_or_else(|| "no reason given".to_string());
    let queue = incoming
        .header(DEAD_SOURCE_HEADER)
        .or_else(|| incoming.header(FIRST_DEATH_QUEUE));
    match queue {
        Some(queue) => format!("{reason} on {queue}"),
        None => reason,
    }
}

impl<S: StateStore> Handler for DeadLetters<S> {
    fn span(&self, incoming: &Incoming) -> Span {
        crate::spans::dead_letter_span(incoming)
    }

    async fn handle(&self, incoming: &Incoming) -> Result<Decision, CoordinatorError> {
        let Ok(job) = koan_protocol::decode::<Job>(&incoming.payload) else {
            debug!(routing_key = %incoming.routing_key, "dead-lettered message is not a job");
            self.metrics.dead_letter("none", DeadLetterOutcome::NotAJob);
            return Ok(Decision::default());
        };
        let reason = death_reason(incoming);
        let operation_id = job.operation_id();
        let span = Span::current();
        span.record("operation_id", tracing::field::display(operation_id));
        span.record("reason", reason.as_str());
        match self.store.fail_dead_job(&job, &reason).await {
            Ok(Applied::Changed) => {
                self.metrics
                    .dead_letter(job.kind(), DeadLetterOutcome::FailedUnit);
                span.record("outcome", "failed its operation");
                koan_telemetry::record_failure(&span, "dead_lettered", &reason);
                info!(%operation_id, kind = job.kind(), %reason, "dead-lettered job failed its operation");
                Ok(Decision {
                    changed: true,
                    ..Decision::default()
                })
            }
            Ok(Applied::Unchanged(why)) => {
                self.metrics
                    .dead_letter(job.kind(), DeadLetterOutcome::Unchanged);
                span.record("outcome", why);
                debug!(%operation_id, kind = job.kind(), %reason, why, "dead-lettered job changed nothing");
                Ok(Decision::default())
            }
            Err(error) if error.is_retryable() || error.is_transport() => Err(error),
            Err(error) => {
                self.metrics
                    .dead_letter(job.kind(), DeadLetterOutcome::Dropped);
                warn!(%operation_id, kind = job.kind(), code = error.code(), %error,
                    "dead-lettered job could not be applied; dropped");
                Ok(Decision::default())
            }
        }
    }
}
