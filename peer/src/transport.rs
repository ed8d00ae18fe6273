//! The peer's QUIC set-up (endpoint, resolve, connect) and its one
//! request/reply helper, over the frame layer shared with the relay
//! (`agent_link_quic`), with errors mapped once to [`LinkError`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{
    ca_roots, instance_client_config, instance_client_config_ca, TlsIdentity, RELAY_SERVER_NAME,
};
use agent_link_crypto::Identity;
use agent_link_proto::{codec, PeerToRelay, RelayToPeer, RelayTrust};
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

/// The CA roots CA-issued relay certificates are checked against: the
/// config's `relay_ca_file`, else the system's; read once, when a relay
/// needs them.
#[derive(Debug)]
pub(crate) struct CaRoots {
    file: Option<std::path::PathBuf>,
    roots: Option<Arc<agent_link_crypto::tls::RootCertStore>>,
}

impl CaRoots {
    pub(crate) fn new(file: Option<std::path::PathBuf>) -> Self {
        Self { file, roots: None }
    }

    /// Roots already read (from the file they came from).
    pub(crate) fn loaded(roots: agent_link_crypto::tls::RootCertStore) -> Self {
        Self {
            file: None,
            roots: Some(Arc::new(roots)),
        }
    }

    fn get(&mut self) -> Result<Arc<agent_link_crypto::tls::RootCertStore>, LinkError> {
        if let Some(r) = &self.roots {
            return Ok(r.clone());
        }
        let r = Arc::new(ca_roots(self.file.as_deref())?);
        self.roots = Some(r.clone());
        Ok(r)
    }
}

/// The client configuration for one relay: present `tls`, and know the
/// relay by `trust` (its pinned certificate, or a chain to `ca`'s roots);
/// with `failover` (other relays to go to) the transport notices a silent
/// relay sooner.
pub(crate) fn client_config(
    tls: &TlsIdentity,
    trust: RelayTrust,
    ca: &mut CaRoots,
    failover: bool,
) -> Result<quinn::ClientConfig, LinkError> {
    let tls = match trust {
        RelayTrust::Pinned(fingerprint) => instance_client_config(tls, fingerprint)?,
        RelayTrust::Ca => instance_client_config_ca(tls, ca.get()?)?,
    };
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

/// The TLS server name to ask the relay `label` (`host:port`) for: with a
/// pin, a fixed name (the pin is what authenticates); with a CA chain, the
/// host the certificate must be for.
pub(crate) fn server_name(label: &str, trust: RelayTrust) -> String {
    match trust {
        RelayTrust::Pinned(_) => RELAY_SERVER_NAME.to_string(),
        RelayTrust::Ca => {
            let host = label.rsplit_once(':').map_or(label, |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        }
    }
}

/// One connection attempt to `label` (asking for `server_name`), bounded
/// by `limit`.
pub(crate) async fn connect(
    ep: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    label: &str,
    server_name: &str,
    limit: Duration,
) -> Result<quinn::Connection, LinkError> {
    let unreachable = |reason: String| LinkError::Unreachable {
        addr: label.to_string(),
        reason,
    };
    let connecting = ep
        .connect_with(config.clone(), addr, server_name)
        .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(match connection_error(&e) {
            Some(code) => LinkError::Refused(code),
            // rustls' alerts for a certificate it refused: bad_certificate
            // (42), unknown_ca (48), decrypt_error (51) and the other
            // certificate alerts (43-46).
            None if certificate_refused(&e) => LinkError::UntrustedRelay {
                addr: label.to_string(),
                reason: e.to_string(),
            },
            None => unreachable(e.to_string()),
        }),
        Err(_) => Err(unreachable(format!(
            "no answer within {:.1} s",
            limit.as_secs_f64()
        ))),
    }
}

/// Whether the handshake failed because this side refused the relay's
/// certificate.
fn certificate_refused(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            // A TLS alert travels as the QUIC crypto error 0x100 + alert.
            matches!(code.checked_sub(0x100), Some(42..=46 | 48 | 51))
                && t.reason.contains("certificate")
        }
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_relay_is_asked_for_its_host_and_a_pinned_one_for_the_fixed_name() {
        let ca = RelayTrust::Ca;
        assert_eq!(
            server_name("relay.example.org:4433", ca),
            "relay.example.org"
        );
        assert_eq!(server_name("127.0.0.1:1", ca), "127.0.0.1");
        assert_eq!(server_name("[::1]:1", ca), "::1");
        assert_eq!(
            server_name("relay.example.org:4433", RelayTrust::Pinned([0; 32])),
            RELAY_SERVER_NAME
        );
    }
}
