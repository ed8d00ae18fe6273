//! The per-message checks (PROTOCOL.md §9), as one pure function: no I/O, no
//! clock read (the caller passes `now`). [`super::agent_stream`] calls
//! [`check_send`] for every `Send` frame; tests and fuzz targets call it too.
//!
//! Order matters: cheap checks that need no secret first (decode, sender
//! binding), then the HMAC, then the timestamp, then the optional Ed25519.

use agent_link_crypto::{FleetKeys, PublicKey};
use agent_link_proto::{ErrorCode, MessageId, OpenedEnvelope};

/// What the stream knows about its sender.
#[derive(Debug)]
pub struct SenderContext<'a> {
    /// The connection's authenticated instance.
    pub instance: &'a str,
    /// The stream's attached agent.
    pub agent: &'a str,
    /// The key from the TLS handshake.
    pub key: &'a PublicKey,
}

/// Relay-wide check settings.
#[derive(Debug, Clone)]
pub struct CheckPolicy {
    /// Fleet HMAC keys: the current one, and during a rotation's grace
    /// period the one it replaced.
    pub fleet: FleetKeys,
    /// Accepted clock distance, milliseconds.
    pub window_ms: u64,
    /// Verify Ed25519 at the relay too.
    pub verify_signatures: bool,
    /// Largest payload, bytes (`max_message_size`).
    pub max_payload: usize,
}

/// A refusal: the code, and the message id when it could be decoded (so the
/// sender can match the failure to its send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Message id, if the envelope decoded.
    pub id: Option<MessageId>,
    /// Why.
    pub code: ErrorCode,
}

/// Check one envelope from `sender`. On success the decoded envelope is
/// returned for routing; its bytes are forwarded unchanged.
pub fn check_send<'a>(
    envelope: &'a [u8],
    sender: &SenderContext<'_>,
    policy: &CheckPolicy,
    now_ms: u64,
) -> Result<OpenedEnvelope<'a>, Refusal> {
    let env = OpenedEnvelope::open(envelope).map_err(|e| Refusal {
        id: None,
        code: e.code(),
    })?;
    check_opened(&env, sender, policy, now_ms).map_err(|code| Refusal {
        id: Some(env.body.id),
        code,
    })?;
    Ok(env)
}

/// [`check_send`] for an envelope already opened (a relay serving another
/// relay's forward opens it first to find the sender's key).
pub fn check_opened(
    env: &OpenedEnvelope<'_>,
    sender: &SenderContext<'_>,
    policy: &CheckPolicy,
    now_ms: u64,
) -> Result<(), ErrorCode> {
    // The frame limit leaves room for the envelope's header; the payload
    // itself must be within the advertised limit too.
    if env.body.payload.len() > policy.max_payload {
        return Err(ErrorCode::TooLarge);
    }
    // Sender binding: a member may only speak as its own instance and as the
    // agent attached on this stream (prevents impersonation inside the fleet).
    env.check_sender(sender.instance, sender.agent)?;
    // Fleet membership, constant time.
    env.check_tag_in(&policy.fleet, now_ms)?;
    // Replay bound: old captures are refused (receivers also de-duplicate).
    env.check_time(now_ms, policy.window_ms)?;
    if policy.verify_signatures {
        env.check_signature(sender.key)?;
    }
    Ok(())
}

