//! The peer library against a real relay over QUIC on loopback: messages
//! both ways with receipts, many agents on one connection, explicit errors,
//! end-to-end signature checks, replay handling, and reconnection.

use std::time::Duration;

use agent_link_proto::{PeerToRelay, RelayToPeer};
use agent_link_tests::*;

#[tokio::test]
async fn two_instances_exchange_messages_both_ways_with_receipts() {
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "instance-001").await;
    let two = peer(&relay, "instance-002").await;
    let mut xiao = one.attach("xiaobaozi").await.unwrap();
    let mut health = two.attach("healthguard").await.unwrap();

    let (r, m) = exchange(&health, "instance-001/xiaobaozi", "hi", &mut xiao).await;
    assert_eq!(r.to, "instance-001/xiaobaozi");
    assert_eq!(&m.payload[..], b"hi");
    assert_eq!(m.from, "instance-002/healthguard");
    assert_eq!(m.id, r.id);

    let (r, m) = exchange(&xiao, "instance-002/healthguard", "hello back", &mut health).await;
    assert_eq!(&m.payload[..], b"hello back");
    assert_eq!(m.id, r.id);
    one.close().await;
    two.close().await;
}

#[tokio::test]
async fn many_agents_share_one_connection() {
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let mut receivers = Vec::new();
    for i in 0..8 {
        receivers.push(one.attach(&format!("agent-{i}")).await.unwrap());
    }
    let sender = two.attach_sender("boss").await.unwrap();
    for (i, r) in receivers.iter_mut().enumerate() {
        let (_, m) = exchange(
            &sender,
            &format!("inst-one/agent-{i}"),
            format!("task {i}"),
            r,
        )
        .await;
        assert_eq!(m.payload, format!("task {i}").as_bytes());
    }
    let online = relay.relay().online();
    assert_eq!(online["inst-one"].len(), 8);
}

#[tokio::test]
async fn offline_unknown_and_oversized_targets_fail_with_the_cause() {
    let relay = TestRelay::start(|c| c.max_message_size = 1024).await;
    let one = peer(&relay, "inst-one").await;
    let _two = peer(&relay, "inst-two").await;
    let a = one.attach_sender("a").await.unwrap();
    let e = a.send("inst-two/nobody-home", "x").await.unwrap_err();
    assert_eq!(e.exit().code(), 3, "{e}");
    let e = a.send("no-such-instance/x", "x").await.unwrap_err();
    assert_eq!(e.exit().code(), 3, "{e}");
    let e = a.send("not an address", "x").await.unwrap_err();
    assert_eq!(e.exit().code(), 2, "{e}");
    let e = a.send("inst-two/x", vec![0u8; 2048]).await.unwrap_err();
    assert_eq!(e.exit().code(), 2, "{e}");
}

#[tokio::test]
async fn receiver_refuses_a_bad_signature_the_relay_let_through() {
    let relay = TestRelay::start(|c| c.verify_signatures = false).await;
    let one = peer(&relay, "inst-one").await;
    let mut bob = one.attach("bob").await.unwrap();
    let mallory_key = agent_link_crypto::Identity::generate();
    relay.register("inst-m", &mallory_key);
    let m = RawClient::connect(&relay, mallory_key, "inst-m")
        .await
        .unwrap();
    let mut s = m.attach("m", false).await;
    // Signed with a different key than the connection's: only Ed25519 catches it.
    let forger = RawClient {
        identity: agent_link_crypto::Identity::generate(),
        ..m
    };
    let id = random_id();
    s.send_envelope(&forger.envelope(id, "m", "inst-one/bob", now_ms(), b"forged"))
        .await;
    let f = s.read().await.unwrap();
    assert_eq!(
        f.get(),
        RelayToPeer::Failed {
            id,
            code: agent_link_proto::ErrorCode::BadSignature
        },
        "the receiver's refusal travels back"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob.recv())
            .await
            .is_err(),
        "nothing reached the application"
    );
}

