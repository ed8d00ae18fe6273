//! [`Hub`]: what the relay's tasks share, behind methods. A task takes the
//! hub and uses the handles it needs (configuration, check policy, routing
//! table, live registry, counters, the shutdown signal); nothing reaches
//! into fields. [`ConnInfo`] is what every stream of one connection knows
//! about it.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use agent_link_crypto::{FleetKey, FleetKeys, FleetSecret, PublicKey};
use agent_link_proto::{ErrorCode, RelayToPeer};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::cluster::ClusterLink;
use super::writer::Outbound;
use crate::config::RelayConfig;
use crate::core::checks::CheckPolicy;
use crate::core::rate::TokenBucket;
use crate::core::status::{StatusCache, StatusSnapshot};
use crate::registry::live::LiveRegistry;
use crate::router::Router;
use crate::stats::Stats;

/// The relay's routing table, routing writer-queue items.
pub(crate) type Routes = Router<Outbound>;

/// The handles shared by every task of one relay.
#[derive(Debug)]
pub(crate) struct Hub {
    config: RelayConfig,
    /// The fleet secret in force, and the checks run per message as it is
    /// read (Ed25519 left out: when `config.verify_signatures` is on it runs
    /// batched, see `core::agent_stream`). Replaced whole by a rotation.
    fleet: RwLock<FleetState>,
    router: Routes,
    registry: LiveRegistry,
    stats: Stats,
    shutdown: CancellationToken,
    /// Registry writes by registration, relay-wide
    /// (`registrations_per_sec`).
    registrations: Mutex<TokenBucket>,
    /// The status snapshot and when to rebuild it.
    status: Mutex<StatusCache>,
    /// With `cluster`: this relay's part in the fleet.
    cluster: Option<ClusterLink>,
}

impl Hub {
    pub(crate) fn new(
        config: RelayConfig,
        fleet: &FleetSecret,
        previous: Option<&(FleetSecret, u64)>,
        registry: LiveRegistry,
        cluster: Option<ClusterLink>,
    ) -> Self {
        Self {
            cluster,
            fleet: RwLock::new(FleetState::new(&config, fleet, previous)),
            router: Router::default(),
            registry,
            stats: Stats::default(),
            shutdown: CancellationToken::new(),
            registrations: Mutex::new(TokenBucket::new(
                config.registrations_per_sec,
                config.registrations_per_sec,
                std::time::Instant::now(),
            )),
            status: Mutex::default(),
            config,
        }
    }

    /// The `FleetSecret` frame: only for connections of registered,
    /// unrevoked instances.
    pub(crate) fn fleet_secret_frame(&self) -> Bytes {
        self.fleet_state().frame.clone()
    }

    fn fleet_state(&self) -> std::sync::RwLockReadGuard<'_, FleetState> {
        self.fleet.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Put a rotated fleet secret in force: new messages are checked under
    /// `fleet`, or `previous` until its deadline. Returns the `FleetSecret`
    /// frame to push to every registered connection.
    pub(crate) fn install_fleet(
        &self,
        fleet: &FleetSecret,
        previous: Option<&(FleetSecret, u64)>,
    ) -> Bytes {
        let state = FleetState::new(&self.config, fleet, previous);
        let frame = state.frame.clone();
        *self.fleet.write().unwrap_or_else(|e| e.into_inner()) = state;
        frame
    }

    /// Take a token of the relay-wide registration bucket.
    pub(crate) fn take_registration_token(&self) -> bool {
        self.registrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_take(std::time::Instant::now())
    }

    /// The validated configuration (every bound the relay enforces).
    pub(crate) fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// The per-message checks as they stand now (a rotation replaces them:
    /// take them once per batch, not once per stream).
    pub(crate) fn policy(&self) -> Arc<CheckPolicy> {
        self.fleet_state().policy.clone()
    }

