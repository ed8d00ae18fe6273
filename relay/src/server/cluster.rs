//! This relay's part in a fleet (DESIGN.md, "A fleet of relays";
//! PROTOCOL.md, "Relay to relay"): where its receiving agents are attached
//! (puts and deletes in the attach bucket, and a watch of everyone else's),
//! forwarding a message for an agent another relay holds as a NATS message
//! carrying the envelope's bytes unchanged (its answer comes back on this
//! relay's answer subject), and serving such messages for its own agents.
//! Everything for other relays goes out through one publisher task, so a
//! forward costs no task, timer or reply channel of its own, and what is
//! queued at one moment goes as one NATS message per relay
//! (`crate::cluster::batch`). The decisions
//! are in `crate::cluster::attach`; this is the I/O around them.
//!
//! Trust: NATS is inside the fleet's trust boundary, but not trusted with
//! identities. A relay serving a request takes the sender's key from the
//! fleet registry by the envelope's own `from` (never from the request),
//! and checks the fleet tag and the clock as for a local send; the
//! receiving peer verifies the signature against that key. A reply is
//! accepted only as a `Receipt` or `Failed` naming the forwarded id.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_link_crypto::PublicKey;
use agent_link_proto::codec::FRAME_HEADER_LEN;
use agent_link_proto::{ErrorCode, MessageId, OpenedEnvelope, RelayEndpoint, RelayToPeer};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::hub::Hub;
use super::writer::{error_frame, frame, Outbound};
use crate::cluster::attach::{self, AttachTable, AttachValue};
use crate::cluster::batch::{self, Batcher};
use crate::cluster::watch::BucketWatch;
use crate::cluster::{deliver_subject, presence, Cluster};
use crate::core::checks::{check_opened, SenderContext};
use crate::core::TokenMap;

/// Requests to other relays in flight at once; beyond it senders get
/// `Busy`, as for a full local queue.
const MAX_IN_FLIGHT: usize = 4096;

/// How long a forwarded message waits for the owning relay's answer. A
/// timeout answers the sender nothing: its own deadline and retry (same
/// id, de-duplicated by the receiver) take over, as for a lost packet.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the owning relay keeps the way back for a delivery its agent
/// has not answered (the asking relay stopped waiting long before).
const PENDING_TTL: Duration = Duration::from_secs(60);

/// The fleet as one running relay takes part in it.
#[derive(Debug)]
pub(crate) struct ClusterLink {
    cluster: Cluster,
    attach: Mutex<AttachTable>,
    /// Deliveries from other relays not answered yet: the reply token the
    /// target's ledger holds, to the NATS subject the answer goes to and
    /// the asking relay's number for it.
    pending: Mutex<TokenMap<(async_nats::Subject, u64, Instant)>>,
    /// Messages this relay forwarded, waiting for their answer, by their
    /// number `n`.
    waiting: Mutex<TokenMap<Forwarded>>,
    next_forward: std::sync::atomic::AtomicU64,
    /// Batches of forwards sent, by batch number (the last token of their
    /// reply subject): the forwards each carried, for a "no responders"
    /// status, which names only the batch.
    batches: Mutex<TokenMap<(Vec<u64>, Instant)>>,
    /// `agentlink.relay.<this relay>.answer.`: where answers come back.
    answers: String,
    /// What goes out to other relays, published by one task in order
    /// (no task, timer or reply channel per message).
    out_tx: mpsc::Sender<Outgoing>,
    out_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Senders' keys parsed from the registry's hex, by that hex: parsing
    /// one decompresses a curve point (a quarter of the serving relay's
    /// CPU when done per message). Keyed by the key itself, so a record
    /// whose key changes (it cannot: one key per id) finds no stale entry.
    keys: Mutex<HashMap<String, PublicKey>>,
}

/// Parsed keys kept at most; beyond it the cache starts again.
const MAX_CACHED_KEYS: usize = 100_000;

/// A forward waiting for its answer.
#[derive(Debug)]
struct Forwarded {
    /// The sender's stream.
    reply_token: u64,
    id: MessageId,
    since: Instant,
    /// Where it went and what, to send it again.
    subject: async_nats::Subject,
    envelope: Bytes,
    retried: u8,
}

/// A forward unanswered this long goes again (NATS core delivers at most
/// once: a relay or NATS node that dies loses the message or its answer).
/// The receiver drops the copy it already has and answers it with the
/// first receipt, or when its application takes the first.
const FORWARD_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Sends of a forward again at most, within [`FORWARD_TIMEOUT`].
const FORWARD_RETRIES: u8 = 3;

