//! What a receiving agent does with a delivered envelope (PROTOCOL.md §9.5):
//! pure checks, no I/O. Order: decode, recipient, fleet tag, pinned sender
//! key, strict Ed25519, timestamp window, replay window. [`Receiver`] holds
//! what the checks need across deliveries. A sender with no pinned key
//! comes out as [`Verdict::FirstContact`]: its pin is settled in the file
//! off the async task ([`Receiver::settle`], run by the driver), and
//! [`Receiver::settled`] then finishes its checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agent_link_crypto::{CheckedKey, FleetKeys, PublicKey};
use agent_link_proto::{
    Address, ErrorCode, MessageId, OpenedEnvelope, ReplayVerdict, ReplayWindow,
};
use bytes::Bytes;

use crate::message::{Message, MessageId as Id};
use crate::pins::{PinCheck, Pins, Settle, SettleMode, Settled};

/// Sender keys decoded and checked once, reused for every message under
/// them (decoding a key costs about a fifth of a strict verification).
/// Only valid keys are kept; bounded.
#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    keys: HashMap<[u8; 32], CheckedKey>,
}

impl KeyCache {
    const MAX: usize = 1024;

    /// The checked key for these bytes, or why they are not a usable key.
    pub(crate) fn get(
        &mut self,
        bytes: [u8; 32],
    ) -> Result<CheckedKey, agent_link_crypto::CryptoError> {
        if let Some(k) = self.keys.get(&bytes) {
            return Ok(*k);
        }
        let k = CheckedKey::new(&PublicKey(bytes))?;
        if self.keys.len() >= Self::MAX {
            self.keys.clear();
        }
        self.keys.insert(bytes, k);
        Ok(k)
    }
}

/// Ids remembered per sender for de-duplication (see `ReplayWindow`).
pub(crate) const REPLAY_CAP: usize = 200_000;
/// Ids remembered over all senders (a relay could present ever new
/// instances; this bounds the memory at some tens of MB).
pub(crate) const REPLAY_TOTAL_CAP: usize = 1_000_000;

/// A receiving agent's memory across deliveries: who it is, the fleet key,
/// the pinned keys of other instances (shared by the agents of one link),
/// the replay window and decoded sender keys.
#[derive(Debug)]
pub(crate) struct Receiver {
    instance: String,
    agent: String,
    fleet: FleetKeys,
    pins: Arc<Mutex<Pins>>,
    replay: ReplayWindow,
    keys: KeyCache,
    window_ms: u64,
    /// Refuse senders with no pinned key instead of pinning them.
    strict: bool,
}

impl Receiver {
    pub(crate) fn new(
        instance: &str,
        agent: &str,
        fleet: impl Into<FleetKeys>,
        pins: Arc<Mutex<Pins>>,
        strict: bool,
    ) -> Self {
        Self {
            instance: instance.to_string(),
            agent: agent.to_string(),
            fleet: fleet.into(),
            pins,
            // Until the relay says otherwise (its `Attached` frame).
            replay: ReplayWindow::with_total_cap(DEFAULT_WINDOW_MS, REPLAY_CAP, REPLAY_TOTAL_CAP),
            keys: KeyCache::default(),
            window_ms: DEFAULT_WINDOW_MS,
            strict,
        }
    }

    /// The timestamp window in force (the relay's, clamped).
    pub(crate) fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The fleet keys after a rotation (the relay pushed a new secret).
    pub(crate) fn set_fleet(&mut self, fleet: FleetKeys) {
        self.fleet = fleet;
    }

    /// The relay's timestamp window (from `Attached`). The replay window is
    /// made once, at the first attach, so ids seen before a re-attach are
    /// still recognised after it.
    pub(crate) fn set_window(&mut self, window_ms: u64, first: bool) {
        // The relay says what its window is, but it may not widen ours past
        // what any relay may be configured with: a relay that said
        // `u64::MAX` could otherwise replay any old message to us.
        let window_ms = window_ms.clamp(MIN_WINDOW_MS, MAX_WINDOW_MS);
        self.window_ms = window_ms;
        if first {
            self.replay = ReplayWindow::with_total_cap(window_ms, REPLAY_CAP, REPLAY_TOTAL_CAP);
        }
    }

