//! Forged and stray replies (issue 14, finding 6): an `Ack`/`Nack` counts
//! only on the stream its delivery was written to, for a token outstanding
//! there with the same message id, and only once (PROTOCOL.md §9.5). A
//! member that learns or guesses another stream's token cannot push
//! `Receipt` or `Failed` frames into the sender's stream; a second reply and
//! a reply for an id never delivered are dropped; a target stream that ends
//! fails its unanswered deliveries `TargetOffline` to their senders; and
//! one sender flooding an agent leaves room for the others.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use agent_link_crypto::Identity;
use agent_link_proto::{Address, ErrorCode, PeerToRelay, Receipt, RelayToPeer};
use agent_link_tests::*;

use crate::common::*;

/// `z/zed` sends one message to `b/bob`: its id, the reply token of the
/// `Deliver` bob got, and zed's stream.
async fn one_delivery(net: &mut Net) -> ([u8; 16], u64, RawStream) {
    let mut zed = net.z.attach("zed", false).await;
    let id = random_id();
    zed.send_envelope(&net.z.envelope(id, "zed", "inst-b/bob", now_ms(), b"hi"))
        .await;
    let f = net.rx.read().await.expect("delivery");
    let RelayToPeer::Deliver { reply_token, .. } = f.get() else {
        panic!("expected Deliver, got {:?}", f.get());
    };
    (id, reply_token, zed)
}

fn ack(reply_token: u64, id: [u8; 16], instance: &str, agent: &str) -> Vec<u8> {
    agent_link_proto::codec::frame(&PeerToRelay::Ack {
        reply_token,
        receipt: Receipt {
            id,
            from: Address { instance, agent },
            delivered_at_ms: now_ms(),
        },
    })
    .unwrap()
}

fn nack(reply_token: u64, id: [u8; 16], code: ErrorCode) -> Vec<u8> {
    agent_link_proto::codec::frame(&PeerToRelay::Nack {
        reply_token,
        id,
        code,
    })
    .unwrap()
}

/// Nothing reaches `s` within [`QUIET`].
async fn silent(s: &mut RawStream, case: &str) {
    if let Ok(f) = s.read_within(QUIET).await {
        panic!("{case}: the sender got {:?}", f.as_ref().map(|f| f.get()));
    }
}

