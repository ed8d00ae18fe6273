//! The peer's QUIC set-up (endpoint, resolve, connect) and its one
//! request/reply helper, over the frame layer shared with the relay
//! (`agent_link_quic`), with errors mapped once to [`LinkError`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{instance_client_config, TlsIdentity, RELAY_SERVER_NAME};
use agent_link_crypto::Identity;
use agent_link_proto::{codec, PeerToRelay, RelayToPeer};
use agent_link_quic::endpoint::{
    client_transport_config, connection_error, endpoint_config, failover_client_transport_config,
    udp_socket, UDP_RECV_BUFFER,
};
use agent_link_quic::frames;

use crate::error::{CloseReason, LinkError, Phase};

/// How long one connection attempt may take (at most; less when the
/// caller's deadline is nearer).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection attempt may take when other relays are left to
/// try: a relay that is down answers nothing, and each second spent on it
/// is a second longer to fail over.
pub(crate) const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The client configuration for one relay: present `tls` and pin the
/// relay's certificate `fingerprint`; with `failover` (other relays to go
/// to) the transport notices a silent relay sooner.
pub(crate) fn client_config(
    tls: &TlsIdentity,
    fingerprint: [u8; 32],
    failover: bool,
) -> Result<quinn::ClientConfig, LinkError> {
    let tls = instance_client_config(tls, fingerprint)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .expect("our TLS config is TLS 1.3 with an initial suite QUIC accepts");
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(if failover {
        failover_client_transport_config()
    } else {
        client_transport_config()
    }));
    Ok(cfg)
}

/// This instance's TLS identity (a certificate of its own key).
pub(crate) fn tls_identity(identity: &Identity) -> Result<TlsIdentity, LinkError> {
    Ok(TlsIdentity::self_signed(identity, "agent-link-instance")?)
}

/// A client endpoint on a fresh UDP socket, of IPv6 when `v6`; each
/// connection brings its own [`client_config`].
pub(crate) fn endpoint(v6: bool) -> Result<quinn::Endpoint, LinkError> {
    let bind: SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket_err = |source| LinkError::Io {
        what: "opening a UDP socket",
        source,
    };
    let socket = udp_socket(bind, UDP_RECV_BUFFER).map_err(socket_err)?;
    quinn::Endpoint::new(
        endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(socket_err)
}

/// Resolve `host:port`.
pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| LinkError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .next()
        .ok_or_else(|| LinkError::Unreachable {
            addr: addr.to_string(),
            reason: "no address found".into(),
        })
}

/// One connection attempt, bounded by `limit`.
pub(crate) async fn connect(
    ep: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    label: &str,
    limit: Duration,
) -> Result<quinn::Connection, LinkError> {
    let unreachable = |reason: String| LinkError::Unreachable {
        addr: label.to_string(),
        reason,
    };
    let connecting = ep
        .connect_with(config.clone(), addr, RELAY_SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => {
            Err(connection_error(&e).map_or_else(|| unreachable(e.to_string()), LinkError::Refused))
        }
        Err(_) => Err(unreachable(format!(
            "no answer within {:.1} s",
            limit.as_secs_f64()
        ))),
    }
}

/// The error for a stream operation that failed: the relay's reason when it
/// closed the connection deliberately (e.g. `Revoked`), else that the
/// connection went away during `during`.
pub(crate) fn stream_failure(conn: &quinn::Connection, label: &str, during: Phase) -> LinkError {
    match conn.close_reason().as_ref().and_then(connection_error) {
        Some(code) => LinkError::Refused(code),
        None if conn.close_reason().is_some() => LinkError::Closed(CloseReason::ConnectionLost),
        None => LinkError::Unreachable {
            addr: label.to_string(),
            reason: format!("the stream broke during {during}"),
        },
    }
}

/// One request and its one reply on a fresh stream (status, registration),
/// bounded by `limit`.
pub(crate) async fn request<T>(
    conn: &quinn::Connection,
    label: &str,
    req: &PeerToRelay<'_>,
    during: Phase,
    limit: Duration,
    answer: impl FnOnce(RelayToPeer<'_>) -> Option<Result<T, LinkError>>,
) -> Result<T, LinkError> {
    let body = tokio::time::timeout(limit, frames::request(conn, req, codec::HARD_MAX_FRAME))
        .await
        .map_err(|_| LinkError::Timeout(during))?
        .map_err(|e| match e.close_code() {
            Some(code) => LinkError::Refused(code),
            None => stream_failure(conn, label, during),
        })?;
    let frame = codec::decode::<RelayToPeer>(&body).map_err(|_| LinkError::Protocol(during))?;
    match frame {
        RelayToPeer::Error { code } => Err(LinkError::Refused(code)),
        other => answer(other).unwrap_or(Err(LinkError::Protocol(during))),
    }
}
