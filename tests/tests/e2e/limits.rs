//! Connection limits do what README "Faults and limits" says: connections
//! over the per-instance and relay-wide limits are refused with the stated
//! reason while the others keep working, a slot frees up when a connection
//! goes, and a peer that falls silent is dropped at the idle timeout.

use std::time::Duration;

use agent_link_crypto::Identity;
use agent_link_faults::{Impairment, UdpProxy};
use agent_link_proto::ErrorCode;
use agent_link_tests::*;

fn same_identity(seed: &[u8; 32]) -> Identity {
    Identity::from_seed(seed)
}

async fn connect(relay: &TestRelay, seed: &[u8; 32], id: &str) -> anyhow::Result<RawClient> {
    RawClient::connect(relay, same_identity(seed), id).await
}

#[tokio::test]
async fn connections_over_the_per_instance_limit_are_closed_with_too_many_connections() {
    let relay = TestRelay::start(|c| c.max_connections_per_instance = 2).await;
    let seed: [u8; 32] = rand::random();
    relay.register("multi", &same_identity(&seed));
    let first = connect(&relay, &seed, "multi").await.unwrap();
    let second = connect(&relay, &seed, "multi").await.unwrap();
    // Both are served (each can attach) before the third arrives.
    first.attach("one", false).await;
    second.attach("two", false).await;
    let third = connect(&relay, &seed, "multi").await.unwrap();
    let reason = tokio::time::timeout(WAIT, third.conn.closed())
        .await
        .expect("the third connection is closed");
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
            u64::from(c.error_code),
            u64::from(ErrorCode::TooManyConnections.as_u32()),
            "{c:?}"
        ),
        other => panic!("closed for another reason: {other}"),
    }
    // The first two are unaffected; when one goes, a new one gets its slot.
    first.attach("still-one", false).await;
    second.conn.close(0u32.into(), b"bye");
    let mut replaced = None;
    for _ in 0..50 {
        let c = connect(&relay, &seed, "multi").await.unwrap();
        if tokio::time::timeout(Duration::from_millis(300), c.conn.closed())
            .await
            .is_err()
        {
            replaced = Some(c);
            break;
        }
    }
    replaced
        .expect("a slot freed up")
        .attach("new", false)
        .await;
}

#[tokio::test]
async fn connections_over_the_relay_limit_are_refused_until_a_slot_frees_up() {
    let relay = TestRelay::start(|c| c.max_connections = 2).await;
    let keep: Vec<[u8; 32]> = (0..3).map(|_| rand::random()).collect();
    for (i, s) in keep.iter().enumerate() {
        relay.register(&format!("k{i}"), &same_identity(s));
    }
    let first = connect(&relay, &keep[0], "k0").await.unwrap();
    let second = connect(&relay, &keep[1], "k1").await.unwrap();
    first.attach("x", false).await;
    second.attach("x", false).await;
    // The relay refuses the handshake itself (no slot, no cryptography).
    let refused = connect(&relay, &keep[2], "k2").await;
    assert!(
        refused.is_err(),
        "a third connection got in over max_connections"
    );
    assert!(
        relay
            .relay()
            .stats()
            .refused_count(ErrorCode::TooManyConnections)
            >= 1
    );
    // The two connected ones work; when one leaves, the third gets in.
    first.attach("y", false).await;
    second.conn.close(0u32.into(), b"bye");
    let mut got_in = None;
    for _ in 0..50 {
        if let Ok(c) = connect(&relay, &keep[2], "k2").await {
            got_in = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got_in.expect("a slot freed up").attach("z", false).await;
}

#[tokio::test]
async fn a_peer_that_falls_silent_is_dropped_at_the_idle_timeout() {
    let relay = TestRelay::start(|c| {
        c.idle_timeout_secs = 2;
        c.keep_alive_secs = 1;
    })
    .await;
    let id = Identity::generate();
    relay.register("quiet", &id);
    // Through a proxy that can cut the path without a goodbye.
    let proxy = UdpProxy::start(relay.addr, Impairment::none())
        .await
        .unwrap();
    let client = RawClient::connect_with(
        proxy.addr(),
        relay.token.pinned().expect("a pinned relay"),
        relay.fleet_key(),
        id,
        "quiet",
    )
    .await
    .unwrap();
    let _rx = client.attach("rx", true).await;
    assert!(relay.relay().online().contains_key("quiet"));
    // The peer vanishes: every datagram is lost from now on.
    proxy.set(Impairment {
        loss_pct: 100.0,
        ..Impairment::none()
    });
    assert!(
        wait_until(|| !relay.relay().online().contains_key("quiet")).await,
        "a silent peer was still online after the idle timeout"
    );
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_dropped_at_the_handshake_timeout() {
    let relay = TestRelay::start(|c| c.handshake_timeout_secs = 1).await;
    let id = Identity::generate();
    relay.register("stuck", &id);
    // The client's packets reach the relay; none of the relay's come back,
    // so the handshake can never complete.
    let proxy = UdpProxy::start(relay.addr, Impairment::none())
        .await
        .unwrap();
    proxy.set_each_way(
        Impairment::none(),
        Impairment {
            loss_pct: 100.0,
            ..Impairment::none()
        },
    );
    let stats = || {
        relay
            .relay()
            .stats()
            .handshakes_failed
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = stats();
    let attempt = tokio::spawn(RawClient::connect_with(
        proxy.addr(),
        relay.token.pinned().expect("a pinned relay"),
        relay.fleet_key(),
        id,
        "stuck",
    ));
    assert!(
        wait_until(|| stats() > before).await,
        "the relay kept a handshake that never completed"
    );
    assert!(relay.relay().stats().refused_count(ErrorCode::AuthTimeout) >= 1);
    attempt.abort();
    // The relay serves others meanwhile.
    let other = Identity::generate();
    relay.register("other", &other);
    let c = RawClient::connect(&relay, other, "other").await.unwrap();
    c.attach("a", false).await;
}
