//! A fleet of relays on a NATS cluster (DESIGN.md, "A fleet of relays").
//! NATS is the distributed engine; this module decides what goes where.
//!
//! - [`Cluster::connect`](crate::cluster::Cluster::connect): the NATS connection (a clear error when no server
//!   answers: a relay configured for a fleet never runs alone) and the
//!   fleet's buckets, created as plain JetStream streams so that
//!   nats-server 2.9 accepts them;
//! - [`registry`](crate::cluster::registry): the registry in [`REGISTRY_BUCKET`](crate::cluster::REGISTRY_BUCKET), one key per record,
//!   changes committed by create-if-absent and revision-checked updates, so
//!   the first key wins cluster-wide;
//! - [`attach`](crate::cluster::attach): the decisions about [`ATTACH_BUCKET`](crate::cluster::ATTACH_BUCKET), which relay holds
//!   which receiving agent (the newest attach by KV revision wins);
//! - [`membership`](crate::cluster::membership): which fleet (secret) the cluster serves, so
//!   a relay with another fleet's secret never joins it;
//! - [`presence`](crate::cluster::presence): which relays are up, in [`RELAYS_BUCKET`](crate::cluster::RELAYS_BUCKET), and
//!   the relays a join token lists;
//! - [`batch`](crate::cluster::batch): several forwards, or answers, to
//!   one relay in one NATS message;
//! - [`watch`](crate::cluster::watch): a bucket's watch that notices when
//!   the NATS node holding it died, and opens itself again.
//!
//! The running relay's side (the registry watch in `registry::live`, the
//! attach puts and watch, forwarding on [`deliver_subject`](crate::cluster::deliver_subject) and serving it)
//! is in `server::cluster`; the wire format is PROTOCOL.md §9.8. Peers fail
//! over between the relays their join token lists (`agent_link`'s
//! supervisor).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::config::ClusterConfig;

pub mod attach;
pub mod batch;
pub mod membership;
pub mod presence;
pub mod registry;
pub mod watch;

/// The registry: `id.<hex id>`, `key.<hex key>`, `invite.<hex id>`.
pub const REGISTRY_BUCKET: &str = "agentlink-registry";
/// Receiving attaches: `<hex instance>.<hex agent>` → the holding relay.
pub const ATTACH_BUCKET: &str = "agentlink-attach";
/// Relays that are up: `<relay id>` → address and fingerprint, refreshed
/// by each relay and gone [`PRESENCE_TTL`] after its last refresh.
pub const RELAYS_BUCKET: &str = "agentlink-relays";

/// How long a relay's presence entry outlives its last refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(15);

/// How long a relay waits for NATS at start before refusing to run: a
/// relay configured for a fleet never runs alone (that would split the
/// fleet's registry without anyone noticing).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the cluster could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No NATS server of the configured list answered.
    #[error("cannot reach the fleet's NATS cluster at {urls}: {reason}; a relay with `cluster` in its config does not run alone")]
    Connect {
        /// The configured servers.
        urls: String,
        /// What the client said.
        reason: String,
    },
    /// JetStream refused or failed a request (not enabled, no quorum).
    #[error("NATS JetStream ({what}): {reason}")]
    JetStream {
        /// What was being done.
        what: &'static str,
        /// What the server said.
        reason: String,
    },
    /// A value in a bucket does not decode: written by something else.
    #[error("bucket {bucket}, key {key}: {reason}")]
    Corrupt {
        /// The bucket.
        bucket: &'static str,
        /// The key.
        key: String,
        /// Why it does not decode.
        reason: String,
    },
    /// The cluster serves another fleet: this relay's fleet secret is not
    /// the one its first relay made.
    #[error("this NATS cluster serves another fleet: the fleet secret here is not its secret; \
             join with `init --cluster URL --fleet-secret-file FILE`, FILE a copy of the first relay's fleet.secret")]
    NotThisFleet,
    /// Others kept changing the same keys: the change was retried and
    /// given up.
    #[error("the registry kept changing under this write ({0} attempts); try again")]
    Contended(u32),
}

