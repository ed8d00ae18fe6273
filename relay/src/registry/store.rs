//! `registry.json` on disk, made durable: lock, re-read, change, write a
//! temporary file, fsync, rename. See the module above for why.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{InstanceRecord, Invite, Registry};

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    registered_instances: Vec<InstanceRecord>,
    /// Single-use invites not yet redeemed (with their secrets: the file is
    /// 0600).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending_invites: Vec<Invite>,
}

/// Errors of the on-disk store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading, locking or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file (`registry.json` or `registry.lock`).
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path}: corrupt registry: {message}")]
    Corrupt {
        /// `registry.json`.
        path: String,
        /// What does not parse (restore the file from a backup, or fix it).
        message: String,
    },
    /// Writing failed.
    #[error("{0}")]
    Write(#[from] agent_link_crypto::CryptoError),
}

/// `registry.json` plus its lock file.
#[derive(Debug, Clone)]
pub struct RegistryStore {
    path: PathBuf,
    lock_path: PathBuf,
}

impl RegistryStore {
    /// The store in state directory `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("registry.json"),
            lock_path: dir.join("registry.lock"),
        }
    }

    /// Path of `registry.json`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, p: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        let path = p.display().to_string();
        move |source| StoreError::Io { path, source }
    }

    /// Read the registry (a missing file is an empty registry).
    pub fn load(&self) -> Result<Registry, StoreError> {
        let bytes = self.read_bytes()?;
        self.parse(&bytes)
    }

    /// The file's bytes (none when it is missing).
    fn read_bytes(&self) -> Result<Vec<u8>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.io(&self.path)(e)),
        }
    }

    fn parse(&self, bytes: &[u8]) -> Result<Registry, StoreError> {
        if bytes.is_empty() {
            return Ok(Registry::default());
        }
        let corrupt = |message: String| StoreError::Corrupt {
            path: self.path.display().to_string(),
            message,
        };
        let file: RegistryFile =
            serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut reg = Registry::from_records(file.registered_instances).map_err(corrupt)?;
        reg.set_invites(file.pending_invites);
        Ok(reg)
    }

    /// Read the registry unless its bytes hash to `last` (SHA-256): parsing
    /// and checking every key of a large registry costs far more than
    /// reading and hashing it. `Ok(None)`: unchanged.
    pub fn load_if_changed(
        &self,
        last: Option<[u8; 32]>,
    ) -> Result<Option<(Registry, [u8; 32])>, StoreError> {
        let bytes = self.read_bytes()?;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        if last == Some(digest) {
            return Ok(None);
        }
        Ok(Some((self.parse(&bytes)?, digest)))
    }

    /// Apply `change` durably: lock, re-read, change, write atomically (only
    /// when it changed something). The new registry is returned only after
    /// it is on disk.
    pub fn update<T, E>(
        &self,
        change: impl FnOnce(&mut Registry) -> Result<T, E>,
    ) -> Result<Result<(T, Registry), E>, StoreError> {
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(self.io(&self.lock_path))?;
        // Exclusive lock across processes: the relay and `register`/`revoke`
        // never interleave their read-modify-write cycles.
        lock.lock().map_err(self.io(&self.lock_path))?;
        let mut reg = self.load()?;
        let before = (reg.records().to_vec(), reg.invites().to_vec());
        let out = match change(&mut reg) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        if reg.records() == before.0.as_slice()
            && reg.invites() == before.1.as_slice()
            && self.path.exists()
        {
            // Nothing changed (a registration repeated, a revoke of the
            // revoked): no rewrite, no fsync. What is on disk is already
            // this registry. (A missing file is still written: `init`
            // creates it this way.)
            return Ok(Ok((out, reg)));
        }
        let file = RegistryFile {
            registered_instances: reg.records().to_vec(),
            pending_invites: reg.invites().to_vec(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| StoreError::Corrupt {
            path: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        agent_link_crypto::files::write_atomic(&self.path, &json, 0o600)?;
        drop(lock);
        Ok(Ok((out, reg)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::KeyStatus;
    use agent_link_crypto::{Identity, PublicKey};

    /// A store in a fresh temporary directory with `i1` newly registered
    /// (asserted new), for the store's and the live registry's tests.
    pub(crate) fn store_with_i1() -> (tempfile::TempDir, RegistryStore, PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let store = RegistryStore::new(dir.path());
        let a = Identity::generate().public_key();
        let (new, _) = store
            .update(|r| r.register("i1", &a, "n"))
            .unwrap()
            .unwrap();
        assert!(new, "i1 is new in a fresh store");
        (dir, store, a)
    }

    #[test]
    fn store_persists_and_detects_corruption() {
        let (_dir, store, a) = store_with_i1();
        assert_eq!(
            store.load().unwrap().key_status(&a),
            KeyStatus::Active("i1".into())
        );
        std::fs::write(store.path(), b"{ not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("registry.json"), "{err}");
    }

    #[test]
    fn a_change_that_changes_nothing_does_not_rewrite_the_file() {
        use std::os::unix::fs::MetadataExt;
        let (_dir, store, a) = store_with_i1();
        let ino = std::fs::metadata(store.path()).unwrap().ino();
        // The same registration again: accepted, nothing new, no rewrite
        // (every write replaces the file, so a rewrite changes the inode).
        assert!(
            !store
                .update(|r| r.register("i1", &a, "n"))
                .unwrap()
                .unwrap()
                .0
        );
        assert_eq!(std::fs::metadata(store.path()).unwrap().ino(), ino);
        // A real change is written.
        store.update(|r| r.revoke("i1")).unwrap().unwrap();
        assert_ne!(std::fs::metadata(store.path()).unwrap().ino(), ino);
        assert!(store.load().unwrap().get("i1").unwrap().revoked);
    }

    /// Pending invites survive a reload of the file (the relay re-reads it
    /// on every change and at start): found missing by cargo mutants
    /// (`set_invites -> ()`).
    #[test]
    fn pending_invites_are_kept_in_the_file() {
        let (_dir, store, _) = store_with_i1();
        store
            .update(|r| r.add_invite("i2", "ab".repeat(32), u64::MAX, 0))
            .unwrap()
            .unwrap();
        let reg = store.load().unwrap();
        assert_eq!(reg.invites().len(), 1);
        assert_eq!(*reg.invite_secret("i2", 1).unwrap(), [0xab; 32]);
    }
}