/// One item for another relay; the publisher batches them
/// (`cluster::batch`).
#[derive(Debug)]
enum Outgoing {
    /// Forward `n`, an envelope, to the relay serving `subject`.
    Forward {
        subject: async_nats::Subject,
        n: u64,
        envelope: Bytes,
    },
    /// The answer `body` to forward `n` of the relay that asked with the
    /// reply subject `reply`.
    Answer {
        reply: async_nats::Subject,
        n: u64,
        body: Bytes,
    },
}

impl ClusterLink {
    pub(crate) fn new(cluster: Cluster) -> Self {
        // Forwards are bounded by `waiting`; answers by the deliveries the
        // fleet can have queued here.
        let (out_tx, out_rx) = mpsc::channel(4 * MAX_IN_FLIGHT);
        Self {
            attach: Mutex::new(AttachTable::new(cluster.relay_id())),
            answers: format!("{}.", crate::cluster::answer_prefix(cluster.relay_id())),
            cluster,
            pending: Mutex::default(),
            waiting: Mutex::default(),
            batches: Mutex::default(),
            next_forward: std::sync::atomic::AtomicU64::new(0),
            out_tx,
            out_rx: Mutex::new(Some(out_rx)),
            keys: Mutex::default(),
        }
    }

    /// The key whose hex the registry holds, parsed once.
    fn key_of(&self, hex: &str) -> Option<PublicKey> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keys.get(hex) {
            return Some(*k);
        }
        let k: PublicKey = hex.parse().ok()?;
        if keys.len() >= MAX_CACHED_KEYS {
            keys.clear();
        }
        keys.insert(hex.to_string(), k);
        Some(k)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, AttachTable> {
        self.attach.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The relay holding `instance/agent`'s receiving stream, when it is
    /// another one.
    pub(crate) fn remote_holder(&self, instance: &str, agent: &str) -> Option<Arc<str>> {
        self.table().remote_holder(instance, agent)
    }

    /// Forward a checked envelope to `relay`, which holds its target; the
    /// answer goes to the stream `reply_token`. Never waits: the publisher
    /// task sends it, and [`take_answers`] routes what comes back.
    pub(crate) fn forward(
        &self,
        relay: &str,
        reply_token: u64,
        id: MessageId,
        envelope: Bytes,
    ) -> Result<(), ErrorCode> {
        let n = self.next_forward.fetch_add(1, Relaxed);
        let subject: async_nats::Subject = deliver_subject(relay).into();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.len() >= MAX_IN_FLIGHT {
                return Err(ErrorCode::Busy);
            }
            let f = Forwarded {
                reply_token,
                id,
                since: Instant::now(),
                subject: subject.clone(),
                envelope: envelope.clone(),
                retried: 0,
            };
            waiting.insert(n, f);
        }
        if !self.publish_forward(n, subject, envelope) {
            self.waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&n);
            return Err(ErrorCode::Busy);
        }
        Ok(())
    }

    /// Queue forward `n` for the publisher; `false` when it is backed up.
    fn publish_forward(&self, n: u64, subject: async_nats::Subject, envelope: Bytes) -> bool {
        let out = Outgoing::Forward {
            subject,
            n,
            envelope,
        };
        self.out_tx.try_send(out).is_ok()
    }

    /// Queue the answer `body` to forward `n` of the relay asking on
    /// `reply`. Never waits.
    fn queue_answer(&self, reply: async_nats::Subject, n: u64, body: Bytes) {
        // Full: the asking relay times out and its sender's deadline and
        // retry take over, as for a lost packet.
        if self
            .out_tx
            .try_send(Outgoing::Answer { reply, n, body })
            .is_err()
        {
            warn!("answers to other relays are backed up; one dropped");
        }
    }

    /// Forget forwards unanswered after [`FORWARD_TIMEOUT`] (nothing is sent
    /// to the peer: its own deadline and retry take over) and send again
    /// those unanswered for [`FORWARD_RETRY_AFTER`] per try.
    fn sweep_forwards(&self, now: Instant, stats: &crate::stats::Stats) {
        let mut again = Vec::new();
        let mut given_up = 0u64;
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&n, f| {
                let age = now.duration_since(f.since);
                if age >= FORWARD_TIMEOUT {
                    given_up += 1;
                    return false;
                }
                if f.retried < FORWARD_RETRIES
                    && age >= FORWARD_RETRY_AFTER * u32::from(f.retried + 1)
                {
                    f.retried += 1;
                    again.push((n, f.subject.clone(), f.envelope.clone()));
                }
                true
            });
        stats.fleet_forwards_unanswered.fetch_add(given_up, Relaxed);
        stats
            .fleet_forwards_resent
            .fetch_add(again.len() as u64, Relaxed);
        for (n, subject, envelope) in again {
            let _ = self.publish_forward(n, subject, envelope);
        }
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            // The server answers "no responders" at once: a batch needs
            // remembering only until its forwards would go again anyway.
            .retain(|_, (_, since)| now.duration_since(*since) < FORWARD_RETRY_AFTER);
    }

    /// Send the answer `f` (a whole frame) to the relay that forwarded the
    /// delivery `token`, if it was one of theirs. Never waits.
    pub(crate) fn answer_remote(&self, token: u64, f: &Bytes) -> bool {
        let Some((reply, n, _)) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token)
        else {
            return false;
        };
        self.queue_answer(reply, n, f.slice(FRAME_HEADER_LEN..));
        true
    }

    /// The stream `token` became the receiving stream of `instance/agent`:
    /// record it in the attach bucket (the put runs as its own task).
    pub(crate) fn attached(&self, hub: &Arc<Hub>, instance: &str, agent: &str, token: u64) {
        self.table().local_attached(instance, agent, token);
        let store = self.cluster.attach_store().clone();
        let value = serde_json::to_vec(&AttachValue {
            relay: self.cluster.relay_id().to_string(),
        })
        .expect("an attach value encodes");
        let (hub, instance, agent) = (hub.clone(), instance.to_string(), agent.to_string());
        tokio::spawn(async move {
            let key = attach::key(&instance, &agent);
            let Some(fleet) = hub.cluster() else { return };
            let mut pause = Duration::from_millis(250);
            let revision = loop {
                match store.put(&key, value.clone().into()).await {
                    Ok(r) => break r,
                    Err(e) => {
                        // JetStream refuses for a while after a NATS node
                        // restarts ("no stream found"): an attach left
                        // unrecorded would leave the agent unreachable
                        // from every other relay, so keep trying while
                        // this stream still receives for it.
                        let current = fleet.table().holds(&instance, &agent, token);
                        if !current || hub.shutdown().is_cancelled() {
                            return;
                        }
                        warn!("could not record an attach in the fleet: {e}; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let (replace, gone) = {
                let mut t = fleet.table();
                let replace = t.put_done(&instance, &agent, token, revision);
                (
                    replace,
                    replace.is_none() && !t.holds(&instance, &agent, token),
                )
            };
            if let Some(token) = replace {
                replace_local(&hub, &instance, &agent, token);
            } else if gone {
                // Detached while the put was in flight: take it back.
                let _ = store.delete_expect_revision(&key, Some(revision)).await;
            }
        });
    }

    /// The stream `token` stopped receiving for `instance/agent`: delete
    /// its entry if it is still this stream's.
    pub(crate) fn detached(&self, instance: &str, agent: &str, token: u64) {
        let Some(Some(revision)) = self.table().local_detached(instance, agent, token) else {
            // Not ours, or the put is still in flight (it deletes itself).
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.cluster.attach_store().clone();
        let key = attach::key(instance, agent);
        rt.spawn(async move {
            // Fails when a newer attach (anywhere) overwrote it: as meant.
            let _ = store.delete_expect_revision(&key, Some(revision)).await;
        });
    }

    fn forget_expired(&self, now: Instant) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (_, _, since)| now.duration_since(*since) < PENDING_TTL);
    }
}

/// A relay's answer to a forwarded message: the frame to give the sender,
/// when it is a `Receipt` or `Failed` for `id`, and whether it is the
/// `Failed`.
fn checked_answer(body: &[u8], id: MessageId) -> Option<(Bytes, bool)> {
    let answer: RelayToPeer<'_> = agent_link_proto::codec::decode(body).ok()?;
    match answer {
        RelayToPeer::Receipt { ref receipt } if receipt.id == id => Some((frame(&answer), false)),
        RelayToPeer::Failed { id: got, .. } if got == id => Some((frame(&answer), true)),
        _ => None,
    }
}

/// Another relay's attach overtook this relay's stream `token`: it stops
/// receiving and is told `Replaced`, as when a newer attach arrives here.
fn replace_local(hub: &Hub, instance: &str, agent: &str, token: u64) {
    debug!("a newer attach on another relay wins; closing this one");
    hub.router().detach_receiver(token, instance, agent);
    hub.router().with_stream(token, |s| {
        if s.tx
            .try_send(Outbound::Close(error_frame(ErrorCode::Replaced)))
            .is_err()
        {
            s.cancel.cancel();
        }
    });
}

/// Announce this relay as up at `me`, follow the attach bucket (who holds
/// which agent) and serve deliveries from other relays, until shutdown.
pub(crate) async fn serve(hub: Arc<Hub>, me: RelayEndpoint) {
    let Some(fleet) = hub.cluster() else { return };
    tokio::join!(
        announce(&hub, fleet, &me),
        follow_attaches(&hub, fleet),
        serve_deliveries(&hub, fleet),
        publish_outgoing(&hub, fleet),
        take_answers(&hub, fleet),
    );
}

/// Publish what goes to other relays until shutdown: whatever is queued
/// at once goes out as one batch per destination (forwards to a relay, and
/// answers to a relay, each in their order).
async fn publish_outgoing(hub: &Hub, fleet: &ClusterLink) {
    let rx = fleet
        .out_rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let Some(mut rx) = rx else { return };
    let client = fleet.cluster.client();
    let mut queued = Vec::with_capacity(256);
    let mut next_batch: u64 = 0;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut queued, 256) => n,
            _ = hub.shutdown().cancelled() => return,
        };
        if n == 0 {
            return;
        }
        // A fleet has a few relays: a short list beats a map.
        let mut forwards: Vec<(async_nats::Subject, Batcher)> = Vec::new();
        let mut answers: Vec<(async_nats::Subject, Batcher)> = Vec::new();
        for o in queued.drain(..) {
            match o {
                Outgoing::Forward {
                    subject,
                    n,
                    envelope,
                } => batcher_for(&mut forwards, subject, |a, b| a == b).push(n, envelope),
                // Answers to one relay may name different batches of its:
                // any of its answer subjects reaches it.
                Outgoing::Answer { reply, n, body } => {
                    batcher_for(&mut answers, reply, |a, b| asker(a) == asker(b)).push(n, body)
                }
            }
        }
        for (subject, batcher) in forwards {
            for (payload, ns) in batcher.finish() {
                let b = next_batch;
                next_batch += 1;
                fleet
                    .batches
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(b, (ns, Instant::now()));
                let reply = format!("{}{b}", fleet.answers);
                hub.stats().fleet_batches_sent.fetch_add(1, Relaxed);
                // Not sent: its forwards go again or time out unanswered,
                // and their senders' deadline and retry take over.
                if let Err(e) = client
                    .publish_with_reply(subject.clone(), reply, payload)
                    .await
                {
                    debug!("forwards to another relay were not sent: {e}");
                }
            }
        }
        for (reply, batcher) in answers {
            for (payload, _) in batcher.finish() {
                if let Err(e) = client.publish(reply.clone(), payload).await {
                    debug!("answers to another relay were not sent: {e}");
                }
            }
        }
    }
}

