//! The shared state of an in-process broker: exchanges, queues and consumers,
//! behind one lock that is never held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::memory::error::MemoryError;
use crate::memory::exchange::Exchange;
use crate::memory::queue::{Message, Queue};
use crate::topology::{ExchangeSpec, QueueSpec};

/// One in-process broker, shared by the participants attached to it.
#[derive(Debug)]
pub(crate) struct Hub {
    /// Name, for URLs, logs and errors.
    pub(crate) name: String,
    /// Ready messages a queue holds at most.
    pub(crate) capacity: usize,
    state: Mutex<State>,
    ids: AtomicU64,
}

impl Hub {
    pub(crate) fn new(name: &str, capacity: usize) -> Self {
        Self {
            name: name.to_string(),
            capacity,
            state: Mutex::new(State::default()),
            ids: AtomicU64::new(1),
        }
    }

    /// A fresh id for a participant, consumer or delivery.
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// The state. No code panics while holding the lock, so a poisoned lock
    /// still holds consistent state.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Exchanges, queues and consumers.
#[derive(Debug, Default)]
pub(crate) struct State {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, Queue>,
    consumers: HashMap<u64, ConsumerState>,
}

/// A consumer of one queue and the deliveries it has not settled.
#[derive(Debug)]
struct ConsumerState {
    queue: String,
    participant: u64,
    /// Unacked deliveries it may hold at most; 0: no limit.
    prefetch: u16,
    /// Whether deliveries wait for an ack (false: settled on delivery).
    acks: bool,
    /// No new deliveries; unacked ones can still be settled.
    cancelled: bool,
    /// Unsettled deliveries by tag (tags grow, so this is delivery order).
    unacked: BTreeMap<u64, Message>,
}

/// A new consumer.
#[derive(Debug)]
pub(crate) struct NewConsumer<'a> {
    pub(crate) id: u64,
    pub(crate) queue: &'a str,
    pub(crate) participant: u64,
    pub(crate) prefetch: u16,
    pub(crate) acks: bool,
}

/// The outcome of asking for a delivery.
#[derive(Debug)]
pub(crate) enum Take {
    /// A delivery, with its tag.
    Delivered(u64, Box<Message>),
    /// Nothing now: wait on this and ask again.
    Wait(Arc<Notify>),
    /// The consumer was cancelled or released, or its queue deleted.
    Closed,
}

/// The outcome of offering a message to its queues.
#[derive(Debug)]
pub(crate) enum Offer {
    /// In every queue it routes to (possibly none).
    Accepted,
    /// A work queue it routes to is full: wait on this and offer again.
    Full(Arc<Notify>),
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Requeue,
}

impl State {
    pub(crate) fn declare_exchange(&mut self, spec: &ExchangeSpec) -> Result<(), MemoryError> {
        if spec.name.is_empty() {
            return Err(MemoryError::DefaultExchange);
        }
        match self.exchanges.get(&spec.name) {
            Some(existing) if existing.spec != *spec => Err(MemoryError::Mismatch {
                what: "exchange",
                name: spec.name.clone(),
                existing: format!("{:?}", existing.spec),
                declared: format!("{spec:?}"),
            }),
            Some(_) => Ok(()),
            None => {
                self.exchanges
                    .insert(spec.name.clone(), Exchange::new(spec.clone()));
                Ok(())
            }
        }
    }

    pub(crate) fn declare_queue(
        &mut self,
        spec: &QueueSpec,
        capacity: usize,
    ) -> Result<(), MemoryError> {
        match self.queues.get(&spec.name) {
            Some(existing) if existing.role.as_ref() != Some(&spec.role) => {
                Err(MemoryError::Mismatch {
                    what: "queue",
                    name: spec.name.clone(),
                    existing: existing
                        .role
                        .as_ref()
                        .map_or_else(|| "private".to_string(), |role| format!("{role:?}")),
                    declared: format!("{:?}", spec.role),
                })
            }
            Some(_) => Ok(()),
            None => {
                let queue = Queue::new(&spec.name, Some(spec.role.clone()), capacity);
                self.queues.insert(spec.name.clone(), queue);
                Ok(())
            }
        }
    }

    /// Creates a private queue named `name` (unique), deleted with consumer `owner`.
    pub(crate) fn declare_private(&mut self, name: &str, owner: u64, capacity: usize) {
        let mut queue = Queue::new(name, None, capacity);
        queue.owner = Some(owner);
        self.queues.insert(name.to_string(), queue);
    }