    /// Check one delivery (`signed`: whether a batch already verified it).
    pub(crate) fn check(
        &mut self,
        sender_key: [u8; 32],
        envelope: &Bytes,
        now_ms: u64,
        signed: Signed,
    ) -> Verdict {
        let me = Address {
            instance: &self.instance,
            agent: &self.agent,
        };
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        check_delivery_with(
            &me,
            sender_key,
            envelope,
            &self.fleet,
            &mut pins,
            &mut self.replay,
            &mut self.keys,
            self.window_ms,
            now_ms,
            signed,
        )
    }

    /// The application took `msg` at `now_ms`: a duplicate of it is from
    /// now on answered with that time.
    pub(crate) fn taken(&mut self, msg_from: &str, id: Id, sent_at_ms: u64, now_ms: u64) {
        let sender = msg_from.split_once('/').map_or(msg_from, |(i, _)| i);
        self.replay.record(sender, id.0, sent_at_ms, now_ms);
    }

    /// A delivery that passed the checks was refused after all (the
    /// daemon's inbox is full): forget its id, so that a retry is checked
    /// as new instead of being answered with a receipt.
    pub(crate) fn refused(&mut self, msg_from: &str, id: Id) {
        let sender = msg_from.split_once('/').map_or(msg_from, |(i, _)| i);
        self.replay.forget(sender, &id.0);
    }

    /// The file work for these first contacts (one entry per sender key),
    /// to run on a blocking thread: pin them, or, strict, only re-read the
    /// pins (`agent-link trust` may have added one since).
    pub(crate) fn settle<'a>(&self, contacts: impl Iterator<Item = &'a FirstContact>) -> Settle {
        let mut wanted: Vec<(&str, &PublicKey)> = Vec::new();
        for c in contacts {
            if !wanted.iter().any(|(i, k)| *i == c.instance && **k == c.key) {
                wanted.push((&c.instance, &c.key));
            }
        }
        let mode = if self.strict {
            SettleMode::Lookup
        } else {
            SettleMode::Pin
        };
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.settle(&wanted, mode)
    }

    /// Take what a settle found as the link's pins (its agents share them).
    pub(crate) fn install(&self, settled: &Settled) {
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.install(settled);
    }

    /// Finish a first contact once its settle ran (`Err`: the file could
    /// not be read or written).
    pub(crate) fn settled(
        &mut self,
        contact: FirstContact,
        settled: &Result<Settled, String>,
        now_ms: u64,
    ) -> Verdict {
        let outcome = match settled {
            Ok(s) => Ok(s.check(&contact.instance, &contact.key)),
            Err(e) => Err(e.as_str()),
        };
        let pins_file = self.pins_file();
        finish_first_contact(
            contact,
            outcome,
            self.strict,
            &mut self.replay,
            &pins_file,
            now_ms,
        )
    }

    fn pins_file(&self) -> String {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.path().map_or_else(
            || crate::config::PINS_FILE.to_string(),
            |p| p.display().to_string(),
        )
    }

    /// Signatures of several deliveries in one batch (see [`verify_deliveries`]).
    pub(crate) fn verify_batch(&mut self, items: &[Delivered<'_>]) -> Vec<Signed> {
        verify_deliveries(items, &mut self.keys)
    }
}

/// The timestamp window assumed before the relay has said (PROTOCOL.md §7).
const DEFAULT_WINDOW_MS: u64 = 60_000;
/// The widest window a receiver accepts from its relay: the relay's own
/// limit on `timestamp_window_secs` (3600).
pub(crate) const MAX_WINDOW_MS: u64 = 3_600_000;
/// The narrowest (a zero window would refuse everything).
const MIN_WINDOW_MS: u64 = 1_000;

/// The decision for one delivery.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// New: hand to the application, then acknowledge with `delivered_at_ms`.
    Deliver(Message),
    /// Already delivered: acknowledge again with the first receipt's time.
    Duplicate { id: MessageId, delivered_at_ms: u64 },
    /// Refuse with this code (`id` is zero when it could not be decoded).
    Refuse { id: MessageId, code: ErrorCode },
    /// Every check passed but the sender has no pinned key: settle its pin
    /// ([`Receiver::settle`]), then finish ([`Receiver::settled`]).
    FirstContact(FirstContact),
}

