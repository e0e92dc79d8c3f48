//! Declares the exchanges and queues of `koan_protocol::topology`.
//!
//! The topology is described as data ([`ExchangeSpec`], [`QueueSpec`]) that
//! either backend of [`Broker`] applies: RabbitMQ gets durable exchanges and
//! quorum queues, the in-process broker their in-memory equivalents.
//!
//! Declarations are idempotent; every service declares what it uses at start
//! and after reconnecting, so the order services start in does not matter.

use koan_protocol::topology::{
    COMMAND_ROUTING_KEYS, COMMANDS_EXCHANGE, COMMANDS_QUEUE, CONTROL_DELIVERY_LIMIT,
    COORDINATOR_DEAD_QUEUE, COORDINATOR_QUEUE, DEAD_EXCHANGE, DEAD_QUEUE, EVENTS_EXCHANGE,
    JOB_DELIVERY_LIMIT, JOBS_EXCHANGE, WORKER_EVENTS_BINDING, pool_queue,
};

use crate::broker::Broker;
use crate::error::TransportError;

/// How an exchange routes a message to the queues bound to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// To queues bound with exactly the routing key.
    Direct,
    /// To queues whose binding pattern matches the routing key: `.`-separated
    /// words, `*` standing for one word and `#` for zero or more.
    Topic,
    /// To every bound queue, whatever the routing key.
    Fanout,
}

/// A durable exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    /// Name.
    pub name: String,
    /// Routing.
    pub kind: ExchangeKind,
    /// Exchange receiving the messages no queue is bound for (`alternate-exchange`).
    pub alternate: Option<String>,
}

impl ExchangeSpec {
    /// An exchange without alternate exchange.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Self {
            name: name.into(),
            kind,
            alternate: None,
        }
    }

    /// Sends unroutable messages to `exchange`.
    pub fn alternate(mut self, exchange: impl Into<String>) -> Self {
        self.alternate = Some(exchange.into());
        self
    }
}

/// What a queue is for, which decides its arguments on either backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueRole {
    /// Work consumed and acknowledged: a quorum queue whose messages returned
    /// more than `delivery_limit` times are dead-lettered to `dead_letter_exchange`.
    /// In process: bounded, and publishing to it when full waits.
    Work {
        /// Returns (requeues, consumers lost) a message survives.
        delivery_limit: u32,
        /// Where over-limit messages go.
        dead_letter_exchange: String,
    },
    /// A record kept for reading later (dead letters): a quorum queue without
    /// a delivery limit. In process: bounded, and the oldest message is dropped
    /// to make room.
    Archive,
}

/// A durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Name.
    pub name: String,
    /// What it is for.
    pub role: QueueRole,
}

impl QueueSpec {
    /// A work queue dead-lettering to `koan.dead` after `delivery_limit` returns.
    pub fn work(name: impl Into<String>, delivery_limit: u32) -> Self {
        Self {
            name: name.into(),
            role: QueueRole::Work {
                delivery_limit,
                dead_letter_exchange: DEAD_EXCHANGE.to_string(),
            },
        }
    }

    /// A queue of records (no delivery limit, no dead-lettering).
    pub fn archive(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            role: QueueRole::Archive,
        }
    }
}

/// Exchanges and the dead-letter queue: what every participant needs.
pub async fn declare_exchanges(broker: &Broker) -> Result<(), TransportError> {
    broker
        .declare_exchange(&ExchangeSpec::new(DEAD_EXCHANGE, ExchangeKind::Fanout))
        .await?;
    broker
        .declare_queue(&QueueSpec::archive(DEAD_QUEUE))
        .await?;
    broker.bind_queue(DEAD_QUEUE, DEAD_EXCHANGE, "").await?;
    broker
        .declare_exchange(
            &ExchangeSpec::new(COMMANDS_EXCHANGE, ExchangeKind::Direct).alternate(DEAD_EXCHANGE),
        )
        .await?;
    broker
        .declare_exchange(&ExchangeSpec::new(JOBS_EXCHANGE, ExchangeKind::Direct))
        .await?;
    broker
        .declare_exchange(&ExchangeSpec::new(EVENTS_EXCHANGE, ExchangeKind::Topic))
        .await
}

/// The coordinator's queues: commands, worker reports and its copy of dead letters.
pub async fn declare_coordinator(broker: &Broker) -> Result<(), TransportError> {
    declare_exchanges(broker).await?;
    broker
        .declare_queue(&QueueSpec::work(COMMANDS_QUEUE, CONTROL_DELIVERY_LIMIT))
        .await?;
    for key in COMMAND_ROUTING_KEYS {
        broker
            .bind_queue(COMMANDS_QUEUE, COMMANDS_EXCHANGE, key)
            .await?;
    }
    broker
        .declare_queue(&QueueSpec::work(COORDINATOR_QUEUE, CONTROL_DELIVERY_LIMIT))
        .await?;
    broker
        .bind_queue(COORDINATOR_QUEUE, EVENTS_EXCHANGE, WORKER_EVENTS_BINDING)
        .await?;
    // No dead-letter exchange here: a message dead-lettered once is never
    // dead-lettered again (it stays in `koan.dead` for people to read).
    broker
        .declare_queue(&QueueSpec::archive(COORDINATOR_DEAD_QUEUE))
        .await?;
    broker
        .bind_queue(COORDINATOR_DEAD_QUEUE, DEAD_EXCHANGE, "")
        .await
}

/// The job queue of one worker pool.
pub async fn declare_pool(broker: &Broker, pool: &str) -> Result<(), TransportError> {
    let name = pool_queue(pool);
    broker
        .declare_queue(&QueueSpec::work(name.as_str(), JOB_DELIVERY_LIMIT))
        .await?;
    broker.bind_queue(&name, JOBS_EXCHANGE, pool).await
}
