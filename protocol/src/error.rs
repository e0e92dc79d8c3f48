//! Errors of the wire contract: decoding, validation and tokens.

/// Everything that can be wrong with a message, a plan, a name or a token.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The envelope names a protocol version this build does not speak.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version found in the envelope.
        found: u32,
        /// Version this build speaks.
        supported: u32,
    },
    /// The envelope names a kind that does not belong on this channel.
    #[error("unknown {family} kind '{kind}'")]
    UnknownKind {
        /// Message family (`command`, `job`, `event`, ...).
        family: &'static str,
        /// The kind found.
        kind: String,
    },
    /// The bytes are not a valid message (bad msgpack, missing or unknown field, wrong type).
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: String,
        /// Why it failed, from the decoder.
        reason: String,
    },
    /// The message is larger than the channel accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the message.
        size: usize,
        /// Accepted maximum.
        limit: usize,
    },
    /// A name (entity, plan, bucket, scope, table, column, pool) is not acceptable.
    #[error("invalid {field} '{value}': {reason}")]
    InvalidName {
        /// Which field held the name.
        field: String,
        /// The offending value (escaped for display).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A plan is structurally invalid.
    #[error("invalid plan '{plan_id}': {reason}")]
    InvalidPlan {
        /// The plan id, as given.
        plan_id: String,
        /// What is wrong.
        reason: String,
    },
    /// A continuation token was modified, truncated or issued by another deployment.
    #[error("invalid continuation token: {0}")]
    InvalidToken(&'static str),
}

impl ProtocolError {
    /// Malformed-message error for `what` with the decoder's reason.
    pub fn malformed(what: impl Into<String>, reason: impl ToString) -> Self {
        Self::Malformed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// A short stable code for logs, dead-letter headers and replies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::UnknownKind { .. } => "unknown_kind",
            Self::Malformed { .. } => "malformed",
            Self::TooLarge { .. } => "too_large",
            Self::InvalidName { .. } => "invalid_name",
            Self::InvalidPlan { .. } => "invalid_plan",
            Self::InvalidToken(_) => "invalid_token",
        }
    }
}
