//! The relay's state directory: configuration, TLS identity, fleet secret
//! and registry, created once by `init` and loaded at every start.
//!
//! ```text
//! DIR/relay-config.json   limits and listen address (no secrets)
//! DIR/relay.key           Ed25519 key of the relay's certificate (0600)
//! DIR/relay.crt           its self-signed certificate, DER
//! DIR/fleet.secret        32-byte fleet secret, hex (0600)
//! DIR/fleet.previous      after `rotate-secret`: the secret it replaced and
//!                         until when it is accepted, `HEX UNTIL_MS` (0600)
//! DIR/registry.json       registered instances (ids, names, public keys)
//! DIR/admin.sock          local admin socket while the relay runs (0600)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use agent_link_crypto::tls::{CaIssued, TlsIdentity};
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::{JoinSecret, JoinToken, RelayEndpoint};

use crate::cluster::{Cluster, ClusterError};
use crate::config::{ClusterConfig, ConfigError, RelayConfig};
use crate::registry::{Registry, RegistryStore, StoreError};

/// File names inside the state directory.
pub const CONFIG_FILE: &str = "relay-config.json";
const KEY_FILE: &str = "relay.key";
const CERT_FILE: &str = "relay.crt";
pub(crate) const SECRET_FILE: &str = "fleet.secret";
pub(crate) const PREVIOUS_FILE: &str = "fleet.previous";

/// Errors loading or creating the state directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// `init` found existing state.
    #[error("{0} is already initialised; refusing to overwrite it")]
    AlreadyInitialised(String),
    /// The directory holds other files and no relay state.
    #[error("{0} is not empty and holds no relay state; choose an empty directory")]
    NotEmpty(String),
    /// The directory has no relay state.
    #[error("{0} is not initialised; run `agent-link-relay init --dir {0}` first")]
    NotInitialised(String),
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Key, secret or certificate problem.
    #[error(transparent)]
    Crypto(#[from] agent_link_crypto::CryptoError),
    /// Registry problem.
    #[error(transparent)]
    Registry(#[from] StoreError),
    /// The fleet's NATS cluster refused or could not be reached.
    #[error(transparent)]
    Cluster(RegistryAccessError),
    /// `rotate-secret` on a relay of a fleet.
    #[error(
        "rotating the fleet secret of a fleet of relays is not supported yet: every relay \
             and the fleet's mark in NATS would have to change together"
    )]
    FleetRotation,
    /// Other file-system error.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Everything the relay loads from its directory.
#[derive(Debug)]
pub struct RelayState {
    /// The directory.
    pub dir: PathBuf,
    /// Validated configuration.
    pub config: RelayConfig,
    /// Certificate and key.
    pub tls: TlsIdentity,
    /// The CA-issued chain the config's `tls` names, presented instead of
    /// `tls`'s certificate.
    pub ca_issued: Option<CaIssued>,
    /// Fleet secret.
    pub fleet: FleetSecret,
    /// The secret the last rotation replaced, and until when (Unix ms) it
    /// is still accepted.
    pub previous: Option<(FleetSecret, u64)>,
    /// Key of QUIC stateless resets, derived from the relay's key so that it
    /// is the same after a restart (see `server::endpoint`).
    pub(crate) reset_key: ring::hmac::Key,
    /// Key of the connection-id hash, also stable across restarts: a new
    /// process must recognise the old process's connection ids as its own,
    /// or it drops their packets instead of answering with a reset.
    pub(crate) cid_key: u64,
}

/// A relay that crashed and came back on the same address has lost every
/// connection; with the same reset key as before, it answers the peers'
/// packets with stateless resets they can check and they reconnect at once,
/// instead of waiting out the idle timeout. Derived from the relay's private
/// key: only this relay can make resets (a fleet member, who knows the fleet
/// secret, cannot forge one to cut other members off).
fn cid_key(identity: &Identity) -> u64 {
    let secret = identity.derive_secret("quic connection id hash");
    let mut k = [0u8; 8];
    k.copy_from_slice(&secret[..8]);
    u64::from_le_bytes(k)
}

