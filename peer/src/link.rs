//! The connection to the relay and the agents on it.
//!
//! One supervisor task keeps the QUIC connection up (reconnecting with
//! exponential backoff and jitter) and publishes it on a `watch` channel.
//! Each attached agent has its own task that owns its stream: it attaches,
//! signs and sends messages, verifies deliveries and answers them with
//! receipts. Messages waiting for an outcome stay in the agent's bounded
//! outbox across reconnects and are re-sent with the same bytes (same id,
//! same signature) until their deadline; receivers drop duplicates by id and
//! answer them with the first receipt, so a retry is safe.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_link_crypto::{FleetKey, FleetSecret, Identity, PublicKey};
use agent_link_proto::{
    codec, Address, EnvelopeBody, ErrorCode, InstanceStatus, MessageId, OpenedEnvelope,
    PeerToRelay, Receipt as WireReceipt, RelayToPeer, ReplayWindow, VERSION,
};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use crate::config::{PeerConfig, KEY_FILE, PINS_FILE, SECRET_FILE};
use crate::outbox::{Outbox, RECONNECT_GRACE};
use crate::pins::Pins;
use crate::receive::{
    check_delivery_with, verify_deliveries, Delivered, KeyCache, Signed, Verdict,
};
use crate::wire::{self, FrameReader};
use crate::{LinkError, SendError};

/// Messages one agent may have waiting for an outcome.
pub const OUTBOX_LIMIT: usize = 4096;
/// Messages buffered for the application before the agent stops reading.
const INBOX_LEN: usize = 1024;
/// Ids remembered per sender for de-duplication (see `ReplayWindow`).
const REPLAY_CAP: usize = 200_000;
/// How long `connect` and `attach` wait.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent task waits for the relay's answer to an attach on a
/// live connection before it tries a new stream.
const ATTACH_ANSWER_LIMIT: Duration = Duration::from_secs(120);

/// A message delivered to an agent (already verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Message id.
    pub id: MessageId,
    /// Sender, `instance/agent`.
    pub from: String,
    /// Recipient, `instance/agent`.
    pub to: String,
    /// Sender's clock, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// The payload.
    pub payload: Bytes,
}

/// Proof of delivery: the receiver verified the message and handed it to its
/// application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Message id.
    pub id: MessageId,
    /// The receiving agent, `instance/agent`.
    pub from: String,
    /// Receiver's clock, ms since the Unix epoch.
    pub delivered_at_ms: u64,
}

/// What `status` reports.
#[derive(Debug, Clone)]
pub struct StatusReport {
    /// Relay address.
    pub relay: String,
    /// Round-trip time of the status request.
    pub rtt: Duration,
    /// QUIC's smoothed RTT estimate.
    pub quic_rtt: Duration,
    /// This instance as the relay sees it (attached agents of all its connections).
    pub you: InstanceStatus,
    /// Every registered instance.
    pub instances: Vec<InstanceStatus>,
}

#[derive(Clone, Debug)]
enum ConnState {
    Connecting,
    Up(quinn::Connection),
    Failed(ErrorCode),
    Closed,
}

struct Shared {
    config: PeerConfig,
    identity: Identity,
    fleet: FleetKey,
    pins: Mutex<Pins>,
    conn: watch::Receiver<ConnState>,
    shutdown: CancellationToken,
}