/// The batcher in `list` for `subject` (by `same`), added when missing.
fn batcher_for(
    list: &mut Vec<(async_nats::Subject, Batcher)>,
    subject: async_nats::Subject,
    same: impl Fn(&str, &str) -> bool,
) -> &mut Batcher {
    let i = match list.iter().position(|(s, _)| same(s, &subject)) {
        Some(i) => i,
        None => {
            list.push((subject, Batcher::default()));
            list.len() - 1
        }
    };
    &mut list[i].1
}

/// The relay part of an answer subject (`…answer.<b>` without `<b>`).
fn asker(subject: &str) -> &str {
    subject.rsplit_once('.').map_or(subject, |(a, _)| a)
}

/// Route the answers to this relay's forwards to their senders' streams;
/// every half second, [`ClusterLink::sweep_forwards`].
async fn take_answers(hub: &Arc<Hub>, fleet: &ClusterLink) {
    let subject = format!("{}*", fleet.answers);
    let Some(mut sub) = subscribe(hub, fleet, &subject).await else {
        return;
    };
    let mut sweep = tokio::time::interval(Duration::from_millis(500));
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = sweep.tick() => {
                fleet.sweep_forwards(Instant::now(), hub.stats());
                continue;
            }
            _ = hub.shutdown().cancelled() => return,
        };
        let Some(msg) = msg else {
            let Some(again) = resubscribe(hub, fleet, &subject).await else {
                return;
            };
            sub = again;
            continue;
        };
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            // The holder is gone (killed, or not up yet): nobody can
            // deliver that batch's forwards now.
            let b = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|t| t.parse::<u64>().ok());
            let ns = b
                .and_then(|b| {
                    fleet
                        .batches
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&b)
                })
                .map(|(ns, _)| ns)
                .unwrap_or_default();
            for n in ns {
                settle(hub, fleet, n, None).await;
            }
            continue;
        }
        let items = match batch::decode(&msg.payload) {
            Ok(items) => items,
            Err(e) => {
                warn!("answers from another relay ignored: {e}");
                continue;
            }
        };
        for (n, body) in items {
            settle(hub, fleet, n, Some(&body)).await;
        }
    }
}

