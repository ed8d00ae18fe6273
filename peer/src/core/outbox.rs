//! One agent's messages that are waiting for an outcome: a bounded map from
//! message id to the sealed frame and the caller's reply channel. Pure
//! bookkeeping (no I/O, `now` passed in), so the delivery rules are unit
//! tests: every entry ends in exactly one outcome (receipt, refusal, timeout
//! or link failure); a full outbox is an explicit error, never a drop; a
//! re-send after a reconnect uses the very same bytes (same id, same
//! signature), so the receiver's replay window recognises it.
//!
//! Right after a reconnect the relay's view of who is online is still
//! filling in (after a relay restart every instance is reconnecting with its
//! own backoff), so a `TargetOffline` answer inside [`RECONNECT_GRACE`] of our
//! own re-attach is retried every [`RETRY_DELAY`] until the grace or the
//! message's deadline ends, instead of failing a message that would have
//! gone through a second later.
//!
//! A message written on a connection that then went away may have been
//! delivered with its receipt lost (a relay killed between the two). Once
//! re-sent it can meet `TargetOffline` (its receiver still moving to
//! another relay of the fleet, or not back yet), which would then be a lie:
//! such a message retries `TargetOffline` until its deadline and ends as a
//! timeout, "outcome unknown", never as a refusal.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use agent_link_proto::{ErrorCode, MessageId};
use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::SendError;
use crate::message::Receipt;

/// How long after a re-attach `TargetOffline` is treated as "not back yet":
/// longer than the longest reconnect backoff (5 s plus 50 % jitter).
pub(crate) const RECONNECT_GRACE: Duration = Duration::from_secs(8);
/// Pause between re-sends of a message whose target is not back yet.
pub(crate) const RETRY_DELAY: Duration = Duration::from_millis(250);

/// Where a caller learns the outcome of its send.
pub(crate) type Reply = oneshot::Sender<Result<Receipt, SendError>>;

struct Entry {
    seq: u64,
    to: String,
    frame: Bytes,
    deadline: Instant,
    retry_at: Option<Instant>,
    reply: Reply,
    /// Written to a connection (not only queued while disconnected).
    written: bool,
    /// Written on a connection that went away before an answer: it may
    /// have been delivered.
    maybe_delivered: bool,
}

/// What a `Failed` answer did to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailOutcome {
    /// The caller got the error.
    Failed,
    /// Kept; it will be re-sent by [`Outbox::take_due`].
    Retrying,
    /// Not (or no longer) in the outbox.
    Unknown,
}

