//! Queues of the in-process broker and the messages they hold.

use std::collections::VecDeque;
use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use tokio::sync::Notify;
use tracing::warn;

use koan_protocol::topology::{DEAD_REASON_HEADER, DEAD_SOURCE_HEADER};

use crate::topology::QueueRole;

/// Reason given to messages dead-lettered after their queue's delivery limit,
/// as RabbitMQ names it in `x-death`.
pub(crate) const DELIVERY_LIMIT_REASON: &str = "delivery_limit";

/// One message in a queue (or delivered and not yet settled).
#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// Exchange it was published to (the dead-letter exchange once dead-lettered).
    pub(crate) exchange: String,
    /// Routing key it was published with.
    pub(crate) routing_key: String,
    /// Body, shared by the copies a fanout makes.
    pub(crate) payload: Arc<[u8]>,
    /// AMQP properties, headers among them.
    pub(crate) properties: BasicProperties,
    /// Earlier deliveries that ended without an ack (`x-delivery-count`).
    pub(crate) delivery_count: u32,
    /// Whether it was delivered before.
    pub(crate) redelivered: bool,
}

impl Message {
    /// The copy sent to `dead_letter_exchange` when it went over the delivery
    /// limit of `queue`: koan's reason and source headers, and RabbitMQ's
    /// `x-first-death-*` and `x-death` headers.
    pub(crate) fn dead_lettered(&self, queue: &str, dead_letter_exchange: &str) -> Self {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        let text = |value: &str| AMQPValue::LongString(LongString::from(value));
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("reason".into(), text(DELIVERY_LIMIT_REASON));
        death.insert("queue".into(), text(queue));
        death.insert("exchange".into(), text(&self.exchange));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text(&self.routing_key)])),
        );
        headers.insert(DEAD_REASON_HEADER.into(), text(DELIVERY_LIMIT_REASON));
        headers.insert(DEAD_SOURCE_HEADER.into(), text(queue));
        headers.insert("x-first-death-reason".into(), text(DELIVERY_LIMIT_REASON));
        headers.insert("x-first-death-queue".into(), text(queue));
        headers.insert("x-first-death-exchange".into(), text(&self.exchange));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        Self {
            exchange: dead_letter_exchange.to_string(),
            routing_key: self.routing_key.clone(),
            payload: self.payload.clone(),
            properties: self.properties.clone().with_headers(headers),
            delivery_count: 0,
            redelivered: false,
        }
    }
}

/// What a full queue does with one more message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// Publishers wait until a consumer makes room (work queues).
    Wait,
    /// The oldest ready message is dropped (RabbitMQ's `drop-head`): archives
    /// and private queues, which must never hold a publisher up.
    DropOldest,
}

/// A queue: ready messages in order, and who waits on it.
#[derive(Debug)]
pub(crate) struct Queue {
    /// Name.
    pub(crate) name: String,
    /// How it was declared; `None` for a private (server-named) queue.
    pub(crate) role: Option<QueueRole>,
    /// Messages waiting for a consumer.
    ready: VecDeque<Message>,
    /// Ready messages it holds at most (RabbitMQ's `x-max-length` counts the same).
    capacity: usize,
    /// The consumer whose end deletes it (private queues).
    pub(crate) owner: Option<u64>,
    /// Woken when a message becomes ready, a prefetch slot frees or the queue goes.
    pub(crate) readable: Arc<Notify>,
    /// Woken when room is made or the queue goes.
    pub(crate) writable: Arc<Notify>,
}

impl Queue {
    pub(crate) fn new(name: &str, role: Option<QueueRole>, capacity: usize) -> Self {
        Self {
            name: name.to_string(),
            role,
            ready: VecDeque::new(),
            capacity: capacity.max(1),
            owner: None,
            readable: Arc::new(Notify::new()),
            writable: Arc::new(Notify::new()),
        }
    }

    pub(crate) fn overflow(&self) -> Overflow {
        match self.role {
            Some(QueueRole::Work { .. }) => Overflow::Wait,
            Some(QueueRole::Archive) | None => Overflow::DropOldest,
        }
    }

    /// The delivery limit and the dead-letter exchange, for work queues.
    pub(crate) fn delivery_limit(&self) -> Option<(u32, &str)> {
        match &self.role {
            Some(QueueRole::Work {
                delivery_limit,
                dead_letter_exchange,
            }) => Some((*delivery_limit, dead_letter_exchange)),
            _ => None,
        }
    }

    /// Whether a publisher may add a message now.
    pub(crate) fn admits(&self) -> bool {
        self.overflow() == Overflow::DropOldest || self.ready.len() < self.capacity
    }

    /// Messages waiting for a consumer.
    pub(crate) fn ready(&self) -> usize {
        self.ready.len()
    }

    /// Adds `message` at the back, dropping the oldest first when full and so
    /// configured. A work queue takes it even when full: publishers check
    /// [`Queue::admits`] first, and messages moved by the broker itself
    /// (dead letters) never wait.
    pub(crate) fn push(&mut self, message: Message) {
        if self.overflow() == Overflow::DropOldest
            && self.ready.len() >= self.capacity
            && let Some(dropped) = self.ready.pop_front()
        {
            warn!(
                queue = %self.name,
                capacity = self.capacity,
                routing_key = %dropped.routing_key,
                "in-process queue full: oldest message dropped"
            );
        }
        self.ready.push_back(message);
        self.readable.notify_waiters();
    }

    /// Puts a returned message back at the front, where it was.
    pub(crate) fn put_back(&mut self, message: Message) {
        self.ready.push_front(message);
        self.readable.notify_waiters();
    }

    /// Takes the first ready message.
    pub(crate) fn take(&mut self) -> Option<Message> {
        let message = self.ready.pop_front()?;
        self.writable.notify_waiters();
        Some(message)
    }
}
