//! An agent stream's per-frame decisions (PROTOCOL.md §4.3, §9.4-§9.6) as a
//! pure function: a batch of frames in, the [`Action`]s to carry out out.
//! The agent-stream task (`server/agent.rs`) reads the batch, calls
//! [`AgentStream::on_frames`] and executes the actions in order; it decides
//! nothing itself except what routing answers (a full or missing target).
//!
//! Actions come in the order the relay has always carried them out, which
//! the peer can see on its stream:
//! 1. per frame, in order: receipts and failures routed back to their
//!    senders, refusals, and `Detach` (unrouted before anything after it is
//!    forwarded);
//! 2. after the whole batch's signatures were verified (one batch
//!    verification per read): the checked envelopes to forward, or their
//!    refusals (signature, rate, size);
//! 3. last, if a frame could not be attributed or did not belong on an
//!    agent stream: [`Action::Close`]; frames after it are not looked at.
//!
//! Refusals and `Detached` are answers on this stream; the task queues
//! them and writes them after the batch's forwards, before a `Close`.

use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use agent_link_proto::{
    codec, Address, DeliverHead, ErrorCode, MessageId, OpenedEnvelope, PeerToRelay, Receipt,
};
use bytes::Bytes;

use super::checks::{check_send, verify_batch, CheckPolicy, SenderContext};
use super::deliveries::Ledger;
use super::rate::TokenBucket;
use crate::registry::InstanceRecord;

/// The two clocks a batch is judged by, read once per batch by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Wall-clock milliseconds since the Unix epoch (envelope timestamps).
    pub unix_ms: u64,
    /// Monotonic time (the sender instance's rate bucket).
    pub instant: Instant,
}

/// What to do, in order; borrows from the batch's frames.
#[derive(Debug)]
pub enum Action<'f> {
    /// Queue `envelope` behind `head` on the receiving stream of `to`. If
    /// that fails (no route, a full queue) the task answers
    /// `Failed{id, code}` on this stream.
    Forward {
        /// The message id (for the failure, and logs).
        id: MessageId,
        /// The target agent.
        to: Address<'f>,
        /// The envelope's original bytes: a slice of the received frame.
        /// Its `Deliver` frame fits the hard frame limit whatever reply
        /// token the target's ledger gives it (checked here).
        envelope: Bytes,
    },
    /// Answer `Failed{id, code}` on this stream (a refusal; counted).
    Refuse {
        /// The refused message (or, for an `Ack`, the receipt's message).
        id: MessageId,
        /// Why.
        code: ErrorCode,
    },
    /// Route `Receipt{receipt}` to the stream with `token` (the message's
    /// sender), waiting a bounded time for room in its queue. The reply
    /// was checked against this stream's ledger: one reply per delivery,
    /// from the stream it was delivered to.
    RouteReceipt {
        /// The sending stream's token.
        token: u64,
        /// The receiver's receipt, as it sent it.
        receipt: Receipt<'f>,
    },
    /// Route `Failed{id, code}` (the receiver's `Nack`) to the stream with
    /// `token`, as for a receipt.
    RouteFailed {
        /// The sending stream's token.
        token: u64,
        /// The refused message.
        id: MessageId,
        /// The receiver's reason.
        code: ErrorCode,
    },
    /// An `Ack` or `Nack` for no delivery outstanding on this stream (a
    /// token never delivered here or already answered, or another id):
    /// dropped without an answer (PROTOCOL.md §9.5), counted.
    DropReply {
        /// The id the reply named.
        id: MessageId,
    },
    /// The peer detaches (PROTOCOL.md §9.6): when `unroute`, remove this
    /// stream's receiving route now; then answer `Detached`, behind every
    /// delivery already queued for the stream.
    Detach {
        /// Whether the stream is the agent's receiving stream.
        unroute: bool,
    },
    /// Answer `Error{code}` and end the stream (counted). Always last.
    Close(ErrorCode),
}

/// One attached agent stream: who it speaks for and how it is checked.
#[derive(Debug)]
pub struct AgentStream<'a> {
    sender: SenderContext<'a>,
    verify_signatures: bool,
    receive: bool,
}

impl<'a> AgentStream<'a> {
    /// A stream of `sender`. With `verify_signatures` the signatures of a
    /// batch are verified together (the policy's own flag should be off).
    pub fn new(sender: SenderContext<'a>, verify_signatures: bool, receive: bool) -> Self {
        Self {
            sender,
            verify_signatures,
            receive,
        }
    }

