//! The registration proof (PROTOCOL.md §5.3): the fleet tag over the TLS
//! session's exporter ([`crate::REGISTER_EXPORTER_LABEL`]), the instance's
//! public key and the instance id. Bound to the session and the key, so a
//! captured proof can neither register another key nor be replayed on
//! another connection. One definition for the peer, the relay, the bench and
//! the tests.

use agent_link_crypto::{CryptoError, Domain, FleetKey, PublicKey, Tag};

/// What every registration proof binds, in order: the session, the key,
/// the id.
fn bound<'a>(exporter: &'a [u8; 32], key: &'a PublicKey, instance_id: &'a str) -> [&'a [u8]; 3] {
    [exporter, key.as_bytes(), instance_id.as_bytes()]
}

/// The proof that `key` may register as `instance_id` on the TLS session
/// whose exporter output is `exporter`.
pub fn register_proof(
    fleet: &FleetKey,
    exporter: &[u8; 32],
    key: &PublicKey,
    instance_id: &str,
) -> Tag {
    fleet.tag(Domain::RegisterProof, &bound(exporter, key, instance_id))
}

/// Check a registration proof (constant time).
pub fn check_register_proof(
    fleet: &FleetKey,
    exporter: &[u8; 32],
    key: &PublicKey,
    instance_id: &str,
    proof: &[u8],
) -> Result<(), CryptoError> {
    fleet.check(
        Domain::RegisterProof,
        &bound(exporter, key, instance_id),
        proof,
    )
}

/// The proof that `key` may register as `instance_id` with the single-use
/// invite whose secret is `invite` (PROTOCOL.md §5.3), on the TLS session
/// whose exporter output is `exporter`. Keyed by the invite's own secret:
/// holding the fleet secret is not enough to register under an invite's id.
pub fn invite_proof(
    invite: &FleetKey,
    exporter: &[u8; 32],
    key: &PublicKey,
    instance_id: &str,
) -> Tag {
    invite.tag(Domain::InviteProof, &bound(exporter, key, instance_id))
}

/// Check an invite proof (constant time).
pub fn check_invite_proof(
    invite: &FleetKey,
    exporter: &[u8; 32],
    key: &PublicKey,
    instance_id: &str,
    proof: &[u8],
) -> Result<(), CryptoError> {
    invite.check(
        Domain::InviteProof,
        &bound(exporter, key, instance_id),
        proof,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::{FleetSecret, Identity};

    #[test]
    fn a_proof_checks_only_for_its_session_key_and_id() {
        let fleet = FleetSecret::generate().key();
        let key = Identity::generate().public_key();
        let other = Identity::generate().public_key();
        let p = register_proof(&fleet, &[7; 32], &key, "i1");
        assert!(check_register_proof(&fleet, &[7; 32], &key, "i1", &p).is_ok());
        assert!(check_register_proof(&fleet, &[8; 32], &key, "i1", &p).is_err());
        assert!(check_register_proof(&fleet, &[7; 32], &other, "i1", &p).is_err());
        assert!(check_register_proof(&fleet, &[7; 32], &key, "i2", &p).is_err());
        let stranger = FleetSecret::generate().key();
        assert!(check_register_proof(&stranger, &[7; 32], &key, "i1", &p).is_err());
    }

    #[test]
    fn an_invite_proof_is_not_a_fleet_proof_and_binds_the_same_things() {
        let invite = FleetSecret::generate().key();
        let key = Identity::generate().public_key();
        let p = invite_proof(&invite, &[7; 32], &key, "i1");
        assert!(check_invite_proof(&invite, &[7; 32], &key, "i1", &p).is_ok());
        assert!(check_invite_proof(&invite, &[8; 32], &key, "i1", &p).is_err());
        assert!(check_invite_proof(&invite, &[7; 32], &key, "i2", &p).is_err());
        // The same secret under the other domain does not verify.
        assert!(check_register_proof(&invite, &[7; 32], &key, "i1", &p).is_err());
    }
}
