//! Control streams: status requests and (idempotent) registration from an
//! already registered connection; and [`register`], which an unknown key's
//! registration-only stream (`connection`) uses too.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use agent_link_crypto::PublicKey;
use agent_link_proto::{ErrorCode, RelayToPeer};
use bytes::Bytes;
use tracing::info;

use super::hub::{ConnInfo, Hub};
use super::writer::frame;
use crate::core::admission::{self, ControlRequest, Registration};
use crate::core::status::STATUS_PAGE_BYTES;
use agent_link_quic::frames::refuse_stream;
use agent_link_quic::frames::FrameReader;

/// Serve a control stream; `first` is a frame already read from it.
pub(crate) async fn serve_control(
    hub: Arc<Hub>,
    info: Arc<ConnInfo>,
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    mut first: Option<Bytes>,
) {
    loop {
        let body = match first.take() {
            Some(b) => b,
            None => match reader.next().await {
                Ok(Some(b)) => b,
                Ok(None) => {
                    let _ = send.finish();
                    return;
                }
                Err(e) => {
                    if let Some(code) = e.code() {
                        hub.refused(code);
                        refuse_stream(&mut send, code).await;
                    }
                    return;
                }
            },
        };
        // Bounded per instance: each request may cost work that grows with
        // the fleet (Status) or a registry write (Register).
        let allowed = info
            .control_rate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_take(std::time::Instant::now());
        if !allowed {
            hub.refused(ErrorCode::RateLimited);
            refuse_stream(&mut send, ErrorCode::RateLimited).await;
            return;
        }
        let reply = match admission::control_request(&body, &info.instance) {
            Ok(ControlRequest::Status) => hub.status(&info.instance).status_frame(&info.instance),
            Ok(ControlRequest::StatusPage { start }) => {
                hub.status(&info.instance)
                    .page_frame(&info.instance, start, STATUS_PAGE_BYTES)
            }
            Ok(ControlRequest::Register(reg)) => register(&hub, &info.conn, &info.key, &reg)
                .await
                .map(|id| frame(&RelayToPeer::Registered { instance_id: &id })),
            Err(code) => Err(code),
        };
        match reply {
            Ok(bytes) => {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Err(code) => {
                hub.refused(code);
                refuse_stream(&mut send, code).await;
                return;
            }
        }
    }
}

/// Check a registration (id, proof) and record it durably (PROTOCOL.md
/// §9.2); the instance id on success.
pub(crate) async fn register(
    hub: &Hub,
    conn: &quinn::Connection,
    key: &PublicKey,
    reg: &Registration<'_>,
) -> Result<String, ErrorCode> {
    let exported = agent_link_quic::exporter::register_exporter(conn).ok();
    admission::check_registration(reg, key, hub.fleet(), exported)?;
    let new = hub
        .registry()
        .register_online(hub.router(), key, reg.instance_id, reg.name)
        .await?;
    if new {
        hub.stats().registrations.fetch_add(1, Relaxed);
        info!(instance = %reg.instance_id, "registered");
    }
    Ok(reg.instance_id.to_string())
}
