//! Message transport for koan-backup: RabbitMQ over lapin, or an in-process
//! broker for running everything in one process, behind one interface.
//!
//! # Layout
//! - [`broker`]: [`Broker`], a participant's connection: RabbitMQ (connecting
//!   with exponential backoff and jitter) or the in-process broker.
//! - [`topology`]: declares the exchanges and queues named in `koan_protocol::topology`.
//! - [`outgoing`]: [`Outgoing`], a message ready to publish (properties and headers).
//! - [`incoming`]: [`Incoming`], a delivery with its ack, requeue and dead-letter decisions.
//! - [`rpc`]: request/reply over RabbitMQ's direct reply-to (in process: a private reply queue).
//! - [`memory`]: the in-process broker, [`MemoryBroker`].
//!
//! Publishing always waits for the broker's confirm; a nack is an error.
//! Every message carries the W3C trace context (`traceparent`, `tracestate`
//! headers) of the span publishing it, unless it names one itself
//! ([`Outgoing::trace`]); [`Incoming::trace_context`] reads it back. Without
//! trace export there is no context and no such header.
//! Deliveries are acked by the caller only after its work is durable.
//!
//! # The in-process broker
//! [`MemoryBroker`] keeps RabbitMQ's semantics that koan-backup relies on:
//! direct, topic and fanout exchanges with alternate exchanges; work queues
//! with a delivery limit and dead-lettering; consumers with prefetch, ack,
//! requeue and redelivery (`redelivered`, `x-delivery-count`) of what a
//! closed or dropped subscription left unacked; private queues for
//! [`Broker::follow`]; confirms once a message is in its queues; request/reply.
//! Unlike RabbitMQ nothing survives the process, and queues are bounded:
//! publishing to a full work queue waits (backpressure), a full dead-letter
//! or private queue drops its oldest message. `transport/design.md` has the details.

mod amqp;
pub mod broker;
pub mod error;
pub mod incoming;
pub mod memory;
pub mod outgoing;
pub mod rpc;
pub mod topology;

pub use broker::{Broker, MEMORY_SCHEME};
pub use error::TransportError;
pub use incoming::{Incoming, Subscription};
pub use memory::{MemoryBroker, QueueStats};
pub use outgoing::Outgoing;
