//! `init`: make this instance's key, register it with the relay online
//! (proving fleet membership with the join token's secret, bound to this TLS
//! session), and only then write the peer directory, so a refused
//! registration leaves nothing half-written.

use std::path::Path;
use std::time::Duration;

use agent_link_crypto::{Identity, PublicKey};
use agent_link_proto::{codec, JoinToken, PeerToRelay, RelayToPeer};

use crate::config::{PeerConfig, CONFIG_FILE, KEY_FILE, SECRET_FILE};
use crate::wire::{self, FrameReader};
use crate::LinkError;

/// Initialise `dir` as instance `instance_id` of the fleet in `join`.
/// Returns the new public key.
pub async fn init(
    dir: &Path,
    instance_id: &str,
    join: &JoinToken,
    name: Option<&str>,
) -> Result<PublicKey, LinkError> {
    agent_link_proto::check_id(instance_id)
        .map_err(|e| LinkError::BadInput(format!("--instance-id: {e}")))?;
    if dir.join(CONFIG_FILE).exists() || dir.join(KEY_FILE).exists() {
        return Err(LinkError::BadInput(format!(
            "{} is already initialised; refusing to overwrite its key",
            dir.display()
        )));
    }
    let identity = Identity::generate();
    let addr = wire::resolve(&join.addr).await?;
    let endpoint = wire::endpoint(&identity, join.fingerprint, addr.is_ipv6())?;
    let conn = wire::connect(&endpoint, addr, &join.addr).await?;
    let result = register(
        &conn,
        &identity,
        instance_id,
        name.unwrap_or(instance_id),
        join,
    )
    .await;
    conn.close(0u32.into(), b"registered");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    result?;

    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| LinkError::Config(format!("{}: {e}", dir.display())))?;
    }
    identity.write_new(&dir.join(KEY_FILE))?;
    join.secret.write_new(&dir.join(SECRET_FILE))?;
    let config = PeerConfig {
        relay_url: join.addr.clone(),
        relay_fingerprint: hex::encode(join.fingerprint),
        instance_id: instance_id.to_string(),
        name: name.unwrap_or(instance_id).to_string(),
        auto_reconnect: true,
        send_timeout_secs: 30,
    };
    let json = serde_json::to_vec_pretty(&config).map_err(|e| LinkError::Other(e.to_string()))?;
    agent_link_crypto::files::write_atomic(&dir.join(CONFIG_FILE), &json, 0o644)?;
    Ok(identity.public_key())
}

async fn register(
    conn: &quinn::Connection,
    identity: &Identity,
    instance_id: &str,
    name: &str,
    join: &JoinToken,
) -> Result<(), LinkError> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(
        &mut exporter,
        agent_link_proto::REGISTER_EXPORTER_LABEL,
        b"",
    )
    .map_err(|_| LinkError::Other("TLS exporter unavailable".into()))?;
    // Bound to this TLS session and this key: a captured proof is useless
    // anywhere else.
    let proof = agent_link_proto::register_proof(
        &join.secret.key(),
        &exporter,
        &identity.public_key(),
        instance_id,
    );
    let fut = async {
        let fail = || wire::stream_failure(conn, "registration");
        let (mut send, recv) = conn.open_bi().await.map_err(|_| fail())?;
        send.write_all(&wire::frame(&PeerToRelay::Register {
            instance_id,
            name,
            proof,
        }))
        .await
        .map_err(|_| fail())?;
        let mut reader = FrameReader::new(recv);
        let body = reader.next().await.map_err(|_| fail())?;
        let _ = send.finish();
        match body {
            Some(b) => match codec::decode::<RelayToPeer>(&b)
                .map_err(|e| LinkError::Other(format!("undecodable registration reply: {e}")))?
            {
                RelayToPeer::Registered { .. } => Ok(()),
                RelayToPeer::Error { code } => Err(LinkError::Refused(code)),
                _ => Err(LinkError::Other("unexpected reply to registration".into())),
            },
            None => Err(fail()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| LinkError::Timeout("registration".into()))?
}