/// The bounded outbox.
pub(crate) struct Outbox {
    limit: usize,
    seq: u64,
    entries: HashMap<MessageId, Entry>,
    /// Every entry by `(deadline, seq)`: the next deadline is the first key,
    /// and expiring walks only what is due (no scan of the whole outbox).
    deadlines: BTreeMap<(Instant, u64), MessageId>,
    /// The entries with a retry pending, by `(retry_at, seq)`.
    retries: BTreeMap<(Instant, u64), MessageId>,
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            seq: 0,
            entries: HashMap::new(),
            deadlines: BTreeMap::new(),
            retries: BTreeMap::new(),
        }
    }

    /// The earliest moment something is due: a deadline, or (with
    /// `retries`) a pending retry. `None` while nothing waits.
    pub(crate) fn next_wake(&self, retries: bool) -> Option<Instant> {
        let deadline = self.deadlines.first_key_value().map(|(k, _)| k.0);
        let retry = retries
            .then(|| self.retries.first_key_value().map(|(k, _)| k.0))
            .flatten();
        match (deadline, retry) {
            (Some(d), Some(r)) => Some(d.min(r)),
            (d, r) => d.or(r),
        }
    }

    /// Take `id` out of the outbox and its indexes.
    fn remove(&mut self, id: &MessageId) -> Option<Entry> {
        let e = self.entries.remove(id)?;
        self.unindex(&e);
        Some(e)
    }

    fn unindex(&mut self, e: &Entry) {
        self.deadlines.remove(&(e.deadline, e.seq));
        if let Some(t) = e.retry_at {
            self.retries.remove(&(t, e.seq));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= self.limit
    }

    /// Add a sealed message, `written` when its frame goes out now. When
    /// the outbox is full the caller gets [`SendError::OutboxFull`] at once
    /// and `false` is returned.
    pub(crate) fn insert(
        &mut self,
        id: MessageId,
        to: String,
        frame: Bytes,
        deadline: Instant,
        reply: Reply,
        written: bool,
    ) -> bool {
        if self.is_full() {
            let _ = reply.send(Err(SendError::OutboxFull {
                waiting: self.entries.len(),
            }));
            return false;
        }
        self.seq += 1;
        self.deadlines.insert((deadline, self.seq), id);
        let old = self.entries.insert(
            id,
            Entry {
                seq: self.seq,
                to,
                frame,
                deadline,
                retry_at: None,
                reply,
                written,
                maybe_delivered: false,
            },
        );
        // Ids are random (128 bits); should one repeat, the older entry's
        // index keys must not outlive it.
        if let Some(old) = old {
            self.unindex(&old);
        }
        true
    }

    /// A receipt arrived. It resolves the message only when it comes from
    /// the agent the message was sent to; returns whether it did.
    pub(crate) fn receipt(&mut self, receipt: Receipt) -> bool {
        match self.entries.get(&receipt.id.0) {
            Some(e) if e.to == receipt.to => {}
            Some(_) => {
                tracing::warn!("receipt from an agent the message was not sent to; ignored");
                return false;
            }
            None => return false,
        }
        match self.remove(&receipt.id.0) {
            Some(e) => {
                let _ = e.reply.send(Ok(receipt));
                true
            }
            None => false,
        }
    }

    /// The relay (or the receiver) refused message `id` with `code`.
    /// `grace_until` is the end of the post-reconnect grace, if any.
    pub(crate) fn failed(
        &mut self,
        id: &MessageId,
        code: ErrorCode,
        now: Instant,
        grace_until: Option<Instant>,
    ) -> FailOutcome {
        let Some(e) = self.entries.get_mut(id) else {
            return FailOutcome::Unknown;
        };
        let retry_at = now + RETRY_DELAY;
        let offline = code == ErrorCode::TargetOffline;
        if offline
            && (e.maybe_delivered || grace_until.is_some_and(|g| now < g))
            && retry_at < e.deadline
        {
            if let Some(t) = e.retry_at.replace(retry_at) {
                self.retries.remove(&(t, e.seq));
            }
            self.retries.insert((retry_at, e.seq), *id);
            return FailOutcome::Retrying;
        }
        match self.remove(id) {
            // An earlier copy may have arrived: not a refusal.
            Some(e) if offline && e.maybe_delivered => {
                let _ = e.reply.send(Err(SendError::Timeout));
                FailOutcome::Failed
            }
            Some(e) => {
                let _ = e.reply.send(Err(SendError::Refused(code)));
                FailOutcome::Failed
            }
            None => FailOutcome::Unknown,
        }
    }

    /// Time out every message whose deadline has passed; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some((&(deadline, _), &id)) = self.deadlines.first_key_value() {
            if deadline > now {
                break;
            }
            match self.remove(&id) {
                Some(e) => {
                    let _ = e.reply.send(Err(SendError::Timeout));
                    n += 1;
                }
                // Unreachable (the index follows the entries); never loop.
                None => {
                    self.deadlines.pop_first();
                }
            }
        }
        n
    }

    /// Append the frames of messages whose retry is due to `out`, oldest
    /// first; returns how many.
    pub(crate) fn take_due(&mut self, now: Instant, out: &mut Vec<Bytes>) -> usize {
        let mut due = Vec::new();
        while let Some((&(t, seq), _)) = self.retries.first_key_value() {
            if t > now {
                break;
            }
            if let Some((_, id)) = self.retries.pop_first() {
                due.push((seq, id));
            }
        }
        due.sort_unstable_by_key(|&(seq, _)| seq);
        for (_, id) in &due {
            if let Some(e) = self.entries.get_mut(id) {
                e.retry_at = None;
                e.written = true;
                out.push(e.frame.clone());
            }
        }
        due.len()
    }

    /// Append every waiting message's frame to `out`, oldest first, byte for
    /// byte as first sent (after a re-attach). One written before, on the
    /// connection that went away, may have been delivered.
    pub(crate) fn resend_all(&mut self, out: &mut Vec<Bytes>) -> usize {
        let mut all: Vec<&mut Entry> = self.entries.values_mut().collect();
        all.sort_by_key(|e| e.seq);
        for e in &mut all {
            // A copy on the lost connection may have arrived unanswered
            // (a retrying message's last copy too).
            e.maybe_delivered |= e.written;
            e.written = true;
            e.retry_at = None;
            out.push(e.frame.clone());
        }
        self.retries.clear();
        all.len()
    }

    /// End every waiting message with the error `make` builds.
    pub(crate) fn fail_all(&mut self, make: impl Fn() -> SendError) {
        self.deadlines.clear();
        self.retries.clear();
        for (_, e) in self.entries.drain() {
            let _ = e.reply.send(Err(make()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Rx = oneshot::Receiver<Result<Receipt, SendError>>;

    fn add(ob: &mut Outbox, id: u8, deadline: Instant) -> (bool, Rx) {
        let (tx, rx) = oneshot::channel();
        let ok = ob.insert(
            [id; 16],
            "i/a".into(),
            Bytes::from(vec![id; 3]),
            deadline,
            tx,
            true,
        );
        (ok, rx)
    }

    fn receipt(id: u8, from: &str) -> Receipt {
        Receipt {
            id: crate::message::MessageId([id; 16]),
            to: from.into(),
            delivered_at_ms: 7,
        }
    }

    #[test]
    fn full_outbox_is_an_explicit_error() {
        let now = Instant::now();
        let mut ob = Outbox::new(2);
        let later = now + Duration::from_secs(9);
        assert!(add(&mut ob, 1, later).0);
        assert!(add(&mut ob, 2, later).0);
        let (ok, mut rx) = add(&mut ob, 3, later);
        assert!(!ok);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(SendError::OutboxFull { waiting: 2 }))
        ));
        assert_eq!(ob.len(), 2);
        // A receipt frees a place.
        assert!(ob.receipt(receipt(1, "i/a")));
        assert!(add(&mut ob, 3, later).0);
    }

    #[test]
    fn receipt_must_come_from_the_target() {
        let now = Instant::now();
        let mut ob = Outbox::new(8);
        let (_, mut rx) = add(&mut ob, 1, now + Duration::from_secs(9));
        assert!(!ob.receipt(receipt(1, "i/other")));
        assert!(rx.try_recv().is_err(), "still waiting");
        assert!(!ob.receipt(receipt(9, "i/a")), "unknown id");
        assert!(ob.receipt(receipt(1, "i/a")));
        assert_eq!(rx.try_recv().unwrap().unwrap().delivered_at_ms, 7);
        assert_eq!(ob.len(), 0);
    }

    #[test]
    fn every_message_ends_in_one_outcome() {
        let now = Instant::now();
        let mut ob = Outbox::new(8);
        let (_, mut a) = add(&mut ob, 1, now + Duration::from_secs(1));
        let (_, mut b) = add(&mut ob, 2, now + Duration::from_secs(9));
        let (_, mut c) = add(&mut ob, 3, now + Duration::from_secs(9));
        assert_eq!(ob.expire(now + Duration::from_secs(1)), 1);
        assert!(matches!(a.try_recv(), Ok(Err(SendError::Timeout))));
        assert_eq!(
            ob.failed(&[2; 16], ErrorCode::UnknownTarget, now, None),
            FailOutcome::Failed
        );
        assert!(matches!(
            b.try_recv(),
            Ok(Err(SendError::Refused(ErrorCode::UnknownTarget)))
        ));
        assert_eq!(
            ob.failed(&[2; 16], ErrorCode::UnknownTarget, now, None),
            FailOutcome::Unknown
        );
        ob.fail_all(|| SendError::Closed(crate::error::CloseReason::LinkClosed));
        assert!(matches!(c.try_recv(), Ok(Err(SendError::Closed(_)))));
        assert_eq!(ob.len(), 0);
    }

    /// Written, the connection lost, re-sent: `TargetOffline` now may
    /// follow a first copy that arrived (its receipt lost with a relay), so
    /// it is retried past the grace and ends as a timeout, never a refusal.
    /// A message only queued while disconnected is refused as usual.
    #[test]
    fn target_offline_after_a_lost_copy_is_never_a_refusal() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(5);
        let mut ob = Outbox::new(8);
        let (_, mut written) = add(&mut ob, 1, deadline);
        let (tx, mut queued) = oneshot::channel();
        ob.insert([2; 16], "i/a".into(), Bytes::new(), deadline, tx, false);
        let mut out = Vec::new();
        assert_eq!(ob.resend_all(&mut out), 2);
        // No grace at all: still retried, the one that was written.
        assert_eq!(
            ob.failed(&[1; 16], ErrorCode::TargetOffline, now, None),
            FailOutcome::Retrying
        );
        assert_eq!(
            ob.failed(&[2; 16], ErrorCode::TargetOffline, now, None),
            FailOutcome::Failed
        );
        assert!(matches!(
            queued.try_recv(),
            Ok(Err(SendError::Refused(ErrorCode::TargetOffline)))
        ));
        // Until the deadline leaves no room for another retry.
        let late = deadline - RETRY_DELAY / 2;
        assert_eq!(
            ob.failed(&[1; 16], ErrorCode::TargetOffline, late, None),
            FailOutcome::Failed
        );
        assert!(matches!(written.try_recv(), Ok(Err(SendError::Timeout))));
    }

    #[test]
    fn target_offline_is_retried_only_inside_the_grace() {
        let now = Instant::now();
        let mut ob = Outbox::new(8);
        let grace = Some(now + RECONNECT_GRACE);
        let (_, mut a) = add(&mut ob, 1, now + Duration::from_secs(30));
        // No grace (first attach): the caller hears TargetOffline at once.
        let (_, mut b) = add(&mut ob, 2, now + Duration::from_secs(30));
        assert_eq!(
            ob.failed(&[2; 16], ErrorCode::TargetOffline, now, None),
            FailOutcome::Failed
        );
        assert!(matches!(
            b.try_recv(),
            Ok(Err(SendError::Refused(ErrorCode::TargetOffline)))
        ));
        // Inside the grace: kept and re-sent with the same bytes once due.
        assert_eq!(
            ob.failed(&[1; 16], ErrorCode::TargetOffline, now, grace),
            FailOutcome::Retrying
        );
        let mut out = Vec::new();
        assert_eq!(ob.take_due(now, &mut out), 0);
        assert_eq!(ob.take_due(now + RETRY_DELAY, &mut out), 1);
        assert_eq!(out.concat(), vec![1; 3]);
        assert_eq!(ob.take_due(now + RETRY_DELAY * 2, &mut out), 0, "once");
        // Other refusals are final even inside the grace.
        let (_, mut c) = add(&mut ob, 3, now + Duration::from_secs(30));
        assert_eq!(
            ob.failed(&[3; 16], ErrorCode::RateLimited, now, grace),
            FailOutcome::Failed
        );
        assert!(matches!(c.try_recv(), Ok(Err(SendError::Refused(_)))));
        // After the grace the next TargetOffline is final.
        let after = now + RECONNECT_GRACE;
        assert_eq!(
            ob.failed(&[1; 16], ErrorCode::TargetOffline, after, grace),
            FailOutcome::Failed
        );
        assert!(matches!(
            a.try_recv(),
            Ok(Err(SendError::Refused(ErrorCode::TargetOffline)))
        ));
    }

    #[test]
    fn no_retry_past_the_deadline() {
        let now = Instant::now();
        let mut ob = Outbox::new(8);
        let (_, mut a) = add(&mut ob, 1, now + RETRY_DELAY / 2);
        assert_eq!(
            ob.failed(
                &[1; 16],
                ErrorCode::TargetOffline,
                now,
                Some(now + RECONNECT_GRACE)
            ),
            FailOutcome::Failed
        );
        assert!(a.try_recv().unwrap().is_err());
        // A retry due exactly at the deadline would race the timeout: final.
        let (_, mut b) = add(&mut ob, 2, now + RETRY_DELAY);
        assert_eq!(
            ob.failed(
                &[2; 16],
                ErrorCode::TargetOffline,
                now,
                Some(now + RECONNECT_GRACE)
            ),
            FailOutcome::Failed
        );
        assert!(b.try_recv().unwrap().is_err());
    }

    #[test]
    fn resend_all_is_oldest_first_and_byte_identical() {
        let now = Instant::now();
        let mut ob = Outbox::new(32);
        // Twenty ids in neither sorted nor hash order: with three, a lost
        // sequence number still came out in order one run in six.
        let ids: Vec<u8> = (0..20u8).map(|i| (i * 7) % 20 + 1).collect();
        for &id in &ids {
            add(&mut ob, id, now + Duration::from_secs(9));
        }
        let mut out = Vec::new();
        assert_eq!(ob.resend_all(&mut out), 20);
        let sent: Vec<Vec<u8>> = ids.iter().map(|&id| vec![id; 3]).collect();
        assert_eq!(out.concat(), sent.concat());
    }

    /// The indexes hold exactly the entries (and their pending retries).
    fn assert_indexed(ob: &Outbox) {
        assert_eq!(ob.deadlines.len(), ob.entries.len());
        for ((deadline, seq), id) in &ob.deadlines {
            let e = &ob.entries[id];
            assert_eq!((e.deadline, e.seq), (*deadline, *seq));
        }
        let retrying = ob.entries.values().filter(|e| e.retry_at.is_some()).count();
        assert_eq!(ob.retries.len(), retrying);
        for ((t, seq), id) in &ob.retries {
            let e = &ob.entries[id];
            assert_eq!((e.retry_at, e.seq), (Some(*t), *seq));
        }
    }

    #[test]
    fn next_wake_is_the_earliest_deadline_of_what_waits() {
        let now = Instant::now();
        let s = Duration::from_secs;
        let mut ob = Outbox::new(8);
        assert_eq!(ob.next_wake(true), None);
        let (_, _a) = add(&mut ob, 1, now + s(30));
        let (_, _b) = add(&mut ob, 2, now + s(10));
        let (_, mut c) = add(&mut ob, 3, now + s(20));
        assert_eq!(ob.next_wake(true), Some(now + s(10)));
        // Answered: the next one is what counts.
        assert!(ob.receipt(receipt(2, "i/a")));
        assert_eq!(ob.next_wake(true), Some(now + s(20)));
        assert_indexed(&ob);
        // Expiring takes exactly what is due, no more.
        assert_eq!(ob.expire(now + s(19)), 0);
        assert_eq!(ob.expire(now + s(20)), 1);
        assert!(matches!(c.try_recv(), Ok(Err(SendError::Timeout))));
        assert_eq!(ob.next_wake(true), Some(now + s(30)));
        assert_indexed(&ob);
        assert!(ob.receipt(receipt(1, "i/a")));
        assert_eq!(ob.next_wake(true), None);
        assert_indexed(&ob);
    }

    #[test]
    fn a_pending_retry_wakes_before_the_deadline_only_when_asked() {
        let now = Instant::now();
        let mut ob = Outbox::new(8);
        let deadline = now + Duration::from_secs(30);
        let (_, _a) = add(&mut ob, 1, deadline);
        let grace = Some(now + RECONNECT_GRACE);
        assert_eq!(
            ob.failed(&[1; 16], ErrorCode::TargetOffline, now, grace),
            FailOutcome::Retrying
        );
        assert_eq!(ob.next_wake(true), Some(now + RETRY_DELAY));
        // Not attached: retries do not go out, so they wake nobody.
        assert_eq!(ob.next_wake(false), Some(deadline));
        assert_indexed(&ob);
        // A second refusal moves the retry, it does not add one.
        let later = now + RETRY_DELAY / 2;
        assert_eq!(
            ob.failed(&[1; 16], ErrorCode::TargetOffline, later, grace),
            FailOutcome::Retrying
        );
        assert_indexed(&ob);
        assert_eq!(ob.next_wake(true), Some(later + RETRY_DELAY));
        let mut out = Vec::new();
        assert_eq!(ob.take_due(now + RETRY_DELAY, &mut out), 0);
        assert_eq!(ob.take_due(later + RETRY_DELAY, &mut out), 1);
        assert_eq!(out, vec![Bytes::from(vec![1u8; 3])]);
        assert_eq!(ob.next_wake(true), Some(deadline));
        assert_indexed(&ob);
        ob.fail_all(|| SendError::Timeout);
        assert_eq!(ob.next_wake(true), None);
        assert_indexed(&ob);
    }
}
