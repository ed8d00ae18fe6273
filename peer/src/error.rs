//! Errors of the peer library, as data a caller can match. The CLI maps each
//! once to its exit code ([`agent_link_proto::Exit`], DESIGN.md).

use std::path::PathBuf;

use agent_link_proto::{ErrorCode, Exit};

/// Why a link or an agent is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// [`crate::AgentLink::close`] was called, or the link was dropped.
    LinkClosed,
    /// This agent was closed (or its handle dropped) while the call waited.
    AgentClosed,
    /// The relay ended this agent for good with this code (`Replaced`,
    /// `Revoked`, `NotRegistered`, …).
    Stopped(ErrorCode),
    /// The connection to the relay was lost and `auto_reconnect` is off.
    ConnectionLost,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LinkClosed => f.write_str("the link was closed"),
            Self::AgentClosed => f.write_str("the agent was closed"),
            Self::Stopped(code) => write!(f, "the relay stopped this agent: {}", code.describe()),
            Self::ConnectionLost => {
                f.write_str("the connection to the relay was lost (auto_reconnect is off)")
            }
        }
    }
}

/// Why a `send` did not end in a receipt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The relay or the receiver refused the message, with the cause.
    #[error("{}", .0.describe())]
    Refused(ErrorCode),
    /// No outcome before the deadline (the message may or may not have been
    /// delivered).
    #[error("timed out waiting for a receipt (outcome unknown)")]
    Timeout,
    /// The payload is over the relay's limit.
    #[error("message of {len} bytes exceeds the relay's limit of {max} bytes")]
    TooLarge {
        /// Payload bytes.
        len: usize,
        /// The relay's `max_message_size`.
        max: usize,
    },
    /// The target is not `instance/agent`.
    #[error("{to:?} is not an address of the form INSTANCE/AGENT")]
    BadAddress {
        /// The target as given.
        to: String,
    },
    /// Too many messages are waiting for an outcome.
    #[error("outbox full ({waiting} messages waiting); slow down or wait for receipts")]
    OutboxFull {
        /// Messages waiting.
        waiting: usize,
    },
    /// The agent or link closed before an outcome.
    #[error("{0}")]
    Closed(CloseReason),
}

impl SendError {
    /// The CLI exit code for this outcome.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Refused(c) => Exit::from(*c),
            Self::Timeout => Exit::Timeout,
            Self::TooLarge { .. } | Self::BadAddress { .. } => Exit::Usage,
            Self::OutboxFull { .. } | Self::Closed(_) => Exit::Other,
        }
    }
}

/// What a link was doing when it ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Connecting to the relay.
    Connect,
    /// Attaching an agent.
    Attach,
    /// Asking the relay for its status.
    Status,
    /// Registering a new instance.
    Register,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connecting to the relay",
            Self::Attach => "attaching the agent",
            Self::Status => "the status request",
            Self::Register => "registration",
        })
    }
}

/// Errors setting up or using a link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The peer directory's config is missing or invalid.
    #[error("{}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The offending field, when one is to blame.
        field: Option<&'static str>,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A key or secret file is missing, unreadable, too open, or invalid;
    /// or the TLS identity could not be built from it.
    #[error(transparent)]
    Key(#[from] agent_link_crypto::CryptoError),
    /// The relay could not be reached.
    #[error(
        "cannot reach the relay at {addr}: {reason}; is `agent-link-relay run` running there?"
    )]
    Unreachable {
        /// The relay address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The relay answered, but its certificate is not the one this
    /// instance knows it by (the pin of the join token, or a CA chain for
    /// the host dialled): someone else may be answering there.
    #[error(
        "the relay at {addr} is not the one this instance knows: {reason}; a pinned relay \
         whose certificate changed needs a new invite; for a relay with a CA-issued \
         certificate, dial the name it is issued for and give its CA with `init --relay-ca-file`"
    )]
    UntrustedRelay {
        /// The relay address.
        addr: String,
        /// What TLS said.
        reason: String,
    },
    /// The relay refused us.
    #[error("{}", .0.describe())]
    Refused(ErrorCode),
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(Phase),
    /// Bad input (ids, join token).
    #[error("{what}: {reason}")]
    BadInput {
        /// Which input.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The link or the agent is closed.
    #[error("{0}")]
    Closed(CloseReason),
    /// The relay answered with something the protocol does not allow here
    /// (peer and relay versions may differ).
    #[error("unexpected answer from the relay to {0}")]
    Protocol(Phase),
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

impl LinkError {
    /// The CLI exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Config { .. } | Self::Key(_) | Self::BadInput { .. } => Exit::Usage,
            Self::Refused(c) => Exit::from(*c),
            Self::Timeout(_) => Exit::Timeout,
            _ => Exit::Other,
        }
    }

    pub(crate) fn config(path: PathBuf, field: Option<&'static str>, reason: String) -> Self {
        Self::Config {
            path,
            field,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(
            SendError::Refused(ErrorCode::TargetOffline).exit(),
            Exit::Offline
        );
        assert_eq!(
            SendError::Refused(ErrorCode::UnknownTarget).exit(),
            Exit::Offline
        );
        assert_eq!(SendError::Refused(ErrorCode::Revoked).exit(), Exit::Refused);
        assert_eq!(SendError::Refused(ErrorCode::Busy).exit(), Exit::Other);
        assert_eq!(SendError::Timeout.exit(), Exit::Timeout);
        assert_eq!(SendError::TooLarge { len: 2, max: 1 }.exit(), Exit::Usage);
        assert_eq!(
            LinkError::Refused(ErrorCode::InstanceIdTaken).exit(),
            Exit::Refused
        );
        assert_eq!(
            LinkError::BadInput {
                what: "--join",
                reason: "x".into()
            }
            .exit(),
            Exit::Usage
        );
        assert_eq!(LinkError::Timeout(Phase::Connect).exit(), Exit::Timeout);
    }
}
