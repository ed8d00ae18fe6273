//! The local instance, `agent-link daemon` (DESIGN.md "The local
//! instance"): one process per computer holds the instance's key and **one
//! QUIC connection** to the relay, keeps a receiving stream per locally
//! registered agent, stores what arrives in each agent's durable inbox
//! *before* the receipt goes back, and serves the local API (LOCAL-API.md)
//! on `DIR/agent-link.sock` to the CLI and the Python and JS clients.
//!
//! Inside: `store` (one agent's inbox on disk), `agents` (`agents.json`),
//! `state` (what the daemon holds and does: receiving loops, sends, read
//! receipts, finding an agent by name), `api` (the HTTP routes), `socket`
//! (binding the socket, peer credentials), `notify` (the `--notify-url`
//! POSTs), `client` (the CLI's side of the socket), `lock` (one daemon per
//! directory).

pub mod agents;
mod api;
pub mod client;
mod lock;
mod notify;
mod read;
mod socket;
mod state;
pub(crate) mod store;

use std::path::{Path, PathBuf};

pub use state::DaemonError;

/// The local API's socket in the peer directory.
pub const SOCKET_FILE: &str = "agent-link.sock";
/// The lock that makes one daemon per directory.
pub const LOCK_FILE: &str = "daemon.lock";
/// The inboxes' folder in the peer directory.
pub const INBOX_DIR: &str = "inbox";

/// The socket's path for peer directory `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_FILE)
}

/// Run the daemon for `dir` in the foreground until `stop` resolves (the
/// CLI passes SIGINT/SIGTERM): pending inbox writes finish, every agent
/// detaches (what was not stored is refused by name), the socket is
/// removed. `ready` is called with the socket's path once it serves.
pub async fn run(
    dir: &Path,
    stop: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(&Path),
) -> Result<(), DaemonError> {
    let _lock = lock::DirLock::take(dir)?;
    let daemon = state::Daemon::start(dir).await?;
    let listener = socket::bind(dir)?;
    let path = socket_path(dir);
    ready(&path);
    let served = api::serve(daemon.clone(), listener);
    tokio::pin!(served);
    tokio::pin!(stop);
    tokio::select! {
        _ = &mut stop => {}
        r = &mut served => r?,
    }
    let _ = std::fs::remove_file(&path);
    daemon.shutdown().await;
    Ok(())
}

/// Without a running daemon, the CLI reads and acks inboxes itself, with
/// the directory's lock held so no daemon starts meanwhile.
pub mod offline {
    use std::path::Path;

    use serde_json::Value;

    use super::agents::AgentsFile;
    use super::client::ClientError;
    use super::lock::DirLock;
    use super::state::{now_ms, Failure, KEEP_BEFORE_ATTACH_MS};
    use super::store::{self, Inbox};
    use crate::config::PeerConfig;

    fn api(f: Failure) -> ClientError {
        ClientError::Api {
            code: f.code,
            message: f.message,
            exit: f.exit.code(),
        }
    }

    fn open(dir: &Path, agent: &str) -> Result<(DirLock, Inbox), ClientError> {
        let lock = DirLock::take(dir).map_err(|e| api(Failure::internal(e.to_string())))?;
        let cfg = PeerConfig::load(dir).map_err(|e| api(Failure::link(&e)))?;
        let file = AgentsFile::load(dir).map_err(|e| api(Failure::bad_request(e.to_string())))?;
        if !file.agents.iter().any(|a| a.agent == agent) {
            return Err(api(Failure::unknown_agent(agent)));
        }
        let limits = store::Limits {
            max_messages: cfg.inbox_max_messages,
            max_bytes: cfg.inbox_max_bytes,
            ttl_ms: cfg.inbox_ttl_secs.saturating_mul(1000),
        };
        let path = dir.join(super::INBOX_DIR).join(agent);
        let (inbox, _) = Inbox::open(&path, limits, now_ms(), KEEP_BEFORE_ATTACH_MS)
            .map_err(|e| api(Failure::internal(format!("{}: {e}", path.display()))))?;
        Ok((lock, inbox))
    }

    /// The waiting messages of `agent`, oldest first, as the local API
    /// gives them.
    pub fn inbox(dir: &Path, agent: &str, limit: usize) -> Result<Vec<Value>, ClientError> {
        let (_lock, inbox) = open(dir, agent)?;
        let mut out = Vec::new();
        for w in inbox.list(limit) {
            match inbox.read(&w.id) {
                Ok(Some(m)) => out.push(super::api::message_json(&m)),
                Ok(None) => {}
                Err(e) => return Err(api(Failure::internal(format!("reading a message: {e}")))),
            }
        }
        Ok(out)
    }

    /// Ack `ids` of `agent` (32 hex digits each); stops at the first that
    /// is not waiting. No read receipt can go out without the daemon: a
    /// sender waiting for one learns of the read only if the daemon runs.
    pub fn ack(dir: &Path, agent: &str, ids: &[String]) -> Result<(), ClientError> {
        let (_lock, mut inbox) = open(dir, agent)?;
        for text in ids {
            let id = store::parse_id(text).ok_or_else(|| {
                api(Failure::bad_request(format!(
                    "{text:?} is not a message id (32 lower-case hex digits)"
                )))
            })?;
            inbox.ack(&id, now_ms()).map_err(|e| match e {
                store::AckError::NotFound(h) => api(Failure::new(
                    "UnknownMessage",
                    404,
                    agent_link_proto::Exit::Usage,
                    format!("no message {h} waiting for {agent} (already acked, expired, or never came)"),
                )),
                store::AckError::Io(e) => api(Failure::internal(format!("recording the ack: {e}"))),
            })?;
        }
        Ok(())
    }
}