/// Forward `n`'s answer came (`None`: nobody could take it): hand it to
/// the sender, unless it is not one (then it is ignored), or it is a
/// refusal of a forward sent more than once.
async fn settle(hub: &Arc<Hub>, fleet: &ClusterLink, n: u64, body: Option<&[u8]>) {
    let settled = {
        let mut waiting = fleet.waiting.lock().unwrap_or_else(|e| e.into_inner());
        // Which forward, and whether it was sent more than once.
        let Entry::Occupied(f) = waiting.entry(n) else {
            return;
        };
        let (id, retried) = (f.get().id, f.get().retried > 0);
        let answer = match body {
            None => Some((
                frame(&RelayToPeer::Failed {
                    id,
                    code: ErrorCode::TargetOffline,
                }),
                true,
            )),
            Some(body) => checked_answer(body, id),
        };
        match answer {
            // Sent twice or more, a refusal speaks for one copy only:
            // another may have arrived (or may still). Only a receipt
            // settles it then; else the forward times out unanswered,
            // "outcome unknown".
            Some((_, true)) if retried => return,
            Some((answer, _)) => Some((f.remove().reply_token, answer)),
            None => None,
        }
    };
    let Some((reply_token, answer)) = settled else {
        warn!("a relay answered a forwarded message with something else; ignored");
        return;
    };
    super::agent::route_reply(hub, reply_token, answer).await;
}