fn reset_key(identity: &Identity) -> ring::hmac::Key {
    let secret = identity.derive_secret("quic stateless reset");
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// True when `dir` holds relay state.
pub fn is_initialised(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).exists()
}

/// True when `dir` is missing or empty.
pub fn is_empty(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => !dir.exists(),
    }
}

/// Create relay state in `dir` (missing or empty). The configuration file is
/// written last: a directory without it is not initialised.
pub fn init(dir: &Path, listen: Option<SocketAddr>) -> Result<RelayState, StateError> {
    init_with(
        dir,
        InitOptions {
            listen,
            ..InitOptions::default()
        },
    )
    .map(|(st, _)| st)
}

/// What `init` sets up besides the defaults.
#[derive(Debug, Default)]
pub struct InitOptions {
    /// The listen address.
    pub listen: Option<SocketAddr>,
    /// Serve in a fleet on these NATS servers.
    pub cluster: Option<ClusterInit>,
    /// The fleet secret to take (a joining relay: a copy of the first
    /// relay's `fleet.secret`); absent, a new one.
    pub fleet_secret: Option<FleetSecret>,
    /// Present this CA-issued chain (PEM files; written into the config
    /// as absolute paths) instead of the pinned self-signed certificate.
    pub tls: Option<crate::config::TlsConfig>,
}

/// `init --cluster`: the config's `cluster` section.
#[derive(Debug, Clone)]
pub struct ClusterInit {
    /// NATS servers, `nats://HOST:PORT`.
    pub nats: Vec<String>,
    /// This relay's id in the fleet; absent, `relay-` and 8 hex digits of
    /// its key.
    pub relay_id: Option<String>,
    /// The address peers dial for it; absent, its listen address.
    pub advertise: Option<String>,
}

