//! The relay's lifecycle: [`Relay::spawn`] binds the QUIC endpoint and starts
//! the accept loop, the registry watcher, and (optionally) the admin socket
//! and metrics listener; [`Relay::shutdown`] stops them all through one
//! cancellation token. Every task lives in a `JoinSet`; none is detached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::{Acquire, Release};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use agent_link_crypto::FleetKey;
use agent_link_proto::ErrorCode;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checks::CheckPolicy;
use crate::config::RelayConfig;
use crate::registry::{Registry, RegistryStore};
use crate::router::Router;
use crate::state::RelayState;
use crate::stats::Stats;

/// State shared by every task of one relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: RelayConfig,
    /// Checks run per message as it is read (Ed25519 left out: when
    /// `config.verify_signatures` is on it runs batched, see `stream`).
    pub policy: CheckPolicy,
    pub fleet: FleetKey,
    pub registry: RwLock<Registry>,
    pub store: RegistryStore,
    /// What the registry file looked like when last loaded.
    pub registry_stamp: std::sync::Mutex<Option<FileStamp>>,
    /// Reloads so far (every successful `refresh_registry`).
    pub registry_generation: std::sync::atomic::AtomicU64,
    /// When a stranger's key last caused a reload (see
    /// `reload_registry_for_unknown_key`).
    pub unknown_key_reload: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    pub router: Router,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
}

