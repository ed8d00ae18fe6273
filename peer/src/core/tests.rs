//! Two agent cores and a scripted relay exchanging frames in memory, with
//! time advanced by hand (the shape of quinn-proto's `Pair` tests). The
//! relay here only routes, as PROTOCOL.md §9 says the real one does; the
//! relay's own checks are tested in the relay crate.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_link_crypto::{FleetKey, FleetSecret, Identity};
use agent_link_proto::{
    codec, Address, EnvelopeBody, ErrorCode, OpenedEnvelope, PeerToRelay, RelayToPeer, VERSION,
};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;
use crate::pins::Pins;

type Outcome = oneshot::Receiver<Result<Receipt, SendError>>;

const T0_MS: u64 = 1_700_000_000_000;

/// A manual clock: both readings move together.
#[derive(Clone, Copy)]
struct Clock {
    base: Instant,
    offset: Duration,
}

impl Clock {
    fn now(&self) -> Now {
        Now {
            at: self.base + self.offset,
            unix_ms: T0_MS + self.offset.as_millis() as u64,
        }
    }
    fn advance(&mut self, d: Duration) {
        self.offset += d;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Alice,
    Bob,
}

struct Peer {
    core: AgentCore,
    identity: Identity,
    instance: &'static str,
    agent: &'static str,
    /// Messages handed to the application.
    inbox: Vec<Message>,
    end: Option<SessionEnd>,
}

/// Two peers and a relay that routes between them.
struct Pair {
    clock: Clock,
    fleet: FleetKey,
    alice: Peer,
    bob: Peer,
    /// Whether bob's stream is routable (attached for receiving, not detached).
    bob_routable: bool,
    /// Frames in flight from the relay, per side.
    to_alice: Vec<Bytes>,
    to_bob: Vec<Bytes>,
}

fn peer(fleet: &FleetKey, instance: &'static str, agent: &'static str, receive: bool) -> Peer {
    let receiver = receiver::Receiver::new(
        instance,
        agent,
        fleet.clone(),
        Arc::new(Mutex::new(Pins::in_memory())),
        false,
    );
    Peer {
        core: AgentCore::new(
            instance,
            agent,
            receive,
            receiver,
            16,
            Arc::new(AtomicUsize::new(usize::MAX)),
        ),
        identity: Identity::generate(),
        instance,
        agent,
        inbox: Vec::new(),
        end: None,
    }
}

fn token(side: Side) -> u64 {
    match side {
        Side::Alice => 1,
        Side::Bob => 2,
    }
}

fn side_of(token: u64) -> Side {
    if token == 1 {
        Side::Alice
    } else {
        Side::Bob
    }
}

fn frame(f: &RelayToPeer<'_>) -> Bytes {
    Bytes::from(codec::frame(f).unwrap())
}

/// Frame bodies out of a run of encoded frames.
fn bodies(frames: &[Bytes]) -> Vec<Bytes> {
    let mut all = Vec::new();
    for f in frames {
        let mut rest = f.clone();
        while let Some((_, total)) = codec::split_frame(&rest, codec::HARD_MAX_FRAME).unwrap() {
            all.push(rest.slice(codec::FRAME_HEADER_LEN..total));
            rest = rest.slice(total..);
        }
        assert!(rest.is_empty(), "a whole number of frames");
    }
    all
}

impl Pair {
    /// Alice sends only; bob receives.
    fn new() -> Self {
        Self::with(false)
    }

    fn with(alice_receives: bool) -> Self {
        let fleet = FleetSecret::generate().key();
        let mut p = Pair {
            clock: Clock {
                base: Instant::now(),
                offset: Duration::ZERO,
            },
            alice: peer(&fleet, "inst-a", "alice", alice_receives),
            bob: peer(&fleet, "inst-b", "bob", true),
            fleet,
            bob_routable: false,
            to_alice: Vec::new(),
            to_bob: Vec::new(),
        };
        p.attach(Side::Alice);
        p.attach(Side::Bob);
        p
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Alice => &mut self.alice,
            Side::Bob => &mut self.bob,
        }
    }

