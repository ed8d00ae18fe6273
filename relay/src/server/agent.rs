//! Agent streams, the hot path: read a batch of frames, let
//! [`AgentStream`](crate::core::agent_stream::AgentStream) decide, carry out
//! its actions: queue each checked envelope's original bytes on the target
//! stream, route receipts and failures back to their senders, answer
//! refusals on this stream.
//!
//! Backpressure: a full target queue answers the sender `Busy` at once
//! (explicit, never a silent drop) instead of stalling this stream's other
//! messages behind one slow receiver. Receipts wait (bounded) for room in
//! the sender's queue, since the sender is waiting for them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_link_proto::{Address, DeliverHead, ErrorCode, MessageId, RelayToPeer};
use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::hub::{ConnInfo, Hub};
use super::writer::{error_frame, frame, write_loop, FrameArena, Outbound};
use crate::core::agent_stream::{self, Action, AgentStream, Now};
use crate::core::checks::SenderContext;
use crate::core::deliveries::{Ledger, LedgerLimits};
use crate::router::{AttachOutcome, StreamHandle, StreamLedger};
use agent_link_quic::frames::refuse_stream;
use agent_link_quic::frames::FrameReader;

/// Frames taken from a stream's buffer per pass (and per signature batch).
const READ_BATCH: usize = 64;

/// How long a receipt may wait for room in its sender's queue.
const RECEIPT_WAIT: Duration = Duration::from_secs(2);

/// Wall-clock milliseconds since the Unix epoch (0 before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Serve an agent stream whose first frame attached `agent` (a valid id).
pub(crate) async fn serve_agent(
    hub: Arc<Hub>,
    info: Arc<ConnInfo>,
    mut send: quinn::SendStream,
    reader: FrameReader,
    agent: String,
    receive: bool,
) {
    let cfg = hub.config();
    if info.agents.fetch_add(1, Relaxed) >= cfg.max_agents_per_connection as usize {
        info.agents.fetch_sub(1, Relaxed);
        hub.refused(ErrorCode::TooManyStreams);
        refuse_stream(&mut send, ErrorCode::TooManyStreams).await;
        return;
    }
    let router = hub.router();
    let token = router.new_token();
    let (tx, rx) = mpsc::channel(cfg.agent_queue_len as usize);
    let cancel = hub.shutdown().child_token();
    let ledger: StreamLedger = Arc::new(Mutex::new(Ledger::new(
        LedgerLimits::of(cfg),
        router.instance_queue(&info.instance),
    )));
    let handle = StreamHandle {
        token,
        tx: tx.clone(),
        ledger: ledger.clone(),
        opened: (info.conn_id, send.id().index()),
        cancel: cancel.clone(),
    };
    router.add_stream(handle.clone());
    let attached = frame(&RelayToPeer::Attached {
        agent: &agent,
        max_message_size: cfg.max_message_size,
        timestamp_window_ms: cfg.timestamp_window_secs * 1000,
    });
    // Queue the acknowledgement before becoming routable, so it is the
    // first frame the peer reads.
    let _ = tx.try_send(Outbound::Frame(attached));
    if receive {
        let outcome = router.attach_receiver(&info.instance, &agent, handle);
        if matches!(
            outcome,
            AttachOutcome::Attached | AttachOutcome::Replaced(_)
        ) {
            if let Some(fleet) = hub.cluster() {
                fleet.attached(&hub, &info.instance, &agent, token);
            }
        }
        match outcome {
            AttachOutcome::Replaced(old) => {
                debug!(
                    old = old.token,
                    "newest attach wins; closing the older stream"
                );
                if old
                    .tx
                    .try_send(Outbound::Close(error_frame(ErrorCode::Replaced)))
                    .is_err()
                {
                    old.cancel.cancel();
                }
            }
            AttachOutcome::Stale => {
                debug!("a newer attach on this connection holds the agent; closing this one");
                let _ = tx.try_send(Outbound::Close(error_frame(ErrorCode::Replaced)));
            }
            AttachOutcome::Attached | AttachOutcome::Offline => {}
        }
    } else {
        drop(handle);
    }
    // Unregistering happens in Drop, so it also runs when the task is
    // aborted (connection gone): no stale route or token is left behind.
    let _guard = StreamGuard {
        hub: &hub,
        info: &info,
        token,
        agent: receive.then_some(agent.as_str()),
        ledger: &ledger,
    };
    // The writer runs as its own task: in one task with the reader, every
    // wake-up of either (a frame from the peer, an item in the queue) polled
    // both, and each futile poll of the QUIC stream takes the connection's
    // lock. Aborted with this task (the guard), so it never outlives it.
    let mut writer = AbortOnDrop(tokio::spawn(write_loop(
        send,
        rx,
        cancel.clone(),
        ledger.clone(),
    )));
    let sender = SenderContext {
        instance: &info.instance,
        agent: &agent,
        key: &info.key,
    };
    let core = AgentStream::new(sender, cfg.verify_signatures, receive);
    let task = AgentTask {
        hub: &hub,
        info: &info,
        agent: &agent,
        sender_name: Arc::from(info.instance.as_str()),
        token,
        tx,
        ledger: &ledger,
    };
    let reading = task.read_loop(&core, reader, &cancel);
    tokio::select! {
        _ = reading => {
            router.remove_stream(token, receive.then_some((info.instance.as_str(), agent.as_str())));
            // Unroutable now: its unanswered deliveries are failed at once
            // (and those still queued are not written).
            fail_outstanding(&hub, &ledger);
            // Let queued receipts and errors drain, bounded.
            if tokio::time::timeout(Duration::from_secs(2), &mut writer.0).await.is_err() {
                cancel.cancel();
            }
        }
        _ = &mut writer.0 => cancel.cancel(),
    }
}

