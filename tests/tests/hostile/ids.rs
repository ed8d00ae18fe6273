//! Invalid UTF-8 and invalid ids: in `Attach`, in `Register` (on a
//! registered connection and from an unregistered key), and in envelope
//! addresses under a valid tag and signature.

use agent_link_proto::{codec, ErrorCode, PeerToRelay};
use agent_link_tests::*;

use crate::common::*;

/// Replace the first occurrence of `from` at or after `start` with `to`,
/// same length. (Envelope bodies: start after the random id, at 17.)
fn patch(body: &mut [u8], start: usize, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let at = body[start..]
        .windows(from.len())
        .position(|w| w == from)
        .expect("needle in body")
        + start;
    body[at..at + to.len()].copy_from_slice(to);
}

#[tokio::test]
async fn invalid_utf8_and_invalid_ids_in_attach_register_and_addresses_are_refused() {
    let mut net = net(|_| {}).await;
    // Attach: agent "\xc3(" (a lead byte without its continuation), then
    // valid UTF-8 that is not a valid id.
    refused_at(
        &mut net,
        &[At::FirstFrame],
        Case::new(
            "Attach, invalid UTF-8",
            &raw_frame(&[2, 2, 0xc3, b'(', 0]),
            ErrorCode::Malformed,
        ),
    )
    .await;
    let attach = |agent: &str| {
        codec::frame(&PeerToRelay::Attach {
            agent,
            receive: true,
        })
        .unwrap()
    };
    for agent in ["bob\u{e9}", "..", "a/b", ""] {
        refused_at(
            &mut net,
            &[At::FirstFrame],
            Case::new(
                &format!("Attach {agent:?}"),
                &attach(agent),
                ErrorCode::BadAddress,
            ),
        )
        .await;
    }
    // Register with an invalid UTF-8 instance id: on a registered
    // connection's control stream, and from an unregistered key.
    let mut register = codec::encode_body(&PeerToRelay::Register {
        instance_id: "inst-a",
        name: "n",
        proof: [0; 32],
    })
    .unwrap();
    patch(&mut register, 0, b"inst-a", b"inst\xc3(");
    let register = raw_frame(&register);
    refused_at(
        &mut net,
        &[At::ControlStream],
        Case::new("Register, invalid UTF-8", &register, ErrorCode::Malformed),
    )
    .await;
    refused_before_registration(
        &net.relay,
        Case::new("Register, invalid UTF-8", &register, ErrorCode::Malformed),
    )
    .await;
    let register_non_ascii = codec::frame(&PeerToRelay::Register {
        instance_id: "inst\u{e9}",
        name: "n",
        proof: [0; 32],
    })
    .unwrap();
    refused_before_registration(
        &net.relay,
        Case::new(
            "Register, non-ASCII id",
            &register_non_ascii,
            ErrorCode::BadAddress,
        ),
    )
    .await;

    // Envelopes with a valid tag and signature over an address that is not
    // UTF-8, or not a valid id.
    let c = &net.a;
    let mk = |to: &str, from: &[u8], into: &[u8]| {
        let mut b = body_bytes(c, random_id(), "alice", to, now_ms(), b"x");
        patch(&mut b, 17, from, into);
        raw_frame(&send_body(&seal_bytes(c, &b)))
    };
    let cases = [
        (
            "from.agent, invalid UTF-8",
            mk("inst-b/bob", b"alice", b"al\xff\xfee"),
            ErrorCode::Malformed,
        ),
        (
            "to.instance, invalid UTF-8",
            mk("inst-b/bob", b"inst-b", b"inst\xc0\x80"),
            ErrorCode::Malformed,
        ),
        (
            "to.agent, invalid UTF-8",
            mk("inst-b/bob", b"bob", b"b\xedo"),
            ErrorCode::Malformed,
        ),
        (
            "to.agent, '/' in the id",
            mk("inst-b/bob", b"bob", b"b/b"),
            ErrorCode::BadAddress,
        ),
        (
            "to.agent, '..'",
            mk("inst-b/bo", b"bo", b".."),
            ErrorCode::BadAddress,
        ),
        (
            "to.agent, non-ASCII",
            mk("inst-b/bob", b"bob", "b\u{e9}".as_bytes()),
            ErrorCode::BadAddress,
        ),
    ];
    for (case, bytes, code) in &cases {
        refused_at(&mut net, &[At::AgentStream], Case::new(case, bytes, *code)).await;
    }
    others_unaffected(&mut net).await;
}
