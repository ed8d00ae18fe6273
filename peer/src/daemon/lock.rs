//! One daemon per peer directory: an exclusive `flock` on
//! `DIR/daemon.lock`, held for the daemon's life and released by the kernel
//! however the process ends (so a crash leaves nothing to clean up).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::state::DaemonError;
use super::LOCK_FILE;

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Take the lock, or say that another daemon holds it.
    pub(crate) fn take(dir: &Path) -> Result<Self, DaemonError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| DaemonError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::AlreadyRunning {
                dir: dir.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(DaemonError::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_until_the_first_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let first = DirLock::take(d.path()).unwrap();
        assert!(matches!(
            DirLock::take(d.path()),
            Err(DaemonError::AlreadyRunning { .. })
        ));
        drop(first);
        DirLock::take(d.path()).unwrap();
    }
}
