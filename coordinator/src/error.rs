//! The coordinator's errors, each with a short stable code and a retry decision.

use std::path::PathBuf;

use koan_protocol::ProtocolError;
use koan_transport::TransportError;

/// A boxed error from a backend (the state store's driver, a source adapter).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A configuration field is missing or wrong.
    #[error("invalid config field `{field}`: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A plan file could not be read or parsed.
    #[error("plan file {path}: {reason}")]
    PlanFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Two plans share one id.
    #[error("plan '{plan_id}' is defined twice ({first} and {second})")]
    DuplicatePlan {
        /// The plan id.
        plan_id: String,
        /// Where it was first defined.
        first: String,
        /// Where it was defined again.
        second: String,
    },
    /// The state store could not be reached.
    #[error("state store {what} is unreachable: {source}")]
    StoreUnreachable {
        /// What was tried (backend and address, without credentials).
        what: String,
        /// The cause.
        source: BoxError,
    },
    /// A state store operation failed.
    #[error("state store {operation} failed: {source}")]
    Store {
        /// What was being done.
        operation: &'static str,
        /// Whether trying again can help (connection lost, serialization failure).
        retryable: bool,
        /// The cause.
        source: BoxError,
    },
    /// The state store holds something this build cannot read.
    #[error("state store holds unreadable {what}: {reason}")]
    CorruptState {
        /// What was being read.
        what: String,
        /// Why it could not be read.
        reason: String,
    },
    /// A worker report breaks the protocol's invariants (unknown entity, bad part path...).
    #[error("invalid worker report: {0}")]
    InvalidReport(String),
    /// The entity source refused or could not check a plan.
    #[error("source check of entity '{entity}' failed: {message}")]
    Source {
        /// Entity being checked.
        entity: String,
        /// The source's stable code.
        code: &'static str,
        /// What the source said (names the table or column).
        message: String,
        /// Whether trying again can help.
        retryable: bool,
    },
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The metrics endpoint could not start (its message names the address).
    #[error(transparent)]
    Metrics(#[from] koan_metrics::MetricsError),
}

impl CoordinatorError {
    /// A short stable code for logs, dead-letter reasons and replies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Config { .. } => "invalid_config",
            Self::PlanFile { .. } => "invalid_plan_file",
            Self::DuplicatePlan { .. } => "duplicate_plan",
            Self::StoreUnreachable { .. } => "store_unreachable",
            Self::Store { .. } => "store_failed",
            Self::CorruptState { .. } => "corrupt_state",
            Self::InvalidReport(_) => "invalid_report",
            Self::Source { code, .. } => code,
            Self::Protocol(error) => error.code(),
            Self::Transport(_) => "transport",
            Self::Metrics(_) => "metrics_endpoint",
        }
    }

    /// Whether trying again (later, or after reconnecting) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::StoreUnreachable { .. } | Self::Transport(_) => true,
            Self::Store { retryable, .. } | Self::Source { retryable, .. } => *retryable,
            Self::Config { .. }
            | Self::PlanFile { .. }
            | Self::DuplicatePlan { .. }
            | Self::CorruptState { .. }
            | Self::InvalidReport(_)
            | Self::Protocol(_)
            | Self::Metrics(_) => false,
        }
    }

    /// Whether the error is the broker's (the session must reconnect).
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Transport(_))
    }

    /// A configuration error on `field`.
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            field,
            reason: reason.into(),
        }
    }

    /// Unreadable state for `what`.
    pub fn corrupt(what: impl Into<String>, reason: impl ToString) -> Self {
        Self::CorruptState {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_retry_decisions() {
        let config = CoordinatorError::config("schema", "must not be empty");
        assert_eq!(config.code(), "invalid_config");
        assert_eq!(
            config.to_string(),
            "invalid config field `schema`: must not be empty"
        );
        assert!(!config.is_retryable());
        let store = CoordinatorError::Store {
            operation: "commit",
            retryable: true,
            source: "connection reset".into(),
        };
        assert!(store.is_retryable());
        let source = CoordinatorError::Source {
            entity: "orders".into(),
            code: "missing_table",
            message: "table public.\"Order\" does not exist".into(),
            retryable: false,
        };
        assert_eq!(source.code(), "missing_table");
        assert!(source.to_string().contains("orders"));
        assert!(!source.is_retryable());
    }
}
