//! What the daemon holds and does: the link (one connection), a receiving
//! loop per registered agent that stores before it confirms, sends on
//! behalf of local clients, finding an agent by bare name, and read
//! receipts. The HTTP layer (`api`) only translates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_link_proto::{ErrorCode, Exit, InstanceStatus};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::agents::{check_agent, check_notify_url, AgentEntry, AgentError, AgentsFile};
use super::read::{ReadNote, Reads, READ_AGENT};
use super::store::{self, Inbox, Incoming, Stored};
use super::INBOX_DIR;
use crate::config::PeerConfig;
use crate::{Agent, AgentLink, AgentSender, LinkError, Message, Receipt, SendError};

/// Deliveries stored per group commit at most.
const STORE_BATCH: usize = 64;
/// Send-only attaches kept for `--from` names that are not registered.
const SENDER_CACHE: usize = 32;
/// How long a fleet status answers "where is agent X" before it is asked again.
const STATUS_FRESH: Duration = Duration::from_secs(1);
/// How often inboxes are swept (TTL, old seen ids).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Seen ids are kept for twice the timestamp window (as the in-memory
/// replay window does, for clock skew); before the relay has said, the
/// widest window a receiver accepts.
pub(crate) const KEEP_BEFORE_ATTACH_MS: u64 = 2 * 3_600_000;

/// Why the daemon could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds this directory.
    #[error("a daemon is already running for {dir}; stop it first (or use it: every command goes through it)")]
    AlreadyRunning {
        /// The peer directory.
        dir: String,
    },
    /// A file or the socket.
    #[error("{path}: {source}")]
    Io {
        /// What.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The peer directory, its config or the relay.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// `agents.json`.
    #[error(transparent)]
    Agents(#[from] AgentError),
}

impl DaemonError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The CLI exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Link(e) => e.exit(),
            Self::Agents(AgentError::File { .. }) => Exit::Usage,
            _ => Exit::Other,
        }
    }
}

/// A refusal for a local client: the CLI's error name, a line, the HTTP
/// status and the exit code the CLI ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) code: String,
    pub(crate) message: String,
    pub(crate) http: u16,
    pub(crate) exit: Exit,
}

impl Failure {
    pub(crate) fn new(code: &str, http: u16, exit: Exit, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            http,
            exit,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new("BadRequest", 400, Exit::Usage, message)
    }

    pub(crate) fn unknown_agent(agent: &str) -> Self {
        Self::new(
            "UnknownAgent",
            404,
            Exit::Usage,
            format!("agent {agent} is not registered at this instance; add it with `agent-link agent add {agent}`"),
        )
    }

    /// A wire refusal, named as the CLI names it.
    pub(crate) fn refused(code: ErrorCode, to: &str) -> Self {
        let http = match code {
            ErrorCode::TargetOffline | ErrorCode::UnknownTarget | ErrorCode::TargetRevoked => 404,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited | ErrorCode::Busy | ErrorCode::InboxFull => 429,
            ErrorCode::BadAddress => 400,
            _ => 403,
        };
        Self::new(
            &format!("{code:?}"),
            http,
            Exit::from(code),
            agent_link_proto::text::with_target(code.describe(), to),
        )
    }

    pub(crate) fn send(e: &SendError, to: &str) -> Self {
        match e {
            SendError::Refused(code) => Self::refused(*code, to),
            SendError::Timeout => Self::new(
                "Timeout",
                504,
                Exit::Timeout,
                format!("no receipt from {to} before the deadline; the message may or may not have been delivered (raise the timeout, or check with the receiver before resending)"),
            ),
            SendError::TooLarge { .. } => Self::new("TooLarge", 413, Exit::Usage, e.to_string()),
            SendError::BadAddress { .. } => Self::new("BadAddress", 400, Exit::Usage, e.to_string()),
            SendError::OutboxFull { .. } => Self::new("OutboxFull", 429, Exit::Other, e.to_string()),
            SendError::Closed(_) => Self::new("Closed", 503, Exit::Other, e.to_string()),
        }
    }

