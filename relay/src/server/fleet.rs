//! The fleet secret on a running relay: a rotation (`rotate-secret` rewrote
//! `fleet.secret`) is picked up within a second and pushed to every
//! registered connection, and every registered connection gets the secret
//! in force when it starts (PROTOCOL.md §9.7). Only connections of
//! registered, unrevoked instances are ever sent it: a revoked member's
//! connections are closed and it cannot open new ones, so it never learns a
//! rotated secret.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{info, warn};

use super::hub::Hub;
use crate::registry::live::file_stamp;
use crate::state::{read_fleet, SECRET_FILE};

/// Send `frame` (a `FleetSecret`) on a new unidirectional stream of `conn`,
/// in the background; a connection that has gone away simply misses it (it
/// gets the secret again when it reconnects).
pub(crate) fn push(conn: &quinn::Connection, frame: Bytes) {
    let conn = conn.clone();
    tokio::spawn(async move {
        if let Ok(mut s) = conn.open_uni().await {
            if s.write_all(&frame).await.is_ok() {
                let _ = s.finish();
            }
        }
    });
}

/// Poll `fleet.secret` every 500 ms (every write replaces the file, so its
/// inode changes); on a change, load it and `fleet.previous`, put them in
/// force and push the new secret to every registered connection.
pub(crate) async fn watch(hub: Arc<Hub>, dir: PathBuf) {
    let path = dir.join(SECRET_FILE);
    let mut last = file_stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = hub.shutdown().cancelled() => return,
        }
        let now = file_stamp(&path);
        if now == last {
            continue;
        }
        let d = dir.clone();
        let loaded = tokio::task::spawn_blocking(move || read_fleet(&d)).await;
        match loaded {
            Ok(Ok((fleet, previous))) => {
                last = now;
                let frame = hub.install_fleet(&fleet, previous.as_ref());
                let conns = hub.router().all_connections();
                info!(
                    connections = conns.len(),
                    "fleet secret rotated; pushing it to registered members"
                );
                for c in &conns {
                    push(c, frame.clone());
                }
            }
            // A half-made change (or loose permissions): keep the secret in
            // force and look again next tick.
            Ok(Err(e)) => warn!("fleet secret not reloaded: {e}"),
            Err(e) => warn!("fleet secret not reloaded: {e}"),
        }
    }
}
