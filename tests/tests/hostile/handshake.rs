//! Hostile handshakes: the wrong ALPN or none, a relay with another
//! certificate than the pinned one, a client without a certificate, 0-RTT.
//! Each is refused with a clear reason while the relay keeps serving a
//! well-behaved client.

use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{instance_client_config, TlsIdentity};
use agent_link_crypto::Identity;
use agent_link_proto::PeerToRelay;
use agent_link_tests::*;

use crate::common::{bystander_still_works, endpoint_with, relay_and_bystander};

#[tokio::test]
async fn wrong_alpn_fails_the_handshake() {
    let (relay, a, b) = relay_and_bystander().await;
    let tls_id = TlsIdentity::self_signed(&Identity::generate(), "x").unwrap();
    let mut cfg =
        instance_client_config(&tls_id, relay.token.pinned().expect("a pinned relay")).unwrap();
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    let ep = endpoint_with(cfg);
    let r = tokio::time::timeout(WAIT, ep.connect(relay.addr, "agent-link-relay").unwrap())
        .await
        .expect("refused promptly, not a hang");
    assert!(r.is_err(), "a connection with the wrong ALPN was accepted");
    bystander_still_works(&a, &b).await;
}

#[tokio::test]
async fn missing_alpn_fails_the_handshake() {
    let (relay, a, b) = relay_and_bystander().await;
    let id = Identity::generate();
    // Registered, so only the missing ALPN can be the reason.
    relay.register("no-alpn", &id);
    let tls_id = TlsIdentity::self_signed(&id, "x").unwrap();
    let mut cfg =
        instance_client_config(&tls_id, relay.token.pinned().expect("a pinned relay")).unwrap();
    cfg.alpn_protocols = Vec::new();
    let ep = endpoint_with(cfg);
    let r = tokio::time::timeout(WAIT, ep.connect(relay.addr, "agent-link-relay").unwrap())
        .await
        .expect("refused promptly, not a hang");
    assert!(r.is_err(), "a connection without ALPN was accepted");
    bystander_still_works(&a, &b).await;
}

#[tokio::test]
async fn a_relay_with_another_certificate_is_refused_by_the_peer() {
    let (relay, a, b) = relay_and_bystander().await;
    let id = Identity::generate();
    relay.register("pinned-wrong", &id);
    let mut wrong_fp = relay.token.pinned().expect("a pinned relay");
    wrong_fp[0] ^= 1;
    let r =
        RawClient::connect_with(relay.addr, wrong_fp, relay.fleet_key(), id, "pinned-wrong").await;
    assert!(
        r.is_err(),
        "connected to a relay whose certificate is not the pinned one"
    );
    bystander_still_works(&a, &b).await;
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let (relay, a, b) = relay_and_bystander().await;
    // A client that offers no certificate at all (plain server-auth TLS).
    let tls_id = TlsIdentity::self_signed(&Identity::generate(), "x").unwrap();
    let mut cfg =
        instance_client_config(&tls_id, relay.token.pinned().expect("a pinned relay")).unwrap();
    cfg.client_auth_cert_resolver = Arc::new(NoCert);
    let ep = endpoint_with(cfg);
    let r = tokio::time::timeout(WAIT, async {
        let conn = ep.connect(relay.addr, "agent-link-relay").unwrap().await?;
        // Some stacks only learn of the refusal on first use.
        let (mut s, _) = conn.open_bi().await?;
        s.write_all(b"x")
            .await
            .map_err(|_| quinn::ConnectionError::LocallyClosed)?;
        Ok::<_, quinn::ConnectionError>(conn.closed().await)
    })
    .await
    .expect("refused promptly");
    // Refused by TLS itself (a handshake alert, QUIC crypto error codes
    // 0x100-0x1ff), not admitted and cut off later by the relay's own
    // deadline: the relay requires a client certificate.
    let reason = match r {
        Ok(reason) | Err(reason) => reason,
    };
    match &reason {
        quinn::ConnectionError::ConnectionClosed(c)
            if (0x100..0x200).contains(&u64::from(c.error_code)) => {}
        quinn::ConnectionError::TransportError(e)
            if (0x100..0x200).contains(&u64::from(e.code)) => {}
        other => panic!("not refused in the TLS handshake: {other:?}"),
    }
    assert_eq!(
        relay
            .relay()
            .stats()
            .connections_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    bystander_still_works(&a, &b).await;
}

#[derive(Debug)]
struct NoCert;

impl rustls::client::ResolvesClientCert for NoCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }
    fn has_certs(&self) -> bool {
        false
    }
}

