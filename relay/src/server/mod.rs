//! The relay's lifecycle: [`Relay::spawn`] binds the QUIC endpoint and starts
//! the accept loop, the registry watcher, and (optionally) the admin socket
//! and metrics listener; [`Relay::shutdown`] stops them all through one
//! cancellation token. Every task lives in a `JoinSet`; none is detached.
//!
//! The tasks, from the top: `connection` (one per connection: handshake,
//! admission, stream accept), `stream` (one per stream: first frame,
//! dispatch), then `agent` or `control`; `writer` drains each agent
//! stream's queue; `admin` serves the local socket and metrics. Every task
//! takes the [`Hub`](hub::Hub) and the handles it needs from it; the
//! decisions are in `crate::core`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use agent_link_proto::ErrorCode;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::core::admission::PRE_ADMISSION_RECEIVE_WINDOW;
use crate::core::handshake::{Attempt, HandshakeGate, HandshakeLimits};
use crate::core::limits;
use crate::registry::live::LiveRegistry;
use crate::registry::{RegistryStore, StoreError};
use crate::state::RelayState;
use crate::stats::Stats;
use hub::Hub;

pub(crate) mod admin;
mod agent;
mod cluster;
mod connection;
mod control;
mod fleet;
mod hub;
mod stream;
pub(crate) mod writer;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// TLS configuration failed: the state directory's certificate or key
    /// does not suit rustls or QUIC (re-create it with `init`).
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A configuration value that validated but that quinn refuses (a bug
    /// in `RelayConfig::validate` if it happens: report it).
    #[error("relay-config.json: field `{field}` {reason}")]
    Config {
        /// The field, as in `relay-config.json`.
        field: &'static str,
        /// What quinn said.
        reason: String,
    },
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why not (in use, not a local address, no permission).
        #[source]
        source: std::io::Error,
    },
    /// The metrics or admin listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Listener {
        /// Which listener, and where.
        what: String,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be read.
    #[error(transparent)]
    Registry(#[from] StoreError),
    /// The config has `cluster` and the fleet's NATS cluster cannot be
    /// used: the relay does not start (it never runs alone on its own
    /// registry, which would split the fleet without anyone noticing).
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// Optional listeners.
#[derive(Debug, Default, Clone)]
pub struct SpawnOptions {
    /// Override the configured listen address.
    pub listen: Option<SocketAddr>,
    /// Serve Prometheus metrics over HTTP on this TCP address.
    pub metrics: Option<SocketAddr>,
    /// Serve the local admin socket (`DIR/admin.sock`).
    pub admin_socket: bool,
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    hub: Arc<Hub>,
    tasks: JoinSet<()>,
    state: RelayState,
}

/// Receive buffer asked for the relay's UDP socket (the kernel caps it at
/// `net.core.rmem_max`). Thousands of peers handshaking or sending at once
/// burst into this one socket; with the default (~208 KiB) the kernel drops
/// datagrams and each drop costs a retransmission timeout.
const UDP_RECV_BUFFER: usize = 8 << 20;

fn build_server_config(state: &RelayState) -> Result<quinn::ServerConfig, SpawnError> {
    let cfg = &state.config;
    let tls = match &state.ca_issued {
        Some(issued) => agent_link_crypto::tls::relay_server_config_ca(issued),
        None => agent_link_crypto::tls::relay_server_config(&state.tls),
    }
    .map_err(|e| SpawnError::Tls(e.to_string()))?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| SpawnError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    // quinn's defaults let one connection pin hundreds of MB; every window
    // comes from the config instead.
    // Streams start at a few and `connection::serve_registered` raises the
    // limit as a connection uses them (see `core::limits`).
    t.max_concurrent_bidi_streams(limits::initial_streams(cfg).into());
    t.max_concurrent_uni_streams(0u8.into());
    // No QUIC DATAGRAM frames: the protocol has no use for them, and unread
    // ones would park memory per connection (a stranger's too).
    t.datagram_receive_buffer_size(None);
    t.stream_receive_window(cfg.stream_receive_window.into());
    // Small until the key is known to be a member's (an unknown key may
    // only register); `connection::serve_registered` raises it to
    // `receive_window`.
    t.receive_window(PRE_ADMISSION_RECEIVE_WINDOW.into());
    t.send_window(cfg.send_window);
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(cfg.idle_timeout_secs)).map_err(|e| {
            SpawnError::Config {
                field: "idle_timeout_secs",
                reason: e.to_string(),
            }
        })?,
    ));
    t.keep_alive_interval(Some(Duration::from_secs(cfg.keep_alive_secs)));
    // Fill each packet from one stream before the next instead of
    // round-robining streams packet by packet: fewer STREAM frame headers
    // and fuller packets. Every agent stream's writer hands over whole
    // batches, so no stream waits behind another for more than one write.
    t.send_fairness(false);
    // Path MTU discovery up to the configured datagram size (see
    // `RelayConfig::max_udp_payload_size`): connections start at 1200 bytes
    // and grow only once a probe of the larger size got through.
    t.mtu_discovery_config(Some(agent_link_quic::endpoint::mtu_discovery(
        cfg.max_udp_payload_size,
    )));
    server.transport_config(Arc::new(t));
    // quinn sends an unvalidated address at most 3x what it received from it
    // (anti-amplification). Under load the accept loop answers unvalidated
    // addresses with a Retry (`core::handshake`); its tokens are sealed
    // with this config's random key and expire after quinn's default 15 s.
    Ok(server)
}

