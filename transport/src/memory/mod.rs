//! The in-process broker: RabbitMQ's exchanges, queues, consumers and
//! deliveries, in memory, for running the coordinator, workers and clients
//! in one process with the same code paths as over RabbitMQ.
//!
//! Create one [`MemoryBroker`] (the hub) per process and attach every
//! participant to it with [`crate::Broker::memory`]:
//!
//! ```
//! use koan_transport::{Broker, MemoryBroker, topology};
//!
//! # async fn embedded() -> Result<(), koan_transport::TransportError> {
//! let hub = MemoryBroker::new("embedded");
//! let coordinator = Broker::memory(&hub, "koan-coordinator");
//! let worker = Broker::memory(&hub, "koan-worker 1");
//! let client = Broker::memory(&hub, "koan-backup cli");
//! topology::declare_coordinator(&coordinator).await?;
//! topology::declare_pool(&worker, "default").await?;
//! assert_eq!(client.url(), "memory://embedded");
//! # Ok(())
//! # }
//! ```
//!
//! See `transport/design.md` for its guarantees next to RabbitMQ's.
//!
//! - `exchange`: exchanges, bindings, direct/topic/fanout routing.
//! - `queue`: queues, their messages, capacity and overflow.
//! - `hub`: the shared state and every operation on it, under one lock.
//! - `participant`: one broker connection (publishing, subscribing, following).
//! - `consumer`: deliveries within a prefetch, ack and requeue.

mod consumer;
mod error;
mod exchange;
mod hub;
mod participant;
mod queue;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

pub use error::MemoryError;

pub(crate) use consumer::{Acker, Consumer};
pub(crate) use participant::Participant;

use hub::Hub;

/// The in-process brokers of this process by name, so `memory://<name>` URLs
/// find them (weak: a broker lives only as long as its handles).
fn registry() -> &'static Mutex<HashMap<String, Weak<Hub>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Hub>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Ready messages an in-process queue holds at most, unless configured.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;

/// An in-process broker shared by the participants of one process. Cloning
/// it gives another handle on the same broker; it lives as long as a handle,
/// a broker attached to it or a subscription on it does.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    hub: Arc<Hub>,
}

/// What one in-process queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages waiting for a consumer.
    pub ready: usize,
    /// Messages delivered and not yet acked.
    pub unacked: usize,
    /// Consumers.
    pub consumers: usize,
}

impl MemoryBroker {
    /// A broker named `name` (its URL is `memory://<name>`) whose queues hold
    /// [`DEFAULT_QUEUE_CAPACITY`] ready messages at most.
    pub fn new(name: &str) -> Self {
        Self::with_queue_capacity(name, DEFAULT_QUEUE_CAPACITY)
    }

    /// A broker whose queues hold `capacity` ready messages at most (at least one).
    pub fn with_queue_capacity(name: &str, capacity: usize) -> Self {
        Self {
            hub: Arc::new(Hub::new(name, capacity.max(1))),
        }
    }

    /// Makes this broker reachable as `memory://<name>` from
    /// [`crate::Broker::connect`] anywhere in this process, for as long as it
    /// lives. A later registration of the same name replaces this one.
    pub fn register(&self) {
        let mut brokers = registry().lock().unwrap_or_else(PoisonError::into_inner);
        brokers.retain(|_, hub| hub.strong_count() > 0);
        brokers.insert(self.hub.name.clone(), Arc::downgrade(&self.hub));
    }

    /// The live broker registered as `name`, if any.
    pub fn registered(name: &str) -> Option<Self> {
        let brokers = registry().lock().unwrap_or_else(PoisonError::into_inner);
        brokers
            .get(name)
            .and_then(Weak::upgrade)
            .map(|hub| Self { hub })
    }

    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.hub.name
    }

    /// `memory://<name>`, the URL of every broker attached to it.
    pub fn url(&self) -> String {
        format!("memory://{}", self.hub.name)
    }

    /// What `queue` holds; `None` if there is no such queue.
    pub fn queue_stats(&self, queue: &str) -> Option<QueueStats> {
        let (ready, unacked, consumers) = self.hub.lock().queue_stats(queue)?;
        Some(QueueStats {
            ready,
            unacked,
            consumers,
        })
    }

    /// The names of every queue, sorted (private ones start with `amq.`).
    pub fn queue_names(&self) -> Vec<String> {
        self.hub.lock().queue_names()
    }
}