/// [`init`] with options: with `cluster`, the fleet is founded (no fleet
/// secret given, a cluster that has no fleet yet) or joined (the given
/// secret is the cluster's fleet's) before anything stays written; the
/// answer says which.
pub fn init_with(
    dir: &Path,
    opts: InitOptions,
) -> Result<(RelayState, Option<crate::cluster::membership::Claim>), StateError> {
    if is_initialised(dir) || dir.join(KEY_FILE).exists() {
        return Err(StateError::AlreadyInitialised(dir.display().to_string()));
    }
    if !is_empty(dir) {
        return Err(StateError::NotEmpty(dir.display().to_string()));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    // Made here with 0700, or there already (empty): either way only ours.
    agent_link_crypto::files::check_private_dir(dir)?;
    let mut config = RelayConfig::default();
    if let Some(l) = opts.listen {
        config.listen = l;
    }
    // Read before anything is written: a chain that does not load, or a
    // key that is not its certificate's, is refused now.
    let ca_issued = match opts.tls {
        None => None,
        Some(t) => {
            let issued = CaIssued::from_pem_files(Path::new(&t.cert_chain), Path::new(&t.key))?;
            let absolute = |p: &str| {
                std::path::absolute(p).map_or_else(|_| p.to_string(), |a| a.display().to_string())
            };
            config.tls = Some(crate::config::TlsConfig {
                cert_chain: absolute(&t.cert_chain),
                key: absolute(&t.key),
            });
            Some(issued)
        }
    };
    let identity = Identity::generate();
    if let Some(c) = opts.cluster {
        let fp = identity.public_key();
        config.cluster = Some(ClusterConfig {
            nats: c.nats,
            relay_id: c
                .relay_id
                .unwrap_or_else(|| format!("relay-{}", &hex::encode(fp.as_bytes())[..8])),
            replicas: None,
            advertise: c.advertise,
        });
    }
    config.validate(&dir.join(CONFIG_FILE).display().to_string())?;
    let fleet = opts.fleet_secret.unwrap_or_else(FleetSecret::generate);
    let written = write_state(dir, &config, &identity, &fleet);
    // In a fleet: claim or check the cluster's fleet last, so that a
    // founding relay never marks a cluster with a secret it failed to
    // keep; refused, the directory is emptied again (it was empty).
    let claim = written.and_then(|tls| {
        let claim = match &config.cluster {
            None => None,
            Some(c) => {
                let fleet = fleet.clone();
                Some(
                    on_cluster(c, |cl| async move {
                        crate::cluster::membership::claim(cl.registry_store(), &fleet).await
                    })
                    .map_err(StateError::Cluster)?,
                )
            }
        };
        Ok((tls, claim))
    });
    let (tls, claim) = match claim {
        Ok(v) => v,
        Err(e) => {
            empty_dir(dir);
            return Err(e);
        }
    };
    Ok((
        RelayState {
            dir: dir.to_path_buf(),
            config,
            tls,
            ca_issued,
            fleet,
            previous: None,
            reset_key: reset_key(&identity),
            cid_key: cid_key(&identity),
        },
        claim,
    ))
}

/// Write a new relay's files, the configuration last.
fn write_state(
    dir: &Path,
    config: &RelayConfig,
    identity: &Identity,
    fleet: &FleetSecret,
) -> Result<TlsIdentity, StateError> {
    let tls = TlsIdentity::self_signed(identity, agent_link_crypto::tls::RELAY_SERVER_NAME)?;
    identity.write_new(&dir.join(KEY_FILE))?;
    agent_link_crypto::files::write_atomic(&dir.join(CERT_FILE), tls.cert.as_ref(), 0o644)?;
    fleet.write_new(&dir.join(SECRET_FILE))?;
    RegistryStore::new(dir)
        .update(|_| Ok::<(), std::convert::Infallible>(()))?
        .ok();
    let json = serde_json::to_vec_pretty(config).map_err(|e| StateError::Io {
        path: dir.join(CONFIG_FILE).display().to_string(),
        source: std::io::Error::other(e),
    })?;
    agent_link_crypto::files::write_atomic(&dir.join(CONFIG_FILE), &json, 0o644)?;
    Ok(tls)
}

/// Remove what a failed `init` wrote into `dir` (which was empty).
fn empty_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Load existing state, validating everything.
pub fn load(dir: &Path) -> Result<RelayState, StateError> {
    if !is_initialised(dir) {
        return Err(StateError::NotInitialised(dir.display().to_string()));
    }
    agent_link_crypto::files::check_private_dir(dir)?;
    let config = RelayConfig::load(&dir.join(CONFIG_FILE))?;
    let identity = Identity::read(&dir.join(KEY_FILE))?;
    let cert_path = dir.join(CERT_FILE);
    let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
    let tls = TlsIdentity::from_parts(&identity, cert).map_err(|e| StateError::Io {
        path: cert_path.display().to_string(),
        source: std::io::Error::other(e),
    })?;
    let (fleet, previous) = read_fleet(dir)?;
    RegistryStore::new(dir).load()?;
    let ca_issued = match &config.tls {
        None => None,
        Some(t) => Some(CaIssued::from_pem_files(
            &dir.join(&t.cert_chain),
            &dir.join(&t.key),
        )?),
    };
    Ok(RelayState {
        dir: dir.to_path_buf(),
        config,
        tls,
        ca_issued,
        fleet,
        previous,
        reset_key: reset_key(&identity),
        cid_key: cid_key(&identity),
    })
}

impl RelayState {
    /// The open fleet token for instances dialling `addr`: it carries the
    /// fleet secret and registers any free id, so a relay accepts it only
    /// with `open_registration` on (`invite --reusable`). In a fleet it
    /// lists the relays that are up besides this one.
    pub fn open_token(&self, addr: &str) -> Result<JoinToken, RegistryAccessError> {
        self.token(addr, JoinSecret::Fleet(self.fleet.clone()))
    }

    /// Make a single-use invite for `instance_id`, valid for `valid_for`,
    /// recorded durably in the registry (a running relay reads it from
    /// there), and return its join token for instances dialling `addr`
    /// (in a fleet, and the other relays that are up).
    pub fn invite(
        &self,
        addr: &str,
        instance_id: &str,
        valid_for: std::time::Duration,
    ) -> Result<JoinToken, InviteStateError> {
        let secret = FleetSecret::generate();
        let now = agent_link_proto::clock::unix_ms(std::time::SystemTime::now());
        let expires = now.saturating_add(u64::try_from(valid_for.as_millis()).unwrap_or(u64::MAX));
        let hex = hex::encode(secret.expose());
        self.update_registry(|r| r.add_invite(instance_id, hex.clone(), expires, now))?
            .map_err(InviteStateError::Refused)?;
        let secret = JoinSecret::Invite {
            instance_id: instance_id.to_string(),
            secret,
        };
        Ok(self.token(addr, secret)?)
    }

    /// A token for `secret`: this relay at `addr`, and in a fleet the
    /// relays that are up ([`crate::cluster::presence::token_relays`]).
    /// How peers know this relay: a CA vouches for it (config `tls`), or
    /// its own certificate's pin.
    pub fn trust(&self) -> agent_link_proto::RelayTrust {
        match self.ca_issued {
            Some(_) => agent_link_proto::RelayTrust::Ca,
            None => agent_link_proto::RelayTrust::Pinned(self.tls.fingerprint()),
        }
    }

    fn token(&self, addr: &str, secret: JoinSecret) -> Result<JoinToken, RegistryAccessError> {
        let own = RelayEndpoint {
            addr: addr.to_string(),
            trust: self.trust(),
        };
        let (first, other_relays) = match &self.config.cluster {
            None => (own, Vec::new()),
            Some(cluster) => {
                let up = on_cluster(cluster, |c| async move {
                    crate::cluster::presence::relays_up(c.relays_store()).await
                })?;
                crate::cluster::presence::token_relays(&cluster.relay_id, own, up)
            }
        };
        Ok(JoinToken {
            addr: first.addr,
            trust: first.trust,
            secret,
            other_relays,
        })
    }

    /// The address a token names this relay by unless told otherwise: in
    /// a fleet its `advertise` address, else the listen address (loopback
    /// for an unspecified one); `None` for a listen port of 0.
    pub fn default_dial_addr(&self) -> Option<String> {
        let advertised = self
            .config
            .cluster
            .as_ref()
            .is_some_and(|c| c.advertise.is_some());
        (advertised || self.config.listen.port() != 0)
            .then(|| advertise_addr(&self.config, self.config.listen))
    }
}

/// Why an operator's command could not read or change the registry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryAccessError {
    /// The relay's own registry file.
    #[error(transparent)]
    File(#[from] StoreError),
    /// The fleet's registry bucket (the config has `cluster`).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The runtime the NATS client runs on could not start.
    #[error("starting the NATS client: {0}")]
    Runtime(std::io::Error),
}

impl RelayState {
    /// Apply `change` to the registry this relay serves: its own file, or
    /// with `cluster` in the config the fleet's bucket, so that `register`,
    /// `revoke` and `invite` run from any relay's directory change the one
    /// registry of the fleet. `change` may run more than once against the
    /// bucket (once per attempt that met someone else's write); it must
    /// only change the registry it is given.
    pub fn update_registry<T, E>(
        &self,
        change: impl FnMut(&mut Registry) -> Result<T, E>,
    ) -> Result<Result<(T, Registry), E>, RegistryAccessError> {
        let Some(cluster) = &self.config.cluster else {
            return Ok(RegistryStore::new(&self.dir).update(change)?);
        };
        on_cluster(cluster, |c| async move {
            let out = crate::cluster::registry::update(c.registry_store(), None, change).await?;
            Ok(out.map(|(t, replica)| (t, replica.registry)))
        })
    }

    /// The registry this relay serves, as it stands now (see
    /// [`RelayState::update_registry`]).
    pub fn load_registry(&self) -> Result<Registry, RegistryAccessError> {
        let Some(cluster) = &self.config.cluster else {
            return Ok(RegistryStore::new(&self.dir).load()?);
        };
        on_cluster(cluster, |c| async move {
            Ok(crate::cluster::registry::load(c.registry_store())
                .await?
                .0
                .registry)
        })
    }
}

/// Connect to the fleet's cluster and run `f` on it, on a runtime of its
/// own (the operator's commands are not async).
fn on_cluster<T, F>(
    cfg: &ClusterConfig,
    f: impl FnOnce(Cluster) -> F,
) -> Result<T, RegistryAccessError>
where
    F: std::future::Future<Output = Result<T, ClusterError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RegistryAccessError::Runtime)?;
    rt.block_on(async {
        let cluster = Cluster::connect(cfg).await?;
        Ok(f(cluster).await?)
    })
}

