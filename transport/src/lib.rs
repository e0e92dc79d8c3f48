//! AMQP transport for koan-backup, over RabbitMQ with lapin.
//!
//! # Layout
//! - [`broker`]: [`Broker`], one connection with a confirming publish channel;
//!   connecting with exponential backoff and jitter.
//! - [`topology`]: declares the exchanges and queues named in `koan_protocol::topology`.
//! - [`outgoing`]: [`Outgoing`], a message ready to publish (properties and headers).
//! - [`incoming`]: [`Incoming`], a delivery with its ack, requeue and dead-letter decisions.
//! - [`rpc`]: request/reply over RabbitMQ's direct reply-to.
//!
//! Publishing always waits for the broker's confirm; a nack is an error.
//! Deliveries are acked by the caller only after its work is durable.

pub mod broker;
pub mod error;
pub mod incoming;
pub mod outgoing;
pub mod rpc;
pub mod topology;

pub use broker::Broker;
pub use error::TransportError;
pub use incoming::{Incoming, Subscription};
pub use outgoing::Outgoing;
