//! One QUIC connection: handshake, mapping its key to a registered instance
//! (or admitting an unknown key for registration only), then one task per
//! stream until the connection ends.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_link_crypto::PublicKey;
use agent_link_proto::{codec, ErrorCode, PeerToRelay, RelayToPeer};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, Instrument};

use crate::framed::{frame, refuse_stream, FrameReader};
use crate::rate::TokenBucket;
use crate::registry::{KeyStatus, RegisterError};
use crate::server::Shared;

/// What every stream of a connection knows about it.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub conn_id: u64,
    pub instance: String,
    pub key: PublicKey,
    pub conn: quinn::Connection,
    pub rate: Arc<Mutex<TokenBucket>>,
    pub agents: AtomicUsize,
}

/// Frames before registration are small; this bounds what an unknown key
/// can make the relay buffer.
const PRE_AUTH_MAX_FRAME: usize = 1024;

pub(crate) async fn handle(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    _permit: OwnedSemaphorePermit,
) {
    let remote = incoming.remote_address();
    let handshake = Duration::from_secs(shared.config.handshake_timeout_secs);
    let conn = match incoming.accept() {
        Ok(connecting) => match tokio::time::timeout(handshake, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                shared.stats.handshakes_failed.fetch_add(1, Relaxed);
                debug!(%remote, "handshake failed: {e}");
                return;
            }
            Err(_) => {
                shared.stats.handshakes_failed.fetch_add(1, Relaxed);
                shared.stats.refused(ErrorCode::AuthTimeout);
                debug!(%remote, "handshake timed out");
                return;
            }
        },
        Err(e) => {
            shared.stats.handshakes_failed.fetch_add(1, Relaxed);
            debug!(%remote, "incoming refused: {e}");
            return;
        }
    };
    let Some(key) = peer_key(&conn) else {
        // The verifier only admits Ed25519 certificates, so this is a bug or
        // an exotic client; refuse clearly.
        close(&shared, &conn, ErrorCode::NotRegistered);
        return;
    };
    let conn_id = shared.router.next_id();
    let span = info_span!("conn", conn_id, %remote);
    async move {
        let mut status = shared.registry().key_status(&key);
        if status == KeyStatus::Unknown {
            // An operator may have just run `agent-link-relay register`:
            // look at the file before treating the key as a stranger.
            if let Err(e) = crate::server::reload_registry_for_unknown_key(&shared).await {
                tracing::warn!("registry reload failed: {e}");
            }
            status = shared.registry().key_status(&key);
        }
        let (instance, control) = match status {
            KeyStatus::Active(id) => (id, None),
            KeyStatus::Revoked(id) => {
                info!(instance = %id, "revoked key refused");
                close(&shared, &conn, ErrorCode::Revoked);
                return;
            }
            KeyStatus::Unknown => match registration_only(&shared, &conn, &key).await {
                Some((id, stream)) => (id, Some(stream)),
                None => return,
            },
        };
        serve(shared, conn, conn_id, instance, key, control).await;
    }
    .instrument(span)
    .await;
}

/// The next stream limit: double, and go straight to `max` when less than
/// an eighth of it would be left. quinn only announces a raise (MAX_STREAMS)
/// that grows the limit by more than an eighth of the new limit, so a last
/// small step (64 → 68) would never reach the peer.
fn next_stream_limit(current: usize, max: usize) -> usize {
    let next = (current * 2).min(max);
    if max - next <= max / 8 {
        max
    } else {
        next
    }
}

fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    agent_link_crypto::tls::instance_key_from_cert(certs.first()?).ok()
}

fn close(shared: &Shared, conn: &quinn::Connection, code: ErrorCode) {
    shared.stats.connections_refused.fetch_add(1, Relaxed);
    shared.stats.refused(code);
    conn.close(code.as_u32().into(), code.describe().as_bytes());
}

type ControlStream = (quinn::SendStream, FrameReader);

/// An unknown key may do one thing: register, on its first stream, within
/// `auth_timeout_secs`. Anything else is refused with `NotRegistered` and the
/// connection is closed, so unregistered keys cannot probe the fleet.
async fn registration_only(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    key: &PublicKey,
) -> Option<(String, ControlStream)> {
    let auth = Duration::from_secs(shared.config.auth_timeout_secs);
    let first = tokio::time::timeout(auth, async {
        let (send, recv) = conn.accept_bi().await.ok()?;
        let mut reader = FrameReader::new(recv, PRE_AUTH_MAX_FRAME);
        let body = reader.next().await;
        Some((send, reader, body))
    })
    .await;
    let Ok(Some((mut send, reader, body))) = first else {
        debug!("unregistered key did not register in time");
        close(shared, conn, ErrorCode::AuthTimeout);
        return None;
    };
    let outcome = match &body {
        Ok(Some(b)) => match codec::decode::<PeerToRelay>(b) {
            Ok(PeerToRelay::Register {
                instance_id,
                name,
                proof,
            }) => register(shared, conn, key, instance_id, name, &proof).await,
            Ok(_) => Err(ErrorCode::NotRegistered),
            Err(_) => Err(ErrorCode::Malformed),
        },
        Ok(None) => Err(ErrorCode::NotRegistered),
        Err(e) => Err(e.code().unwrap_or(ErrorCode::Malformed)),
    };
    match outcome {
        Ok(id) => {
            let ok = frame(&RelayToPeer::Registered { instance_id: &id });
            if send.write_all(&ok).await.is_err() {
                return None;
            }
            Some((id, (send, reader)))
        }
        Err(code) => {
            refuse_stream(&mut send, code).await;
            close(shared, conn, code);
            None
        }
    }
}