    pub(crate) fn link(e: &LinkError) -> Self {
        let exit = e.exit();
        let code = match e {
            LinkError::Refused(c) => format!("{c:?}"),
            LinkError::Timeout(_) => "Timeout".into(),
            LinkError::BadInput { .. } => "BadRequest".into(),
            _ => "Unavailable".into(),
        };
        let http = match exit {
            Exit::Usage => 400,
            Exit::Timeout => 504,
            Exit::Refused => 403,
            _ => 503,
        };
        Self::new(&code, http, exit, e.to_string())
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new("Internal", 500, Exit::Other, message)
    }
}

/// One registered agent.
struct Slot {
    entry: AgentEntry,
    inbox: Arc<Mutex<Inbox>>,
    /// Bumped whenever a message lands (long polls and event streams wait
    /// on it).
    landed: watch::Sender<u64>,
    sender: AgentSender,
    /// Why the agent stopped receiving, if it did (`Replaced`, …).
    stopped: Arc<Mutex<Option<String>>>,
    /// The agent's timestamp window (ms; 0 until attached), published by
    /// its loop: seen ids are kept for twice it.
    window: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// What a client sees of a registered agent.
#[derive(Debug, Clone)]
pub(crate) struct AgentInfo {
    pub(crate) agent: String,
    pub(crate) notify_url: Option<String>,
    pub(crate) inbox: usize,
    pub(crate) bytes: u64,
    pub(crate) expired: u64,
    pub(crate) receiving: bool,
    pub(crate) stopped: Option<String>,
}

/// The daemon; cheap to clone.
#[derive(Clone)]
pub(crate) struct Daemon {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    cfg: PeerConfig,
    link: AgentLink,
    limits: store::Limits,
    agents: tokio::sync::Mutex<HashMap<String, Slot>>,
    senders: tokio::sync::Mutex<Vec<(String, Agent, Instant)>>,
    reads: Arc<Reads>,
    read_sender: AgentSender,
    read_task: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
    fleet: tokio::sync::Mutex<Option<(Instant, Vec<InstanceStatus>)>>,
    notifier: super::notify::Notifier,
    stop: CancellationToken,
}

impl Daemon {
    /// Connect (one connection for everything), attach the daemon's own
    /// read-receipt agent and every registered agent, open their inboxes.
    pub(crate) async fn start(dir: &Path) -> Result<Self, DaemonError> {
        let cfg = PeerConfig::load(dir)?;
        let file = AgentsFile::load(dir)?;
        let limits = store::Limits {
            max_messages: cfg.inbox_max_messages,
            max_bytes: cfg.inbox_max_bytes,
            ttl_ms: cfg.inbox_ttl_secs.saturating_mul(1000),
        };
        let link = AgentLink::connect(dir).await?;
        let reader = link.attach(READ_AGENT).await?;
        let read_sender = reader.sender();
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            cfg,
            link,
            limits,
            agents: tokio::sync::Mutex::new(HashMap::new()),
            senders: tokio::sync::Mutex::new(Vec::new()),
            reads: Arc::new(Reads::default()),
            read_sender,
            read_task: Mutex::new(None),
            fleet: tokio::sync::Mutex::new(None),
            notifier: super::notify::Notifier::new(),
            stop: CancellationToken::new(),
        });
        let daemon = Self { inner };
        let stop = CancellationToken::new();
        let task = tokio::spawn(daemon.clone().read_loop(reader, stop.clone()));
        *daemon
            .inner
            .read_task
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((stop, task));
        for entry in file.agents {
            daemon.attach(entry).await?;
        }
        tokio::spawn(daemon.clone().sweeper());
        Ok(daemon)
    }

    pub(crate) fn instance_id(&self) -> &str {
        &self.inner.cfg.instance_id
    }

    pub(crate) fn config(&self) -> &PeerConfig {
        &self.inner.cfg
    }

    pub(crate) fn link(&self) -> &AgentLink {
        &self.inner.link
    }

    fn inbox_dir(&self, agent: &str) -> PathBuf {
        self.inner.dir.join(INBOX_DIR).join(agent)
    }

    /// Open `entry`'s inbox and attach it for receiving.
    async fn attach(&self, entry: AgentEntry) -> Result<(), DaemonError> {
        let agent = entry.agent.clone();
        let dir = self.inbox_dir(&agent);
        let limits = self.inner.limits;
        let now = now_ms();
        let (inbox, opened) = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || Inbox::open(&dir, limits, now, KEEP_BEFORE_ATTACH_MS)
        })
        .await
        .map_err(|e| DaemonError::io(&dir, std::io::Error::other(e)))?
        .map_err(|e| DaemonError::io(&dir, e))?;
        for f in &opened.unreadable {
            tracing::warn!("inbox file {f} does not decode; left in place");
        }
        let handle = self.inner.link.attach(&agent).await?;
        let (landed, _) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let stopped = Arc::new(Mutex::new(None));
        let window = Arc::new(std::sync::atomic::AtomicU64::new(handle.window_ms()));
        let inbox = Arc::new(Mutex::new(inbox));
        let sender = handle.sender();
        let task = tokio::spawn(self.clone().receive_loop(
            handle,
            inbox.clone(),
            landed.clone(),
            stopped.clone(),
            window.clone(),
            stop.clone(),
            entry.notify_url.clone(),
        ));
        tracing::info!(agent = %agent, waiting = opened.waiting, "agent attached");
        let slot = Slot {
            entry,
            inbox,
            landed,
            sender,
            stopped,
            window,
            stop,
            task,
        };
        if let Some(old) = self.inner.agents.lock().await.insert(agent, slot) {
            old.stop.cancel();
            let _ = old.task.await;
        }
        Ok(())
    }

    /// `agent add`: register (or update) an agent; returns once it is
    /// attached at the relay.
    pub(crate) async fn add_agent(&self, entry: AgentEntry) -> Result<bool, Failure> {
        check_agent(&entry.agent).map_err(|e| Failure::bad_request(e.to_string()))?;
        if let Some(u) = &entry.notify_url {
            check_notify_url(u).map_err(|e| Failure::bad_request(e.to_string()))?;
        }
        let mut file =
            AgentsFile::load(&self.inner.dir).map_err(|e| Failure::internal(e.to_string()))?;
        let new = file.upsert(entry.clone());
        {
            let agents = self.inner.agents.lock().await;
            if let Some(slot) = agents.get(&entry.agent) {
                if slot.entry == entry
                    && slot
                        .stopped
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_none()
                {
                    return Ok(false);
                }
            }
        }
        // Stop a send-only attach of the same name first: the receiving one
        // replaces it on the relay anyway.
        self.drop_sender(&entry.agent).await;
        self.attach(entry).await.map_err(|e| match e {
            DaemonError::Link(l) => Failure::link(&l),
            other => Failure::internal(other.to_string()),
        })?;
        file.save(&self.inner.dir)
            .map_err(|e| Failure::internal(e.to_string()))?;
        Ok(new)
    }

    /// `agent remove`: detach and unregister; its inbox folder is removed
    /// (messages in it are gone).
    pub(crate) async fn remove_agent(&self, agent: &str) -> Result<usize, Failure> {
        let slot = self.inner.agents.lock().await.remove(agent);
        let mut file =
            AgentsFile::load(&self.inner.dir).map_err(|e| Failure::internal(e.to_string()))?;
        let listed = file.remove(agent);
        let Some(slot) = slot else {
            if listed {
                file.save(&self.inner.dir)
                    .map_err(|e| Failure::internal(e.to_string()))?;
                return Ok(0);
            }
            return Err(Failure::unknown_agent(agent));
        };
        slot.stop.cancel();
        let _ = slot.task.await;
        file.save(&self.inner.dir)
            .map_err(|e| Failure::internal(e.to_string()))?;
        let (dir, dropped) = {
            let inbox = slot.inbox.lock().unwrap_or_else(|e| e.into_inner());
            (inbox.dir().to_path_buf(), inbox.depth())
        };
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        Ok(dropped)
    }

    /// Every registered agent, in name order.
    pub(crate) async fn agents(&self) -> Vec<AgentInfo> {
        let agents = self.inner.agents.lock().await;
        let mut out: Vec<AgentInfo> = agents
            .values()
            .map(|s| {
                let inbox = s.inbox.lock().unwrap_or_else(|e| e.into_inner());
                let stopped = s.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone();
                AgentInfo {
                    agent: s.entry.agent.clone(),
                    notify_url: s.entry.notify_url.clone(),
                    inbox: inbox.depth(),
                    bytes: inbox.bytes(),
                    expired: inbox.expired(),
                    receiving: stopped.is_none(),
                    stopped,
                }
            })
            .collect();
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        out
    }

    async fn slot_parts(
        &self,
        agent: &str,
    ) -> Result<(Arc<Mutex<Inbox>>, watch::Receiver<u64>), Failure> {
        let agents = self.inner.agents.lock().await;
        let s = agents
            .get(agent)
            .ok_or_else(|| Failure::unknown_agent(agent))?;
        Ok((s.inbox.clone(), s.landed.subscribe()))
    }

    /// Waiting messages with their payloads, oldest first; with `wait`,
    /// until at least one is there or the time is up.
    pub(crate) async fn inbox(
        &self,
        agent: &str,
        limit: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<store::Full>, Failure> {
        let (inbox, mut landed) = self.slot_parts(agent).await?;
        let deadline = wait.map(|w| Instant::now() + w);
        loop {
            landed.borrow_and_update();
            let got = read_waiting(&inbox, limit).await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let Some(deadline) = deadline else {
                return Ok(got);
            };
            tokio::select! {
                r = landed.changed() => if r.is_err() {
                    return Err(Failure::unknown_agent(agent));
                },
                _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
                _ = self.inner.stop.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// The landed-counter of `agent`, for an event stream.
    pub(crate) async fn subscribe(
        &self,
        agent: &str,
    ) -> Result<(Arc<Mutex<Inbox>>, watch::Receiver<u64>), Failure> {
        self.slot_parts(agent).await
    }

    /// Whether the daemon is stopping.
    pub(crate) fn stopping(&self) -> CancellationToken {
        self.inner.stop.clone()
    }

    /// The agent read message `id`: remove it, and send the read receipt
    /// its sender asked for.
    pub(crate) async fn ack(&self, agent: &str, id: store::Id) -> Result<(), Failure> {
        let mut out = self.ack_many(agent, vec![id]).await?;
        match out.pop() {
            Some(Ok(())) => Ok(()),
            Some(Err(f)) => Err(f),
            None => Err(Failure::internal("no answer for the ack")),
        }
    }

    /// Ack several messages of `agent` with one write of its seen log; an
    /// answer per id, in order.
    pub(crate) async fn ack_many(
        &self,
        agent: &str,
        ids: Vec<store::Id>,
    ) -> Result<Vec<Result<(), Failure>>, Failure> {
        let (inbox, _) = self.slot_parts(agent).await?;
        let now = now_ms();
        let acked = tokio::task::spawn_blocking(move || {
            let mut inbox = inbox.lock().unwrap_or_else(|e| e.into_inner());
            inbox.ack_many(&ids, now)
        })
        .await
        .map_err(|e| Failure::internal(e.to_string()))?;
        Ok(acked
            .into_iter()
            .map(|r| match r {
                Ok(w) => {
                    if let Some(requester) = self.inner.reads.take_want(agent, &w.id) {
                        if requester == store::instance_of(&w.from) {
                            self.send_read_note(&requester, ReadNote::read(agent, &w.id, now));
                        }
                    }
                    Ok(())
                }
                Err(store::AckError::NotFound(hex)) => Err(Failure::new(
                    "UnknownMessage",
                    404,
                    Exit::Usage,
                    format!("no message {hex} waiting for {agent} (already acked, expired, or never came)"),
                )),
                Err(store::AckError::Io(e)) => Err(Failure::internal(format!("recording the ack: {e}"))),
            })
            .collect())
    }

    /// Send for a local client: `from` any valid agent name, `to`
    /// `INSTANCE/AGENT` or a bare agent name (resolved in the fleet).
    pub(crate) async fn send(
        &self,
        from: &str,
        to: &str,
        payload: Bytes,
        timeout: Duration,
        wait_read: Option<Duration>,
    ) -> Result<(Receipt, Option<u64>), Failure> {
        agent_link_proto::check_id(from).map_err(|e| Failure::bad_request(format!("from: {e}")))?;
        if from.starts_with(super::agents::RESERVED_PREFIX) {
            return Err(Failure::bad_request(
                "from: names that start with '.' are reserved for the daemon",
            ));
        }
        let start = Instant::now();
        let to = if to.contains('/') {
            agent_link_proto::Address::parse(to)
                .map_err(|e| Failure::new("BadAddress", 400, Exit::Usage, format!("to: {e}")))?;
            to.to_string()
        } else {
            self.resolve(to).await?
        };
        let sender = self.sender_for(from).await?;
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        let receipt = sender
            .send_with_timeout(&to, payload, left)
            .await
            .map_err(|e| Failure::send(&e, &to))?;
        let Some(wait) = wait_read else {
            return Ok((receipt, None));
        };
        let (target, agent) = to.split_once('/').unwrap_or((&to, ""));
        let rx = self.inner.reads.wait(receipt.id.0, target, agent);
        self.send_read_note(target, ReadNote::request(agent, &receipt.id.0));
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(at)) => Ok((receipt, Some(at))),
            _ => {
                self.inner.reads.cancel(&receipt.id.0);
                Err(Failure::new(
                    "ReadTimeout",
                    504,
                    Exit::Timeout,
                    format!(
                        "delivered {} to {to} at {}, but not read within {} s (a target without a daemon sends no read receipts)",
                        receipt.id,
                        receipt.delivered_at_ms,
                        wait.as_secs()
                    ),
                ))
            }
        }
    }

    /// A handle to send as `from`: the registered agent's own stream, or a
    /// cached send-only attach.
    async fn sender_for(&self, from: &str) -> Result<AgentSender, Failure> {
        if let Some(s) = self.inner.agents.lock().await.get(from) {
            return Ok(s.sender.clone());
        }
        let mut cache = self.inner.senders.lock().await;
        if let Some(e) = cache.iter_mut().find(|(n, _, _)| n == from) {
            e.2 = Instant::now();
            return Ok(e.1.sender());
        }
        let agent = self
            .inner
            .link
            .attach_sender(from)
            .await
            .map_err(|e| Failure::link(&e))?;
        let sender = agent.sender();
        if cache.len() >= SENDER_CACHE {
            if let Some((i, _)) = cache.iter().enumerate().min_by_key(|(_, e)| e.2) {
                let (_, old, _) = cache.swap_remove(i);
                tokio::spawn(old.close());
            }
        }
        cache.push((from.to_string(), agent, Instant::now()));
        Ok(sender)
    }

    async fn drop_sender(&self, name: &str) {
        let mut cache = self.inner.senders.lock().await;
        if let Some(i) = cache.iter().position(|(n, _, _)| n == name) {
            let (_, old, _) = cache.swap_remove(i);
            old.close().await;
        }
    }

    /// The one online instance where an agent called `agent` receives.
    async fn resolve(&self, agent: &str) -> Result<String, Failure> {
        agent_link_proto::check_id(agent)
            .map_err(|e| Failure::new("BadAddress", 400, Exit::Usage, format!("to: {e}")))?;
        let found = match crate::find_agent(&self.fleet(false).await?, agent) {
            // It may have attached since the status was taken.
            Err(crate::FindAgentError::Nowhere { .. }) => {
                crate::find_agent(&self.fleet(true).await?, agent)
            }
            other => other,
        };
        found.map_err(|e| match e {
            crate::FindAgentError::Nowhere { .. } => {
                Failure::new("UnknownTarget", 404, Exit::Offline, e.to_string())
            }
            crate::FindAgentError::Several { .. } => {
                Failure::new("AmbiguousTarget", 409, Exit::Usage, e.to_string())
            }
        })
    }

    /// The fleet as the relay reports it (cached for a second).
    pub(crate) async fn fleet(&self, fresh: bool) -> Result<Vec<InstanceStatus>, Failure> {
        let mut cache = self.inner.fleet.lock().await;
        if let Some((at, list)) = &*cache {
            if !fresh && at.elapsed() < STATUS_FRESH {
                return Ok(list.clone());
            }
        }
        let st = self
            .inner
            .link
            .status()
            .await
            .map_err(|e| Failure::link(&e))?;
        *cache = Some((Instant::now(), st.instances.clone()));
        Ok(st.instances)
    }

    /// Store what arrives for one agent, then answer each delivery.
    #[allow(clippy::too_many_arguments)]
    async fn receive_loop(
        self,
        mut agent: Agent,
        inbox: Arc<Mutex<Inbox>>,
        landed: watch::Sender<u64>,
        stopped: Arc<Mutex<Option<String>>>,
        window: Arc<std::sync::atomic::AtomicU64>,
        stop: CancellationToken,
        notify_url: Option<String>,
    ) {
        let name = agent
            .address()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let mut batch: Vec<Message> = Vec::with_capacity(STORE_BATCH);
        loop {
            batch.clear();
            let n = tokio::select! {
                n = agent.recv_unconfirmed(&mut batch, STORE_BATCH) => n,
                _ = stop.cancelled() => break,
            };
            if n == 0 {
                let why = agent
                    .stop_reason()
                    .map_or_else(|| "the link closed".to_string(), |c| c.to_string());
                tracing::warn!(agent = %name, "agent stopped receiving: {why}");
                *stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                return;
            }
            window.store(agent.window_ms(), std::sync::atomic::Ordering::Relaxed);
            let now = now_ms();
            let msgs = std::mem::take(&mut batch);
            let store_inbox = inbox.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let items: Vec<Incoming<'_>> = msgs
                    .iter()
                    .map(|m| Incoming {
                        id: m.id.0,
                        from: &m.from,
                        to: &m.to,
                        sent_at_ms: m.sent_at_ms,
                        payload: &m.payload,
                    })
                    .collect();
                let out = store_inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .store(&items, now);
                (msgs, out)
            })
            .await;
            let Ok((msgs, outcomes)) = stored else {
                // The store panicked: nothing is known to be durable, so
                // the unanswered deliveries are refused when the agent closes.
                tracing::error!(agent = %name, "storing messages failed");
                break;
            };
            let mut any_new = false;
            for (m, out) in msgs.iter().zip(outcomes) {
                match out {
                    Stored::New { at_ms } => {
                        any_new = true;
                        agent.confirm(m.id, at_ms);
                        if let Some(url) = &notify_url {
                            self.inner
                                .notifier
                                .notify(url, &name, &m.id.to_string(), &m.from);
                        }
                    }
                    Stored::Duplicate { at_ms } => agent.confirm(m.id, at_ms),
                    Stored::Full => agent.refuse(m.id, ErrorCode::InboxFull),
                    Stored::Conflict => {
                        tracing::warn!(agent = %name, id = %m.id, from = %m.from, "refused a message whose id another sender already used");
                        agent.refuse(m.id, ErrorCode::Malformed);
                    }
                    Stored::Failed => agent.refuse(m.id, ErrorCode::Internal),
                }
            }
            if any_new {
                landed.send_modify(|n| *n += 1);
            }
        }
        agent.close().await;
    }

    /// Read requests and read receipts, on the daemon's own agent.
    async fn read_loop(self, mut agent: Agent, stop: CancellationToken) {
        let mut batch = Vec::new();
        loop {
            batch.clear();
            let n = tokio::select! {
                n = agent.recv_unconfirmed(&mut batch, 64) => n,
                _ = stop.cancelled() => break,
            };
            if n == 0 {
                tracing::warn!("the read-receipt agent stopped: {:?}", agent.stop_reason());
                return;
            }
            for m in batch.drain(..) {
                // Taken at once: these are notes, not messages to keep.
                agent.confirm(m.id, now_ms());
                let from_instance = store::instance_of(&m.from).to_string();
                match ReadNote::parse(&m.payload) {
                    Some(ReadNote::Request { agent: a, id }) => {
                        self.on_read_request(&from_instance, &a, id).await
                    }
                    Some(ReadNote::Read {
                        agent: a,
                        id,
                        read_at,
                    }) => self.inner.reads.resolve(&id, &from_instance, &a, read_at),
                    None => tracing::debug!(from = %m.from, "a read note that does not parse"),
                }
            }
        }
        agent.close().await;
    }

    /// Instance `requester` wants to know when `agent` reads `id`: only the
    /// instance that sent it may ask.
    async fn on_read_request(&self, requester: &str, agent: &str, id: store::Id) {
        let Ok((inbox, _)) = self.slot_parts(agent).await else {
            return;
        };
        let (waiting, read) = {
            let inbox = inbox.lock().unwrap_or_else(|e| e.into_inner());
            if inbox.sender_of(&id) != Some(requester) {
                return;
            }
            (inbox.is_waiting(&id), inbox.read_at(&id))
        };
        if waiting {
            self.inner.reads.want(agent, id, requester);
            // It may have been acked between the check and the note.
            let acked = inbox.lock().unwrap_or_else(|e| e.into_inner()).read_at(&id);
            if let Some((_, at)) = acked.filter(|(_, at)| *at > 0) {
                if self.inner.reads.take_want(agent, &id).is_some() {
                    self.send_read_note(requester, ReadNote::read(agent, &id, at));
                }
            }
        } else if let Some((_, at)) = read.filter(|(_, at)| *at > 0) {
            self.send_read_note(requester, ReadNote::read(agent, &id, at));
        }
    }

    fn send_read_note(&self, instance: &str, note: ReadNote) {
        let sender = self.inner.read_sender.clone();
        let to = format!("{instance}/{READ_AGENT}");
        tokio::spawn(async move {
            if let Err(e) = sender
                .send_with_timeout(&to, note.encode(), Duration::from_secs(30))
                .await
            {
                tracing::debug!("read note to {to}: {e}");
            }
        });
    }

    async fn sweeper(self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => {}
                _ = self.inner.stop.cancelled() => return,
            }
            let slots: Vec<(Arc<Mutex<Inbox>>, u64)> = {
                let agents = self.inner.agents.lock().await;
                agents
                    .values()
                    .map(|s| {
                        (
                            s.inbox.clone(),
                            keep_seen_ms(s.window.load(std::sync::atomic::Ordering::Relaxed)),
                        )
                    })
                    .collect()
            };
            for (inbox, keep) in slots {
                let now = now_ms();
                let _ = tokio::task::spawn_blocking(move || {
                    let mut inbox = inbox.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = inbox.sweep(now, keep) {
                        tracing::warn!("sweeping an inbox: {e}");
                    }
                })
                .await;
            }
        }
    }

    /// Stop: every agent detaches (what was not stored is refused by name),
    /// then the connection closes.
    pub(crate) async fn shutdown(&self) {
        self.inner.stop.cancel();
        let slots: Vec<Slot> = self
            .inner
            .agents
            .lock()
            .await
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in &slots {
            s.stop.cancel();
        }
        for s in slots {
            let _ = s.task.await;
        }
        let task = self
            .inner
            .read_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, task)) = task {
            stop.cancel();
            let _ = task.await;
        }
        for (_, a, _) in self.inner.senders.lock().await.drain(..) {
            a.close().await;
        }
        self.inner.link.clone().close().await;
    }
}

/// How long ids must be remembered for an agent: twice its window, or
/// the widest window before the relay has said.
fn keep_seen_ms(window_ms: u64) -> u64 {
    if window_ms == 0 {
        KEEP_BEFORE_ATTACH_MS
    } else {
        window_ms.saturating_mul(2)
    }
}

async fn read_waiting(
    inbox: &Arc<Mutex<Inbox>>,
    limit: usize,
) -> Result<Vec<store::Full>, Failure> {
    let inbox = inbox.clone();
    tokio::task::spawn_blocking(move || {
        let inbox = inbox.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for w in inbox.list(limit) {
            match inbox.read(&w.id) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => {}
                Err(e) => {
                    return Err(Failure::internal(format!(
                        "reading message {}: {e}",
                        store::hex_id(&w.id)
                    )))
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| Failure::internal(e.to_string()))?
}

pub(crate) fn now_ms() -> u64 {
    agent_link_proto::clock::unix_ms(std::time::SystemTime::now())
}
