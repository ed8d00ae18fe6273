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
    senders: HashMap<String, SenderIds>,
}

impl ReplayWindow {
    /// `window_ms` must be at least the timestamp window receivers enforce.
    pub fn new(window_ms: u64, max_per_sender: usize) -> Self {
        Self {
            window_ms,
            max_per_sender,
            senders: HashMap::new(),
        }
    }

    fn expire(ids: &mut SenderIds, now_ms: u64, window_ms: u64) {
        // Arrival order is close to sent_at order; an out-of-order old entry
        // simply waits for the ones in front of it (bounded by the cap).
        while let Some(&(sent, id)) = ids.order.front() {
            if now_ms.saturating_sub(sent) > window_ms.saturating_mul(2) {
                ids.order.pop_front();
                ids.by_id.remove(&id);
            } else {
                break;
            }
        }
    }

    /// Look an id up without recording it.
    pub fn check(&mut self, sender: &str, id: &MessageId, now_ms: u64) -> ReplayVerdict {
        let Some(ids) = self.senders.get_mut(sender) else {
            return ReplayVerdict::New;
        };
        Self::expire(ids, now_ms, self.window_ms);
        if let Some(&at) = ids.by_id.get(id) {
            ReplayVerdict::Duplicate {
                delivered_at_ms: at,
            }
        } else if ids.by_id.len() >= self.max_per_sender {
            ReplayVerdict::Full
        } else {
            ReplayVerdict::New
        }
    }

    /// Remember `id` as delivered at `delivered_at_ms`.
    pub fn record(&mut self, sender: &str, id: MessageId, sent_at_ms: u64, delivered_at_ms: u64) {
        let ids = self.senders.entry(sender.to_owned()).or_default();
        if ids.by_id.insert(id, delivered_at_ms).is_none() {
            ids.order.push_back((sent_at_ms, id));
        }
    }

    /// Ids remembered in all.
    pub fn len(&self) -> usize {
        self.senders.values().map(|s| s.by_id.len()).sum()
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
}
