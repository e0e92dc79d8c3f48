//! One connection to RabbitMQ with a confirming publish channel.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tracing::{debug, warn};

use crate::error::{TransportError, redact_url};
use crate::incoming::Subscription;
use crate::outgoing::Outgoing;

/// A connection to RabbitMQ and a channel in confirm mode for publishing.
#[derive(Debug)]
pub struct Broker {
    connection: Connection,
    publisher: Channel,
    url: String,
}

impl Broker {
    /// Connects once; the error names the URL (without its password).
    pub async fn connect(url: &str, name: &str) -> Result<Self, TransportError> {
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
        })
    }

    /// Connects with exponential backoff and jitter, giving up after `max_elapsed`.
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

    /// The broker URL, without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the connection is still usable.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    /// Opens a new channel (for consumers and requests).
    pub async fn channel(&self) -> Result<Channel, TransportError> {
        self.connection
            .create_channel()
            .await
            .map_err(TransportError::amqp("channel.open"))
    }

    /// The confirming publish channel (for topology declarations).
    pub fn publisher(&self) -> &Channel {
        &self.publisher
    }

    /// Publishes `message` and waits for the broker's confirm; a nack is an error.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), TransportError> {
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

    /// Consumes `queue` on a channel of its own with `prefetch` unacked deliveries at most.
    pub async fn subscribe(
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
        Ok(Subscription::new(channel, consumer, queue.to_string()))
    }

    /// Follows `exchange` through a private, server-named queue bound with `binding_keys`.
    /// The queue disappears with the subscription.
    pub async fn follow(
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
            .basic_qos(256, BasicQosOptions::default())
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
        Ok(Subscription::new(channel, consumer, name))
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Err(error) = self.connection.close(200, "bye".into()).await {
            debug!(%error, "closing rabbitmq connection");
        }
    }
}
