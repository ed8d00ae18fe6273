//! One receiving stream's deliveries (PROTOCOL.md §9.4 step 8, §9.5): which
//! are queued for its writer, which are outstanding (written or queued, not
//! yet answered), and who sent each. The relay keeps one [`Ledger`] per
//! agent stream; it decides
//!
//! - whether a delivery may be queued ([`Ledger::admit`]): within the
//!   stream's queue (frames and bytes), its outstanding bound, the target
//!   instance's byte budget, and the sender's share of each, so one sender
//!   at full rate cannot keep an agent `Busy` for everyone else;
//! - whether a reply is genuine ([`Ledger::reply`]): an `Ack`/`Nack` counts
//!   only on the stream the delivery was written to, for a token outstanding
//!   there with the same message id, and only once;
//! - what the senders are owed when the stream ends ([`Ledger::close`]):
//!   every outstanding delivery becomes `Failed{id, TargetOffline}`.
//!
//! Bounds: at most `outstanding` entries (each about 64 bytes plus the
//! sender's name, shared), of which at most `queue_len` frames and
//! `queue_bytes` bytes queued; each sender at most `1/SENDER_SHARE` of each
//! (at least one delivery). Plain data behind the caller's mutex: no clock,
//! no I/O.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use agent_link_proto::{ErrorCode, MessageId};

/// Each sender may hold at most this fraction (1/n) of a stream's queue
/// slots, queued bytes and outstanding entries (but always one delivery):
/// a flood from one sender leaves the other three quarters to the rest.
pub const SENDER_SHARE: usize = 4;

/// Outstanding deliveries allowed per stream, as a multiple of its queue
/// length: the queue plus what the receiver holds unanswered (in QUIC
/// buffers and in its application's hands).
pub const OUTSTANDING_PER_QUEUE_SLOT: usize = 4;

/// A stream's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerLimits {
    /// Deliveries queued and not yet written (`agent_queue_len`).
    pub queue_len: usize,
    /// Bytes of those (`agent_queue_bytes`).
    pub queue_bytes: usize,
    /// Deliveries not yet answered, queued ones included.
    pub outstanding: usize,
    /// Bytes queued across all of the target instance's streams
    /// (`instance_queue_bytes`).
    pub instance_bytes: usize,
}

impl LedgerLimits {
    /// The limits of the relay's configuration.
    pub fn of(cfg: &crate::RelayConfig) -> Self {
        Self {
            queue_len: cfg.agent_queue_len as usize,
            queue_bytes: cfg.agent_queue_bytes as usize,
            outstanding: cfg.agent_queue_len as usize * OUTSTANDING_PER_QUEUE_SLOT,
            instance_bytes: cfg.instance_queue_bytes as usize,
        }
    }
}

#[derive(Debug)]
struct Entry<S> {
    sender: S,
    reply_to: u64,
    id: MessageId,
    /// Bytes while queued; 0 once written.
    queued: usize,
}

/// What one sender holds of a stream.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    outstanding: usize,
    frames: usize,
    bytes: usize,
}

/// One stream's deliveries; `S` names a sender (the relay uses the sending
/// instance, so a member cannot widen its share by opening more streams).
#[derive(Debug)]
pub struct Ledger<S> {
    limits: LedgerLimits,
    /// Bytes queued across the target instance's streams, shared by their
    /// ledgers.
    instance: Arc<AtomicUsize>,
    next: u64,
    entries: super::TokenMap<Entry<S>>,
    frames: usize,
    bytes: usize,
    senders: HashMap<S, Usage>,
    closed: bool,
}

impl<S: Clone + Eq + Hash> Ledger<S> {
    /// An empty ledger; `instance` counts the target instance's queued
    /// bytes over all its streams.
    pub fn new(limits: LedgerLimits, instance: Arc<AtomicUsize>) -> Self {
        Self {
            limits,
            instance,
            next: 0,
            entries: super::TokenMap::default(),
            frames: 0,
            bytes: 0,
            senders: HashMap::new(),
            closed: false,
        }
    }

