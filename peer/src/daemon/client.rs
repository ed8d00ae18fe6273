//! The CLI's side of the local API: one HTTP/1.1 request per connection on
//! `DIR/agent-link.sock`. [`Client::find`] tells whether the daemon of a
//! directory runs (its socket answers), so every command can go through it
//! when it does and work directly when it does not.

use std::path::{Path, PathBuf};

use agent_link_proto::Exit;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use tokio::net::UnixStream;

use super::socket_path;

/// Why a request through the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with a named error.
    #[error("{message}")]
    Api {
        /// The CLI's error name (`TargetOffline`, `InboxFull`, …).
        code: String,
        /// One line for people.
        message: String,
        /// The exit code the CLI ends with.
        exit: u8,
    },
    /// The socket could not be used (daemon gone, or this user refused).
    #[error("the daemon at {path} {reason}")]
    Unavailable {
        /// The socket.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

impl ClientError {
    /// The CLI exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { exit, .. } => *exit,
            Self::Unavailable { .. } => Exit::Other.code(),
        }
    }

    /// The error name (`Unavailable` when the socket failed).
    pub fn code(&self) -> &str {
        match self {
            Self::Api { code, .. } => code,
            Self::Unavailable { .. } => "Unavailable",
        }
    }
}

/// A client of one daemon's socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// The daemon of `dir`, if one serves on its socket now.
    pub async fn find(dir: &Path) -> Option<Self> {
        let path = socket_path(dir);
        // A socket file left by a crashed daemon refuses connections.
        UnixStream::connect(&path).await.ok()?;
        Some(Self { path })
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Unavailable {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|e| self.unavailable(format!("cannot be reached: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| self.unavailable(e))?;
        tokio::spawn(conn);
        let body = body.map_or_else(Bytes::new, |v| Bytes::from(v.to_string()));
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agent-link")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| self.unavailable(e))?;
        sender.send_request(req).await.map_err(|e| {
            self.unavailable(format!(
                "closed the connection ({e}); a daemon of another user refuses this one"
            ))
        })
    }

    /// One request; the JSON answer, or the daemon's named error.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let res = self.send(method, path, body).await?;
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unavailable(format!("went away mid-answer: {e}")))?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            self.unavailable(format!("answered with something that is not JSON: {e}"))
        })?;
        if status.is_success() {
            return Ok(v);
        }
        Err(ClientError::Api {
            code: v["error"].as_str().unwrap_or("Internal").to_string(),
            message: v["message"]
                .as_str()
                .unwrap_or("the daemon refused")
                .to_string(),
            exit: v["exit_code"]
                .as_u64()
                .and_then(|c| u8::try_from(c).ok())
                .unwrap_or(Exit::Other.code()),
        })
    }

    /// A streaming request (NDJSON): its lines as they come.
    pub async fn stream(&self, path: &str) -> Result<Lines, ClientError> {
        let res = self.send("GET", path, None).await?;
        if !res.status().is_success() {
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unavailable(e))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(ClientError::Api {
                code: v["error"].as_str().unwrap_or("Internal").to_string(),
                message: v["message"]
                    .as_str()
                    .unwrap_or("the daemon refused")
                    .to_string(),
                exit: v["exit_code"].as_u64().map_or(1, |c| c as u8),
            });
        }
        Ok(Lines {
            body: res.into_body(),
            buf: BytesMut::new(),
        })
    }
}

/// The lines of a streamed answer.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
}

impl Lines {
    /// The next line as JSON; `None` when the stream ended (the daemon
    /// stopped).
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line = self.buf.split_to(i + 1);
                match serde_json::from_slice(&line[..i]) {
                    Ok(v) => return Some(v),
                    Err(_) => continue,
                }
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                _ => return None,
            }
        }
    }
}
