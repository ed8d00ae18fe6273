//! Forged QUIC Initial packets, the way a connection flood sends them: each
//! datagram is a valid client Initial (QUIC v1, one TLS ClientHello offering
//! the given ALPN, padded to 1200 bytes) under a fresh random destination
//! connection id, from a sender that never reads the answer. To the relay
//! each looks like a new client from an address that may be forged: a
//! spoofer cannot receive what the relay sends back, and neither does this
//! sender (it ignores Retry packets, handshakes, everything).
//!
//! One ClientHello is made once and re-encrypted per packet under the
//! Initial keys of the packet's connection id (RFC 9001 §5.2), so one core
//! forges well over 100,000 Initials a second; the relay still runs a full
//! TLS handshake for every one it accepts.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use rand::RngCore;
use rustls::quic::{Keys, Version};

/// The smallest datagram a client Initial may travel in (RFC 9000 §14.1).
pub const INITIAL_SIZE: usize = 1200;
/// Packet number length used (bytes).
const PN_LEN: usize = 4;
/// AEAD tag length of every QUIC v1 Initial.
const TAG_LEN: usize = 16;
/// Length of the forged destination connection ids.
const DCID_LEN: usize = 16;

/// Makes forged client Initials; see the module docs.
pub struct InitialForge {
    hello: Vec<u8>,
    scid: [u8; 8],
    suite: &'static rustls::Tls13CipherSuite,
    quic: &'static dyn rustls::quic::Algorithm,
}

impl InitialForge {
    /// A forge whose ClientHello offers `alpn` for `server_name`.
    pub fn new(alpn: &[u8], server_name: &str) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            // Never consulted: nothing the relay answers is read.
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let mut scid = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut scid);
        // QUIC transport parameters: initial_source_connection_id (0x0f),
        // which must equal the packets' source connection id; the rest
        // default.
        let mut params = vec![0x0f, scid.len() as u8];
        params.extend_from_slice(&scid);
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .context("server name")?;
        let mut tls =
            rustls::quic::ClientConnection::new(Arc::new(config), Version::V1, name, params)
                .context("QUIC client session")?;
        let mut hello = Vec::new();
        tls.write_hs(&mut hello);
        // Initial packets always use AES-128-GCM (RFC 9001 §5.2).
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .ok_or_else(|| anyhow!("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite"))?;
        let quic = suite
            .quic
            .ok_or_else(|| anyhow!("suite without QUIC keys"))?;
        Ok(Self {
            hello,
            scid,
            suite,
            quic,
        })
    }

    /// Write one Initial datagram for destination connection id `dcid`
    /// (8 to 20 bytes) into `out` (cleared first).
    pub fn packet(&self, dcid: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        // Long header: Initial, 4-byte packet number (RFC 9000 §17.2.2).
        out.push(0xc0 | (PN_LEN as u8 - 1));
        out.extend_from_slice(&1u32.to_be_bytes());
        out.push(dcid.len() as u8);
        out.extend_from_slice(dcid);
        out.push(self.scid.len() as u8);
        out.extend_from_slice(&self.scid);
        out.push(0); // no token
        let header_len = out.len() + 2 + PN_LEN;
        let payload_len = INITIAL_SIZE - header_len - TAG_LEN;
        // Length: packet number + payload + tag, as a 2-byte varint.
        let length = (PN_LEN + payload_len + TAG_LEN) as u16;
        out.extend_from_slice(&(0x4000 | length).to_be_bytes());
        let pn_offset = out.len();
        out.extend_from_slice(&0u32.to_be_bytes());
        // CRYPTO frame at offset 0 with the ClientHello, then PADDING.
        let mut payload = Vec::with_capacity(payload_len);
        payload.push(0x06);
        payload.push(0x00);
        payload.extend_from_slice(&(0x4000 | self.hello.len() as u16).to_be_bytes());
        payload.extend_from_slice(&self.hello);
        if payload.len() > payload_len {
            return Err(anyhow!("ClientHello too large for one Initial"));
        }
        payload.resize(payload_len, 0);
        let keys = Keys::initial(
            Version::V1,
            self.suite,
            self.quic,
            dcid,
            rustls::Side::Client,
        );
        let tag = keys
            .local
            .packet
            .encrypt_in_place(0, &out[..], &mut payload)
            .map_err(|e| anyhow!("encrypt: {e}"))?;
        out.extend_from_slice(&payload);
        out.extend_from_slice(tag.as_ref());
        // Header protection samples 16 bytes starting 4 after the packet
        // number's start (RFC 9001 §5.4.2).
        let sample_at = pn_offset + 4;
        let sample: [u8; 16] = out[sample_at..sample_at + 16].try_into().expect("16 bytes");
        let (first, rest) = out.split_at_mut(1);
        keys.local
            .header
            .encrypt_in_place(
                &sample,
                &mut first[0],
                &mut rest[pn_offset - 1..pn_offset - 1 + PN_LEN],
            )
            .map_err(|e| anyhow!("header protection: {e}"))?;
        Ok(())
    }
}