/// A task that is aborted when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct StreamGuard<'a> {
    hub: &'a Hub,
    info: &'a ConnInfo,
    token: u64,
    agent: Option<&'a str>,
    ledger: &'a StreamLedger,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        let receiving = self.agent.map(|a| (self.info.instance.as_str(), a));
        self.hub.router().remove_stream(self.token, receiving);
        if let (Some((instance, agent)), Some(fleet)) = (receiving, self.hub.cluster()) {
            fleet.detached(instance, agent, self.token);
        }
        fail_outstanding(self.hub, self.ledger);
        self.info.agents.fetch_sub(1, Relaxed);
    }
}

/// The stream ended (it is no longer routable): close its ledger and tell
/// the sender of every delivery it never answered `Failed{id,
/// TargetOffline}` (PROTOCOL.md §9.5), so none waits for its deadline. Runs
/// in `Drop` too, so it does not wait: a sender whose queue is full misses
/// it (counted as orphaned) and ends at its deadline. Idempotent.
fn fail_outstanding(hub: &Hub, ledger: &StreamLedger) {
    let owed = ledger.lock().unwrap_or_else(|e| e.into_inner()).close();
    if owed.is_empty() {
        return;
    }
    let stats = hub.stats();
    let mut arena = FrameArena::default();
    for (reply_to, id) in owed {
        stats.deliveries_failed_unanswered.fetch_add(1, Relaxed);
        let f = arena.frame(&RelayToPeer::Failed {
            id,
            code: ErrorCode::TargetOffline,
        });
        let sent = match hub.router().with_stream(reply_to, |s| {
            s.tx.try_send(Outbound::Frame(f.clone())).is_ok()
        }) {
            Some(sent) => sent,
            // A delivery another relay forwarded: the answer goes there.
            None => hub
                .cluster()
                .is_some_and(|fl| fl.answer_remote(reply_to, &f)),
        };
        if !sent {
            stats.receipts_orphaned.fetch_add(1, Relaxed);
        }
    }
}

/// What the reading half of one agent stream uses to carry out actions.
struct AgentTask<'a> {
    hub: &'a Arc<Hub>,
    info: &'a ConnInfo,
    agent: &'a str,
    /// The sending instance, as the targets' ledgers name it.
    sender_name: Arc<str>,
    token: u64,
    /// This stream's own writer queue.
    tx: mpsc::Sender<Outbound>,
    /// This stream's deliveries (which its replies must name).
    ledger: &'a StreamLedger,
}