/// A verified delivery from a sender with no pinned key, waiting for its
/// pin to be settled in the file (the replay check comes after).
#[derive(Debug)]
pub(crate) struct FirstContact {
    instance: String,
    key: PublicKey,
    message: Message,
}

impl FirstContact {
    /// The message's id.
    pub(crate) fn id(&self) -> MessageId {
        self.message.id.0
    }
}

/// The end of a first contact's checks: `outcome` is the sender key's
/// standing after the settle (`Err`: the pins file failed us).
fn finish_first_contact(
    contact: FirstContact,
    outcome: Result<PinCheck, &str>,
    strict: bool,
    replay: &mut ReplayWindow,
    pins_file: &str,
    now_ms: u64,
) -> Verdict {
    let id = contact.message.id.0;
    let refuse = |code| Verdict::Refuse { id, code };
    match outcome {
        Ok(PinCheck::Known) => {}
        Ok(PinCheck::Changed) => {
            warn_key_changed(&contact.instance, pins_file);
            return refuse(ErrorCode::KeyChanged);
        }
        Ok(PinCheck::Unknown) => {
            // Only a strict receiver gets here (a settle that pins leaves
            // every key it was given Known or Changed).
            tracing::warn!(
                target: crate::PINS_LOG_TARGET,
                instance = %contact.instance,
                key = %contact.key,
                "refused a message from an instance with no pinned key (strict pins); if                  that key is the instance's own (its `agent-link whoami`), pin it with                  `agent-link trust {} {}`",
                contact.instance,
                contact.key
            );
            return refuse(ErrorCode::KeyChanged);
        }
        Err(e) if strict => {
            tracing::warn!(
                target: crate::PINS_LOG_TARGET,
                instance = %contact.instance,
                "refused a message from an instance with no pinned key: could not read the pins: {e}"
            );
            return refuse(ErrorCode::KeyChanged);
        }
        Err(e) => {
            // Unpinned is safe to deliver (the signature verified) but the
            // pin must not be lost silently; the next message tries again.
            tracing::warn!(target: crate::PINS_LOG_TARGET, "could not save the pinned key: {e}");
        }
    }
    let m = contact.message;
    match replay.check(&contact.instance, &id, now_ms) {
        ReplayVerdict::New => {
            replay.record(&contact.instance, id, m.sent_at_ms, now_ms);
            Verdict::Deliver(m)
        }
        ReplayVerdict::Duplicate { delivered_at_ms } => Verdict::Duplicate {
            id,
            delivered_at_ms,
        },
        ReplayVerdict::Full => refuse(ErrorCode::Busy),
    }
}

fn warn_key_changed(instance: &str, pins_file: &str) {
    tracing::warn!(
                target: crate::PINS_LOG_TARGET,
        instance,
        "sender presented a different key than the pinned one; refused (if that \
         instance was legitimately re-created, remove its entry from {pins_file})"
    );
}

/// Check one delivered envelope for the agent at `me`, settling a first
/// contact's pin at once (blocking; non-strict).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_delivery(
    me: &Address<'_>,
    sender_key: [u8; 32],
    envelope: &Bytes,
    fleet: &agent_link_crypto::FleetKey,
    pins: &mut Pins,
    replay: &mut ReplayWindow,
    window_ms: u64,
    now_ms: u64,
) -> Verdict {
    match check_delivery_with(
        me,
        sender_key,
        envelope,
        &FleetKeys::new(fleet.clone()),
        pins,
        replay,
        &mut KeyCache::default(),
        window_ms,
        now_ms,
        Signed::Unchecked,
    ) {
        Verdict::FirstContact(c) => settle_now(c, pins, replay, false, now_ms),
        v => v,
    }
}

