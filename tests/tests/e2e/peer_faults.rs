//! The peer library's delivery rules under faults, against an in-process
//! relay on 127.0.0.1: a message sent while the relay is down waits in the
//! outbox and is delivered once after it returns; a deadline that passes
//! while it is down ends in `Timeout`; the newest receiving attach wins and
//! the displaced agent learns why; a send-only attach displaces nobody.
//! Every wait is bounded.

use std::time::Duration;

use agent_link::{Agent, ErrorCode, SendError};
use agent_link_tests::{peer, TestRelay};

/// The bound on each wait in this module: 15 s, longer than the harness's
/// `WAIT`.
const WAIT: Duration = Duration::from_secs(15);

async fn recv(agent: &mut Agent) -> agent_link::Message {
    tokio::time::timeout(WAIT, agent.recv())
        .await
        .expect("message in time")
        .expect("agent still receiving")
}

#[tokio::test]
async fn a_message_sent_while_the_relay_is_down_is_delivered_once_it_is_back() {
    let mut relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let mut bob = one.attach("bob").await.unwrap();
    let alice = two.attach_sender("alice").await.unwrap();

    relay.stop().await;
    let send = tokio::spawn(async move {
        let r = alice
            .send_with_timeout("inst-one/bob", "while down", WAIT)
            .await;
        (alice, r)
    });
    // The send is parked in the outbox, not failed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !send.is_finished(),
        "send resolved while the relay was down"
    );
    relay.restart().await;

    // The receipt comes once bob's application has taken the message.
    let m = recv(&mut bob).await;
    let (_alice, r) = tokio::time::timeout(WAIT + Duration::from_secs(2), send)
        .await
        .unwrap()
        .unwrap();
    let receipt = r.expect("delivered after the relay came back");
    assert_eq!(receipt.to, "inst-one/bob");
    assert_eq!(m.id, receipt.id);
    assert_eq!(&m.payload[..], b"while down");
    // Delivered once: nothing else arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bob.recv())
            .await
            .is_err(),
        "a second copy reached the application"
    );
}

#[tokio::test]
async fn a_deadline_that_passes_while_the_relay_is_down_is_a_timeout() {
    let mut relay = TestRelay::start(|_| {}).await;
    let two = peer(&relay, "inst-two").await;
    let alice = two.attach_sender("alice").await.unwrap();
    relay.stop().await;
    let t0 = std::time::Instant::now();
    let r = alice
        .send_with_timeout("inst-one/bob", "x", Duration::from_millis(700))
        .await;
    assert!(matches!(r, Err(SendError::Timeout)), "{r:?}");
    assert_eq!(r.unwrap_err().exit().code(), 5);
    assert!(t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_newest_receiving_attach_wins_and_a_sender_displaces_nobody() {
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let two = peer(&relay, "inst-two").await;
    let mut old = one.attach("bob").await.unwrap();
    let mut new = one.attach("bob").await.unwrap();
    assert!(
        tokio::time::timeout(WAIT, old.recv())
            .await
            .unwrap()
            .is_none(),
        "the older attach is closed"
    );
    assert_eq!(old.stop_reason(), Some(ErrorCode::Replaced));

    // A send-only attach of the same agent leaves `new` receiving.
    let also_bob = one.attach_sender("bob").await.unwrap();
    let alice = two.attach_sender("alice").await.unwrap();
    let (r, m) = tokio::join!(alice.send("inst-one/bob", "hello"), recv(&mut new));
    r.unwrap();
    assert_eq!(&m.payload[..], b"hello");
    // And the send-only bob can send.
    let mut alice_rx = two.attach("alice").await.unwrap();
    let (r, m) = tokio::join!(
        also_bob.send("inst-two/alice", "hi back"),
        recv(&mut alice_rx)
    );
    assert_eq!(r.unwrap().to, "inst-two/alice");
    assert_eq!(m.from, "inst-one/bob");
    assert_eq!(new.stop_reason(), None);
}

#[tokio::test]
async fn offline_target_fails_at_once_outside_the_reconnect_grace() {
    let relay = TestRelay::start(|_| {}).await;
    let two = peer(&relay, "inst-two").await;
    let _one = peer(&relay, "inst-one").await;
    let alice = two.attach_sender("alice").await.unwrap();
    let t0 = std::time::Instant::now();
    let r = alice.send("inst-one/nobody", "x").await;
    assert!(
        matches!(r, Err(SendError::Refused(ErrorCode::TargetOffline))),
        "{r:?}"
    );
    assert_eq!(r.unwrap_err().exit().code(), 3);
    assert!(t0.elapsed() < Duration::from_secs(2));
    let st = two.status().await.unwrap();
    assert!(st.instances.iter().any(|i| i.instance_id == "inst-one"));
    assert_eq!(st.you.instance_id, "inst-two");
}