/// A connected instance. Cheap to clone; the connection is kept up by a
/// background task until the last clone is closed or dropped.
#[derive(Clone)]
pub struct AgentLink {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    _supervisor: Arc<AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("instance", &self.shared.config.instance_id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl AgentLink {
    /// Load the peer directory and connect. Waits for the first connection
    /// (up to 10 s); afterwards reconnects by itself.
    pub async fn connect(dir: impl AsRef<Path>) -> Result<Self, LinkError> {
        let dir = dir.as_ref();
        let config = PeerConfig::load(dir)?;
        let identity = Identity::read(&dir.join(KEY_FILE))?;
        let fleet = FleetSecret::read(&dir.join(SECRET_FILE))?.key();
        let pins = Pins::load(dir.join(PINS_FILE)).map_err(LinkError::Config)?;
        let fingerprint = config
            .fingerprint()
            .map_err(|_| LinkError::Config("relay_fingerprint: not 64 hex digits".into()))?;
        let addr = wire::resolve(&config.relay_url).await?;
        let endpoint = wire::endpoint(&identity, fingerprint, addr.is_ipv6())?;
        let label = config.relay_url.clone();
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut backoff = Backoff::new();
        let conn = loop {
            match wire::connect(&endpoint, addr, &label).await {
                Ok(c) => break c,
                Err(e @ LinkError::Refused(_)) => return Err(e),
                Err(e) if Instant::now() + backoff.peek() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(backoff.next_delay()).await,
            }
        };
        info!(relay = %label, "connected");
        let (tx, rx) = watch::channel(ConnState::Up(conn.clone()));
        let shutdown = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(
            endpoint.clone(),
            addr,
            label,
            config.auto_reconnect,
            conn,
            tx,
            shutdown.clone(),
        ));
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                identity,
                fleet,
                pins: Mutex::new(pins),
                conn: rx,
                shutdown,
            }),
            endpoint,
            _supervisor: Arc::new(AbortOnDropHandle::new(supervisor)),
        })
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.shared.config.instance_id
    }

    /// This instance's public key.
    pub fn public_key(&self) -> PublicKey {
        self.shared.identity.public_key()
    }

    /// Attach `agent` to receive its messages (and send). The newest receiving
    /// attach of an agent id wins, relay-wide.
    pub async fn attach(&self, agent: &str) -> Result<Agent, LinkError> {
        self.attach_as(agent, true).await
    }

    /// Attach `agent` to send only: it does not displace a receiving attach
    /// of the same agent elsewhere.
    pub async fn sender(&self, agent: &str) -> Result<Agent, LinkError> {
        self.attach_as(agent, false).await
    }

    async fn attach_as(&self, agent: &str, receive: bool) -> Result<Agent, LinkError> {
        agent_link_proto::check_id(agent).map_err(|e| LinkError::BadInput(e.to_string()))?;
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (msg_tx, msg_rx) = mpsc::channel(INBOX_LEN);
        let (ready_tx, ready_rx) = oneshot::channel();
        let max_size = Arc::new(AtomicUsize::new(usize::MAX));
        let stop = Arc::new(Mutex::new(None));
        let task = AgentTask {
            shared: self.shared.clone(),
            agent: agent.to_string(),
            receive,
            cmds: cmd_rx,
            inbox: msg_tx,
            ready: Some(ready_tx),
            max_size: max_size.clone(),
            outbox: Outbox::new(OUTBOX_LIMIT),
            window_ms: 60_000,
            replay: None,
            keys: KeyCache::default(),
            attached_before: false,
            grace_until: None,
            stop: stop.clone(),
        };
        let handle = tokio::spawn(task.run());
        let failed = match tokio::time::timeout(SETUP_TIMEOUT, ready_rx).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e),
            Ok(Err(_)) => Some(LinkError::Closed),
            Err(_) => Some(LinkError::Timeout(format!("attaching agent {agent}"))),
        };
        if let Some(e) = failed {
            // The task must not live on: its attach, answered late or
            // retried after a reconnect, would displace the caller's next
            // attach of the same agent (newest wins) and end it `Replaced`.
            handle.abort();
            return Err(e);
        }
        Ok(Agent {
            address: format!("{}/{agent}", self.shared.config.instance_id),
            cmds: cmd_tx,
            inbox: receive.then_some(msg_rx),
            max_size,
            default_timeout: Duration::from_secs(self.shared.config.send_timeout_secs),
            stop,
            task: handle,
        })
    }

    /// Ask the relay who is online.
    pub async fn status(&self) -> Result<StatusReport, LinkError> {
        let conn = match &*self.shared.conn.borrow() {
            ConnState::Up(c) => c.clone(),
            ConnState::Failed(code) => return Err(LinkError::Refused(*code)),
            _ => {
                return Err(LinkError::Unreachable {
                    addr: self.shared.config.relay_url.clone(),
                    reason: "not connected".into(),
                })
            }
        };
        let t0 = Instant::now();
        let fut = async {
            let fail = || wire::stream_failure(&conn, "status request");
            let (mut send, recv) = conn.open_bi().await.map_err(|_| fail())?;
            send.write_all(&wire::frame(&PeerToRelay::StatusRequest))
                .await
                .map_err(|_| fail())?;
            let mut reader = FrameReader::new(recv);
            let body = reader.next().await.map_err(|_| fail())?.ok_or_else(fail)?;
            let _ = send.finish();
            match codec::decode::<RelayToPeer>(&body)
                .map_err(|e| LinkError::Other(format!("undecodable status reply: {e}")))?
            {
                RelayToPeer::Status { you, instances } => Ok((you, instances)),
                RelayToPeer::Error { code } => Err(LinkError::Refused(code)),
                _ => Err(LinkError::Other(
                    "unexpected reply to a status request".into(),
                )),
            }
        };
        let (you, instances) = tokio::time::timeout(SETUP_TIMEOUT, fut)
            .await
            .map_err(|_| LinkError::Timeout("status request".into()))??;
        Ok(StatusReport {
            relay: self.shared.config.relay_url.clone(),
            rtt: t0.elapsed(),
            quic_rtt: conn.rtt(),
            you,
            instances,
        })
    }

    /// Close the connection politely and stop reconnecting.
    pub async fn close(self) {
        self.shared.shutdown.cancel();
        if let ConnState::Up(c) = &*self.shared.conn.borrow() {
            c.close(0u32.into(), b"bye");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Exponential backoff, 100 ms doubling to 5 s, with ±50 % jitter so a fleet
/// that lost its relay does not come back in lockstep.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
    fn peek(&self) -> Duration {
        self.next
    }
    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        let jitter: f64 = rand::random::<f64>() + 0.5;
        base.mul_f64(jitter)
    }
}

