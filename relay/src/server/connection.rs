//! One QUIC connection: handshake, mapping its key to a registered instance
//! (or admitting an unknown key for registration only, in one of the
//! `max_stranger_connections` slots), then one task per
//! stream until the connection ends.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::PublicKey;
use agent_link_proto::ErrorCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, Instrument};

use super::hub::{ConnInfo, Hub};
use crate::core::admission::{self, Admission, PRE_AUTH_MAX_FRAME};
use crate::core::limits;
use agent_link_quic::frames::refuse_stream;
use agent_link_quic::frames::FrameReader;

/// What a connection holds from the accept loop.
pub(crate) struct Place {
    /// Its place under `max_connections`, for its whole life.
    pub(crate) _slot: OwnedSemaphorePermit,
    /// Counted as a handshake in progress until its handshake ends.
    pub(crate) handshaking: Handshaking,
    /// The pool of `max_stranger_connections`, taken from only if the key
    /// turns out to be unknown.
    pub(crate) strangers: Arc<Semaphore>,
}

/// One handshake in progress, counted in the accept loop's tally (the load
/// that decides on QUIC Retry, `core::handshake`) until dropped.
pub(crate) struct Handshaking(Arc<AtomicUsize>);

impl Handshaking {
    /// Count one more handshake in `tally`.
    pub(crate) fn start(tally: Arc<AtomicUsize>) -> Self {
        tally.fetch_add(1, Relaxed);
        Self(tally)
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Serve one incoming connection until it ends, holding its [`Place`].
pub(crate) async fn serve_connection(hub: Arc<Hub>, incoming: quinn::Incoming, place: Place) {
    let Place {
        _slot,
        handshaking,
        strangers,
    } = place;
    let remote = incoming.remote_address();
    let handshake = Duration::from_secs(hub.config().handshake_timeout_secs);
    let conn = match incoming.accept() {
        Ok(connecting) => match tokio::time::timeout(handshake, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                hub.stats().handshakes_failed.fetch_add(1, Relaxed);
                debug!(%remote, "handshake failed: {e}");
                return;
            }
            Err(_) => {
                hub.stats().handshakes_failed.fetch_add(1, Relaxed);
                hub.refused(ErrorCode::AuthTimeout);
                debug!(%remote, "handshake timed out");
                return;
            }
        },
        Err(e) => {
            hub.stats().handshakes_failed.fetch_add(1, Relaxed);
            debug!(%remote, "incoming refused: {e}");
            return;
        }
    };
    drop(handshaking);
    let Some(key) = peer_key(&conn) else {
        // The verifier only admits Ed25519 certificates, so this is a bug or
        // an exotic client; refuse clearly.
        hub.refuse_connection(&conn, ErrorCode::NotRegistered);
        return;
    };
    let conn_id = hub.router().next_id();
    let span = info_span!("conn", conn_id, %remote);
    async move {
        let mut reloaded = false;
        let (instance, control) = loop {
            let status = hub.registry().read().key_status(&key);
            match admission::admit(status, reloaded) {
                Admission::Serve(id) => break (id, None),
                Admission::Refuse { instance, code } => {
                    info!(%instance, ?code, "key refused");
                    hub.refuse_connection(&conn, code);
                    return;
                }
                Admission::LookAgain => {
                    // An operator may have just run `agent-link-relay
                    // register`: look at the file before treating the key
                    // as a stranger.
                    if let Err(e) =
                        Box::pin(hub.registry().reload_for_unknown_key(hub.router())).await
                    {
                        tracing::warn!("registry reload failed: {e}");
                    }
                    reloaded = true;
                }
                Admission::RegisterOnly => {
                    // A stranger: one of `max_stranger_connections` slots
                    // for at most `auth_timeout_secs`, or out at once.
                    // Members never take from this pool.
                    let Ok(_stranger) = strangers.try_acquire() else {
                        debug!("unregistered key refused: stranger slots full");
                        hub.refuse_connection(&conn, ErrorCode::TooManyConnections);
                        return;
                    };
                    // Boxed, as the reload above: rare paths whose state
                    // would otherwise size every connection's task.
                    match Box::pin(registration_only(&hub, &conn, &key)).await {
                        Some((id, stream)) => break (id, Some(stream)),
                        None => return,
                    }
                }
            }
        };
        serve_registered(hub, conn, conn_id, instance, key, control).await;
    }
    .instrument(span)
    .await;
}

fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    agent_link_crypto::tls::instance_key_from_cert(certs.first()?).ok()
}

