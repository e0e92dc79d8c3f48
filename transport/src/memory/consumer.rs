//! The consuming side of the in-process broker: a consumer pulls deliveries
//! within its prefetch, and an acker settles them.

use std::sync::Arc;

use lapin::types::AMQPValue;

use crate::error::TransportError;
use crate::incoming::{Acker as IncomingAcker, Delivered, Incoming};
use crate::memory::hub::{Hub, Settle, Take};
use crate::memory::queue::Message;

/// A consumer of one queue; dropping it returns its unacked deliveries to the
/// queue (or deletes the queue if it was the consumer's private one).
#[derive(Debug)]
pub(crate) struct Consumer {
    hub: Arc<Hub>,
    id: u64,
    queue: String,
}

impl Consumer {
    pub(crate) fn new(hub: Arc<Hub>, id: u64, queue: String) -> Self {
        Self { hub, id, queue }
    }

    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery, waiting for one; an error once the consumer was
    /// cancelled, its connection closed or its queue deleted.
    pub(crate) async fn next(&mut self) -> Result<Incoming, TransportError> {
        loop {
            let readable = match self.take() {
                Take::Delivered(tag, message) => return Ok(self.incoming(tag, *message)),
                Take::Wait(readable) => readable,
                Take::Closed => return Err(self.closed()),
            };
            // Registered before looking again, so no wake-up is missed.
            let notified = readable.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.take() {
                Take::Delivered(tag, message) => return Ok(self.incoming(tag, *message)),
                Take::Wait(_) => notified.await,
                Take::Closed => return Err(self.closed()),
            }
        }
    }

    /// A delivery that is ready now, without waiting; `None` when there is none.
    pub(crate) fn try_next(&mut self) -> Option<Result<Incoming, TransportError>> {
        match self.take() {
            Take::Delivered(tag, message) => Some(Ok(self.incoming(tag, *message))),
            Take::Wait(_) => None,
            Take::Closed => Some(Err(self.closed())),
        }
    }

    /// No new deliveries; unacked ones can still be settled.
    pub(crate) fn cancel(&self) {
        self.hub.lock().cancel(self.id);
    }

    fn take(&self) -> Take {
        let tag = self.hub.next_id();
        self.hub.lock().take(self.id, tag)
    }

    fn closed(&self) -> TransportError {
        TransportError::ConsumerClosed {
            queue: self.queue.clone(),
        }
    }

    fn incoming(&self, tag: u64, message: Message) -> Incoming {
        let mut properties = message.properties;
        if message.delivery_count > 0 {
            // As quorum queues do: only redeliveries carry the count.
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                "x-delivery-count".into(),
                AMQPValue::LongLongInt(i64::from(message.delivery_count)),
            );
            properties = properties.with_headers(headers);
        }
        Incoming::from_parts(Delivered {
            payload: message.payload.to_vec(),
            properties: &properties,
            exchange: message.exchange,
            routing_key: message.routing_key,
            redelivered: message.redelivered,
            queue: &self.queue,
            acker: IncomingAcker::Memory(Acker {
                hub: self.hub.clone(),
                consumer: self.id,
                tag,
                queue: self.queue.clone(),
            }),
        })
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.hub.lock().release(self.id);
    }
}

/// Settles one in-process delivery.
#[derive(Debug, Clone)]
pub(crate) struct Acker {
    hub: Arc<Hub>,
    consumer: u64,
    tag: u64,
    queue: String,
}

impl Acker {
    pub(crate) fn ack(&self) -> Result<(), TransportError> {
        self.settle(Settle::Ack)
    }

    pub(crate) fn requeue(&self) -> Result<(), TransportError> {
        self.settle(Settle::Requeue)
    }

    fn settle(&self, settle: Settle) -> Result<(), TransportError> {
        self.hub
            .lock()
            .settle(self.consumer, self.tag, settle, &self.queue)
            .map_err(|source| TransportError::InProcess {
                broker: self.hub.name.clone(),
                source,
            })
    }
}