impl AgentTask<'_> {
    /// Read and act until the stream or this task ends. Takes the task by
    /// value so this stream's own queue sender goes with it: the writer
    /// then ends as soon as the last queued reply is written.
    async fn read_loop(
        self,
        core: &AgentStream<'_>,
        mut reader: FrameReader,
        cancel: &CancellationToken,
    ) {
        // Grows to what a busy stream needs and keeps it; an idle stream
        // holds none (a full batch's capacity up front was 2 KiB of each
        // idle connection's memory).
        let mut frames: Vec<Bytes> = Vec::new();
        // Answers on this stream, written after the batch's forwards.
        let mut replies: Vec<Outbound> = Vec::new();
        // Receipts and refusals are encoded here, many per allocation.
        let mut arena = FrameArena::default();
        // The registry generation at which the sender was last seen
        // unrevoked.
        let mut standing: Option<u64> = None;
        // One waiter for the whole loop, polled only when no frame is ready
        // (`biased`): registering a new one per batch costs two lock round
        // trips on the token for every message.
        // A peer that never pauses would hide a cancellation from `biased`:
        // every `CANCEL_CHECK` batches the token is looked at as well.
        const CANCEL_CHECK: u32 = 64;
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let mut batches = 0u32;
        loop {
            batches = batches.wrapping_add(1);
            if batches.is_multiple_of(CANCEL_CHECK) && cancel.is_cancelled() {
                return;
            }
            let next = tokio::select! {
                biased;
                n = reader.next_batch(&mut frames, READ_BATCH) => n,
                _ = &mut cancelled => return,
            };
            match next {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    if let Some(code) = e.code() {
                        // Oversized or broken framing: the stream cannot be
                        // resynchronised. Say why, stop it; the connection
                        // and its other streams carry on.
                        self.hub.refused(code);
                        reader.stop(code);
                        let _ = self.tx.send(Outbound::Close(error_frame(code))).await;
                    }
                    return;
                }
            }
            // The sender's standing, once per batch: a revocation stops its
            // forwarding here even before its connection is closed. The
            // registry is looked at again only when an install changed it
            // (the generation is bumped after the new registry is in place,
            // so a batch that reads an older generation looks again next
            // time).
            let generation = self.hub.registry().generation();
            if standing != Some(generation) && self.sender_revoked() {
                self.hub.refused(ErrorCode::Revoked);
                let _ = self
                    .tx
                    .send(Outbound::Close(error_frame(ErrorCode::Revoked)))
                    .await;
                return;
            }
            standing = Some(generation);
            let now = Now {
                unix_ms: unix_ms(),
                instant: Instant::now(),
            };
            let mut close = None;
            let policy = self.hub.policy();
            for action in core.on_frames(now, &policy, &frames, &self.info.rate, self.ledger) {
                match action {
                    Action::Forward { id, to, envelope } => {
                        if let Err(code) = self.forward(id, to, envelope) {
                            self.refuse(&mut replies, &mut arena, id, code);
                        }
                    }
                    Action::Refuse { id, code } => self.refuse(&mut replies, &mut arena, id, code),
                    Action::RouteReceipt { token, receipt } => {
                        let f = arena.frame(&RelayToPeer::Receipt { receipt });
                        if route_reply(self.hub, token, f).await {
                            self.hub.stats().receipts_routed.fetch_add(1, Relaxed);
                        }
                    }
                    Action::RouteFailed { token, id, code } => {
                        let f = arena.frame(&RelayToPeer::Failed { id, code });
                        route_reply(self.hub, token, f).await;
                    }
                    Action::DropReply { id } => {
                        self.hub.stats().replies_dropped.fetch_add(1, Relaxed);
                        debug!(id = %hex::encode(id), "reply for no outstanding delivery dropped");
                    }
                    Action::Detach { unroute } => {
                        // Unroutable first, then `Detached` behind every
                        // delivery already queued: whatever the peer reads
                        // before it, it can still refuse by name
                        // (PROTOCOL.md §9.6).
                        if unroute {
                            self.hub.router().detach_receiver(
                                self.token,
                                &self.info.instance,
                                self.agent,
                            );
                            if let Some(fleet) = self.hub.cluster() {
                                fleet.detached(&self.info.instance, self.agent, self.token);
                            }
                        }
                        replies.push(Outbound::Frame(arena.frame(&RelayToPeer::Detached)));
                    }
                    Action::Close(code) => {
                        self.hub.refused(code);
                        close = Some(code);
                    }
                }
            }
            for out in replies.drain(..) {
                if self.tx.send(out).await.is_err() {
                    return;
                }
            }
            if let Some(code) = close {
                let _ = self.tx.send(Outbound::Close(error_frame(code))).await;
                return;
            }
        }
    }

    /// Whether this connection's instance is revoked in the live registry.
    fn sender_revoked(&self) -> bool {
        self.hub
            .registry()
            .read()
            .get(&self.info.instance)
            .is_some_and(|r| r.revoked)
    }

    /// Answer `Failed{id, code}` on this stream (after the batch), counted.
    fn refuse(
        &self,
        replies: &mut Vec<Outbound>,
        arena: &mut FrameArena,
        id: MessageId,
        code: ErrorCode,
    ) {
        self.hub.refused(code);
        debug!(?code, "message refused");
        replies.push(Outbound::Frame(
            arena.frame(&RelayToPeer::Failed { id, code }),
        ));
    }

    /// Queue one checked envelope on its target's stream, under the
    /// router's lock and without waiting; or, in a fleet, forward it to the
    /// relay holding its target.
    fn forward(&self, id: MessageId, to: Address<'_>, envelope: Bytes) -> Result<(), ErrorCode> {
        let size = envelope.len();
        let fleet = self.hub.cluster();
        let spare = fleet.map(|_| envelope.clone());
        let queued = queue_delivery(
            self.hub,
            to.instance,
            to.agent,
            &self.sender_name,
            self.token,
            id,
            self.info.key.as_bytes(),
            envelope,
        );
        match queued {
            Some(Ok(())) => {
                let stats = self.hub.stats();
                stats.messages_forwarded.fetch_add(1, Relaxed);
                stats.bytes_forwarded.fetch_add(size as u64, Relaxed);
                debug!(id = %hex::encode(id), size, "forwarded");
                Ok(())
            }
            Some(Err(code)) => Err(code),
            None => {
                if let (Some(fleet), Some(envelope)) = (fleet, spare) {
                    if let Some(relay) = fleet.remote_holder(to.instance, to.agent) {
                        let forwarded = fleet.forward(&relay, self.token, id, envelope);
                        if forwarded.is_ok() {
                            self.hub.stats().fleet_forwards.fetch_add(1, Relaxed);
                        }
                        return forwarded;
                    }
                }
                Err(agent_stream::unrouted(
                    self.hub.registry().read().get(to.instance),
                ))
            }
        }
    }
}

