//! Who is connected and where each agent's deliveries go.
//!
//! One `std::sync::Mutex` guards the table; it is never held across an
//! `.await` (every method is synchronous and short). Routing decisions are
//! plain lookups: `(instance, agent)` to the receiving stream's queue and
//! ledger (`core::deliveries`), and a stream token to the stream that sent
//! a message (for its receipt, once the receiving stream's ledger has
//! accepted the reply).
//!
//! The table is generic over the item `M` a stream's writer queue carries,
//! so it knows nothing of wire encoding or of the writer: the relay routes
//! `server::writer::Outbound` (re-exported as [`crate::Outbound`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::core::deliveries::Ledger;
use crate::core::rate::TokenBucket;
use crate::core::TokenMap;

/// A stream's deliveries, named by sending instance (see
/// [`crate::core::deliveries`]).
pub type StreamLedger = Arc<Mutex<Ledger<Arc<str>>>>;

/// What [`Router::attach_receiver`] did.
#[derive(Debug)]
pub enum AttachOutcome<M> {
    /// Now the receiving stream; nobody was before.
    Attached,
    /// Now the receiving stream; this one was, and must be told.
    Replaced(StreamHandle<M>),
    /// Not attached: a newer stream of the same connection holds the agent.
    Stale,
    /// Not attached: the instance has no connection.
    Offline,
}

/// The sending side of one agent stream.
#[derive(Debug)]
pub struct StreamHandle<M> {
    /// Relay-unique stream token: where replies to its sends are routed.
    pub token: u64,
    /// Its writer queue (bounded: `agent_queue_len` frames).
    pub tx: mpsc::Sender<M>,
    /// Deliveries queued for it and not yet answered: admitted under the
    /// table's lock, taken off by its writer, answered by its own replies.
    pub ledger: StreamLedger,
    /// Connection id and QUIC stream index: streams of one connection were
    /// opened in index order, whatever order the relay processes them in.
    pub opened: (u64, u64),
    /// Cancels the stream's tasks.
    pub cancel: CancellationToken,
}

// Not derived: the derive would ask `M: Clone`, but only the queue's
// sending half is cloned.
impl<M> Clone for StreamHandle<M> {
    fn clone(&self) -> Self {
        Self {
            token: self.token,
            tx: self.tx.clone(),
            ledger: self.ledger.clone(),
            opened: self.opened,
            cancel: self.cancel.clone(),
        }
    }
}

#[derive(Debug)]
struct InstanceEntry<M> {
    connections: TokenMap<quinn::Connection>,
    receivers: HashMap<String, StreamHandle<M>>,
    rate: Arc<Mutex<TokenBucket>>,
    /// The instance's bucket for control requests (see
    /// `core::limits::CONTROL_PER_SEC`).
    control: Arc<Mutex<TokenBucket>>,
    /// Bytes queued for delivery to its streams (`instance_queue_bytes`).
    queued: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Inner<M> {
    instances: HashMap<String, InstanceEntry<M>>,
    streams: TokenMap<StreamHandle<M>>,
}

impl<M> Inner<M> {
    /// Drop `agent`'s receiving route if the stream `token` still holds it
    /// (a newer attach may have taken it over).
    fn remove_receiver(&mut self, token: u64, instance: &str, agent: &str) {
        if let Some(e) = self.instances.get_mut(instance) {
            if e.receivers.get(agent).is_some_and(|h| h.token == token) {
                e.receivers.remove(agent);
            }
        }
    }
}

/// The routing table.
#[derive(Debug)]
pub struct Router<M> {
    inner: Mutex<Inner<M>>,
    next: AtomicU64,
    /// Bumped whenever who is online or attached may have changed (for the
    /// status snapshot, `core::status`).
    changes: AtomicU64,
}

impl<M> Default for Router<M> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                instances: HashMap::new(),
                streams: TokenMap::default(),
            }),
            next: AtomicU64::new(0),
            changes: AtomicU64::new(0),
        }
    }
}

impl<M> Router<M> {
    /// Changes so far to who is online or attached.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters more than stopping the relay would: recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh relay-unique id (connections).
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A fresh stream token, random: it is the reply token every delivery
    /// from that stream carries, and receivers route their receipts and
    /// refusals by it, so a member must not be able to guess another
    /// stream's token from its own (sequential tokens let it push forged
    /// `Failed` frames into a stranger's stream).
    pub fn new_token(&self) -> u64 {
        let g = self.lock();
        loop {
            let t: u64 = rand::random();
            if t != 0 && !g.streams.contains_key(&t) {
                return t;
            }
        }
    }

