//! Bench-side protocol clients for the relay-ceiling figure: senders send
//! envelopes signed before the timed window, receivers acknowledge without
//! verifying Ed25519. This measures the relay (its HMAC, sender-binding and
//! timestamp checks stay on), not the load generator's crypto. The library's
//! verification is never switched off: these clients simply are not the
//! library.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link_crypto::tls::{instance_client_config, TlsIdentity};
use agent_link_crypto::{FleetKey, FleetSecret, Identity};
use agent_link_proto::{
    codec, Address, EnvelopeBody, OpenedEnvelope, PeerToRelay, Receipt, RelayToPeer,
};
use agent_link_quic::endpoint::{
    client_transport_config, endpoint_config, udp_socket, UDP_RECV_BUFFER,
};
use agent_link_quic::frames::{request, FrameReader};
use anyhow::{bail, Context, Result};
use bytes::Bytes;

use crate::load::{Outcome, Plan, Tracker};

/// One QUIC connection to the relay (one instance).
pub struct RawConn {
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

/// One agent stream on a [`RawConn`] (or, for the direct baseline, a plain
/// bidirectional stream to a receiver). It reads with the frame reader the
/// relay and the peer use (limit `HARD_MAX_FRAME`, no frame deadline).
pub struct RawAgent {
    _conn: quinn::Connection,
    pub send: quinn::SendStream,
    reader: FrameReader,
}

pub fn now_ms() -> u64 {
    agent_link_proto::clock::unix_ms(std::time::SystemTime::now())
}

/// QUIC client endpoint presenting `identity`, pinning `fingerprint`.
pub fn client_endpoint(identity: &Identity, fingerprint: [u8; 32]) -> Result<quinn::Endpoint> {
    let tls_id = TlsIdentity::self_signed(identity, "agent-link-instance")?;
    let tls = instance_client_config(&tls_id, fingerprint)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    // The library's own transport and endpoint settings: the ceiling
    // measures the relay as peers see it.
    cfg.transport_config(Arc::new(client_transport_config()));
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config(),
        None,
        udp_socket("127.0.0.1:0".parse()?, UDP_RECV_BUFFER)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

impl RawConn {
    pub async fn connect(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        identity: &Identity,
    ) -> Result<Self> {
        let endpoint = client_endpoint(identity, fingerprint)?;
        let conn = endpoint
            .connect(addr, agent_link_crypto::tls::RELAY_SERVER_NAME)?
            .await
            .context("connecting")?;
        Ok(Self {
            conn,
            _endpoint: endpoint,
        })
    }

    /// Connect as `instance`, registering online with `secret` first when
    /// the relay does not know it yet (`None`: registered offline).
    pub async fn join(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        identity: &Identity,
        instance: &str,
        secret: Option<&FleetSecret>,
    ) -> Result<Self> {
        let c = Self::connect(addr, fingerprint, identity)
            .await
            .context("connecting to the relay")?;
        if let Some(secret) = secret {
            c.register(identity, instance, secret).await?;
        }
        Ok(c)
    }

    /// Online registration with the join token's fleet secret, the way
    /// `agent-link init` does it (PROTOCOL.md §5.3): the proof is bound to
    /// this TLS session and key. The connection then serves as the instance.
    pub async fn register(
        &self,
        identity: &Identity,
        instance_id: &str,
        secret: &FleetSecret,
    ) -> Result<()> {
        let proof = agent_link_quic::exporter::register_proof(
            &self.conn,
            &secret.key(),
            &identity.public_key(),
            instance_id,
        )?;
        let register = PeerToRelay::Register {
            instance_id,
            name: instance_id,
            proof,
        };
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            request(&self.conn, &register, codec::HARD_MAX_FRAME),
        )
        .await
        .context("registration timed out")?
        .context("registration")?;
        match codec::decode::<RelayToPeer>(&reply)? {
            RelayToPeer::Registered { .. } => Ok(()),
            other => bail!("registration of {instance_id} refused: {other:?}"),
        }
    }

    /// Open an agent stream and attach `agent`.
    pub async fn attach(&self, agent: &str, receive: bool) -> Result<RawAgent> {
        let mut me = RawAgent::open(&self.conn).await?;
        me.send
            .write_all(&codec::frame(&PeerToRelay::Attach { agent, receive })?)
            .await?;
        let first = me.next_frame().await?.context("relay closed the stream")?;
        match codec::decode::<RelayToPeer>(&first)? {
            RelayToPeer::Attached { .. } => Ok(me),
            other => bail!("attach refused: {other:?}"),
        }
    }
}

impl RawAgent {
    /// A new bidirectional stream on `conn`, nothing sent yet.
    pub async fn open(conn: &quinn::Connection) -> Result<Self> {
        let (send, recv) = conn.open_bi().await?;
        Ok(Self::from_streams(conn.clone(), send, recv))
    }