type ControlStream = (quinn::SendStream, FrameReader);

/// An unknown key may do one thing: register, on its first stream, within
/// `auth_timeout_secs`. Anything else is refused with `NotRegistered` and the
/// connection is closed, so unregistered keys cannot probe the fleet.
async fn registration_only(
    hub: &Hub,
    conn: &quinn::Connection,
    key: &PublicKey,
) -> Option<(String, ControlStream)> {
    let auth = Duration::from_secs(hub.config().auth_timeout_secs);
    let first = tokio::time::timeout(auth, async {
        let (send, recv) = conn.accept_bi().await.ok()?;
        let mut reader = FrameReader::new(recv, PRE_AUTH_MAX_FRAME);
        let body = reader.next().await;
        Some((send, reader, body))
    })
    .await;
    let Ok(Some((mut send, reader, body))) = first else {
        debug!("unregistered key did not register in time");
        hub.refuse_connection(conn, ErrorCode::AuthTimeout);
        return None;
    };
    let outcome = match &body {
        Ok(Some(b)) => match admission::registration(b) {
            Ok(reg) => super::control::register(hub, conn, key, &reg).await,
            Err(code) => Err(code),
        },
        Ok(None) => Err(ErrorCode::NotRegistered),
        Err(e) => Err(e.code().unwrap_or(ErrorCode::Malformed)),
    };
    match outcome {
        Ok(registered) => {
            if send.write_all(&registered.reply).await.is_err() {
                return None;
            }
            Some((registered.instance_id, (send, reader)))
        }
        Err(code) => {
            refuse_stream(&mut send, code).await;
            hub.refuse_connection(conn, code);
            None
        }
    }
}

/// Serve a connection of a registered `instance`: its control stream from
/// registration, if any, then every stream it opens.
async fn serve_registered(
    hub: Arc<Hub>,
    conn: quinn::Connection,
    conn_id: u64,
    instance: String,
    key: PublicKey,
    control: Option<ControlStream>,
) {
    let cfg = hub.config();
    // Admitted: the full connection window (it was small while the key was
    // unknown, `PRE_ADMISSION_RECEIVE_WINDOW`).
    conn.set_receive_window(cfg.receive_window.into());
    let Some(rate) = hub.router().add_connection(
        &instance,
        conn_id,
        conn.clone(),
        cfg.max_connections_per_instance as usize,
        (cfg.rate_per_instance, cfg.rate_burst),
    ) else {
        hub.refuse_connection(&conn, ErrorCode::TooManyConnections);
        return;
    };
    let Some(control_rate) = hub.router().control_bucket(&instance) else {
        // Added just above; gone only if the router lost it, which it
        // never does while this connection is in it.
        hub.refuse_connection(&conn, ErrorCode::Internal);
        return;
    };
    hub.stats().connections_accepted.fetch_add(1, Relaxed);
    info!(%instance, "connected");
    // A registered, unrevoked instance: it gets the fleet secret in force
    // (it may have been offline through a rotation).
    super::fleet::push(&conn, hub.fleet_secret_frame());
    let info = Arc::new(ConnInfo {
        conn_id,
        instance: instance.clone(),
        key,
        conn: conn.clone(),
        rate,
        control_rate,
        agents: AtomicUsize::new(0),
    });
    let mut streams = JoinSet::new();
    // See `core::limits`: raise the stream limit before the peer runs
    // into it.
    let max_streams = limits::max_streams(cfg) as usize;
    let mut stream_limit = limits::initial_streams(cfg) as usize;
    if let Some((send, mut reader)) = control {
        reader.set_max(cfg.max_frame());
        reader.set_frame_timeout(cfg.frame_timeout());
        streams.spawn(super::control::serve_control(
            hub.clone(),
            info.clone(),
            send,
            reader,
            None,
        ));
    }
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(super::stream::serve_stream(hub.clone(), info.clone(), send, recv));
                    while streams.try_join_next().is_some() {}
                    if let Some(raised) = limits::raise_stream_limit(streams.len(), stream_limit, max_streams) {
                        stream_limit = raised;
                        conn.set_max_concurrent_bi_streams((stream_limit as u32).into());
                    }
                }
                Err(e) => {
                    info!(%instance, "disconnected: {e}");
                    break;
                }
            },
            _ = hub.shutdown().cancelled() => break,
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
    hub.router().remove_connection(&instance, conn_id);
}
