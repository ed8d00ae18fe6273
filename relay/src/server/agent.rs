//! Agent streams, the hot path: read a frame, check it, look up the route,
//! queue the envelope's original bytes on the target stream. Replies to the
//! sender (receipts, failures) go through the sender's own writer queue.
//!
//! Backpressure: a full target queue answers the sender `Busy` at once
//! (explicit, never a silent drop) instead of stalling this stream's other
//! messages behind one slow receiver. Receipts wait (bounded) for room in
//! the sender's queue, since the sender is waiting for them.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_link_proto::{
    codec, DeliverHead, ErrorCode, OpenedEnvelope, PeerToRelay, Receipt, RelayToPeer,
};
use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, Instrument};

use crate::checks::{check_send, SenderContext};
use crate::connection::ConnCtx;
use crate::framed::{error_frame, frame, refuse_stream, write_loop, FrameArena, FrameReader};
use crate::router::{AttachOutcome, Out, StreamHandle};
use crate::server::Shared;

/// Frames taken from a stream's buffer per pass (and per signature batch).
const READ_BATCH: usize = 64;

/// How long a receipt may wait for room in its sender's queue.
const RECEIPT_WAIT: Duration = Duration::from_secs(2);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A new stream: its first frame says what it is.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv, shared.config.max_frame());
    reader.set_frame_timeout(shared.config.frame_timeout());
    let auth = Duration::from_secs(shared.config.auth_timeout_secs);
    let first = match tokio::time::timeout(auth, reader.next()).await {
        Ok(Ok(Some(b))) => b,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if let Some(code) = e.code() {
                shared.stats.refused(code);
                refuse_stream(&mut send, code).await;
            }
            return;
        }
        Err(_) => {
            shared.stats.refused(ErrorCode::AuthTimeout);
            refuse_stream(&mut send, ErrorCode::AuthTimeout).await;
            return;
        }
    };
    let kind = match codec::decode::<PeerToRelay>(&first) {
        Ok(PeerToRelay::Attach { agent, receive }) => Ok(Some((agent.to_string(), receive))),
        Ok(PeerToRelay::StatusRequest | PeerToRelay::Register { .. }) => Ok(None),
        Ok(_) => Err(ErrorCode::NotAttached),
        Err(_) => Err(ErrorCode::Malformed),
    };
    match kind {
        Ok(Some((agent, receive))) => {
            let span = debug_span!("agent", instance = %ctx.instance, %agent, receive);
            agent_stream(shared, ctx, send, reader, agent, receive)
                .instrument(span)
                .await
        }
        Ok(None) => crate::control::run(shared, ctx, send, reader, Some(first)).await,
        Err(code) => {
            shared.stats.refused(code);
            refuse_stream(&mut send, code).await;
        }
    }
}