#[tokio::test]
async fn a_member_replying_with_another_streams_token_reaches_nobody() {
    let mut net = net(|_| {}).await;
    let (id, token, mut zed) = one_delivery(&mut net).await;
    // inst-a knows (or guessed) the token, and replies on its own streams:
    // a receiving one and a send-only one, as Nack and as Ack.
    let mut a_rx = net.a.attach("alice", true).await;
    let mut a_tx = net.a.attach("al", false).await;
    a_rx.write_raw(&nack(token, id, ErrorCode::BadTag)).await;
    a_rx.write_raw(&ack(token, id, "inst-a", "alice")).await;
    a_tx.write_raw(&nack(token, id, ErrorCode::KeyChanged))
        .await;
    a_tx.write_raw(&ack(token, id, "inst-a", "al")).await;
    silent(&mut zed, "forged replies").await;
    assert!(
        net.relay.relay().stats().replies_dropped.load(Relaxed) >= 4,
        "the forged replies were counted as dropped"
    );
    // The real receiver's answer still counts.
    net.rx.write_raw(&ack(token, id, "inst-b", "bob")).await;
    let f = zed.read().await.expect("receipt");
    assert!(
        matches!(f.get(), RelayToPeer::Receipt { receipt } if receipt.id == id),
        "{:?}",
        f.get()
    );
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn a_second_reply_for_the_same_delivery_is_dropped() {
    let mut net = net(|_| {}).await;
    let (id, token, mut zed) = one_delivery(&mut net).await;
    net.rx.write_raw(&ack(token, id, "inst-b", "bob")).await;
    net.rx.write_raw(&ack(token, id, "inst-b", "bob")).await;
    net.rx.write_raw(&nack(token, id, ErrorCode::Busy)).await;
    let f = zed.read().await.expect("receipt");
    assert!(
        matches!(f.get(), RelayToPeer::Receipt { receipt } if receipt.id == id),
        "{:?}",
        f.get()
    );
    silent(&mut zed, "second and third reply").await;
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn a_nack_for_an_id_never_delivered_is_dropped() {
    let mut net = net(|_| {}).await;
    let (id, token, mut zed) = one_delivery(&mut net).await;
    // The right token, on the right stream, but another id: zed never sent
    // it, and must not be told it failed.
    let other = random_id();
    net.rx
        .write_raw(&nack(token, other, ErrorCode::BadTag))
        .await;
    net.rx.write_raw(&ack(token, other, "inst-b", "bob")).await;
    silent(&mut zed, "reply for another id").await;
    // The delivery itself is still outstanding: its own Nack counts.
    net.rx
        .write_raw(&nack(token, id, ErrorCode::KeyChanged))
        .await;
    let f = zed.read().await.expect("failed");
    assert_eq!(
        f.get(),
        RelayToPeer::Failed {
            id,
            code: ErrorCode::KeyChanged
        }
    );
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn a_target_stream_that_ends_fails_its_unanswered_deliveries_at_once() {
    let mut net = net(|_| {}).await;
    let (id, _token, mut zed) = one_delivery(&mut net).await;
    // bob's stream ends without answering.
    net.rx.send.finish().unwrap();
    let f = zed.read().await.expect("an answer before the deadline");
    assert_eq!(
        f.get(),
        RelayToPeer::Failed {
            id,
            code: ErrorCode::TargetOffline
        }
    );
}

#[tokio::test]
async fn one_flooding_sender_does_not_keep_an_agent_busy_for_another() {
    let relay = TestRelay::start(|c| {
        c.agent_queue_len = 16;
        c.max_message_size = 16 * 1024;
        c.stream_receive_window = 64 * 1024;
        c.receive_window = 256 * 1024;
        c.send_window = 256 * 1024;
    })
    .await;
    let (f, q, t) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    relay.register("flood", &f);
    relay.register("quiet", &q);
    relay.register("target", &t);
    let f = RawClient::connect(&relay, f, "flood").await.unwrap();
    let q = RawClient::connect(&relay, q, "quiet").await.unwrap();
    let t = RawClient::connect(&relay, t, "target").await.unwrap();
    // The target reads nothing while the flood runs, nor answers anything.
    let mut rx = t.attach("sink", true).await;
    let mut flood = f.attach("tx", false).await;
    let payload = vec![0u8; 4096];
    let mut busy = 0;
    for _ in 0..600 {
        flood
            .send_envelope(&f.envelope(random_id(), "tx", "target/sink", now_ms(), &payload))
            .await;
        while let Ok(Some(a)) = flood.read_within(Duration::from_millis(1)).await {
            if matches!(
                a.get(),
                RelayToPeer::Failed {
                    code: ErrorCode::Busy,
                    ..
                }
            ) {
                busy += 1;
            }
        }
    }
    while let Ok(Some(_)) = flood.read_within(Duration::from_millis(300)).await {
        busy += 1;
    }
    assert!(busy > 300, "the flood was not held back ({busy} Busy)");
    // Another sender to the same agent still gets in.
    let mut quiet = q.attach("tx", false).await;
    let id = random_id();
    quiet
        .send_envelope(&q.envelope(id, "tx", "target/sink", now_ms(), b"me too"))
        .await;
    if let Ok(a) = quiet.read_within(QUIET).await {
        panic!(
            "the second sender was refused: {:?}",
            a.as_ref().map(|a| a.get())
        );
    }
    // And is delivered once the target reads.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let d = rx.read().await.expect("deliveries");
        if delivered_id(&d) == id {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never delivered");
    }
}
