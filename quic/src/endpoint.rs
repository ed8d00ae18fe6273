//! Endpoint settings shared by every side: the UDP socket with a larger
//! receive buffer, path MTU discovery, the client transport baseline (what
//! a peer's connection uses, and what the bench and the tests copy so they
//! measure and test what peers get), and the relay's close code.

use std::net::SocketAddr;
use std::time::Duration;

use agent_link_proto::ErrorCode;

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

/// Receive buffer a peer (or a bench or test client) asks for its UDP
/// socket; the relay asks for its own, larger one. The kernel caps it at
/// `net.core.rmem_max`. The relay forwards a burst of large messages in
/// datagrams much faster than a busy peer process may read them; with the
/// default (~208 KiB) the kernel drops the overflow, each drop costs a QUIC
/// retransmission and halves the congestion window: 64 KiB messages moved
/// at a fraction of what the path carries.
pub const UDP_RECV_BUFFER: usize = 2 << 20;

/// A UDP socket bound to `addr`, asking the kernel for a receive buffer of
/// `recv_buffer` bytes ([`UDP_RECV_BUFFER`] for a client; the relay passes
/// its own). A kernel that refuses the size leaves its default, with a
/// warning: the socket works, but bursts may be dropped and retransmitted.
pub fn udp_socket(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if let Err(e) = quinn::udp::UdpSocketState::new((&socket).into())
        .and_then(|s| s.set_recv_buffer_size((&socket).into(), recv_buffer))
    {
        tracing::warn!(%addr, recv_buffer, "could not enlarge the UDP receive buffer: {e}");
    }
    Ok(socket)
}

/// Path MTU discovery up to `max` bytes of UDP payload (quinn's other
/// discovery settings as they are: its binary search in steps of at least
/// 20 bytes still reaches 1452 from 1200; coarser steps would not).
pub fn mtu_discovery(max: u16) -> quinn::MtuDiscoveryConfig {
    let mut d = quinn::MtuDiscoveryConfig::default();
    d.upper_bound(max);
    d
}

/// How long a peer's connection may be quiet before the peer sends a PING.
/// It also bounds how long a quiet peer (a receiver with nothing to send)
/// goes on with a connection that a SIGKILLed and restarted relay no longer
/// knows: only its next packet shows it. A sender that keeps sending
/// re-attaches at once and retries `TargetOffline` only inside its 8 s
/// post-reconnect grace, so the receiver must be back before that. 10 s (a
/// third fewer idle datagrams at 16,000 connections) broke it; the fault
/// test `a_quiet_receiver_is_back_within_the_senders_grace_after_a_relay_restart`
/// holds it.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The QUIC transport settings of a peer's connection to the relay (the
/// bench's protocol clients use the same, so they measure what peers get):
/// a keep-alive after [`KEEP_ALIVE`] of quiet, 30 s of silence closes the
/// connection, path MTU discovery up to [`MAX_UDP_PAYLOAD`].
pub fn client_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30))
            .expect("30 s is a valid idle timeout"),
    ));
    t.mtu_discovery_config(Some(mtu_discovery(MAX_UDP_PAYLOAD)));
    t
}

/// How long a peer with other relays to go to keeps a quiet connection
/// before it sends a PING, and how long a silent one lives
/// ([`failover_client_transport_config`]).
pub const FAILOVER_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// See [`FAILOVER_KEEP_ALIVE`].
pub const FAILOVER_IDLE_TIMEOUT: Duration = Duration::from_secs(7);

/// [`client_transport_config`] for a peer of a fleet of relays: a relay
/// killed with -9 sends no close, so only silence shows it is gone; after
/// [`FAILOVER_IDLE_TIMEOUT`] (three PINGs unanswered) the peer moves to
/// another relay, in time to be attached again within 10 s. The price is a
/// PING every [`FAILOVER_KEEP_ALIVE`] per quiet connection.
pub fn failover_client_transport_config() -> quinn::TransportConfig {
    let mut t = client_transport_config();
    t.keep_alive_interval(Some(FAILOVER_KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(FAILOVER_IDLE_TIMEOUT).expect("7 s is a valid idle timeout"),
    ));
    t
}

/// Endpoint settings of a client: datagrams up to [`MAX_UDP_PAYLOAD`]
/// accepted.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("MAX_UDP_PAYLOAD is within QUIC's 1200..=65527");
    c
}

/// The reason the other side gave when it closed the connection on
/// purpose: the relay closes with an [`ErrorCode`] as the application close
/// code (PROTOCOL.md §6). `None` for every other end (timeout, reset, a
/// local close, a code this build does not know).
pub fn connection_error(e: &quinn::ConnectionError) -> Option<ErrorCode> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => u32::try_from(u64::from(c.error_code))
            .ok()
            .and_then(ErrorCode::from_u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_map_back() {
        let closed = |code: u32| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: Default::default(),
            })
        };
        assert_eq!(
            connection_error(&closed(ErrorCode::Revoked.as_u32())),
            Some(ErrorCode::Revoked)
        );
        assert_eq!(connection_error(&closed(9999)), None);
        assert_eq!(connection_error(&quinn::ConnectionError::TimedOut), None);
    }

    #[test]
    fn settings_build() {
        let _ = client_transport_config();
        let _ = endpoint_config();
        let s = udp_socket("127.0.0.1:0".parse().unwrap(), UDP_RECV_BUFFER).unwrap();
        assert!(s.local_addr().unwrap().port() != 0);
    }
}