    /// A stream opens: the attach goes out, the relay answers.
    fn attach(&mut self, side: Side) {
        let now = self.clock.now();
        let p = self.peer(side);
        p.core.start_attach();
        let mut out = Vec::new();
        p.core.take_out(&mut out);
        let bodies = bodies(&out);
        assert!(matches!(
            codec::decode::<PeerToRelay>(&bodies[0]).unwrap(),
            PeerToRelay::Attach { .. }
        ));
        let attached = frame(&RelayToPeer::Attached {
            agent: "x",
            max_message_size: 1 << 20,
            timestamp_window_ms: 60_000,
        });
        let body = attached.slice(codec::FRAME_HEADER_LEN..);
        self.peer(side)
            .core
            .on_attach_answer(now, &body)
            .expect("attached");
        if side == Side::Bob {
            self.bob_routable = true;
        }
        // Whatever the re-attach queued (re-sends) goes to the relay.
        let mut rest = Vec::new();
        self.peer(side).core.take_out(&mut rest);
        self.relay(side, &rest);
    }

    /// The stream of `side` breaks.
    fn lose(&mut self, side: Side) {
        self.peer(side).core.lost();
        match side {
            Side::Alice => self.to_alice.clear(),
            Side::Bob => {
                self.to_bob.clear();
                self.bob_routable = false;
            }
        }
    }

    /// Alice seals and sends, as `Agent::send` does.
    fn send(&mut self, payload: &[u8], timeout: Duration) -> ([u8; 16], Outcome) {
        self.send_with_id(rand::random(), payload, timeout)
    }

    /// Alice sends a message with this id (a fresh seal of it, as a second
    /// process of hers retrying would).
    fn send_with_id(
        &mut self,
        id: [u8; 16],
        payload: &[u8],
        timeout: Duration,
    ) -> ([u8; 16], Outcome) {
        let now = self.clock.now();
        let env = EnvelopeBody {
            version: VERSION,
            id,
            from: Address {
                instance: self.alice.instance,
                agent: self.alice.agent,
            },
            to: Address {
                instance: self.bob.instance,
                agent: self.bob.agent,
            },
            sent_at_ms: now.unix_ms,
            payload,
        }
        .seal(&self.alice.identity, &self.fleet)
        .unwrap();
        let frame = codec::frame(&PeerToRelay::Send { envelope: &env }).unwrap();
        let (reply, rx) = oneshot::channel();
        self.alice.core.send(Sealed {
            id,
            to: "inst-b/bob".into(),
            len: payload.len(),
            frame: Bytes::from(frame),
            deadline: now.at + timeout,
            reply,
        });
        self.flush(Side::Alice);
        (id, rx)
    }

    /// Move what `side` queued to the relay.
    fn flush(&mut self, side: Side) {
        let mut out = Vec::new();
        self.peer(side).core.take_out(&mut out);
        self.relay(side, &out);
    }

    /// The scripted relay: route frames from `from`'s stream.
    fn relay(&mut self, from: Side, frames: &[Bytes]) {
        for body in bodies(frames) {
            match codec::decode::<PeerToRelay>(&body).unwrap() {
                PeerToRelay::Send { envelope } => {
                    let env = OpenedEnvelope::open(envelope).unwrap();
                    if self.bob_routable {
                        let sender_key = self.peer(from).identity.public_key().0;
                        self.to_bob.push(frame(&RelayToPeer::Deliver {
                            reply_token: token(from),
                            sender_key,
                            envelope,
                        }));
                    } else {
                        self.push(
                            from,
                            frame(&RelayToPeer::Failed {
                                id: env.body.id,
                                code: ErrorCode::TargetOffline,
                            }),
                        );
                    }
                }
                PeerToRelay::Ack {
                    reply_token,
                    receipt,
                } => self.push(
                    side_of(reply_token),
                    frame(&RelayToPeer::Receipt { receipt }),
                ),
                PeerToRelay::Nack {
                    reply_token,
                    id,
                    code,
                } => self.push(
                    side_of(reply_token),
                    frame(&RelayToPeer::Failed { id, code }),
                ),
                PeerToRelay::Detach => {
                    if from == Side::Bob {
                        self.bob_routable = false;
                    }
                    self.push(from, frame(&RelayToPeer::Detached));
                }
                other => panic!("unexpected on an agent stream: {other:?}"),
            }
        }
    }

    fn push(&mut self, to: Side, f: Bytes) {
        match to {
            Side::Alice => self.to_alice.push(f),
            Side::Bob => self.to_bob.push(f),
        }
    }

    /// Hand `side` everything the relay has for it, in one read, and move
    /// its answers back to the relay.
    fn deliver(&mut self, side: Side) {
        let now = self.clock.now();
        let frames = match side {
            Side::Alice => std::mem::take(&mut self.to_alice),
            Side::Bob => std::mem::take(&mut self.to_bob),
        };
        let bodies = bodies(&frames);
        let p = self.peer(side);
        let mut got = Vec::new();
        if let Some(end) = p.core.on_frames(now, &bodies, &mut got) {
            p.end = Some(end);
        }
        // What the driver runs on a blocking thread, run here at once.
        if let Some(settle) = p.core.settle() {
            p.core.on_settled(now, settle.run(), &mut got);
        }
        p.inbox.extend(got);
        self.flush(side);
    }

