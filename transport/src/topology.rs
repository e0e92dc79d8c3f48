//! Declares the exchanges and queues of `koan_protocol::topology`.
//!
//! Declarations are idempotent; every service declares what it uses at start
//! and after reconnecting, so the order services start in does not matter.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use koan_protocol::topology::{
    COMMAND_ROUTING_KEYS, COMMANDS_EXCHANGE, COMMANDS_QUEUE, CONTROL_DELIVERY_LIMIT,
    COORDINATOR_DEAD_QUEUE, COORDINATOR_QUEUE, DEAD_EXCHANGE, DEAD_QUEUE, EVENTS_EXCHANGE,
    JOB_DELIVERY_LIMIT, JOBS_EXCHANGE, WORKER_EVENTS_BINDING, pool_queue,
};

use crate::error::TransportError;

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn quorum(delivery_limit: u32) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(delivery_limit).unwrap_or(i32::MAX)),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_EXCHANGE)),
    );
    arguments
}

async fn queue(channel: &Channel, name: &str, arguments: FieldTable) -> Result<(), TransportError> {
    channel
        .queue_declare(
            name.into(),
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

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), TransportError> {
    channel
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

/// Exchanges and the dead-letter queue: what every participant needs.
pub async fn declare_exchanges(channel: &Channel) -> Result<(), TransportError> {
    channel
        .exchange_declare(
            DEAD_EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable(),
            FieldTable::default(),
        )
        .await
        .map_err(TransportError::amqp("exchange.declare"))?;
    let mut dead_arguments = FieldTable::default();
    dead_arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    queue(channel, DEAD_QUEUE, dead_arguments).await?;
    bind(channel, DEAD_QUEUE, DEAD_EXCHANGE, "").await?;

    let mut commands_arguments = FieldTable::default();
    commands_arguments.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_EXCHANGE)),
    );
    channel
        .exchange_declare(
            COMMANDS_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable(),
            commands_arguments,
        )
        .await
        .map_err(TransportError::amqp("exchange.declare"))?;
    channel
        .exchange_declare(
            JOBS_EXCHANGE.into(),
            ExchangeKind::Direct,
            durable(),
            FieldTable::default(),
        )
        .await
        .map_err(TransportError::amqp("exchange.declare"))?;
    channel
        .exchange_declare(
            EVENTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable(),
            FieldTable::default(),
        )
        .await
        .map_err(TransportError::amqp("exchange.declare"))
}

/// The coordinator's queues: commands and worker reports.
pub async fn declare_coordinator(channel: &Channel) -> Result<(), TransportError> {
    declare_exchanges(channel).await?;
    queue(channel, COMMANDS_QUEUE, quorum(CONTROL_DELIVERY_LIMIT)).await?;
    for key in COMMAND_ROUTING_KEYS {
        bind(channel, COMMANDS_QUEUE, COMMANDS_EXCHANGE, key).await?;
    }
    queue(channel, COORDINATOR_QUEUE, quorum(CONTROL_DELIVERY_LIMIT)).await?;
    bind(
        channel,
        COORDINATOR_QUEUE,
        EVENTS_EXCHANGE,
        WORKER_EVENTS_BINDING,
    )
    .await?;
    // No dead-letter exchange here: a message dead-lettered once is never
    // dead-lettered again (it stays in `koan.dead` for people to read).
    let mut dead_arguments = FieldTable::default();
    dead_arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    queue(channel, COORDINATOR_DEAD_QUEUE, dead_arguments).await?;
    bind(channel, COORDINATOR_DEAD_QUEUE, DEAD_EXCHANGE, "").await
}

/// The job queue of one worker pool.
pub async fn declare_pool(channel: &Channel, pool: &str) -> Result<(), TransportError> {
    let name = pool_queue(pool);
    queue(channel, &name, quorum(JOB_DELIVERY_LIMIT)).await?;
    bind(channel, &name, JOBS_EXCHANGE, pool).await
}
