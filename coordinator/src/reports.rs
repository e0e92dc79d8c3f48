//! Worker reports from `koan.coordinator`: each applied in one state store
//! transaction; `claim_chunk` requests answered with a [`ClaimReply`].
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

use crate::broker::{Decision, Handler};
use crate::error::CoordinatorError;
use crate::spans;
use crate::store::{Applied, StateStore};

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

fn poison(error: &ProtocolError) -> Decision {
    Decision {
        dead_letter: Some(format!("{}: {error}", error.code())),
        ..Decision::default()
    }
}

impl<S: StateStore> Handler for Reports<S> {
    fn span(&self, incoming: &Incoming) -> Span {
        spans::report_span(incoming)
    }

    async fn handle(&self, incoming: &Incoming) -> Result<Decision, CoordinatorError> {
        if incoming.payload.len() > MAX_JOB_BYTES {
            return Ok(poison(&ProtocolError::TooLarge {
                size: incoming.payload.len(),
                limit: MAX_JOB_BYTES,
            }));
        }
        let event = match koan_protocol::decode::<WorkerEvent>(&incoming.payload) {
            Ok(event) => event,
            Err(error) => {
                warn!(routing_key = %incoming.routing_key, code = error.code(), %error, "undecodable worker report dead-lettered");
                return Ok(poison(&error));
            }
        };
        let operation_id = event.operation_id();
        let kind = event.kind();
        let span = Span::current();
        spans::record_report(&span, &event);
        if let WorkerEvent::ClaimChunk(claim) = &event {
            let decision = self.store.claim_chunk(claim).await?;
            span.record(
                "outcome",
                if decision.granted {
                    "granted"
                } else {
                    "refused"
                },
            );
            debug!(%operation_id, entity = %claim.entity, chunk = claim.chunk, attempt = claim.attempt,
                run = %claim.run, granted = decision.granted, reason = ?decision.reason, "chunk claim");
            let changed = decision.granted;
            return Ok(Decision {
                reply: Some(Outgoing::encode("", "", &ClaimReply::ChunkClaim(decision))?),
                dead_letter: None,
                changed,
            });
        }
        match self.store.apply(&event).await? {
            Applied::Changed => {
                span.record("outcome", "applied");
                debug!(%operation_id, kind, "report applied");
                Ok(Decision {
                    changed: true,
                    ..Decision::default()
                })
            }
            Applied::Unchanged(reason) => {
                span.record("outcome", reason);
                debug!(%operation_id, kind, reason, "report changed nothing");
                Ok(Decision::default())
            }
        }
    }
}