/// Why `invite` made no invite.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InviteStateError {
    /// The registry could not be read or written.
    #[error(transparent)]
    Store(#[from] RegistryAccessError),
    /// The id cannot be invited (registered, revoked, invalid).
    #[error(transparent)]
    Refused(crate::registry::InviteError),
}

/// The fleet secret in force in `dir`, and the one the last rotation
/// replaced with its deadline.
pub(crate) fn read_fleet(
    dir: &Path,
) -> Result<(FleetSecret, Option<(FleetSecret, u64)>), StateError> {
    let fleet = FleetSecret::read(&dir.join(SECRET_FILE))?;
    let previous = agent_link_crypto::read_previous(&dir.join(PREVIOUS_FILE))?;
    Ok((fleet, previous))
}

/// `rotate-secret`: a new fleet secret for `dir`; the one it replaces stays
/// accepted for `grace`, so members that are offline now or have not heard
/// yet are not cut off. A running relay notices within a second and pushes
/// the new secret to every registered, unrevoked member's connections (a
/// revoked member never learns it). Rotating again before the grace period
/// ends drops the older secret at once. Returns the new deadline.
pub fn rotate_secret(dir: &Path, grace: std::time::Duration) -> Result<u64, StateError> {
    if !is_initialised(dir) {
        return Err(StateError::NotInitialised(dir.display().to_string()));
    }
    if RelayConfig::load(&dir.join(CONFIG_FILE))?.cluster.is_some() {
        return Err(StateError::FleetRotation);
    }
    agent_link_crypto::files::check_private_dir(dir)?;
    let old = FleetSecret::read(&dir.join(SECRET_FILE))?;
    let now = agent_link_proto::clock::unix_ms(std::time::SystemTime::now());
    let until = now.saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
    // The old secret goes to `fleet.previous` first: a crash between the
    // two writes leaves the old secret in force and also in grace, which
    // is harmless; the other order could lose it while members still use
    // it.
    agent_link_crypto::write_previous(&dir.join(PREVIOUS_FILE), &old, until)?;
    FleetSecret::generate().write_replace(&dir.join(SECRET_FILE))?;
    Ok(until)
}

