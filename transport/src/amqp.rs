//! The RabbitMQ backend: one lapin connection with a confirming publish channel.

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};
use std::sync::Arc;
use tracing::debug;

use crate::error::{TransportError, redact_url};
use crate::incoming::Subscription;
use crate::outgoing::Outgoing;
use crate::rpc::Replies;
use crate::topology::{ExchangeKind, ExchangeSpec, QueueRole, QueueSpec};

/// Prefetch of the private queues of [`AmqpBroker::follow`].
pub(crate) const FOLLOW_PREFETCH: u16 = 256;

/// A connection to RabbitMQ, a channel in confirm mode for publishing, and
/// (from the first request) a channel for requests and their replies.
#[derive(Debug)]
pub(crate) struct AmqpBroker {
    connection: Connection,
    publisher: Channel,
    url: String,
    replies: tokio::sync::Mutex<Option<Arc<Replies>>>,
}

impl AmqpBroker {
    /// Connects once; the error names the URL (without its password).
    pub(crate) async fn connect(url: &str, name: &str) -> Result<Self, TransportError> {
        let redacted = redact_url(url);
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connection = Connection::connect(url, properties)
            .await
            .map_err(|source| TransportError::Unreachable {
                url: redacted.clone(),
                source,
            })?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(TransportError::amqp("channel.open"))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(TransportError::amqp("confirm.select"))?;
        debug!(url = %redacted, "connected to rabbitmq");
        Ok(Self {
            connection,
            publisher,
            url: redacted,
            replies: tokio::sync::Mutex::new(None),
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    /// The request channel, opened now if there is none open.
    pub(crate) async fn replies(&self) -> Result<Arc<Replies>, TransportError> {
        let mut replies = self.replies.lock().await;
        if let Some(open) = replies.as_ref().filter(|open| open.is_open()) {
            return Ok(Arc::clone(open));
        }
        let opened = Arc::new(Replies::open(self).await?);
        *replies = Some(Arc::clone(&opened));
        Ok(opened)
    }

    pub(crate) async fn channel(&self) -> Result<Channel, TransportError> {
        self.connection
            .create_channel()
            .await
            .map_err(TransportError::amqp("channel.open"))
    }

    pub(crate) async fn publish(&self, message: &Outgoing) -> Result<(), TransportError> {
        let confirm = self
            .publisher
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &message.payload,
                message.properties(),
            )
            .await
            .map_err(TransportError::amqp("basic.publish"))?
            .await
            .map_err(TransportError::amqp("publisher confirm"))?;
        if confirm.is_nack() {
            return Err(TransportError::Nacked {
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
            });
        }
        Ok(())
    }

    /// Publishes every message, then awaits their confirms together; the
    /// number confirmed (from the first, in order) and what stopped the rest.
    pub(crate) async fn publish_batch(
        &self,
        messages: &[Outgoing],
    ) -> (usize, Result<(), TransportError>) {
        let mut pending = Vec::with_capacity(messages.len());
        let mut stopped = None;
        for message in messages {
            let published = self
                .publisher
                .basic_publish(
                    message.exchange.as_str().into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.payload,
                    message.properties(),
                )
                .await;
            match published {
                Ok(confirm) => pending.push((message, confirm)),
                Err(source) => {
                    stopped = Some(TransportError::Amqp {
                        operation: "basic.publish",
                        source,
                    });
                    break;
                }
            }
        }
        let mut confirmed = 0;
        for (message, confirm) in pending {
            match confirm.await {
                Ok(confirm) if confirm.is_nack() => {
                    return (
                        confirmed,
                        Err(TransportError::Nacked {
                            exchange: message.exchange.clone(),
                            routing_key: message.routing_key.clone(),
                        }),
                    );
                }
                Ok(_) => confirmed += 1,
                Err(source) => {
                    return (
                        confirmed,
                        Err(TransportError::Amqp {
                            operation: "publisher confirm",
                            source,
                        }),
                    );
                }
            }
        }
        (confirmed, stopped.map_or(Ok(()), Err))
    }

    pub(crate) async fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Subscription, TransportError> {
        let channel = self.channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(TransportError::amqp("basic.qos"))?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(TransportError::amqp("basic.consume"))?;
        Ok(Subscription::amqp(channel, consumer, queue.to_string()))
    }

    pub(crate) async fn follow(
        &self,
        exchange: &str,
        binding_keys: &[String],
    ) -> Result<Subscription, TransportError> {
        let channel = self.channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(TransportError::amqp("queue.declare"))?;
        let name = queue.name().to_string();
        for key in binding_keys {
            channel
                .queue_bind(
                    name.as_str().into(),
                    exchange.into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(TransportError::amqp("queue.bind"))?;
        }
        channel
            .basic_qos(FOLLOW_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(TransportError::amqp("basic.qos"))?;
        let consumer = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(TransportError::amqp("basic.consume"))?;
        Ok(Subscription::amqp(channel, consumer, name))
    }

    pub(crate) async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), TransportError> {
        let kind = match spec.kind {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        };
        let mut arguments = FieldTable::default();
        if let Some(alternate) = &spec.alternate {
            arguments.insert("alternate-exchange".into(), string(alternate));
        }
        self.publisher
            .exchange_declare(
                spec.name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(TransportError::amqp("exchange.declare"))
    }

    pub(crate) async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), TransportError> {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), string("quorum"));
        if let QueueRole::Work {
            delivery_limit,
            dead_letter_exchange,
        } = &spec.role
        {
            arguments.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(*delivery_limit).unwrap_or(i32::MAX)),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                string(dead_letter_exchange),
            );
        }
        self.publisher
            .queue_declare(
                spec.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map(|_| ())
            .map_err(TransportError::amqp("queue.declare"))
    }

    pub(crate) async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), TransportError> {
        self.publisher
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(TransportError::amqp("queue.bind"))
    }

    pub(crate) async fn close(&self) {
        if let Some(replies) = self.replies.lock().await.take() {
            replies.close().await;
        }
        if let Err(error) = self.connection.close(200, "bye".into()).await {
            debug!(%error, "closing rabbitmq connection");
        }
    }
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}
