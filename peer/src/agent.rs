//! [`Agent`]: the application's handle on one attached agent. It seals each
//! message once, in the caller's task, and hands the sealed frame to the
//! agent's driver (`task.rs`), which owns the stream and the core.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use agent_link_crypto::Identity;
use agent_link_proto::{codec, Address, EnvelopeBody, ErrorCode, PeerToRelay, VERSION};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::core::{Sealed, Take};
use crate::error::{CloseReason, SendError};
use crate::message::{Message, MessageId, Receipt};

/// What an agent's handle shares with its driver task.
pub(crate) struct AgentHandles {
    pub(crate) sends: mpsc::Sender<Sealed>,
    pub(crate) inbox: Option<mpsc::Receiver<Message>>,
    pub(crate) taken: mpsc::UnboundedSender<(MessageId, Take)>,
    pub(crate) max_size: Arc<AtomicUsize>,
    /// The timestamp window the relay announced (clamped); 0 before.
    pub(crate) window: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) stop: Arc<OnceLock<ErrorCode>>,
    pub(crate) task: tokio::task::JoinHandle<()>,
    /// Cancelled when the agent is closed or dropped.
    pub(crate) closed: tokio_util::sync::CancellationToken,
}

/// The keys a handle seals with.
pub(crate) struct SealKeys {
    pub(crate) identity: Identity,
    pub(crate) fleet: Arc<crate::fleet::FleetRing>,
}

/// The sending half of an [`Agent`] ([`Agent::sender`]): cheap to clone, so
/// several tasks can send while one receives. Once the [`Agent`] is closed or
/// dropped, sends end with [`SendError::Closed`].
#[derive(Clone)]
pub struct AgentSender {
    instance: Arc<str>,
    agent: Arc<str>,
    keys: Arc<SealKeys>,
    sends: mpsc::Sender<Sealed>,
    max_size: Arc<AtomicUsize>,
    stop: Arc<OnceLock<ErrorCode>>,
    default_timeout: Duration,
}

impl std::fmt::Debug for AgentSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSender")
            .field("instance", &self.instance)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// An attached agent: send messages, and (for a receiving attach) receive
/// them. A message counts as delivered to this agent — its sender gets the
/// receipt — only once [`Agent::recv`] returned it (or the handler of
/// [`Agent::on_message`] was called with it). Messages that arrived and were
/// not taken when the agent closes are refused at once with
/// `TargetOffline`, so their senders learn it now.
pub struct Agent {
    address: String,
    tx: AgentSender,
    inbox: Option<mpsc::Receiver<Message>>,
    taken: mpsc::UnboundedSender<(MessageId, Take)>,
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    window: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    /// Closing (or dropping) the agent ends it, whatever senders remain.
    _closer: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// How much longer than a send's deadline its caller waits for the driver's
/// answer: only a safety net should the driver be gone (it enforces the
/// deadline itself).
const SAFETY_NET: Duration = Duration::from_secs(1);

/// Messages an `on_message` task takes from the queue at once.
const HANDLER_BATCH: usize = 64;

/// How long [`Agent::close`] waits for the relay to confirm the detach and
/// read everything this agent still owed.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

impl Agent {
    pub(crate) fn new(
        instance: &str,
        agent: &str,
        keys: Arc<SealKeys>,
        h: AgentHandles,
        default_timeout: Duration,
    ) -> Self {
        Self {
            address: format!("{instance}/{agent}"),
            tx: AgentSender {
                instance: instance.into(),
                agent: agent.into(),
                keys,
                sends: h.sends,
                max_size: h.max_size,
                stop: h.stop,
                default_timeout,
            },
            inbox: h.inbox,
            taken: h.taken,
            window: h.window,
            task: h.task,
            _closer: h.closed.drop_guard(),
        }
    }

    /// This agent's address, `instance/agent`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A sending handle for other tasks (see [`AgentSender`]).
    pub fn sender(&self) -> AgentSender {
        self.tx.clone()
    }

    /// Send `payload` to `to` (`instance/agent`) with the configured
    /// deadline (`send_timeout_secs`); resolves to the receipt or the cause
    /// of failure.
    pub async fn send(&self, to: &str, payload: impl Into<Bytes>) -> Result<Receipt, SendError> {
        self.tx.send(to, payload).await
    }

