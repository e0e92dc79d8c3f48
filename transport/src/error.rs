//! Transport errors.

use crate::memory::MemoryError;

/// What can go wrong talking to RabbitMQ or to the in-process broker.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The broker could not be reached or the connection dropped.
    #[error(
        "rabbitmq at {url} is unreachable: {source} (start it with `rabbitmq-server -detached`)"
    )]
    Unreachable {
        /// The URL tried, without credentials.
        url: String,
        /// The cause.
        source: lapin::Error,
    },
    /// An AMQP operation failed.
    #[error("amqp {operation} failed: {source}")]
    Amqp {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        source: lapin::Error,
    },
    /// The broker refused a published message (publisher-confirm nack).
    #[error("rabbitmq refused the message to {exchange}/{routing_key}")]
    Nacked {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// A request got no reply in time.
    #[error("no reply to {kind} within {seconds} s")]
    Timeout {
        /// Request kind.
        kind: String,
        /// Seconds waited.
        seconds: u64,
    },
    /// The consumer's stream ended (channel or connection closed).
    #[error("consumer on {queue} closed")]
    ConsumerClosed {
        /// Queue.
        queue: String,
    },
    /// An operation of the in-process broker failed.
    #[error("in-process broker {broker}: {source}")]
    InProcess {
        /// The in-process broker's name.
        broker: String,
        /// What failed.
        source: MemoryError,
    },
    /// A `memory://` URL names no in-process broker of this process.
    #[error(
        "no in-process broker at {url}: memory:// URLs work only inside the process running the embedded mode"
    )]
    NoInProcessBroker {
        /// The URL given.
        url: String,
    },
    /// An operation that only an AMQP connection offers was asked of an in-process broker.
    #[error("{operation} needs a RabbitMQ connection; {url} is an in-process broker")]
    AmqpOnly {
        /// What was asked.
        operation: &'static str,
        /// The in-process broker's URL.
        url: String,
    },
}

impl TransportError {
    /// Wraps a lapin error from `operation`.
    pub fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> Self {
        move |source| Self::Amqp { operation, source }
    }

    /// Whether trying again (after reconnecting) can help. Every transport
    /// failure is transient from the caller's point of view.
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// Removes the password from an AMQP URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact_url("amqp://guest:s3cret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