    /// Take a delivery of `bytes` (the whole `Deliver` frame) from `sender`,
    /// whose stream is `reply_to`, for message `id`: its reply token on this
    /// stream, or why not (`Busy`: a bound or the sender's share is
    /// reached; `TargetOffline`: the stream has ended).
    pub fn admit(
        &mut self,
        sender: &S,
        reply_to: u64,
        id: MessageId,
        bytes: usize,
    ) -> Result<u64, ErrorCode> {
        if self.closed {
            return Err(ErrorCode::TargetOffline);
        }
        let l = &self.limits;
        if self.entries.len() >= l.outstanding
            || self.frames >= l.queue_len
            || self.bytes + bytes > l.queue_bytes
        {
            return Err(ErrorCode::Busy);
        }
        let u = self.senders.get(sender).copied().unwrap_or_default();
        // A sender holding nothing may always queue one delivery that fits.
        if u.outstanding > 0
            && (u.outstanding >= share(l.outstanding)
                || u.frames >= share(l.queue_len)
                || u.bytes + bytes > share(l.queue_bytes))
        {
            return Err(ErrorCode::Busy);
        }
        if self.instance.fetch_add(bytes, Relaxed) + bytes > l.instance_bytes {
            self.instance.fetch_sub(bytes, Relaxed);
            return Err(ErrorCode::Busy);
        }
        self.next += 1;
        let token = self.next;
        self.entries.insert(
            token,
            Entry {
                sender: sender.clone(),
                reply_to,
                id,
                queued: bytes,
            },
        );
        self.frames += 1;
        self.bytes += bytes;
        let u = self.senders.entry(sender.clone()).or_default();
        u.outstanding += 1;
        u.frames += 1;
        u.bytes += bytes;
        Ok(token)
    }

    /// Whether delivery `token` is still to be written (false: it was
    /// answered or failed meanwhile, e.g. the stream ended).
    pub fn is_outstanding(&self, token: u64) -> bool {
        self.entries.contains_key(&token)
    }

    /// The writer wrote delivery `token`: it leaves the queue (and stays
    /// outstanding until answered). False if it was no longer outstanding.
    pub fn unqueue(&mut self, token: u64) -> bool {
        let Some(e) = self.entries.get_mut(&token) else {
            return false;
        };
        let bytes = std::mem::take(&mut e.queued);
        let sender = e.sender.clone();
        self.release_queued(&sender, bytes);
        true
    }

    /// Forget an admitted delivery that could not be queued after all.
    pub fn cancel(&mut self, token: u64) {
        self.remove(token);
    }

    /// A reply (`Ack` or `Nack`) on this stream with `token` for message
    /// `id`: the sending stream to route it to, once. `None` — a token not
    /// outstanding here (never delivered to this stream, already answered,
    /// the stream's own or another stream's token) or an id that is not the
    /// delivery's — and the reply is dropped; the entry stays outstanding.
    pub fn reply(&mut self, token: u64, id: &MessageId) -> Option<u64> {
        if self.entries.get(&token)?.id != *id {
            return None;
        }
        self.remove(token).map(|e| e.reply_to)
    }

    /// The stream ended: every outstanding delivery as (its sender's stream,
    /// its id), oldest first, to be answered `Failed{id, TargetOffline}`.
    /// Later admits are refused `TargetOffline`, later replies dropped.
    pub fn close(&mut self) -> Vec<(u64, MessageId)> {
        self.closed = true;
        let mut tokens: Vec<u64> = self.entries.keys().copied().collect();
        tokens.sort_unstable();
        tokens
            .into_iter()
            .filter_map(|t| self.remove(t))
            .map(|e| (e.reply_to, e.id))
            .collect()
    }

    /// Deliveries outstanding (queued or written, unanswered).
    pub fn outstanding(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of deliveries queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    fn remove(&mut self, token: u64) -> Option<Entry<S>> {
        let e = self.entries.remove(&token)?;
        self.release_queued(&e.sender, e.queued);
        if let Some(u) = self.senders.get_mut(&e.sender) {
            u.outstanding -= 1;
            if u.outstanding == 0 {
                self.senders.remove(&e.sender);
            }
        }
        Some(e)
    }

    /// `bytes` of `sender`'s leave the queue (0: the entry was written
    /// already and nothing is queued).
    fn release_queued(&mut self, sender: &S, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.frames -= 1;
        self.bytes -= bytes;
        self.instance.fetch_sub(bytes, Relaxed);
        if let Some(u) = self.senders.get_mut(sender) {
            u.frames -= 1;
            u.bytes -= bytes;
        }
    }
}

impl<S> Drop for Ledger<S> {
    /// Whatever is still queued no longer counts against the instance.
    fn drop(&mut self) {
        self.instance.fetch_sub(self.bytes, Relaxed);
    }
}

/// One sender's share of `total` (at least 1).
fn share(total: usize) -> usize {
    (total / SENDER_SHARE).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LedgerLimits {
        LedgerLimits {
            queue_len: 8,
            queue_bytes: 800,
            outstanding: 16,
            instance_bytes: 10_000,
        }
    }

    fn ledger(l: LedgerLimits) -> Ledger<&'static str> {
        Ledger::new(l, Arc::default())
    }

