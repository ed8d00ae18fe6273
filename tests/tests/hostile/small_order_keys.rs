//! Weak (small-order) Ed25519 client keys: refused when read from a
//! certificate, and a client that signs its handshake as the identity point
//! fails the handshake while the others go on.

use std::sync::Arc;

use agent_link_crypto::tls::{instance_client_config, instance_key_from_cert, TlsIdentity};
use agent_link_crypto::{CryptoError, Identity};
use agent_link_tests::*;

use crate::common::*;

/// Small-order Ed25519 points, encoded: the identity (order 1), the point of
/// order 2, the two of order 4, one of order 8.
const SMALL_ORDER: [&str; 5] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
];

/// A real self-signed instance certificate with its key replaced by `weak`
/// (same length, so the DER stays well-formed; its own signature no longer
/// matches, which no one checks: the handshake signature proves the key).
fn cert_with_key(weak: [u8; 32]) -> rustls::pki_types::CertificateDer<'static> {
    let id = Identity::generate();
    let mut der = TlsIdentity::self_signed(&id, "weak").unwrap().cert.to_vec();
    let pk = id.public_key().0;
    let at = der
        .windows(32)
        .position(|w| w == pk)
        .expect("key in the certificate");
    der[at..at + 32].copy_from_slice(&weak);
    rustls::pki_types::CertificateDer::from(der)
}

/// Signs every handshake as the identity point could: R = identity, s = 0
/// satisfies [s]B = R + [k]A for A = identity and any message, so only an
/// explicit small-order check stops it.
#[derive(Debug)]
struct IdentityPointKey;

impl rustls::sign::SigningKey for IdentityPointKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ED25519)
            .then(|| Box::new(IdentityPointSigner) as Box<dyn rustls::sign::Signer>)
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ED25519
    }
}

#[derive(Debug)]
struct IdentityPointSigner;

impl rustls::sign::Signer for IdentityPointSigner {
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut sig = vec![0u8; 64];
        sig[0] = 1;
        Ok(sig)
    }
    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ED25519
    }
}

#[derive(Debug)]
struct Present(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Present {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[test]
fn small_order_keys_in_a_certificate_are_refused() {
    for hex_key in SMALL_ORDER {
        let mut weak = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut weak).unwrap();
        assert!(
            matches!(
                instance_key_from_cert(&cert_with_key(weak)),
                Err(CryptoError::WeakPublicKey)
            ),
            "{hex_key} accepted"
        );
    }
    // The same certificate with a strong key is accepted (the surgery is
    // not what is refused).
    let strong = Identity::generate().public_key();
    assert_eq!(
        instance_key_from_cert(&cert_with_key(strong.0)).unwrap(),
        strong
    );
}

#[tokio::test]
async fn a_client_with_a_small_order_key_fails_the_handshake() {
    let mut net = net(|c| c.auth_timeout_secs = 1).await;
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    let tls_id = TlsIdentity::self_signed(&Identity::generate(), "x").unwrap();
    let mut cfg =
        instance_client_config(&tls_id, net.relay.token.pinned().expect("a pinned relay")).unwrap();
    cfg.client_auth_cert_resolver = Arc::new(Present(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert_with_key(identity_point)],
        Arc::new(IdentityPointKey),
    ))));
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let accepted_before = net
        .relay
        .relay()
        .stats()
        .connections_accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    let attempt = tokio::time::timeout(
        WAIT,
        ep.connect(net.relay.addr, "agent-link-relay").unwrap(),
    )
    .await
    .expect("refused promptly");
    // TLS 1.3: the client may consider its side done before the relay has
    // judged its certificate; then the refusal arrives as the close.
    let reason = match attempt {
        Err(e) => e,
        Ok(conn) => tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("closed promptly"),
    };
    match reason {
        // The TLS alert bad_certificate (42) as a QUIC crypto error.
        quinn::ConnectionError::ConnectionClosed(c) => {
            assert_eq!(c.error_code, quinn::TransportErrorCode::crypto(42), "{c:?}")
        }
        other => panic!("expected the handshake to fail on the certificate, got {other:?}"),
    }
    let stats = net.relay.relay().stats();
    assert!(
        stats
            .handshakes_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        stats
            .connections_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        accepted_before
    );
    same_connection_flows(&net.a, &mut net.rx, "after the weak key").await;
    others_unaffected(&mut net).await;
}
