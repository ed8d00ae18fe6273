//! The sans-IO core of one attached agent: every decision of its stream,
//! with no socket, no task and no clock inside (`now` is passed in), in the
//! way `quinn-proto` sits under `quinn`. The driver (`task.rs`) feeds it
//! events — the relay's frames, the application's sends and takes, time —
//! and writes the frames it queues ([`AgentCore::take_out`]) to the stream.
//!
//! The promises it keeps:
//! - every send ends in exactly one outcome (receipt, refusal, timeout,
//!   closed), kept across reconnects by the [`outbox`] and re-sent byte for
//!   byte, so the receiver's replay window recognises a retry;
//! - a receipt (`Ack`) is sent only once the application has *taken* the
//!   message ([`AgentCore::taken`]), never when it is merely queued for it;
//! - a message the application never takes (it stopped) is refused by name
//!   (`TargetOffline`) at once, through the detach handshake
//!   (PROTOCOL.md §9.6), so its sender learns now rather than at its
//!   deadline.

pub(crate) mod backoff;
pub(crate) mod outbox;
pub(crate) mod receiver;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use agent_link_proto::{
    codec, Address, ErrorCode, OpenedEnvelope, PeerToRelay, Receipt as WireReceipt, RelayToPeer,
};
use bytes::Bytes;
use tokio::time::Instant;
use tracing::debug;

use crate::error::{CloseReason, SendError};
use crate::message::{Message, MessageId, Receipt};
use crate::pins::{Settle, Settled};
use outbox::{Outbox, Reply, RECONNECT_GRACE};
use receiver::{Delivered, FirstContact, Receiver, Signed, Verdict};

/// The two clocks the core reads, both passed in: monotonic for deadlines
/// and retries, wall-clock milliseconds for timestamps and receipts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) at: Instant,
    pub(crate) unix_ms: u64,
}

/// A message sealed by the caller (once), ready for the outbox.
pub(crate) struct Sealed {
    pub(crate) id: agent_link_proto::MessageId,
    pub(crate) to: String,
    pub(crate) len: usize,
    pub(crate) frame: Bytes,
    pub(crate) deadline: Instant,
    pub(crate) reply: Reply,
}

/// What the application did with a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Took it now: the receipt carries the current time.
    Now,
    /// Took it at this time (Unix ms): the daemon stored it then, perhaps
    /// before a restart, and every copy's receipt says so.
    At(u64),
    /// Refused it (the daemon's inbox is full): every copy is refused
    /// with this code and the id is forgotten, so a later retry is new.
    Refuse(ErrorCode),
}

/// How a session (one attach on one stream) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The application is gone (or the link closed): stop.
    Stop,
    /// The stream or connection broke: wait for a connection, re-attach.
    Lost,
    /// A refusal that retrying will not fix.
    Fatal(ErrorCode),
}

/// Where the agent's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No stream (not yet, or the last one broke).
    Idle,
    /// `Attach` written, waiting for `Attached`.
    Attaching,
    /// Attached: frames flow.
    Attached,
    /// `Detach` written; refusing deliveries until `Detached`.
    Detaching,
    /// `Detached` read: nothing more will arrive; finish the stream.
    Detached,
}

/// A delivery handed to the application and not taken yet: its reply
/// tokens (a retry of the same message after the sender reconnected comes
/// with a new one) wait for [`AgentCore::taken`].
#[derive(Debug)]
struct Pending {
    from: String,
    sent_at_ms: u64,
    token: u64,
    /// Tokens of retries that came before the take (rare: no allocation
    /// for the usual single copy).
    more: Vec<u64>,
}

