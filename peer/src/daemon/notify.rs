//! `--notify-url`: when a message lands, POST `{"agent", "id", "from"}`
//! (never its content) to the agent's loopback URL, e.g. an agent
//! gateway's hook. Off the storing path: a notification never delays a
//! store or a receipt; a slow or dead endpoint costs at most its bounded
//! retries, and when too many are in flight new ones are skipped (the
//! message is in the inbox either way).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

use super::agents::check_notify_url;

/// Notifications in flight at most.
const IN_FLIGHT: usize = 16;
/// Tries per notification.
const TRIES: u32 = 3;
/// Each try's bound (connect, send, answer).
const TRY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct Notifier {
    slots: Arc<Semaphore>,
}

impl Notifier {
    pub(crate) fn new() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Notify `url` that message `id` from `from` landed for `agent`.
    pub(crate) fn notify(&self, url: &str, agent: &str, id: &str, from: &str) {
        let Ok(target) = check_notify_url(url) else {
            return;
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(agent, "notification skipped: {IN_FLIGHT} already in flight");
            return;
        };
        let body = serde_json::json!({"agent": agent, "id": id, "from": from}).to_string();
        let agent = agent.to_string();
        tokio::spawn(async move {
            let _permit = permit;
            for attempt in 0..TRIES {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                match tokio::time::timeout(TRY_TIMEOUT, post(&target, body.clone())).await {
                    Ok(Ok(status)) if (200..300).contains(&status) => return,
                    Ok(Ok(status)) => tracing::debug!(agent = %agent, status, "notify answered"),
                    Ok(Err(e)) => tracing::debug!(agent = %agent, "notify failed: {e}"),
                    Err(_) => tracing::debug!(agent = %agent, "notify timed out"),
                }
            }
            tracing::warn!(agent = %agent, "notification to {}{} failed {TRIES} times; the message waits in the inbox", target.host, target.path);
        });
    }
}

async fn post(target: &super::agents::NotifyTarget, body: String) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::post(target.path.as_str())
        .header("host", target.host.as_str())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let res = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    // Read (and bound) the answer so the connection ends cleanly.
    let _ = http_body_util::Limited::new(res.into_body(), 64 * 1024)
        .collect()
        .await;
    Ok(status)
}
