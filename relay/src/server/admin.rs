//! Local operator interfaces of a running relay: the admin socket
//! (`DIR/admin.sock`, mode 0600, answering `instances` with JSON) used by
//! `agent-link-relay instances`, and the Prometheus metrics endpoint.
//! Neither exposes message content or secrets.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

use super::hub::Hub;

/// One online instance, as the admin socket reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OnlineInstance {
    /// Instance id.
    pub instance_id: String,
    /// Receiving agents attached.
    pub agents: Vec<String>,
    /// Open QUIC connections (0 from a relay that predates the field).
    #[serde(default)]
    pub connections: usize,
}

pub(crate) fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        // A socket left by a relay that was killed; if another relay is
        // actually serving it, connecting succeeds and we refuse to steal it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another relay is running on this directory",
            ));
        }
    }
    // bind(2) creates the socket with 0777 & ~umask, and a chmod after it
    // leaves a moment in which that mode holds (with umask 0, anyone who
    // can traverse DIR could connect; DIR may be 0755). Not umask: it is
    // process-wide, and the runtime's threads are already creating files
    // (a registry write under a umask of 0177 would make an unreadable
    // directory or a too-tight file). Instead the socket is born in a fresh
    // 0700 directory of our own inside DIR, where no one else can reach it
    // whatever its mode, gets 0600 there, and only then is renamed into
    // place (atomically replacing a dead relay's socket). DIR itself is
    // writable by us alone (checked at start), so no one can plant or
    // swap the nursery.
    let dir = path.parent().unwrap_or(Path::new("."));
    let nursery = dir.join(format!(".admin.sock.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&nursery);
    std::fs::DirBuilder::new().mode(0o700).create(&nursery)?;
    let bound = (|| {
        let born = nursery.join("admin.sock");
        let l = UnixListener::bind(&born)?;
        std::fs::set_permissions(&born, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&born, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&nursery);
    bound
}

/// Local clients served at once, per endpoint; more are turned away (closed
/// at once) rather than queued behind the ones being served.
const MAX_CLIENTS: usize = 16;
/// How long one local client may take.
const CLIENT_TIME: Duration = Duration::from_secs(2);

/// Serve each accepted client on a task of its own (at most
/// [`MAX_CLIENTS`] at once, each bounded by [`CLIENT_TIME`]), so a client
/// that connects and says nothing delays no one else.
async fn serve_each<S, A, F>(hub: &Hub, mut accept: impl FnMut() -> A, serve: impl Fn(S) -> F)
where
    A: std::future::Future<Output = std::io::Result<S>>,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut clients = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = accept() => a,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            _ = hub.shutdown().cancelled() => break,
        };
        let Ok(stream) = accepted else { continue };
        if clients.len() >= MAX_CLIENTS {
            drop(stream);
            continue;
        }
        let fut = serve(stream);
        clients.spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIME, fut).await;
        });
    }
}

pub(crate) async fn serve_admin(hub: Arc<Hub>, listener: UnixListener, path: PathBuf) {
    let h = hub.clone();
    serve_each(
        &hub,
        || async { listener.accept().await.map(|(s, _)| s) },
        move |stream: tokio::net::UnixStream| {
            let hub = h.clone();
            async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut r = BufReader::new(r.take(256));
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match line.trim() {
                    "instances" => {
                        let counts = hub.router().connection_counts();
                        let mut list: Vec<OnlineInstance> = hub
                            .router()
                            .snapshot()
                            .into_iter()
                            .map(|(instance_id, agents)| OnlineInstance {
                                connections: counts.get(&instance_id).copied().unwrap_or(0),
                                instance_id,
                                agents,
                            })
                            .collect();
                        list.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
                        serde_json::to_string(&list)
                            .expect("a list of ids and agent names always serialises")
                    }
                    _ => "{\"error\":\"unknown command\"}".to_string(),
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.write_all(b"\n").await;
            }
        },
    )
    .await;
    let _ = std::fs::remove_file(path);
}

/// Ask a running relay for its online instances; `None` if none is running.
pub fn query_online(dir: &Path) -> Option<Vec<OnlineInstance>> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("admin.sock")).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"instances\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str(&line).ok()
}

pub(crate) async fn serve_metrics(hub: Arc<Hub>, listener: TcpListener) {
    let h = hub.clone();
    serve_each(
        &hub,
        || async { listener.accept().await.map(|(s, _)| s) },
        move |mut stream: tokio::net::TcpStream| {
            let body = h.stats().render(h.router().online_count());
            async move {
                // Read (and ignore) the request head; answer every path alike.
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    /// The socket ends up at DIR/admin.sock with 0600, replaces a dead
    /// relay's socket, refuses a live one, and leaves no nursery behind.
    #[tokio::test]
    async fn the_admin_socket_is_bound_private_and_in_place() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("admin.sock");
        let dead = bind_socket(&path).unwrap();
        drop(dead); // its file stays, as after a SIGKILL
        let l = bind_socket(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("admin.sock")]);
        let client = tokio::net::UnixStream::connect(&path);
        let (c, a) = tokio::join!(client, l.accept());
        c.unwrap();
        a.unwrap();
        let e = bind_socket(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    }
}
