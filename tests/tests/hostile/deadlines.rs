//! Deadlines: a key that never registers is closed at the auth deadline, a
//! stream that never sends its first frame is ended, a frame trickled byte
//! by byte is ended at the frame deadline (agent and control streams), and
//! streams idle between frames outlive it.

use std::time::Duration;

use agent_link_crypto::{Domain, Identity};
use agent_link_proto::{codec, ErrorCode, PeerToRelay, RelayToPeer};
use agent_link_tests::*;

use crate::common::*;

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

/// Trickle `bytes` one every `every` until the relay answers (at most
/// `bytes.len()` writes), then wait for its answer.
async fn trickle(s: &mut RawStream, bytes: &[u8], every: Duration) -> Option<OwnedFrame> {
    for b in bytes {
        if s.send.write_all(&[*b]).await.is_err() {
            break;
        }
        if let Ok(f) = s.read_within(every).await {
            return f;
        }
    }
    s.read().await
}

#[tokio::test]
async fn a_trickled_frame_on_an_agent_stream_is_ended_at_the_frame_deadline() {
    let mut net = net(|c| c.frame_timeout_secs = 1).await;
    let mut s = net.a.attach("alice", false).await;
    let env = net
        .a
        .envelope(random_id(), "alice", "inst-b/bob", now_ms(), &[b'x'; 200]);
    let frame = raw_frame(&send_body(&env));
    // One byte every 0.5 s (at most 40 of them: 20 s), where the whole
    // frame would take three minutes.
    let answer = trickle(&mut s, &frame[..40], Duration::from_millis(500)).await;
    let answer = answer.expect("the relay answered the trickle");
    assert_eq!(
        answer.get(),
        RelayToPeer::Error {
            code: ErrorCode::AuthTimeout
        }
    );
    assert!(
        matches!(s.read_within(WAIT).await, Ok(None)),
        "stream ended"
    );
    assert_eq!(
        net.relay
            .relay()
            .stats()
            .refused_count(ErrorCode::AuthTimeout),
        1
    );
    same_connection_flows(&net.a, &mut net.rx, "after the trickle").await;
    others_unaffected(&mut net).await;
}

/// Register `c` online and keep the stream (it becomes the control stream).
async fn register_keeping_stream(c: &RawClient, instance_id: &str) -> RawStream {
    let mut exporter = [0u8; 32];
    c.conn
        .export_keying_material(
            &mut exporter,
            agent_link_proto::REGISTER_EXPORTER_LABEL,
            b"",
        )
        .unwrap();
    let pk = c.identity.public_key();
    let proof = c.fleet.tag(
        Domain::RegisterProof,
        &[&exporter, pk.as_bytes(), instance_id.as_bytes()],
    );
    let mut s = c.open().await;
    s.write(&PeerToRelay::Register {
        instance_id,
        name: instance_id,
        proof,
    })
    .await;
    let f = s.read().await.expect("register reply");
    assert!(
        matches!(f.get(), RelayToPeer::Registered { .. }),
        "{:?}",
        f.get()
    );
    s
}

#[tokio::test]
async fn a_trickled_frame_on_control_streams_is_ended_at_the_frame_deadline() {
    let mut net = net(|c| c.frame_timeout_secs = 1).await;
    let status = codec::frame(&PeerToRelay::StatusRequest).unwrap();
    // A padded frame: 64 bytes declared, so it cannot complete by accident.
    let mut slow = 64u32.to_be_bytes().to_vec();
    slow.extend_from_slice(&[1; 64]);
    // The control stream an online registration leaves behind, and one
    // opened later with a StatusRequest.
    let newcomer = RawClient::connect(&net.relay, Identity::generate(), "inst-new")
        .await
        .unwrap();
    let registered = register_keeping_stream(&newcomer, "inst-new").await;
    let mut later = newcomer.open().await;
    later.write_raw(&status).await;
    assert!(matches!(
        later.read().await.unwrap().get(),
        RelayToPeer::Status { .. }
    ));
    for (case, mut s) in [
        ("registration stream", registered),
        ("status stream", later),
    ] {
        let answer = trickle(&mut s, &slow[..40], Duration::from_millis(500)).await;
        let answer = answer.unwrap_or_else(|| panic!("{case}: no answer to the trickle"));
        assert_eq!(
            answer.get(),
            RelayToPeer::Error {
                code: ErrorCode::AuthTimeout
            },
            "{case}"
        );
        // The connection still works.
        let mut s = newcomer.open().await;
        s.write_raw(&status).await;
        assert!(
            matches!(s.read().await.unwrap().get(), RelayToPeer::Status { .. }),
            "{case}"
        );
    }
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn streams_idle_between_frames_outlive_the_frame_deadline() {
    let mut net = net(|c| c.frame_timeout_secs = 1).await;
    let mut tx = net.a.attach("alice", false).await;
    let mut control = open_at(&net.a, At::ControlStream).await;
    // Idle for well over the deadline, with no frame begun.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    flows(&net.a, &mut tx, "alice", &mut net.rx, "idle sender").await;
    control.write(&PeerToRelay::StatusRequest).await;
    assert!(matches!(
        control.read().await.unwrap().get(),
        RelayToPeer::Status { .. }
    ));
    assert_eq!(
        net.relay
            .relay()
            .stats()
            .refused_count(ErrorCode::AuthTimeout),
        0
    );
    others_unaffected(&mut net).await;
}