    const ID: MessageId = [1; 16];

    /// A delivery admitted but never queued (the target's queue closed in
    /// between) gives back its slot, its bytes and the instance's bytes.
    #[test]
    fn a_cancelled_delivery_holds_nothing() {
        let instance = Arc::new(AtomicUsize::new(0));
        let mut l = Ledger::new(limits(), instance.clone());
        let t = l.admit(&"a", 100, ID, 150).unwrap();
        assert_eq!((l.outstanding(), l.queued_bytes()), (1, 150));
        assert_eq!(instance.load(Relaxed), 150);
        l.cancel(t);
        assert!(!l.is_outstanding(t));
        assert_eq!((l.outstanding(), l.queued_bytes()), (0, 0));
        assert_eq!(instance.load(Relaxed), 0);
        assert_eq!(l.reply(t, &ID), None, "no reply routed for it");
    }

    /// Cancelling gives back exactly what the delivery held, to the queue
    /// and to its sender's share, however often it happens (each leak
    /// would end in `Busy` within the loop's 20 rounds, past every bound).
    #[test]
    fn cancels_give_back_the_sender_share_exactly() {
        let mut l = ledger(limits());
        let keep = l.admit(&"a", 1, ID, 100).unwrap();
        for round in 0..20 {
            let t = l
                .admit(&"a", 2, ID, 100)
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            // a's share is 2 frames and 200 bytes: full now.
            assert_eq!(
                l.admit(&"a", 3, ID, 1),
                Err(ErrorCode::Busy),
                "round {round}"
            );
            l.cancel(t);
            assert_eq!(l.queued_bytes(), 100, "round {round}");
        }
        // The one delivery a still holds keeps counting against its share,
        // in frames and in bytes.
        let t = l.admit(&"a", 4, ID, 100).unwrap();
        assert_eq!(l.admit(&"a", 5, ID, 1), Err(ErrorCode::Busy));
        l.cancel(t);
        let t = l.admit(&"a", 6, ID, 40).unwrap();
        l.cancel(t);
        assert_eq!(
            l.admit(&"a", 7, ID, 101),
            Err(ErrorCode::Busy),
            "100 held + 101 > 200"
        );
        l.cancel(keep);
        assert_eq!((l.outstanding(), l.queued_bytes()), (0, 0));
    }

    #[test]
    fn the_limits_come_from_the_config() {
        let cfg = crate::RelayConfig {
            agent_queue_len: 10,
            ..Default::default()
        };
        let l = LedgerLimits::of(&cfg);
        assert_eq!(l.queue_len, 10);
        assert_eq!(l.outstanding, 10 * OUTSTANDING_PER_QUEUE_SLOT);
    }

    /// Every byte bound is inclusive: a delivery that fills a sender's
    /// share, the queue or the instance's bytes exactly is queued; one
    /// byte more is `Busy`.
    #[test]
    fn byte_bounds_admit_up_to_exactly_the_limit() {
        let mut l = ledger(limits());
        l.admit(&"a", 100, ID, 150).unwrap();
        assert!(l.admit(&"a", 100, ID, 50).is_ok(), "a's share is 200");
        l.admit(&"b", 101, ID, 300).unwrap();
        assert_eq!(l.admit(&"c", 102, ID, 301), Err(ErrorCode::Busy));
        assert!(l.admit(&"c", 102, ID, 300).is_ok(), "the queue's 800");
        assert_eq!(l.admit(&"d", 103, ID, 1), Err(ErrorCode::Busy));
        let mut l = ledger(LedgerLimits {
            instance_bytes: 100,
            ..limits()
        });
        assert!(l.admit(&"a", 100, ID, 100).is_ok(), "the instance's 100");
        assert_eq!(l.admit(&"b", 101, ID, 1), Err(ErrorCode::Busy));
    }

