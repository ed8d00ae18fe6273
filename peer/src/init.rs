//! `init`: make this instance's key, register it with the relay online
//! (proving fleet membership with the join token's secret, bound to this TLS
//! session), and only then write the peer directory, so a refused
//! registration leaves nothing half-written.

use std::path::Path;
use std::time::Duration;

use agent_link_crypto::{FleetSecret, Identity, PublicKey};
use agent_link_proto::{codec, JoinSecret, JoinToken, PeerToRelay, RelayToPeer};
use agent_link_quic::frames::{write_frame, FrameReader};

use crate::config::{PeerConfig, CONFIG_FILE, KEY_FILE, SECRET_FILE};
use crate::error::{LinkError, Phase};
use crate::transport::{self, CONNECT_TIMEOUT, FAILOVER_CONNECT_TIMEOUT};

/// Where `init --relay-ca-file` keeps its copy of the CA certificates.
pub(crate) const RELAY_CA_FILE: &str = "relay-ca.pem";

/// How long registration may take once connected.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Initialise `dir` as instance `instance_id` of the fleet in `join`.
/// Returns the new public key.
pub async fn init(
    dir: &Path,
    instance_id: &str,
    join: &JoinToken,
    name: Option<&str>,
) -> Result<PublicKey, LinkError> {
    init_with(dir, instance_id, join, name, None).await
}

/// [`init`], checking relays a CA vouches for against the PEM CA
/// certificates in `relay_ca_file` instead of the system's roots (the file
/// is copied into `dir` as `relay-ca.pem` and named in the config).
pub async fn init_with(
    dir: &Path,
    instance_id: &str,
    join: &JoinToken,
    name: Option<&str>,
    relay_ca_file: Option<&Path>,
) -> Result<PublicKey, LinkError> {
    agent_link_proto::check_id(instance_id).map_err(|e| LinkError::BadInput {
        what: "--instance-id",
        reason: e.to_string(),
    })?;
    if let Some(invited) = join.invited_id() {
        if invited != instance_id {
            return Err(LinkError::BadInput {
                what: "--instance-id",
                reason: format!(
                    "this invite is for instance {invited:?}, not {instance_id:?}: \
                     pass --instance-id {invited}, or ask for an invite for {instance_id}"
                ),
            });
        }
    }
    if dir.join(CONFIG_FILE).exists() || dir.join(KEY_FILE).exists() {
        return Err(LinkError::BadInput {
            what: "--dir",
            reason: format!(
                "{} is already initialised; refusing to overwrite its key",
                dir.display()
            ),
        });
    }
    if dir.exists() {
        // Before anything goes on the wire: refuse a directory another
        // user prepared.
        agent_link_crypto::files::check_private_dir(dir)?;
    }
    // Read (and checked) before anything goes on the wire; the copy for the
    // directory is the file's bytes.
    let (mut ca, ca_pem) = match relay_ca_file {
        Some(f) => {
            let roots = agent_link_crypto::tls::ca_roots(Some(f))?;
            let pem = std::fs::read(f).map_err(|source| LinkError::Io {
                what: "reading --relay-ca-file",
                source,
            })?;
            (transport::CaRoots::loaded(roots), Some(pem))
        }
        None => (transport::CaRoots::new(None), None),
    };
    let identity = Identity::generate();
    let fleet = register_with_fleet(
        &identity,
        instance_id,
        name.unwrap_or(instance_id),
        join,
        &mut ca,
    )
    .await?;

    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| LinkError::Io {
                what: "creating the peer directory",
                source,
            })?;
    }
    // Made here with 0700, or there already: either way only ours.
    agent_link_crypto::files::check_private_dir(dir)?;
    identity.write_new(&dir.join(KEY_FILE))?;
    fleet.write_new(&dir.join(SECRET_FILE))?;
    let mut config = PeerConfig::for_join(join, instance_id, name.unwrap_or(instance_id));
    if let Some(pem) = ca_pem {
        agent_link_crypto::files::write_atomic(&dir.join(RELAY_CA_FILE), &pem, 0o644)?;
        config.relay_ca_file = Some(RELAY_CA_FILE.into());
    }
    let json = serde_json::to_vec_pretty(&config).expect("a PeerConfig always serialises");
    agent_link_crypto::files::write_atomic(&dir.join(CONFIG_FILE), &json, 0o644)?;
    Ok(identity.public_key())
}

