//! The driver of one agent: a task that owns the agent's stream and its
//! [`AgentCore`], feeds the core what happens (the relay's frames, the
//! application's sends and takes, the connection coming and going, time) and
//! writes the frames the core queues. No decision is made here.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_link_proto::ErrorCode;
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::core::{AgentCore, Now, Sealed, SessionEnd};
use crate::error::{CloseReason, LinkError, SendError};
use crate::message::{Message, MessageId};
use crate::supervisor::ConnState;
use agent_link_quic::frames::FrameReader;

/// How long the driver waits for the relay's answer to an attach on a live
/// connection before it tries a new stream.
const ATTACH_ANSWER_LIMIT: Duration = Duration::from_secs(120);
/// How long a stopping agent waits for `Detached`, then for the relay to
/// end its side (PROTOCOL.md §9.6).
const DETACH_WAIT: Duration = Duration::from_secs(2);
/// Sends and frames taken per pass.
const BATCH: usize = 64;

/// Frames up to this size are copied into one buffer before a write; larger
/// ones go to QUIC as they are (no copy).
const COPY_MAX: usize = 4096;

/// Merge runs of small frames into single chunks: QUIC's per-chunk cost is
/// paid once per write instead of once per receipt or message.
fn coalesce(out: &mut Vec<Bytes>, buf: &mut BytesMut) {
    if out.len() < 2 {
        return;
    }
    let mut merged = Vec::with_capacity(out.len());
    for f in out.drain(..) {
        if f.len() > COPY_MAX {
            if !buf.is_empty() {
                merged.push(buf.split().freeze());
            }
            merged.push(f);
        } else {
            buf.extend_from_slice(&f);
        }
    }
    if !buf.is_empty() {
        merged.push(buf.split().freeze());
    }
    *out = merged;
}

/// The timer for the core's next deadline or retry. It is moved only when
/// something falls due earlier than it is set for; otherwise it fires as
/// set (at worst for a message already answered: one wake-up, after which
/// it is set again to what is due then). An agent wakes for time only when
/// something may be due, and idle agents not at all; the periodic tick it
/// replaces woke every waiting agent ten times a second (with 1,000 links
/// in one process, 8 % of that process's CPU per message).
struct Alarm {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl Alarm {
    fn new() -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: false,
        }
    }

    /// Make sure the alarm goes off no later than `next`.
    fn arm(&mut self, next: Option<Instant>) {
        let Some(t) = next else { return };
        if !self.armed || t < self.sleep.deadline() {
            self.sleep.as_mut().reset(t);
            self.armed = true;
        }
    }

    /// Fires once the set moment has come (pending while not armed).
    async fn fired(&mut self) {
        if !self.armed {
            return std::future::pending().await;
        }
        self.sleep.as_mut().await;
        self.armed = false;
    }
}

pub(crate) fn now() -> Now {
    Now {
        at: Instant::now(),
        unix_ms: agent_link_proto::clock::unix_ms(std::time::SystemTime::now()),
    }
}

/// The driver's end of the channels to its [`crate::Agent`].
pub(crate) struct AgentTask {
    pub(crate) core: AgentCore,
    pub(crate) agent: String,
    pub(crate) conn: watch::Receiver<ConnState>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) sends: mpsc::Receiver<Sealed>,
    pub(crate) taken: mpsc::UnboundedReceiver<(MessageId, crate::core::Take)>,
    pub(crate) inbox: Option<mpsc::Sender<Message>>,
    pub(crate) ready: Option<oneshot::Sender<Result<(), LinkError>>>,
    pub(crate) stop: Arc<OnceLock<ErrorCode>>,
    /// Cancelled when the agent's handle is closed or dropped.
    pub(crate) closed: CancellationToken,
    /// The timestamp window in force, for the handle (published on attach).
    pub(crate) window: Arc<std::sync::atomic::AtomicU64>,
    /// The link's fleet secret: a rotation is picked up between batches.
    pub(crate) fleet: Arc<crate::fleet::FleetRing>,
    /// Keeps the link (its supervisor) alive while this agent lives.
    pub(crate) _link: Arc<dyn std::any::Any + Send + Sync>,
}

impl AgentTask {
    /// After a rotation, check deliveries under the new keys.
    fn refresh_fleet(&mut self) {
        let g = self.fleet.generation();
        if g != self.core.fleet_generation() {
            self.core.set_fleet(g, self.fleet.keys());
        }
    }