async fn agent_stream(
    shared: Arc<Shared>,
    ctx: Arc<ConnCtx>,
    mut send: quinn::SendStream,
    reader: FrameReader,
    agent: String,
    receive: bool,
) {
    if agent_link_proto::check_id(&agent).is_err() {
        shared.stats.refused(ErrorCode::BadAddress);
        refuse_stream(&mut send, ErrorCode::BadAddress).await;
        return;
    }
    if ctx.agents.fetch_add(1, Relaxed) >= shared.config.max_agents_per_connection as usize {
        ctx.agents.fetch_sub(1, Relaxed);
        shared.stats.refused(ErrorCode::TooManyStreams);
        refuse_stream(&mut send, ErrorCode::TooManyStreams).await;
        return;
    }
    let token = shared.router.next_id();
    let (tx, rx) = mpsc::channel(shared.config.agent_queue_len as usize);
    let cancel = shared.shutdown.child_token();
    let queued_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handle = StreamHandle {
        token,
        tx: tx.clone(),
        queued_bytes: queued_bytes.clone(),
        opened: (ctx.conn_id, send.id().index()),
        cancel: cancel.clone(),
    };
    shared.router.add_stream(handle.clone());
    let attached = frame(&RelayToPeer::Attached {
        agent: &agent,
        max_message_size: shared.config.max_message_size,
        timestamp_window_ms: shared.config.timestamp_window_secs * 1000,
    });
    // Queue the acknowledgement before becoming routable, so it is the
    // first frame the peer reads.
    let _ = tx.try_send(Out::Frame(attached));
    if receive {
        match shared.router.attach_receiver(&ctx.instance, &agent, handle) {
            AttachOutcome::Replaced(old) => {
                debug!(
                    old = old.token,
                    "newest attach wins; closing the older stream"
                );
                if old
                    .tx
                    .try_send(Out::Close(error_frame(ErrorCode::Replaced)))
                    .is_err()
                {
                    old.cancel.cancel();
                }
            }
            AttachOutcome::Stale => {
                debug!("a newer attach on this connection holds the agent; closing this one");
                let _ = tx.try_send(Out::Close(error_frame(ErrorCode::Replaced)));
            }
            AttachOutcome::Attached | AttachOutcome::Offline => {}
        }
    } else {
        drop(handle);
    }
    // Unregistering happens in Drop, so it also runs when the task is
    // aborted (connection gone): no stale route or token is left behind.
    let _guard = StreamGuard {
        shared: &shared,
        ctx: &ctx,
        token,
        agent: receive.then_some(agent.as_str()),
    };
    let writer = write_loop(send, rx, cancel.clone(), queued_bytes);
    tokio::pin!(writer);
    let reading = read_loop(&shared, &ctx, &agent, receive, token, tx, reader, &cancel);
    tokio::select! {
        _ = reading => {
            shared.router.remove_stream(token, receive.then_some((ctx.instance.as_str(), agent.as_str())));
            // Let queued receipts and errors drain, bounded.
            if tokio::time::timeout(Duration::from_secs(2), &mut writer).await.is_err() {
                cancel.cancel();
            }
        }
        _ = &mut writer => cancel.cancel(),
    }
}

struct StreamGuard<'a> {
    shared: &'a Shared,
    ctx: &'a ConnCtx,
    token: u64,
    agent: Option<&'a str>,
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        let receiving = self.agent.map(|a| (self.ctx.instance.as_str(), a));
        self.shared.router.remove_stream(self.token, receiving);
        self.ctx.agents.fetch_sub(1, Relaxed);
    }
}

