//! Receivers' memory of message ids (PROTOCOL.md §7).
//!
//! A repeated id never reaches the application twice; it is answered with
//! the receipt the first copy got, which also makes a sender's retry after a
//! reconnect safe. Memory is bounded two ways: ids older than the timestamp
//! window are forgotten (messages that old are refused anyway, so forgetting
//! them cannot let a replay through), and a per-sender cap refuses new ids
//! (with `Full`, an explicit "busy") rather than forgetting young ones.

use std::collections::{HashMap, VecDeque};

use crate::MessageId;

/// What to do with an incoming id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayVerdict {
    /// First time seen: deliver, then [`ReplayWindow::record`] the receipt time.
    New,
    /// Seen before: answer with this first `delivered_at_ms`, do not deliver.
    Duplicate { delivered_at_ms: u64 },
    /// Too many young ids from this sender: refuse as busy.
    Full,
}

#[derive(Debug, Default)]
struct SenderIds {
    by_id: HashMap<MessageId, u64>,
    /// (sent_at_ms, id) in arrival order, for expiry.
    order: VecDeque<(u64, MessageId)>,
}

/// Seen ids, per sender instance.
#[derive(Debug)]
pub struct ReplayWindow {
    window_ms: u64,
    max_per_sender: usize,
    max_total: usize,
    /// Ids remembered over all senders.
    total: usize,
    /// When every sender's old ids were last expired (see `at_total_cap`).
    last_sweep_ms: u64,
    senders: HashMap<String, SenderIds>,
}

impl ReplayWindow {
    /// `window_ms` must be at least the timestamp window receivers enforce.
    /// No bound over all senders (see [`ReplayWindow::with_total_cap`]).
    pub fn new(window_ms: u64, max_per_sender: usize) -> Self {
        Self::with_total_cap(window_ms, max_per_sender, usize::MAX)
    }

    /// As [`ReplayWindow::new`], and at most `max_total` ids over all
    /// senders: senders are whoever a receiver hears from, so a per-sender
    /// bound alone does not bound memory (a relay could present ever new
    /// instances).
    pub fn with_total_cap(window_ms: u64, max_per_sender: usize, max_total: usize) -> Self {
        Self {
            window_ms,
            max_per_sender,
            max_total,
            total: 0,
            last_sweep_ms: 0,
            senders: HashMap::new(),
        }
    }

    /// Forget `ids`' entries older than twice the window; how many.
    fn expire(ids: &mut SenderIds, now_ms: u64, window_ms: u64) -> usize {
        // Arrival order is close to sent_at order; an out-of-order old entry
        // simply waits for the ones in front of it (bounded by the cap).
        let mut gone = 0;
        while let Some(&(sent, id)) = ids.order.front() {
            if now_ms.saturating_sub(sent) > window_ms.saturating_mul(2) {
                ids.order.pop_front();
                // An id forgotten (and perhaps recorded again) leaves an
                // older entry behind: count only what is really removed.
                if ids.by_id.remove(&id).is_some() {
                    gone += 1;
                }
            } else {
                break;
            }
        }
        gone
    }

    /// Whether the total cap is reached. At the cap, every sender's old ids
    /// are expired first (at most once per quarter window, so a receiver at
    /// its cap does not sweep on every message), and senders left with none
    /// are dropped.
    fn at_total_cap(&mut self, now_ms: u64) -> bool {
        if self.total < self.max_total {
            return false;
        }
        if now_ms.saturating_sub(self.last_sweep_ms) >= self.window_ms / 4 {
            self.last_sweep_ms = now_ms;
            let window_ms = self.window_ms;
            let mut gone = 0;
            self.senders.retain(|_, ids| {
                gone += Self::expire(ids, now_ms, window_ms);
                !ids.by_id.is_empty()
            });
            self.total -= gone;
        }
        self.total >= self.max_total
    }

    /// Look an id up without recording it.
    pub fn check(&mut self, sender: &str, id: &MessageId, now_ms: u64) -> ReplayVerdict {
        let Some(ids) = self.senders.get_mut(sender) else {
            return if self.at_total_cap(now_ms) {
                ReplayVerdict::Full
            } else {
                ReplayVerdict::New
            };
        };
        let gone = Self::expire(ids, now_ms, self.window_ms);
        let (seen, sender_full) = (
            ids.by_id.get(id).copied(),
            ids.by_id.len() >= self.max_per_sender,
        );
        self.total -= gone;
        if let Some(at) = seen {
            ReplayVerdict::Duplicate {
                delivered_at_ms: at,
            }
        } else if sender_full || self.at_total_cap(now_ms) {
            ReplayVerdict::Full
        } else {
            ReplayVerdict::New
        }
    }