/// Check a registration proof and record the registration durably.
pub(crate) async fn register(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    key: &PublicKey,
    instance_id: &str,
    name: &str,
    proof: &[u8; 32],
) -> Result<String, ErrorCode> {
    agent_link_proto::check_id(instance_id).map_err(|_| ErrorCode::BadAddress)?;
    let mut exporter = [0u8; 32];
    conn.export_keying_material(
        &mut exporter,
        agent_link_proto::REGISTER_EXPORTER_LABEL,
        b"",
    )
    .map_err(|_| ErrorCode::Internal)?;
    // The proof is bound to this TLS session (exporter) and this key, so a
    // captured proof cannot register another key or be replayed elsewhere.
    agent_link_proto::check_register_proof(&shared.fleet, &exporter, key, instance_id, proof)
        .map_err(|_| ErrorCode::BadProof)?;
    let store = shared.store.clone();
    let (id, name, k) = (instance_id.to_string(), name.to_string(), *key);
    let result = tokio::task::spawn_blocking(move || store.update(|r| r.register(&id, &k, &name)))
        .await
        .map_err(|_| ErrorCode::Internal)?;
    match result {
        Ok(Ok((new, reg))) => {
            shared.set_registry(reg);
            if new {
                shared.stats.registrations.fetch_add(1, Relaxed);
                info!(instance = %instance_id, "registered");
            }
            Ok(instance_id.to_string())
        }
        Ok(Err(RegisterError::IdTaken(_) | RegisterError::KeyTaken(_))) => {
            Err(ErrorCode::InstanceIdTaken)
        }
        Ok(Err(RegisterError::Revoked(_))) => Err(ErrorCode::Revoked),
        Ok(Err(_)) => Err(ErrorCode::BadAddress),
        Err(e) => {
            tracing::error!("registry write failed: {e}");
            Err(ErrorCode::Internal)
        }
    }
}

async fn serve(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    conn_id: u64,
    instance: String,
    key: PublicKey,
    control: Option<ControlStream>,
) {
    let cfg = &shared.config;
    let Some(rate) = shared.router.add_connection(
        &instance,
        conn_id,
        conn.clone(),
        cfg.max_connections_per_instance as usize,
        (cfg.rate_per_instance, cfg.rate_burst),
    ) else {
        close(&shared, &conn, ErrorCode::TooManyConnections);
        return;
    };
    shared.stats.connections_accepted.fetch_add(1, Relaxed);
    info!(%instance, "connected");
    let ctx = Arc::new(ConnCtx {
        conn_id,
        instance: instance.clone(),
        key,
        conn: conn.clone(),
        rate,
        agents: AtomicUsize::new(0),
    });
    let mut streams = JoinSet::new();
    // See `server::initial_streams`: raise the stream limit before the
    // peer runs into it (it waits one round trip if it does).
    let max_streams = crate::server::max_streams(cfg) as usize;
    let mut stream_limit = crate::server::initial_streams(cfg) as usize;
    if let Some((send, mut reader)) = control {
        reader.set_max(shared.config.max_frame());
        reader.set_frame_timeout(shared.config.frame_timeout());
        streams.spawn(crate::control::run(
            shared.clone(),
            ctx.clone(),
            send,
            reader,
            None,
        ));
    }
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(crate::stream::handle(shared.clone(), ctx.clone(), send, recv));
                    while streams.try_join_next().is_some() {}
                    if streams.len() + 2 >= stream_limit && stream_limit < max_streams {
                        stream_limit = next_stream_limit(stream_limit, max_streams);
                        conn.set_max_concurrent_bi_streams((stream_limit as u32).into());
                    }
                }
                Err(e) => {
                    info!(%instance, "disconnected: {e}");
                    break;
                }
            },
            _ = shared.shutdown.cancelled() => break,
        }
        while streams.try_join_next().is_some() {}
    }
    // The connection is gone: its streams fail fast. Give them a moment to
    // finish cleanly, then abort the rest (their guards unregister them).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while streams.join_next().await.is_some() {}
    })
    .await;
    streams.abort_all();
    while streams.join_next().await.is_some() {}
    shared.router.remove_connection(&instance, conn_id);
}

#[cfg(test)]
mod tests {
    use super::next_stream_limit;

    #[test]
    fn every_stream_limit_raise_is_large_enough_for_quinn_to_announce() {
        for max in [5usize, 6, 8, 9, 10, 12, 17, 18, 68, 100, 1028] {
            let mut limit = crate::server::initial_stream_limit(max as u32) as usize;
            let mut steps = 0;
            while limit < max {
                let next = next_stream_limit(limit, max);
                assert!(next > limit && next <= max, "{limit} -> {next} (max {max})");
                // quinn: announced only when the raise exceeds next / 8.
                assert!(next - limit > next / 8, "{limit} -> {next} (max {max})");
                limit = next;
                steps += 1;
            }
            assert!(steps <= 8);
        }
    }
}