// Eight handles because `Shared` is not yet split into the ones each task
// uses (the relay-core restructuring replaces this loop).
#[allow(clippy::too_many_arguments)]
async fn read_loop(
    shared: &Shared,
    ctx: &ConnCtx,
    agent: &str,
    receive: bool,
    token: u64,
    tx: mpsc::Sender<Out>,
    mut reader: FrameReader,
    cancel: &CancellationToken,
) {
    let sender = SenderContext {
        instance: &ctx.instance,
        agent,
        key: &ctx.key,
    };
    let mut frames: Vec<Bytes> = Vec::with_capacity(READ_BATCH);
    let mut replies: Vec<Out> = Vec::new();
    // Receipts and refusals are encoded here, many per allocation.
    let mut arena = FrameArena::default();
    loop {
        let next = tokio::select! {
            n = reader.next_batch(&mut frames, READ_BATCH) => n,
            _ = cancel.cancelled() => return,
        };
        match next {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                if let Some(code) = e.code() {
                    // Oversized or broken framing: the stream cannot be
                    // resynchronised. Say why, stop it; the connection and
                    // its other streams carry on.
                    shared.stats.refused(code);
                    reader.stop(code);
                    let _ = tx.send(Out::Close(error_frame(code))).await;
                }
                return;
            }
        }
        let now = now_ms();
        // Checked envelopes with the frame each came in (its bytes are
        // forwarded as a slice of that frame, never copied or re-encoded).
        let mut passed = Vec::with_capacity(frames.len());
        let mut close = None;
        for body in &frames {
            match codec::decode::<PeerToRelay>(body) {
                Ok(PeerToRelay::Send { envelope }) => {
                    // Every check (size at the reader; decode, sender
                    // binding, fleet HMAC, timestamp here) runs on every
                    // message, batched or not.
                    match check_send(envelope, &sender, &shared.policy, now) {
                        Ok(env) => passed.push((env, body)),
                        Err(refusal) => {
                            shared.stats.refused(refusal.code);
                            debug!(code = ?refusal.code, "message refused");
                            match refusal.id {
                                Some(id) => {
                                    replies.push(Out::Frame(arena.frame(&RelayToPeer::Failed {
                                        id,
                                        code: refusal.code,
                                    })))
                                }
                                // Undecodable: nothing to attribute it to.
                                None => {
                                    close = Some(refusal.code);
                                    break;
                                }
                            }
                        }
                    }
                }
                Ok(PeerToRelay::Ack {
                    reply_token,
                    receipt,
                }) => {
                    if let Some(refusal) =
                        on_ack(shared, ctx, agent, reply_token, receipt, &mut arena).await
                    {
                        replies.push(refusal);
                    }
                }
                Ok(PeerToRelay::Nack {
                    reply_token,
                    id,
                    code,
                }) => {
                    route_reply(
                        shared,
                        reply_token,
                        arena.frame(&RelayToPeer::Failed { id, code }),
                    )
                    .await;
                }
                Ok(PeerToRelay::Detach) => {
                    // Unroutable first, then `Detached` behind every delivery
                    // already queued: whatever the peer reads before it, it
                    // can still refuse by name (PROTOCOL.md §9.6).
                    if receive {
                        shared.router.detach_receiver(token, &ctx.instance, agent);
                    }
                    replies.push(Out::Frame(arena.frame(&RelayToPeer::Detached)));
                }
                Ok(_) | Err(_) => {
                    shared.stats.refused(ErrorCode::Malformed);
                    close = Some(ErrorCode::Malformed);
                    break;
                }
            }
        }
        let verdicts = if shared.config.verify_signatures && !passed.is_empty() {
            let envs: Vec<_> = passed.iter().map(|(e, _)| *e).collect();
            Some(crate::checks::verify_batch(&envs, &ctx.key))
        } else {
            None
        };
        let clock = Instant::now();
        for (i, (env, body)) in passed.iter().enumerate() {
            let verdict = verdicts.as_ref().map_or(Ok(()), |v| v[i]);
            let outcome = match verdict {
                Ok(()) => forward(shared, ctx, token, env, body, clock),
                Err(code) => Err(code),
            };
            if let Err(code) = outcome {
                shared.stats.refused(code);
                replies.push(Out::Frame(arena.frame(&RelayToPeer::Failed {
                    id: env.body.id,
                    code,
                })));
            }
        }
        for out in replies.drain(..) {
            if tx.send(out).await.is_err() {
                return;
            }
        }
        if let Some(code) = close {
            let _ = tx.send(Out::Close(error_frame(code))).await;
            return;
        }
    }
}