/// One agent's protocol state machine.
pub(crate) struct AgentCore {
    instance: String,
    agent: String,
    receive: bool,
    phase: Phase,
    outbox: Outbox,
    receiver: Receiver,
    /// The relay's `max_message_size`, shared with the handle so it can
    /// refuse an oversized payload before sealing it.
    max_size: Arc<AtomicUsize>,
    attached_before: bool,
    /// End of the post-reconnect grace (see `outbox`).
    grace_until: Option<Instant>,
    pending: HashMap<agent_link_proto::MessageId, Pending>,
    /// Verified deliveries from senders with no pinned key, with their
    /// reply tokens, waiting for [`AgentCore::settle`] to be run.
    first_contacts: Vec<(u64, FirstContact)>,
    /// Frames to write, in order.
    out: Vec<Bytes>,
    /// Which fleet-key change the receiver's keys are from.
    fleet_generation: u64,
}

impl AgentCore {
    /// The timestamp window deliveries are checked with.
    pub(crate) fn window_ms(&self) -> u64 {
        self.receiver.window_ms()
    }

    /// Which fleet-key change deliveries are checked under.
    pub(crate) fn fleet_generation(&self) -> u64 {
        self.fleet_generation
    }

    /// Check deliveries under `keys` from now on (a rotated fleet secret),
    /// change `generation` of the link's.
    pub(crate) fn set_fleet(&mut self, generation: u64, keys: agent_link_crypto::FleetKeys) {
        self.fleet_generation = generation;
        self.receiver.set_fleet(keys);
    }