    /// Send with an explicit deadline.
    pub async fn send_with_timeout(
        &self,
        to: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Receipt, SendError> {
        self.tx.send_with_timeout(to, payload, timeout).await
    }
}

impl AgentSender {
    /// Send `payload` to `to` (`instance/agent`) with the configured
    /// deadline (`send_timeout_secs`); resolves to the receipt or the cause
    /// of failure.
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
        let deadline = Instant::now() + timeout;
        let sealed = self.seal(to, &payload.into(), deadline)?;
        let (sealed, rx) = sealed;
        self.sends.send(sealed).await.map_err(|_| self.closed())?;
        match tokio::time::timeout_at(deadline + SAFETY_NET, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.closed()),
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// Validate and seal once: the driver and every retry use these bytes.
    fn seal(
        &self,
        to: &str,
        payload: &Bytes,
        deadline: Instant,
    ) -> Result<(Sealed, oneshot::Receiver<Result<Receipt, SendError>>), SendError> {
        let bad = || SendError::BadAddress { to: to.to_string() };
        let to_addr = Address::parse(to).map_err(|_| bad())?;
        let max = self.max_size.load(Ordering::Relaxed);
        if payload.len() > max {
            return Err(SendError::TooLarge {
                len: payload.len(),
                max,
            });
        }
        let id: agent_link_proto::MessageId = rand::random();
        let body = EnvelopeBody {
            version: VERSION,
            id,
            from: Address {
                instance: &self.instance,
                agent: &self.agent,
            },
            to: to_addr,
            sent_at_ms: agent_link_proto::clock::unix_ms(std::time::SystemTime::now()),
            payload,
        };
        // Sealing fails only for a payload bincode cannot frame (over the
        // hard frame limit), which is a message too large.
        let frame = self
            .keys
            .fleet
            .with_current(|fleet| body.seal(&self.keys.identity, fleet))
            .and_then(|env| codec::frame(&PeerToRelay::Send { envelope: &env }))
            .map_err(|_| SendError::TooLarge {
                len: payload.len(),
                max,
            })?;
        let (reply, rx) = oneshot::channel();
        Ok((
            Sealed {
                id,
                to: to.to_string(),
                len: payload.len(),
                frame: Bytes::from(frame),
                deadline,
                reply,
            },
            rx,
        ))
    }

    fn closed(&self) -> SendError {
        match self.stop.get() {
            Some(code) => SendError::Refused(*code),
            None => SendError::Closed(CloseReason::AgentClosed),
        }
    }
}

impl Agent {
    /// The next verified message; `None` when the agent stopped (or it is a
    /// send-only attach). [`Agent::stop_reason`] then says why. Returning a
    /// message is what sends its receipt.
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.inbox.as_mut()?.recv().await?;
        self.took(m.id);
        Some(m)
    }

    /// Tell the driver the application has message `id`: it answers with the
    /// receipt (if the driver is gone, so is the stream it would go on).
    fn took(&self, id: MessageId) {
        let _ = self.taken.send((id, Take::Now));
    }

    /// The daemon's way in: up to `limit` verified messages (waiting for at
    /// least one) *without* their receipts. Each must then be answered with
    /// [`Agent::confirm`] (once it is stored) or [`Agent::refuse`]; an
    /// unanswered one is refused (`TargetOffline`) when the agent closes.
    /// Returns 0 when the agent stopped.
    #[cfg(feature = "daemon")]
    pub(crate) async fn recv_unconfirmed(
        &mut self,
        into: &mut Vec<Message>,
        limit: usize,
    ) -> usize {
        match self.inbox.as_mut() {
            Some(inbox) => inbox.recv_many(into, limit).await,
            None => 0,
        }
    }

    /// The timestamp window (ms) deliveries are checked with, once
    /// attached: how long a stored id must be remembered.
    #[cfg(feature = "daemon")]
    pub(crate) fn window_ms(&self) -> u64 {
        self.window.load(Ordering::Relaxed)
    }

    /// Message `id` is durably stored as of `delivered_at_ms`: its receipt
    /// (and that of every copy of it) goes back with that time.
    #[cfg(feature = "daemon")]
    pub(crate) fn confirm(&self, id: MessageId, delivered_at_ms: u64) {
        let _ = self.taken.send((id, Take::At(delivered_at_ms)));
    }

    /// Message `id` was not stored: its sender gets `code`, and a retry of
    /// it is checked as new.
    #[cfg(feature = "daemon")]
    pub(crate) fn refuse(&self, id: MessageId, code: ErrorCode) {
        let _ = self.taken.send((id, Take::Refuse(code)));
    }

    /// Why the agent stopped for good, when the relay said so: `Replaced`
    /// (attached again elsewhere), `Revoked`, `NotRegistered`, … `None`
    /// while it runs or when the link was closed locally.
    pub fn stop_reason(&self) -> Option<ErrorCode> {
        self.tx.stop.get().copied()
    }

    /// Detach politely: refuse (`TargetOffline`) every message that arrived
    /// and was not taken, ask the relay to stop routing to this agent, send
    /// every receipt still owed, and wait (at most 3 s) until the relay has
    /// read all of it. Call this before [`crate::AgentLink::close`] when the
    /// process is about to exit. Dropping the handle does the same in the
    /// background.
    pub async fn close(self) {
        let Agent {
            tx,
            inbox,
            taken,
            task,
            _closer,
            ..
        } = self;
        drop((tx, inbox, taken, _closer));
        let abort = task.abort_handle();
        if tokio::time::timeout(CLOSE_WAIT, task).await.is_err() {
            abort.abort();
        }
    }

    /// Call `handler` for every message, on a task of its own. A message's
    /// receipt goes back once the handler has returned from it.
    pub fn on_message<F: FnMut(Message) + Send + 'static>(
        mut self,
        mut handler: F,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(HANDLER_BATCH);
            let mut ids = Vec::with_capacity(HANDLER_BATCH);
            while let Some(inbox) = self.inbox.as_mut() {
                // Every message already waiting, then their receipts together
                // (one wake-up of the driver and one write for all of them).
                if inbox.recv_many(&mut batch, HANDLER_BATCH).await == 0 {
                    break;
                }
                for m in batch.drain(..) {
                    ids.push(m.id);
                    handler(m);
                }
                for id in ids.drain(..) {
                    self.took(id);
                }
            }
        })
    }
}