/// Rate-limit, route and queue one checked envelope on its target's stream.
/// `body` is the `Send` frame the envelope was read from.
fn forward(
    shared: &Shared,
    ctx: &ConnCtx,
    token: u64,
    env: &OpenedEnvelope<'_>,
    body: &Bytes,
    now: Instant,
) -> Result<(), ErrorCode> {
    {
        let mut bucket = ctx.rate.lock().unwrap_or_else(|e| e.into_inner());
        if !bucket.try_take(now) {
            return Err(ErrorCode::RateLimited);
        }
    }
    // The envelope's bytes go out exactly as they came in (never
    // re-encoded): a slice of the received frame behind a Deliver head.
    let envelope = body.slice_ref(env.bytes);
    let head =
        DeliverHead::new(token, ctx.key.as_bytes(), envelope.len()).ok_or(ErrorCode::TooLarge)?;
    let len = head.as_bytes().len() + envelope.len();
    let to = env.body.to;
    let budget = shared.config.agent_queue_bytes as usize;
    let queued = shared.router.with_route(to.instance, to.agent, |target| {
        // Memory bound: a receiver that reads slowly holds at most
        // `agent_queue_bytes` of deliveries (and `agent_queue_len` frames)
        // at the relay; beyond that its senders get `Busy`, nothing is
        // dropped.
        if target.queued_bytes.fetch_add(len, Relaxed) + len > budget {
            target.queued_bytes.fetch_sub(len, Relaxed);
            return Err(ErrorCode::Busy);
        }
        // Never blocks: the router's lock is not held across a wait.
        match target.tx.try_send(Out::Deliver { head, envelope }) {
            Ok(()) => Ok(()),
            Err(e) => {
                target.queued_bytes.fetch_sub(len, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => ErrorCode::Busy,
                    TrySendError::Closed(_) => ErrorCode::TargetOffline,
                })
            }
        }
    });
    match queued {
        Some(Ok(())) => {
            shared.stats.messages_forwarded.fetch_add(1, Relaxed);
            shared
                .stats
                .bytes_forwarded
                .fetch_add(env.bytes.len() as u64, Relaxed);
            debug!(id = %hex::encode(env.body.id), size = env.bytes.len(), "forwarded");
            Ok(())
        }
        Some(Err(code)) => Err(code),
        None => Err(match shared.registry().get(to.instance) {
            None => ErrorCode::UnknownTarget,
            Some(r) if r.revoked => ErrorCode::TargetRevoked,
            Some(_) => ErrorCode::TargetOffline,
        }),
    }
}

async fn on_ack(
    shared: &Shared,
    ctx: &ConnCtx,
    agent: &str,
    reply_token: u64,
    receipt: Receipt<'_>,
    arena: &mut FrameArena,
) -> Option<Out> {
    // A receipt may only speak for the agent that received the message: it
    // is not forwarded, and the acking stream is told why (the original
    // sender's send then ends in its deadline: outcome unknown).
    if receipt.from.instance != ctx.instance || receipt.from.agent != agent {
        shared.stats.refused(ErrorCode::SenderMismatch);
        return Some(Out::Frame(arena.frame(&RelayToPeer::Failed {
            id: receipt.id,
            code: ErrorCode::SenderMismatch,
        })));
    }
    let f = arena.frame(&RelayToPeer::Receipt { receipt });
    if route_reply(shared, reply_token, f).await {
        shared.stats.receipts_routed.fetch_add(1, Relaxed);
    }
    None
}

/// Send a frame to the stream with `reply_token`: at once when its queue
/// has room, else waiting (bounded) for room.
async fn route_reply(shared: &Shared, reply_token: u64, f: Bytes) -> bool {
    let full = shared.router.with_stream(reply_token, |target| {
        match target.tx.try_send(Out::Frame(f)) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(out)) => Ok(Some((target.tx.clone(), out))),
            Err(TrySendError::Closed(_)) => Err(()),
        }
    });
    let (tx, out) = match full {
        Some(Ok(None)) => return true,
        Some(Ok(Some(waiting))) => waiting,
        // The sender's stream is gone; its retry after reconnecting gets the
        // receiver's duplicate receipt instead.
        Some(Err(())) | None => {
            shared.stats.receipts_orphaned.fetch_add(1, Relaxed);
            return false;
        }
    };
    // Full: wait for room, with the router's lock released.
    match tx.send_timeout(out, RECEIPT_WAIT).await {
        Ok(()) => true,
        Err(_) => {
            shared.stats.receipts_orphaned.fetch_add(1, Relaxed);
            false
        }
    }
}