impl ClusterError {
    /// A JetStream failure while doing `what`.
    pub fn js(what: &'static str) -> impl FnOnce(String) -> Self {
        move |reason| Self::JetStream { what, reason }
    }
}

/// A connection to the fleet's NATS cluster and its buckets.
#[derive(Debug, Clone)]
pub struct Cluster {
    client: async_nats::Client,
    registry: kv::Store,
    attach: kv::Store,
    relays: kv::Store,
    relay_id: String,
}

impl Cluster {
    /// Connect to `cfg.nats` (within [`CONNECT_TIMEOUT`]) and open the
    /// fleet's buckets, creating any that is missing.
    pub async fn connect(cfg: &ClusterConfig) -> Result<Self, ClusterError> {
        let urls = cfg.nats.join(",");
        let connect_err = |reason: String| ClusterError::Connect {
            urls: urls.clone(),
            reason,
        };
        let addrs: Vec<async_nats::ServerAddr> = cfg
            .nats
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e: std::io::Error| connect_err(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let opts = async_nats::ConnectOptions::new()
            .name(format!("agent-link-relay {}", cfg.relay_id))
            .connection_timeout(CONNECT_TIMEOUT)
            // Requests carry their own timeouts (the deliver path's).
            .request_timeout(Some(Duration::from_secs(10)));
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, opts.connect(addrs))
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        let servers = 1 + client.server_info().connect_urls.len();
        let replicas = cfg
            .replicas
            .map_or_else(|| servers.clamp(1, 3), usize::from);
        let js = jetstream::new(client.clone());
        let registry = ensure_bucket(&js, REGISTRY_BUCKET, replicas, None).await?;
        let attach = ensure_bucket(&js, ATTACH_BUCKET, replicas, None).await?;
        let relays = ensure_bucket(&js, RELAYS_BUCKET, replicas, Some(PRESENCE_TTL)).await?;
        Ok(Self {
            client,
            registry,
            attach,
            relays,
            relay_id: cfg.relay_id.clone(),
        })
    }

    /// This relay's id in the fleet.
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The registry bucket.
    pub fn registry_store(&self) -> &kv::Store {
        &self.registry
    }

    /// The attach bucket.
    pub fn attach_store(&self) -> &kv::Store {
        &self.attach
    }

    /// The bucket of relays that are up.
    pub fn relays_store(&self) -> &kv::Store {
        &self.relays
    }
}

/// Open `bucket`, or create it: as a plain JetStream stream configured the
/// way a KV bucket is (one message per subject, rollups, direct gets), so
/// that servers from 2.9 on accept it (the client's own bucket creation
/// sends fields 2.9 does not know). Two relays creating it at once: the
/// loser opens the winner's.
async fn ensure_bucket(
    js: &jetstream::Context,
    bucket: &'static str,
    replicas: usize,
    max_age: Option<Duration>,
) -> Result<kv::Store, ClusterError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: max_age.unwrap_or_default(),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let created = js.create_stream(config).await;
    match js.get_key_value(bucket).await {
        Ok(store) => Ok(store),
        Err(e) => Err(ClusterError::JetStream {
            what: "opening a bucket",
            reason: match created {
                Err(c) => format!("{bucket}: {c}"),
                Ok(_) => format!("{bucket}: {e}"),
            },
        }),
    }
}

/// `s` as a KV key token: hex, so ids with dots stay one token.
pub fn token(s: &str) -> String {
    hex::encode(s.as_bytes())
}

/// The inverse of [`token`].
pub fn untoken(t: &str) -> Option<String> {
    String::from_utf8(hex::decode(t).ok()?).ok()
}

/// The subject prefix a relay takes the answers to its forwards on:
/// `<prefix>.<b>`, `b` its own number for a batch of forwards.
pub fn answer_prefix(relay_id: &str) -> String {
    format!("agentlink.relay.{relay_id}.answer")
}

/// The subject a relay serves deliveries for its attached agents on.
pub fn deliver_subject(relay_id: &str) -> String {
    format!("agentlink.relay.{relay_id}.deliver")
}
