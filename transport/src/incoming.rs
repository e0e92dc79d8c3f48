//! Deliveries and the decisions taken on them.

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use tracing::warn;

use koan_protocol::topology::{
    DEAD_EXCHANGE, DEAD_REASON_HEADER, DEAD_SOURCE_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER,
};
use koan_protocol::trace::TraceContext;

use crate::broker::Broker;
use crate::error::TransportError;
use crate::memory;
use crate::outgoing::Outgoing;

/// A consumer on one queue.
#[derive(Debug)]
pub struct Subscription {
    source: Source,
    queue: String,
}

/// Where a subscription's deliveries come from.
#[derive(Debug)]
enum Source {
    Amqp(Box<AmqpConsumer>),
    Memory(memory::Consumer),
}

/// A lapin consumer and the channel it runs on.
#[derive(Debug)]
struct AmqpConsumer {
    channel: Channel,
    consumer: Consumer,
}

impl Subscription {
    pub(crate) fn amqp(channel: Channel, consumer: Consumer, queue: String) -> Self {
        Self {
            source: Source::Amqp(Box::new(AmqpConsumer { channel, consumer })),
            queue,
        }
    }

    pub(crate) fn memory(consumer: memory::Consumer) -> Self {
        Self {
            queue: consumer.queue().to_string(),
            source: Source::Memory(consumer),
        }
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next delivery; an error when the channel or connection closed.
    pub async fn next(&mut self) -> Result<Incoming, TransportError> {
        let consumer = match &mut self.source {
            Source::Amqp(amqp) => &mut amqp.consumer,
            Source::Memory(consumer) => return consumer.next().await,
        };
        match consumer.next().await {
            Some(Ok(delivery)) => Ok(Incoming::new(delivery, &self.queue)),
            Some(Err(source)) => Err(TransportError::Amqp {
                operation: "basic.deliver",
                source,
            }),
            None => Err(TransportError::ConsumerClosed {
                queue: self.queue.clone(),
            }),
        }
    }

    /// A delivery the broker has already sent (within the prefetch), without
    /// waiting: `None` when none is ready. For taking what arrived together
    /// and handling it as one batch.
    pub fn try_next(&mut self) -> Option<Result<Incoming, TransportError>> {
        let consumer = match &mut self.source {
            Source::Amqp(amqp) => &mut amqp.consumer,
            Source::Memory(consumer) => return consumer.try_next(),
        };
        // `StreamExt::next` is cancel-safe: a delivery not ready stays queued.
        match consumer.next().now_or_never()? {
            Some(Ok(delivery)) => Some(Ok(Incoming::new(delivery, &self.queue))),
            Some(Err(source)) => Some(Err(TransportError::Amqp {
                operation: "basic.deliver",
                source,
            })),
            None => Some(Err(TransportError::ConsumerClosed {
                queue: self.queue.clone(),
            })),
        }
    }

    /// Stops consuming: no new deliveries; unacked ones can still be acked.
    pub async fn cancel(&self) {
        let (channel, consumer) = match &self.source {
            Source::Amqp(amqp) => (&amqp.channel, &amqp.consumer),
            Source::Memory(consumer) => return consumer.cancel(),
        };
        if let Err(error) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
        {
            warn!(%error, queue = %self.queue, "cancelling consumer");
        }
    }

    /// Closes the channel; unacked deliveries go back to the queue. Dropping
    /// an in-process subscription does the same.
    pub async fn close(self) {
        if let Source::Amqp(amqp) = self.source {
            let _ = amqp.channel.close(200, "bye".into()).await;
        }
    }
}

/// One delivery.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The body.
    pub payload: Vec<u8>,
    /// The AMQP `type` property.
    pub kind: Option<String>,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Exchange it was published to.
    pub exchange: String,
    /// `reply_to` property.
    pub reply_to: Option<String>,
    /// `correlation_id` property.
    pub correlation_id: Option<String>,
    /// `message_id` property.
    pub message_id: Option<String>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// Earlier deliveries of this message (quorum queues' `x-delivery-count`).
    pub delivery_count: u32,
    /// Queue it came from.
    pub queue: String,
    headers: FieldTable,
    acker: Acker,
}