    /// Run both sides until nothing moves (bounded).
    fn drive(&mut self) {
        for _ in 0..16 {
            if self.to_alice.is_empty() && self.to_bob.is_empty() {
                return;
            }
            self.deliver(Side::Bob);
            self.deliver(Side::Alice);
        }
        panic!("the pair did not settle");
    }

    /// Bob's application takes its oldest message.
    fn bob_takes(&mut self) -> Message {
        let now = self.clock.now();
        let m = self.bob.inbox.remove(0);
        self.bob.core.taken(now, m.id);
        self.flush(Side::Bob);
        m
    }
}

fn outcome(rx: &mut Outcome) -> Option<Result<Receipt, SendError>> {
    rx.try_recv().ok()
}

#[test]
fn the_receipt_waits_until_the_application_takes_the_message() {
    let mut p = Pair::new();
    let (id, mut rx) = p.send(b"hello bob", Duration::from_secs(30));
    p.drive();
    assert_eq!(p.bob.inbox.len(), 1, "handed to bob's application");
    assert_eq!(&p.bob.inbox[0].payload[..], b"hello bob");
    assert!(outcome(&mut rx).is_none(), "no receipt while only queued");
    p.clock.advance(Duration::from_millis(700));
    let m = p.bob_takes();
    assert_eq!(m.id.0, id);
    p.drive();
    let r = outcome(&mut rx).expect("an outcome").expect("delivered");
    assert_eq!(r.id.0, id);
    assert_eq!(r.to, "inst-b/bob", "the receipt names the receiver");
    assert_eq!(r.delivered_at_ms, T0_MS + 700, "the time it was taken");
    assert_eq!(p.alice.core.waiting(), 0);
}