    pub(crate) fn new(
        instance: &str,
        agent: &str,
        receive: bool,
        receiver: Receiver,
        outbox_limit: usize,
        max_size: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            instance: instance.to_string(),
            agent: agent.to_string(),
            receive,
            phase: Phase::Idle,
            outbox: Outbox::new(outbox_limit),
            receiver,
            max_size,
            attached_before: false,
            grace_until: None,
            pending: HashMap::new(),
            first_contacts: Vec::new(),
            fleet_generation: 0,
            out: Vec::new(),
        }
    }

    fn me(&self) -> Address<'_> {
        Address {
            instance: &self.instance,
            agent: &self.agent,
        }
    }

    /// A new stream: queue the `Attach` frame.
    pub(crate) fn start_attach(&mut self) {
        self.out.clear();
        self.phase = Phase::Attaching;
        let attach = encode(&PeerToRelay::Attach {
            agent: &self.agent,
            receive: self.receive,
        });
        self.out.push(attach);
    }

    /// The relay's answer to `Attach` (the stream's first frame). On
    /// success, everything still waiting is queued again, oldest first,
    /// byte for byte; a re-attach opens the `TargetOffline` grace.
    pub(crate) fn on_attach_answer(&mut self, now: Now, body: &[u8]) -> Result<(), SessionEnd> {
        match codec::decode::<RelayToPeer>(body) {
            Ok(RelayToPeer::Attached {
                max_message_size,
                timestamp_window_ms,
                ..
            }) => {
                self.max_size
                    .store(max_message_size as usize, Ordering::Relaxed);
                self.receiver
                    .set_window(timestamp_window_ms, !self.attached_before);
                if self.attached_before {
                    self.grace_until = Some(now.at + RECONNECT_GRACE);
                }
                self.attached_before = true;
                self.phase = Phase::Attached;
                self.outbox.resend_all(&mut self.out);
                debug!(agent = %self.agent, waiting = self.outbox.len(), "attached");
                Ok(())
            }
            Ok(RelayToPeer::Error { code }) => Err(classify(code)),
            _ => Err(SessionEnd::Lost),
        }
    }

    /// Messages waiting for an outcome.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.outbox.len()
    }

    /// Deliveries handed over and not taken.
    #[cfg(test)]
    pub(crate) fn untaken(&self) -> usize {
        self.pending.len()
    }

    /// A sealed message from the application: into the outbox, and onto the
    /// stream when attached (otherwise it goes out at the next attach).
    pub(crate) fn send(&mut self, s: Sealed) {
        let max = self.max_size.load(Ordering::Relaxed);
        if s.len > max {
            // The limit can shrink on a re-attach to a reconfigured relay.
            let _ = s.reply.send(Err(SendError::TooLarge { len: s.len, max }));
            return;
        }
        if matches!(self.phase, Phase::Detaching | Phase::Detached) {
            let _ = s
                .reply
                .send(Err(SendError::Closed(CloseReason::AgentClosed)));
            return;
        }
        debug!(agent = %self.agent, id = %hex::encode(s.id), len = s.len, "send");
        let frame = s.frame.clone();
        let now = self.phase == Phase::Attached;
        if self
            .outbox
            .insert(s.id, s.to, s.frame, s.deadline, s.reply, now)
            && now
        {
            self.out.push(frame);
        }
    }

    /// Frames read together from the stream. Deliveries that pass every
    /// check are pushed to `deliver` for the application (and wait in
    /// `pending` for [`AgentCore::taken`]); everything else is answered or
    /// resolved here, except deliveries from senders with no pinned key:
    /// for those [`AgentCore::settle`] hands out file work, to be run off
    /// the async task and its result given to [`AgentCore::on_settled`].
    /// Returns how the session ends, if it does.
    pub(crate) fn on_frames(
        &mut self,
        now: Now,
        frames: &[Bytes],
        deliver: &mut Vec<Message>,
    ) -> Option<SessionEnd> {
        // Each frame is decoded once.
        let mut decoded = Vec::with_capacity(frames.len());
        for body in frames {
            match codec::decode::<RelayToPeer>(body) {
                Ok(f) => decoded.push((body, f)),
                Err(e) => {
                    debug!("undecodable frame from the relay: {e}");
                    return Some(SessionEnd::Lost);
                }
            }
        }
        // Deliveries that arrived together: their signatures in one Ed25519
        // batch; every other check per message.
        let signed = if self.receive && self.phase == Phase::Attached {
            let items: Vec<Delivered<'_>> = decoded
                .iter()
                .filter_map(|(_, f)| match f {
                    RelayToPeer::Deliver {
                        sender_key,
                        envelope,
                        ..
                    } => Some(Delivered {
                        sender_key: *sender_key,
                        envelope,
                    }),
                    _ => None,
                })
                .collect();
            if items.len() >= 2 {
                self.receiver.verify_batch(&items)
            } else {
                Vec::new()
            }
        } else {
            Vec::new()
        };
        let mut nth_delivery = 0;
        for (body, frame) in decoded {
            match frame {
                RelayToPeer::Receipt { receipt } => {
                    self.outbox.receipt(Receipt {
                        id: MessageId(receipt.id),
                        to: receipt.from.to_string(),
                        delivered_at_ms: receipt.delivered_at_ms,
                    });
                }
                RelayToPeer::Failed { id, code } => {
                    let outcome = self.outbox.failed(&id, code, now.at, self.grace_until);
                    debug!(agent = %self.agent, id = %hex::encode(id), ?code, ?outcome, "failed");
                }
                RelayToPeer::Deliver {
                    reply_token,
                    sender_key,
                    envelope,
                } => {
                    let s = signed
                        .get(nth_delivery)
                        .copied()
                        .unwrap_or(Signed::Unchecked);
                    nth_delivery += 1;
                    let envelope = body.slice_ref(envelope);
                    self.on_deliver(now, reply_token, sender_key, &envelope, s, deliver);
                }
                RelayToPeer::Detached => {
                    if self.phase == Phase::Detaching {
                        self.phase = Phase::Detached;
                    }
                }
                RelayToPeer::Error { code } => return Some(classify(code)),
                // Control-stream frames have no place here.
                RelayToPeer::Registered { .. }
                | RelayToPeer::Status { .. }
                | RelayToPeer::StatusPage { .. }
                | RelayToPeer::FleetSecret { .. }
                | RelayToPeer::Attached { .. } => return Some(SessionEnd::Lost),
            }
        }
        None
    }

    fn on_deliver(
        &mut self,
        now: Now,
        reply_token: u64,
        sender_key: [u8; 32],
        envelope: &Bytes,
        signed: Signed,
        deliver: &mut Vec<Message>,
    ) {
        if !self.receive || self.phase != Phase::Attached {
            // A send-only stream should never get one; a detaching agent
            // will not hand it to its application. Refuse by name rather
            // than leave the sender waiting for its deadline.
            let id = OpenedEnvelope::open(envelope).map_or([0; 16], |e| e.body.id);
            let code = if self.receive {
                ErrorCode::TargetOffline
            } else {
                ErrorCode::NotAttached
            };
            self.nack(reply_token, id, code);
            return;
        }
        let verdict = self
            .receiver
            .check(sender_key, envelope, now.unix_ms, signed);
        self.apply(reply_token, verdict, deliver);
    }

    /// The file work that settles the pins of the first contacts waiting
    /// (none: nothing to do). Blocking: run it on a blocking thread.
    pub(crate) fn settle(&self) -> Option<Settle> {
        if self.first_contacts.is_empty() {
            return None;
        }
        Some(
            self.receiver
                .settle(self.first_contacts.iter().map(|(_, c)| c)),
        )
    }

    /// The settle ran: finish every first contact that waited for it, in
    /// arrival order (`Err`: the pins file could not be read or written).
    pub(crate) fn on_settled(
        &mut self,
        now: Now,
        settled: Result<Settled, String>,
        deliver: &mut Vec<Message>,
    ) {
        if let Ok(s) = &settled {
            self.receiver.install(s);
        }
        for (token, contact) in std::mem::take(&mut self.first_contacts) {
            let verdict = self.receiver.settled(contact, &settled, now.unix_ms);
            self.apply(token, verdict, deliver);
        }
    }

    fn apply(&mut self, reply_token: u64, verdict: Verdict, deliver: &mut Vec<Message>) {
        match verdict {
            Verdict::FirstContact(c) => self.first_contacts.push((reply_token, c)),
            Verdict::Deliver(m) => {
                self.pending.insert(
                    m.id.0,
                    Pending {
                        from: m.from.clone(),
                        sent_at_ms: m.sent_at_ms,
                        token: reply_token,
                        more: Vec::new(),
                    },
                );
                deliver.push(m);
            }
            Verdict::Duplicate {
                id,
                delivered_at_ms,
            } => match self.pending.get_mut(&id) {
                // Its first copy is still waiting for the application: this
                // one is answered when that one is taken, not before.
                Some(p) => p.more.push(reply_token),
                None => self.ack(reply_token, id, delivered_at_ms),
            },
            Verdict::Refuse { id, code } => {
                debug!(agent = %self.agent, id = %hex::encode(id), ?code, "delivery refused");
                self.nack(reply_token, id, code);
            }
        }
    }

    /// The application took message `id` (its `recv` returned it): now, and
    /// only now, the receipt goes back, for every copy that came.
    #[cfg(test)]
    pub(crate) fn taken(&mut self, now: Now, id: MessageId) {
        self.resolve(now, id, Take::Now);
    }

    /// The application's answer for message `id` (see [`Take`]): the
    /// receipt, or the refusal, for every copy that came.
    pub(crate) fn resolve(&mut self, now: Now, id: MessageId, how: Take) {
        let Some(p) = self.pending.remove(&id.0) else {
            return;
        };
        let at = match how {
            Take::Now => now.unix_ms,
            Take::At(ms) => ms,
            Take::Refuse(code) => {
                self.receiver.refused(&p.from, id);
                for token in std::iter::once(p.token).chain(p.more) {
                    self.nack(token, id.0, code);
                }
                return;
            }
        };
        self.receiver.taken(&p.from, id, p.sent_at_ms, at);
        for token in std::iter::once(p.token).chain(p.more) {
            self.ack(token, id.0, at);
        }
    }

    /// When [`poll`](Self::poll) next has something to do: the earliest
    /// deadline, or a due retry (retries go out only while attached, so
    /// they count only then). `None` while nothing waits: an idle agent
    /// needs no timer at all.
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        self.outbox.next_wake(self.phase == Phase::Attached)
    }

    /// Time passed: expire deadlines, queue due retries.
    pub(crate) fn poll(&mut self, now: Now) {
        self.outbox.expire(now.at);
        if self.phase == Phase::Attached {
            self.outbox.take_due(now.at, &mut self.out);
        }
    }

    /// The application stopped: refuse every delivery it did not take, and
    /// (when attached) ask the relay to stop routing to this stream. Returns
    /// whether to wait for `Detached`.
    pub(crate) fn detach(&mut self) -> bool {
        for (token, c) in std::mem::take(&mut self.first_contacts) {
            self.nack(token, c.id(), ErrorCode::TargetOffline);
        }
        for (id, p) in std::mem::take(&mut self.pending) {
            for token in std::iter::once(p.token).chain(p.more) {
                self.nack(token, id, ErrorCode::TargetOffline);
            }
        }
        // A send-only stream gets no deliveries: nothing to wait for.
        if self.phase != Phase::Attached || !self.receive {
            return false;
        }
        self.phase = Phase::Detaching;
        self.out.push(encode(&PeerToRelay::Detach));
        true
    }

    /// Whether the relay has confirmed the detach.
    pub(crate) fn is_detached(&self) -> bool {
        self.phase == Phase::Detached
    }

    /// The stream broke. Waiting sends stay for the next attach; deliveries
    /// not taken stay too, but their receipts cannot reach their senders any
    /// more: the relay accepts a reply only on the stream the delivery was
    /// written to, and has told their senders `TargetOffline` (PROTOCOL.md
    /// §9.5). An `Ack` sent on the next stream is dropped there; a sender
    /// that re-sends gets the duplicate's receipt.
    pub(crate) fn lost(&mut self) {
        if self.phase != Phase::Detached {
            self.phase = Phase::Idle;
        }
        self.out.clear();
    }

    /// End every waiting send with the error `why` makes.
    pub(crate) fn fail_all(&mut self, why: impl Fn() -> SendError) {
        self.outbox.fail_all(why);
    }

    /// Frames to write now, in order.
    pub(crate) fn take_out(&mut self, into: &mut Vec<Bytes>) {
        into.append(&mut self.out);
    }

    fn ack(&mut self, reply_token: u64, id: agent_link_proto::MessageId, delivered_at_ms: u64) {
        let receipt = WireReceipt {
            id,
            from: self.me(),
            delivered_at_ms,
        };
        let f = encode(&PeerToRelay::Ack {
            reply_token,
            receipt,
        });
        self.out.push(f);
    }

    fn nack(&mut self, reply_token: u64, id: agent_link_proto::MessageId, code: ErrorCode) {
        self.out.push(encode(&PeerToRelay::Nack {
            reply_token,
            id,
            code,
        }));
    }
}

/// Encode a frame this side builds. Its fields are ids, tokens and codes of
/// bounded size (or an envelope the caller already sized), so encoding
/// cannot fail.
pub(crate) fn encode(f: &PeerToRelay<'_>) -> Bytes {
    Bytes::from(codec::frame(f).expect("a frame of bounded fields always encodes"))
}

/// Which refusals on an agent stream end the agent for good; the others
/// (e.g. the relay shutting down) are worth a re-attach.
pub(crate) fn classify(code: ErrorCode) -> SessionEnd {
    match code {
        ErrorCode::Replaced
        | ErrorCode::NotRegistered
        | ErrorCode::Revoked
        | ErrorCode::BadAddress
        | ErrorCode::TooManyStreams
        | ErrorCode::TooManyConnections => SessionEnd::Fatal(code),
        _ => SessionEnd::Lost,
    }
}