    /// Decide on one batch of frame bodies read from the stream. `rate` is
    /// the sender instance's bucket, shared by its connections: taken once
    /// per checked message, locked only for that.
    /// `ledger` is this stream's own: the deliveries written to it, which
    /// its replies must name.
    /// `policy` is the relay's as it stands for this batch (a fleet secret
    /// rotation replaces it while streams stay open).
    pub fn on_frames<'f, S: Clone + Eq + Hash>(
        &self,
        now: Now,
        policy: &CheckPolicy,
        frames: &'f [Bytes],
        rate: &Mutex<TokenBucket>,
        ledger: &Mutex<Ledger<S>>,
    ) -> Vec<Action<'f>> {
        let reply = |token: u64, id: &MessageId| {
            ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reply(token, id)
        };
        let mut out = Vec::with_capacity(frames.len() + 1);
        // Checked envelopes with the frame each came in (its bytes are
        // forwarded as a slice of that frame, never copied or re-encoded).
        let mut passed: Vec<(OpenedEnvelope<'f>, &'f Bytes)> = Vec::with_capacity(frames.len());
        let mut close = None;
        for body in frames {
            match codec::decode::<PeerToRelay>(body) {
                Ok(PeerToRelay::Send { envelope }) => {
                    // Every check (size at the reader; decode, sender
                    // binding, fleet HMAC, timestamp here) runs on every
                    // message, batched or not.
                    match check_send(envelope, &self.sender, policy, now.unix_ms) {
                        Ok(env) => passed.push((env, body)),
                        Err(refusal) => match refusal.id {
                            Some(id) => out.push(Action::Refuse {
                                id,
                                code: refusal.code,
                            }),
                            // Undecodable: nothing to attribute it to.
                            None => {
                                close = Some(refusal.code);
                                break;
                            }
                        },
                    }
                }
                Ok(PeerToRelay::Ack {
                    reply_token,
                    receipt,
                }) => {
                    // A receipt may only speak for the agent that received
                    // the message: it is not forwarded, and the acking
                    // stream is told why (the original sender's send then
                    // ends in its deadline: outcome unknown).
                    if receipt.from.instance != self.sender.instance
                        || receipt.from.agent != self.sender.agent
                    {
                        out.push(Action::Refuse {
                            id: receipt.id,
                            code: ErrorCode::SenderMismatch,
                        });
                    } else {
                        out.push(match reply(reply_token, &receipt.id) {
                            Some(token) => Action::RouteReceipt { token, receipt },
                            None => Action::DropReply { id: receipt.id },
                        });
                    }
                }
                Ok(PeerToRelay::Nack {
                    reply_token,
                    id,
                    code,
                }) => out.push(match reply(reply_token, &id) {
                    Some(token) => Action::RouteFailed { token, id, code },
                    None => Action::DropReply { id },
                }),
                Ok(PeerToRelay::Detach) => out.push(Action::Detach {
                    unroute: self.receive,
                }),
                // Attach, Register, StatusRequest have no place here; an
                // unknown tag or trailing bytes do not decode.
                Ok(_) | Err(_) => {
                    close = Some(ErrorCode::Malformed);
                    break;
                }
            }
        }
        let verdicts = if self.verify_signatures && !passed.is_empty() {
            let envs: Vec<_> = passed.iter().map(|(e, _)| *e).collect();
            Some(verify_batch(&envs, self.sender.key))
        } else {
            None
        };
        for (i, (env, body)) in passed.iter().enumerate() {
            let verdict = verdicts.as_ref().map_or(Ok(()), |v| v[i]);
            let action = match verdict.and_then(|()| self.forward(env, body, now, rate)) {
                Ok(forward) => forward,
                Err(code) => Action::Refuse {
                    id: env.body.id,
                    code,
                },
            };
            out.push(action);
        }
        if let Some(code) = close {
            out.push(Action::Close(code));
        }
        out
    }

    /// Rate-limit one checked envelope and build its delivery. `body` is
    /// the `Send` frame the envelope was read from.
    fn forward<'f>(
        &self,
        env: &OpenedEnvelope<'f>,
        body: &Bytes,
        now: Now,
        rate: &Mutex<TokenBucket>,
    ) -> Result<Action<'f>, ErrorCode> {
        {
            let mut bucket = rate.lock().unwrap_or_else(|e| e.into_inner());
            if !bucket.try_take(now.instant) {
                return Err(ErrorCode::RateLimited);
            }
        }
        // The envelope's bytes go out exactly as they came in (never
        // re-encoded): a slice of the received frame behind a Deliver head.
        // The longest reply token (a 9-byte varint) must fit as well.
        let envelope = body.slice_ref(env.bytes);
        DeliverHead::new(u64::MAX, self.sender.key.as_bytes(), envelope.len())
            .ok_or(ErrorCode::TooLarge)?;
        Ok(Action::Forward {
            id: env.body.id,
            to: env.body.to,
            envelope,
        })
    }
}

