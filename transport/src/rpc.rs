//! Request and reply: over RabbitMQ's direct reply-to, or in process through
//! a private reply queue of the requester.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;

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

async fn request_amqp(
    broker: &AmqpBroker,
    mut request: Outgoing,
    timeout: Duration,
) -> Result<ReplyMessage, TransportError> {
    let channel = broker.channel().await?;
    let mut replies = channel
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
    let correlation_id = request
        .correlation_id
        .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
        .clone();
    request.reply_to = Some(DIRECT_REPLY_TO.to_string());
    channel
        .basic_publish(
            request.exchange.as_str().into(),
            request.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &request.payload,
            request.properties(),
        )
        .await
        .map_err(TransportError::amqp("basic.publish"))?;
    let wait = async {
        while let Some(delivery) = replies.next().await {
            let delivery = delivery.map_err(TransportError::amqp("basic.deliver reply"))?;
            let matches = delivery
                .properties
                .correlation_id()
                .as_ref()
                .is_some_and(|id| id.as_str() == correlation_id);
            if matches {
                return Ok(ReplyMessage {
                    kind: delivery
                        .properties
                        .kind()
                        .as_ref()
                        .map(|kind| kind.to_string()),
                    payload: delivery.data,
                });
            }
        }
        Err(TransportError::ConsumerClosed {
            queue: DIRECT_REPLY_TO.to_string(),
        })
    };
    let outcome = tokio::time::timeout(timeout, wait).await;
    let _ = channel.close(200, "bye".into()).await;
    outcome.map_err(|_| TransportError::Timeout {
        kind: request.kind.clone(),
        seconds: timeout.as_secs(),
    })?
}

/// Answers `to` (if it asked for a reply) with `reply`, keeping its correlation id.
pub async fn reply(
    broker: &Broker,
    to: &Incoming,
    mut reply: Outgoing,
) -> Result<(), TransportError> {
    let Some(reply_to) = &to.reply_to else {
        return Ok(());
    };
    reply.exchange = String::new();
    reply.routing_key = reply_to.clone();
    reply.correlation_id = to.correlation_id.clone();
    broker.publish(&reply).await
}