/// Settle one first contact at once, blocking (tests).
#[cfg(test)]
pub(crate) fn settle_now(
    contact: FirstContact,
    pins: &mut Pins,
    replay: &mut ReplayWindow,
    strict: bool,
    now_ms: u64,
) -> Verdict {
    let mode = if strict {
        SettleMode::Lookup
    } else {
        SettleMode::Pin
    };
    let settled = pins
        .settle(&[(&contact.instance, &contact.key)], mode)
        .run();
    if let Ok(s) = &settled {
        pins.install(s);
    }
    let outcome = match &settled {
        Ok(s) => Ok(s.check(&contact.instance, &contact.key)),
        Err(e) => Err(e.as_str()),
    };
    finish_first_contact(
        contact,
        outcome,
        strict,
        replay,
        PINS_FILE_FOR_TESTS,
        now_ms,
    )
}

#[cfg(test)]
const PINS_FILE_FOR_TESTS: &str = crate::config::PINS_FILE;

/// Whether a delivery's signature was already verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signed {
    /// Not yet: verify it strictly here.
    Unchecked,
    /// Verified in a batch that passed as a whole over exactly these
    /// envelope bytes under exactly this sender key ([`verify_deliveries`]).
    InPassedBatch,
}

/// A `Deliver` frame's signature inputs, for [`verify_deliveries`].
#[derive(Debug)]
pub(crate) struct Delivered<'a> {
    /// `Deliver.sender_key`.
    pub sender_key: [u8; 32],
    /// `Deliver.envelope`.
    pub envelope: &'a [u8],
}