/// Keep this relay's presence entry fresh until shutdown, then take it
/// away (a relay killed with -9 drops out when the entry expires).
async fn announce(hub: &Hub, fleet: &ClusterLink, me: &RelayEndpoint) {
    let store = fleet.cluster.relays_store();
    let id = fleet.cluster.relay_id();
    let mut tick = tokio::time::interval(presence::REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.shutdown().cancelled() => break,
        }
        if let Err(e) = presence::announce(store, id, me).await {
            warn!("cannot refresh this relay's presence: {e}");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), presence::withdraw(store, id)).await;
}

async fn follow_attaches(hub: &Arc<Hub>, fleet: &ClusterLink) {
    let store = fleet.cluster.attach_store();
    let mut cleaned = false;
    loop {
        let watch = match store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                warn!("cannot watch the fleet's attaches: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = hub.shutdown().cancelled() => return,
                }
            }
        };
        // A node that dies takes the watch's consumer with it, silently:
        // agents attached elsewhere meanwhile would stay unreachable.
        let mut watch = BucketWatch::new(store.clone(), watch, 0);
        loop {
            let entry = tokio::select! {
                e = watch.next() => e,
                _ = hub.shutdown().cancelled() => return,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    warn!("fleet attach watch: {e}");
                    continue;
                }
                None => break,
            };
            seen(hub, fleet, &entry);
            if entry.delta == 0 && !cleaned {
                cleaned = true;
                // Entries an earlier run of this relay left (it died
                // without deleting them): nobody holds those agents here.
                let stale = fleet.table().stale_own();
                for (i, a, revision) in stale {
                    let _ = store
                        .delete_expect_revision(attach::key(&i, &a), Some(revision))
                        .await;
                }
            }
        }
    }
}

fn seen(hub: &Hub, fleet: &ClusterLink, entry: &kv::Entry) {
    let Some((instance, agent)) = attach::parse_key(&entry.key) else {
        warn!(key = %entry.key, "fleet attach entry with a foreign key; ignored");
        return;
    };
    if entry.operation != kv::Operation::Put {
        fleet.table().seen_delete(&instance, &agent, entry.revision);
        return;
    }
    let Ok(value) = serde_json::from_slice::<AttachValue>(&entry.value) else {
        warn!(key = %entry.key, "fleet attach entry that does not decode; ignored");
        return;
    };
    let replace = fleet
        .table()
        .seen_put(&instance, &agent, &value.relay, entry.revision);
    if let Some(token) = replace {
        replace_local(hub, &instance, &agent, token);
    }
}

