//! Where jobs report to: the [`Events`] trait, its RabbitMQ implementation and
//! an in-memory one for tests and tools.
//!
//! Every report is a `WorkerEvent` published to `koan.events` with routing key
//! `worker.<operation>.<kind>` and a publisher confirm awaited: when `publish`
//! returns `Ok`, the coordinator's queue holds the report.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use koan_protocol::codec::Message;
use koan_protocol::events::{ChunkClaim, ClaimChunk, ClaimReply, WorkerEvent};
use koan_protocol::topology::{EVENTS_EXCHANGE, worker_event_key};
use koan_transport::{Broker, Outgoing, rpc};

use crate::error::WorkerError;
use crate::job_span::JobSpan;

/// A sink for worker reports and the chunk-claim request.
pub trait Events: Send + Sync {
    /// Publishes `event` and waits until it is durable at the broker.
    fn publish(&self, event: &WorkerEvent) -> impl Future<Output = Result<(), WorkerError>> + Send;

    /// Asks the coordinator for ownership of a chunk and waits up to `timeout` for the answer.
    fn claim(
        &self,
        request: &ClaimChunk,
        timeout: Duration,
    ) -> impl Future<Output = Result<ChunkClaim, WorkerError>> + Send;
}

/// Reports through RabbitMQ, on the connection the job's delivery came from.
/// Reports of a job carry its span's trace context, and its span records
/// what they say ([`JobSpan::observe`]).
#[derive(Debug, Clone)]
pub struct BrokerEvents {
    broker: Arc<Broker>,
    job: Option<Arc<JobSpan>>,
}

impl BrokerEvents {
    /// Reports through `broker`, with the trace context of the publishing span.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker, job: None }
    }

    /// Reports of the job whose span is `job` through `broker`.
    pub fn for_job(broker: Arc<Broker>, job: Arc<JobSpan>) -> Self {
        Self {
            broker,
            job: Some(job),
        }
    }

    /// `outgoing`, carrying the job span's trace context when there is one.
    fn traced(&self, outgoing: Outgoing) -> Outgoing {
        match &self.job {
            Some(job) => outgoing.trace(job.trace()),
            None => outgoing,
        }
    }
}

impl Events for BrokerEvents {
    async fn publish(&self, event: &WorkerEvent) -> Result<(), WorkerError> {
        if let Some(job) = &self.job {
            job.observe(event);
        }
        let routing_key = worker_event_key(event.operation_id(), event.kind());
        let outgoing = self.traced(Outgoing::encode(EVENTS_EXCHANGE, routing_key, event)?);
        self.broker.publish(&outgoing).await?;
        Ok(())
    }

    async fn claim(
        &self,
        request: &ClaimChunk,
        timeout: Duration,
    ) -> Result<ChunkClaim, WorkerError> {
        let event = WorkerEvent::ClaimChunk(request.clone());
        let routing_key = worker_event_key(request.operation_id, event.kind());
        let outgoing = self.traced(Outgoing::encode(EVENTS_EXCHANGE, routing_key, &event)?);
        let reply = rpc::request(&self.broker, outgoing, timeout).await?;
        let ClaimReply::ChunkClaim(claim) = koan_protocol::decode::<ClaimReply>(&reply.payload)?;
        Ok(claim)
    }
}

/// Records reports in memory and answers claims with a fixed reply.
///
/// For tests and for running jobs without RabbitMQ.
#[derive(Debug, Clone)]
pub struct MemoryEvents {
    inner: Arc<Mutex<MemoryState>>,
}

#[derive(Debug)]
struct MemoryState {
    events: Vec<WorkerEvent>,
    claims: Vec<ClaimChunk>,
    reply: ChunkClaim,
    fail_publish_after: Option<usize>,
}

impl MemoryEvents {
    /// Records events and grants every claim with `reply`.
    pub fn new(reply: ChunkClaim) -> Self {
        Self {
            inner: Arc::new(Mutex::new(MemoryState {
                events: Vec::new(),
                claims: Vec::new(),
                reply,
                fail_publish_after: None,
            })),
        }
    }

    /// Grants every claim, from the start of the chunk.
    pub fn granting() -> Self {
        Self::new(ChunkClaim {
            granted: true,
            reason: None,
            resume_after: None,
            lease_seconds: 60,
        })
    }

    /// Makes every publish after the first `count` fail as an unreachable broker would.
    pub fn fail_publish_after(&self, count: usize) {
        self.lock().fail_publish_after = Some(count);
    }

    /// The events published so far.
    pub fn events(&self) -> Vec<WorkerEvent> {
        self.lock().events.clone()
    }

    /// The claims asked so far.
    pub fn claims(&self) -> Vec<ClaimChunk> {
        self.lock().claims.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // A panic while holding this lock can only come from a test assertion.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Events for MemoryEvents {
    async fn publish(&self, event: &WorkerEvent) -> Result<(), WorkerError> {
        let mut state = self.lock();
        if state
            .fail_publish_after
            .is_some_and(|count| state.events.len() >= count)
        {
            return Err(WorkerError::Transport(
                koan_transport::TransportError::Nacked {
                    exchange: EVENTS_EXCHANGE.to_string(),
                    routing_key: worker_event_key(event.operation_id(), event.kind()),
                },
            ));
        }
        state.events.push(event.clone());
        Ok(())
    }

    async fn claim(
        &self,
        request: &ClaimChunk,
        _timeout: Duration,
    ) -> Result<ChunkClaim, WorkerError> {
        let mut state = self.lock();
        state.claims.push(request.clone());
        Ok(state.reply.clone())
    }
}