    pub fn from_streams(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Self {
        Self {
            _conn: conn,
            send,
            reader: FrameReader::new(recv, codec::HARD_MAX_FRAME),
        }
    }

    /// The next frame; `None` at a clean end of the stream.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>> {
        Ok(self.reader.next().await?)
    }

    /// Every whole frame buffered now (reading once if none is).
    /// `Ok(false)` at a clean end of the stream. Cancel-safe (the callers
    /// `select!` it against a timer).
    pub async fn frames(&mut self, out: &mut Vec<Bytes>) -> Result<bool> {
        Ok(self.reader.next_batch(out, usize::MAX).await?)
    }
}

/// Receiver: acknowledge every delivery at once, in batches, without
/// verifying signatures.
pub async fn run_receiver(
    mut rx: RawAgent,
    me: (String, String),
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let mut frames = Vec::new();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let more = tokio::select! {
            r = rx.frames(&mut frames) => r?,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        if !more {
            break;
        }
        out.clear();
        for f in &frames {
            if let Ok(RelayToPeer::Deliver {
                reply_token,
                envelope,
                ..
            }) = codec::decode::<RelayToPeer>(f)
            {
                let env = OpenedEnvelope::open(envelope)?;
                let receipt = Receipt {
                    id: env.body.id,
                    from: Address {
                        instance: &me.0,
                        agent: &me.1,
                    },
                    delivered_at_ms: now_ms(),
                };
                codec::encode_frame(
                    &PeerToRelay::Ack {
                        reply_token,
                        receipt,
                    },
                    &mut out,
                )?;
            }
        }
        if !out.is_empty() {
            rx.send.write_all(&out).await?;
        }
    }
    Ok(())
}

/// A sender's pool, signed before the timed window: one `Send` frame per
/// slot (slot number in the first 8 bytes of the id), to `targets` round
/// robin.
pub fn sign_pool(
    identity: &Identity,
    fleet: &FleetKey,
    from: (&str, &str),
    targets: &[(String, String)],
    size: usize,
    slots: usize,
) -> Result<Vec<Vec<u8>>> {
    let payload = vec![0x5au8; size];
    // Signed now; --duration is capped so these stay inside the relay's
    // timestamp window for the whole run.
    let sent_at_ms = now_ms();
    let mut pool = Vec::with_capacity(slots);
    for i in 0..slots {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
        let to = &targets[i % targets.len()];
        let env = EnvelopeBody {
            version: agent_link_proto::VERSION,
            id,
            from: Address {
                instance: from.0,
                agent: from.1,
            },
            to: Address {
                instance: &to.0,
                agent: &to.1,
            },
            sent_at_ms,
            payload: &payload,
        }
        .seal(identity, fleet)?;
        pool.push(codec::frame(&PeerToRelay::Send { envelope: &env })?);
    }
    Ok(pool)
}

/// Sender: sends slots of `pool` as the [`Tracker`] says and completes them
/// on `Receipt` / `Failed`. The same code drives the relay ceiling and the
/// direct baseline (whose receivers answer with the same `Receipt` frames).
pub async fn run_sender(mut tx: RawAgent, pool: Vec<Vec<u8>>, plan: Plan) -> Result<Outcome> {
    let mut tr = Tracker::new(plan, pool.len());
    tokio::time::sleep_until(plan.start.into()).await;
    let mut batch = Vec::new();
    let mut frames = Vec::new();
    let slot_of =
        |id: &[u8]| -> Result<usize> { Ok(u64::from_le_bytes(id[..8].try_into()?) as usize) };
    loop {
        let now = Instant::now();
        batch.clear();
        while let Some(slot) = tr.take_due(now) {
            batch.extend_from_slice(&pool[slot]);
        }
        if !batch.is_empty() {
            tx.send.write_all(&batch).await?;
        }
        if now >= tr.measure_until() {
            break;
        }
        let wake = tr.wake_at().unwrap_or(tr.measure_until());
        let more = tokio::select! {
            r = tx.frames(&mut frames) => r?,
            _ = tokio::time::sleep_until(wake.into()) => continue,
        };
        if !more {
            bail!("the stream closed under the sender");
        }
        let now = Instant::now();
        for f in &frames {
            match codec::decode::<RelayToPeer>(f)? {
                RelayToPeer::Receipt { receipt } => {
                    tr.complete(slot_of(&receipt.id)?, now, true);
                }
                RelayToPeer::Failed { id, code } => {
                    if tr.complete(slot_of(&id)?, now, false) {
                        *tr.out.failed_by.entry(format!("{code:?}")).or_default() += 1;
                    }
                }
                other => bail!("unexpected frame {other:?}"),
            }
        }
    }
    Ok(tr.out)
}

/// What the bench's connections saw of QUIC, summed: datagrams and the
/// frames that matter per message in each direction (from quinn's
/// per-connection counters). Read at two times, the difference is what one
/// measured window cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuicTally {
    /// Datagrams the relay sent to the bench / the bench sent to the relay.
    pub rx_datagrams: u64,
    pub tx_datagrams: u64,
    /// ACK frames from the relay / to the relay.
    pub rx_acks: u64,
    pub tx_acks: u64,
    /// STREAM frames from the relay / to the relay.
    pub rx_stream: u64,
    pub tx_stream: u64,
    /// PING frames (keep-alives, loss probes) from the relay / to it.
    pub rx_ping: u64,
    pub tx_ping: u64,
    /// Packets the bench's side declared lost.
    pub lost: u64,
}

