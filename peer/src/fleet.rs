//! The fleet secret this instance holds, and its replacement when the relay
//! pushes a rotated one (PROTOCOL.md §9.7): the relay opens a
//! unidirectional stream on every registered connection carrying one
//! `FleetSecret` frame, at connect and after each rotation. Messages are
//! sealed with the current secret; deliveries are checked under it or,
//! during the rotation's grace period, the one it replaced. The new secret
//! is written to the peer directory (`fleet.secret`, and the old one with
//! its deadline to `fleet.previous`, both 0600) so the next process has it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use agent_link_crypto::{FleetKey, FleetKeys, FleetSecret};
use agent_link_proto::{codec, RelayToPeer};
use agent_link_quic::frames::FrameReader;
use tracing::{debug, info, warn};

use crate::config::SECRET_FILE;
use crate::error::LinkError;

/// Beside `fleet.secret`: the secret a rotation replaced, `HEX UNTIL_MS`.
pub(crate) const PREVIOUS_FILE: &str = "fleet.previous";

/// The fleet secret in force for one link, shared by its agents.
pub(crate) struct FleetRing {
    ring: RwLock<Ring>,
    /// Bumped by every change, so agents refresh their receivers' keys.
    generation: AtomicU64,
    dir: PathBuf,
}

struct Ring {
    keys: FleetKeys,
    current: FleetSecret,
    previous: Option<FleetSecret>,
}

impl std::fmt::Debug for FleetRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetRing(<redacted>)")
    }
}

impl FleetRing {
    /// The secrets in the peer directory `dir`.
    pub(crate) fn load(dir: &Path) -> Result<Self, LinkError> {
        let current = FleetSecret::read(&dir.join(SECRET_FILE))?;
        let previous = agent_link_crypto::read_previous(&dir.join(PREVIOUS_FILE))?;
        let keys = FleetKeys::from_secrets(&current, previous.as_ref());
        Ok(Self {
            ring: RwLock::new(Ring {
                keys,
                current,
                previous: previous.map(|p| p.0),
            }),
            generation: AtomicU64::new(0),
            dir: dir.to_path_buf(),
        })
    }

    /// Run `f` with the key to seal with (under the read lock: no copy of
    /// the keyed HMAC state per message).
    pub(crate) fn with_current<R>(&self, f: impl FnOnce(&FleetKey) -> R) -> R {
        f(self.read().keys.current())
    }

    /// The keys deliveries are checked under.
    pub(crate) fn keys(&self) -> FleetKeys {
        self.read().keys.clone()
    }

    /// Changes so far.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A secret the relay sent. `Some((new, old, until))` when it replaces
    /// the current one (to be persisted); `None` when it is the current one
    /// or the one just replaced (two pushes that crossed: never go back).
    pub(crate) fn offer(
        &self,
        secret: [u8; 32],
        previous_until_ms: u64,
    ) -> Option<(FleetSecret, FleetSecret, u64)> {
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        if *ring.current.expose() == secret
            || ring
                .previous
                .as_ref()
                .is_some_and(|p| *p.expose() == secret)
        {
            return None;
        }
        let new = FleetSecret::from_bytes(secret);
        let old = std::mem::replace(&mut ring.current, new.clone());
        ring.keys = FleetKeys::with_previous(new.key(), old.key(), previous_until_ms);
        ring.previous = Some(old.clone());
        self.generation.fetch_add(1, Ordering::Release);
        Some((new, old, previous_until_ms))
    }

    /// Write an accepted rotation to the peer directory (blocking): the old
    /// secret first, so a crash between the writes leaves the old secret in
    /// force (the relay pushes the new one again at the next connect).
    fn persist(&self, new: &FleetSecret, old: &FleetSecret, until: u64) -> Result<(), LinkError> {
        agent_link_crypto::write_previous(&self.dir.join(PREVIOUS_FILE), old, until)?;
        new.write_replace(&self.dir.join(SECRET_FILE))?;
        Ok(())
    }
}

/// Take `FleetSecret` pushes on `conn` until it closes. Each arrives on its
/// own unidirectional stream, read one at a time in the order the relay
/// opened them.
pub(crate) async fn take_pushes(conn: quinn::Connection, ring: Arc<FleetRing>) {
    while let Ok(recv) = conn.accept_uni().await {
        let mut reader = FrameReader::new(recv, 1024);
        let body = match reader.next().await {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => continue,
        };
        let Ok(RelayToPeer::FleetSecret {
            secret,
            previous_valid_until_ms,
        }) = codec::decode::<RelayToPeer>(&body)
        else {
            debug!("ignored a unidirectional stream that is not a fleet secret");
            continue;
        };
        let Some((new, old, until)) = ring.offer(secret, previous_valid_until_ms) else {
            continue;
        };
        info!("the relay rotated the fleet secret; using the new one");
        let r = ring.clone();
        match tokio::task::spawn_blocking(move || r.persist(&new, &old, until)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("the new fleet secret is in use but was not saved: {e}"),
            Err(e) => warn!("the new fleet secret is in use but was not saved: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_replaces_the_secret_once_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (FleetSecret::generate(), FleetSecret::generate());
        a.write_new(&dir.path().join(SECRET_FILE)).unwrap();
        let ring = FleetRing::load(dir.path()).unwrap();
        assert!(ring.offer(*a.expose(), 0).is_none(), "the current one");
        let (new, old, until) = ring.offer(*b.expose(), 77).unwrap();
        assert_eq!(
            (new.expose(), old.expose(), until),
            (b.expose(), a.expose(), 77)
        );
        assert_eq!(ring.generation(), 1);
        assert!(
            ring.offer(*a.expose(), 0).is_none(),
            "crossed pushes: not back"
        );
        ring.persist(&new, &old, until).unwrap();
        let again = FleetRing::load(dir.path()).unwrap();
        assert_eq!(again.read().current.expose(), b.expose());
        assert_eq!(again.keys().previous_until_ms(), 77);
    }
}
