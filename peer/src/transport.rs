//! QUIC connection set-up and frame I/O on streams for the peer: the thin
//! I/O layer around `agent_link_proto::codec`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{instance_client_config, TlsIdentity, RELAY_SERVER_NAME};
use agent_link_crypto::Identity;
use agent_link_proto::{codec, ErrorCode, PeerToRelay, RelayToPeer};
use bytes::{Bytes, BytesMut};

use crate::error::{CloseReason, LinkError, Phase};

/// How long one connection attempt may take (at most; less when the
/// caller's deadline is nearer).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client endpoint presenting `identity` and pinning the relay's
/// certificate `fingerprint`.
pub(crate) fn endpoint(
    identity: &Identity,
    fingerprint: [u8; 32],
    v6: bool,
) -> Result<quinn::Endpoint, LinkError> {
    let tls_id = TlsIdentity::self_signed(identity, "agent-link-instance")?;
    let tls = instance_client_config(&tls_id, fingerprint)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .expect("our TLS config is TLS 1.3 with an initial suite QUIC accepts");
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(client_transport_config()));
    let bind: SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket_err = |source| LinkError::Io {
        what: "opening a UDP socket",
        source,
    };
    let socket = udp_socket(bind).map_err(socket_err)?;
    let mut ep = quinn::Endpoint::new(
        endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(socket_err)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Largest UDP payload a peer accepts and probes the path for; what a
/// connection actually uses is also capped by the relay's
/// `max_udp_payload_size` (default 1452, quinn's), so the relay's operator
/// decides. QUIC starts every connection at 1200 bytes and path MTU
/// discovery only raises the size once a probe of it got through. Where the
/// relay allows more and the path carries it (same host, jumbo frames),
/// each packet holds about three times as many small messages, and
/// per-packet work (encryption, ACKs, system calls) is most of what moving
/// a small message costs. On loopback 256-byte messages gained as much at
/// 4096 as at 8952, while larger probes and packet buffers cost connect
/// time and idle memory (README, Performance).
pub const MAX_UDP_PAYLOAD: u16 = 4096;

/// The QUIC transport settings of a peer's connection to the relay (the
/// bench's protocol clients use the same, so they measure what peers get).
pub fn client_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30))
            .expect("30 s is a valid idle timeout"),
    ));
    t.mtu_discovery_config(Some(mtu_discovery(MAX_UDP_PAYLOAD)));
    t
}

/// Path MTU discovery up to `max` bytes of UDP payload (quinn's other
/// discovery settings as they are: its binary search in steps of at least
/// 20 bytes still reaches 1452 from 1200; coarser steps would not).
pub fn mtu_discovery(max: u16) -> quinn::MtuDiscoveryConfig {
    let mut d = quinn::MtuDiscoveryConfig::default();
    d.upper_bound(max);
    d
}

/// Receive buffer asked for a peer's UDP socket (the kernel caps it at
/// `net.core.rmem_max`). The relay forwards a burst of large messages in
/// datagrams much faster than a busy peer process may read them; with the
/// default (~208 KiB) the kernel drops the overflow, each drop costs a QUIC
/// retransmission and halves the congestion window: 64 KiB messages moved
/// at a fraction of what the path carries.
pub const UDP_RECV_BUFFER: usize = 2 << 20;

/// A UDP socket bound to `addr` with the receive buffer a peer wants (see
/// [`UDP_RECV_BUFFER`]); a kernel that refuses the size leaves its default.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if let Err(e) = quinn::udp::UdpSocketState::new((&socket).into())
        .and_then(|s| s.set_recv_buffer_size((&socket).into(), UDP_RECV_BUFFER))
    {
        tracing::debug!("could not enlarge the UDP receive buffer: {e}");
    }
    Ok(socket)
}

/// Endpoint settings of a peer: datagrams up to [`MAX_UDP_PAYLOAD`] accepted.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("MAX_UDP_PAYLOAD is within QUIC's 1200..=65527");
    c
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
    addr: SocketAddr,
    label: &str,
    limit: Duration,
) -> Result<quinn::Connection, LinkError> {
    let unreachable = |reason: String| LinkError::Unreachable {
        addr: label.to_string(),
        reason,
    };
    let connecting = ep
        .connect(addr, RELAY_SERVER_NAME)
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

/// The relay's reason when it closed the connection deliberately.
pub(crate) fn connection_error(e: &quinn::ConnectionError) -> Option<ErrorCode> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => u32::try_from(u64::from(c.error_code))
            .ok()
            .and_then(ErrorCode::from_u32),
        _ => None,
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
    let fut = async {
        let fail = || stream_failure(conn, label, during);
        let (mut send, recv) = conn.open_bi().await.map_err(|_| fail())?;
        send.write_all(&crate::core::encode(req))
            .await
            .map_err(|_| fail())?;
        let mut reader = FrameReader::new(recv);
        let body = reader.next().await.map_err(|_| fail())?.ok_or_else(fail)?;
        let _ = send.finish();
        let frame = codec::decode::<RelayToPeer>(&body).map_err(|_| LinkError::Protocol(during))?;
        match frame {
            RelayToPeer::Error { code } => Err(LinkError::Refused(code)),
            other => answer(other).unwrap_or(Err(LinkError::Protocol(during))),
        }
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| LinkError::Timeout(during))?
}

/// Why reading frames from the relay failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The stream ended inside a frame: what was read of it is not a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// A frame header the protocol does not allow (over the size limit).
    #[error("bad frame: {0}")]
    Frame(#[from] agent_link_proto::ProtoError),
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(#[from] std::io::Error),
}

/// Buffered frame reader.
#[derive(Debug)]
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl FrameReader {
    /// Wrap a receive stream.
    pub(crate) fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Every whole frame buffered (reading once if none is). `Ok(false)` at
    /// the end of the stream.
    pub(crate) async fn next_batch(&mut self, out: &mut Vec<Bytes>) -> Result<bool, ReadError> {
        out.clear();
        match self.next().await? {
            Some(f) => out.push(f),
            None => return Ok(false),
        }
        while let Some(f) = self.split_one()? {
            out.push(f);
        }
        Ok(true)
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly at a frame
    /// boundary, [`ReadError::Truncated`] when it ended inside one (the same
    /// rule as the relay's reader).
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(f) = self.split_one()? {
                return Ok(Some(f));
            }
            self.buf.reserve(16 * 1024);
            match tokio::io::AsyncReadExt::read_buf(&mut self.recv, &mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(ReadError::Truncated),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Stream(e)),
            }
        }
    }

    /// One whole frame's body off the front of the buffer, if there is one.
    fn split_one(&mut self) -> Result<Option<Bytes>, ReadError> {
        let total = codec::split_frame(&self.buf, codec::HARD_MAX_FRAME)?.map(|(_, total)| total);
        Ok(total.map(|total| {
            let mut f = self.buf.split_to(total);
            f.split_off(codec::FRAME_HEADER_LEN).freeze()
        }))
    }
}