    pub(crate) async fn run(mut self) {
        let mut conn_rx = self.conn.clone();
        let mut alarm = Alarm::new();
        loop {
            let state = conn_rx.borrow_and_update().clone();
            let conn = match state {
                // The handle is gone; nothing is owed on a stream that no
                // longer exists, and attaching again would only displace a
                // newer attach of this agent.
                ConnState::Up(_) if self.closed.is_cancelled() => return self.end(),
                ConnState::Up(c) => c,
                ConnState::Failed(code) => return self.stop_for_good(Some(code)),
                ConnState::Closed(reason) => return self.close_all(reason),
                ConnState::Connecting => {
                    // Disconnected: keep taking sends into the outbox and
                    // expiring deadlines until the connection is back.
                    alarm.arm(self.core.next_wake());
                    tokio::select! {
                        r = conn_rx.changed() => if r.is_err() {
                            return self.close_all(CloseReason::LinkClosed);
                        },
                        s = self.sends.recv() => match s {
                            Some(s) => self.core.send(s),
                            None => return self.end(),
                        },
                        Some((id, how)) = self.taken.recv() => self.core.resolve(now(), id, how),
                        _ = alarm.fired() => self.core.poll(now()),
                        _ = self.closed.cancelled() => return self.end(),
                    }
                    continue;
                }
            };
            let end = self.session(&conn, &mut alarm).await;
            self.core.lost();
            match end {
                SessionEnd::Stop => return self.end(),
                SessionEnd::Fatal(code) => return self.stop_for_good(Some(code)),
                SessionEnd::Lost => {
                    // Wait for the supervisor to notice, or retry the stream
                    // shortly if the connection itself is fine.
                    tokio::select! {
                        _ = conn_rx.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        }
    }

    /// The handle is gone (or the link closed): nothing waits any more.
    fn end(&mut self) {
        self.core
            .fail_all(|| SendError::Closed(CloseReason::AgentClosed));
    }

    fn close_all(&mut self, reason: CloseReason) {
        self.core.fail_all(|| SendError::Closed(reason));
        if let Some(r) = self.ready.take() {
            let _ = r.send(Err(LinkError::Closed(reason)));
        }
    }

    /// End every waiting send and a pending `attach` with the cause.
    fn stop_for_good(&mut self, code: Option<ErrorCode>) {
        let Some(code) = code else {
            return self.close_all(CloseReason::LinkClosed);
        };
        info!(agent = %self.agent, "agent stopped: {code}");
        let _ = self.stop.set(code);
        self.core.fail_all(|| SendError::Refused(code));
        if let Some(r) = self.ready.take() {
            let _ = r.send(Err(LinkError::Refused(code)));
        }
    }

    async fn session(&mut self, conn: &quinn::Connection, alarm: &mut Alarm) -> SessionEnd {
        let Ok((mut send, recv)) = conn.open_bi().await else {
            return SessionEnd::Lost;
        };
        let mut out: Vec<Bytes> = Vec::new();
        self.core.start_attach();
        self.core.take_out(&mut out);
        if send.write_all_chunks(&mut out).await.is_err() {
            return SessionEnd::Lost;
        }
        out.clear();
        // The relay's frames are at most a delivery of the largest message it
        // takes; the hard limit bounds what we buffer before `Attached` says.
        let mut reader = FrameReader::new(recv, agent_link_proto::codec::HARD_MAX_FRAME);
        // Wait for the answer as long as the connection lives (bounded by
        // ATTACH_ANSWER_LIMIT). Giving up sooner and attaching again on a
        // new stream of the same connection races with this attach: a busy
        // relay may process the two in either order, and the older one
        // would then replace the newer, ending this agent with `Replaced`.
        let first = tokio::select! {
            r = tokio::time::timeout(ATTACH_ANSWER_LIMIT, reader.next()) => match r {
                Ok(Ok(Some(b))) => b,
                _ => return SessionEnd::Lost,
            },
            _ = conn.closed() => return SessionEnd::Lost,
        };
        if let Err(end) = self.core.on_attach_answer(now(), &first) {
            return end;
        }
        self.window
            .store(self.core.window_ms(), std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.ready.take() {
            let _ = r.send(Ok(()));
        }
        let mut sends = Vec::with_capacity(BATCH);
        let mut frames = Vec::with_capacity(BATCH);
        let mut joined = BytesMut::new();
        let mut deliver = Vec::new();
        loop {
            self.core.take_out(&mut out);
            if !out.is_empty() {
                coalesce(&mut out, &mut joined);
                if send.write_all_chunks(&mut out).await.is_err() {
                    return SessionEnd::Lost;
                }
                out.clear();
            }
            alarm.arm(self.core.next_wake());
            // Fair order: the application's sends, its takes, the relay's
            // frames and time all get their turn.
            tokio::select! {
                n = self.sends.recv_many(&mut sends, BATCH) => {
                    if n == 0 {
                        return self.detach(&mut send, &mut reader).await;
                    }
                    for s in sends.drain(..) {
                        self.core.send(s);
                    }
                }
                Some((id, how)) = self.taken.recv() => {
                    let now = now();
                    self.core.resolve(now, id, how);
                    while let Ok((id, how)) = self.taken.try_recv() {
                        self.core.resolve(now, id, how);
                    }
                }
                r = reader.next_batch(&mut frames, BATCH) => {
                    match r {
                        Ok(true) => {}
                        Ok(false) => return SessionEnd::Lost,
                        Err(e) => {
                            debug!(agent = %self.agent, "stream from the relay: {e}");
                            return SessionEnd::Lost;
                        }
                    }
                    self.refresh_fleet();
                    let end = self.core.on_frames(now(), &frames, &mut deliver);
                    if let Some(settle) = self.core.settle() {
                        // First contact: the pins file (lock, merge, fsync)
                        // on a blocking thread, never on this task.
                        let settled = tokio::task::spawn_blocking(move || settle.run())
                            .await
                            .unwrap_or_else(|e| Err(format!("settling pins: {e}")));
                        self.core.on_settled(now(), settled, &mut deliver);
                    }
                    for m in deliver.drain(..) {
                        // Backpressure: wait while the application is behind.
                        let gone = match &self.inbox {
                            Some(inbox) => inbox.send(m).await.is_err(),
                            None => true,
                        };
                        if gone {
                            return self.detach(&mut send, &mut reader).await;
                        }
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
                _ = alarm.fired() => self.core.poll(now()),
                _ = self.closed.cancelled() => return self.detach(&mut send, &mut reader).await,
                _ = self.shutdown.cancelled() => return SessionEnd::Stop,
            }
        }
    }

    /// The application stopped: take its last takes, refuse what it never
    /// took, detach (PROTOCOL.md §9.6), end our side, and wait until the
    /// relay has read it all (it ends its side then), so that closing the
    /// connection right after loses nothing.
    async fn detach(
        &mut self,
        send: &mut quinn::SendStream,
        reader: &mut FrameReader,
    ) -> SessionEnd {
        let at = now();
        while let Ok((id, how)) = self.taken.try_recv() {
            self.core.resolve(at, id, how);
        }
        let wait = self.core.detach();
        let mut out = Vec::new();
        let mut frames = Vec::new();
        let mut deliver = Vec::new();
        let _ = tokio::time::timeout(DETACH_WAIT, async {
            loop {
                self.core.take_out(&mut out);
                if send.write_all_chunks(&mut out).await.is_err() {
                    return;
                }
                out.clear();
                if !wait || self.core.is_detached() {
                    return;
                }
                match reader.next_batch(&mut frames, BATCH).await {
                    Ok(true) => {
                        // Detaching: every delivery is refused by the core,
                        // none is handed over.
                        let _ = self.core.on_frames(now(), &frames, &mut deliver);
                        deliver.clear();
                    }
                    _ => return,
                }
            }
        })
        .await;
        let _ = send.finish();
        let _ = tokio::time::timeout(DETACH_WAIT, async {
            while let Ok(true) = reader.next_batch(&mut frames, BATCH).await {}
        })
        .await;
        SessionEnd::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frames_are_merged_in_order_and_large_ones_kept() {
        let big = Bytes::from(vec![9u8; COPY_MAX + 1]);
        let mut out = vec![
            Bytes::from_static(b"ab"),
            Bytes::from_static(b"c"),
            big.clone(),
            Bytes::from_static(b"d"),
        ];
        let mut buf = BytesMut::new();
        coalesce(&mut out, &mut buf);
        assert_eq!(out.len(), 3);
        assert_eq!(&out[0][..], b"abc");
        assert_eq!(out[1], big);
        assert_eq!(&out[2][..], b"d");
    }
}