async fn serve_deliveries(hub: &Arc<Hub>, fleet: &ClusterLink) {
    let subject = deliver_subject(fleet.cluster.relay_id());
    // Without it no other relay can reach this relay's agents.
    let Some(mut sub) = subscribe(hub, fleet, &subject).await else {
        return;
    };
    let mut sweep = tokio::time::interval(PENDING_TTL / 4);
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = sweep.tick() => { fleet.forget_expired(Instant::now()); continue }
            _ = hub.shutdown().cancelled() => return,
        };
        let Some(msg) = msg else {
            let Some(again) = resubscribe(hub, fleet, &subject).await else {
                return;
            };
            sub = again;
            continue;
        };
        // A request without a reply subject has nobody to answer to.
        let Some(reply) = msg.reply else { continue };
        let items = match batch::decode(&msg.payload) {
            Ok(items) => items,
            Err(e) => {
                warn!("forwards from another relay ignored: {e}");
                continue;
            }
        };
        for (n, envelope) in items {
            if let Err((id, code)) = deliver(hub, fleet, envelope, &reply, n) {
                hub.refused(code);
                let Some(id) = id else { continue };
                let f = frame(&RelayToPeer::Failed { id, code });
                fleet.queue_answer(reply.clone(), n, f.slice(FRAME_HEADER_LEN..));
            }
        }
    }
}

/// Subscribe to `subject`, trying again every second until it works or
/// the relay shuts down (`None`).
async fn subscribe(
    hub: &Hub,
    fleet: &ClusterLink,
    subject: &str,
) -> Option<async_nats::Subscriber> {
    loop {
        match fleet.cluster.client().subscribe(subject.to_string()).await {
            Ok(s) => return Some(s),
            Err(e) => warn!(%subject, "cannot subscribe: {e}; trying again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = hub.shutdown().cancelled() => return None,
        }
    }
}

/// A subscription the client ended: say so and subscribe again (a relay
/// that stopped listening would leave every forward to it, or every answer
/// to it, unanswered without a word).
async fn resubscribe(
    hub: &Hub,
    fleet: &ClusterLink,
    subject: &str,
) -> Option<async_nats::Subscriber> {
    if hub.shutdown().is_cancelled() {
        return None;
    }
    warn!(%subject, "the NATS subscription ended; subscribing again");
    subscribe(hub, fleet, subject).await
}

/// Check a forwarded envelope and queue it on its target's stream, its
/// answer owed to forward `n` of the relay asking on `reply`.
fn deliver(
    hub: &Hub,
    fleet: &ClusterLink,
    envelope: Bytes,
    reply: &async_nats::Subject,
    n: u64,
) -> Result<(), (Option<MessageId>, ErrorCode)> {
    let env = OpenedEnvelope::open(&envelope).map_err(|e| (None, e.code()))?;
    let id = env.body.id;
    let (from, to) = (env.body.from, env.body.to);
    // The sender's key from the registry, by the envelope's own sender.
    let key: PublicKey = {
        let reg = hub.registry().read();
        match reg.get(from.instance) {
            Some(r) if r.revoked => return Err((Some(id), ErrorCode::Revoked)),
            Some(r) => fleet
                .key_of(&r.public_key)
                .ok_or((Some(id), ErrorCode::Internal))?,
            None => return Err((Some(id), ErrorCode::NotRegistered)),
        }
    };
    let sender = SenderContext {
        instance: from.instance,
        agent: from.agent,
        key: &key,
    };
    let now = agent_link_proto::clock::unix_ms(std::time::SystemTime::now());
    check_opened(&env, &sender, &hub.policy(), now).map_err(|code| (Some(id), code))?;
    let token = hub.router().new_token();
    // In the map before the delivery is queued: its answer may come at once.
    fleet
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(token, (reply.clone(), n, Instant::now()));
    let sender_name: Arc<str> = Arc::from(from.instance);
    let queued = super::agent::queue_delivery(
        hub,
        to.instance,
        to.agent,
        &sender_name,
        token,
        id,
        key.as_bytes(),
        envelope.clone(),
    );
    let queued = queued.unwrap_or_else(|| {
        Err(crate::core::agent_stream::unrouted(
            hub.registry().read().get(to.instance),
        ))
    });
    if let Err(code) = queued {
        fleet
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
        return Err((Some(id), code));
    }
    hub.stats().messages_forwarded.fetch_add(1, Relaxed);
    Ok(())
}