/// Queue an envelope (checked) on the receiving stream of
/// `instance/agent`, its answer owed to the stream (or pending answer to
/// another relay) `reply_token`; under the router's lock, without waiting.
/// `None`: nobody receives for that agent on this relay.
#[allow(clippy::too_many_arguments)]
pub(super) fn queue_delivery(
    hub: &Hub,
    instance: &str,
    agent: &str,
    sender_name: &Arc<str>,
    reply_token: u64,
    id: MessageId,
    key: &[u8; 32],
    envelope: Bytes,
) -> Option<Result<(), ErrorCode>> {
    let size = envelope.len();
    // Counted at the longest head (any token fits: the core checked).
    let Some(head) = DeliverHead::new(u64::MAX, key, size) else {
        return Some(Err(ErrorCode::TooLarge));
    };
    let len = head.as_bytes().len() + size;
    hub.router().with_route(instance, agent, |target| {
        // Memory and fairness bounds (`core::deliveries`): a receiver that
        // reads or answers slowly holds at most its queue's frames and
        // bytes, its outstanding bound and its instance's byte budget at
        // the relay, each sender at most a share of them; beyond that
        // senders get `Busy`, nothing is dropped.
        let mut ledger = target.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let token = ledger.admit(sender_name, reply_token, id, len)?;
        let Some(head) = DeliverHead::new(token, key, size) else {
            ledger.cancel(token);
            return Err(ErrorCode::TooLarge);
        };
        // Never blocks: the router's lock is not held across a wait.
        match target.tx.try_send(Outbound::Deliver {
            head,
            envelope,
            token,
        }) {
            Ok(()) => Ok(()),
            Err(e) => {
                ledger.cancel(token);
                Err(match e {
                    TrySendError::Full(_) => ErrorCode::Busy,
                    TrySendError::Closed(_) => ErrorCode::TargetOffline,
                })
            }
        }
    })
}

/// Send a frame to the stream with `reply_token`: at once when its queue
/// has room, else waiting (bounded) for room. In a fleet, a token no local
/// stream has may be a delivery another relay forwarded: the frame goes
/// back to that relay.
pub(super) async fn route_reply(hub: &Hub, reply_token: u64, f: Bytes) -> bool {
    let stats = hub.stats();
    let f_copy = f.clone();
    let full = hub.router().with_stream(reply_token, |target| {
        match target.tx.try_send(Outbound::Frame(f)) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(out)) => Ok(Some((target.tx.clone(), out))),
            Err(TrySendError::Closed(_)) => Err(()),
        }
    });
    let (tx, out) = match full {
        Some(Ok(None)) => return true,
        Some(Ok(Some(waiting))) => waiting,
        None if hub
            .cluster()
            .is_some_and(|fl| fl.answer_remote(reply_token, &f_copy)) =>
        {
            return true
        }
        // The sender's stream is gone; its retry after reconnecting gets
        // the receiver's duplicate receipt instead.
        Some(Err(())) | None => {
            stats.receipts_orphaned.fetch_add(1, Relaxed);
            return false;
        }
    };
    // Full: wait for room, with the router's lock released.
    match tx.send_timeout(out, RECEIPT_WAIT).await {
        Ok(()) => true,
        Err(_) => {
            stats.receipts_orphaned.fetch_add(1, Relaxed);
            false
        }
    }
}