#[test]
fn messages_not_taken_when_the_application_stops_are_refused_at_once() {
    // The false-receipt case: five arrive together, the application takes
    // one (`listen --count 1`) and stops.
    let mut p = Pair::new();
    let mut rxs: Vec<_> = (0..5)
        .map(|i| p.send(format!("m{i}").as_bytes(), Duration::from_secs(30)))
        .collect();
    p.drive();
    assert_eq!(p.bob.inbox.len(), 5);
    let taken = p.bob_takes();
    assert!(p.bob.core.detach(), "waits for Detached");
    p.flush(Side::Bob);
    p.drive();
    assert!(p.bob.core.is_detached());
    let mut delivered = 0;
    for (id, rx) in &mut rxs {
        match outcome(rx).expect("every sender has its outcome now") {
            Ok(r) => {
                assert_eq!(r.id.0, *id);
                assert_eq!(r.id, taken.id, "only the message taken is delivered");
                delivered += 1;
            }
            Err(SendError::Refused(ErrorCode::TargetOffline)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(delivered, 1);
    assert_eq!(p.bob.core.untaken(), 0);
}

#[test]
fn a_delivery_that_arrives_while_detaching_is_refused_not_handed_over() {
    let mut p = Pair::new();
    assert!(p.bob.core.detach());
    // Bob's Detach is on its way; a message was routed to bob before the
    // relay read it.
    let (_, mut rx) = p.send(b"late", Duration::from_secs(30));
    p.flush(Side::Bob);
    p.drive();
    assert!(
        p.bob.inbox.is_empty(),
        "never handed to a stopping application"
    );
    assert!(matches!(
        outcome(&mut rx),
        Some(Err(SendError::Refused(ErrorCode::TargetOffline)))
    ));
    assert!(p.bob.core.is_detached());
}

#[test]
fn a_retry_of_a_message_not_yet_taken_is_answered_when_it_is_taken() {
    let mut p = Pair::new();
    let (id, mut rx) = p.send(b"once", Duration::from_secs(30));
    p.drive();
    assert_eq!(p.bob.inbox.len(), 1);
    // Alice's stream breaks and comes back: the outbox re-sends the same
    // bytes; bob's replay window knows the id.
    p.lose(Side::Alice);
    p.clock.advance(Duration::from_secs(1));
    p.attach(Side::Alice);
    p.drive();
    assert_eq!(p.bob.inbox.len(), 1, "the retry is not handed over twice");
    assert!(
        outcome(&mut rx).is_none(),
        "and not acknowledged before it is taken"
    );
    let m = p.bob_takes();
    p.drive();
    assert_eq!(m.id.0, id);
    assert!(matches!(outcome(&mut rx), Some(Ok(r)) if r.id.0 == id));
}

#[test]
fn a_daemon_confirms_with_the_time_it_stored_and_every_copy_says_so() {
    let mut p = Pair::new();
    let (id, mut rx) = p.send(b"stored", Duration::from_secs(30));
    p.drive();
    let m = p.bob.inbox.remove(0);
    p.clock.advance(Duration::from_millis(40));
    // Stored (perhaps before a restart) at a time of the daemon's choosing.
    p.bob.core.resolve(p.clock.now(), m.id, Take::At(T0_MS + 3));
    p.flush(Side::Bob);
    p.drive();
    let r = outcome(&mut rx).expect("an outcome").expect("delivered");
    assert_eq!((r.id.0, r.delivered_at_ms), (id, T0_MS + 3));
}

#[test]
fn a_refused_delivery_is_refused_by_name_and_its_retry_is_new_not_a_receipt() {
    let mut p = Pair::new();
    let (id, mut rx) = p.send(b"full", Duration::from_secs(30));
    p.drive();
    let m = p.bob.inbox.remove(0);
    p.bob
        .core
        .resolve(p.clock.now(), m.id, Take::Refuse(ErrorCode::InboxFull));
    p.flush(Side::Bob);
    p.drive();
    assert!(matches!(
        outcome(&mut rx),
        Some(Err(SendError::Refused(ErrorCode::InboxFull)))
    ));
    // The same id again (as a sender's retry would be): handed over anew,
    // not answered with a receipt for a message that was never stored.
    let (id2, mut rx2) = p.send_with_id(id, b"full", Duration::from_secs(30));
    assert_eq!(id2, id);
    p.drive();
    assert_eq!(p.bob.inbox.len(), 1, "checked as new");
    assert!(outcome(&mut rx2).is_none(), "no receipt before it is taken");
}

#[test]
fn a_duplicate_after_the_take_gets_the_first_receipt_time() {
    let mut p = Pair::new();
    let (_, mut rx) = p.send(b"x", Duration::from_secs(30));
    p.drive();
    p.clock.advance(Duration::from_millis(5));
    p.bob_takes();
    // The receipt is lost with alice's stream; the re-send after the
    // reconnect gets the same receipt (same time) from bob.
    p.to_alice.clear();
    p.lose(Side::Alice);
    p.clock.advance(Duration::from_secs(2));
    p.attach(Side::Alice);
    p.drive();
    let r = outcome(&mut rx).unwrap().unwrap();
    assert_eq!(r.delivered_at_ms, T0_MS + 5);
    assert!(p.bob.inbox.is_empty(), "delivered once");
}

#[test]
fn resends_after_a_reconnect_are_byte_identical_and_oldest_first() {
    let mut p = Pair::new();
    p.lose(Side::Bob);
    let (a, _ra) = p.send(b"first", Duration::from_secs(30));
    let (b, _rb) = p.send(b"second", Duration::from_secs(30));
    // Bob was away: the relay answered TargetOffline; alice is not in a
    // re-attach grace, so both fail... unless alice re-attached. Here alice
    // re-attaches first, so they are re-sent.
    p.to_alice.clear();
    p.lose(Side::Alice);
    p.attach(Side::Bob);
    p.attach(Side::Alice);
    p.drive();
    let ids: Vec<_> = p.bob.inbox.iter().map(|m| m.id.0).collect();
    assert_eq!(ids, vec![a, b]);
}

#[test]
fn target_offline_right_after_a_reattach_is_retried_inside_the_grace() {
    let mut p = Pair::new();
    p.lose(Side::Alice);
    p.attach(Side::Alice); // a re-attach: the grace opens
    p.lose(Side::Bob); // bob not back yet
    let (id, mut rx) = p.send(b"soon", Duration::from_secs(30));
    p.deliver(Side::Alice);
    assert!(outcome(&mut rx).is_none(), "retrying, not failed");
    p.attach(Side::Bob);
    p.clock.advance(outbox::RETRY_DELAY);
    let now = p.clock.now();
    p.alice.core.poll(now);
    p.flush(Side::Alice);
    p.drive();
    assert_eq!(p.bob.inbox.len(), 1);
    p.bob_takes();
    p.drive();
    assert!(matches!(outcome(&mut rx), Some(Ok(r)) if r.id.0 == id));
}

#[test]
fn target_offline_on_a_first_attach_fails_at_once() {
    let mut p = Pair::new();
    p.lose(Side::Bob);
    let (_, mut rx) = p.send(b"nobody", Duration::from_secs(30));
    p.deliver(Side::Alice);
    assert!(matches!(
        outcome(&mut rx),
        Some(Err(SendError::Refused(ErrorCode::TargetOffline)))
    ));
}

#[test]
fn a_send_without_an_answer_times_out_at_its_deadline() {
    let mut p = Pair::new();
    let (_, mut rx) = p.send(b"into the void", Duration::from_secs(2));
    p.to_bob.clear(); // lost in transit
    p.clock.advance(Duration::from_millis(1999));
    let now = p.clock.now();
    p.alice.core.poll(now);
    assert!(outcome(&mut rx).is_none());
    p.clock.advance(Duration::from_millis(1));
    let now = p.clock.now();
    p.alice.core.poll(now);
    assert!(matches!(outcome(&mut rx), Some(Err(SendError::Timeout))));
    assert_eq!(p.alice.core.waiting(), 0);
}

#[test]
fn sends_while_disconnected_wait_for_the_attach() {
    let mut p = Pair::new();
    p.lose(Side::Alice);
    let (id, mut rx) = p.send(b"later", Duration::from_secs(30));
    assert!(p.to_bob.is_empty(), "nothing written without a stream");
    p.attach(Side::Alice);
    p.drive();
    p.bob_takes();
    p.drive();
    assert!(matches!(outcome(&mut rx), Some(Ok(r)) if r.id.0 == id));
}

#[test]
fn replaced_ends_the_agent_for_good_and_shutting_down_only_the_session() {
    let mut p = Pair::new();
    p.to_bob.push(frame(&RelayToPeer::Error {
        code: ErrorCode::Replaced,
    }));
    p.deliver(Side::Bob);
    assert_eq!(p.bob.end, Some(SessionEnd::Fatal(ErrorCode::Replaced)));
    p.to_alice.push(frame(&RelayToPeer::Error {
        code: ErrorCode::ShuttingDown,
    }));
    p.deliver(Side::Alice);
    assert_eq!(p.alice.end, Some(SessionEnd::Lost));
}

#[test]
fn a_delivery_on_a_send_only_stream_is_refused_by_name() {
    let mut p = Pair::with(false);
    let env = EnvelopeBody {
        version: VERSION,
        id: [7; 16],
        from: Address {
            instance: "inst-b",
            agent: "bob",
        },
        to: Address {
            instance: "inst-a",
            agent: "alice",
        },
        sent_at_ms: T0_MS,
        payload: b"x",
    }
    .seal(&p.bob.identity, &p.fleet)
    .unwrap();
    p.to_alice.push(frame(&RelayToPeer::Deliver {
        reply_token: 2,
        sender_key: p.bob.identity.public_key().0,
        envelope: &env,
    }));
    let now = p.clock.now();
    let bodies = bodies(&std::mem::take(&mut p.to_alice));
    let mut got = Vec::new();
    assert!(p.alice.core.on_frames(now, &bodies, &mut got).is_none());
    assert!(got.is_empty());
    let mut out = Vec::new();
    p.alice.core.take_out(&mut out);
    let b = self::bodies(&out);
    assert_eq!(
        codec::decode::<PeerToRelay>(&b[0]).unwrap(),
        PeerToRelay::Nack {
            reply_token: 2,
            id: [7; 16],
            code: ErrorCode::NotAttached
        }
    );
}

#[test]
fn a_forged_delivery_is_refused_and_never_handed_over() {
    let mut p = Pair::new();
    let (_, mut rx) = p.send(b"real", Duration::from_secs(30));
    // Tamper with the delivery in flight: flip a payload byte.
    let f = p.to_bob.pop().unwrap();
    let mut bytes = f.to_vec();
    let last = bytes.len() - 70; // inside the signed body
    bytes[last] ^= 1;
    p.to_bob.push(Bytes::from(bytes));
    p.drive();
    assert!(p.bob.inbox.is_empty());
    assert!(matches!(outcome(&mut rx), Some(Err(SendError::Refused(_)))));
}

#[test]
fn an_oversized_send_is_refused_before_it_is_queued() {
    let mut p = Pair::new();
    p.alice
        .core
        .max_size
        .store(4, std::sync::atomic::Ordering::Relaxed);
    let (_, mut rx) = p.send(b"too long", Duration::from_secs(30));
    assert!(matches!(
        outcome(&mut rx),
        Some(Err(SendError::TooLarge { len: 8, max: 4 }))
    ));
    assert!(p.to_bob.is_empty());
}
