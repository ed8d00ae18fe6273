//! A watch of a whole bucket that notices when it has stalled and opens
//! itself again.
//!
//! The client's KV watch is an ordered push consumer held by one NATS node.
//! When that node dies the watch says nothing: the client only notices
//! after two missed idle heartbeats (10 s) and then recreates the consumer
//! with a backoff that reaches 10 s; on a loaded machine a relay's view of
//! the registry or the attaches stayed frozen for over a minute (an invite
//! written through another relay was refused as unknown; agents that moved
//! stayed unreachable). [`BucketWatch`] compares what it delivered with the
//! bucket's newest revision every [`CHECK_EVERY`] and, when the watch has
//! not delivered what the bucket already held at the previous check (or
//! someone waiting for a revision [`BucketWatch::poke`]s it), replaces the
//! consumer with a new one starting after the last revision delivered.
//! Entries may then arrive twice; every user applies them by revision.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Notify;
use tracing::warn;

use super::ClusterError;

/// How often the watch is compared with the bucket.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// How long one comparison or reopening may take before it is given up
/// until the next check (NATS itself may be what is down).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The newest revision of `store` (its stream's last sequence), asked of
/// the stream afresh (the store's own status is the one cached when the
/// bucket was opened).
pub async fn newest_revision(store: &kv::Store) -> Result<u64, ClusterError> {
    let mut stream = store.stream.clone();
    let info = stream
        .info()
        .await
        .map_err(|e| ClusterError::js("reading a bucket's newest revision")(e.to_string()))?;
    Ok(info.state.last_sequence)
}

/// The decision of [`BucketWatch`], without I/O: fed at each check with
/// the revision delivered so far and the bucket's newest one.
#[derive(Debug, Default)]
pub struct StallCheck {
    /// The bucket's newest revision at the previous check, when the watch
    /// had not delivered it yet.
    behind: Option<u64>,
}

impl StallCheck {
    /// Whether the watch has stalled: it still has not delivered what the
    /// bucket held one check ago. A stall starts the count afresh (the
    /// reopened watch gets a whole period to catch up).
    pub fn stalled(&mut self, delivered: u64, newest: u64) -> bool {
        let stalled = self.behind.is_some_and(|b| delivered < b);
        self.behind = (!stalled && delivered < newest).then_some(newest);
        stalled
    }
}

/// A watch of every key of a bucket, kept alive (see the module's
/// description).
pub struct BucketWatch {
    store: kv::Store,
    watch: kv::Watch,
    /// The highest revision delivered.
    delivered: u64,
    check: StallCheck,
    tick: tokio::time::Interval,
    poke: Arc<Notify>,
}

impl std::fmt::Debug for BucketWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketWatch")
            .field("bucket", &self.store.name)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl BucketWatch {
    /// Follow `watch`, a watch of `store` that has delivered up to
    /// revision `delivered`.
    pub fn new(store: kv::Store, watch: kv::Watch, delivered: u64) -> Self {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            store,
            watch,
            delivered,
            check: StallCheck::default(),
            tick,
            poke: Arc::new(Notify::new()),
        }
    }

    /// A handle that makes the watch look at the bucket now (someone waited
    /// in vain for a revision): a lag is then a stall.
    pub fn poke(&self) -> Arc<Notify> {
        self.poke.clone()
    }

    /// The next entry, or error, of the watch; `None` when it ended.
    pub async fn next(&mut self) -> Option<Result<kv::Entry, kv::WatcherError>> {
        loop {
            tokio::select! {
                item = self.watch.next() => return self.delivering(item),
                _ = self.tick.tick() => self.compare(false).await,
                _ = self.poke.notified() => self.compare(true).await,
            }
        }
    }

    /// The next entry if one is already here (see [`Self::next`]).
    pub fn next_now(&mut self) -> Option<Option<Result<kv::Entry, kv::WatcherError>>> {
        let item = self.watch.next().now_or_never()?;
        Some(self.delivering(item))
    }

    fn delivering(
        &mut self,
        item: Option<Result<kv::Entry, kv::WatcherError>>,
    ) -> Option<Result<kv::Entry, kv::WatcherError>> {
        if let Some(Ok(e)) = &item {
            self.delivered = self.delivered.max(e.revision);
        }
        item
    }

    /// Compare with the bucket; open the watch again if it stalled (or,
    /// when `poked`, if it lags at all).
    async fn compare(&mut self, poked: bool) {
        let newest = match tokio::time::timeout(REQUEST_TIMEOUT, newest_revision(&self.store)).await
        {
            Ok(Ok(newest)) => newest,
            // NATS is not answering: the watch cannot do better either.
            _ => return,
        };
        let stalled = if poked {
            self.check = StallCheck::default();
            self.delivered < newest
        } else {
            self.check.stalled(self.delivered, newest)
        };
        if !stalled {
            return;
        }
        let from = self.delivered + 1;
        match tokio::time::timeout(REQUEST_TIMEOUT, self.store.watch_all_from_revision(from)).await
        {
            Ok(Ok(w)) => {
                warn!(
                    bucket = %self.store.name,
                    delivered = self.delivered,
                    newest,
                    "the bucket's watch stalled (its NATS node may be gone); watching again from the next revision"
                );
                self.watch = w;
            }
            Ok(Err(e)) => {
                warn!(bucket = %self.store.name, "the bucket's watch stalled and cannot be opened again yet: {e}")
            }
            Err(_) => {
                warn!(bucket = %self.store.name, "the bucket's watch stalled and opening it again timed out")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StallCheck;

    #[test]
    fn a_watch_is_stalled_only_when_it_misses_what_was_there_a_check_ago() {
        let mut c = StallCheck::default();
        // Caught up: never stalled.
        assert!(!c.stalled(5, 5));
        assert!(!c.stalled(5, 5));
        // Behind, then caught up with what was there: going on.
        assert!(!c.stalled(5, 8));
        assert!(!c.stalled(8, 12));
        assert!(!c.stalled(12, 14));
        // Still behind what was there a check ago (14): stalled.
        assert!(c.stalled(13, 16), "14 was there a check ago");
        // The count starts afresh after a stall.
        assert!(!c.stalled(13, 16));
        assert!(c.stalled(13, 16));
        // New writes keep coming and the watch keeps up with the older
        // ones: a busy bucket is not a stalled watch.
        let mut c = StallCheck::default();
        for n in 0..10u64 {
            assert!(!c.stalled(10 * n, 10 * n + 10));
        }
    }
}
