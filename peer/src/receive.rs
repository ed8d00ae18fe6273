//! What a receiving agent does with a delivered envelope (PROTOCOL.md §9):
//! pure checks, no I/O. Order: decode, recipient, fleet tag, pinned sender
//! key, strict Ed25519, timestamp window, replay window.

use agent_link_crypto::{FleetKey, PublicKey};
use agent_link_proto::{
    Address, ErrorCode, MessageId, OpenedEnvelope, ReplayVerdict, ReplayWindow,
};
use bytes::Bytes;

use crate::pins::{PinCheck, Pins};
use crate::Message;

/// The decision for one delivery.
#[derive(Debug)]
pub enum Verdict {
    /// New: hand to the application, then acknowledge with `delivered_at_ms`.
    Deliver(Message),
    /// Already delivered: acknowledge again with the first receipt's time.
    Duplicate { id: MessageId, delivered_at_ms: u64 },
    /// Refuse with this code (`id` is zero when it could not be decoded).
    Refuse { id: MessageId, code: ErrorCode },
}

/// Check one delivered envelope for the agent at `me`.
#[allow(clippy::too_many_arguments)]
pub fn check_delivery(
    me: &Address<'_>,
    sender_key: [u8; 32],
    envelope: &Bytes,
    fleet: &FleetKey,
    pins: &mut Pins,
    replay: &mut ReplayWindow,
    window_ms: u64,
    now_ms: u64,
) -> Verdict {
    let Ok(env) = OpenedEnvelope::open(envelope) else {
        return Verdict::Refuse {
            id: [0; 16],
            code: ErrorCode::Malformed,
        };
    };
    let id = env.body.id;
    let refuse = |code| Verdict::Refuse { id, code };
    if env.body.to != *me {
        return refuse(ErrorCode::BadAddress);
    }
    if let Err(code) = env.check_tag(fleet) {
        return refuse(code);
    }
    let Ok(key) = PublicKey::from_bytes_checked(sender_key) else {
        return refuse(ErrorCode::BadSignature);
    };
    match pins.check(env.body.from.instance, &key) {
        PinCheck::Known | PinCheck::Pinned => {}
        PinCheck::Changed => {
            tracing::warn!(
                instance = env.body.from.instance,
                "sender presented a different key than the pinned one; refused (if that \
                 instance was legitimately re-created, remove its entry from {})",
                pins.path().map_or_else(
                    || crate::config::PINS_FILE.to_string(),
                    |p| p.display().to_string()
                )
            );
            return refuse(ErrorCode::KeyChanged);
        }
    }
    // End to end: even a compromised relay cannot forge this.
    if let Err(code) = env.check_signature(&key) {
        return refuse(code);
    }
    if let Err(code) = env.check_time(now_ms, window_ms) {
        return refuse(code);
    }
    match replay.check(env.body.from.instance, &id, now_ms) {
        ReplayVerdict::New => {
            replay.record(env.body.from.instance, id, env.body.sent_at_ms, now_ms);
            let payload = envelope.slice_ref(env.body.payload);
            Verdict::Deliver(Message {
                id,
                from: env.body.from.to_string(),
                to: env.body.to.to_string(),
                sent_at_ms: env.body.sent_at_ms,
                payload,
            })
        }
        ReplayVerdict::Duplicate { delivered_at_ms } => Verdict::Duplicate {
            id,
            delivered_at_ms,
        },
        ReplayVerdict::Full => refuse(ErrorCode::Busy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::{FleetSecret, Identity};
    use agent_link_proto::{EnvelopeBody, VERSION};

    struct F {
        id: Identity,
        fleet: FleetKey,
        pins: Pins,
        replay: ReplayWindow,
    }

    fn f() -> F {
        F {
            id: Identity::generate(),
            fleet: FleetSecret::generate().key(),
            pins: Pins::in_memory(),
            replay: ReplayWindow::new(120_000, 100),
        }
    }

    fn env(f: &F, id: [u8; 16], to: &str, sent: u64) -> Bytes {
        Bytes::from(
            EnvelopeBody {
                version: VERSION,
                id,
                from: Address {
                    instance: "s",
                    agent: "a",
                },
                to: Address::parse(to).unwrap(),
                sent_at_ms: sent,
                payload: b"hello",
            }
            .seal(&f.id, &f.fleet)
            .unwrap(),
        )
    }

    fn check(f: &mut F, e: &Bytes, key: [u8; 32], now: u64) -> Verdict {
        let me = Address {
            instance: "r",
            agent: "b",
        };
        check_delivery(
            &me,
            key,
            e,
            &f.fleet,
            &mut f.pins,
            &mut f.replay,
            60_000,
            now,
        )
    }

    #[test]
    fn deliver_once_then_duplicate_with_first_time() {
        let mut f = f();
        let key = f.id.public_key().0;
        let e = env(&f, [1; 16], "r/b", 1000);
        match check(&mut f, &e, key, 1000) {
            Verdict::Deliver(m) => assert_eq!(&m.payload[..], b"hello"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            check(&mut f, &e, key, 5000),
            Verdict::Duplicate {
                delivered_at_ms: 1000,
                ..
            }
        ));
    }

    #[test]
    fn refusals() {
        let mut f = f();
        let key = f.id.public_key().0;
        let wrong_to = env(&f, [2; 16], "r/other", 1000);
        assert!(matches!(
            check(&mut f, &wrong_to, key, 1000),
            Verdict::Refuse {
                code: ErrorCode::BadAddress,
                ..
            }
        ));
        let stale = env(&f, [3; 16], "r/b", 1000);
        assert!(matches!(
            check(&mut f, &stale, key, 100_000),
            Verdict::Refuse {
                code: ErrorCode::StaleTimestamp,
                ..
            }
        ));
        let other = Identity::generate().public_key().0;
        let e = env(&f, [4; 16], "r/b", 1000);
        // Pin the right key first, then a relay claiming another key is refused.
        assert!(matches!(check(&mut f, &e, key, 1000), Verdict::Deliver(_)));
        let e2 = env(&f, [5; 16], "r/b", 1000);
        assert!(matches!(
            check(&mut f, &e2, other, 1000),
            Verdict::Refuse {
                code: ErrorCode::KeyChanged,
                ..
            }
        ));
        let bad_tag = env(&super::tests::f(), [7; 16], "r/b", 1000);
        assert!(matches!(
            check(&mut f, &bad_tag, key, 1000),
            Verdict::Refuse {
                code: ErrorCode::BadTag,
                ..
            }
        ));
        assert!(matches!(
            check(&mut f, &Bytes::from_static(b"junk"), key, 1000),
            Verdict::Refuse {
                code: ErrorCode::Malformed,
                ..
            }
        ));
    }

    #[test]
    fn bad_signature_under_the_pinned_key_is_refused() {
        let mut f = f();
        let signer = Identity::generate();
        let real = f.id.public_key().0;
        let e = Bytes::from(
            EnvelopeBody {
                version: VERSION,
                id: [8; 16],
                from: Address {
                    instance: "s",
                    agent: "a",
                },
                to: Address {
                    instance: "r",
                    agent: "b",
                },
                sent_at_ms: 1000,
                payload: b"x",
            }
            .seal(&signer, &f.fleet)
            .unwrap(),
        );
        assert!(matches!(
            check(&mut f, &e, real, 1000),
            Verdict::Refuse {
                code: ErrorCode::BadSignature,
                ..
            }
        ));
    }
}
