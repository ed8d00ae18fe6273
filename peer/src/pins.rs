//! Pinned public keys of other instances (trust on first use). The relay
//! tells a receiver which key a sender authenticated with; the first key
//! seen for an instance is pinned in `known_instances.json`, and a different
//! key later is refused (`KeyChanged`): a relay that turns hostile cannot
//! swap a member's key without receivers noticing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_link_crypto::PublicKey;

/// Outcome of presenting a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinCheck {
    /// Matches the pinned key.
    Known,
    /// No key pinned for this instance yet (nothing is recorded by the
    /// check: see [`Pins::pin`]).
    Unknown,
    /// Differs from the pinned key.
    Changed,
}

/// The pin store.
#[derive(Debug)]
pub(crate) struct Pins {
    path: Option<PathBuf>,
    keys: BTreeMap<String, String>,
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl Pins {
    /// Load from `path` (missing file = no pins). A corrupt file is an error:
    /// silently dropping pins would defeat them.
    pub(crate) fn load(path: PathBuf) -> Result<Self, String> {
        let keys = read_file(&path)?;
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
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// How `key` compares with what is pinned for `instance`. Records
    /// nothing: a key is pinned only once a message under it verified.
    pub(crate) fn check(&self, instance: &str, key: &PublicKey) -> PinCheck {
        match self.keys.get(instance) {
            Some(k) if *k == key.to_string() => PinCheck::Known,
            Some(_) => PinCheck::Changed,
            None => PinCheck::Unknown,
        }
    }

    /// Pin `key` for `instance` (first sight, its message verified; or
    /// `agent-link trust`). The file is re-read under a lock and merged, so
    /// processes sharing the directory never undo each other's pins, and
    /// the first key pinned anywhere wins: `Changed` when another key got
    /// there first, `Known` when this one did.
    pub(crate) fn pin(&mut self, instance: &str, key: &PublicKey) -> Result<PinCheck, String> {
        let text = key.to_string();
        let Some(path) = self.path.clone() else {
            return Ok(match self.keys.get(instance) {
                Some(k) if *k == text => PinCheck::Known,
                Some(_) => PinCheck::Changed,
                None => {
                    self.keys.insert(instance.to_string(), text);
                    PinCheck::Known
                }
            });
        };
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // Across processes: a listener and a sender of the same instance
        // pin under one lock, each re-reading what the other wrote.
        lock.lock()
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        let mut on_disk = read_file(&path)?;
        let outcome = match on_disk.get(instance) {
            Some(k) if *k == text => PinCheck::Known,
            Some(_) => PinCheck::Changed,
            None => {
                on_disk.insert(instance.to_string(), text);
                let json = serde_json::to_vec_pretty(&on_disk)
                    .expect("a map of strings always serialises");
                agent_link_crypto::files::write_atomic(&path, &json, 0o600)
                    .map_err(|e| e.to_string())?;
                PinCheck::Known
            }
        };
        self.keys = on_disk;
        Ok(outcome)
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
        assert_eq!(p.check("i1", &a), PinCheck::Unknown);
        assert_eq!(
            p.check("i1", &a),
            PinCheck::Unknown,
            "a check records nothing"
        );
        assert_eq!(p.pin("i1", &a).unwrap(), PinCheck::Known);
        assert_eq!(p.check("i1", &a), PinCheck::Known);
        assert_eq!(p.check("i1", &b), PinCheck::Changed);
        assert_eq!(
            p.pin("i1", &b).unwrap(),
            PinCheck::Changed,
            "first key wins"
        );
        let again = Pins::load(path.clone()).unwrap();
        assert_eq!(again.check("i1", &b), PinCheck::Changed, "persisted");
        // Two processes sharing the directory: each pins another instance
        // from a stale view; neither undoes the other.
        let mut one = Pins::load(path.clone()).unwrap();
        let mut two = Pins::load(path.clone()).unwrap();
        one.pin("i2", &a).unwrap();
        two.pin("i3", &b).unwrap();
        assert_eq!(
            two.pin("i2", &b).unwrap(),
            PinCheck::Changed,
            "merged from disk"
        );
        let all = Pins::load(path.clone()).unwrap();
        assert_eq!(all.check("i2", &a), PinCheck::Known);
        assert_eq!(all.check("i3", &b), PinCheck::Known);
        std::fs::write(&path, b"{broken").unwrap();
        assert!(Pins::load(path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
