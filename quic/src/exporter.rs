//! The registration exporter (PROTOCOL.md §5.3): 32 bytes from the TLS
//! session, under [`REGISTER_EXPORTER_LABEL`] with an empty context. The
//! registration proof is a fleet tag over it, so a proof captured on one
//! connection is worthless on any other. Both ends compute it: the
//! registering client to make the proof, the relay to check it.

use agent_link_crypto::{FleetKey, PublicKey, Tag};
use agent_link_proto::REGISTER_EXPORTER_LABEL;

/// The TLS session could not export keying material. quinn refuses only
/// output lengths its TLS library cannot produce (32 bytes is far below
/// TLS 1.3's limit), so this points at a quinn or rustls that behaves
/// differently from the versions this workspace pins: check `Cargo.lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the TLS session cannot export keying material for the registration proof (quinn or rustls version mismatch?)")]
pub struct ExporterUnavailable;

/// The registration exporter of `conn`'s TLS session.
pub fn register_exporter(conn: &quinn::Connection) -> Result<[u8; 32], ExporterUnavailable> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, REGISTER_EXPORTER_LABEL, b"")
        .map_err(|_| ExporterUnavailable)?;
    Ok(out)
}

/// The proof that `key` may register as `instance_id` on `conn` (what
/// `agent-link init` sends in `Register`): the fleet tag over this
/// session's exporter, the key and the id.
pub fn register_proof(
    conn: &quinn::Connection,
    fleet: &FleetKey,
    key: &PublicKey,
    instance_id: &str,
) -> Result<Tag, ExporterUnavailable> {
    let exporter = register_exporter(conn)?;
    Ok(agent_link_proto::register_proof(
        fleet,
        &exporter,
        key,
        instance_id,
    ))
}