/// A session store that counts the TLS 1.3 tickets it was given and the
/// ones taken for a resumption, so the 0-RTT test can wait for the ticket
/// instead of sleeping and can show that the second connection offered it.
#[derive(Debug)]
struct CountingStore {
    inner: rustls::client::ClientSessionMemoryCache,
    inserted: std::sync::atomic::AtomicUsize,
    taken: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, n: rustls::pki_types::ServerName<'static>, g: rustls::NamedGroup) {
        self.inner.set_kx_hint(n, g)
    }
    fn kx_hint(&self, n: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(n)
    }
    fn set_tls12_session(
        &self,
        n: rustls::pki_types::ServerName<'static>,
        v: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(n, v)
    }
    fn tls12_session(
        &self,
        n: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(n)
    }
    fn remove_tls12_session(&self, n: &rustls::pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(n)
    }
    fn insert_tls13_ticket(
        &self,
        n: rustls::pki_types::ServerName<'static>,
        v: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inserted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.insert_tls13_ticket(n, v)
    }
    fn take_tls13_ticket(
        &self,
        n: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let t = self.inner.take_tls13_ticket(n);
        if t.is_some() {
            self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        t
    }
}

#[tokio::test]
async fn zero_rtt_is_never_accepted() {
    let (relay, a, b) = relay_and_bystander().await;
    let id = Identity::generate();
    relay.register("eager", &id);
    let tls_id = TlsIdentity::self_signed(&id, "x").unwrap();
    let mut cfg =
        instance_client_config(&tls_id, relay.token.pinned().expect("a pinned relay")).unwrap();
    // A client that would send 0-RTT data if the relay let it.
    cfg.enable_early_data = true;
    let store = Arc::new(CountingStore {
        inner: rustls::client::ClientSessionMemoryCache::new(8),
        inserted: 0.into(),
        taken: 0.into(),
    });
    cfg.resumption = rustls::client::Resumption::store(store.clone());
    let ep = endpoint_with(cfg);
    // First connection: obtains a session ticket, then closes.
    let first = ep
        .connect(relay.addr, "agent-link-relay")
        .unwrap()
        .await
        .unwrap();
    let (mut s, _r) = first.open_bi().await.unwrap();
    s.write_all(&agent_link_proto::codec::frame(&PeerToRelay::StatusRequest).unwrap())
        .await
        .unwrap();
    // Wait for the ticket itself (bounded), not for a time: without one the
    // second connection could not try 0-RTT and the test would pass vacuously.
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.inserted.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay sent no session ticket: 0-RTT was never tried"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.close(0u32.into(), b"bye");
    // Second connection: the relay's tickets carry no early-data allowance,
    // so 0-RTT is impossible and the client must complete the handshake.
    let connecting = ep.connect(relay.addr, "agent-link-relay").unwrap();
    assert!(
        store.taken.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the second connection did not offer the ticket: 0-RTT was never tried"
    );
    match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            assert!(!accepted.await, "the relay accepted 0-RTT data");
            drop(conn);
        }
        Err(connecting) => {
            // Expected: no early data possible; the 1-RTT handshake works.
            tokio::time::timeout(WAIT, connecting)
                .await
                .unwrap()
                .unwrap();
        }
    }
    bystander_still_works(&a, &b).await;
}