    pub(crate) fn bind(
        &mut self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), MemoryError> {
        if exchange.is_empty() {
            return Err(MemoryError::DefaultExchange);
        }
        if !self.queues.contains_key(queue) {
            return Err(MemoryError::NoQueue {
                queue: queue.to_string(),
            });
        }
        let exchange = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| MemoryError::NoExchange {
                exchange: exchange.to_string(),
            })?;
        exchange.bind(queue, key);
        Ok(())
    }

    pub(crate) fn has_exchange(&self, exchange: &str) -> bool {
        self.exchanges.contains_key(exchange)
    }

    /// The queues a message published to `exchange` with `routing_key` goes
    /// to: through the default exchange (`""`) the queue named by the key;
    /// otherwise the bound queues, or those of the alternate exchange when
    /// none is (following alternates until one routes, each once).
    fn route(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>, MemoryError> {
        if exchange.is_empty() {
            if self.queues.contains_key(routing_key) {
                return Ok(vec![routing_key.to_string()]);
            }
            return Ok(Vec::new());
        }
        let mut current = self
            .exchanges
            .get(exchange)
            .ok_or_else(|| MemoryError::NoExchange {
                exchange: exchange.to_string(),
            })?;
        let mut visited = vec![exchange];
        loop {
            let queues = current.route(routing_key);
            if !queues.is_empty() {
                return Ok(queues);
            }
            let next = current
                .spec
                .alternate
                .as_deref()
                .filter(|alternate| !visited.contains(alternate))
                .and_then(|alternate| self.exchanges.get(alternate));
            match next {
                Some(alternate) => {
                    visited.push(&alternate.spec.name);
                    current = alternate;
                }
                None => return Ok(Vec::new()),
            }
        }
    }

    /// Puts `message` in every queue it routes to, or none if a work queue
    /// among them is full. An unroutable message is dropped, as RabbitMQ
    /// drops a message published without `mandatory`.
    pub(crate) fn offer(&mut self, message: &Message) -> Result<Offer, MemoryError> {
        let targets = self.route(&message.exchange, &message.routing_key)?;
        for target in &targets {
            if let Some(queue) = self.queues.get(target)
                && !queue.admits()
            {
                return Ok(Offer::Full(queue.writable.clone()));
            }
        }
        if targets.is_empty() {
            debug!(exchange = %message.exchange, routing_key = %message.routing_key, "unroutable message dropped");
        }
        for target in targets {
            if let Some(queue) = self.queues.get_mut(&target) {
                queue.push(message.clone());
            }
        }
        Ok(Offer::Accepted)
    }

    pub(crate) fn add_consumer(&mut self, consumer: NewConsumer<'_>) -> Result<(), MemoryError> {
        if !self.queues.contains_key(consumer.queue) {
            return Err(MemoryError::NoQueue {
                queue: consumer.queue.to_string(),
            });
        }
        self.consumers.insert(
            consumer.id,
            ConsumerState {
                queue: consumer.queue.to_string(),
                participant: consumer.participant,
                prefetch: consumer.prefetch,
                acks: consumer.acks,
                cancelled: false,
                unacked: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// The next delivery for `consumer`, if its prefetch allows one and its
    /// queue has one.
    pub(crate) fn take(&mut self, consumer: u64, tag: u64) -> Take {
        let Some(state) = self.consumers.get_mut(&consumer) else {
            return Take::Closed;
        };
        if state.cancelled {
            return Take::Closed;
        }
        let Some(queue) = self.queues.get_mut(&state.queue) else {
            return Take::Closed;
        };
        let full =
            state.acks && state.prefetch != 0 && state.unacked.len() >= usize::from(state.prefetch);
        if full {
            return Take::Wait(queue.readable.clone());
        }
        let Some(message) = queue.take() else {
            return Take::Wait(queue.readable.clone());
        };
        if state.acks {
            state.unacked.insert(tag, message.clone());
        }
        Take::Delivered(tag, Box::new(message))
    }

    /// Stops new deliveries to `consumer`; its unacked deliveries stay pending.
    pub(crate) fn cancel(&mut self, consumer: u64) {
        if let Some(state) = self.consumers.get_mut(&consumer) {
            state.cancelled = true;
            if let Some(queue) = self.queues.get(&state.queue) {
                queue.readable.notify_waiters();
            }
        }
    }

    /// Acks or requeues delivery `tag` of `consumer`.
    pub(crate) fn settle(
        &mut self,
        consumer: u64,
        tag: u64,
        settle: Settle,
        queue: &str,
    ) -> Result<(), MemoryError> {
        let not_pending = || MemoryError::NotPending {
            queue: queue.to_string(),
            tag,
        };
        let state = self.consumers.get_mut(&consumer).ok_or_else(not_pending)?;
        let message = state.unacked.remove(&tag).ok_or_else(not_pending)?;
        let queue_name = state.queue.clone();
        if settle == Settle::Requeue {
            self.give_back(&queue_name, vec![message]);
        }
        // A prefetch slot is free again.
        if let Some(queue) = self.queues.get(&queue_name) {
            queue.readable.notify_waiters();
        }
        Ok(())
    }

    /// Ends `consumer`: its unacked deliveries go back to the queue (counted
    /// as deliveries), and the queue goes too if it was the consumer's own.
    pub(crate) fn release(&mut self, consumer: u64) {
        let Some(state) = self.consumers.remove(&consumer) else {
            return;
        };
        let owned = self
            .queues
            .get(&state.queue)
            .is_some_and(|queue| queue.owner == Some(consumer));
        if owned {
            self.delete_queue(&state.queue);
            return;
        }
        let returned: Vec<Message> = state.unacked.into_values().collect();
        if !returned.is_empty() {
            debug!(queue = %state.queue, returned = returned.len(), "unacked deliveries returned");
        }
        self.give_back(&state.queue, returned);
        // Its own pending `next` ends; others may take what came back.
        if let Some(queue) = self.queues.get(&state.queue) {
            queue.readable.notify_waiters();
        }
    }

    /// Releases every consumer of `participant` (its connection closed).
    pub(crate) fn release_participant(&mut self, participant: u64) {
        let consumers: Vec<u64> = self
            .consumers
            .iter()
            .filter(|(_, state)| state.participant == participant)
            .map(|(id, _)| *id)
            .collect();
        for consumer in consumers {
            self.release(consumer);
        }
    }

    /// Returns `messages` (in delivery order) to the front of `queue`, each
    /// with one more delivery counted; one returned more times than the
    /// queue's delivery limit is dead-lettered instead.
    fn give_back(&mut self, queue_name: &str, messages: Vec<Message>) {
        let mut dead = Vec::new();
        let Some(queue) = self.queues.get_mut(queue_name) else {
            return;
        };
        let limit = queue
            .delivery_limit()
            .map(|(limit, exchange)| (limit, exchange.to_string()));
        for mut message in messages.into_iter().rev() {
            message.delivery_count = message.delivery_count.saturating_add(1);
            message.redelivered = true;
            match &limit {
                Some((limit, exchange)) if message.delivery_count > *limit => {
                    dead.push(message.dead_lettered(queue_name, exchange));
                }
                _ => queue.put_back(message),
            }
        }
        for message in dead.into_iter().rev() {
            warn!(
                queue = queue_name,
                dead_letter_exchange = %message.exchange,
                routing_key = %message.routing_key,
                "delivery limit reached: message dead-lettered"
            );
            self.dead_letter(message);
        }
    }

    /// Puts a dead-lettered message in the queues of its exchange, full or not:
    /// the broker itself never waits. Lost if the exchange is missing, as in RabbitMQ.
    fn dead_letter(&mut self, message: Message) {
        match self.route(&message.exchange, &message.routing_key) {
            Ok(targets) => {
                for target in targets {
                    if let Some(queue) = self.queues.get_mut(&target) {
                        queue.push(message.clone());
                    }
                }
            }
            Err(error) => warn!(%error, "dead letter dropped"),
        }
    }

    /// Deletes `queue` and its bindings; its consumers end.
    fn delete_queue(&mut self, name: &str) {
        if let Some(queue) = self.queues.remove(name) {
            for exchange in self.exchanges.values_mut() {
                exchange.unbind_queue(name);
            }
            queue.readable.notify_waiters();
            queue.writable.notify_waiters();
        }
    }

    /// `(ready, unacked, consumers)` of `queue`.
    pub(crate) fn queue_stats(&self, name: &str) -> Option<(usize, usize, usize)> {
        let queue = self.queues.get(name)?;
        let consumers = self.consumers.values().filter(|state| state.queue == name);
        let (count, unacked) = consumers.fold((0, 0), |(count, unacked), state| {
            (count + 1, unacked + state.unacked.len())
        });
        Some((queue.ready(), unacked, count))
    }

    /// Names of every queue, sorted.
    pub(crate) fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.queues.keys().cloned().collect();
        names.sort();
        names
    }
}
