//! [`Broker`]: one participant's handle on a message broker, RabbitMQ or in-process.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::Channel;
use tracing::warn;

use crate::amqp::AmqpBroker;
use crate::error::TransportError;
use crate::incoming::Subscription;
use crate::memory::{MemoryBroker, Participant};
use crate::outgoing::Outgoing;
use crate::topology::{ExchangeSpec, QueueSpec};

/// The URL scheme of in-process brokers.
pub const MEMORY_SCHEME: &str = "memory://";

/// A connection to a broker: RabbitMQ ([`Broker::connect`]) or an in-process
/// broker shared with the other participants of this process ([`Broker::memory`]).
/// Every other method behaves the same on both.
#[derive(Debug)]
pub struct Broker {
    backend: Backend,
}

/// The broker behind a [`Broker`].
#[derive(Debug)]
pub(crate) enum Backend {
    /// RabbitMQ over lapin.
    Amqp(Box<AmqpBroker>),
    /// The in-process broker.
    Memory(Participant),
}

impl Broker {
    /// Connects to RabbitMQ once; the error names the URL (without its
    /// password). A `memory://<name>` URL attaches to the in-process broker
    /// registered under that name in this process ([`MemoryBroker::register`]).
    pub async fn connect(url: &str, name: &str) -> Result<Self, TransportError> {
        if let Some(hub_name) = url.strip_prefix(MEMORY_SCHEME) {
            let hub = MemoryBroker::registered(hub_name).ok_or_else(|| {
                TransportError::NoInProcessBroker {
                    url: url.to_string(),
                }
            })?;
            return Ok(Self::memory(&hub, name));
        }
        Ok(Self {
            backend: Backend::Amqp(Box::new(AmqpBroker::connect(url, name).await?)),
        })
    }

    /// Connects to RabbitMQ with exponential backoff and jitter, giving up after `max_elapsed`.
    pub async fn connect_with_retry(
        url: &str,
        name: &str,
        max_elapsed: Duration,
    ) -> Result<Self, TransportError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .with_total_delay(Some(max_elapsed))
            .without_max_times();
        (|| Self::connect(url, name))
            .retry(backoff)
            .notify(|error, delay| warn!(%error, ?delay, "rabbitmq connect failed, retrying"))
            .await
    }

    /// Attaches a participant named `name` (for logs and errors) to the
    /// in-process broker `hub`; every broker attached to one hub shares its
    /// exchanges and queues.
    pub fn memory(hub: &MemoryBroker, name: &str) -> Self {
        Self {
            backend: Backend::Memory(Participant::new(hub, name)),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The broker URL, without its password; `memory://<hub name>` in process.
    pub fn url(&self) -> &str {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.url(),
            Backend::Memory(memory) => memory.url(),
        }
    }

    /// Whether this is an in-process broker.
    pub fn is_in_process(&self) -> bool {
        matches!(self.backend, Backend::Memory(_))
    }

    /// Whether the connection is still usable (in process: until [`Broker::close`]).
    pub fn is_connected(&self) -> bool {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.is_connected(),
            Backend::Memory(memory) => memory.is_connected(),
        }
    }

    /// Opens a new AMQP channel, for what the broker offers no method for.
    /// RabbitMQ only: an in-process broker answers [`TransportError::AmqpOnly`].
    pub async fn channel(&self) -> Result<Channel, TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.channel().await,
            Backend::Memory(memory) => Err(TransportError::AmqpOnly {
                operation: "opening an amqp channel",
                url: memory.url().to_string(),
            }),
        }
    }

    /// This broker. The topology functions used to take the publish channel
    /// (`topology::declare_coordinator(broker.publisher())`); they take the
    /// broker now, and this keeps that spelling compiling.
    pub fn publisher(&self) -> &Self {
        self
    }

    /// Publishes `message` and waits for the broker's confirm (a nack is an
    /// error). In process: returns once the message is in every queue it
    /// routes to, waiting while one of them is a full work queue.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.publish(message).await,
            Backend::Memory(memory) => memory.publish(message).await,
        }
    }

    /// Publishes `messages` in order and waits for all their confirms
    /// together (one round trip for the batch instead of one per message).
    /// Returns how many of them, counted from the first, are confirmed, and
    /// the error that stopped the rest (a nack is an error): messages after
    /// a failure may or may not have reached their queues. In process: each
    /// returns once it is in its queues, as [`Broker::publish`].
    pub async fn publish_batch(
        &self,
        messages: &[Outgoing],
    ) -> (usize, Result<(), TransportError>) {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.publish_batch(messages).await,
            Backend::Memory(memory) => {
                for (published, message) in messages.iter().enumerate() {
                    if let Err(error) = memory.publish(message).await {
                        return (published, Err(error));
                    }
                }
                (messages.len(), Ok(()))
            }
        }
    }

    /// Consumes `queue` with `prefetch` unacked deliveries at most (0: no limit).
    pub async fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Subscription, TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.subscribe(queue, prefetch).await,
            Backend::Memory(memory) => memory.subscribe(queue, prefetch),
        }
    }

    /// Follows `exchange` through a private, server-named queue bound with `binding_keys`.
    /// The queue disappears with the subscription.
    pub async fn follow(
        &self,
        exchange: &str,
        binding_keys: &[String],
    ) -> Result<Subscription, TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.follow(exchange, binding_keys).await,
            Backend::Memory(memory) => memory.follow(exchange, binding_keys),
        }
    }

    /// Declares a durable exchange; declaring it again with the same spec is
    /// harmless, with another one an error.
    pub async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.declare_exchange(spec).await,
            Backend::Memory(memory) => memory.declare_exchange(spec),
        }
    }

    /// Declares a durable queue; declaring it again with the same spec is
    /// harmless, with another one an error.
    pub async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.declare_queue(spec).await,
            Backend::Memory(memory) => memory.declare_queue(spec),
        }
    }

    /// Binds `queue` to `exchange` with `key` (idempotent).
    pub async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), TransportError> {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.bind_queue(queue, exchange, key).await,
            Backend::Memory(memory) => memory.bind_queue(queue, exchange, key),
        }
    }

    /// Closes the connection: its subscriptions end and their unacked
    /// deliveries go back to their queues.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Amqp(amqp) => amqp.close().await,
            Backend::Memory(memory) => memory.close(),
        }
    }
}