async fn supervise(
    endpoint: quinn::Endpoint,
    addr: std::net::SocketAddr,
    label: String,
    auto_reconnect: bool,
    mut conn: quinn::Connection,
    state: watch::Sender<ConnState>,
    shutdown: CancellationToken,
) {
    loop {
        let reason = tokio::select! {
            r = conn.closed() => r,
            _ = shutdown.cancelled() => {
                state.send_replace(ConnState::Closed);
                return;
            }
        };
        match wire::connection_error(&reason) {
            Some(code @ (ErrorCode::Revoked | ErrorCode::NotRegistered)) => {
                warn!("relay refused this instance: {code}");
                state.send_replace(ConnState::Failed(code));
                return;
            }
            _ => info!("connection to the relay lost: {reason}"),
        }
        if !auto_reconnect {
            state.send_replace(ConnState::Closed);
            return;
        }
        state.send_replace(ConnState::Connecting);
        let mut backoff = Backoff::new();
        conn = loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.cancelled() => {
                    state.send_replace(ConnState::Closed);
                    return;
                }
            }
            match wire::connect(&endpoint, addr, &label).await {
                Ok(c) => break c,
                Err(LinkError::Refused(code)) => {
                    state.send_replace(ConnState::Failed(code));
                    return;
                }
                Err(e) => debug!("reconnect failed: {e}"),
            }
        };
        info!("reconnected to the relay");
        state.send_replace(ConnState::Up(conn.clone()));
    }
}

/// An attached agent: send messages, and (for a receiving attach) receive them.
pub struct Agent {
    address: String,
    cmds: mpsc::Sender<Cmd>,
    inbox: Option<mpsc::Receiver<Message>>,
    max_size: Arc<AtomicUsize>,
    default_timeout: Duration,
    stop: Arc<Mutex<Option<ErrorCode>>>,
    /// Ends by itself once the handle is gone (after flushing receipts it
    /// still owes), or at once when the link shuts down.
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

enum Cmd {
    Send {
        to: String,
        payload: Bytes,
        deadline: Instant,
        reply: oneshot::Sender<Result<Receipt, SendError>>,
    },
}

impl Agent {
    /// This agent's address, `instance/agent`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Send `payload` to `to` (`instance/agent`) with the configured
    /// deadline; resolves to the receipt or the cause of failure.
    pub async fn send(&self, to: &str, payload: impl Into<Bytes>) -> Result<Receipt, SendError> {
        self.send_with_timeout(to, payload, self.default_timeout)
            .await
    }

