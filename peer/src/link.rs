//! [`AgentLink`]: one instance's connection to its relay, and the agents
//! attached on it. The supervisor (`supervisor.rs`) keeps the connection up;
//! each agent has a driver task (`task.rs`) over its sans-IO core
//! (`core/`).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agent_link_crypto::{Identity, PublicKey};
use agent_link_proto::{InstanceStatus, PeerToRelay, RelayToPeer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::info;

use crate::agent::{Agent, AgentHandles, SealKeys};
use crate::config::{PeerConfig, KEY_FILE, PINS_FILE};
use crate::core::receiver::Receiver;
use crate::core::AgentCore;
use crate::error::{CloseReason, LinkError, Phase};
use crate::pins::Pins;
use crate::supervisor::{supervise, ConnState, Dialer, RelayTarget};
use crate::task::AgentTask;
use crate::transport;

/// Messages one agent may have waiting for an outcome.
const OUTBOX_LIMIT: usize = 4096;
/// Messages queued for the application before the agent stops reading.
const INBOX_LEN: usize = 1024;
/// How long `connect`, `attach` and `status` wait unless told otherwise.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` gives QUIC to put the CONNECTION_CLOSE on the wire.
/// It does not wait out the drain period (three probe timeouts, ~80 ms on
/// loopback): the relay learns from that one packet.
const CLOSE_FLUSH: Duration = Duration::from_millis(50);
/// How long `close` waits for the agents to detach.
const AGENTS_CLOSE_WAIT: Duration = Duration::from_secs(3);

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
    /// Every registered instance, this one included.
    pub instances: Vec<InstanceStatus>,
}

/// What the link's clones and agents share.
struct LinkState {
    config: PeerConfig,
    keys: Arc<SealKeys>,
    pins: Arc<Mutex<Pins>>,
    conn: watch::Receiver<ConnState>,
    shutdown: CancellationToken,
    /// Cancelled by `close`: every agent detaches (parent of each agent's
    /// own close token).
    stop_agents: CancellationToken,
    /// The agents' driver tasks, so `close` can wait for their goodbyes.
    agents: TaskTracker,
    setup_timeout: Duration,
    /// The relay connected to (or being tried): `relay_url` or one of
    /// `other_relays`.
    relay: Arc<Mutex<Arc<str>>>,
    endpoint: quinn::Endpoint,
    _supervisor: AbortOnDropHandle<()>,
}

/// A connected instance: the entry point of this crate.
///
/// Clones share one connection. The connection stays up (reconnecting by
/// itself when `auto_reconnect` is on) while any clone or any [`Agent`]
/// attached through it lives. [`AgentLink::close`] on any clone closes it
/// for all of them: every agent stops, and sends still waiting end with
/// [`crate::SendError::Closed`].
#[derive(Clone)]
pub struct AgentLink {
    state: Arc<LinkState>,
}

impl std::fmt::Debug for AgentLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLink")
            .field("instance", &self.state.config.instance_id)
            .finish_non_exhaustive()
    }
}

/// Options for [`AgentLink::builder`].
#[derive(Debug, Clone)]
pub struct AgentLinkBuilder {
    dir: PathBuf,
    connect_timeout: Duration,
    setup_timeout: Duration,
    strict_pins: Option<bool>,
}

impl AgentLinkBuilder {
    /// How long the first connection may take, retries included (default
    /// 10 s). A relay that does not answer costs no more than this.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// How long an attach or a status request may take (default 10 s).
    pub fn setup_timeout(mut self, t: Duration) -> Self {
        self.setup_timeout = t;
        self
    }

    /// Strict pins (default: the config's `strict_pins`): receiving agents
    /// deliver only from instances whose key is pinned already (`trust`),
    /// and refuse every other sender with `KeyChanged`.
    pub fn strict_pins(mut self, strict: bool) -> Self {
        self.strict_pins = Some(strict);
        self
    }

    /// Load the peer directory and connect: waits for the first connection
    /// (up to the connect timeout); afterwards the link reconnects by itself.
    pub async fn connect(self) -> Result<AgentLink, LinkError> {
        let dir = &self.dir;
        let mut config = PeerConfig::load(dir)?;
        if let Some(strict) = self.strict_pins {
            config.strict_pins = strict;
        }
        let identity = Identity::read(&dir.join(KEY_FILE))?;
        let fleet = Arc::new(crate::fleet::FleetRing::load(dir)?);
        let pins_path = dir.join(PINS_FILE);
        let pins = Pins::load(pins_path.clone())
            .map_err(|reason| LinkError::config(pins_path, None, reason))?;
        let deadline = Instant::now() + self.connect_timeout;
        let dialer = dialer(&identity, &config, dir).await?;
        let mut dialer = dialer;
        let conn = dialer.connect_by(deadline).await?;
        let relay = dialer.current();
        info!(relay = %relay.lock().unwrap_or_else(|e| e.into_inner()), "connected");
        let (tx, rx) = watch::channel(ConnState::Up(conn.clone()));
        let shutdown = CancellationToken::new();
        let endpoint = dialer.endpoint.clone();
        let supervisor = tokio::spawn(supervise(
            dialer,
            config.auto_reconnect,
            conn,
            tx,
            shutdown.clone(),
            fleet.clone(),
        ));
        Ok(AgentLink {
            state: Arc::new(LinkState {
                config,
                keys: Arc::new(SealKeys { identity, fleet }),
                pins: Arc::new(Mutex::new(pins)),
                conn: rx,
                shutdown,
                stop_agents: CancellationToken::new(),
                agents: TaskTracker::new(),
                setup_timeout: self.setup_timeout,
                relay,
                endpoint,
                _supervisor: AbortOnDropHandle::new(supervisor),
            }),
        })
    }
}