impl Shared {
    pub fn registry(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_registry(&self, reg: Registry) {
        *self.registry.write().unwrap_or_else(|e| e.into_inner()) = reg;
    }
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The metrics or admin listener could not be bound.
    #[error("cannot listen on {what}: {source}")]
    Listener {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be read.
    #[error(transparent)]
    Registry(#[from] crate::registry::StoreError),
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
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    state: RelayState,
}

/// Streams a connection may have open at once: every agent plus control.
pub(crate) fn max_streams(cfg: &RelayConfig) -> u32 {
    cfg.max_agents_per_connection + 4
}

/// Streams a new connection may open before the relay raises the limit.
pub(crate) fn initial_streams(cfg: &RelayConfig) -> u32 {
    initial_stream_limit(max_streams(cfg))
}

/// 8, or `max` when 8 would leave less than an eighth of it (a raise that
/// small would never be announced; see `connection::next_stream_limit`).
pub(crate) fn initial_stream_limit(max: u32) -> u32 {
    let first = max.min(8);
    if max - first <= max / 8 {
        max
    } else {
        first
    }
}

/// Receive buffer asked for the relay's UDP socket (the kernel caps it at
/// `net.core.rmem_max`). Thousands of peers handshaking or sending at once
/// burst into this one socket; with the default (~208 KiB) the kernel drops
/// datagrams and each drop costs a retransmission timeout.
const UDP_RECV_BUFFER: usize = 8 << 20;

fn build_server_config(state: &RelayState) -> Result<quinn::ServerConfig, SpawnError> {
    let cfg = &state.config;
    let tls = agent_link_crypto::tls::relay_server_config(&state.tls)
        .map_err(|e| SpawnError::Tls(e.to_string()))?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| SpawnError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    // quinn's defaults let one connection pin hundreds of MB; every window
    // comes from the config instead.
    // Streams start at a few and `connection::serve` raises the limit as a
    // connection uses them, up to `max_streams(cfg)`: quinn keeps an entry
    // per stream a peer may open, so the full limit up front cost ~5 KiB
    // per connection that almost no connection uses.
    t.max_concurrent_bidi_streams(initial_streams(cfg).into());
    t.max_concurrent_uni_streams(0u8.into());
    t.stream_receive_window(cfg.stream_receive_window.into());
    t.receive_window(cfg.receive_window.into());
    t.send_window(cfg.send_window);
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(cfg.idle_timeout_secs))
            .map_err(|e| SpawnError::Tls(format!("idle_timeout_secs: {e}")))?,
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
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload_size);
    t.mtu_discovery_config(Some(mtu));
    server.transport_config(Arc::new(t));
    // quinn sends an unvalidated address at most 3x what it received from it
    // (anti-amplification). The relay sends no Retry packets; the
    // relay-wide handshake rate (`handshakes_per_sec`) bounds the work a
    // flood can cause.
    Ok(server)
}

impl Relay {
    /// Bind and start serving `state`.
    pub async fn spawn(state: RelayState, opts: SpawnOptions) -> Result<Relay, SpawnError> {
        let mut config = state.config.clone();
        if let Some(l) = opts.listen {
            config.listen = l;
        }
        let store = RegistryStore::new(&state.dir);
        let registry = store.load()?;
        let server_config = build_server_config(&state)?;
        let bind_err = |source| SpawnError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind_err)?;
        match quinn::udp::UdpSocketState::new((&socket).into())
            .and_then(|s| s.set_recv_buffer_size((&socket).into(), UDP_RECV_BUFFER))
        {
            Ok(()) => {}
            Err(e) => warn!("could not enlarge the UDP receive buffer: {e}"),
        }
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(state.reset_key.clone()));
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload_size)
            .map_err(|e| SpawnError::Tls(format!("max_udp_payload_size: {e}")))?;
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
        let fleet = state.fleet.key();
        let shared = Arc::new(Shared {
            policy: CheckPolicy {
                fleet: fleet.clone(),
                window_ms: config.timestamp_window_secs * 1000,
                verify_signatures: false,
                max_payload: config.max_message_size as usize,
            },
            fleet,
            registry: RwLock::new(registry),
            registry_stamp: std::sync::Mutex::new(file_stamp(store.path())),
            registry_generation: Default::default(),
            unknown_key_reload: tokio::sync::Mutex::new(None),
            store,
            router: Router::default(),
            stats: Arc::new(Stats::default()),
            shutdown: CancellationToken::new(),
            config,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(shared.clone(), endpoint.clone()));
        tasks.spawn(watch_registry(shared.clone()));
        let mut metrics_addr = None;
        if let Some(addr) = opts.metrics {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SpawnError::Listener {
                    what: format!("metrics address {addr}"),
                    source,
                })?;
            metrics_addr = listener.local_addr().ok();
            tasks.spawn(crate::admin::serve_metrics(shared.clone(), listener));
        }
        if opts.admin_socket {
            let path: PathBuf = state.dir.join("admin.sock");
            let listener =
                crate::admin::bind_socket(&path).map_err(|source| SpawnError::Listener {
                    what: path.display().to_string(),
                    source,
                })?;
            tasks.spawn(crate::admin::serve_admin(shared.clone(), listener, path));
        }
        info!(addr = %local_addr, "listening on {local_addr}");
        Ok(Relay {
            local_addr,
            metrics_addr,
            endpoint,
            shared,
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

    /// A join token for this relay at its bound address.
    pub fn join_token(&self) -> String {
        self.state
            .join_token(&crate::state::dial_addr(self.local_addr))
            .encode()
            .unwrap_or_default()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Online instances and their receiving agents.
    pub fn online(&self) -> std::collections::HashMap<String, Vec<String>> {
        self.shared.router.snapshot()
    }

    /// Stop accepting, close every connection with `ShuttingDown`, and wait
    /// (bounded) for tasks to end.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
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

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let slots = Arc::new(Semaphore::new(shared.config.max_connections as usize));
    let mut conns = JoinSet::new();
    let mut handshakes = crate::rate::TokenBucket::new(
        shared.config.handshakes_per_sec,
        shared.config.handshakes_per_sec,
        std::time::Instant::now(),
    );
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shared.shutdown.cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        while conns.try_join_next().is_some() {}
        if !handshakes.try_take(std::time::Instant::now()) {
            // A connection flood: refuse at the QUIC level before spending
            // any cryptography on it; peers retry with backoff.
            shared.stats.refused(ErrorCode::TooManyConnections);
            incoming.refuse();
            continue;
        }
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                conns.spawn(crate::connection::handle(shared.clone(), incoming, permit));
            }
            Err(_) => {
                // Over max_connections: refuse at the QUIC level, cheaply.
                shared.stats.refused(ErrorCode::TooManyConnections);
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

/// Modification time, size and inode of a file: every registry write
/// replaces the file (rename), so any change alters at least the inode.
pub(crate) type FileStamp = (SystemTime, u64, u64);

fn file_stamp(p: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Pick up registry changes made by `register`/`revoke` while running; close
/// the connections of newly revoked instances (within about a second).
async fn watch_registry(shared: Arc<Shared>) {
    const FULL_RELOAD_EVERY: u64 = 20; // ticks of 500 ms
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for n in 1u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let force = n % FULL_RELOAD_EVERY == 0;
        if let Err(e) = refresh_registry_if_changed(&shared, force).await {
            warn!("registry reload failed, keeping the previous one: {e}");
        }
    }
}

/// Reload the registry when the file changed since the last load (its
/// stamp), and in any case every 10 s: a write that reuses the inode, keeps
/// the size and lands within the file system's timestamp granularity looks
/// unchanged.
pub(crate) async fn refresh_registry_if_changed(
    shared: &Arc<Shared>,
    force: bool,
) -> Result<(), crate::registry::StoreError> {
    let now = file_stamp(shared.store.path());
    if !force {
        let mut last = shared
            .registry_stamp
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *last == now {
            return Ok(());
        }
        *last = now;
    }
    refresh_registry(shared).await
}

/// An unknown key connected: an operator may have just run
/// `agent-link-relay register`, so look at the file again — but at most once
/// every 100 ms, with every stranger that arrives meanwhile sharing that one
/// reload. A flood of unknown keys thus costs at most ten registry reads a
/// second, however many connections it makes.
pub(crate) async fn reload_registry_for_unknown_key(
    shared: &Arc<Shared>,
) -> Result<(), crate::registry::StoreError> {
    const MIN_GAP: Duration = Duration::from_millis(100);
    let seen = shared.registry_generation.load(Acquire);
    let mut last = shared.unknown_key_reload.lock().await;
    if shared.registry_generation.load(Acquire) != seen {
        // Someone reloaded after this key arrived: that reload covers it.
        return Ok(());
    }
    if let Some(t) = *last {
        tokio::time::sleep_until(t + MIN_GAP).await;
    }
    let r = refresh_registry(shared).await;
    *last = Some(tokio::time::Instant::now());
    r
}

/// Re-read the registry from disk and apply it: newly revoked instances have
/// their connections closed with `Revoked`.
pub(crate) async fn refresh_registry(
    shared: &Arc<Shared>,
) -> Result<(), crate::registry::StoreError> {
    let store = shared.store.clone();
    let loaded = tokio::task::spawn_blocking(move || store.load())
        .await
        .map_err(|e| crate::registry::StoreError::Io {
            path: shared.store.path().display().to_string(),
            source: std::io::Error::other(e),
        })??;
    let newly_revoked: Vec<String> = {
        let old = shared.registry();
        loaded
            .records()
            .iter()
            .filter(|r| r.revoked && old.get(&r.instance_id).is_some_and(|o| !o.revoked))
            .map(|r| r.instance_id.clone())
            .collect()
    };
    shared.set_registry(loaded);
    shared.registry_generation.fetch_add(1, Release);
    for id in newly_revoked {
        let conns = shared.router.connections_of(&id);
        info!(instance = %id, connections = conns.len(), "instance revoked; closing its connections");
        for c in conns {
            c.close(ErrorCode::Revoked.as_u32().into(), b"revoked");
        }
    }
    Ok(())
}
