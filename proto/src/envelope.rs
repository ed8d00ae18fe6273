//! The message envelope (PROTOCOL.md §3): what a sender signs and tags, what
//! the relay checks and forwards unchanged, what a receiver verifies.
//!
//! ```text
//! Envelope     = body: bytes, tag: [u8; 32], signature: [u8; 64]
//! EnvelopeBody = version: u8, id: [u8; 16], from: Address, to: Address,
//!                sent_at_ms: u64, payload: bytes
//! tag          = HMAC-SHA256(fleet secret, "agent-link/1 envelope tag\0" || body)
//! signature    = Ed25519(sender key, "agent-link/1 envelope signature\0" || body)
//! ```
//! Both cover the body bytes exactly as received. The recipient is inside the
//! signed body, so a message cannot be redirected to another agent.

use agent_link_crypto::{
    verify, verify_checked, CheckedKey, Domain, FleetKey, FleetKeys, Identity, PublicKey, Signature,
};
use bincode::{BorrowDecode, Encode};

use crate::frames::Address;
use crate::{codec, ErrorCode, ProtoError, VERSION};

/// A random 128-bit message id.
pub type MessageId = [u8; 16];

/// The outer envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, BorrowDecode)]
pub struct Envelope<'a> {
    /// The encoded [`EnvelopeBody`]; tag and signature cover exactly these bytes.
    pub body: &'a [u8],
    /// Fleet HMAC tag.
    pub tag: [u8; 32],
    /// Sender's Ed25519 signature.
    pub signature: [u8; 64],
}

/// The signed content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, BorrowDecode)]
pub struct EnvelopeBody<'a> {
    /// [`VERSION`].
    pub version: u8,
    /// Random message id; receivers drop repeats.
    pub id: MessageId,
    /// Sending agent.
    pub from: Address<'a>,
    /// Receiving agent.
    pub to: Address<'a>,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// Application bytes (opaque to the relay; never logged).
    pub payload: &'a [u8],
}

impl<'a> EnvelopeBody<'a> {
    /// Encode, sign and tag: the bytes of a complete [`Envelope`].
    pub fn seal(&self, identity: &Identity, fleet: &FleetKey) -> Result<Vec<u8>, ProtoError> {
        let body = codec::encode_body(self)?;
        let tag = fleet.tag(Domain::EnvelopeTag, &[&body]);
        let signature = identity.sign(Domain::EnvelopeSignature, &body).0;
        codec::encode_body(&Envelope {
            body: &body,
            tag,
            signature,
        })
    }
}

/// A decoded envelope: the outer layer and its body, both borrowing the
/// received bytes.
#[derive(Debug, Clone, Copy)]
pub struct OpenedEnvelope<'a> {
    /// The whole envelope exactly as received (what the relay forwards).
    pub bytes: &'a [u8],
    /// Outer layer (body bytes, tag, signature).
    pub outer: Envelope<'a>,
    /// Decoded body.
    pub body: EnvelopeBody<'a>,
}

impl<'a> OpenedEnvelope<'a> {
    /// Decode both layers and check the version and both addresses. No
    /// cryptography yet: callers choose which checks to run.
    pub fn open(bytes: &'a [u8]) -> Result<Self, ProtoError> {
        let outer: Envelope<'a> = codec::decode(bytes)?;
        let body: EnvelopeBody<'a> = codec::decode(outer.body)?;
        if body.version != VERSION {
            return Err(ProtoError::Version(body.version));
        }
        body.from.check()?;
        body.to.check()?;
        Ok(Self { bytes, outer, body })
    }

    /// Fleet membership: the HMAC tag over the body bytes, constant time.
    pub fn check_tag(&self, fleet: &FleetKey) -> Result<(), ErrorCode> {
        fleet
            .check(Domain::EnvelopeTag, &[self.outer.body], &self.outer.tag)
            .map_err(|_| ErrorCode::BadTag)
    }