    #[test]
    fn one_reply_per_delivery_and_only_for_its_id() {
        let mut l = ledger(limits());
        let t = l.admit(&"a", 100, ID, 10).unwrap();
        assert!(l.unqueue(t));
        // Another id, a token never handed out, the sender's stream token:
        // dropped, and the delivery stays outstanding.
        assert_eq!(l.reply(t, &[2; 16]), None);
        assert_eq!(l.reply(t + 1, &ID), None);
        assert_eq!(l.reply(100, &ID), None);
        assert_eq!(l.outstanding(), 1);
        assert_eq!(l.reply(t, &ID), Some(100));
        // A second reply for the same token.
        assert_eq!(l.reply(t, &ID), None);
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn tokens_are_per_delivery() {
        let mut l = ledger(limits());
        let t1 = l.admit(&"a", 100, ID, 10).unwrap();
        // The same message again (a re-send) is another delivery, answered
        // on its own.
        let t2 = l.admit(&"a", 100, ID, 10).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(l.reply(t2, &ID), Some(100));
        assert_eq!(l.reply(t1, &ID), Some(100));
    }

    #[test]
    fn a_closed_ledger_owes_every_outstanding_delivery_and_takes_no_more() {
        let mut l = ledger(limits());
        let t1 = l.admit(&"a", 100, [1; 16], 10).unwrap();
        let _t2 = l.admit(&"b", 200, [2; 16], 10).unwrap();
        let t3 = l.admit(&"a", 100, [3; 16], 10).unwrap();
        assert!(l.unqueue(t1)); // written, unanswered
        assert_eq!(l.reply(t3, &[3; 16]), Some(100));
        assert_eq!(l.close(), vec![(100, [1; 16]), (200, [2; 16])]);
        assert_eq!(l.admit(&"a", 100, ID, 10), Err(ErrorCode::TargetOffline));
        assert_eq!(l.reply(t1, &[1; 16]), None);
        assert_eq!((l.outstanding(), l.queued_bytes()), (0, 0));
        assert!(l.close().is_empty());
    }

    #[test]
    fn the_writer_skips_what_was_answered_or_failed_meanwhile() {
        let mut l = ledger(limits());
        let t = l.admit(&"a", 100, ID, 10).unwrap();
        assert!(l.is_outstanding(t));
        assert_eq!(l.reply(t, &ID), Some(100));
        assert!(!l.is_outstanding(t));
        assert!(!l.unqueue(t));
        let t = l.admit(&"a", 100, ID, 10).unwrap();
        l.close();
        assert!(!l.is_outstanding(t));
        assert!(!l.unqueue(t));
    }

    #[test]
    fn one_flooding_sender_leaves_room_for_others() {
        let mut l = ledger(limits());
        // "a" gets its quarter of the 8 queue slots, then Busy.
        for _ in 0..2 {
            l.admit(&"a", 100, ID, 10).unwrap();
        }
        assert_eq!(l.admit(&"a", 100, ID, 10), Err(ErrorCode::Busy));
        // Others still get in, each up to its own share.
        for s in ["b", "c", "d"] {
            for _ in 0..2 {
                l.admit(&s, 200, ID, 10).unwrap();
            }
        }
        // The queue as a whole is full now.
        assert_eq!(l.admit(&"e", 300, ID, 10), Err(ErrorCode::Busy));
    }

    #[test]
    fn shares_bound_bytes_and_unanswered_deliveries_too() {
        let mut l = ledger(limits());
        // Bytes: a quarter of 800 is 200.
        let t = l.admit(&"a", 100, ID, 150).unwrap();
        assert_eq!(l.admit(&"a", 100, ID, 100), Err(ErrorCode::Busy));
        // A sender holding nothing may queue one delivery over its share
        // (a large message must not be undeliverable).
        l.admit(&"b", 200, ID, 600).unwrap();
        assert_eq!(l.admit(&"c", 300, ID, 100), Err(ErrorCode::Busy), "full");
        // Written but unanswered deliveries count against the sender's
        // quarter of the outstanding bound (16 / 4).
        let mut l = ledger(limits());
        for _ in 0..4 {
            let t = l.admit(&"a", 100, ID, 10).unwrap();
            assert!(l.unqueue(t));
        }
        assert_eq!(l.admit(&"a", 100, ID, 10), Err(ErrorCode::Busy));
        assert!(l.admit(&"b", 200, ID, 10).is_ok());
        let _ = t;
    }

    #[test]
    fn the_instance_budget_spans_its_streams() {
        let instance = Arc::new(AtomicUsize::new(0));
        let l = LedgerLimits {
            instance_bytes: 300,
            ..limits()
        };
        let mut one = Ledger::new(l, instance.clone());
        let mut two = Ledger::new(l, instance.clone());
        let t = one.admit(&"a", 100, ID, 200).unwrap();
        assert_eq!(two.admit(&"b", 200, ID, 200), Err(ErrorCode::Busy));
        // Written: no longer queued, so no longer counted.
        assert!(one.unqueue(t));
        assert_eq!(instance.load(Relaxed), 0);
        two.admit(&"b", 200, ID, 200).unwrap();
        drop(two);
        assert_eq!(instance.load(Relaxed), 0, "a dropped ledger releases");
    }
}
