//! Local operator interfaces of a running relay: the admin socket
//! (`DIR/admin.sock`, mode 0600, answering `instances` with JSON) used by
//! `agent-link-relay instances`, and the Prometheus metrics endpoint.
//! Neither exposes message content or secrets.

use std::os::unix::fs::PermissionsExt;
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
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
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
                        let mut list: Vec<OnlineInstance> = hub
                            .router()
                            .snapshot()
                            .into_iter()
                            .map(|(instance_id, agents)| OnlineInstance {
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