/// Why a message found no receiving stream (PROTOCOL.md §9.4 step 8), given
/// the target instance's registry record.
pub fn unrouted(target: Option<&InstanceRecord>) -> ErrorCode {
    match target {
        None => ErrorCode::UnknownTarget,
        Some(r) if r.revoked => ErrorCode::TargetRevoked,
        Some(_) => ErrorCode::TargetOffline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::{FleetKey, FleetKeys, FleetSecret, Identity, PublicKey};
    use agent_link_proto::{EnvelopeBody, VERSION};
    use std::time::Duration;

    const NOW_MS: u64 = 1_700_000_000_000;

    /// A ledger with two deliveries written to this stream: token 1 (from
    /// stream 50) and token 2 (from stream 60), both of message `[4; 16]`.
    fn ledger() -> Mutex<Ledger<&'static str>> {
        let limits = crate::core::deliveries::LedgerLimits {
            queue_len: 8,
            queue_bytes: 1 << 20,
            outstanding: 8,
            instance_bytes: 1 << 20,
        };
        let mut l = Ledger::new(limits, Default::default());
        assert_eq!(l.admit(&"i9", 50, [4; 16], 100), Ok(1));
        assert_eq!(l.admit(&"i8", 60, [4; 16], 100), Ok(2));
        Mutex::new(l)
    }

    /// A stream of `i1/alice`, its key, the fleet, and a manual clock.
    struct Fixture {
        id: Identity,
        key: PublicKey,
        fleet: FleetKey,
        policy: CheckPolicy,
        t0: Instant,
    }

    fn fixture() -> Fixture {
        let id = Identity::from_seed(&[7; 32]);
        let fleet = FleetSecret::from_bytes([9; 32]).key();
        Fixture {
            key: id.public_key(),
            id,
            policy: CheckPolicy {
                fleet: FleetKeys::new(fleet.clone()),
                window_ms: 60_000,
                verify_signatures: false,
                max_payload: 1024,
            },
            fleet,
            t0: Instant::now(),
        }
    }

    impl Fixture {
        fn stream(&self, verify: bool, receive: bool) -> AgentStream<'_> {
            let sender = SenderContext {
                instance: "i1",
                agent: "alice",
                key: &self.key,
            };
            AgentStream::new(sender, verify, receive)
        }

        fn now(&self, ms: u64) -> Now {
            Now {
                unix_ms: NOW_MS + ms,
                instant: self.t0 + Duration::from_millis(ms),
            }
        }

        /// A sealed envelope from `from` to `i2/bob`, id `[n; 16]`.
        fn envelope(&self, n: u8, from: (&str, &str)) -> Vec<u8> {
            EnvelopeBody {
                version: VERSION,
                id: [n; 16],
                from: Address {
                    instance: from.0,
                    agent: from.1,
                },
                to: Address {
                    instance: "i2",
                    agent: "bob",
                },
                sent_at_ms: NOW_MS,
                payload: b"hi",
            }
            .seal(&self.id, &self.fleet)
            .unwrap()
        }

        fn send(&self, n: u8) -> Bytes {
            self.send_envelope(&self.envelope(n, ("i1", "alice")))
        }

        fn send_envelope(&self, envelope: &[u8]) -> Bytes {
            frame(&PeerToRelay::Send { envelope })
        }
    }

    fn frame(f: &PeerToRelay<'_>) -> Bytes {
        Bytes::from(codec::encode_body(f).unwrap())
    }

    fn bucket(f: &Fixture, burst: u32) -> Mutex<TokenBucket> {
        Mutex::new(TokenBucket::new(1, burst, f.t0))
    }

    fn receipt(from: (&'static str, &'static str)) -> Receipt<'static> {
        Receipt {
            id: [4; 16],
            from: Address {
                instance: from.0,
                agent: from.1,
            },
            delivered_at_ms: NOW_MS,
        }
    }

    /// The actions with `Forward`s shortened to their ids (the rest of a
    /// forward is checked in `a_good_send_is_forwarded_as_its_own_bytes`).
    #[derive(Debug, PartialEq, Eq)]
    enum Short {
        Forward(u8),
        Refuse(u8, ErrorCode),
        RouteReceipt(u64),
        RouteFailed(u64, ErrorCode),
        DropReply(u8),
        Detach(bool),
        Close(ErrorCode),
    }

    fn short(actions: &[Action<'_>]) -> Vec<Short> {
        actions
            .iter()
            .map(|a| match a {
                Action::Forward { id, .. } => Short::Forward(id[0]),
                Action::Refuse { id, code } => Short::Refuse(id[0], *code),
                Action::RouteReceipt { token, .. } => Short::RouteReceipt(*token),
                Action::RouteFailed { token, code, .. } => Short::RouteFailed(*token, *code),
                Action::DropReply { id } => Short::DropReply(id[0]),
                Action::Detach { unroute } => Short::Detach(*unroute),
                Action::Close(code) => Short::Close(*code),
            })
            .collect()
    }

    #[test]
    fn a_good_send_is_forwarded_as_its_own_bytes() {
        let f = fixture();
        let frames = [f.send(1)];
        let actions = f.stream(true, false).on_frames(
            f.now(0),
            &f.policy,
            &frames,
            &bucket(&f, 10),
            &ledger(),
        );
        let [Action::Forward { id, to, envelope }] = &actions[..] else {
            panic!("{actions:?}");
        };
        assert_eq!(*id, [1; 16]);
        assert_eq!((to.instance, to.agent), ("i2", "bob"));
        assert_eq!(&envelope[..], &f.envelope(1, ("i1", "alice"))[..]);
        // A slice of the received frame, not a copy.
        assert!(frames[0].as_ptr_range().contains(&envelope.as_ptr()));
    }

    #[test]
    fn frames_in_actions_out() {
        let f = fixture();
        let good = f.send(1);
        let spoofed = f.send_envelope(&f.envelope(2, ("i1", "mallory")));
        let mut trailing = good.to_vec();
        trailing.push(0);
        let mut bad_address = f.envelope(3, ("i1", "alice"));
        let at = bad_address.windows(3).position(|w| w == b"bob").unwrap();
        bad_address[at + 1] = b'/'; // "b/b": not a valid agent id
        let ack = |reply_token, from| {
            frame(&PeerToRelay::Ack {
                reply_token,
                receipt: receipt(from),
            })
        };
        let own_ack = ack(1, ("i1", "alice"));
        let foreign_ack = ack(1, ("i1", "bob"));
        let nack = |reply_token, id| {
            frame(&PeerToRelay::Nack {
                reply_token,
                id,
                code: ErrorCode::TargetOffline,
            })
        };
        let detach = frame(&PeerToRelay::Detach);
        let attach = frame(&PeerToRelay::Attach {
            agent: "alice",
            receive: true,
        });
        let register = frame(&PeerToRelay::Register {
            instance_id: "i1",
            name: "n",
            proof: [0; 32],
        });
        use ErrorCode::*;
        use Short::*;
        let cases: Vec<(&str, bool, Vec<Bytes>, Vec<Short>)> = vec![
            ("good", false, vec![good.clone()], vec![Forward(1)]),
            (
                "sender mismatch is refused, the stream goes on",
                false,
                vec![spoofed, good.clone()],
                vec![Refuse(2, SenderMismatch), Forward(1)],
            ),
            (
                "trailing bytes close the stream after what came before",
                false,
                vec![good.clone(), Bytes::from(trailing), f.send(9)],
                vec![Forward(1), Close(Malformed)],
            ),
            (
                "unknown tag",
                false,
                vec![Bytes::from_static(&[0x7f, 0, 1])],
                vec![Close(Malformed)],
            ),
            (
                "empty frame",
                false,
                vec![Bytes::new()],
                vec![Close(Malformed)],
            ),
            (
                "attach on an agent stream",
                false,
                vec![attach],
                vec![Close(Malformed)],
            ),
            (
                "register on an agent stream",
                false,
                vec![register],
                vec![Close(Malformed)],
            ),
            (
                "undecodable envelope",
                false,
                vec![f.send_envelope(b"\x01\x02")],
                vec![Close(Malformed)],
            ),
            (
                "envelope with a bad address",
                false,
                vec![f.send_envelope(&bad_address)],
                vec![Close(BadAddress)],
            ),
            (
                "own ack is routed to the delivery's sender",
                false,
                vec![own_ack.clone()],
                vec![RouteReceipt(50)],
            ),
            (
                "a second reply for the same delivery is dropped",
                false,
                vec![own_ack.clone(), own_ack.clone(), nack(1, [4; 16])],
                vec![RouteReceipt(50), DropReply(4), DropReply(4)],
            ),
            (
                "a token not delivered to this stream is dropped",
                false,
                vec![ack(3, ("i1", "alice")), ack(50, ("i1", "alice"))],
                vec![DropReply(4), DropReply(4)],
            ),
            (
                "a reply naming another id than the delivery's is dropped",
                false,
                vec![nack(2, [5; 16]), nack(2, [4; 16])],
                vec![DropReply(5), RouteFailed(60, TargetOffline)],
            ),
            (
                "someone else's ack is refused to the acker",
                false,
                vec![foreign_ack],
                vec![Refuse(4, SenderMismatch)],
            ),
            (
                "nack is routed to the delivery's sender",
                false,
                vec![nack(2, [4; 16])],
                vec![RouteFailed(60, TargetOffline)],
            ),
            (
                "detach on a receiving stream unroutes before later forwards",
                true,
                vec![detach.clone(), good.clone()],
                vec![Detach(true), Forward(1)],
            ),
            (
                "detach on a send-only stream",
                false,
                vec![detach],
                vec![Detach(false)],
            ),
        ];
        for (case, receive, frames, want) in &cases {
            // A fresh ledger per case: deliveries 1 and 2 outstanding.
            let actions = f.stream(false, *receive).on_frames(
                f.now(0),
                &f.policy,
                frames,
                &bucket(&f, 10),
                &ledger(),
            );
            assert_eq!(&short(&actions), want, "{case}");
        }
    }

    #[test]
    fn stale_timestamps_and_bad_signatures_are_refused_by_id() {
        let f = fixture();
        let mut forged = f.envelope(2, ("i1", "alice"));
        let n = forged.len();
        forged[n - 1] ^= 1; // last byte of the signature
        let frames = [f.send(1), f.send_envelope(&forged), f.send(3)];
        let verifying = f.stream(true, false);
        let actions = verifying.on_frames(f.now(0), &f.policy, &frames, &bucket(&f, 10), &ledger());
        use Short::*;
        assert_eq!(
            short(&actions),
            [Forward(1), Refuse(2, ErrorCode::BadSignature), Forward(3)]
        );
        // Without verification at the relay, the receiver is the one to
        // refuse it.
        let actions = f.stream(false, false).on_frames(
            f.now(0),
            &f.policy,
            &frames,
            &bucket(&f, 10),
            &ledger(),
        );
        assert_eq!(short(&actions), [Forward(1), Forward(2), Forward(3)]);
        let late = f.now(60_001);
        let actions =
            verifying.on_frames(late, &f.policy, &frames[..1], &bucket(&f, 10), &ledger());
        assert_eq!(short(&actions), [Refuse(1, ErrorCode::StaleTimestamp)]);
    }

    #[test]
    fn refusals_come_before_forwards_and_the_rate_is_taken_per_checked_message() {
        let f = fixture();
        let rate = bucket(&f, 2);
        let spoofed = f.send_envelope(&f.envelope(2, ("i9", "alice")));
        let frames = [f.send(1), spoofed, f.send(3), f.send(4)];
        use Short::*;
        let actions =
            f.stream(false, false)
                .on_frames(f.now(0), &f.policy, &frames, &rate, &ledger());
        assert_eq!(
            short(&actions),
            [
                Refuse(2, ErrorCode::SenderMismatch),
                Forward(1),
                Forward(3),
                Refuse(4, ErrorCode::RateLimited),
            ]
        );
        // One token a second: a second later, one more message.
        let frames = [f.send(5), f.send(6)];
        let actions =
            f.stream(false, false)
                .on_frames(f.now(1000), &f.policy, &frames, &rate, &ledger());
        assert_eq!(
            short(&actions),
            [Forward(5), Refuse(6, ErrorCode::RateLimited)]
        );
    }

    #[test]
    fn an_unrouted_target_is_unknown_revoked_or_offline() {
        let record = |revoked| InstanceRecord {
            instance_id: "i2".into(),
            name: String::new(),
            public_key: String::new(),
            revoked,
        };
        assert_eq!(unrouted(None), ErrorCode::UnknownTarget);
        assert_eq!(unrouted(Some(&record(true))), ErrorCode::TargetRevoked);
        assert_eq!(unrouted(Some(&record(false))), ErrorCode::TargetOffline);
    }
}
