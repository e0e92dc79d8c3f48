//! One participant's connection to an in-process broker: what a
//! [`crate::Broker`] made by [`crate::Broker::memory`] does.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::amqp::FOLLOW_PREFETCH;
use crate::error::TransportError;
use crate::incoming::Subscription;
use crate::memory::MemoryBroker;
use crate::memory::consumer::Consumer;
use crate::memory::error::MemoryError;
use crate::memory::hub::{Hub, NewConsumer, Offer};
use crate::memory::queue::Message;
use crate::outgoing::Outgoing;
use crate::topology::{ExchangeSpec, QueueSpec};

/// A connection to an in-process broker.
#[derive(Debug)]
pub(crate) struct Participant {
    hub: Arc<Hub>,
    id: u64,
    name: String,
    url: String,
    closed: CancellationToken,
}

impl Participant {
    pub(crate) fn new(broker: &MemoryBroker, name: &str) -> Self {
        let hub = broker.hub().clone();
        Self {
            id: hub.next_id(),
            name: name.to_string(),
            url: broker.url(),
            hub,
            closed: CancellationToken::new(),
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn is_connected(&self) -> bool {
        !self.closed.is_cancelled()
    }

    fn fail(&self, source: MemoryError) -> TransportError {
        TransportError::InProcess {
            broker: self.hub.name.clone(),
            source,
        }
    }

    fn check_open(&self) -> Result<(), TransportError> {
        if self.closed.is_cancelled() {
            return Err(self.fail(MemoryError::Closed {
                connection: self.name.clone(),
            }));
        }
        Ok(())
    }

    pub(crate) fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        self.check_open()?;
        self.hub
            .lock()
            .declare_exchange(spec)
            .map_err(|source| self.fail(source))
    }

    pub(crate) fn declare_queue(&self, spec: &QueueSpec) -> Result<(), TransportError> {
        self.check_open()?;
        self.hub
            .lock()
            .declare_queue(spec, self.hub.capacity)
            .map_err(|source| self.fail(source))
    }

    pub(crate) fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), TransportError> {
        self.check_open()?;
        self.hub
            .lock()
            .bind(queue, exchange, key)
            .map_err(|source| self.fail(source))
    }

    /// Puts `outgoing` in every queue it routes to, waiting while one of them
    /// is a full work queue; an error if its exchange does not exist or this
    /// connection closes meanwhile.
    pub(crate) async fn publish(&self, outgoing: &Outgoing) -> Result<(), TransportError> {
        let message = Message {
            exchange: outgoing.exchange.clone(),
            routing_key: outgoing.routing_key.clone(),
            payload: Arc::from(outgoing.payload.as_slice()),
            properties: outgoing.properties(),
            delivery_count: 0,
            redelivered: false,
        };
        loop {
            let writable = match self.offer(&message)? {
                Offer::Accepted => return Ok(()),
                Offer::Full(writable) => writable,
            };
            // Registered before offering again, so no wake-up is missed.
            let notified = writable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.offer(&message)? {
                Offer::Accepted => return Ok(()),
                Offer::Full(_) => {
                    tokio::select! {
                        () = notified => {}
                        () = self.closed.cancelled() => {}
                    }
                }
            }
        }
    }

    fn offer(&self, message: &Message) -> Result<Offer, TransportError> {
        self.check_open()?;
        self.hub
            .lock()
            .offer(message)
            .map_err(|source| self.fail(source))
    }

    /// Consumes `queue` with `prefetch` unacked deliveries at most (0: no limit).
    pub(crate) fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Subscription, TransportError> {
        self.check_open()?;
        let id = self.hub.next_id();
        self.hub
            .lock()
            .add_consumer(NewConsumer {
                id,
                queue,
                participant: self.id,
                prefetch,
                acks: true,
            })
            .map_err(|source| self.fail(source))?;
        let consumer = Consumer::new(self.hub.clone(), id, queue.to_string());
        Ok(Subscription::memory(consumer))
    }

    /// Follows `exchange` through a private queue bound with `binding_keys`,
    /// deleted with the subscription.
    pub(crate) fn follow(
        &self,
        exchange: &str,
        binding_keys: &[String],
    ) -> Result<Subscription, TransportError> {
        self.check_open()?;
        let name = format!("amq.gen-{}", Uuid::new_v4().simple());
        let id = self.hub.next_id();
        let mut state = self.hub.lock();
        if !state.has_exchange(exchange) {
            return Err(self.fail(MemoryError::NoExchange {
                exchange: exchange.to_string(),
            }));
        }
        state.declare_private(&name, id, self.hub.capacity);
        state
            .add_consumer(NewConsumer {
                id,
                queue: &name,
                participant: self.id,
                prefetch: FOLLOW_PREFETCH,
                acks: true,
            })
            .map_err(|source| self.fail(source))?;
        for key in binding_keys {
            if let Err(source) = state.bind(&name, exchange, key) {
                // Deletes the queue with its consumer.
                state.release(id);
                return Err(self.fail(source));
            }
        }
        drop(state);
        Ok(Subscription::memory(Consumer::new(
            self.hub.clone(),
            id,
            name,
        )))
    }

    /// A private queue named `<prefix>.<unique>` for the replies to one
    /// request, consumed without acks and deleted with the subscription.
    pub(crate) fn reply_queue(&self, prefix: &str) -> Result<Subscription, TransportError> {
        self.check_open()?;
        let name = format!("{prefix}.{}", Uuid::new_v4().simple());
        let id = self.hub.next_id();
        let mut state = self.hub.lock();
        state.declare_private(&name, id, self.hub.capacity);
        state
            .add_consumer(NewConsumer {
                id,
                queue: &name,
                participant: self.id,
                prefetch: 0,
                acks: false,
            })
            .map_err(|source| self.fail(source))?;
        drop(state);
        Ok(Subscription::memory(Consumer::new(
            self.hub.clone(),
            id,
            name,
        )))
    }

    /// Closes the connection: publishing fails from now on, its subscriptions
    /// end and their unacked deliveries go back to their queues.
    pub(crate) fn close(&self) {
        self.closed.cancel();
        self.hub.lock().release_participant(self.id);
    }
}
