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
use crate::core::admission::{self, ControlRequest, Registration, Via};
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
                .map(|r| r.reply),
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

/// Whether `proof` is the invite proof under the invite secret `secret`.
fn invite_proof_ok(
    secret: &[u8; 32],
    exporter: &[u8; 32],
    key: &PublicKey,
    instance_id: &str,
    proof: &[u8; 32],
) -> bool {
    let invite = agent_link_crypto::FleetSecret::from_bytes(*secret).key();
    agent_link_proto::check_invite_proof(&invite, exporter, key, instance_id, proof).is_ok()
}

/// A registration recorded: the id, and the frames that answer it.
pub(crate) struct Registered {
    pub(crate) instance_id: String,
    /// `Registered`, after `FleetSecret` for an invite (whose holder has
    /// not had the fleet secret so far).
    pub(crate) reply: Bytes,
}

/// Check a registration (the id, whether this relay takes it, the proof)
/// and record it durably (PROTOCOL.md §9.2).
pub(crate) async fn register(
    hub: &Hub,
    conn: &quinn::Connection,
    key: &PublicKey,
    reg: &Registration<'_>,
) -> Result<Registered, ErrorCode> {
    agent_link_proto::check_id(reg.instance_id).map_err(|_| ErrorCode::BadAddress)?;
    let exporter = agent_link_quic::exporter::register_exporter(conn)
        .ok()
        .ok_or(ErrorCode::Internal)?;
    let now = agent_link_proto::clock::unix_ms(std::time::SystemTime::now());
    let (already, proof_ok) = {
        let registry = hub.registry().read();
        let already = registry.key_status(key)
            == crate::registry::KeyStatus::Active(reg.instance_id.to_string());
        // The proof, in memory and before anything else is spent: the
        // fleet key, or the pending invite's own secret (checked again
        // under the registry's lock when the invite is used up).
        let proof_ok = match reg.via {
            Via::Fleet => {
                admission::check_registration(reg, key, &hub.fleet(), Some(exporter)).is_ok()
            }
            Via::Invite => {
                already
                    || registry
                        .invite_secret(reg.instance_id, now)
                        .is_some_and(|s| {
                            invite_proof_ok(&s, &exporter, key, reg.instance_id, &reg.proof)
                        })
            }
        };
        (already, proof_ok)
    };
    // The fleet secret registers only where the operator opened
    // registration; a bad proof is refused before it can spend anything;
    // every registry write spends a relay-wide token (each is an fsync).
    admission::may_register(
        reg,
        hub.config().open_registration,
        already,
        proof_ok,
        || hub.take_registration_token(),
    )?;
    let new = match reg.via {
        Via::Fleet => {
            hub.registry()
                .register_online(hub.router(), key, reg.instance_id, reg.name)
                .await?
        }
        Via::Invite => {
            let (k, id, proof) = (*key, reg.instance_id.to_string(), reg.proof);
            hub.registry()
                .redeem_invite_online(hub.router(), key, reg.instance_id, reg.name, move |s| {
                    invite_proof_ok(s, &exporter, &k, &id, &proof)
                })
                .await?
        }
    };
    if new {
        hub.stats().registrations.fetch_add(1, Relaxed);
        info!(instance = %reg.instance_id, via = ?reg.via, "registered");
    }
    let registered = frame(&RelayToPeer::Registered {
        instance_id: reg.instance_id,
    });
    let reply = match reg.via {
        Via::Fleet => registered,
        Via::Invite => {
            // The member has proved its invite: from here on it is one of
            // the fleet, and this (authenticated, registered) connection
            // is how it learns the fleet secret.
            let mut b = hub.fleet_secret_frame().to_vec();
            b.extend_from_slice(&registered);
            Bytes::from(b)
        }
    };
    Ok(Registered {
        instance_id: reg.instance_id.to_string(),
        reply,
    })
}
