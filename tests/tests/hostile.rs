//! Hostile handshakes and stalls: each case is refused with a clear reason
//! while the relay keeps serving a well-behaved client.

use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{instance_client_config, TlsIdentity};
use agent_link_crypto::Identity;
use agent_link_proto::{ErrorCode, PeerToRelay, RelayToPeer};
use agent_link_tests::*;

/// A relay with a short authentication deadline, and a registered client
/// that must keep working whatever the hostile one did.
async fn relay_and_bystander() -> (TestRelay, RawClient, RawClient) {
    let relay = TestRelay::start(|c| {
        c.auth_timeout_secs = 1;
        c.max_agents_per_connection = 2;
    })
    .await;
    let (a, b) = (Identity::generate(), Identity::generate());
    relay.register("good-a", &a);
    relay.register("good-b", &b);
    let a = RawClient::connect(&relay, a, "good-a").await.unwrap();
    let b = RawClient::connect(&relay, b, "good-b").await.unwrap();
    (relay, a, b)
}

async fn bystander_still_works(a: &RawClient, b: &RawClient) {
    let mut rx = b.attach("rx", true).await;
    let mut tx = a.attach("tx", false).await;
    tx.send_envelope(&a.envelope(random_id(), "tx", "good-b/rx", now_ms(), b"still here"))
        .await;
    let f = rx.read().await.expect("delivery");
    assert!(
        matches!(f.get(), RelayToPeer::Deliver { .. }),
        "{:?}",
        f.get()
    );
}

fn endpoint_with(cfg: rustls::ClientConfig) -> quinn::Endpoint {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

#[tokio::test]
async fn wrong_alpn_fails_the_handshake() {
    let (relay, a, b) = relay_and_bystander().await;
    let tls_id = TlsIdentity::self_signed(&Identity::generate(), "x").unwrap();
    let mut cfg = instance_client_config(&tls_id, relay.token.fingerprint).unwrap();
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
    let mut cfg = instance_client_config(&tls_id, relay.token.fingerprint).unwrap();
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
    let mut wrong_fp = relay.token.fingerprint;
    wrong_fp[0] ^= 1;
    let r = RawClient::connect_with(
        relay.addr,
        wrong_fp,
        relay.token.secret.key(),
        id,
        "pinned-wrong",
    )
    .await;
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
    let mut cfg = instance_client_config(&tls_id, relay.token.fingerprint).unwrap();
    cfg.client_auth_cert_resolver = Arc::new(NoCert);
    let ep = endpoint_with(cfg);
    let r = tokio::time::timeout(WAIT, async {
        let conn = ep.connect(relay.addr, "agent-link-relay").unwrap().await?;
        // Some stacks only learn of the refusal on first use.
        let (mut s, _) = conn.open_bi().await?;
        s.write_all(b"x")
            .await
            .map_err(|_| quinn::ConnectionError::LocallyClosed)?;
        conn.closed().await;
        Ok::<_, quinn::ConnectionError>(())
    })
    .await
    .expect("refused promptly");
    let _ = r;
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

#[tokio::test]
async fn unregistered_key_that_never_registers_is_closed_at_the_deadline() {
    let (relay, a, b) = relay_and_bystander().await;
    let idle = RawClient::connect(&relay, Identity::generate(), "idle")
        .await
        .unwrap();
    let reason = tokio::time::timeout(WAIT, idle.conn.closed())
        .await
        .expect("closed at the auth deadline");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                u64::from(c.error_code),
                u64::from(ErrorCode::AuthTimeout.as_u32())
            )
        }
        other => panic!("{other:?}"),
    }
    bystander_still_works(&a, &b).await;
}

#[tokio::test]
async fn a_stream_that_never_sends_its_first_frame_is_ended() {
    let (relay, a, b) = relay_and_bystander().await;
    let mut s = a.open().await;
    // Trickle: two bytes of a header, then nothing.
    s.write_raw(&[0, 0]).await;
    let f = s.read().await.expect("an error frame at the deadline");
    assert_eq!(
        f.get(),
        RelayToPeer::Error {
            code: ErrorCode::AuthTimeout
        }
    );
    assert_eq!(
        relay.relay().stats().refused_count(ErrorCode::AuthTimeout),
        1
    );
    bystander_still_works(&a, &b).await;
}