/// What a [`flood`] sent.
#[derive(Debug, Default)]
pub struct FloodCount {
    /// Datagrams sent.
    pub sent: AtomicU64,
    /// Sends the kernel refused (buffer full); not retried.
    pub send_errors: AtomicU64,
}

/// Send forged Initials to `target` from `socket` at about `rate` a second
/// until `stop` is set, counting into `count`. Blocking: run it on its own
/// thread. Every datagram gets a new random destination connection id.
pub fn flood(
    forge: &InitialForge,
    socket: &UdpSocket,
    target: SocketAddr,
    rate: f64,
    stop: &AtomicBool,
    count: &FloodCount,
) -> Result<()> {
    let mut rng = rand::thread_rng();
    let mut buf = Vec::with_capacity(INITIAL_SIZE);
    let mut dcid = [0u8; DCID_LEN];
    let start = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // Paced in batches of 1 ms worth, so high rates need no fine timer.
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for _ in 0..(due - sent).min(1024) {
            rng.fill_bytes(&mut dcid);
            forge.packet(&dcid, &mut buf)?;
            match socket.send_to(&buf, target) {
                Ok(_) => count.sent.fetch_add(1, Ordering::Relaxed),
                Err(_) => count.send_errors.fetch_add(1, Ordering::Relaxed),
            };
            sent += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_initial_decrypts_under_its_connection_ids_keys() {
        let forge = InitialForge::new(b"agent-link/1", "agent-link-relay").unwrap();
        let dcid = [7u8; DCID_LEN];
        let mut p = Vec::new();
        forge.packet(&dcid, &mut p).unwrap();
        assert_eq!(p.len(), INITIAL_SIZE);
        // Undo it as a server would.
        let keys = Keys::initial(
            Version::V1,
            forge.suite,
            forge.quic,
            &dcid,
            rustls::Side::Server,
        );
        let pn_offset = 1 + 4 + 1 + DCID_LEN + 1 + 8 + 1 + 2;
        let sample: [u8; 16] = p[pn_offset + 4..pn_offset + 20].try_into().unwrap();
        let (first, rest) = p.split_at_mut(1);
        keys.remote
            .header
            .decrypt_in_place(
                &sample,
                &mut first[0],
                &mut rest[pn_offset - 1..pn_offset - 1 + PN_LEN],
            )
            .unwrap();
        assert_eq!(p[0], 0xc3);
        let (header, payload) = p.split_at_mut(pn_offset + PN_LEN);
        let plain = keys
            .remote
            .packet
            .decrypt_in_place(0, header, payload)
            .unwrap();
        assert_eq!(plain[0], 0x06, "a CRYPTO frame first");
        assert_eq!(plain[4], 0x01, "holding a ClientHello");
    }
}
