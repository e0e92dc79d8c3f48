//! The worker's errors: one enum, each variant with a short code and a retry verdict.

use koan_protocol::ProtocolError;
use koan_source::SourceError;
use koan_transport::TransportError;

/// Everything that can go wrong in the worker.
///
/// [`WorkerError::code`] is the short stable code carried by failure events
/// (`ChunkFailed`, `EntityFailed`, `FinalizeFailed`); [`WorkerError::is_retryable`]
/// decides between requeueing a job and failing it for good.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A configuration field is missing or out of range.
    #[error("invalid worker config field `{field}`: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The storage URL names a scheme this build cannot write to.
    #[error(
        "unsupported storage url scheme '{scheme}' in storage_url (use file:///absolute/path or a plain path)"
    )]
    UnsupportedStorage {
        /// The scheme found.
        scheme: String,
    },
    /// An archive storage operation failed.
    #[error("storage {operation} '{path}' failed: {source}")]
    Storage {
        /// What was being done (`put`, `list`, `delete`, `multipart upload`...).
        operation: &'static str,
        /// The storage path involved.
        path: String,
        /// The cause.
        source: object_store::Error,
    },
    /// The entity store (PostgreSQL) failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// RabbitMQ failed: the job cannot be reported, so it goes back to the queue.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A message, name or path broke the wire contract.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A row from the source cannot be turned into an archive line.
    #[error("row with key '{key}' cannot be archived: {reason}")]
    InvalidRow {
        /// The key, escaped and truncated for display.
        key: String,
        /// What is wrong with the row.
        reason: &'static str,
    },
    /// zstd compression failed.
    #[error("zstd compression failed: {0}")]
    Compress(#[source] std::io::Error),
    /// A finalize job's manifest does not match the archive.
    #[error("manifest rejected: {0}")]
    Manifest(String),
    /// A stored part cannot be read back: it does not decompress, ends
    /// mid-frame or holds a line longer than any document can be.
    #[error("part '{path}' is corrupt: {reason}")]
    CorruptPart {
        /// The part's storage path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The metrics endpoint could not start (its message names the address).
    #[error(transparent)]
    Metrics(#[from] koan_metrics::MetricsError),
}

impl WorkerError {
    /// A short stable code for failure events and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config { .. } => "config",
            Self::UnsupportedStorage { .. } => "unsupported_storage",
            Self::Storage { .. } => "storage",
            Self::Source(error) => error.code(),
            Self::Transport(_) => "transport",
            Self::Protocol(error) => error.code(),
            Self::InvalidRow { .. } => "invalid_row",
            Self::Compress(_) => "compress",
            Self::Manifest(_) => "manifest",
            Self::CorruptPart { .. } => "corrupt_part",
            Self::Metrics(_) => "metrics_endpoint",
        }
    }

    /// Whether running the same job again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage { source, .. } => !matches!(
                source,
                object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            Self::Source(error) => error.is_retryable(),
            Self::Transport(error) => error.is_retryable(),
            Self::Config { .. }
            | Self::UnsupportedStorage { .. }
            | Self::Protocol(_)
            | Self::InvalidRow { .. }
            | Self::Compress(_)
            | Self::Manifest(_)
            | Self::CorruptPart { .. }
            | Self::Metrics(_) => false,
        }
    }

    /// Whether this is storage saying the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::Storage {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }

    /// A storage error for `operation` on `path`.
    pub(crate) fn storage(
        operation: &'static str,
        path: impl Into<String>,
    ) -> impl FnOnce(object_store::Error) -> Self {
        let path = path.into();
        move |source| Self::Storage {
            operation,
            path,
            source,
        }
    }

    /// An invalid-row error naming the row's key (escaped, at most 200 characters).
    pub(crate) fn invalid_row(key: &[u8], reason: &'static str) -> Self {
        Self::InvalidRow {
            key: String::from_utf8_lossy(key)
                .escape_default()
                .take(200)
                .collect(),
            reason,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_verdicts() {
        let missing = WorkerError::storage("put", "a/b")(object_store::Error::NotFound {
            path: "a/b".into(),
            source: "gone".into(),
        });
        assert_eq!(missing.code(), "storage");
        assert!(missing.is_retryable());
        assert!(missing.to_string().contains("a/b"));
        assert!(missing.is_not_found());
        let row = WorkerError::invalid_row(b"k\n1", "key is not valid UTF-8");
        assert_eq!(row.code(), "invalid_row");
        assert!(!row.is_retryable());
        assert!(row.to_string().contains("k\\n1"), "{row}");
    }
}
