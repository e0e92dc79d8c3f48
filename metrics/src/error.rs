//! What can go wrong with metrics: the endpoint's address, binding it, collecting.

/// A metrics failure, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The configured endpoint address is not `IP:PORT`.
    #[error(
        "`{address}` is not an address for the metrics endpoint: expected IP:PORT (for example 127.0.0.1:9464) or `off`"
    )]
    BadAddress {
        /// The address as given.
        address: String,
    },
    /// The endpoint's address could not be bound (in use, not local, no permission).
    #[error("cannot serve metrics on {address}: {error}")]
    Bind {
        /// The address as given.
        address: String,
        /// Why (in the message, not a source: printed once).
        error: std::io::Error,
    },
    /// The meter provider could not be read.
    #[error("collecting metrics failed: {0}")]
    Collect(String),
}