/// Register with the first relay the token lists that can be reached (a
/// refusal is final: the relays of a fleet share one registry); the fleet
/// secret on success.
async fn register_with_fleet(
    identity: &Identity,
    instance_id: &str,
    name: &str,
    join: &JoinToken,
    ca: &mut transport::CaRoots,
) -> Result<FleetSecret, LinkError> {
    let tls = transport::tls_identity(identity)?;
    let limit = if join.other_relays.is_empty() {
        CONNECT_TIMEOUT
    } else {
        FAILOVER_CONNECT_TIMEOUT
    };
    let mut unreachable = None;
    for (label, trust) in join.relays() {
        let addr = match transport::resolve(label).await {
            Ok(a) => a,
            Err(e) => {
                unreachable = Some(e);
                continue;
            }
        };
        let endpoint = transport::endpoint(addr.is_ipv6())?;
        let config = transport::client_config(&tls, trust, ca, false)?;
        let server_name = transport::server_name(label, trust);
        let conn =
            match transport::connect(&endpoint, &config, addr, label, &server_name, limit).await {
                Ok(c) => c,
                Err(e @ LinkError::Unreachable { .. }) => {
                    unreachable = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
        let result = register(&conn, identity, label, instance_id, name, join).await;
        conn.close(0u32.into(), b"registered");
        // Registration is durable once answered; only the close is left to
        // go out, and the relay times a silent connection out anyway.
        let _ = tokio::time::timeout(Duration::from_millis(50), endpoint.wait_idle()).await;
        return result;
    }
    Err(unreachable.expect("a join token lists a relay"))
}

/// Register over `conn` (to the relay `label`); the fleet secret on success (the open token's
/// own, or the one the relay hands an invite's holder once registered).
async fn register(
    conn: &quinn::Connection,
    identity: &Identity,
    label: &str,
    instance_id: &str,
    name: &str,
    join: &JoinToken,
) -> Result<FleetSecret, LinkError> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(
        &mut exporter,
        agent_link_proto::REGISTER_EXPORTER_LABEL,
        b"",
    )
    .expect("TLS 1.3 always has an exporter for 32 bytes");
    // Bound to this TLS session and this key: a captured proof is useless
    // anywhere else.
    match &join.secret {
        JoinSecret::Fleet(fleet) => {
            let proof = agent_link_proto::register_proof(
                &fleet.key(),
                &exporter,
                &identity.public_key(),
                instance_id,
            );
            transport::request(
                conn,
                label,
                &PeerToRelay::Register {
                    instance_id,
                    name,
                    proof,
                },
                Phase::Register,
                REGISTER_TIMEOUT,
                |f| match f {
                    RelayToPeer::Registered { .. } => Some(Ok(())),
                    _ => None,
                },
            )
            .await?;
            Ok(fleet.clone())
        }
        JoinSecret::Invite { secret, .. } => {
            let proof = agent_link_proto::invite_proof(
                &secret.key(),
                &exporter,
                &identity.public_key(),
                instance_id,
            );
            let req = PeerToRelay::RegisterInvite {
                instance_id,
                name,
                proof,
            };
            tokio::time::timeout(REGISTER_TIMEOUT, redeem(conn, label, &req))
                .await
                .map_err(|_| LinkError::Timeout(Phase::Register))?
        }
    }
}

/// `RegisterInvite`, answered by `FleetSecret` then `Registered`.
async fn redeem(
    conn: &quinn::Connection,
    label: &str,
    req: &PeerToRelay<'_>,
) -> Result<FleetSecret, LinkError> {
    let broke = |_| transport::stream_failure(conn, label, Phase::Register);
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|_| transport::stream_failure(conn, label, Phase::Register))?;
    write_frame(&mut send, req).await.map_err(broke)?;
    let mut reader = FrameReader::new(recv, 1024);
    let mut fleet = None;
    loop {
        let body = match reader.next().await {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                return Err(transport::stream_failure(conn, label, Phase::Register))
            }
        };
        match codec::decode::<RelayToPeer>(&body) {
            Ok(RelayToPeer::FleetSecret { secret, .. }) if fleet.is_none() => {
                fleet = Some(FleetSecret::from_bytes(secret));
            }
            Ok(RelayToPeer::Registered { .. }) => {
                let _ = send.finish();
                return fleet.ok_or(LinkError::Protocol(Phase::Register));
            }
            Ok(RelayToPeer::Error { code }) => return Err(LinkError::Refused(code)),
            _ => return Err(LinkError::Protocol(Phase::Register)),
        }
    }
}

/// Pin `key` for `instance_id` in the peer directory `dir` before first
/// contact (`agent-link trust`): messages from that instance under any
/// other key are then refused with `KeyChanged`. `Ok(true)` when newly
/// pinned, `Ok(false)` when that very key was pinned already; an instance
/// pinned to another key is `Refused(KeyChanged)` (remove its entry from
/// `known_instances.json` to re-pin on purpose).
pub fn trust(dir: &Path, instance_id: &str, key: &PublicKey) -> Result<bool, LinkError> {
    agent_link_proto::check_id(instance_id).map_err(|e| LinkError::BadInput {
        what: "INSTANCE",
        reason: e.to_string(),
    })?;
    PeerConfig::load(dir)?;
    let path = dir.join(crate::config::PINS_FILE);
    let mut pins = crate::pins::Pins::load(path.clone())
        .map_err(|reason| LinkError::config(path.clone(), None, reason))?;
    let known = pins.check(instance_id, key) == crate::pins::PinCheck::Known;
    match pins
        .pin(instance_id, key)
        .map_err(|reason| LinkError::config(path, None, reason))?
    {
        crate::pins::PinCheck::Known => Ok(!known),
        _ => Err(LinkError::Refused(agent_link_proto::ErrorCode::KeyChanged)),
    }
}