    /// Add a connection of `instance`. Returns the instance's shared rate
    /// bucket, or `None` when it already has `max_per_instance` connections.
    pub fn add_connection(
        &self,
        instance: &str,
        conn_id: u64,
        conn: quinn::Connection,
        max_per_instance: usize,
        rate: (u32, u32),
    ) -> Option<Arc<Mutex<TokenBucket>>> {
        let mut g = self.lock();
        let entry = g
            .instances
            .entry(instance.to_string())
            .or_insert_with(|| InstanceEntry {
                connections: TokenMap::default(),
                receivers: HashMap::new(),
                rate: Arc::new(Mutex::new(TokenBucket::new(rate.0, rate.1, Instant::now()))),
                control: Arc::new(Mutex::new(TokenBucket::new(
                    crate::core::limits::CONTROL_PER_SEC,
                    crate::core::limits::CONTROL_BURST,
                    Instant::now(),
                ))),
                queued: Arc::default(),
            });
        if entry.connections.len() >= max_per_instance {
            return None;
        }
        entry.connections.insert(conn_id, conn);
        let rate = entry.rate.clone();
        drop(g);
        self.changed();
        Some(rate)
    }

    /// The control-request bucket of a connected instance, shared by all its
    /// connections.
    pub fn control_bucket(&self, instance: &str) -> Option<Arc<Mutex<TokenBucket>>> {
        self.lock()
            .instances
            .get(instance)
            .map(|e| e.control.clone())
    }

    /// The counter of bytes queued for `instance`'s streams, shared by
    /// their ledgers (a fresh one if it has no connection: nothing can be
    /// routed to it then anyway).
    pub fn instance_queue(&self, instance: &str) -> Arc<AtomicUsize> {
        self.lock()
            .instances
            .get(instance)
            .map(|e| e.queued.clone())
            .unwrap_or_default()
    }

    /// Remove a connection; the instance goes offline with its last one.
    pub fn remove_connection(&self, instance: &str, conn_id: u64) {
        let mut g = self.lock();
        if let Some(e) = g.instances.get_mut(instance) {
            e.connections.remove(&conn_id);
            if e.connections.is_empty() {
                g.instances.remove(instance);
            }
        }
        drop(g);
        self.changed();
    }

    /// Make a stream reachable by its token (for receipts).
    pub fn add_stream(&self, handle: StreamHandle<M>) {
        self.lock().streams.insert(handle.token, handle);
    }

    /// Forget a stream, and its receiving slot if it still holds it.
    pub fn remove_stream(&self, token: u64, receiving: Option<(&str, &str)>) {
        let mut g = self.lock();
        g.streams.remove(&token);
        if let Some((instance, agent)) = receiving {
            g.remove_receiver(token, instance, agent);
            drop(g);
            self.changed();
        }
    }

    /// Stop routing deliveries for `agent` of `instance` to the stream
    /// `token` (it detached); the stream stays known for its replies.
    pub fn detach_receiver(&self, token: u64, instance: &str, agent: &str) {
        self.lock().remove_receiver(token, instance, agent);
        self.changed();
    }

    /// Make `handle` the receiving stream of `instance/agent`: the newest
    /// attach wins and the one it replaced is returned (to be told so).
    /// "Newest" is arrival order across connections, but open order within
    /// one connection: a peer that gave up waiting on an attach and opened
    /// another stream must not be displaced by its own older attach that
    /// the relay happened to process later.
    pub fn attach_receiver(
        &self,
        instance: &str,
        agent: &str,
        handle: StreamHandle<M>,
    ) -> AttachOutcome<M> {
        let mut g = self.lock();
        let Some(e) = g.instances.get_mut(instance) else {
            return AttachOutcome::Offline;
        };
        if let Some(cur) = e.receivers.get(agent) {
            if cur.opened.0 == handle.opened.0 && cur.opened.1 > handle.opened.1 {
                return AttachOutcome::Stale;
            }
        }
        let outcome = match e.receivers.insert(agent.to_string(), handle) {
            Some(old) => AttachOutcome::Replaced(old),
            None => AttachOutcome::Attached,
        };
        drop(g);
        self.changed();
        outcome
    }

    /// The receiving stream of `instance/agent`, if attached.
    pub fn route(&self, instance: &str, agent: &str) -> Option<StreamHandle<M>> {
        let g = self.lock();
        g.instances.get(instance)?.receivers.get(agent).cloned()
    }