impl QuicTally {
    pub fn of(conns: &[RawConn]) -> Self {
        let mut t = Self::default();
        for c in conns {
            let s = c.conn.stats();
            t.rx_datagrams += s.udp_rx.datagrams;
            t.tx_datagrams += s.udp_tx.datagrams;
            t.rx_acks += s.frame_rx.acks;
            t.tx_acks += s.frame_tx.acks;
            t.rx_stream += s.frame_rx.stream;
            t.tx_stream += s.frame_tx.stream;
            t.rx_ping += s.frame_rx.ping;
            t.tx_ping += s.frame_tx.ping;
            t.lost += s.path.lost_packets;
        }
        t
    }

    /// One line per direction, per delivered message, since `before`.
    pub fn print_since(&self, before: &QuicTally, delivered: u64) {
        let d = delivered.max(1) as f64;
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / d;
        eprintln!(
            "quic per message: relay→bench {:.2} datagrams ({:.2} STREAM, {:.2} ACK, {:.2} PING frames); \
bench→relay {:.2} datagrams ({:.2} STREAM, {:.2} ACK, {:.2} PING); {:.3} lost by the bench's side",
            per(self.rx_datagrams, before.rx_datagrams),
            per(self.rx_stream, before.rx_stream),
            per(self.rx_acks, before.rx_acks),
            per(self.rx_ping, before.rx_ping),
            per(self.tx_datagrams, before.tx_datagrams),
            per(self.tx_stream, before.tx_stream),
            per(self.tx_acks, before.tx_acks),
            per(self.tx_ping, before.tx_ping),
            per(self.lost, before.lost),
        );
    }
}