/// Verify the Ed25519 signatures of envelopes from one sender key as a batch
/// (ed25519-dalek's batch verification, roughly 2-3x cheaper per signature
/// than one at a time). Returns one verdict per envelope: when the batch
/// fails, each is checked alone to find the bad ones.
///
/// Batch verification is not `verify_strict`; that is acceptable here
/// because the relay's check is an optional extra (receivers always verify
/// strictly) and the key is the strong key from the TLS handshake.
pub fn verify_batch(
    envelopes: &[OpenedEnvelope<'_>],
    key: &PublicKey,
) -> Vec<Result<(), ErrorCode>> {
    use agent_link_crypto::{Domain, Signature};
    let sigs: Vec<Signature> = envelopes
        .iter()
        .map(|e| Signature(e.outer.signature))
        .collect();
    let items: Vec<_> = envelopes
        .iter()
        .zip(&sigs)
        .map(|(e, s)| (key, Domain::EnvelopeSignature, e.outer.body, s))
        .collect();
    if agent_link_crypto::verify_batch(&items).is_ok() {
        return vec![Ok(()); envelopes.len()];
    }
    envelopes.iter().map(|e| e.check_signature(key)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::{FleetKey, FleetSecret, Identity};
    use agent_link_proto::{Address, EnvelopeBody, VERSION};

    #[test]
    fn after_a_rotation_the_old_secret_passes_only_until_the_grace_ends() {
        let f = fixture();
        let ctx = SenderContext {
            instance: "i1",
            agent: "a",
            key: &f.key,
        };
        let old_tagged = seal(&f, ("i1", "a"), 1_000_000);
        let rotated = CheckPolicy {
            fleet: FleetKeys::with_previous(
                FleetSecret::generate().key(),
                f.fleet.clone(),
                1_000_030,
            ),
            ..policy(&f, false)
        };
        assert!(check_send(&old_tagged, &ctx, &rotated, 1_000_029).is_ok());
        assert_eq!(
            check_send(&old_tagged, &ctx, &rotated, 1_000_030)
                .unwrap_err()
                .code,
            ErrorCode::BadTag
        );
    }

    struct Fixture {
        id: Identity,
        fleet: FleetKey,
        key: PublicKey,
    }

    fn fixture() -> Fixture {
        let id = Identity::generate();
        let key = id.public_key();
        Fixture {
            id,
            fleet: FleetSecret::generate().key(),
            key,
        }
    }

    fn seal(f: &Fixture, from: (&str, &str), sent_at_ms: u64) -> Vec<u8> {
        EnvelopeBody {
            version: VERSION,
            id: [5; 16],
            from: Address {
                instance: from.0,
                agent: from.1,
            },
            to: Address {
                instance: "i2",
                agent: "b",
            },
            sent_at_ms,
            payload: b"x",
        }
        .seal(&f.id, &f.fleet)
        .unwrap()
    }

    fn policy(f: &Fixture, verify_signatures: bool) -> CheckPolicy {
        CheckPolicy {
            fleet: FleetKeys::new(f.fleet.clone()),
            window_ms: 60_000,
            verify_signatures,
            max_payload: 1024,
        }
    }

    #[test]
    fn a_payload_over_the_limit_is_too_large_even_inside_the_frame_limit() {
        let f = fixture();
        let ctx = SenderContext {
            instance: "i1",
            agent: "a",
            key: &f.key,
        };
        // The fixture's payload is one byte.
        let p = CheckPolicy {
            max_payload: 0,
            ..policy(&f, false)
        };
        let bytes = seal(&f, ("i1", "a"), 1_000_000);
        assert_eq!(
            check_send(&bytes, &ctx, &p, 1_000_000).unwrap_err(),
            Refusal {
                id: Some([5; 16]),
                code: ErrorCode::TooLarge
            }
        );
        let fits = CheckPolicy {
            max_payload: 1,
            ..p
        };
        assert!(check_send(&bytes, &ctx, &fits, 1_000_000).is_ok());
    }

    #[test]
    fn accepts_a_good_message() {
        let f = fixture();
        let bytes = seal(&f, ("i1", "a"), 1_000_000);
        let ctx = SenderContext {
            instance: "i1",
            agent: "a",
            key: &f.key,
        };
        let env = check_send(&bytes, &ctx, &policy(&f, true), 1_000_500).unwrap();
        assert_eq!(env.body.to.instance, "i2");
    }

    #[test]
    fn refusals_carry_code_and_id() {
        let f = fixture();
        let ctx = SenderContext {
            instance: "i1",
            agent: "a",
            key: &f.key,
        };
        let p = policy(&f, false);
        let spoofed = seal(&f, ("i3", "a"), 1_000_000);
        assert_eq!(
            check_send(&spoofed, &ctx, &p, 1_000_000).unwrap_err(),
            Refusal {
                id: Some([5; 16]),
                code: ErrorCode::SenderMismatch
            }
        );
        let stale = seal(&f, ("i1", "a"), 1_000_000);
        assert_eq!(
            check_send(&stale, &ctx, &p, 1_000_000 + 60_001)
                .unwrap_err()
                .code,
            ErrorCode::StaleTimestamp
        );
        let other_fleet = CheckPolicy {
            fleet: FleetKeys::new(FleetSecret::generate().key()),
            ..p.clone()
        };
        assert_eq!(
            check_send(&stale, &ctx, &other_fleet, 1_000_000)
                .unwrap_err()
                .code,
            ErrorCode::BadTag
        );
        assert_eq!(
            check_send(b"\x01\x02", &ctx, &p, 0).unwrap_err(),
            Refusal {
                id: None,
                code: ErrorCode::Malformed
            }
        );
    }

    #[test]
    fn batch_verification_finds_the_bad_one() {
        let f = fixture();
        let good = seal(&f, ("i1", "a"), 1_000_000);
        let mut bad = good.clone();
        let n = bad.len();
        bad[n - 1] ^= 1; // last byte of the signature
        let envs = [
            OpenedEnvelope::open(&good).unwrap(),
            OpenedEnvelope::open(&bad).unwrap(),
            OpenedEnvelope::open(&good).unwrap(),
        ];
        assert_eq!(
            verify_batch(&envs, &f.key),
            vec![Ok(()), Err(ErrorCode::BadSignature), Ok(())]
        );
        assert_eq!(verify_batch(&envs[..1], &f.key), vec![Ok(())]);
    }

    #[test]
    fn signature_checked_only_when_enabled() {
        let f = fixture();
        let other = Identity::generate().public_key();
        let ctx = SenderContext {
            instance: "i1",
            agent: "a",
            key: &other,
        };
        let bytes = seal(&f, ("i1", "a"), 1_000_000);
        assert!(check_send(&bytes, &ctx, &policy(&f, false), 1_000_000).is_ok());
        assert_eq!(
            check_send(&bytes, &ctx, &policy(&f, true), 1_000_000)
                .unwrap_err()
                .code,
            ErrorCode::BadSignature
        );
    }
}
