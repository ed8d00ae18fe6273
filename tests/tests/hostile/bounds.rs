//! Bounds a hostile client meets: more agents than allowed on one
//! connection are refused and the connection stays usable; a receiver that
//! stops reading gets its senders an explicit `Busy`, the relay holds a
//! bounded number of frames and bytes for it, and a third agent flows.

use std::time::Duration;

use agent_link_crypto::Identity;
use agent_link_proto::{ErrorCode, PeerToRelay, RelayToPeer};
use agent_link_tests::*;

use crate::common::relay_and_bystander;

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
