//! Frames, split by direction (PROTOCOL.md §4). Borrowed fields (`&str`,
//! `&[u8]`) decode without copying out of the received buffer.

use bincode::{BorrowDecode, Decode, Encode};

use crate::{check_id, ErrorCode, ProtoError};

/// `instance-id/agent-id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, BorrowDecode)]
pub struct Address<'a> {
    /// The instance (one computer's agent host).
    pub instance: &'a str,
    /// The agent on that instance.
    pub agent: &'a str,
}

impl<'a> Address<'a> {
    /// Parse `instance/agent`, checking both ids.
    pub fn parse(text: &'a str) -> Result<Self, ProtoError> {
        let (instance, agent) = text
            .split_once('/')
            .ok_or_else(|| ProtoError::BadAddress(text.chars().take(140).collect()))?;
        let a = Address { instance, agent };
        a.check()
            .map_err(|_| ProtoError::BadAddress(text.chars().take(140).collect()))?;
        Ok(a)
    }

    /// Check both ids.
    pub fn check(&self) -> Result<(), ProtoError> {
        check_id(self.instance)?;
        check_id(self.agent)
    }
}

impl std::fmt::Display for Address<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.instance, self.agent)
    }
}

/// A delivery receipt: the receiving agent verified message `id` and handed
/// it to its application at `delivered_at_ms`. A duplicate of an already
/// delivered id is answered with the first receipt, unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, BorrowDecode)]
pub struct Receipt<'a> {
    /// The message id.
    pub id: [u8; 16],
    /// The receiving agent (checked by the relay against the stream's agent).
    pub from: Address<'a>,
    /// Receiver's clock, milliseconds since the Unix epoch.
    pub delivered_at_ms: u64,
}

/// One registered instance as reported by the relay.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct InstanceStatus {
    /// Instance id.
    pub instance_id: String,
    /// Human-readable name.
    pub name: String,
    /// Ed25519 public key.
    pub public_key: [u8; 32],
    /// At least one connection is open.
    pub online: bool,
    /// Agents attached for receiving, sorted.
    pub agents: Vec<String>,
}

/// Frames a peer sends to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Encode, BorrowDecode)]
pub enum PeerToRelay<'a> {
    /// 0 — control stream: register this connection's key under
    /// `instance_id`. `proof` = HMAC(fleet secret, RegisterProof domain ||
    /// TLS exporter || public key || instance id), PROTOCOL.md §5.3.
    Register {
        instance_id: &'a str,
        name: &'a str,
        proof: [u8; 32],
    },
    /// 1 — control stream: ask who is online.
    StatusRequest,
    /// 2 — first frame of an agent stream. `receive`: this stream takes the
    /// agent's deliveries (newest attach wins); otherwise it only sends.
    Attach { agent: &'a str, receive: bool },
    /// 3 — agent stream: an encoded [`crate::Envelope`], forwarded unchanged.
    Send { envelope: &'a [u8] },
    /// 4 — agent stream: receipt for a delivered message. `reply_token` is
    /// copied from the `Deliver` frame and routes the receipt back.
    Ack {
        reply_token: u64,
        receipt: Receipt<'a>,
    },
    /// 5 — agent stream: the receiver refused a delivered message.
    Nack {
        reply_token: u64,
        id: [u8; 16],
        code: ErrorCode,
    },
    /// 6 — agent stream: this agent stops receiving. The relay removes the
    /// stream's receiving route and answers `Detached` after every delivery
    /// already queued for it, so the peer can refuse those (`Nack`) instead
    /// of leaving their senders to time out (PROTOCOL.md §9.6).
    Detach,
    /// 7 — control stream: register this connection's key under
    /// `instance_id` with a single-use invite. `proof` = HMAC(invite secret,
    /// InviteProof domain || TLS exporter || public key || instance id),
    /// PROTOCOL.md §5.3. Answered with `FleetSecret` then `Registered`.
    RegisterInvite {
        instance_id: &'a str,
        name: &'a str,
        proof: [u8; 32],
    },
    /// 8 — control stream: ask for the page of the status that begins at
    /// instance `start` (PROTOCOL.md §9.2); answered `StatusPage`.
    StatusPageRequest { start: u32 },
}

/// Frames the relay sends to a peer.
#[derive(Debug, Clone, PartialEq, Eq, Encode, BorrowDecode)]
pub enum RelayToPeer<'a> {
    /// 0 — control stream: registration is durable.
    Registered { instance_id: &'a str },
    /// 1 — control stream: answer to `StatusRequest`. `you` is this
    /// connection's instance.
    Status {
        you: InstanceStatus,
        instances: Vec<InstanceStatus>,
    },
    /// 2 — agent stream: attach accepted.
    Attached {
        agent: &'a str,
        max_message_size: u32,
        timestamp_window_ms: u64,
    },
    /// 3 — agent stream: a message for this agent, with the sender's key as
    /// authenticated in its TLS handshake and a token to route the receipt.
    Deliver {
        reply_token: u64,
        sender_key: [u8; 32],
        envelope: &'a [u8],
    },
    /// 4 — agent stream: the receipt for a message this stream sent.
    Receipt { receipt: Receipt<'a> },
    /// 5 — agent stream: a message this stream sent was refused.
    Failed { id: [u8; 16], code: ErrorCode },
    /// 6 — any stream: a stream- or connection-level refusal; the relay
    /// closes the stream (or the connection) after it.
    Error { code: ErrorCode },
    /// 7 — agent stream: answer to `Detach`; no delivery follows it.
    Detached,
    /// 8 — the fleet secret, to registered instances only: on the control
    /// stream right before `Registered` for an invite (PROTOCOL.md §9.2),
    /// and alone on a relay-opened unidirectional stream at the start of
    /// every registered connection and after each rotation (§9.7).
    /// `previous_valid_until_ms`: until then (Unix ms) tags under the secret
    /// this one replaced are still accepted; 0 when there is none.
    FleetSecret {
        secret: [u8; 32],
        previous_valid_until_ms: u64,
    },
    /// 9 — control stream: answer to `StatusPageRequest`: `instances[start..
    /// start + instances.len()]` of the `total` in status snapshot
    /// `snapshot` (pages of one snapshot fit together; PROTOCOL.md §9.2).
    StatusPage {
        you: InstanceStatus,
        snapshot: u64,
        start: u32,
        total: u32,
        instances: Vec<InstanceStatus>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_parse() {
        let a = Address::parse("instance-001/healthguard").unwrap();
        assert_eq!(a.instance, "instance-001");
        assert_eq!(a.agent, "healthguard");
        assert_eq!(a.to_string(), "instance-001/healthguard");
        for bad in ["", "a", "a/", "/b", "a/b/c", "a b/c"] {
            assert!(Address::parse(bad).is_err(), "{bad:?}");
        }
    }
}