    /// The current fleet key (registration proofs by fleet secret: only
    /// the current secret registers, never one a rotation replaced).
    pub(crate) fn fleet(&self) -> FleetKey {
        self.fleet_state().policy.fleet.current().clone()
    }

    /// Who is connected, and where deliveries and receipts go.
    pub(crate) fn router(&self) -> &Routes {
        &self.router
    }

    /// This relay's part in a fleet, when it serves in one.
    pub(crate) fn cluster(&self) -> Option<&ClusterLink> {
        self.cluster.as_ref()
    }

    /// The registry as currently loaded.
    pub(crate) fn registry(&self) -> &LiveRegistry {
        &self.registry
    }

    /// Counters.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Cancelled when the relay shuts down.
    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The status snapshot to answer `you` from (PROTOCOL.md §9.2): cached,
    /// rebuilt when the registry or the routing table changed, at most once
    /// per `core::status::STATUS_REFRESH`. Building runs under the cache's
    /// lock, so concurrent requests wait for one build instead of each
    /// making its own.
    pub(crate) fn status(&self, you: &str) -> Arc<StatusSnapshot> {
        let version = (self.registry.generation(), self.router.changes());
        let mut cache = self.status.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(std::time::Instant::now(), version, you, |id| {
            let online = self.router.snapshot();
            let reg = self.registry.read();
            let entries = reg
                .records()
                .iter()
                .filter(|r| !r.revoked)
                .filter_map(|rec| {
                    let pk = rec.public_key.parse::<PublicKey>().ok()?;
                    Some(agent_link_proto::InstanceStatus {
                        instance_id: rec.instance_id.clone(),
                        name: rec.name.clone(),
                        public_key: pk.0,
                        online: online.contains_key(&rec.instance_id),
                        agents: online.get(&rec.instance_id).cloned().unwrap_or_default(),
                    })
                })
                .collect::<Vec<_>>();
            StatusSnapshot::build(id, entries)
        })
    }

    /// Count a refusal by its code.
    pub(crate) fn refused(&self, code: ErrorCode) {
        self.stats.refused(code);
    }

    /// Close `conn` for `code`, counted as a refused connection.
    pub(crate) fn refuse_connection(&self, conn: &quinn::Connection, code: ErrorCode) {
        self.stats.connections_refused.fetch_add(1, Relaxed);
        self.stats.refused(code);
        conn.close(code.as_u32().into(), code.describe().as_bytes());
    }
}

/// The fleet secret in force, as the checks and the `FleetSecret` frame
/// need it.
#[derive(Debug)]
struct FleetState {
    policy: Arc<CheckPolicy>,
    frame: Bytes,
}

impl FleetState {
    fn new(
        config: &RelayConfig,
        fleet: &FleetSecret,
        previous: Option<&(FleetSecret, u64)>,
    ) -> Self {
        let keys = FleetKeys::from_secrets(fleet, previous);
        Self {
            frame: super::writer::frame(&RelayToPeer::FleetSecret {
                secret: *fleet.expose(),
                previous_valid_until_ms: keys.previous_until_ms(),
            }),
            policy: Arc::new(CheckPolicy {
                fleet: keys,
                window_ms: config.timestamp_window_secs * 1000,
                verify_signatures: false,
                max_payload: config.max_message_size as usize,
            }),
        }
    }
}

/// What every stream of a connection knows about it.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub(crate) conn_id: u64,
    /// The instance it serves.
    pub(crate) instance: String,
    /// The key from its TLS handshake.
    pub(crate) key: PublicKey,
    pub(crate) conn: quinn::Connection,
    /// The instance's rate bucket, shared by all its connections.
    pub(crate) rate: Arc<Mutex<TokenBucket>>,
    /// The instance's control-request bucket, shared likewise.
    pub(crate) control_rate: Arc<Mutex<TokenBucket>>,
    /// Agent streams open (bounded by `max_agents_per_connection`).
    pub(crate) agents: AtomicUsize,
}
