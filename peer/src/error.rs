//! Errors of the peer library, each mapped once to the CLI's exit codes
//! (DESIGN.md): 1 other · 2 bad usage or input · 3 target offline or unknown ·
//! 4 refused · 5 timed out.

use agent_link_proto::ErrorCode;

/// Exit code for a wire error code.
pub fn exit_code_of(code: ErrorCode) -> u8 {
    use ErrorCode::*;
    match code {
        TargetOffline | UnknownTarget | TargetRevoked => 3,
        NotRegistered | Revoked | InstanceIdTaken | BadProof | BadTag | BadSignature
        | SenderMismatch | KeyChanged => 4,
        TooLarge | BadAddress => 2,
        _ => 1,
    }
}

/// Why a `send` did not end in a receipt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The relay or the receiver refused the message, with the cause.
    #[error("{0}")]
    Refused(ErrorCode),
    /// No outcome before the deadline (the message may or may not have been
    /// delivered).
    #[error("timed out waiting for a receipt (outcome unknown)")]
    Timeout,
    /// The payload is over the relay's limit.
    #[error("message of {len} bytes exceeds the relay's limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The target is not `instance/agent`.
    #[error("{0}")]
    BadAddress(String),
    /// Too many messages are waiting for an outcome.
    #[error("outbox full ({0} messages waiting); slow down or wait for receipts")]
    OutboxFull(usize),
    /// The link was closed (or this agent was replaced by a newer attach).
    #[error("link closed: {0}")]
    Closed(String),
}

impl SendError {
    /// The CLI exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused(c) => exit_code_of(*c),
            Self::Timeout => 5,
            Self::TooLarge { .. } | Self::BadAddress(_) => 2,
            Self::OutboxFull(_) | Self::Closed(_) => 1,
        }
    }
}

/// Errors setting up or using a link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Configuration or key files are missing or invalid (the message names
    /// the file and field).
    #[error("{0}")]
    Config(String),
    /// The relay could not be reached.
    #[error(
        "cannot reach the relay at {addr}: {reason}; is `agent-link-relay run` running there?"
    )]
    Unreachable { addr: String, reason: String },
    /// The relay refused us.
    #[error("{0}")]
    Refused(ErrorCode),
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Bad input (ids, join token).
    #[error("{0}")]
    BadInput(String),
    /// The link is closed.
    #[error("link closed")]
    Closed,
    /// Anything else (I/O, TLS).
    #[error("{0}")]
    Other(String),
}

impl LinkError {
    /// The CLI exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::BadInput(_) => 2,
            Self::Refused(c) => exit_code_of(*c),
            Self::Timeout(_) => 5,
            _ => 1,
        }
    }
}

impl From<agent_link_crypto::CryptoError> for LinkError {
    fn from(e: agent_link_crypto::CryptoError) -> Self {
        Self::Config(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(SendError::Refused(ErrorCode::TargetOffline).exit_code(), 3);
        assert_eq!(SendError::Refused(ErrorCode::UnknownTarget).exit_code(), 3);
        assert_eq!(SendError::Refused(ErrorCode::Revoked).exit_code(), 4);
        assert_eq!(SendError::Refused(ErrorCode::BadSignature).exit_code(), 4);
        assert_eq!(SendError::Refused(ErrorCode::Busy).exit_code(), 1);
        assert_eq!(SendError::Timeout.exit_code(), 5);
        assert_eq!(SendError::TooLarge { len: 2, max: 1 }.exit_code(), 2);
        assert_eq!(
            LinkError::Refused(ErrorCode::InstanceIdTaken).exit_code(),
            4
        );
        assert_eq!(LinkError::BadInput("x".into()).exit_code(), 2);
        for c in ErrorCode::ALL {
            assert!((1..=4).contains(&exit_code_of(c)));
        }
    }
}