/// Settles a delivery with the broker it came from.
#[derive(Debug, Clone)]
pub(crate) enum Acker {
    Amqp(lapin::Acker),
    Memory(memory::Acker),
}

/// What a delivery is made of, whichever broker it came from.
#[derive(Debug)]
pub(crate) struct Delivered<'a> {
    pub(crate) payload: Vec<u8>,
    pub(crate) properties: &'a BasicProperties,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) queue: &'a str,
    pub(crate) acker: Acker,
}

impl Incoming {
    fn new(delivery: lapin::message::Delivery, queue: &str) -> Self {
        Self::from_parts(Delivered {
            payload: delivery.data,
            properties: &delivery.properties,
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            queue,
            acker: Acker::Amqp(delivery.acker),
        })
    }

    pub(crate) fn from_parts(delivered: Delivered<'_>) -> Self {
        let properties = delivered.properties;
        let headers = properties.headers().clone().unwrap_or_default();
        let delivery_count = headers
            .inner()
            .get("x-delivery-count")
            .and_then(integer)
            .unwrap_or(0);
        Self {
            kind: properties.kind().as_ref().map(|kind| kind.to_string()),
            reply_to: properties.reply_to().as_ref().map(|to| to.to_string()),
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|id| id.to_string()),
            message_id: properties.message_id().as_ref().map(|id| id.to_string()),
            routing_key: delivered.routing_key,
            exchange: delivered.exchange,
            redelivered: delivered.redelivered,
            delivery_count: u32::try_from(delivery_count).unwrap_or(u32::MAX),
            queue: delivered.queue.to_string(),
            headers,
            payload: delivered.payload,
            acker: delivered.acker,
        }
    }

    /// A string header.
    pub fn header(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name)? {
            AMQPValue::LongString(value) => Some(String::from_utf8_lossy(value.as_bytes()).into()),
            AMQPValue::ShortString(value) => Some(value.to_string()),
            _ => None,
        }
    }

    /// The W3C trace context it carries (`traceparent`, `tracestate`), if valid.
    pub fn trace_context(&self) -> Option<TraceContext> {
        let traceparent = self.header(TRACEPARENT_HEADER)?;
        TraceContext::new(&traceparent, self.header(TRACESTATE_HEADER).as_deref())
    }

    /// Acknowledges: the work it asked for is durable.
    pub async fn ack(&self) -> Result<(), TransportError> {
        match &self.acker {
            Acker::Amqp(acker) => acker
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(TransportError::amqp("basic.ack")),
            Acker::Memory(acker) => acker.ack(),
        }
    }

    /// Hands it back to the queue for another consumer (counts as a delivery).
    pub async fn requeue(&self) -> Result<(), TransportError> {
        match &self.acker {
            Acker::Amqp(acker) => acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
                .map(|_| ())
                .map_err(TransportError::amqp("basic.nack")),
            Acker::Memory(acker) => acker.requeue(),
        }
    }

    /// Moves it to `koan.dead` with a header stating `reason` (and its own
    /// trace context, if it had one), then acks it.
    pub async fn dead_letter(&self, broker: &Broker, reason: &str) -> Result<(), TransportError> {
        let mut copy = Outgoing {
            exchange: DEAD_EXCHANGE.to_string(),
            routing_key: self.routing_key.clone(),
            payload: self.payload.clone(),
            kind: self.kind.clone().unwrap_or_default(),
            message_id: self.message_id.clone().unwrap_or_default(),
            correlation_id: self.correlation_id.clone(),
            reply_to: None,
            headers: Vec::new(),
        };
        copy = copy
            .header(
                DEAD_REASON_HEADER,
                reason.chars().take(1000).collect::<String>(),
            )
            .header(DEAD_SOURCE_HEADER, self.queue.clone())
            .trace(self.trace_context().as_ref());
        broker.publish(&copy).await?;
        self.ack().await
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}
