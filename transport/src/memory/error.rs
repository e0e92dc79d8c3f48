//! What the in-process broker refuses.

/// Why the in-process broker refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// A message was published to, a queue bound to or a queue followed
    /// through an exchange nobody declared (RabbitMQ: `404 NOT_FOUND`).
    #[error("no exchange {exchange}")]
    NoExchange {
        /// Exchange.
        exchange: String,
    },
    /// A queue nobody declared was consumed or bound (RabbitMQ: `404 NOT_FOUND`).
    #[error("no queue {queue}")]
    NoQueue {
        /// Queue.
        queue: String,
    },
    /// An exchange or queue was declared again with other arguments
    /// (RabbitMQ: `406 PRECONDITION_FAILED`).
    #[error("{what} {name} exists as {existing}, not as {declared}")]
    Mismatch {
        /// `exchange` or `queue`.
        what: &'static str,
        /// Its name.
        name: String,
        /// How it was declared first.
        existing: String,
        /// How it was declared again.
        declared: String,
    },
    /// The default exchange (`""`) cannot be declared or bound
    /// (RabbitMQ: `403 ACCESS_REFUSED`).
    #[error("the default exchange cannot be declared or bound")]
    DefaultExchange,
    /// The connection was closed ([`crate::Broker::close`]).
    #[error("connection {connection} is closed")]
    Closed {
        /// The connection's name.
        connection: String,
    },
    /// A delivery was acked or requeued twice, or after its subscription
    /// closed (RabbitMQ: `406 PRECONDITION_FAILED`, unknown delivery tag).
    #[error(
        "delivery {tag} from {queue} is not pending: already settled, or its subscription closed"
    )]
    NotPending {
        /// Queue it came from.
        queue: String,
        /// Delivery tag.
        tag: u64,
    },
}