    /// Send with an explicit deadline.
    pub async fn send_with_timeout(
        &self,
        to: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Receipt, SendError> {
        Address::parse(to).map_err(|e| SendError::BadAddress(e.to_string()))?;
        let payload = payload.into();
        let max = self.max_size.load(Ordering::Relaxed);
        if payload.len() > max {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + timeout;
        // A message that is in the outbox gets its outcome from the agent
        // task (which also enforces the deadline); the extra second below is
        // only a safety net should that task be gone.
        self.cmds
            .send(Cmd::Send {
                to: to.to_string(),
                payload,
                deadline,
                reply,
            })
            .await
            .map_err(|_| SendError::Closed("agent stopped".into()))?;
        // The agent task enforces the deadline; this is a safety net.
        match tokio::time::timeout_at(deadline + Duration::from_secs(1), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(SendError::Closed("agent stopped".into())),
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// The next verified message; `None` when the agent stopped (or it is a
    /// send-only attach). [`Agent::stop_reason`] then says why.
    pub async fn recv(&mut self) -> Option<Message> {
        self.inbox.as_mut()?.recv().await
    }

    /// Why the agent stopped for good, when the relay said so: `Replaced`
    /// (attached again elsewhere), `Revoked`, `NotRegistered`, … `None`
    /// while it runs or when the link was closed locally.
    pub fn stop_reason(&self) -> Option<ErrorCode> {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Detach politely: stop taking messages, send the receipts still owed
    /// for messages already handed to the application, end the stream, and
    /// wait (at most 3 s) until the relay has read all of it. Call this
    /// before [`AgentLink::close`] when the process is about to exit.
    pub async fn close(self) {
        let Agent {
            cmds, inbox, task, ..
        } = self;
        drop(cmds);
        drop(inbox);
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    /// Call `handler` for every message, on a task of its own.
    pub fn on_message<F: FnMut(Message) + Send + 'static>(
        mut self,
        mut handler: F,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(m) = self.recv().await {
                handler(m);
            }
        })
    }
}

struct AgentTask {
    shared: Arc<Shared>,
    agent: String,
    receive: bool,
    cmds: mpsc::Receiver<Cmd>,
    inbox: mpsc::Sender<Message>,
    ready: Option<oneshot::Sender<Result<(), LinkError>>>,
    max_size: Arc<AtomicUsize>,
    outbox: Outbox,
    window_ms: u64,
    replay: Option<ReplayWindow>,
    /// Sender keys decoded once (see `KeyCache`).
    keys: KeyCache,
    /// Whether this agent has been attached before (a later attach is a
    /// re-attach, which opens the `TargetOffline` grace).
    attached_before: bool,
    /// End of the post-reconnect grace (see `outbox`).
    grace_until: Option<Instant>,
    /// Why the agent stopped for good, for [`Agent::stop_reason`].
    stop: Arc<Mutex<Option<ErrorCode>>>,
}

enum SessionEnd {
    /// The handle was dropped or the link closed: stop.
    Stop,
    /// The stream or connection broke: wait for a connection and re-attach.
    Lost,
    /// A refusal that retrying will not fix.
    Fatal(ErrorCode),
}

impl AgentTask {
    async fn run(mut self) {
        let mut conn_rx = self.shared.conn.clone();
        // Deadlines and retries of waiting messages; only polled while some
        // are waiting, so an idle agent costs no wake-ups (10,000 idle links
        // in one process woke 100,000 times a second before).
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let state = conn_rx.borrow_and_update().clone();
            let conn = match state {
                // The handle is gone and so is the stream that owed
                // receipts: attaching again would only displace a newer
                // attach of this agent.
                ConnState::Up(_) if self.cmds.is_closed() => return,
                ConnState::Up(c) => c,
                ConnState::Failed(code) => return self.stop_for_good(Some(code)),
                ConnState::Closed => return self.stop_for_good(None),
                ConnState::Connecting => {
                    // Disconnected: keep taking sends into the outbox and
                    // expiring deadlines until the connection is back.
                    tokio::select! {
                        r = conn_rx.changed() => if r.is_err() { return self.stop_for_good(None) },
                        c = self.cmds.recv() => match c {
                            Some(c) => { self.enqueue(c); }
                            None => return,
                        },
                        _ = tick.tick(), if self.outbox.len() > 0 => { self.outbox.expire(Instant::now()); }
                    }
                    continue;
                }
            };
            match self.session(&conn, &mut tick).await {
                SessionEnd::Stop => return,
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

    /// End every waiting send and a pending `attach` with the cause.
    fn stop_for_good(&mut self, code: Option<ErrorCode>) {
        if let Some(code) = code {
            warn!(agent = %self.agent, "agent stopped: {code}");
            *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = Some(code);
        }
        self.outbox.fail_all(|| match code {
            Some(c) => SendError::Refused(c),
            None => SendError::Closed("link closed".into()),
        });
        if let Some(r) = self.ready.take() {
            let _ = r.send(Err(code.map_or(LinkError::Closed, LinkError::Refused)));
        }
    }

    fn me(&self) -> String {
        format!("{}/{}", self.shared.config.instance_id, self.agent)
    }

    /// Seal a message and put it in the outbox; returns the frame to write
    /// (or `None` when the caller already has its error).
    fn enqueue(&mut self, cmd: Cmd) -> Option<Vec<u8>> {
        let Cmd::Send {
            to,
            payload,
            deadline,
            reply,
        } = cmd;
        if self.outbox.is_full() {
            let _ = reply.send(Err(SendError::OutboxFull(self.outbox.len())));
            return None;
        }
        let max = self.max_size.load(Ordering::Relaxed);
        if payload.len() > max {
            // The limit can shrink on a re-attach to a reconfigured relay.
            let _ = reply.send(Err(SendError::TooLarge {
                len: payload.len(),
                max,
            }));
            return None;
        }
        let Ok(to_addr) = Address::parse(&to) else {
            let _ = reply.send(Err(SendError::BadAddress(to)));
            return None;
        };
        let id: MessageId = rand::random();
        let body = EnvelopeBody {
            version: VERSION,
            id,
            from: Address {
                instance: &self.shared.config.instance_id,
                agent: &self.agent,
            },
            to: to_addr,
            sent_at_ms: now_ms(),
            payload: &payload,
        };
        let frame = match body
            .seal(&self.shared.identity, &self.shared.fleet)
            .and_then(|env| codec::frame(&PeerToRelay::Send { envelope: &env }))
        {
            Ok(f) => f,
            Err(e) => {
                debug!(len = payload.len(), "encoding failed: {e}");
                let _ = reply.send(Err(SendError::TooLarge {
                    len: payload.len(),
                    max,
                }));
                return None;
            }
        };
        debug!(agent = %self.agent, id = %hex::encode(id), len = payload.len(), "send");
        self.outbox
            .insert(id, to, frame.clone(), deadline, reply)
            .then_some(frame)
    }

    async fn session(
        &mut self,
        conn: &quinn::Connection,
        tick: &mut tokio::time::Interval,
    ) -> SessionEnd {
        let Ok((mut send, recv)) = conn.open_bi().await else {
            return SessionEnd::Lost;
        };
        let attach = wire::frame(&PeerToRelay::Attach {
            agent: &self.agent,
            receive: self.receive,
        });
        if send.write_all(&attach).await.is_err() {
            return SessionEnd::Lost;
        }
        let mut reader = FrameReader::new(recv);
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
        match codec::decode::<RelayToPeer>(&first) {
            Ok(RelayToPeer::Attached {
                max_message_size,
                timestamp_window_ms,
                ..
            }) => {
                self.max_size
                    .store(max_message_size as usize, Ordering::Relaxed);
                self.window_ms = timestamp_window_ms;
                if self.replay.is_none() {
                    // Ids are kept for twice the window (see ReplayWindow).
                    self.replay = Some(ReplayWindow::new(timestamp_window_ms, REPLAY_CAP));
                }
                if let Some(r) = self.ready.take() {
                    let _ = r.send(Ok(()));
                }
            }
            Ok(RelayToPeer::Error { code }) => return classify(code),
            _ => return SessionEnd::Lost,
        }
        if self.attached_before {
            self.grace_until = Some(Instant::now() + RECONNECT_GRACE);
        }
        self.attached_before = true;
        debug!(agent = %self.agent, waiting = self.outbox.len(), "attached");
        // Re-send everything still waiting, oldest first, byte for byte.
        let mut out: Vec<u8> = Vec::new();
        self.outbox.resend_all(&mut out);
        let mut cmds = Vec::with_capacity(64);
        let mut frames = Vec::with_capacity(64);
        loop {
            if !out.is_empty() {
                if send.write_all(&out).await.is_err() {
                    return SessionEnd::Lost;
                }
                out.clear();
            }
            tokio::select! {
                n = self.cmds.recv_many(&mut cmds, 64) => {
                    if n == 0 {
                        // The handle is gone. Everything owed is in `out`
                        // and was written above; end our side and wait until
                        // the relay has read it all (it ends its side then).
                        let _ = send.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Ok(true) = reader.next_batch(&mut frames).await {}
                        })
                        .await;
                        return SessionEnd::Stop;
                    }
                    for c in cmds.drain(..) {
                        if let Some(f) = self.enqueue(c) {
                            out.extend_from_slice(&f);
                        }
                    }
                }
                r = reader.next_batch(&mut frames) => {
                    match r {
                        Ok(true) => {}
                        _ => return SessionEnd::Lost,
                    }
                    let batch = std::mem::take(&mut frames);
                    // Deliveries that arrived together: their signatures in
                    // one Ed25519 batch; every other check per message.
                    let signed = if self.receive {
                        batch_signatures(&batch, &mut self.keys)
                    } else {
                        Vec::new()
                    };
                    for (i, body) in batch.iter().enumerate() {
                        let s = signed.get(i).copied().unwrap_or(Signed::Unchecked);
                        if let Some(end) = self.on_frame(body, s, &mut out).await {
                            return end;
                        }
                    }
                    frames = batch;
                }
                _ = tick.tick(), if self.outbox.len() > 0 => {
                    let now = Instant::now();
                    self.outbox.expire(now);
                    self.outbox.take_due(now, &mut out);
                }
                _ = self.shared.shutdown.cancelled() => return SessionEnd::Stop,
            }
        }
    }

    async fn on_frame(
        &mut self,
        body: &Bytes,
        signed: Signed,
        out: &mut Vec<u8>,
    ) -> Option<SessionEnd> {
        let frame = match codec::decode::<RelayToPeer>(body) {
            Ok(f) => f,
            Err(e) => {
                warn!("undecodable frame from the relay: {e}");
                return Some(SessionEnd::Lost);
            }
        };
        match frame {
            RelayToPeer::Receipt { receipt } => {
                self.outbox.receipt(Receipt {
                    id: receipt.id,
                    from: receipt.from.to_string(),
                    delivered_at_ms: receipt.delivered_at_ms,
                });
            }
            RelayToPeer::Failed { id, code } => {
                let outcome = self
                    .outbox
                    .failed(&id, code, Instant::now(), self.grace_until);
                debug!(agent = %self.agent, id = %hex::encode(id), ?code, ?outcome, "failed");
            }
            RelayToPeer::Deliver {
                reply_token,
                sender_key,
                envelope,
            } => {
                let envelope = body.slice_ref(envelope);
                if !self.receive {
                    // The relay should never deliver to a send-only stream;
                    // if it does, refuse out loud rather than leave the
                    // sender waiting for its deadline.
                    let id = OpenedEnvelope::open(&envelope).map_or([0; 16], |e| e.body.id);
                    out.extend_from_slice(&wire::frame(&PeerToRelay::Nack {
                        reply_token,
                        id,
                        code: ErrorCode::NotAttached,
                    }));
                    return None;
                }
                let me_text = self.me();
                let me = Address {
                    instance: &self.shared.config.instance_id,
                    agent: &self.agent,
                };
                let now = now_ms();
                let verdict = {
                    let mut pins = self.shared.pins.lock().unwrap_or_else(|e| e.into_inner());
                    let replay = self
                        .replay
                        .get_or_insert_with(|| ReplayWindow::new(self.window_ms, REPLAY_CAP));
                    check_delivery_with(
                        &me,
                        sender_key,
                        &envelope,
                        &self.shared.fleet,
                        &mut pins,
                        replay,
                        &mut self.keys,
                        self.window_ms,
                        now,
                        signed,
                    )
                };
                let reply = match verdict {
                    Verdict::Deliver(m) => {
                        let id = m.id;
                        // Backpressure: wait while the application is behind.
                        if self.inbox.send(m).await.is_err() {
                            return Some(SessionEnd::Stop);
                        }
                        ack(reply_token, id, &me, now)
                    }
                    Verdict::Duplicate {
                        id,
                        delivered_at_ms,
                    } => ack(reply_token, id, &me, delivered_at_ms),
                    Verdict::Refuse { id, code } => {
                        debug!(agent = %me_text, id = %hex::encode(id), ?code, "delivery refused");
                        wire::frame(&PeerToRelay::Nack {
                            reply_token,
                            id,
                            code,
                        })
                    }
                };
                out.extend_from_slice(&reply);
            }
            RelayToPeer::Error { code } => return Some(classify(code)),
            _ => {}
        }
        None
    }
}

/// One Ed25519 batch over the `Deliver` frames among `frames`; one flag per
/// frame (`Unchecked` for the others and when the batch failed).
fn batch_signatures(frames: &[Bytes], keys: &mut KeyCache) -> Vec<Signed> {
    let mut at = Vec::with_capacity(frames.len());
    let mut items = Vec::with_capacity(frames.len());
    for (i, body) in frames.iter().enumerate() {
        if let Ok(RelayToPeer::Deliver {
            sender_key,
            envelope,
            ..
        }) = codec::decode::<RelayToPeer>(body)
        {
            at.push(i);
            items.push(Delivered {
                sender_key,
                envelope,
            });
        }
    }
    let mut out = vec![Signed::Unchecked; frames.len()];
    if items.len() >= 2 {
        for (i, s) in at.into_iter().zip(verify_deliveries(&items, keys)) {
            out[i] = s;
        }
    }
    out
}

fn ack(reply_token: u64, id: MessageId, me: &Address<'_>, delivered_at_ms: u64) -> Vec<u8> {
    wire::frame(&PeerToRelay::Ack {
        reply_token,
        receipt: WireReceipt {
            id,
            from: *me,
            delivered_at_ms,
        },
    })
}

/// Which refusals on an agent stream end the agent for good; the others
/// (e.g. the relay shutting down) are worth a re-attach.
fn classify(code: ErrorCode) -> SessionEnd {
    match code {
        ErrorCode::Replaced
        | ErrorCode::NotRegistered
        | ErrorCode::Revoked
        | ErrorCode::BadAddress
        | ErrorCode::TooManyStreams
        | ErrorCode::TooManyConnections => SessionEnd::Fatal(code),
        _ => SessionEnd::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_with_jitter() {
        let mut b = Backoff::new();
        let mut bases = Vec::new();
        for _ in 0..12 {
            let base = b.peek();
            let d = b.next_delay();
            assert!(d >= base / 2 && d <= base.mul_f64(1.5), "{d:?} vs {base:?}");
            bases.push(base);
        }
        assert_eq!(bases[0], Duration::from_millis(100));
        assert_eq!(bases[1], Duration::from_millis(200));
        assert_eq!(*bases.last().unwrap(), Duration::from_secs(5));
        assert!(bases.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn only_lasting_refusals_stop_an_agent() {
        for code in [
            ErrorCode::Replaced,
            ErrorCode::Revoked,
            ErrorCode::NotRegistered,
        ] {
            assert!(matches!(classify(code), SessionEnd::Fatal(c) if c == code));
        }
        for code in [
            ErrorCode::ShuttingDown,
            ErrorCode::Malformed,
            ErrorCode::Internal,
        ] {
            assert!(matches!(classify(code), SessionEnd::Lost));
        }
    }
}
