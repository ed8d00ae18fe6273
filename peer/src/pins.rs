//! Pinned public keys of other instances (trust on first use). The relay
//! tells a receiver which key a sender authenticated with; the first key
//! seen for an instance is pinned in `known_instances.json`, and a different
//! key later is refused (`KeyChanged`): a relay that turns hostile cannot
//! swap a member's key without receivers noticing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agent_link_crypto::PublicKey;

/// Outcome of presenting a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinCheck {
    /// Matches the pinned key.
    Known,
    /// First sighting: now pinned.
    Pinned,
    /// Differs from the pinned key.
    Changed,
}

/// The pin store.
#[derive(Debug)]
pub(crate) struct Pins {
    path: Option<PathBuf>,
    keys: BTreeMap<String, String>,
}

impl Pins {
    /// Load from `path` (missing file = no pins). A corrupt file is an error:
    /// silently dropping pins would defeat them.
    pub(crate) fn load(path: PathBuf) -> Result<Self, String> {
        let keys = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Self {
            path: Some(path),
            keys,
        })
    }

    /// An in-memory store (tests).
    #[cfg(test)]
    pub(crate) fn in_memory() -> Self {
        Self {
            path: None,
            keys: BTreeMap::new(),
        }
    }

    /// Where the pins live (for messages telling people how to re-pin).
    pub(crate) fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Check `key` for `instance`, pinning it on first sight.
    pub(crate) fn check(&mut self, instance: &str, key: &PublicKey) -> PinCheck {
        let text = key.to_string();
        match self.keys.get(instance) {
            Some(k) if *k == text => PinCheck::Known,
            Some(_) => PinCheck::Changed,
            None => {
                self.keys.insert(instance.to_string(), text);
                self.save();
                PinCheck::Pinned
            }
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let Ok(json) = serde_json::to_vec_pretty(&self.keys) else {
            return;
        };
        if let Err(e) = agent_link_crypto::files::write_atomic(path, &json, 0o600) {
            tracing::warn!("could not save pinned keys: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::Identity;

    #[test]
    fn first_key_is_pinned_and_a_change_is_refused() {
        let dir = std::env::temp_dir().join(format!("al-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("known_instances.json");
        let _ = std::fs::remove_file(&path);
        let (a, b) = (
            Identity::generate().public_key(),
            Identity::generate().public_key(),
        );
        let mut p = Pins::load(path.clone()).unwrap();
        assert_eq!(p.check("i1", &a), PinCheck::Pinned);
        assert_eq!(p.check("i1", &a), PinCheck::Known);
        assert_eq!(p.check("i1", &b), PinCheck::Changed);
        let mut again = Pins::load(path.clone()).unwrap();
        assert_eq!(again.check("i1", &b), PinCheck::Changed, "persisted");
        std::fs::write(&path, b"{broken").unwrap();
        assert!(Pins::load(path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