    /// Fleet membership under the keys in force at `now_ms`: the current
    /// key, or during a rotation's grace period the one it replaced.
    pub fn check_tag_in(&self, fleet: &FleetKeys, now_ms: u64) -> Result<(), ErrorCode> {
        fleet
            .check(
                Domain::EnvelopeTag,
                &[self.outer.body],
                &self.outer.tag,
                now_ms,
            )
            .map_err(|_| ErrorCode::BadTag)
    }

    /// Authorship: strict Ed25519 over the body bytes under `sender`.
    pub fn check_signature(&self, sender: &PublicKey) -> Result<(), ErrorCode> {
        verify(
            sender,
            Domain::EnvelopeSignature,
            self.outer.body,
            &Signature(self.outer.signature),
        )
        .map_err(|_| ErrorCode::BadSignature)
    }

    /// [`OpenedEnvelope::check_signature`] under a key decoded once for
    /// many messages: the same strict verification.
    pub fn check_signature_checked(&self, sender: &CheckedKey) -> Result<(), ErrorCode> {
        verify_checked(
            sender,
            Domain::EnvelopeSignature,
            self.outer.body,
            &Signature(self.outer.signature),
        )
        .map_err(|_| ErrorCode::BadSignature)
    }

    /// Replay bound: `sent_at_ms` within `window_ms` of `now_ms`, either side.
    pub fn check_time(&self, now_ms: u64, window_ms: u64) -> Result<(), ErrorCode> {
        if now_ms.abs_diff(self.body.sent_at_ms) <= window_ms {
            Ok(())
        } else {
            Err(ErrorCode::StaleTimestamp)
        }
    }

    /// Sender binding: the envelope's `from` is the connection's instance and
    /// the stream's agent, so one member cannot speak for another.
    pub fn check_sender(&self, instance: &str, agent: &str) -> Result<(), ErrorCode> {
        if self.body.from.instance == instance && self.body.from.agent == agent {
            Ok(())
        } else {
            Err(ErrorCode::SenderMismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::FleetSecret;

    fn sample<'a>(payload: &'a [u8]) -> EnvelopeBody<'a> {
        EnvelopeBody {
            version: VERSION,
            id: [7; 16],
            from: Address {
                instance: "i1",
                agent: "a",
            },
            to: Address {
                instance: "i2",
                agent: "b",
            },
            sent_at_ms: 1_000_000,
            payload,
        }
    }

    #[test]
    fn seal_and_open() {
        let id = Identity::generate();
        let fleet = FleetSecret::generate().key();
        let bytes = sample(b"hi").seal(&id, &fleet).unwrap();
        let env = OpenedEnvelope::open(&bytes).unwrap();
        assert_eq!(env.body, sample(b"hi"));
        env.check_tag(&fleet).unwrap();
        env.check_signature(&id.public_key()).unwrap();
        env.check_time(1_000_000 + 60_000, 60_000).unwrap();
        assert_eq!(
            env.check_time(1_000_000 + 60_001, 60_000),
            Err(ErrorCode::StaleTimestamp)
        );
        assert_eq!(
            env.check_time(1_000_000 - 60_001, 60_000),
            Err(ErrorCode::StaleTimestamp)
        );
        env.check_sender("i1", "a").unwrap();
        assert_eq!(env.check_sender("i1", "b"), Err(ErrorCode::SenderMismatch));
        assert_eq!(
            env.check_signature(&Identity::generate().public_key()),
            Err(ErrorCode::BadSignature)
        );
        assert_eq!(
            env.check_tag(&FleetSecret::generate().key()),
            Err(ErrorCode::BadTag)
        );
    }

    #[test]
    fn every_bit_flip_is_caught() {
        let id = Identity::generate();
        let fleet = FleetSecret::generate().key();
        let bytes = sample(b"payload").seal(&id, &fleet).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let ok = OpenedEnvelope::open(&b).is_ok_and(|e| {
                e.check_tag(&fleet).is_ok() && e.check_signature(&id.public_key()).is_ok()
            });
            assert!(!ok, "bit {i} flipped and still accepted");
        }
    }
}