/// The address to put in a join token for a relay listening on `listen`:
/// an unspecified address (0.0.0.0) is replaced by loopback, since no
/// instance can dial it; operators pass `invite --addr` for public names.
pub fn dial_addr(listen: SocketAddr) -> String {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a.to_string()
}

/// The address peers dial for a relay of `config` bound at `bound`: in a
/// fleet its `advertise` address when set, else [`dial_addr`] of `bound`.
pub fn advertise_addr(config: &RelayConfig, bound: SocketAddr) -> String {
    config
        .cluster
        .as_ref()
        .and_then(|c| c.advertise.clone())
        .unwrap_or_else(|| dial_addr(bound))
}

/// The default state directory: `$XDG_DATA_HOME/agent-link-relay`, else
/// `~/.local/share/agent-link-relay`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("agent-link-relay");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/agent-link-relay")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_and_refuse_overwrite() {
        let dir = std::env::temp_dir().join(format!("al-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = init(&dir, Some("127.0.0.1:0".parse().unwrap())).unwrap();
        let l = load(&dir).unwrap();
        assert_eq!(s.tls.fingerprint(), l.tls.fingerprint());
        assert_eq!(l.config.listen.port(), 0);
        assert!(matches!(
            init(&dir, None),
            Err(StateError::AlreadyInitialised(_))
        ));
        let tok = l.open_token("127.0.0.1:8765").unwrap().encode().unwrap();
        assert_eq!(
            JoinToken::parse(&tok).unwrap().pinned(),
            Some(s.tls.fingerprint())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dial_addr_replaces_unspecified() {
        assert_eq!(dial_addr("0.0.0.0:8765".parse().unwrap()), "127.0.0.1:8765");
        assert_eq!(dial_addr("10.1.2.3:9".parse().unwrap()), "10.1.2.3:9");
    }
}