/// Run `f` on a thread of its own: in a fleet it runs the NATS client on
/// a runtime of its own, which cannot start inside the caller's.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .expect("a registry command does not panic")
    })
}

/// How long a starting relay waits for JetStream to answer once NATS
/// does: after a NATS node dies the buckets elect new leaders, which took
/// up to ~11 s here, and a relay restarted meanwhile must not give up.
const JETSTREAM_START_WAIT: Duration = Duration::from_secs(30);

/// Connect to the fleet of `cfg`, check it is this secret's fleet, and
/// load its registry. A NATS that does not answer, another fleet, or a
/// bucket that does not decode fail at once; JetStream failing to answer
/// (no leader yet) is tried again until [`JETSTREAM_START_WAIT`].
async fn join_fleet(
    cfg: &crate::config::ClusterConfig,
    state: &RelayState,
    store: RegistryStore,
) -> Result<
    (
        crate::cluster::Cluster,
        LiveRegistry,
        async_nats::jetstream::kv::Watch,
    ),
    crate::cluster::ClusterError,
> {
    use crate::cluster::ClusterError;
    let deadline = tokio::time::Instant::now() + JETSTREAM_START_WAIT;
    loop {
        let attempt = async {
            let cluster = crate::cluster::Cluster::connect(cfg).await?;
            // Never serve a fleet with another fleet's secret.
            crate::cluster::membership::verify(cluster.registry_store(), &state.fleet).await?;
            let (registry, watch) = LiveRegistry::load_fleet(store.clone(), &cluster).await?;
            Ok::<_, ClusterError>((cluster, registry, watch))
        };
        match attempt.await {
            Err(e @ ClusterError::JetStream { .. }) if tokio::time::Instant::now() < deadline => {
                tracing::warn!("the fleet's JetStream does not answer yet ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

impl Relay {
    /// Bind and start serving `state`.
    pub async fn spawn(state: RelayState, opts: SpawnOptions) -> Result<Relay, SpawnError> {
        let mut config = state.config.clone();
        if let Some(l) = opts.listen {
            config.listen = l;
        }
        let store = RegistryStore::new(&state.dir);
        let (registry, fleet) = match &config.cluster {
            None => (LiveRegistry::load(store)?, None),
            Some(c) => {
                let (cluster, registry, watch) = join_fleet(c, &state, store).await?;
                (registry, Some((cluster::ClusterLink::new(cluster), watch)))
            }
        };
        let (fleet, registry_watch) = fleet.unzip();
        let server_config = build_server_config(&state)?;
        let bind_err = |source| SpawnError::Bind {
            addr: config.listen,
            source,
        };
        let socket = agent_link_quic::endpoint::udp_socket(config.listen, UDP_RECV_BUFFER)
            .map_err(bind_err)?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(state.reset_key.clone()));
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload_size)
            .map_err(|e| SpawnError::Config {
                field: "max_udp_payload_size",
                reason: e.to_string(),
            })?;
        let cid_key = state.cid_key;
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(bind_err)?;
        let local_addr = endpoint.local_addr().map_err(|source| SpawnError::Bind {
            addr: config.listen,
            source,
        })?;
        let hub = Arc::new(Hub::new(
            config,
            &state.fleet,
            state.previous.as_ref(),
            registry,
            fleet,
        ));
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(hub.clone(), endpoint.clone()));
        let watcher = hub.clone();
        match registry_watch {
            None => tasks.spawn(async move {
                watcher
                    .registry()
                    .watch(watcher.router(), watcher.shutdown())
                    .await
            }),
            Some(watch) => {
                let me = agent_link_proto::RelayEndpoint {
                    addr: crate::state::advertise_addr(&state.config, local_addr),
                    trust: state.trust(),
                };
                tasks.spawn(cluster::serve(hub.clone(), me));
                tasks.spawn(async move {
                    watcher
                        .registry()
                        .follow(watch, watcher.router(), watcher.shutdown())
                        .await
                })
            }
        };
        tasks.spawn(fleet::watch(hub.clone(), state.dir.clone()));
        let mut metrics_addr = None;
        if let Some(addr) = opts.metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SpawnError::Listener {
                    what: format!("metrics address {addr}"),
                    source,
                })?;
            metrics_addr = listener.local_addr().ok();
            tasks.spawn(admin::serve_metrics(hub.clone(), listener));
        }
        if opts.admin_socket {
            let path: PathBuf = state.dir.join("admin.sock");
            let listener = admin::bind_socket(&path).map_err(|source| SpawnError::Listener {
                what: path.display().to_string(),
                source,
            })?;
            tasks.spawn(admin::serve_admin(hub.clone(), listener, path));
        }
        info!(addr = %local_addr, "listening on {local_addr}");
        Ok(Relay {
            local_addr,
            metrics_addr,
            endpoint,
            hub,
            tasks,
            state,
        })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address, if serving metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The address peers dial for this relay: in a fleet its `advertise`
    /// address when set, else its bound address (loopback for an
    /// unspecified one).
    pub fn dial_addr(&self) -> String {
        crate::state::advertise_addr(&self.state.config, self.local_addr)
    }

    /// The open fleet token for this relay at [`Relay::dial_addr`]
    /// (accepted only with `open_registration` on); in a fleet it lists
    /// the other relays that are up.
    pub fn open_token(&self) -> Result<String, crate::state::RegistryAccessError> {
        let addr = self.dial_addr();
        let t = off_runtime(|| self.state.open_token(&addr))?;
        Ok(t.encode()
            .expect("a join token of relay addresses, fingerprints and a secret encodes"))
    }

    /// A single-use invite for `instance_id` to this relay at
    /// [`Relay::dial_addr`], valid for `valid_for` (what `agent-link-relay
    /// invite --instance-id` prints); in a fleet it lists the other relays
    /// that are up.
    pub fn invite(
        &self,
        instance_id: &str,
        valid_for: Duration,
    ) -> Result<String, crate::state::InviteStateError> {
        let addr = self.dial_addr();
        let t = off_runtime(|| self.state.invite(&addr, instance_id, valid_for))?;
        Ok(t.encode()
            .expect("a join token of relay addresses, fingerprints and an id encodes"))
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        self.hub.stats()
    }

    /// Online instances and their receiving agents.
    pub fn online(&self) -> std::collections::HashMap<String, Vec<String>> {
        self.hub.router().snapshot()
    }

    /// Stop accepting, close every connection with `ShuttingDown`, and wait
    /// (bounded) for tasks to end.
    pub async fn shutdown(mut self) {
        self.hub.shutdown().cancel();
        self.endpoint.close(
            ErrorCode::ShuttingDown.as_u32().into(),
            b"relay shutting down",
        );
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => { self.tasks.abort_all(); break }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        info!("relay stopped");
    }
}

async fn accept_loop(hub: Arc<Hub>, endpoint: quinn::Endpoint) {
    let cfg = hub.config();
    let slots = Arc::new(Semaphore::new(cfg.max_connections as usize));
    let strangers = Arc::new(Semaphore::new(cfg.max_stranger_connections as usize));
    let handshaking = Arc::new(AtomicUsize::new(0));
    let mut conns = JoinSet::new();
    let mut gate = HandshakeGate::new(
        HandshakeLimits {
            per_sec: cfg.handshakes_per_sec,
            per_source_per_sec: cfg.handshakes_per_sec_per_ip,
            retry_threshold: cfg.retry_threshold,
        },
        std::time::Instant::now(),
    );
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = hub.shutdown().cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        while conns.try_join_next().is_some() {}
        let attempt = gate.decide(
            std::time::Instant::now(),
            incoming.remote_address().ip(),
            incoming.remote_address_validated(),
            handshaking.load(Relaxed),
        );
        match attempt {
            Attempt::Accept => {}
            Attempt::Retry => {
                // Stateless: the token proves the address when it comes
                // back. Only an Initial that already carried a token may
                // not be retried, and that one counts as validated.
                match incoming.retry() {
                    Ok(()) => {
                        hub.stats().retries_sent.fetch_add(1, Relaxed);
                    }
                    Err(e) => e.into_incoming().refuse(),
                }
                continue;
            }
            Attempt::Refuse(why) => {
                // A connection flood: refuse at the QUIC level before
                // spending any cryptography on it; peers retry with backoff.
                debug!(remote = %incoming.remote_address(), ?why, "connection attempt refused");
                hub.refused(ErrorCode::TooManyConnections);
                incoming.refuse();
                continue;
            }
        }
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let place = connection::Place {
                    _slot: permit,
                    handshaking: connection::Handshaking::start(handshaking.clone()),
                    strangers: strangers.clone(),
                };
                conns.spawn(connection::serve_connection(hub.clone(), incoming, place));
            }
            Err(_) => {
                // Over max_connections: refuse at the QUIC level, cheaply.
                hub.refused(ErrorCode::TooManyConnections);
                incoming.refuse();
            }
        }
    }
    let deadline = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = conns.join_next() => if next.is_none() { break },
            _ = &mut deadline => { conns.abort_all(); break }
        }
    }
}
