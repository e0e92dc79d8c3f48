//! Worker reports from `koan.coordinator`: the reports and `claim_chunk`
//! requests delivered together applied in one state store transaction
//! ([`StateStore::apply_batch`], each report in a savepoint), one at a time
//! when only one is waiting; claims answered with a [`ClaimReply`] after
//! the commit.
//!
//! A report that cannot be decoded, or that breaks the protocol's invariants,
//! is dead-lettered with the reason; reports for unknown or finished
//! operations, duplicates and reports from superseded runs are acked and
//! change nothing.

use std::sync::Arc;

use tracing::{Span, debug, warn};

use koan_protocol::ProtocolError;
use koan_protocol::codec::Message;
use koan_protocol::events::{ClaimReply, WorkerEvent};
use koan_protocol::topology::MAX_JOB_BYTES;
use koan_transport::{Incoming, Outgoing};

use crate::broker::{Decision, Delivery, Handler};
use crate::error::CoordinatorError;
use crate::spans;
use crate::store::{Applied, BatchOutcome, StateStore};

/// Applies worker reports to a state store.
#[derive(Debug)]
pub struct Reports<S> {
    store: Arc<S>,
}

impl<S: StateStore> Reports<S> {
    /// A handler over `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }
}

fn poison(error: &ProtocolError) -> String {
    format!("{}: {error}", error.code())
}

/// Dead-letters a delivery that is not a report, saying why.
fn dead_letter(reason: String) -> Decision {
    Decision {
        dead_letter: Some(reason),
        ..Decision::default()
    }
}

/// The report a delivery carries, or why it is none (its dead-letter reason).
fn decode(incoming: &Incoming) -> Result<WorkerEvent, String> {
    if incoming.payload.len() > MAX_JOB_BYTES {
        return Err(poison(&ProtocolError::TooLarge {
            size: incoming.payload.len(),
            limit: MAX_JOB_BYTES,
        }));
    }
    koan_protocol::decode::<WorkerEvent>(&incoming.payload).map_err(|error| {
        warn!(routing_key = %incoming.routing_key, code = error.code(), %error, "undecodable worker report dead-lettered");
        poison(&error)
    })
}

/// The decision on `event` once the state store decided (inside its span).
fn decided(event: &WorkerEvent, outcome: BatchOutcome) -> Result<Decision, CoordinatorError> {
    let operation_id = event.operation_id();
    let kind = event.kind();
    let span = Span::current();
    match outcome {
        BatchOutcome::Claim(decision) => {
            span.record(
                "outcome",
                if decision.granted {
                    "granted"
                } else {
                    "refused"
                },
            );
            if let WorkerEvent::ClaimChunk(claim) = event {
                debug!(%operation_id, entity = %claim.entity, chunk = claim.chunk, attempt = claim.attempt,
                    run = %claim.run, granted = decision.granted, reason = ?decision.reason, "chunk claim");
            }
            let changed = decision.granted;
            Ok(Decision {
                reply: Some(Outgoing::encode("", "", &ClaimReply::ChunkClaim(decision))?),
                dead_letter: None,
                changed,
            })
        }
        BatchOutcome::Applied(Applied::Changed) => {
            span.record("outcome", "applied");
            debug!(%operation_id, kind, "report applied");
            Ok(Decision {
                changed: true,
                ..Decision::default()
            })
        }
        BatchOutcome::Applied(Applied::Unchanged(reason)) => {
            span.record("outcome", reason);
            debug!(%operation_id, kind, reason, "report changed nothing");
            Ok(Decision::default())
        }
    }
}

impl<S: StateStore> Handler for Reports<S> {
    fn span(&self, incoming: &Incoming) -> Span {
        spans::report_span(incoming)
    }

    fn batch_size(&self) -> usize {
        usize::from(crate::service::REPORTS_PREFETCH)
    }

    async fn handle(&self, incoming: &Incoming) -> Result<Decision, CoordinatorError> {
        let event = match decode(incoming) {
            Ok(event) => event,
            Err(reason) => return Ok(dead_letter(reason)),
        };
        spans::record_report(&Span::current(), &event);
        let outcome = match &event {
            WorkerEvent::ClaimChunk(claim) => {
                BatchOutcome::Claim(self.store.claim_chunk(claim).await?)
            }
            event => BatchOutcome::Applied(self.store.apply(event).await?),
        };
        decided(&event, outcome)
    }

    /// Every report and claim of the batch in one state store transaction
    /// ([`StateStore::apply_batch`]); deliveries that are not reports are
    /// dead-lettered as on their own.
    async fn handle_batch(
        &self,
        batch: &[Delivery],
    ) -> Result<Vec<Result<Decision, CoordinatorError>>, CoordinatorError> {
        let mut decisions: Vec<Option<Result<Decision, CoordinatorError>>> =
            batch.iter().map(|_| None).collect();
        let mut events = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (position, delivery) in batch.iter().enumerate() {
            match delivery.span.in_scope(|| decode(&delivery.incoming)) {
                Ok(event) => {
                    spans::record_report(&delivery.span, &event);
                    events.push(event);
                    positions.push(position);
                }
                Err(reason) => decisions[position] = Some(Ok(dead_letter(reason))),
            }
        }
        if !events.is_empty() {
            let outcomes = self.store.apply_batch(&events).await?;
            for ((event, position), outcome) in events.iter().zip(positions).zip(outcomes) {
                let decision = outcome
                    .and_then(|outcome| batch[position].span.in_scope(|| decided(event, outcome)));
                decisions[position] = Some(decision);
            }
        }
        Ok(decisions
            .into_iter()
            .map(|decision| {
                decision.unwrap_or_else(|| {
                    Err(CoordinatorError::InvalidReport(
                        "the state store returned fewer outcomes than reports".into(),
                    ))
                })
            })
            .collect())
    }
}