#[tokio::test]
async fn a_replayed_message_is_delivered_once_and_answered_with_the_first_receipt() {
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let mut bob = one.attach("bob").await.unwrap();
    let key = agent_link_crypto::Identity::generate();
    relay.register("inst-r", &key);
    let r = RawClient::connect(&relay, key, "inst-r").await.unwrap();
    let mut s = r.attach("r", false).await;
    let id = random_id();
    let env = r.envelope(id, "r", "inst-one/bob", now_ms(), b"once");
    let mut receipts = Vec::new();
    // The first copy is answered once bob's application has taken it; the
    // replays after that at once, with the same receipt.
    s.send_envelope(&env).await;
    assert_eq!(recv(&mut bob).await.payload, &b"once"[..]);
    for i in 0..3 {
        if i > 0 {
            s.send_envelope(&env).await;
        }
        let f = s.read().await.unwrap();
        match f.get() {
            RelayToPeer::Receipt { receipt } => {
                receipts.push((receipt.id, receipt.delivered_at_ms))
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        receipts.iter().all(|r| *r == receipts[0]),
        "same receipt each time: {receipts:?}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob.recv())
            .await
            .is_err(),
        "delivered once"
    );
    let _ = PeerToRelay::StatusRequest;
}

#[tokio::test]
async fn peer_reconnects_after_a_relay_restart() {
    let mut relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let mut bob = one.attach("bob").await.unwrap();
    let alice = two.attach_sender("alice").await.unwrap();
    let (_, m) = exchange(&alice, "inst-one/bob", "before", &mut bob).await;
    assert_eq!(m.payload, &b"before"[..]);

    relay.restart().await;
    // The next message gets through once both peers are back (the library
    // holds it in its outbox until then, inside its deadline).
    let (r, m) = tokio::join!(
        alice.send_with_timeout("inst-one/bob", "after", Duration::from_secs(15)),
        tokio::time::timeout(Duration::from_secs(15), bob.recv())
    );
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(m.unwrap().unwrap().payload, &b"after"[..]);
}

#[tokio::test]
async fn status_reports_online_peers() {
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let _bob = one.attach("bob").await.unwrap();
    assert!(
        wait_until(|| relay
            .relay()
            .online()
            .get("inst-one")
            .is_some_and(|a| a.contains(&"bob".to_string())))
        .await
    );
    let st = two.status().await.unwrap();
    let dbg = format!("{st:?}");
    assert!(dbg.contains("inst-one") && dbg.contains("bob"), "{dbg}");
}

/// `AgentLink::close` on any clone closes the link for every clone and
/// agent; dropping clones does not, and an agent keeps its link up by itself.
#[tokio::test]
async fn close_on_any_clone_closes_the_link_and_dropping_clones_does_not() {
    use agent_link::{CloseReason, LinkError, SendError};
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let mut bob = two.attach("bob").await.unwrap();

    // Dropping a clone leaves the link up.
    drop(one.clone());
    one.status().await.expect("still connected");

    // An agent alone keeps it up: every AgentLink handle gone, it still sends.
    let alice = one.attach_sender("alice").await.unwrap();
    let spare = one.clone();
    drop(one);
    let (r, m) = exchange(&alice, "inst-two/bob", "still here", &mut bob).await;
    assert_eq!(m.id, r.id);

    // close on one clone closes it for all of them.
    let other = spare.clone();
    spare.close().await;
    assert!(
        matches!(
            other.status().await,
            Err(LinkError::Closed(CloseReason::LinkClosed))
        ),
        "the other clone sees the link closed"
    );
    let r = alice.send("inst-two/bob", "after close").await;
    assert!(matches!(r, Err(SendError::Closed(_))), "{r:?}");
}

/// Closing the link (not the agents first) still answers every message the
/// application did not take: their senders learn `TargetOffline` now, not
/// at their deadline.
#[tokio::test]
async fn closing_the_link_refuses_what_its_agents_did_not_take() {
    use agent_link::{ErrorCode, SendError};
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let _bob = one.attach("bob").await.unwrap(); // never calls recv
    let alice = two.attach_sender("alice").await.unwrap();
    let sends: Vec<_> = (0..3)
        .map(|i| {
            let alice = alice.sender();
            tokio::spawn(async move {
                alice
                    .send_with_timeout("inst-one/bob", format!("m{i}"), Duration::from_secs(60))
                    .await
            })
        })
        .collect();
    let forwarded = || {
        relay
            .relay()
            .stats()
            .messages_forwarded
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert!(
        wait_until(|| forwarded() >= 3).await,
        "all three reached bob"
    );
    let t0 = std::time::Instant::now();
    one.close().await;
    for s in sends {
        let r = tokio::time::timeout(WAIT, s).await.unwrap().unwrap();
        assert!(
            matches!(r, Err(SendError::Refused(ErrorCode::TargetOffline))),
            "{r:?}"
        );
    }
    assert!(
        t0.elapsed() < WAIT,
        "answered at once, not at the 60 s deadline"
    );
}