/// Verify the signatures of several deliveries with one Ed25519 batch.
/// Returns one flag per delivery: [`Signed::InPassedBatch`] for every one
/// when the whole batch passed, else [`Signed::Unchecked`] for every one,
/// so each is then verified strictly on its own by [`check_delivery_with`]
/// (a failed batch never accepts a bad message nor refuses a good one; it
/// only costs the one-by-one verification the batch would have saved).
///
/// Deliveries that do not decode or carry an unusable key are left out of
/// the batch (and `Unchecked`): their own checks refuse them. Fewer than two
/// candidates: no batch.
pub(crate) fn verify_deliveries(items: &[Delivered<'_>], cache: &mut KeyCache) -> Vec<Signed> {
    use agent_link_crypto::{Domain, Signature};
    let mut out = vec![Signed::Unchecked; items.len()];
    let mut keys = Vec::with_capacity(items.len());
    let mut opened = Vec::with_capacity(items.len());
    for (i, d) in items.iter().enumerate() {
        let (Ok(env), Ok(key)) = (OpenedEnvelope::open(d.envelope), cache.get(d.sender_key)) else {
            continue;
        };
        keys.push(key);
        opened.push((i, env));
    }
    if opened.len() < 2 {
        return out;
    }
    let sigs: Vec<Signature> = opened
        .iter()
        .map(|(_, e)| Signature(e.outer.signature))
        .collect();
    let batch: Vec<_> = opened
        .iter()
        .zip(&keys)
        .zip(&sigs)
        .map(|(((_, e), k), s)| (k, Domain::EnvelopeSignature, e.outer.body, s))
        .collect();
    if agent_link_crypto::verify_batch_checked(&batch).is_ok() {
        for (i, _) in &opened {
            out[*i] = Signed::InPassedBatch;
        }
    }
    out
}

/// [`check_delivery`], with the signature step skipped when `signed` says a
/// batch over these bytes and this key already passed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_delivery_with(
    me: &Address<'_>,
    sender_key: [u8; 32],
    envelope: &Bytes,
    fleet: &FleetKeys,
    pins: &mut Pins,
    replay: &mut ReplayWindow,
    keys: &mut KeyCache,
    window_ms: u64,
    now_ms: u64,
    signed: Signed,
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
    // The current fleet key, or during a rotation's grace the previous.
    if let Err(code) = env.check_tag_in(fleet, now_ms) {
        return refuse(code);
    }
    let Ok(key) = keys.get(sender_key) else {
        return refuse(ErrorCode::BadSignature);
    };
    let pinned = match pins.check(env.body.from.instance, key.public_key()) {
        PinCheck::Known => true,
        PinCheck::Unknown => false,
        PinCheck::Changed => {
            let file = pins.path().map_or_else(
                || crate::config::PINS_FILE.to_string(),
                |p| p.display().to_string(),
            );
            warn_key_changed(env.body.from.instance, &file);
            return refuse(ErrorCode::KeyChanged);
        }
    };
    // End to end: even a compromised relay cannot forge this. Strict
    // verification unless a batch over these very bytes and key passed.
    if signed == Signed::Unchecked {
        if let Err(code) = env.check_signature_checked(&key) {
            return refuse(code);
        }
    }
    if let Err(code) = env.check_time(now_ms, window_ms) {
        return refuse(code);
    }
    let message = || Message {
        id: Id(id),
        from: env.body.from.to_string(),
        to: env.body.to.to_string(),
        sent_at_ms: env.body.sent_at_ms,
        payload: envelope.slice_ref(env.body.payload),
    };
    // First contact: the key is pinned (or, strict, looked up) only now
    // that a message under it verified (a relay offering junk under some
    // key pins nothing), and off the async task: the replay check follows
    // in `finish_first_contact`.
    if !pinned {
        return Verdict::FirstContact(FirstContact {
            instance: env.body.from.instance.to_string(),
            key: *key.public_key(),
            message: message(),
        });
    }
    match replay.check(env.body.from.instance, &id, now_ms) {
        ReplayVerdict::New => {
            replay.record(env.body.from.instance, id, env.body.sent_at_ms, now_ms);
            Verdict::Deliver(message())
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
        fleet: agent_link_crypto::FleetKey,
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

    fn batch_verdicts(f: &mut F, envs: &[Bytes], key: [u8; 32], now: u64) -> Vec<Verdict> {
        let items: Vec<Delivered<'_>> = envs
            .iter()
            .map(|e| Delivered {
                sender_key: key,
                envelope: e,
            })
            .collect();
        let mut keys = KeyCache::default();
        let signed = verify_deliveries(&items, &mut keys);
        let me = Address {
            instance: "r",
            agent: "b",
        };
        envs.iter()
            .zip(signed)
            .map(|(e, s)| {
                match check_delivery_with(
                    &me,
                    key,
                    e,
                    &FleetKeys::new(f.fleet.clone()),
                    &mut f.pins,
                    &mut f.replay,
                    &mut keys,
                    60_000,
                    now,
                    s,
                ) {
                    Verdict::FirstContact(c) => {
                        settle_now(c, &mut f.pins, &mut f.replay, false, now)
                    }
                    v => v,
                }
            })
            .collect()
    }

    #[test]
    fn a_passing_batch_delivers_all() {
        let mut f = f();
        let key = f.id.public_key().0;
        let envs: Vec<Bytes> = (0..6u8)
            .map(|i| env(&f, [i + 10; 16], "r/b", 1000))
            .collect();
        let items: Vec<Delivered<'_>> = envs
            .iter()
            .map(|e| Delivered {
                sender_key: key,
                envelope: e,
            })
            .collect();
        assert_eq!(
            verify_deliveries(&items, &mut KeyCache::default()),
            vec![Signed::InPassedBatch; 6]
        );
        // Two is already a batch; one is not.
        assert_eq!(
            verify_deliveries(&items[..2], &mut KeyCache::default()),
            vec![Signed::InPassedBatch; 2]
        );
        assert_eq!(
            verify_deliveries(&items[..1], &mut KeyCache::default()),
            vec![Signed::Unchecked]
        );
        let v = batch_verdicts(&mut f, &envs, key, 1000);
        assert!(v.iter().all(|v| matches!(v, Verdict::Deliver(_))), "{v:?}");
        // The same id twice in one batch: the second is a duplicate.
        let again = vec![envs[0].clone(), env(&f, [40; 16], "r/b", 1000)];
        let v = batch_verdicts(&mut f, &again, key, 2000);
        assert!(matches!(
            v[0],
            Verdict::Duplicate {
                delivered_at_ms: 1000,
                ..
            }
        ));
        assert!(matches!(v[1], Verdict::Deliver(_)));
    }

    #[test]
    fn one_bad_signature_in_the_middle_of_a_batch_is_the_only_refusal() {
        for bad_at in [0usize, 3, 6] {
            let mut f = f();
            let key = f.id.public_key().0;
            let mut envs: Vec<Vec<u8>> = (0..7u8)
                .map(|i| env(&f, [i + 20; 16], "r/b", 1000).to_vec())
                .collect();
            let n = envs[bad_at].len();
            envs[bad_at][n - 1] ^= 1; // last byte of the signature (not under the tag)
            let envs: Vec<Bytes> = envs.into_iter().map(Bytes::from).collect();
            let items: Vec<Delivered<'_>> = envs
                .iter()
                .map(|e| Delivered {
                    sender_key: key,
                    envelope: e,
                })
                .collect();
            // The batch fails as a whole: nobody is accepted on its strength.
            assert_eq!(
                verify_deliveries(&items, &mut KeyCache::default()),
                vec![Signed::Unchecked; 7]
            );
            let v = batch_verdicts(&mut f, &envs, key, 1000);
            for (i, v) in v.iter().enumerate() {
                if i == bad_at {
                    assert!(
                        matches!(
                            v,
                            Verdict::Refuse {
                                code: ErrorCode::BadSignature,
                                ..
                            }
                        ),
                        "{i}: {v:?}"
                    );
                } else {
                    assert!(matches!(v, Verdict::Deliver(_)), "{i}: {v:?}");
                }
            }
        }
    }

    #[test]
    fn a_batch_with_a_foreign_signer_refuses_only_that_one() {
        let mut f = f();
        let key = f.id.public_key().0;
        let mut envs: Vec<Bytes> = (0..4u8)
            .map(|i| env(&f, [i + 30; 16], "r/b", 1000))
            .collect();
        // Signed by someone else, delivered under the pinned sender's key.
        let other = F {
            id: Identity::generate(),
            fleet: f.fleet.clone(),
            pins: Pins::in_memory(),
            replay: ReplayWindow::new(120_000, 100),
        };
        envs.insert(2, env(&other, [39; 16], "r/b", 1000));
        let v = batch_verdicts(&mut f, &envs, key, 1000);
        for (i, v) in v.iter().enumerate() {
            if i == 2 {
                assert!(
                    matches!(
                        v,
                        Verdict::Refuse {
                            code: ErrorCode::BadSignature,
                            ..
                        }
                    ),
                    "{v:?}"
                );
            } else {
                assert!(matches!(v, Verdict::Deliver(_)), "{i}: {v:?}");
            }
        }
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

    #[test]
    fn the_relay_cannot_widen_the_timestamp_window_past_an_hour() {
        let f = f();
        let key = f.id.public_key().0;
        let mut r = Receiver::new(
            "r",
            "b",
            f.fleet.clone(),
            Arc::new(Mutex::new(Pins::in_memory())),
            false,
        );
        r.set_window(u64::MAX, true);
        let now = 10 * MAX_WINDOW_MS;
        let old = env(&f, [9; 16], "r/b", now - 2 * MAX_WINDOW_MS);
        assert!(matches!(
            r.check(key, &old, now, Signed::Unchecked),
            Verdict::Refuse {
                code: ErrorCode::StaleTimestamp,
                ..
            }
        ));
        let fresh = env(&f, [8; 16], "r/b", now - MAX_WINDOW_MS / 2);
        assert!(matches!(
            r.check(key, &fresh, now, Signed::Unchecked),
            Verdict::FirstContact(_)
        ));
    }

    #[test]
    fn a_key_is_pinned_only_once_a_message_under_it_verified() {
        let mut f = f();
        // A relay offers a message under some key it picked, with a
        // signature that does not verify under it: refused, nothing pinned.
        let relays_key = Identity::generate().public_key();
        let e = env(&f, [5; 16], "r/b", 1000);
        assert!(matches!(
            check(&mut f, &e, relays_key.0, 1000),
            Verdict::Refuse {
                code: ErrorCode::BadSignature,
                ..
            }
        ));
        assert_eq!(f.pins.check("s", &relays_key), PinCheck::Unknown);
        // The real sender's message pins the real key.
        let real = f.id.public_key();
        assert!(matches!(
            check(&mut f, &e, real.0, 1000),
            Verdict::Deliver(_)
        ));
        assert_eq!(f.pins.check("s", &real), PinCheck::Known);
        // A stale message under an unknown key pins nothing either.
        let mut g = self::f();
        let old = env(&g, [6; 16], "r/b", 1000);
        let key = g.id.public_key();
        assert!(matches!(
            check(&mut g, &old, key.0, 1000 + 10 * 60_000),
            Verdict::Refuse {
                code: ErrorCode::StaleTimestamp,
                ..
            }
        ));
        assert_eq!(g.pins.check("s", &key), PinCheck::Unknown);
    }

    #[test]
    fn a_strict_receiver_refuses_an_unpinned_sender_until_it_is_trusted() {
        let mut f = f();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::config::PINS_FILE);
        f.pins = Pins::load(path.clone()).unwrap();
        let key = f.id.public_key();
        let e = env(&f, [11; 16], "r/b", 1000);
        let me = Address {
            instance: "r",
            agent: "b",
        };
        let mut keys = KeyCache::default();
        let mut strict = |f: &mut F, e: &Bytes, id_sent| match check_delivery_with(
            &me,
            key.0,
            e,
            &FleetKeys::new(f.fleet.clone()),
            &mut f.pins,
            &mut f.replay,
            &mut keys,
            60_000,
            id_sent,
            Signed::Unchecked,
        ) {
            Verdict::FirstContact(c) => settle_now(c, &mut f.pins, &mut f.replay, true, id_sent),
            v => v,
        };
        assert!(matches!(
            strict(&mut f, &e, 1000),
            Verdict::Refuse {
                code: ErrorCode::KeyChanged,
                ..
            }
        ));
        assert_eq!(f.pins.check("s", &key), PinCheck::Unknown, "nothing pinned");
        assert!(!path.exists(), "a strict receiver writes no pins");
        // `agent-link trust` in another process: the next message re-reads
        // the file and is delivered, and the one refused before, re-sent,
        // is new to the replay window (a refusal records nothing).
        Pins::load(path.clone()).unwrap().pin("s", &key).unwrap();
        assert!(matches!(strict(&mut f, &e, 1000), Verdict::Deliver(_)));
        assert_eq!(f.pins.check("s", &key), PinCheck::Known);
        // Another key for the same instance stays refused.
        let other = Identity::generate().public_key();
        assert_eq!(f.pins.check("s", &other), PinCheck::Changed);
    }

    fn env_from(f: &F, from: &str, fleet: &agent_link_crypto::FleetKey, id: [u8; 16]) -> Bytes {
        Bytes::from(
            EnvelopeBody {
                version: VERSION,
                id,
                from: Address {
                    instance: from,
                    agent: "a",
                },
                to: Address {
                    instance: "r",
                    agent: "b",
                },
                sent_at_ms: 1000,
                payload: b"hello",
            }
            .seal(&f.id, fleet)
            .unwrap(),
        )
    }

    #[test]
    fn after_a_pushed_rotation_messages_under_the_new_fleet_key_are_accepted() {
        let f = f();
        let pins = Arc::new(Mutex::new(Pins::in_memory()));
        let mut r = Receiver::new("r", "b", f.fleet.clone(), pins, false);
        let new = FleetSecret::generate().key();
        let e = env_from(&f, "s", &new, [20; 16]);
        let key = f.id.public_key().0;
        assert!(matches!(
            r.check(key, &e, 1000, Signed::Unchecked),
            Verdict::Refuse {
                code: ErrorCode::BadTag,
                ..
            }
        ));
        r.set_fleet(FleetKeys::new(new));
        assert!(matches!(
            r.check(key, &e, 1000, Signed::Unchecked),
            Verdict::FirstContact(_)
        ));
    }

    /// Two instances that present one key are two first contacts: the
    /// settle pins both (it de-duplicates only equal instance-key pairs).
    #[test]
    fn one_settle_pins_each_instance_of_a_shared_key() {
        let f = f();
        let pins = Arc::new(Mutex::new(Pins::in_memory()));
        let mut r = Receiver::new("r", "b", f.fleet.clone(), pins.clone(), false);
        let key = f.id.public_key();
        let contact = |r: &mut Receiver, from: &str, id: [u8; 16]| match r.check(
            key.0,
            &env_from(&f, from, &f.fleet, id),
            1000,
            Signed::Unchecked,
        ) {
            Verdict::FirstContact(c) => c,
            other => panic!("a first contact, got {other:?}"),
        };
        let s1 = contact(&mut r, "s", [21; 16]);
        let s2 = contact(&mut r, "s", [22; 16]);
        let t = contact(&mut r, "t", [23; 16]);
        // The id a detach's Nack names (the relay drops a reply naming
        // another id than the one it delivered under that token).
        assert_eq!((s1.id(), t.id()), ([21; 16], [23; 16]));
        let settled = r.settle([&s1, &s2, &t].into_iter()).run();
        r.install(settled.as_ref().unwrap());
        for c in [s1, s2, t] {
            assert!(matches!(r.settled(c, &settled, 1000), Verdict::Deliver(_)));
        }
        let pins = pins.lock().unwrap();
        assert_eq!(pins.check("s", &key), PinCheck::Known);
        assert_eq!(pins.check("t", &key), PinCheck::Known);
    }

    /// A pins file that cannot be written: a strict receiver refuses (it
    /// cannot tell whether the key is trusted), any other delivers (the
    /// signature verified) and pins on a later message.
    #[test]
    fn a_failed_settle_refuses_only_for_a_strict_receiver() {
        let f = f();
        for strict in [false, true] {
            let pins = Arc::new(Mutex::new(Pins::in_memory()));
            let mut r = Receiver::new("r", "b", f.fleet.clone(), pins, strict);
            let e = env_from(&f, "s", &f.fleet, [24; 16]);
            let Verdict::FirstContact(c) =
                r.check(f.id.public_key().0, &e, 1000, Signed::Unchecked)
            else {
                panic!("a first contact")
            };
            let v = r.settled(c, &Err("pins: read-only".into()), 1000);
            if strict {
                assert!(
                    matches!(
                        v,
                        Verdict::Refuse {
                            code: ErrorCode::KeyChanged,
                            ..
                        }
                    ),
                    "{v:?}"
                );
            } else {
                assert!(matches!(v, Verdict::Deliver(_)), "{v:?}");
            }
        }
    }

    #[test]
    fn the_key_cache_keeps_up_to_its_bound_then_starts_over() {
        let mut cache = KeyCache::default();
        let keys: Vec<[u8; 32]> = (0..=KeyCache::MAX)
            .map(|_| Identity::generate().public_key().0)
            .collect();
        for k in &keys[..KeyCache::MAX] {
            cache.get(*k).unwrap();
        }
        assert_eq!(cache.keys.len(), KeyCache::MAX);
        cache.get(keys[0]).unwrap();
        assert_eq!(cache.keys.len(), KeyCache::MAX, "a hit adds nothing");
        cache.get(keys[KeyCache::MAX]).unwrap();
        assert_eq!(cache.keys.len(), 1, "full: cleared, then the new key");
    }

    /// The check itself touches no file: a first contact comes out as
    /// `FirstContact`, and only the settle (which the driver runs on a
    /// blocking thread) locks, merges and writes the pins.
    #[test]
    fn a_first_contact_writes_the_pins_only_in_the_settle() {
        let f = f();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::config::PINS_FILE);
        let pins = Arc::new(Mutex::new(Pins::load(path.clone()).unwrap()));
        let mut r = Receiver::new("r", "b", f.fleet.clone(), pins.clone(), false);
        let e = env(&f, [12; 16], "r/b", 1000);
        let Verdict::FirstContact(c) = r.check(f.id.public_key().0, &e, 1000, Signed::Unchecked)
        else {
            panic!("a first contact")
        };
        assert!(!path.exists(), "nothing written by the check");
        let settled = r.settle(std::iter::once(&c)).run();
        assert!(path.exists(), "written by the settle");
        r.install(settled.as_ref().unwrap());
        assert!(matches!(r.settled(c, &settled, 1000), Verdict::Deliver(_)));
        assert_eq!(
            pins.lock().unwrap().check("s", &f.id.public_key()),
            PinCheck::Known
        );
    }
}
