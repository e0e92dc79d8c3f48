//! Request and reply: over RabbitMQ's direct reply-to, or in process through
//! a private reply queue of the requester.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use tokio::sync::oneshot;

use crate::amqp::AmqpBroker;
use crate::broker::{Backend, Broker};
use crate::error::TransportError;
use crate::incoming::Incoming;
use crate::memory::Participant;
use crate::outgoing::Outgoing;

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A reply: its kind and body.
#[derive(Debug, Clone)]
pub struct ReplyMessage {
    /// The AMQP `type` property.
    pub kind: Option<String>,
    /// The body.
    pub payload: Vec<u8>,
}

/// Publishes `request` and waits up to `timeout` for the reply with its correlation id.
pub async fn request(
    broker: &Broker,
    request: Outgoing,
    timeout: Duration,
) -> Result<ReplyMessage, TransportError> {
    match broker.backend() {
        Backend::Amqp(amqp) => request_amqp(amqp, request, timeout).await,
        Backend::Memory(participant) => request_in_process(participant, request, timeout).await,
    }
}

/// The request and its reply through a private queue of the requester, named
/// like a direct reply-to address; the queue goes when the request ends.
async fn request_in_process(
    participant: &Participant,
    mut request: Outgoing,
    timeout: Duration,
) -> Result<ReplyMessage, TransportError> {
    let mut replies = participant.reply_queue(DIRECT_REPLY_TO)?;
    let correlation_id = request
        .correlation_id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    request.reply_to = Some(replies.queue().to_string());
    let exchange = async {
        participant.publish(&request).await?;
        loop {
            let reply = replies.next().await?;
            if reply.correlation_id.as_deref() == Some(correlation_id.as_str()) {
                return Ok(ReplyMessage {
                    kind: reply.kind,
                    payload: reply.payload,
                });
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| TransportError::Timeout {
            kind: request.kind.clone(),
            seconds: timeout.as_secs(),
        })?
}

/// The request over the connection's shared reply channel: published there
/// with direct reply-to, and the reply handed over by correlation id.
async fn request_amqp(
    broker: &AmqpBroker,
    mut request: Outgoing,
    timeout: Duration,
) -> Result<ReplyMessage, TransportError> {
    let replies = broker.replies().await?;
    let correlation_id = request
        .correlation_id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    request.reply_to = Some(DIRECT_REPLY_TO.to_string());
    let answer = replies.expect(&correlation_id);
    let published = replies
        .channel
        .basic_publish(
            request.exchange.as_str().into(),
            request.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &request.payload,
            request.properties(),
        )
        .await;
    if let Err(source) = published {
        replies.forget(&correlation_id);
        return Err(TransportError::Amqp {
            operation: "basic.publish",
            source,
        });
    }
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(_)) => Err(TransportError::ConsumerClosed {
            queue: DIRECT_REPLY_TO.to_string(),
        }),
        Err(_) => {
            replies.forget(&correlation_id);
            Err(TransportError::Timeout {
                kind: request.kind.clone(),
                seconds: timeout.as_secs(),
            })
        }
    }
}

/// A connection's channel for requests: it consumes direct reply-to (no
/// ack) for as long as it is open, and hands each reply to the request
/// waiting for its correlation id. One per connection, opened at the first
/// request (and again after it closed), instead of a channel per request.
#[derive(Debug)]
pub(crate) struct Replies {
    channel: Channel,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<ReplyMessage>>>>,
}

impl Replies {
    /// Opens the channel and starts handing replies over.
    pub(crate) async fn open(broker: &AmqpBroker) -> Result<Self, TransportError> {
        let channel = broker.channel().await?;
        let mut consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(TransportError::amqp("basic.consume reply-to"))?;
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<ReplyMessage>>>> = Arc::default();
        let handing = Arc::clone(&waiting);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(correlation_id) = delivery.properties.correlation_id().as_ref() else {
                    continue;
                };
                let waiter = lock(&handing).remove(correlation_id.as_str());
                if let Some(waiter) = waiter {
                    let _ = waiter.send(ReplyMessage {
                        kind: delivery
                            .properties
                            .kind()
                            .as_ref()
                            .map(|kind| kind.to_string()),
                        payload: delivery.data,
                    });
                }
            }
            // The channel closed: every request still waiting fails at once.
            lock(&handing).clear();
        });
        Ok(Self { channel, waiting })
    }

    /// Whether requests can still go through it.
    pub(crate) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    fn expect(&self, correlation_id: &str) -> oneshot::Receiver<ReplyMessage> {
        let (sender, receiver) = oneshot::channel();
        lock(&self.waiting).insert(correlation_id.to_string(), sender);
        receiver
    }

    fn forget(&self, correlation_id: &str) {
        lock(&self.waiting).remove(correlation_id);
    }

    /// Closes the channel.
    pub(crate) async fn close(&self) {
        let _ = self.channel.close(200, "bye".into()).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Answers `to` (if it asked for a reply) with `reply`, keeping its correlation id.
pub async fn reply(broker: &Broker, to: &Incoming, reply: Outgoing) -> Result<(), TransportError> {
    match reply_to(to, reply) {
        Some(reply) => broker.publish(&reply).await,
        None => Ok(()),
    }
}

/// `reply` addressed as the answer to `to` (its `reply_to`, its correlation
/// id), for publishing with others ([`Broker::publish_batch`]); `None` when
/// `to` asked for no reply.
pub fn reply_to(to: &Incoming, mut reply: Outgoing) -> Option<Outgoing> {
    let reply_to = to.reply_to.as_ref()?;
    reply.exchange = String::new();
    reply.routing_key = reply_to.clone();
    reply.correlation_id = to.correlation_id.clone();
    Some(reply)
}
