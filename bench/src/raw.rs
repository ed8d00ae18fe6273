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
use agent_link_crypto::{FleetKey, Identity};
use agent_link_proto::{
    codec, Address, EnvelopeBody, OpenedEnvelope, PeerToRelay, Receipt, RelayToPeer,
};
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

/// One connection with one agent stream.
pub struct RawAgent {
    _conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buf: Vec<u8>,
    _endpoint: quinn::Endpoint,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl RawAgent {
    pub async fn connect(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        identity: &Identity,
        agent: &str,
        receive: bool,
    ) -> Result<Self> {
        let tls_id = TlsIdentity::self_signed(identity, "agent-link-instance")?;
        let tls = instance_client_config(&tls_id, fingerprint)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_secs(5)));
        cfg.transport_config(Arc::new(t));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(cfg);
        let conn = endpoint
            .connect(addr, agent_link_crypto::tls::RELAY_SERVER_NAME)?
            .await
            .context("connecting to the relay")?;
        let (send, recv) = conn.open_bi().await?;
        let mut me = Self {
            _conn: conn,
            send,
            recv,
            buf: Vec::new(),
            _endpoint: endpoint,
        };
        me.send
            .write_all(&codec::frame(&PeerToRelay::Attach { agent, receive })?)
            .await?;
        let first = me.next_frame().await?.context("relay closed the stream")?;
        match codec::decode::<RelayToPeer>(&first)? {
            RelayToPeer::Attached { .. } => Ok(me),
            other => bail!("attach refused: {other:?}"),
        }
    }

    /// Read until at least one whole frame is buffered; returns one frame.
    pub async fn next_frame(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some((body, used)) = codec::split_frame(&self.buf, codec::HARD_MAX_FRAME)? {
                let b = body.to_vec();
                self.buf.drain(..used);
                return Ok(Some(b));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn fill(&mut self) -> Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        match self.recv.read(&mut chunk).await? {
            None => Ok(false),
            Some(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
        }
    }

    /// Every whole frame buffered now (reading once if none is).
    pub async fn frames(&mut self, out: &mut Vec<Vec<u8>>) -> Result<bool> {
        out.clear();
        loop {
            while let Some((body, used)) = codec::split_frame(&self.buf, codec::HARD_MAX_FRAME)? {
                out.push(body.to_vec());
                self.buf.drain(..used);
            }
            if !out.is_empty() {
                return Ok(true);
            }
            if !self.fill().await? {
                return Ok(false);
            }
        }
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

/// Result of one sender.
pub struct SenderResult {
    pub delivered_in_window: u64,
    pub failed: u64,
    pub latency: Histogram<u64>,
}

/// Sender: keep `window` messages in flight from a pool signed in advance;
/// record send→receipt latency for receipts that arrive inside
/// `[measure_from, measure_until)`.
#[allow(clippy::too_many_arguments)]
pub async fn run_sender(
    mut tx: RawAgent,
    identity: &Identity,
    fleet: &FleetKey,
    from: (&str, &str),
    to: (&str, &str),
    size: usize,
    window: usize,
    measure_from: Instant,
    measure_until: Instant,
) -> Result<SenderResult> {
    let pool_len = (window * 8).max(256);
    let payload = vec![0x5au8; size];
    let sent_at_ms = now_ms();
    let mut pool = Vec::with_capacity(pool_len);
    for i in 0..pool_len {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_le_bytes());
        id[8..].copy_from_slice(&rand::random::<[u8; 8]>());
        let env = EnvelopeBody {
            version: agent_link_proto::VERSION,
            id,
            from: Address {
                instance: from.0,
                agent: from.1,
            },
            to: Address {
                instance: to.0,
                agent: to.1,
            },
            sent_at_ms,
            payload: &payload,
        }
        .seal(identity, fleet)?;
        pool.push(codec::frame(&PeerToRelay::Send { envelope: &env })?);
    }
    let mut sent_at = vec![Instant::now(); pool_len];
    let mut next = 0usize;
    let mut batch = Vec::new();
    for _ in 0..window {
        sent_at[next] = Instant::now();
        batch.extend_from_slice(&pool[next]);
        next = (next + 1) % pool_len;
    }
    tx.send.write_all(&batch).await?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut delivered = 0u64;
    let mut failed = 0u64;
    let mut frames = Vec::new();
    loop {
        let now = Instant::now();
        if now >= measure_until {
            break;
        }
        let more = tokio::select! {
            r = tx.frames(&mut frames) => r?,
            _ = tokio::time::sleep_until((measure_until).into()) => break,
        };
        if !more {
            bail!("relay closed the sender's stream");
        }
        batch.clear();
        let now = Instant::now();
        for f in &frames {
            let idx = match codec::decode::<RelayToPeer>(f)? {
                RelayToPeer::Receipt { receipt } => {
                    let i = u64::from_le_bytes(receipt.id[..8].try_into()?) as usize;
                    if now >= measure_from {
                        delivered += 1;
                        let _ = latency
                            .record(now.duration_since(sent_at[i % pool_len]).as_micros() as u64);
                    }
                    i
                }
                RelayToPeer::Failed { id, .. } => {
                    failed += 1;
                    u64::from_le_bytes(id[..8].try_into()?) as usize
                }
                other => bail!("unexpected frame {other:?}"),
            };
            let _ = idx;
            sent_at[next] = now;
            batch.extend_from_slice(&pool[next]);
            next = (next + 1) % pool_len;
        }
        tx.send.write_all(&batch).await?;
    }
    Ok(SenderResult {
        delivered_in_window: delivered,
        failed,
        latency,
    })
}