#[tokio::test]
async fn more_agents_than_allowed_are_refused_and_the_connection_stays_usable() {
    let (_relay, a, b) = relay_and_bystander().await;
    let _one = a.attach("one", true).await;
    let _two = a.attach("two", true).await;
    let mut three = a.open().await;
    three
        .write(&PeerToRelay::Attach {
            agent: "three",
            receive: true,
        })
        .await;
    let f = three.read().await.expect("refusal");
    assert_eq!(
        f.get(),
        RelayToPeer::Error {
            code: ErrorCode::TooManyStreams
        }
    );
    drop(_two);
    // Closing one frees a slot (bounded wait for the relay to notice).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut s = a.open().await;
        s.write(&PeerToRelay::Attach {
            agent: "three",
            receive: true,
        })
        .await;
        let f = s.read().await.expect("reply");
        if matches!(f.get(), RelayToPeer::Attached { .. }) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = b;
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

/// Read every answer already waiting (each read waits at most `wait`):
/// (answers, of which `Busy`).
async fn drain_answers(tx: &mut RawStream, wait: Duration) -> (usize, usize) {
    let (mut answered, mut busy) = (0, 0);
    while let Ok(Some(f)) = tx.read_within(wait).await {
        answered += 1;
        if matches!(
            f.get(),
            RelayToPeer::Failed {
                code: ErrorCode::Busy,
                ..
            }
        ) {
            busy += 1;
        }
    }
    (answered, busy)
}

#[tokio::test]
async fn a_receiver_that_stops_reading_gets_its_senders_explicit_busy_and_others_flow() {
    // The frame count bounds the queue: 16 frames.
    slow_receiver_is_bounded(16, 4 << 20).await;
}

#[tokio::test]
async fn large_messages_to_a_receiver_that_stops_reading_are_bounded_by_bytes() {
    // A long queue (1,024 frames) but a 66 KiB byte budget: the bytes bound it
    // to ~16 messages of 4 KiB, or the test's bound below fails.
    slow_receiver_is_bounded(1024, 66 * 1024).await;
}

/// A receiver that never reads, flooded with 4 KiB messages: the relay holds
/// at most ~16 of them (`queue_len` frames or `queue_bytes`, whichever is
/// smaller), answers the rest `Busy`, and a third agent is unaffected.
async fn slow_receiver_is_bounded(queue_len: u32, queue_bytes: u32) {
    // Small queue and windows so the slow receiver fills up quickly.
    let relay = TestRelay::start(|c| {
        c.agent_queue_len = queue_len;
        c.agent_queue_bytes = queue_bytes;
        c.max_message_size = 16 * 1024;
        c.stream_receive_window = 64 * 1024;
        c.receive_window = 256 * 1024;
        c.send_window = 256 * 1024;
    })
    .await;
    let (s, slow, fast) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    relay.register("sender", &s);
    relay.register("slow", &slow);
    relay.register("fast", &fast);
    let s = RawClient::connect(&relay, s, "sender").await.unwrap();
    let slow = RawClient::connect(&relay, slow, "slow").await.unwrap();
    let fast = RawClient::connect(&relay, fast, "fast").await.unwrap();
    let _never_reads = slow.attach("sink", true).await;
    let mut fast_rx = fast.attach("rx", true).await;
    let mut tx = s.attach("tx", false).await;

    // Flood the receiver that never reads, with 4 KiB messages; reading our
    // own stream concurrently so the relay can always answer us.
    let payload = vec![0u8; 4096];
    let total = 2000usize;
    let mut busy = 0usize;
    let mut answered = 0usize;
    let mut sent = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent < total && tokio::time::Instant::now() < deadline {
        tx.send_envelope(&s.envelope(random_id(), "tx", "slow/sink", now_ms(), &payload))
            .await;
        sent += 1;
        if !sent.is_multiple_of(20) {
            continue;
        }
        let (a, b) = drain_answers(&mut tx, Duration::from_millis(1)).await;
        answered += a;
        busy += b;
    }
    assert_eq!(sent, total, "the sender was never blocked for long");
    let (a, b) = drain_answers(&mut tx, Duration::from_millis(500)).await;
    answered += a;
    busy += b;
    // Most were refused explicitly; the rest sit in bounded buffers (queue +
    // QUIC windows), none vanished: every answer is an explicit Busy.
    assert!(busy > total / 2, "only {busy} of {total} got Busy");
    assert_eq!(answered, busy, "every answer was an explicit Busy");
    let forwarded = relay
        .relay()
        .stats()
        .messages_forwarded
        .load(std::sync::atomic::Ordering::Relaxed) as usize;
    assert_eq!(forwarded + busy, total, "forwarded + refused = sent");
    // Bounded: what the relay holds is its queue (16) plus its QUIC send
    // window (256 KiB ≈ 62 messages); beyond that, the receiving client's own
    // QUIC stack buffers up to its default stream window (1.25 MiB ≈ 305
    // messages) even though its application never reads.
    assert!(
        forwarded <= 16 + 62 + 310,
        "unbounded: {forwarded} accepted for a receiver that never reads"
    );

    // A third agent is unaffected.
    tx.send_envelope(&s.envelope(random_id(), "tx", "fast/rx", now_ms(), b"hi"))
        .await;
    let f = fast_rx.read().await.expect("delivered");
    assert!(matches!(f.get(), RelayToPeer::Deliver { .. }));
}

#[tokio::test]
async fn zero_rtt_is_never_accepted() {
    let (relay, a, b) = relay_and_bystander().await;
    let id = Identity::generate();
    relay.register("eager", &id);
    let tls_id = TlsIdentity::self_signed(&id, "x").unwrap();
    let mut cfg = instance_client_config(&tls_id, relay.token.fingerprint).unwrap();
    // A client that would send 0-RTT data if the relay let it.
    cfg.enable_early_data = true;
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
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.close(0u32.into(), b"bye");
    // Second connection: the relay's tickets carry no early-data allowance,
    // so 0-RTT is impossible and the client must complete the handshake.
    let connecting = ep.connect(relay.addr, "agent-link-relay").unwrap();
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
