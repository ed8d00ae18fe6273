//! Hostile framing, on every kind of stream and before registration:
//! length prefixes far over the limit, a frame of exactly the limit and one
//! byte more, frames cut short by FIN, trailing bytes after a valid body,
//! unknown enum tags, and known frames in the wrong place.

use agent_link_crypto::Domain;
use agent_link_proto::{codec, Address, ErrorCode, PeerToRelay, Receipt, RelayToPeer};
use agent_link_relay::RelayConfig;
use agent_link_tests::*;

use crate::common::*;

#[tokio::test]
async fn length_prefix_of_eight_ff_bytes_is_too_large_on_every_stream() {
    let mut net = net(|_| {}).await;
    let bytes = [0xff; 8];
    refused_at(
        &mut net,
        &EVERYWHERE,
        Case::new("ff x 8", &bytes, ErrorCode::TooLarge),
    )
    .await;
    refused_before_registration(&net.relay, Case::new("ff x 8", &bytes, ErrorCode::TooLarge)).await;
    // On an agent stream the relay also tells the QUIC stack to stop
    // sending (STOP_SENDING with the same code), so it buffers nothing more.
    let mut s = net.a.attach("alice", false).await;
    s.write_raw(&bytes).await;
    let stopped = tokio::time::timeout(WAIT, s.send.stopped())
        .await
        .expect("stopped in time");
    assert_eq!(
        stopped.ok().flatten().map(u64::from),
        Some(u64::from(ErrorCode::TooLarge.as_u32()))
    );
    assert_eq!(
        net.relay.relay().stats().refused_count(ErrorCode::TooLarge),
        5
    );
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn declared_one_gib_frame_with_bytes_after_it_is_too_large_on_every_stream() {
    let mut net = net(|_| {}).await;
    let mut bytes = 0x4000_0000u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[3, 0xfd, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    refused_at(
        &mut net,
        &EVERYWHERE,
        Case::new("1 GiB header", &bytes, ErrorCode::TooLarge),
    )
    .await;
    refused_before_registration(
        &net.relay,
        Case::new("1 GiB header", &bytes, ErrorCode::TooLarge),
    )
    .await;
    // Before registration the limit is 1024 bytes: a 1025-byte frame is
    // already too large.
    let mut big = raw_frame(&[0u8; 1025]);
    big.truncate(4 + 16);
    refused_before_registration(
        &net.relay,
        Case::new("1025-byte frame", &big, ErrorCode::TooLarge),
    )
    .await;
    others_unaffected(&mut net).await;
}

/// A `Register` frame body for `c`'s own id (answered `Registered`: it is
/// idempotent), its free-text name padded so the body is `len` bytes.
fn register_body_of_len(c: &RawClient, len: usize) -> Vec<u8> {
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
        &[&exporter, pk.as_bytes(), c.instance.as_bytes()],
    );
    let mut name_len = len;
    for _ in 0..8 {
        let name = "n".repeat(name_len);
        let body = codec::encode_body(&PeerToRelay::Register {
            instance_id: &c.instance,
            name: &name,
            proof,
        })
        .unwrap();
        if body.len() == len {
            return body;
        }
        name_len = name_len + len - body.len().min(len) - body.len().saturating_sub(len);
    }
    panic!("could not size the frame");
}

#[tokio::test]
async fn a_frame_of_exactly_the_limit_is_read_and_one_byte_more_is_too_large() {
    let mut net = net(|c| c.max_message_size = 4096).await;
    let max = RelayConfig {
        max_message_size: 4096,
        ..RelayConfig::default()
    }
    .max_frame();
    let mut control = open_at(&net.a, At::ControlStream).await;
    control
        .write_raw(&raw_frame(&register_body_of_len(&net.a, max)))
        .await;
    let f = control
        .read()
        .await
        .expect("a frame of exactly the limit is read");
    assert_eq!(
        f.get(),
        RelayToPeer::Registered {
            instance_id: "inst-a"
        }
    );
    control
        .write_raw(&raw_frame(&register_body_of_len(&net.a, max + 1)))
        .await;
    error_then_end(&mut control, ErrorCode::TooLarge, "limit + 1").await;
    // A message with the largest payload still goes through.
    let mut tx = net.a.attach("alice", false).await;
    let id = random_id();
    tx.send_envelope(
        &net.a
            .envelope(id, "alice", "inst-b/bob", now_ms(), &[7u8; 4096]),
    )
    .await;
    assert_eq!(delivered_id(&net.rx.read().await.expect("delivered")), id);
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn a_frame_cut_short_by_fin_is_malformed_on_every_stream() {
    let mut net = net(|_| {}).await;
    // Header says 50 bytes; 2 arrive, then FIN.
    refused_at(
        &mut net,
        &EVERYWHERE,
        Case::new("2 of 50 bytes", &[0, 0, 0, 50, 1, 2], ErrorCode::Malformed).then_fin(),
    )
    .await;
    // Only part of a header.
    refused_at(
        &mut net,
        &[At::AgentStream],
        Case::new("half a header", &[0, 0], ErrorCode::Malformed).then_fin(),
    )
    .await;
    // A real message cut in half: nothing of it is delivered.
    let env = net
        .a
        .envelope(random_id(), "alice", "inst-b/bob", now_ms(), b"half of me");
    let whole = raw_frame(&send_body(&env));
    refused_at(
        &mut net,
        &[At::AgentStream],
        Case::new(
            "half a Send",
            &whole[..whole.len() / 2],
            ErrorCode::Malformed,
        )
        .then_fin(),
    )
    .await;
    refused_before_registration(
        &net.relay,
        Case::new("2 of 50 bytes", &[0, 0, 0, 50, 1, 2], ErrorCode::Malformed).then_fin(),
    )
    .await;
    others_unaffected(&mut net).await;
}

/// `frame` with `extra` appended inside its declared length.
fn with_trailing(body: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(extra);
    raw_frame(&b)
}

#[tokio::test]
async fn trailing_bytes_after_a_valid_body_are_malformed_and_never_delivered() {
    let mut net = net(|_| {}).await;
    let attach = codec::encode_body(&PeerToRelay::Attach {
        agent: "alice",
        receive: false,
    })
    .unwrap();
    refused_at(
        &mut net,
        &[At::FirstFrame],
        Case::new(
            "Attach + 1 byte",
            &with_trailing(&attach, &[0]),
            ErrorCode::Malformed,
        ),
    )
    .await;
    let status = codec::encode_body(&PeerToRelay::StatusRequest).unwrap();
    refused_at(
        &mut net,
        &[At::ControlStream],
        Case::new(
            "StatusRequest + 1 byte",
            &with_trailing(&status, &[1]),
            ErrorCode::Malformed,
        ),
    )
    .await;

    // A valid, tagged and signed message, with junk at three depths: after
    // the Send frame's body, after the envelope's signature, after the
    // envelope body's payload (tag and signature cover the junk). None may
    // be delivered.
    let c = &net.a;
    let env = c.envelope(random_id(), "alice", "inst-b/bob", now_ms(), b"valid");
    let after_frame = with_trailing(&send_body(&env), &[0]);
    let mut env_plus = env.clone();
    env_plus.push(0);
    let after_signature = raw_frame(&send_body(&env_plus));
    let mut body = body_bytes(c, random_id(), "alice", "inst-b/bob", now_ms(), b"valid");
    body.push(0);
    let after_payload = raw_frame(&send_body(&seal_bytes(c, &body)));
    for (case, bytes) in [
        ("Send + 1 byte", after_frame),
        ("envelope + 1 byte", after_signature),
        ("envelope body + 1 byte (tagged and signed)", after_payload),
    ] {
        refused_at(
            &mut net,
            &[At::AgentStream],
            Case::new(case, &bytes, ErrorCode::Malformed),
        )
        .await;
    }
    // An Ack with a trailing byte.
    let ack = codec::encode_body(&PeerToRelay::Ack {
        reply_token: 1,
        receipt: Receipt {
            id: [1; 16],
            from: Address {
                instance: "inst-a",
                agent: "alice",
            },
            delivered_at_ms: 1,
        },
    })
    .unwrap();
    refused_at(
        &mut net,
        &[At::AgentStream],
        Case::new(
            "Ack + 1 byte",
            &with_trailing(&ack, &[0]),
            ErrorCode::Malformed,
        ),
    )
    .await;
    assert_eq!(
        net.relay
            .relay()
            .stats()
            .messages_forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        6,
        "only the bystander messages were forwarded"
    );
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn unknown_enum_tags_are_malformed_on_every_stream() {
    let mut net = net(|_| {}).await;
    // PeerToRelay has 9 variants (0..=8).
    for (case, body) in [
        ("variant 7 without its fields", vec![7u8]),
        ("variant 9", vec![9u8]),
        ("variant 250", vec![250]),
        ("variant 256 (varint)", vec![0xfb, 0x00, 0x01]),
        (
            "variant u32::MAX (varint)",
            vec![0xfc, 0xff, 0xff, 0xff, 0xff],
        ),
        ("varint marker 0xff", vec![0xff]),
    ] {
        refused_at(
            &mut net,
            &EVERYWHERE,
            Case::new(case, &raw_frame(&body), ErrorCode::Malformed),
        )
        .await;
    }
    // Unknown values inside a known frame.
    let mut nack = codec::encode_body(&PeerToRelay::Nack {
        reply_token: 1,
        id: [1; 16],
        code: ErrorCode::Busy,
    })
    .unwrap();
    *nack.last_mut().unwrap() = ErrorCode::ALL.len() as u8; // no such code
    refused_at(
        &mut net,
        &[At::AgentStream],
        Case::new(
            "Nack with unknown ErrorCode",
            &raw_frame(&nack),
            ErrorCode::Malformed,
        ),
    )
    .await;
    let mut attach = codec::encode_body(&PeerToRelay::Attach {
        agent: "alice",
        receive: true,
    })
    .unwrap();
    *attach.last_mut().unwrap() = 2; // bool must be 0 or 1
    refused_at(
        &mut net,
        &[At::FirstFrame],
        Case::new(
            "Attach with bool 2",
            &raw_frame(&attach),
            ErrorCode::Malformed,
        ),
    )
    .await;
    refused_before_registration(
        &net.relay,
        Case::new("variant 9", &raw_frame(&[9]), ErrorCode::Malformed),
    )
    .await;
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn known_frames_in_the_wrong_place_are_refused() {
    let mut net = net(|_| {}).await;
    let env = net
        .a
        .envelope(random_id(), "alice", "inst-b/bob", now_ms(), b"no attach");
    let send = raw_frame(&send_body(&env));
    let nack = codec::frame(&PeerToRelay::Nack {
        reply_token: 1,
        id: [1; 16],
        code: ErrorCode::Busy,
    })
    .unwrap();
    // A message frame with no Attach first.
    refused_at(
        &mut net,
        &[At::FirstFrame],
        Case::new("Send first", &send, ErrorCode::NotAttached),
    )
    .await;
    refused_at(
        &mut net,
        &[At::FirstFrame],
        Case::new("Nack first", &nack, ErrorCode::NotAttached),
    )
    .await;
    // Frames of another stream kind after the first frame.
    let attach = codec::frame(&PeerToRelay::Attach {
        agent: "alice",
        receive: false,
    })
    .unwrap();
    let status = codec::frame(&PeerToRelay::StatusRequest).unwrap();
    refused_at(
        &mut net,
        &[At::AgentStream],
        Case::new("Attach on an agent stream", &attach, ErrorCode::Malformed),
    )
    .await;
    refused_at(
        &mut net,
        &[At::AgentStream],
        Case::new(
            "StatusRequest on an agent stream",
            &status,
            ErrorCode::Malformed,
        ),
    )
    .await;
    refused_at(
        &mut net,
        &[At::ControlStream],
        Case::new("Send on a control stream", &send, ErrorCode::Malformed),
    )
    .await;
    refused_at(
        &mut net,
        &[At::ControlStream],
        Case::new("Attach on a control stream", &attach, ErrorCode::Malformed),
    )
    .await;
    others_unaffected(&mut net).await;
}
