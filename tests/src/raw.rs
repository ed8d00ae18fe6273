//! A protocol-level client: one QUIC connection, frames written and read by
//! hand, to send what the peer library never would (spoofed senders, bad
//! tags, oversized frames). It reads with the frame reader the relay and the
//! peer use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{instance_client_config, TlsIdentity};
use agent_link_crypto::{FleetKey, Identity};
use agent_link_proto::{codec, Address, EnvelopeBody, PeerToRelay, RelayToPeer};
use agent_link_quic::frames::{FrameReader, ReadError};

use crate::{TestRelay, WAIT};

/// A protocol-level client: one QUIC connection, frames by hand.
pub struct RawClient {
    pub conn: quinn::Connection,
    pub identity: Identity,
    pub fleet: FleetKey,
    pub instance: String,
    pub endpoint: quinn::Endpoint,
}

/// One bidirectional stream of a [`RawClient`]. It reads with the frame
/// reader the relay and the peer use ([`FrameReader`], limit
/// `HARD_MAX_FRAME`, no frame deadline: each read has its own timeout).
pub struct RawStream {
    pub send: quinn::SendStream,
    reader: FrameReader,
}

/// A decoded relay frame, owned (so it outlives the read buffer).
#[derive(Debug)]
pub struct OwnedFrame(pub Vec<u8>);

impl OwnedFrame {
    /// Decode the frame.
    pub fn get(&self) -> RelayToPeer<'_> {
        codec::decode(&self.0).unwrap()
    }
}

/// The client TLS/QUIC config for `identity` against `fingerprint`.
pub fn client_config(identity: &Identity, fingerprint: [u8; 32]) -> quinn::ClientConfig {
    let tls_id = TlsIdentity::self_signed(identity, "agent-link-instance").unwrap();
    let tls = instance_client_config(&tls_id, fingerprint).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

impl RawClient {
    /// Connect with `identity` (registered or not) as `instance`.
    pub async fn connect(
        relay: &TestRelay,
        identity: Identity,
        instance: &str,
    ) -> anyhow::Result<Self> {
        Self::connect_with(
            relay.addr,
            relay.token.pinned().expect("a pinned relay"),
            relay.fleet_key(),
            identity,
            instance,
        )
        .await
    }

    /// Connect to `addr`, pinning `fingerprint`.
    pub async fn connect_with(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        fleet: FleetKey,
        identity: Identity,
        instance: &str,
    ) -> anyhow::Result<Self> {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())?;
        endpoint.set_default_client_config(client_config(&identity, fingerprint));
        Self::connect_on(endpoint, addr, fleet, identity, instance).await
    }

    /// Connect to `addr` on `endpoint`, whose default client config the
    /// caller set (to try other endpoint or transport settings).
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        fleet: FleetKey,
        identity: Identity,
        instance: &str,
    ) -> anyhow::Result<Self> {
        let conn = tokio::time::timeout(
            WAIT,
            endpoint.connect(addr, agent_link_crypto::tls::RELAY_SERVER_NAME)?,
        )
        .await??;
        Ok(Self {
            conn,
            identity,
            fleet,
            instance: instance.to_string(),
            endpoint,
        })
    }

    /// Open a stream.
    pub async fn open(&self) -> RawStream {
        let (send, recv) = self.conn.open_bi().await.unwrap();
        RawStream {
            send,
            reader: FrameReader::new(recv, codec::HARD_MAX_FRAME),
        }
    }

    /// Open an agent stream and wait for `Attached`.
    pub async fn attach(&self, agent: &str, receive: bool) -> RawStream {
        let mut s = self.open().await;
        s.write(&PeerToRelay::Attach { agent, receive }).await;
        let f = s.read().await.expect("attach reply");
        assert!(
            matches!(f.get(), RelayToPeer::Attached { .. }),
            "{:?}",
            f.get()
        );
        s
    }

    /// Register online with the fleet secret, as `agent-link init` does.
    pub async fn register(&self, instance_id: &str) -> OwnedFrame {
        let proof = agent_link_quic::exporter::register_proof(
            &self.conn,
            &self.fleet,
            &self.identity.public_key(),
            instance_id,
        )
        .unwrap();
        let mut s = self.open().await;
        s.write(&PeerToRelay::Register {
            instance_id,
            name: instance_id,
            proof,
        })
        .await;
        s.read().await.expect("register reply")
    }

    /// A sealed envelope from `self.instance/from_agent` to `to`.
    pub fn envelope(
        &self,
        id: [u8; 16],
        from_agent: &str,
        to: &str,
        sent_at_ms: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        EnvelopeBody {
            version: agent_link_proto::VERSION,
            id,
            from: Address {
                instance: &self.instance,
                agent: from_agent,
            },
            to: Address::parse(to).unwrap(),
            sent_at_ms,
            payload,
        }
        .seal(&self.identity, &self.fleet)
        .unwrap()
    }
}

impl RawStream {
    /// Write one frame.
    pub async fn write(&mut self, f: &PeerToRelay<'_>) {
        self.write_raw(&codec::frame(f).unwrap()).await;
    }

    /// Write raw bytes (may be a broken frame).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// Send an envelope.
    pub async fn send_envelope(&mut self, envelope: &[u8]) {
        self.write(&PeerToRelay::Send { envelope }).await;
    }

    /// The next frame within [`WAIT`]; `None` on end of stream or error.
    pub async fn read(&mut self) -> Option<OwnedFrame> {
        self.read_within(WAIT).await.ok().flatten()
    }

    /// The next frame within `limit`: `Err(())` on timeout, `Ok(None)` at the
    /// end of the stream or when the stream or connection failed. A frame
    /// header over `HARD_MAX_FRAME` or a stream that ends mid-frame panics:
    /// the relay never sends either, so a test must not read past it. (The
    /// reader is cancel-safe: a timeout loses no bytes.)
    pub async fn read_within(&mut self, limit: Duration) -> Result<Option<OwnedFrame>, ()> {
        match tokio::time::timeout(limit, self.reader.next()).await {
            Err(_) => Err(()),
            Ok(Ok(f)) => Ok(f.map(|body| OwnedFrame(body.to_vec()))),
            Ok(Err(ReadError::Stream(_))) => Ok(None),
            Ok(Err(e)) => panic!("the relay sent a malformed stream: {e}"),
        }
    }
}

/// Random 16-byte id.
pub fn random_id() -> [u8; 16] {
    rand::random()
}
