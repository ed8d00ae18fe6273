//! Pinned public keys of other instances (trust on first use). The relay
//! tells a receiver which key a sender authenticated with; the first key
//! seen for an instance is pinned in `known_instances.json`, and a different
//! key later is refused (`KeyChanged`): a relay that turns hostile cannot
//! swap a member's key without receivers noticing. A strict receiver pins
//! nothing by itself: it takes only the keys pinned out of band
//! (`agent-link trust`) and refuses every other sender.
//!
//! Checking is in memory ([`Pins::check`]); whatever touches the file (the
//! lock, the merge, the fsync'd write, a strict receiver's re-read) is a
//! [`Settle`] that the agent's driver runs on a blocking thread, so a first
//! contact never stalls the async tasks of the link.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agent_link_crypto::PublicKey;

/// Outcome of presenting a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinCheck {
    /// Matches the pinned key.
    Known,
    /// No key pinned for this instance yet (nothing is recorded by the
    /// check: see [`Pins::settle`]).
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

/// What a [`Settle`] does with the keys it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SettleMode {
    /// Pin each key whose instance has none yet (first key wins).
    Pin,
    /// Pin nothing; only re-read what is pinned (a strict receiver: a key
    /// pinned by `agent-link trust` since the link started counts).
    Lookup,
}

/// File work for first-contact keys, made by [`Pins::settle`] and run off
/// the async task ([`Settle::run`]).
#[derive(Debug)]
pub(crate) struct Settle {
    path: Option<PathBuf>,
    /// The in-memory store's keys (used only without a file: tests).
    memory: BTreeMap<String, String>,
    wanted: Vec<(String, String)>,
    mode: SettleMode,
}

/// What the file holds after a [`Settle`]: install it with
/// [`Pins::install`], ask it with [`Settled::check`].
#[derive(Debug)]
pub(crate) struct Settled {
    keys: BTreeMap<String, String>,
}

impl Settled {
    /// How `key` compares with what is pinned for `instance` now.
    pub(crate) fn check(&self, instance: &str, key: &PublicKey) -> PinCheck {
        compare(&self.keys, instance, key)
    }
}

fn compare(keys: &BTreeMap<String, String>, instance: &str, key: &PublicKey) -> PinCheck {
    match keys.get(instance) {
        Some(k) if *k == key.to_string() => PinCheck::Known,
        Some(_) => PinCheck::Changed,
        None => PinCheck::Unknown,
    }
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Add each wanted key whose instance has none; whether anything was added.
fn merge(keys: &mut BTreeMap<String, String>, wanted: &[(String, String)]) -> bool {
    let mut added = false;
    for (instance, key) in wanted {
        if !keys.contains_key(instance) {
            keys.insert(instance.clone(), key.clone());
            added = true;
        }
    }
    added
}

impl Settle {
    /// Do the file work (blocking: a lock, a read, perhaps an fsync'd
    /// write). An error leaves the file as it was.
    pub(crate) fn run(self) -> Result<Settled, String> {
        let Some(path) = self.path else {
            let mut keys = self.memory;
            if self.mode == SettleMode::Pin {
                merge(&mut keys, &self.wanted);
            }
            return Ok(Settled { keys });
        };
        if self.mode == SettleMode::Lookup {
            // Written by rename (`write_atomic`): a read sees one whole
            // version, no lock needed.
            return Ok(Settled {
                keys: read_file(&path)?,
            });
        }
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
        let mut keys = read_file(&path)?;
        if merge(&mut keys, &self.wanted) {
            let json =
                serde_json::to_vec_pretty(&keys).expect("a map of strings always serialises");
            agent_link_crypto::files::write_atomic(&path, &json, 0o600)
                .map_err(|e| e.to_string())?;
        }
        Ok(Settled { keys })
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
        compare(&self.keys, instance, key)
    }

    /// The file work that settles these first-contact keys: with
    /// [`SettleMode::Pin`] the file is re-read under a lock and merged, so
    /// processes sharing the directory never undo each other's pins, and
    /// the first key pinned anywhere wins.
    pub(crate) fn settle(&self, wanted: &[(&str, &PublicKey)], mode: SettleMode) -> Settle {
        Settle {
            path: self.path.clone(),
            memory: if self.path.is_none() {
                self.keys.clone()
            } else {
                BTreeMap::new()
            },
            wanted: wanted
                .iter()
                .map(|(i, k)| (i.to_string(), k.to_string()))
                .collect(),
            mode,
        }
    }

    /// Take what a [`Settle`] found in the file as the pins from now on.
    pub(crate) fn install(&mut self, settled: &Settled) {
        self.keys.clone_from(&settled.keys);
    }

    /// Pin `key` for `instance` now, blocking (`agent-link trust`, tests):
    /// `Changed` when another key got there first, `Known` when this one did.
    pub(crate) fn pin(&mut self, instance: &str, key: &PublicKey) -> Result<PinCheck, String> {
        let settled = self.settle(&[(instance, key)], SettleMode::Pin).run()?;
        self.install(&settled);
        Ok(settled.check(instance, key))
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