    /// Run `f` on the receiving stream of `instance/agent` without cloning
    /// its handle (`f` runs under the table's lock: it must be short and
    /// must not block).
    pub fn with_route<R>(
        &self,
        instance: &str,
        agent: &str,
        f: impl FnOnce(&StreamHandle<M>) -> R,
    ) -> Option<R> {
        let g = self.lock();
        g.instances.get(instance)?.receivers.get(agent).map(f)
    }

    /// The stream with this token, if still open.
    pub fn stream(&self, token: u64) -> Option<StreamHandle<M>> {
        self.lock().streams.get(&token).cloned()
    }

    /// Run `f` on the stream with this token without cloning its handle
    /// (under the table's lock: short, never blocking).
    pub fn with_stream<R>(&self, token: u64, f: impl FnOnce(&StreamHandle<M>) -> R) -> Option<R> {
        self.lock().streams.get(&token).map(f)
    }

    /// Every open connection of a registered instance (to push a rotated
    /// fleet secret).
    pub fn all_connections(&self) -> Vec<quinn::Connection> {
        self.lock()
            .instances
            .values()
            .flat_map(|e| e.connections.values().cloned())
            .collect()
    }

    /// Connections of `instance` (to close them on revocation).
    pub fn connections_of(&self, instance: &str) -> Vec<quinn::Connection> {
        self.lock()
            .instances
            .get(instance)
            .map(|e| e.connections.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Online instances with their attached receiving agents (sorted).
    pub fn snapshot(&self) -> HashMap<String, Vec<String>> {
        self.lock()
            .instances
            .iter()
            .map(|(id, e)| {
                let mut agents: Vec<String> = e.receivers.keys().cloned().collect();
                agents.sort();
                (id.clone(), agents)
            })
            .collect()
    }

    /// Open connections per online instance.
    pub fn connection_counts(&self) -> HashMap<String, usize> {
        self.lock()
            .instances
            .iter()
            .map(|(id, e)| (id.clone(), e.connections.len()))
            .collect()
    }

    /// Number of online instances.
    pub fn online_count(&self) -> usize {
        self.lock().instances.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(token: u64) -> (StreamHandle<()>, mpsc::Receiver<()>) {
        let (tx, rx) = mpsc::channel(4);
        let limits = crate::core::deliveries::LedgerLimits::of(&Default::default());
        (
            StreamHandle {
                token,
                tx,
                ledger: Arc::new(Mutex::new(Ledger::new(limits, Default::default()))),
                opened: (7, token),
                cancel: CancellationToken::new(),
            },
            rx,
        )
    }

    #[test]
    fn newest_attach_wins_and_stale_removal_is_ignored() {
        let r = Router::<()>::default();
        // No connection: cannot attach (instance offline).
        let (h1, _r1) = handle(1);
        assert!(matches!(
            r.attach_receiver("i1", "a", h1.clone()),
            AttachOutcome::Offline
        ));
        assert!(r.route("i1", "a").is_none());
        r.lock().instances.insert(
            "i1".into(),
            InstanceEntry {
                connections: TokenMap::default(),
                receivers: HashMap::new(),
                rate: Arc::new(Mutex::new(TokenBucket::new(1, 1, Instant::now()))),
                control: Arc::new(Mutex::new(TokenBucket::new(1, 1, Instant::now()))),
                queued: Arc::default(),
            },
        );
        assert!(matches!(
            r.attach_receiver("i1", "a", h1.clone()),
            AttachOutcome::Attached
        ));
        let (h2, _r2) = handle(2);
        assert!(matches!(
            r.attach_receiver("i1", "a", h2.clone()),
            AttachOutcome::Replaced(old) if old.token == 1
        ));
        // The older stream of the same connection, processed late, loses;
        // one of another connection wins however old its stream index.
        assert!(matches!(
            r.attach_receiver("i1", "a", h1),
            AttachOutcome::Stale
        ));
        assert_eq!(r.route("i1", "a").map(|h| h.token), Some(2));
        let (mut h3, _r3) = handle(0);
        h3.token = 3;
        h3.opened = (8, 0);
        assert!(matches!(
            r.attach_receiver("i1", "a", h3),
            AttachOutcome::Replaced(old) if old.token == 2
        ));
        r.lock()
            .instances
            .get_mut("i1")
            .unwrap()
            .receivers
            .insert("a".into(), h2);
        // The replaced stream closing must not remove the new receiver.
        r.remove_stream(1, Some(("i1", "a")));
        assert_eq!(r.route("i1", "a").map(|h| h.token), Some(2));
        r.remove_stream(2, Some(("i1", "a")));
        assert!(r.route("i1", "a").is_none());
        assert_eq!(r.snapshot()["i1"], Vec::<String>::new());
    }
}
