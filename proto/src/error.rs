//! Error codes on the wire and this crate's error type.

use bincode::{Decode, Encode};

/// Why something was refused. Sent in `Failed` and `Error` frames and used as
/// QUIC application close codes (PROTOCOL.md §6). Values are stable: new
/// codes are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 0: a frame could not be decoded, or was not allowed at this point.
    Malformed,
    /// 1: a frame or message is over the configured size limit.
    TooLarge,
    /// 2: the connection's key is not registered with this relay.
    NotRegistered,
    /// 3: the connection's key (or this instance) was revoked.
    Revoked,
    /// 4: the instance id is already registered to another key.
    InstanceIdTaken,
    /// 5: a registration proof did not verify (wrong fleet secret).
    BadProof,
    /// 6: the envelope's sender is not this connection's instance or this
    /// stream's agent.
    SenderMismatch,
    /// 7: the fleet HMAC tag did not verify.
    BadTag,
    /// 8: the Ed25519 signature did not verify.
    BadSignature,
    /// 9: the send timestamp is outside the allowed window.
    StaleTimestamp,
    /// 10: the target instance is registered but its agent is not attached.
    TargetOffline,
    /// 11: the target instance is not registered.
    UnknownTarget,
    /// 12: the target instance has been revoked.
    TargetRevoked,
    /// 13: the sender exceeded its message rate.
    RateLimited,
    /// 14: the target's queue is full (it is not reading fast enough).
    Busy,
    /// 15: a message arrived on a stream with no agent attached.
    NotAttached,
    /// 16: too many agents or streams on this connection.
    TooManyStreams,
    /// 17: this agent attached again elsewhere; the newest attach wins.
    Replaced,
    /// 18: a known sender presented a different public key than the pinned one.
    KeyChanged,
    /// 19: an id or address is not valid (see PROTOCOL.md §3.1).
    BadAddress,
    /// 20: the relay is shutting down.
    ShuttingDown,
    /// 21: the registration or first frame did not arrive in time.
    AuthTimeout,
    /// 22: an unexpected failure on the relay.
    Internal,
    /// 23: the instance has too many connections.
    TooManyConnections,
    /// 24: registration with the fleet secret is off at this relay (it
    /// takes invites only), or over its registrations-per-second cap.
    RegistrationClosed,
    /// 25: no usable invite: none for this id, already used, expired, or
    /// the proof does not match the invite's secret.
    InviteInvalid,
    /// 26: the target agent's inbox at its daemon is full (count or bytes),
    /// or its disk is; nothing stored was touched. Try later.
    InboxFull,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 27] = [
        Self::Malformed,
        Self::TooLarge,
        Self::NotRegistered,
        Self::Revoked,
        Self::InstanceIdTaken,
        Self::BadProof,
        Self::SenderMismatch,
        Self::BadTag,
        Self::BadSignature,
        Self::StaleTimestamp,
        Self::TargetOffline,
        Self::UnknownTarget,
        Self::TargetRevoked,
        Self::RateLimited,
        Self::Busy,
        Self::NotAttached,
        Self::TooManyStreams,
        Self::Replaced,
        Self::KeyChanged,
        Self::BadAddress,
        Self::ShuttingDown,
        Self::AuthTimeout,
        Self::Internal,
        Self::TooManyConnections,
        Self::RegistrationClosed,
        Self::InviteInvalid,
        Self::InboxFull,
    ];

    /// The numeric value (also the QUIC application close code).
    pub fn as_u32(self) -> u32 {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(22) as u32
    }

    /// The code for a numeric value, if known.
    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }

    /// One line for people: what happened and what to do next.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Malformed => "malformed frame (peer and relay versions may differ)",
            Self::TooLarge => "message too large for this relay (see max_message_size)",
            Self::NotRegistered => "this instance's key is not registered with the relay; run `agent-link init` or ask the operator to `agent-link-relay register` it",
            Self::Revoked => "this instance has been revoked by the relay operator",
            Self::InstanceIdTaken => "instance id already registered to another key; choose another --instance-id",
            Self::BadProof => "registration refused: the join token's fleet secret is wrong; ask the operator for a fresh `agent-link-relay invite`",
            Self::SenderMismatch => "sender address does not match this connection's instance and agent",
            Self::BadTag => "fleet tag does not verify (wrong fleet secret?)",
            Self::BadSignature => "Ed25519 signature does not verify",
            Self::StaleTimestamp => "timestamp outside the relay's window; check this computer's clock",
            Self::TargetOffline => "target agent is not connected; try again when it is listening",
            Self::UnknownTarget => "target instance is not registered with this relay; check the address",
            Self::TargetRevoked => "target instance has been revoked",
            Self::RateLimited => "rate limit exceeded; slow down and retry",
            Self::Busy => "target is not keeping up (its queue is full); retry later",
            Self::NotAttached => "no agent attached on this stream",
            Self::TooManyStreams => "too many agents or streams on this connection",
            Self::Replaced => "this agent attached again elsewhere; the newest attach wins",
            Self::KeyChanged => "the receiver has another key pinned for the sender (possible impersonation), or, with strict pins, none yet; its operator can pin the sender's key with `agent-link trust INSTANCE KEY`",
            Self::BadAddress => "invalid instance or agent id",
            Self::ShuttingDown => "relay is shutting down; the peer will reconnect",
            Self::AuthTimeout => "did not authenticate in time",
            Self::Internal => "internal relay error",
            Self::TooManyConnections => "too many connections for this instance",
            Self::RegistrationClosed => {
                "this relay takes invites only: ask its operator for `agent-link-relay invite --instance-id ID`"
            }
            Self::InviteInvalid => {
                "the invite is unknown, used, expired or for another id: ask the relay's operator for a new one"
            }
            Self::InboxFull => {
                "the target agent's inbox is full (it has not read its messages); try later"
            }
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Errors from encoding, decoding and checking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame header declared zero bytes.
    #[error("empty frame")]
    EmptyFrame,
    /// A frame header declared more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: usize },
    /// The body did not decode (unknown variant, bad UTF-8, truncated, …).
    #[error("malformed frame: {0}")]
    Decode(String),
    /// The body decoded but bytes were left over.
    #[error("malformed frame: {extra} trailing bytes")]
    TrailingBytes { extra: usize },
    /// Encoding failed (only for values over the hard limit).
    #[error("encoding failed: {0}")]
    Encode(String),
    /// An id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid id {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ - (but not . or ..)")]
    BadId(String),
    /// An address is not `instance/agent`.
    #[error("invalid address {0:?}: expected INSTANCE/AGENT")]
    BadAddress(String),
    /// The envelope's protocol version is not one this build speaks.
    #[error("unsupported envelope version {0}")]
    Version(u8),
    /// A check refused the envelope.
    #[error("{0}")]
    Refused(ErrorCode),
    /// The stream ended in the middle of a frame: `have` bytes of it
    /// (header included) arrived out of the `need` it takes (just the
    /// header's 4 when the header itself is cut). The sender stopped or was
    /// cut off mid-write; the bytes that did arrive are not a frame.
    #[error("stream ended mid-frame: {have} of {need} bytes arrived (the sender stopped or was cut off mid-write)")]
    Truncated { have: usize, need: usize },
    /// A join token is malformed.
    #[error("malformed join token: {0}; copy the whole line printed by `agent-link-relay invite`")]
    BadJoinToken(&'static str),
}

impl ProtoError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::FrameTooLarge { .. } => ErrorCode::TooLarge,
            Self::BadId(_) | Self::BadAddress(_) => ErrorCode::BadAddress,
            Self::Refused(c) => *c,
            _ => ErrorCode::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_wire_order() {
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.as_u32(), i as u32);
            assert_eq!(ErrorCode::from_u32(i as u32), Some(*c));
            let body = crate::codec::encode_body(c).unwrap();
            assert_eq!(body, vec![i as u8], "bincode encodes the variant index");
        }
        assert_eq!(ErrorCode::from_u32(ErrorCode::ALL.len() as u32), None);
    }
}