    /// Remember `id` as delivered at `delivered_at_ms` (again: the time is
    /// updated).
    pub fn record(&mut self, sender: &str, id: MessageId, sent_at_ms: u64, delivered_at_ms: u64) {
        let ids = self.senders.entry(sender.to_owned()).or_default();
        if ids.by_id.insert(id, delivered_at_ms).is_none() {
            ids.order.push_back((sent_at_ms, id));
            self.total += 1;
        }
    }

    /// Forget `id` again: it was refused after it was recorded (a full
    /// inbox, say), so a retry of it must be treated as new, not answered
    /// with a receipt for a message that is nowhere.
    pub fn forget(&mut self, sender: &str, id: &MessageId) {
        if let Some(ids) = self.senders.get_mut(sender) {
            if ids.by_id.remove(id).is_some() {
                self.total -= 1;
            }
        }
    }

    /// Ids remembered in all.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_gets_first_receipt() {
        let mut w = ReplayWindow::new(60_000, 10);
        assert_eq!(w.check("i1", &[1; 16], 1000), ReplayVerdict::New);
        w.record("i1", [1; 16], 1000, 1005);
        assert_eq!(
            w.check("i1", &[1; 16], 2000),
            ReplayVerdict::Duplicate {
                delivered_at_ms: 1005
            }
        );
        assert_eq!(
            w.check("i2", &[1; 16], 2000),
            ReplayVerdict::New,
            "per sender"
        );
    }

    #[test]
    fn a_forgotten_id_is_new_again_and_counts_stay_right() {
        let mut w = ReplayWindow::new(1000, 10);
        w.record("s", [1; 16], 0, 5);
        w.forget("s", &[1; 16]);
        w.forget("s", &[1; 16]);
        w.forget("nobody", &[1; 16]);
        assert!(w.is_empty());
        assert_eq!(w.check("s", &[1; 16], 10), ReplayVerdict::New);
        w.record("s", [1; 16], 10, 20);
        assert_eq!(w.len(), 1);
        assert_eq!(
            w.check("s", &[1; 16], 30),
            ReplayVerdict::Duplicate {
                delivered_at_ms: 20
            }
        );
        // Both order entries age out; the total never goes below zero.
        assert_eq!(w.check("s", &[2; 16], 5000), ReplayVerdict::New);
        assert!(w.is_empty());
    }

    #[test]
    fn bounded_by_count_and_time() {
        let mut w = ReplayWindow::new(1000, 3);
        for i in 0..3u8 {
            w.record("s", [i; 16], 0, 0);
        }
        assert_eq!(w.check("s", &[9; 16], 10), ReplayVerdict::Full);
        // After twice the window, old ids expire and new ones are accepted.
        assert_eq!(w.check("s", &[9; 16], 2001), ReplayVerdict::New);
        assert!(w.is_empty());
    }

    #[test]
    fn bounded_over_all_senders_too() {
        let mut w = ReplayWindow::with_total_cap(1000, 10, 4);
        for (n, sender) in ["a", "b", "c", "d"].iter().enumerate() {
            assert_eq!(w.check(sender, &[n as u8; 16], 0), ReplayVerdict::New);
            w.record(sender, [n as u8; 16], 0, 0);
        }
        assert_eq!(w.len(), 4);
        // A fifth sender, and a known one with a new id: both refused.
        assert_eq!(w.check("e", &[9; 16], 10), ReplayVerdict::Full);
        assert_eq!(w.check("a", &[9; 16], 10), ReplayVerdict::Full);
        // Duplicates are still recognised at the cap.
        assert!(matches!(
            w.check("b", &[1; 16], 10),
            ReplayVerdict::Duplicate { .. }
        ));
        // Once the old ids have aged out, the sweep makes room and drops the
        // senders left with none.
        assert_eq!(w.check("e", &[9; 16], 2001), ReplayVerdict::New);
        assert!(w.is_empty());
        assert!(w.senders.is_empty());
    }
}