/// The dialer of the relays in `config`: one client configuration per
/// relay (each pins its own certificate), on one endpoint of the address
/// family of the first relay that resolves.
async fn dialer(identity: &Identity, config: &PeerConfig, dir: &Path) -> Result<Dialer, LinkError> {
    let relays = config.relays();
    let tls = transport::tls_identity(identity)?;
    let failover = relays.len() > 1;
    let mut ca = transport::CaRoots::new(config.ca_file(dir));
    let targets = relays
        .iter()
        .map(|(label, trust)| {
            Ok(RelayTarget {
                label: label.clone(),
                config: transport::client_config(&tls, *trust, &mut ca, failover)?,
                server_name: transport::server_name(label, *trust),
            })
        })
        .collect::<Result<Vec<_>, LinkError>>()?;
    let mut v6 = None;
    let mut unresolved = None;
    for (label, _) in &relays {
        match transport::resolve(label).await {
            Ok(a) => {
                v6 = Some(a.is_ipv6());
                break;
            }
            Err(e) => unresolved = Some(e),
        }
    }
    let v6 = match (v6, unresolved) {
        (Some(v6), _) => v6,
        (None, Some(e)) => return Err(e),
        (None, None) => unreachable!("a validated config lists a relay"),
    };
    Ok(Dialer::new(transport::endpoint(v6)?, targets))
}

impl AgentLink {
    /// Connect with the peer directory `dir` and default options.
    pub async fn connect(dir: impl AsRef<Path>) -> Result<Self, LinkError> {
        Self::builder(dir).connect().await
    }

    /// Options first, then [`AgentLinkBuilder::connect`].
    pub fn builder(dir: impl AsRef<Path>) -> AgentLinkBuilder {
        AgentLinkBuilder {
            dir: dir.as_ref().to_path_buf(),
            connect_timeout: SETUP_TIMEOUT,
            setup_timeout: SETUP_TIMEOUT,
            strict_pins: None,
        }
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.state.config.instance_id
    }

    /// This instance's public key.
    pub fn public_key(&self) -> PublicKey {
        self.state.keys.identity.public_key()
    }

    /// Attach `agent` to receive its messages (and send). The newest receiving
    /// attach of an agent id wins, relay-wide.
    pub async fn attach(&self, agent: &str) -> Result<Agent, LinkError> {
        self.attach_as(agent, true).await
    }

    /// Attach `agent` to send only: it does not displace a receiving attach
    /// of the same agent elsewhere.
    pub async fn attach_sender(&self, agent: &str) -> Result<Agent, LinkError> {
        self.attach_as(agent, false).await
    }

    async fn attach_as(&self, agent: &str, receive: bool) -> Result<Agent, LinkError> {
        agent_link_proto::check_id(agent).map_err(|e| LinkError::BadInput {
            what: "agent id",
            reason: e.to_string(),
        })?;
        let st = &self.state;
        let (send_tx, send_rx) = mpsc::channel(1024);
        let (msg_tx, msg_rx) = mpsc::channel(INBOX_LEN);
        let (taken_tx, taken_rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let max_size = Arc::new(AtomicUsize::new(usize::MAX));
        let window = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(OnceLock::new());
        let closed = st.stop_agents.child_token();
        let instance = &st.config.instance_id;
        let receiver = Receiver::new(
            instance,
            agent,
            st.keys.fleet.keys(),
            st.pins.clone(),
            st.config.strict_pins,
        );
        let task = AgentTask {
            core: AgentCore::new(
                instance,
                agent,
                receive,
                receiver,
                OUTBOX_LIMIT,
                max_size.clone(),
            ),
            agent: agent.to_string(),
            conn: st.conn.clone(),
            shutdown: st.shutdown.clone(),
            sends: send_rx,
            taken: taken_rx,
            inbox: receive.then_some(msg_tx),
            ready: Some(ready_tx),
            stop: stop.clone(),
            closed: closed.clone(),
            fleet: st.keys.fleet.clone(),
            window: window.clone(),
            _link: self.state.clone(),
        };
        let handle = st.agents.spawn(task.run());
        let failed = match tokio::time::timeout(st.setup_timeout, ready_rx).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(e),
            Ok(Err(_)) => Some(LinkError::Closed(CloseReason::LinkClosed)),
            Err(_) => Some(LinkError::Timeout(Phase::Attach)),
        };
        if let Some(e) = failed {
            // The task must not live on: its attach, answered late or
            // retried after a reconnect, would displace the caller's next
            // attach of the same agent (newest wins) and end it `Replaced`.
            handle.abort();
            return Err(e);
        }
        Ok(Agent::new(
            instance,
            agent,
            st.keys.clone(),
            AgentHandles {
                sends: send_tx,
                inbox: receive.then_some(msg_rx),
                taken: taken_tx,
                max_size,
                window,
                stop,
                task: handle,
                closed,
            },
            Duration::from_secs(st.config.send_timeout_secs),
        ))
    }

