//! Strangers cannot lock members out (issue 14, finding 3): a flood of
//! forged QUIC Initials (as from spoofed addresses: the sender never reads
//! the relay's answers) while members connect; strangers filling their slot
//! pool; a stranger pushing data before it registered. Timing targets are
//! in `agent-link-bench flood`, not here; every wait is bounded.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::Identity;
use agent_link_faults::initials::{self, FloodCount, InitialForge};
use agent_link_proto::ErrorCode;
use agent_link_tests::*;

/// Forged Initials per second: far over the relay-wide rate below, and
/// within what a debug build forges on a loaded machine.
const FLOOD_RATE: f64 = 2_000.0;

/// Forged Initials to `addr` from their own thread until the returned flag
/// is set.
fn start_flood(
    addr: std::net::SocketAddr,
) -> (
    Arc<AtomicBool>,
    Arc<FloodCount>,
    std::thread::JoinHandle<anyhow::Result<()>>,
) {
    let forge = InitialForge::new(
        agent_link_crypto::tls::ALPN,
        agent_link_crypto::tls::RELAY_SERVER_NAME,
    )
    .unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(FloodCount::default());
    let (s, c) = (stop.clone(), count.clone());
    let thread =
        std::thread::spawn(move || initials::flood(&forge, &socket, addr, FLOOD_RATE, &s, &c));
    (stop, count, thread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_connects_through_a_flood_of_forged_initials() {
    // Before the fix this failed: the flood took every token of the one
    // relay-wide bucket, so a member's connection attempt was refused
    // unless it happened to arrive in the moment after a refill.
    let relay = TestRelay::start(|c| {
        c.handshakes_per_sec = 100;
        c.retry_threshold = 16;
    })
    .await;
    let members: Vec<(String, Identity)> = (0..8)
        .map(|i| (format!("member-{i}"), Identity::generate()))
        .collect();
    relay.register_many(&members);
    let (stop, count, flood) = start_flood(relay.addr);
    // Let the flood fill the relay's pending handshakes first.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Each member tries once, as a peer's first attempt: a refusal fails
    // the test.
    let mut set = tokio::task::JoinSet::new();
    for (id, identity) in members {
        let (addr, fp, fleet) = (
            relay.addr,
            relay.token.pinned().expect("a pinned relay"),
            relay.fleet_key(),
        );
        set.spawn(async move {
            let c = RawClient::connect_with(addr, fp, fleet, identity, &id)
                .await
                .unwrap_or_else(|e| panic!("{id} could not connect during the flood: {e:#}"));
            let stream = c.attach("a", true).await;
            (c, stream)
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tokio::time::timeout(4 * WAIT, set.join_next())
        .await
        .expect("members connect")
    {
        held.push(r.unwrap());
    }
    assert_eq!(held.len(), 8);
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap().unwrap();
    let stats = relay.relay().stats();
    let sent = count.sent.load(Ordering::Relaxed);
    let retries = stats.retries_sent.load(Ordering::Relaxed);
    println!(
        "flood: {sent} forged Initials sent, {retries} Retry packets, {} refused",
        stats.refused_count(ErrorCode::TooManyConnections)
    );
    assert!(sent > 1000, "the flood hardly ran: {sent} Initials");
    assert!(retries > 0, "no Retry was sent under the flood");
    // The members are served: they see each other online.
    let online = relay.relay().online();
    for i in 0..8 {
        assert!(
            online
                .get(&format!("member-{i}"))
                .is_some_and(|a| a.iter().any(|a| a == "a")),
            "member-{i} not online: {online:?}"
        );
    }
}

/// A stranger (unknown key) connection and its endpoint; its handshake
/// completes, it sends nothing.
async fn stranger(relay: &TestRelay) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_config(
        &Identity::generate(),
        relay.token.pinned().expect("a pinned relay"),
    ));
    let conn = tokio::time::timeout(
        WAIT,
        ep.connect(relay.addr, agent_link_crypto::tls::RELAY_SERVER_NAME)
            .unwrap(),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    (ep, conn)
}

fn close_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into()),
        _ => None,
    }
}

#[tokio::test]
async fn strangers_beyond_their_slots_are_closed_and_members_still_connect() {
    let relay = TestRelay::start(|c| {
        c.max_stranger_connections = 2;
        c.auth_timeout_secs = 30;
    })
    .await;
    let strangers = [
        stranger(&relay).await,
        stranger(&relay).await,
        stranger(&relay).await,
    ];
    // Whichever the relay finds unknown last gets no slot and is closed at
    // once, not at the auth deadline (30 s, over this wait).
    let (i, why) = tokio::time::timeout(WAIT, async {
        tokio::select! {
            why = strangers[0].1.closed() => (0, why),
            why = strangers[1].1.closed() => (1, why),
            why = strangers[2].1.closed() => (2, why),
        }
    })
    .await
    .expect("one stranger is closed at once");
    assert_eq!(
        close_code(&why),
        Some(ErrorCode::TooManyConnections.as_u32().into()),
        "{why:?}"
    );
    for (j, (_, s)) in strangers.iter().enumerate() {
        if j != i {
            assert!(
                s.close_reason().is_none(),
                "a stranger in a slot was closed"
            );
        }
    }
    // Members do not take stranger slots.
    let id = Identity::generate();
    relay.register("member", &id);
    let m = RawClient::connect(&relay, id, "member").await.unwrap();
    let _rx = m.attach("a", true).await;
}

#[tokio::test]
async fn a_stranger_cannot_make_the_relay_buffer_more_than_a_small_window() {
    let relay = TestRelay::start(|c| c.auth_timeout_secs = 3).await;
    let (_ep, conn) = stranger(&relay).await;
    // The first stream is the registration stream: a Register frame begins
    // (its header declares 1000 bytes) and stalls. The relay never reads
    // the other streams before registration. 64 KiB on each of three: with
    // the full window (8 MiB) these writes complete at once; with the
    // pre-admission window (16 KiB over all streams) they cannot, and the
    // connection is closed at the auth deadline.
    let (mut first, _first_recv) = conn.open_bi().await.unwrap();
    first.write_all(&1000u32.to_be_bytes()).await.unwrap();
    first.write_all(&[0u8; 10]).await.unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut writes = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let chunk = chunk.clone();
        writes.spawn(async move {
            let r = send.write_all(&chunk).await;
            (r, _recv)
        });
    }
    let mut completed = 0;
    while let Some(r) = tokio::time::timeout(4 * WAIT, writes.join_next())
        .await
        .expect("writes end when the relay closes the connection")
    {
        if r.unwrap().0.is_ok() {
            completed += 1;
        }
    }
    assert_eq!(
        completed, 0,
        "a stranger wrote 64 KiB streams the relay had to buffer"
    );
    let why = conn.closed().await;
    assert_eq!(
        close_code(&why),
        Some(ErrorCode::AuthTimeout.as_u32().into()),
        "{why:?}"
    );
}
