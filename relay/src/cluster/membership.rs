//! Which fleet a NATS cluster serves: the registry bucket holds
//! [`FLEET_CHECK_KEY`], an HMAC of nothing under the fleet key, written by
//! the relay that founded the fleet. A relay joining checks its fleet secret
//! against it, and a relay starts only with the secret of the fleet it
//! serves: two fleet secrets on one registry would split the fleet without
//! anyone noticing (each relay's members failing the others' tag checks).

use agent_link_crypto::{Domain, FleetSecret};
use async_nats::jetstream::kv;
use bytes::Bytes;

use super::{ClusterError, REGISTRY_BUCKET};

/// The key of the fleet's mark in [`REGISTRY_BUCKET`].
pub const FLEET_CHECK_KEY: &str = "fleet.check";

/// What [`claim`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The cluster had no fleet: this secret's is its fleet now.
    Founded,
    /// The cluster serves this secret's fleet.
    Member,
}

fn mark(fleet: &FleetSecret) -> Bytes {
    Bytes::from(hex::encode(fleet.key().tag(Domain::FleetCheck, &[])))
}

/// Make `fleet` the fleet of the cluster behind `store` if it has none, or
/// check that it is. `Err(NotThisFleet)` when the cluster serves another.
pub async fn claim(store: &kv::Store, fleet: &FleetSecret) -> Result<Claim, ClusterError> {
    // Two relays founding at once: the create of one wins, the other reads
    // the winner's mark on the next turn (and is refused by it).
    for _ in 0..3 {
        match store
            .get(FLEET_CHECK_KEY)
            .await
            .map_err(|e| ClusterError::js("reading the fleet's mark")(e.to_string()))?
        {
            Some(v) => return check(fleet, &v).map(|()| Claim::Member),
            None => {
                if store.create(FLEET_CHECK_KEY, mark(fleet)).await.is_ok() {
                    return Ok(Claim::Founded);
                }
            }
        }
    }
    Err(ClusterError::Contended(3))
}

/// Check `fleet` against the cluster's mark; a cluster without one (its
/// fleet predates marks) takes this relay's.
pub async fn verify(store: &kv::Store, fleet: &FleetSecret) -> Result<(), ClusterError> {
    claim(store, fleet).await.map(|_| ())
}

fn check(fleet: &FleetSecret, value: &[u8]) -> Result<(), ClusterError> {
    let tag = hex::decode(value).map_err(|_| ClusterError::Corrupt {
        bucket: REGISTRY_BUCKET,
        key: FLEET_CHECK_KEY.into(),
        reason: "not hex".into(),
    })?;
    // Constant time: the mark is readable by NATS users, the secret is not.
    fleet
        .key()
        .check(Domain::FleetCheck, &[], &tag)
        .map_err(|_| ClusterError::NotThisFleet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_checks_its_own_secret_only() {
        let a = FleetSecret::from_bytes([1; 32]);
        let b = FleetSecret::from_bytes([2; 32]);
        check(&a, &mark(&a)).unwrap();
        assert!(matches!(
            check(&b, &mark(&a)),
            Err(ClusterError::NotThisFleet)
        ));
        assert!(matches!(
            check(&a, b"zz"),
            Err(ClusterError::Corrupt { .. })
        ));
        assert!(!String::from_utf8_lossy(&mark(&a)).contains(&hex::encode([1u8; 32])));
    }
}