    /// The relay connected to (or being tried), `host:port`.
    pub fn relay(&self) -> Arc<str> {
        self.state
            .relay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The connection, or why there is none.
    fn connection(&self) -> Result<quinn::Connection, LinkError> {
        // Closed here, even before the supervisor has published it.
        if self.state.shutdown.is_cancelled() {
            return Err(LinkError::Closed(CloseReason::LinkClosed));
        }
        match &*self.state.conn.borrow() {
            ConnState::Up(c) => Ok(c.clone()),
            ConnState::Failed(code) => Err(LinkError::Refused(*code)),
            ConnState::Closed(reason) => Err(LinkError::Closed(*reason)),
            ConnState::Connecting => Err(LinkError::Unreachable {
                addr: self.relay().to_string(),
                reason: "not connected (reconnecting)".into(),
            }),
        }
    }

    /// Ask the relay who is online: every page of one status snapshot
    /// (PROTOCOL.md §9.2), so the report lists the whole fleet however
    /// large; a relay that predates pages is asked for the one `Status`.
    pub async fn status(&self) -> Result<StatusReport, LinkError> {
        let conn = self.connection()?;
        let t0 = Instant::now();
        let (you, instances) = match self.status_pages(&conn).await {
            Err(LinkError::Refused(agent_link_proto::ErrorCode::Malformed)) => {
                transport::request(
                    &conn,
                    &self.relay(),
                    &PeerToRelay::StatusRequest,
                    Phase::Status,
                    self.state.setup_timeout,
                    |f| match f {
                        RelayToPeer::Status { you, instances } => Some(Ok((you, instances))),
                        _ => None,
                    },
                )
                .await?
            }
            other => other?,
        };
        Ok(StatusReport {
            relay: self.relay().to_string(),
            rtt: t0.elapsed(),
            quic_rtt: conn.rtt(),
            you,
            instances,
        })
    }

    /// Fetch `StatusPage`s from 0 until `total`; start again when the
    /// snapshot changes between pages, so the list is one snapshot's; on
    /// the fourth walk accept pages of several snapshots rather than never
    /// answering while the fleet keeps changing.
    async fn status_pages(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(InstanceStatus, Vec<InstanceStatus>), LinkError> {
        let mut walks = 0;
        loop {
            walks += 1;
            let mut list: Vec<InstanceStatus> = Vec::new();
            let mut snap = None;
            loop {
                let start =
                    u32::try_from(list.len()).map_err(|_| LinkError::Protocol(Phase::Status))?;
                let (you, snapshot, at, total, page) = transport::request(
                    conn,
                    &self.relay(),
                    &PeerToRelay::StatusPageRequest { start },
                    Phase::Status,
                    self.state.setup_timeout,
                    |f| match f {
                        RelayToPeer::StatusPage {
                            you,
                            snapshot,
                            start,
                            total,
                            instances,
                        } => Some(Ok((you, snapshot, start, total, instances))),
                        _ => None,
                    },
                )
                .await?;
                if at != start {
                    return Err(LinkError::Protocol(Phase::Status));
                }
                if walks < 4 && snap.is_some_and(|s| s != snapshot) {
                    break;
                }
                snap = Some(snapshot);
                let done = page.is_empty() || list.len() + page.len() >= total as usize;
                list.extend(page);
                if done {
                    return Ok((you, list));
                }
            }
        }
    }

    /// Close the connection for every clone and agent, with a code the
    /// relay sees at once, and stop reconnecting. Every agent first detaches
    /// as [`Agent::close`] does (messages it did not take are refused by
    /// name; at most 3 s in all); then the close goes out, and this returns
    /// once it is on the wire, without waiting out QUIC's drain period.
    pub async fn close(self) {
        let st = &self.state;
        // Agents first: each refuses what its application did not take and
        // detaches, so no sender is left waiting for its deadline.
        st.stop_agents.cancel();
        st.agents.close();
        let _ = tokio::time::timeout(AGENTS_CLOSE_WAIT, st.agents.wait()).await;
        st.shutdown.cancel();
        let conn = match &*st.conn.borrow() {
            ConnState::Up(c) => Some(c.clone()),
            _ => None,
        };
        if let Some(c) = conn {
            let sent = c.stats().udp_tx.datagrams;
            c.close(0u32.into(), b"bye");
            // quinn's driver sends the CONNECTION_CLOSE on its next turn:
            // once closed, the only datagram a connection sends is that one.
            let flushed = async {
                while c.stats().udp_tx.datagrams == sent {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            let _ = tokio::time::timeout(CLOSE_FLUSH, flushed).await;
        }
        st.endpoint.close(0u32.into(), b"bye");
    }
}
