//! The local API's socket: `DIR/agent-link.sock`, bound inside the peer
//! directory (0700, checked) under umask 0177 so the socket itself is
//! 0600, and every connection's peer credentials (SO_PEERCRED) checked
//! before a byte of HTTP is read: the daemon's own uid and root, plus the
//! uids the config names (`local_api_uids`). File modes alone are not
//! enough: a socket inherited or passed on would bypass them.

use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

use super::socket_path;
use super::state::DaemonError;

/// Bind the socket, replacing one a crashed daemon left behind (the
/// directory lock is held, so no live daemon owns it).
pub(crate) fn bind(dir: &Path) -> Result<UnixListener, DaemonError> {
    let path = socket_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!("removed a stale socket at {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(DaemonError::io(&path, e)),
    }
    // Only for the bind: the umask is the process's, and the inboxes'
    // folders are made 0700 under the normal one.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(&path);
    rustix::process::umask(old);
    bound.map_err(|e| DaemonError::io(&path, e))
}

/// Who may talk to the daemon.
#[derive(Debug, Clone)]
pub(crate) struct Allowed {
    uids: Vec<u32>,
}

impl Allowed {
    /// This process's effective uid, root, and `extra`.
    pub(crate) fn new(extra: &[u32]) -> Self {
        let mut uids = vec![rustix::process::geteuid().as_raw(), 0];
        uids.extend_from_slice(extra);
        Self { uids }
    }

    /// Whether the process at the other end of `stream` may use the API.
    pub(crate) fn admits(&self, stream: &UnixStream) -> bool {
        match stream.peer_cred() {
            Ok(cred) => self.uids.contains(&cred.uid()),
            Err(_) => false,
        }
    }
}
