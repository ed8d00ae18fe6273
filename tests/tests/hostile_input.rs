//! Hostile input (issue 3), one test per case. Each asserts the exact error
//! code or close reason, that nothing reaches the target, that the relay
//! stays up, and that the same connection and other clients go on working.
//!
//! Cases already covered elsewhere are not repeated here: a spoofed sender,
//! a wrong fleet secret, stale and future timestamps at the relay, a
//! signature by another key (relay and receiver), a plain replay
//! (`relay_protocol.rs`, `peer_e2e.rs`); a declared 1 GiB frame on an agent
//! stream, an oversized message with the connection staying usable
//! (`relay_protocol.rs::oversized_frame_closes_only_that_stream`); stalled
//! first frames and handshakes (`hostile.rs`).

use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{instance_client_config, instance_key_from_cert, TlsIdentity};
use agent_link_crypto::{CryptoError, Domain, Identity};
use agent_link_proto::{
    codec, Address, Envelope, EnvelopeBody, ErrorCode, OpenedEnvelope, PeerToRelay, Receipt,
    RelayToPeer,
};
use agent_link_relay::RelayConfig;
use agent_link_tests::*;

/// How long to wait for something that must *not* arrive.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Set-up and shared assertions
// ---------------------------------------------------------------------------

/// A relay; `a` (inst-a) is the hostile client, `b` (inst-b) the target,
/// receiving as `bob` on `rx`; `z` (inst-z) an unrelated client.
struct Net {
    relay: TestRelay,
    a: RawClient,
    rx: RawStream,
    z: RawClient,
    _b: RawClient,
}

async fn net(tweak: impl FnOnce(&mut RelayConfig)) -> Net {
    let relay = TestRelay::start(tweak).await;
    let (a, b, z) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    relay.register("inst-a", &a);
    relay.register("inst-b", &b);
    relay.register("inst-z", &z);
    let a = RawClient::connect(&relay, a, "inst-a").await.unwrap();
    let b = RawClient::connect(&relay, b, "inst-b").await.unwrap();
    let z = RawClient::connect(&relay, z, "inst-z").await.unwrap();
    let rx = b.attach("bob", true).await;
    Net {
        relay,
        a,
        rx,
        z,
        _b: b,
    }
}

/// The message id inside a `Deliver` frame.
fn delivered_id(f: &OwnedFrame) -> [u8; 16] {
    match f.get() {
        RelayToPeer::Deliver { envelope, .. } => OpenedEnvelope::open(envelope).unwrap().body.id,
        other => panic!("expected Deliver, got {other:?}"),
    }
}

/// Send a good message on `tx` (attached as `agent`) and check that the
/// target's *next* frame is exactly that message: so nothing sent before it
/// reached the target either.
async fn flows(c: &RawClient, tx: &mut RawStream, agent: &str, rx: &mut RawStream, case: &str) {
    let id = random_id();
    tx.send_envelope(&c.envelope(id, agent, "inst-b/bob", now_ms(), b"bystander"))
        .await;
    let f = rx
        .read()
        .await
        .unwrap_or_else(|| panic!("{case}: the bystander message was not delivered"));
    assert_eq!(
        delivered_id(&f),
        id,
        "{case}: something else reached the target first"
    );
}

/// A new stream on the same connection still sends.
async fn same_connection_flows(a: &RawClient, rx: &mut RawStream, case: &str) {
    let mut tx = a.attach("alice", false).await;
    flows(a, &mut tx, "alice", rx, case).await;
}

/// Another client still sends, and nothing else is waiting at the target.
async fn others_unaffected(net: &mut Net) {
    let mut tx = net.z.attach("zed", false).await;
    flows(&net.z, &mut tx, "zed", &mut net.rx, "other client").await;
    assert!(
        net.rx.read_within(QUIET).await.is_err(),
        "nothing else reached the target"
    );
}

/// The stream gets exactly `Error{code}` and then ends.
async fn error_then_end(s: &mut RawStream, code: ErrorCode, case: &str) {
    let f = s
        .read()
        .await
        .unwrap_or_else(|| panic!("{case}: no answer"));
    assert_eq!(f.get(), RelayToPeer::Error { code }, "{case}");
    assert!(
        matches!(s.read_within(WAIT).await, Ok(None)),
        "{case}: the stream was not ended after Error"
    );
}

fn expect_failed(f: &OwnedFrame, id: [u8; 16], code: ErrorCode, case: &str) {
    assert_eq!(f.get(), RelayToPeer::Failed { id, code }, "{case}");
}

/// A whole frame around `body`, whatever `body` is.
fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn send_body(envelope: &[u8]) -> Vec<u8> {
    codec::encode_body(&PeerToRelay::Send { envelope }).unwrap()
}

/// The encoded `EnvelopeBody` of a message from `c`.
fn body_bytes(
    c: &RawClient,
    id: [u8; 16],
    agent: &str,
    to: &str,
    sent: u64,
    payload: &[u8],
) -> Vec<u8> {
    codec::encode_body(&EnvelopeBody {
        version: agent_link_proto::VERSION,
        id,
        from: Address {
            instance: &c.instance,
            agent,
        },
        to: Address::parse(to).unwrap(),
        sent_at_ms: sent,
        payload,
    })
    .unwrap()
}

fn wrap(body: &[u8], tag: [u8; 32], signature: [u8; 64]) -> Vec<u8> {
    codec::encode_body(&Envelope {
        body,
        tag,
        signature,
    })
    .unwrap()
}

/// Tag and sign arbitrary body bytes as `c` would (valid tag and signature
/// over whatever the bytes are).
fn seal_bytes(c: &RawClient, body: &[u8]) -> Vec<u8> {
    wrap(
        body,
        c.fleet.tag(Domain::EnvelopeTag, &[body]),
        c.identity.sign(Domain::EnvelopeSignature, body).0,
    )
}

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

// ---------------------------------------------------------------------------
// Bit flips
// ---------------------------------------------------------------------------

/// Offsets of an envelope's parts, found in a real one.
struct Layout {
    body_len_prefix: usize,
    version: usize,
    id: usize,
    from_instance: usize,
    from_agent: usize,
    to_instance: usize,
    to_agent: usize,
    sent_at: usize,
    payload_len_prefix: usize,
    payload: usize,
    payload_len: usize,
    tag: usize,
    signature: usize,
}

fn layout(env: &[u8]) -> Layout {
    let o = OpenedEnvelope::open(env).unwrap();
    let at = |s: &[u8]| s.as_ptr() as usize - env.as_ptr() as usize;
    let body = at(o.outer.body);
    let to_agent = at(o.body.to.agent.as_bytes());
    let sent_at = to_agent + o.body.to.agent.len();
    assert_eq!(env[sent_at], 0xfd, "sent_at_ms is a u64 varint");
    let payload = at(o.body.payload);
    Layout {
        body_len_prefix: 0,
        version: body,
        id: body + 1,
        from_instance: at(o.body.from.instance.as_bytes()),
        from_agent: at(o.body.from.agent.as_bytes()),
        to_instance: at(o.body.to.instance.as_bytes()),
        to_agent,
        sent_at,
        payload_len_prefix: sent_at + 9,
        payload,
        payload_len: o.body.payload.len(),
        tag: body + o.outer.body.len(),
        signature: body + o.outer.body.len() + 32,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// `Failed{id, code}` on the sending stream, which goes on.
    Failed(ErrorCode),
    /// `Error{code}` and the stream ends (the envelope could not be opened).
    Error(ErrorCode),
}

type Flip = (&'static str, fn(&Layout) -> (usize, u8), Expect);

/// Send each flipped envelope on its own stream of `net.a`; check the exact
/// answer, that the target got nothing, and that the connection still
/// sends afterwards.
async fn run_flips(net: &mut Net, flips: &[Flip]) {
    for (case, at, expect) in flips {
        let mut tx = net.a.attach("alice", false).await;
        let good = net.a.envelope(
            random_id(),
            "alice",
            "inst-b/bob",
            now_ms(),
            b"hostile input",
        );
        let (offset, mask) = at(&layout(&good));
        let mut bad = good.clone();
        bad[offset] ^= mask;
        tx.send_envelope(&bad).await;
        match expect {
            Expect::Failed(code) => {
                let id = OpenedEnvelope::open(&bad)
                    .unwrap_or_else(|e| panic!("{case}: the flipped envelope opens ({e})"))
                    .body
                    .id;
                let f = tx
                    .read()
                    .await
                    .unwrap_or_else(|| panic!("{case}: no answer"));
                expect_failed(&f, id, *code, case);
                // The same stream goes on.
                flows(&net.a, &mut tx, "alice", &mut net.rx, case).await;
            }
            Expect::Error(code) => {
                error_then_end(&mut tx, *code, case).await;
                same_connection_flows(&net.a, &mut net.rx, case).await;
            }
        }
    }
}

#[tokio::test]
async fn bit_flips_in_tag_header_and_payload_get_the_exact_code_and_nothing_is_delivered() {
    let mut net = net(|_| {}).await;
    use ErrorCode::*;
    use Expect::{Error as E, Failed as F};
    let flips: &[Flip] = &[
        ("tag, first bit", |l| (l.tag, 0x01), F(BadTag)),
        ("tag, last bit", |l| (l.tag + 31, 0x80), F(BadTag)),
        ("tag, middle", |l| (l.tag + 16, 0x10), F(BadTag)),
        (
            "body length prefix",
            |l| (l.body_len_prefix, 0x01),
            E(Malformed),
        ),
        ("version 1 -> 3", |l| (l.version, 0x02), E(Malformed)),
        ("version 1 -> 0", |l| (l.version, 0x01), E(Malformed)),
        ("id, first byte", |l| (l.id, 0x01), F(BadTag)),
        ("id, last byte", |l| (l.id + 15, 0x80), F(BadTag)),
        // inst-a -> inst-c: another valid sender, not this connection's.
        (
            "from.instance, valid",
            |l| (l.from_instance + 5, 0x02),
            F(SenderMismatch),
        ),
        // inst-a -> inst-`: not a valid id.
        (
            "from.instance, invalid",
            |l| (l.from_instance + 5, 0x01),
            E(BadAddress),
        ),
        // alice -> clice.
        (
            "from.agent, valid",
            |l| (l.from_agent, 0x02),
            F(SenderMismatch),
        ),
        // inst-b -> inst-c (unknown): the tag catches the redirect before
        // routing would say UnknownTarget.
        (
            "to.instance, redirect",
            |l| (l.to_instance + 5, 0x01),
            F(BadTag),
        ),
        // bob -> cob (not attached): BadTag, not TargetOffline.
        ("to.agent, redirect", |l| (l.to_agent, 0x01), F(BadTag)),
        (
            "to.agent, invalid UTF-8",
            |l| (l.to_agent, 0x80),
            E(Malformed),
        ),
        // ±256 ms: inside the window, only the tag notices.
        ("timestamp, low byte", |l| (l.sent_at + 2, 0x01), F(BadTag)),
        // ±2^40 ms: the tag is checked before the timestamp.
        ("timestamp, high byte", |l| (l.sent_at + 6, 0x01), F(BadTag)),
        (
            "payload length prefix",
            |l| (l.payload_len_prefix, 0x01),
            E(Malformed),
        ),
        ("payload, first bit", |l| (l.payload, 0x01), F(BadTag)),
        (
            "payload, last bit",
            |l| (l.payload + l.payload_len - 1, 0x80),
            F(BadTag),
        ),
    ];
    run_flips(&mut net, flips).await;
    let stats = net.relay.relay().stats();
    let count = |c| {
        flips
            .iter()
            .filter(|f| matches!(f.2, F(x) | E(x) if x == c))
            .count() as u64
    };
    for code in [BadTag, SenderMismatch, BadAddress, Malformed] {
        assert_eq!(stats.refused_count(code), count(code), "{code:?} refusals");
    }
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn signature_bit_flips_are_refused_by_a_verifying_relay_and_nothing_is_delivered() {
    let mut net = net(|c| c.verify_signatures = true).await;
    use ErrorCode::BadSignature;
    let flips: &[Flip] = &[
        (
            "signature R, first bit",
            |l| (l.signature, 0x01),
            Expect::Failed(BadSignature),
        ),
        (
            "signature R, sign bit",
            |l| (l.signature + 31, 0x80),
            Expect::Failed(BadSignature),
        ),
        (
            "signature s, first bit",
            |l| (l.signature + 32, 0x01),
            Expect::Failed(BadSignature),
        ),
        // s >= L: a non-canonical (malleated) signature.
        (
            "signature s, top bit",
            |l| (l.signature + 63, 0x80),
            Expect::Failed(BadSignature),
        ),
    ];
    run_flips(&mut net, flips).await;
    assert_eq!(
        net.relay.relay().stats().refused_count(BadSignature),
        flips.len() as u64
    );
    others_unaffected(&mut net).await;
}

// ---------------------------------------------------------------------------
// Foreign signatures and re-addressed messages
// ---------------------------------------------------------------------------

/// Envelopes from `c` (agent `agent`) to `to` whose signature is valid for
/// *something*, just not for this body under `c`'s key in the envelope
/// domain. Tags are always valid: only Ed25519 can tell.
fn foreign_signatures(
    c: &RawClient,
    agent: &str,
    to: &str,
    redirect_to: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    let fresh = |payload: &[u8]| body_bytes(c, random_id(), agent, to, now_ms(), payload);
    let tag = |b: &[u8]| c.fleet.tag(Domain::EnvelopeTag, &[b]);
    let mut out = Vec::new();
    for (case, domain) in [
        (
            "signed in the registration-proof domain",
            Domain::RegisterProof,
        ),
        ("signed in the envelope-tag domain", Domain::EnvelopeTag),
    ] {
        let b = fresh(b"other domain");
        out.push((case, wrap(&b, tag(&b), c.identity.sign(domain, &b).0)));
    }
    // A genuine signature by the same key, of another message.
    let b = fresh(b"this one");
    let other = fresh(b"another one");
    out.push((
        "signature of another message by the same key",
        wrap(
            &b,
            tag(&b),
            c.identity.sign(Domain::EnvelopeSignature, &other).0,
        ),
    ));
    // A genuine message re-addressed (by someone holding the fleet secret,
    // e.g. a compromised relay): same id and content, new recipient, fresh
    // tag, the original signature.
    let id = random_id();
    let sent = now_ms();
    let original = body_bytes(c, id, agent, to, sent, b"for the original recipient");
    let sig = c.identity.sign(Domain::EnvelopeSignature, &original).0;
    let moved = body_bytes(
        c,
        id,
        agent,
        redirect_to,
        sent,
        b"for the original recipient",
    );
    out.push((
        "re-addressed, original signature",
        wrap(&moved, tag(&moved), sig),
    ));
    out
}

#[tokio::test]
async fn foreign_signatures_and_readdressed_messages_are_refused_by_a_verifying_relay() {
    let mut net = net(|c| c.verify_signatures = true).await;
    let mut tx = net.a.attach("alice", false).await;
    // Redirected to an agent that is not attached: without the signature
    // check it would be TargetOffline, not BadSignature.
    let cases = foreign_signatures(&net.a, "alice", "inst-b/bob", "inst-b/carol");
    for (case, env) in &cases {
        let id = OpenedEnvelope::open(env).unwrap().body.id;
        tx.send_envelope(env).await;
        let f = tx
            .read()
            .await
            .unwrap_or_else(|| panic!("{case}: no answer"));
        expect_failed(&f, id, ErrorCode::BadSignature, case);
        flows(&net.a, &mut tx, "alice", &mut net.rx, case).await;
    }
    assert_eq!(
        net.relay
            .relay()
            .stats()
            .refused_count(ErrorCode::BadSignature),
        cases.len() as u64
    );
    others_unaffected(&mut net).await;
}

async fn nothing_for(agent: &mut agent_link::Agent, case: &str) {
    assert!(
        tokio::time::timeout(QUIET, agent.recv()).await.is_err(),
        "{case}: something reached the application"
    );
}

#[tokio::test]
async fn receiver_refuses_flipped_foreign_and_readdressed_signatures_the_relay_let_through() {
    let relay = TestRelay::start(|c| c.verify_signatures = false).await;
    let one = peer(&relay, "inst-one").await;
    let mut bob = one.attach("bob").await.unwrap();
    let mut carol = one.attach("carol").await.unwrap();
    let key = Identity::generate();
    relay.register("inst-m", &key);
    let m = RawClient::connect(&relay, key, "inst-m").await.unwrap();
    let mut tx = m.attach("m", false).await;

    let mut cases = foreign_signatures(&m, "m", "inst-one/bob", "inst-one/carol");
    for (case, byte, mask) in [
        ("signature R, first bit", 0usize, 0x01u8),
        ("signature s, first bit", 32, 0x01),
        ("signature s, top bit (non-canonical)", 63, 0x80),
    ] {
        let mut env = m.envelope(random_id(), "m", "inst-one/bob", now_ms(), b"flipped");
        let at = layout(&env).signature + byte;
        env[at] ^= mask;
        cases.push((case, env));
    }
    for (case, env) in &cases {
        let id = OpenedEnvelope::open(env).unwrap().body.id;
        tx.send_envelope(env).await;
        let f = tx
            .read()
            .await
            .unwrap_or_else(|| panic!("{case}: no answer"));
        // The receiver's Nack, carried back by the relay.
        expect_failed(&f, id, ErrorCode::BadSignature, case);
        nothing_for(&mut bob, case).await;
        nothing_for(&mut carol, case).await;
    }
    // Both agents still receive good messages from the same sender.
    for (agent, to) in [(&mut bob, "inst-one/bob"), (&mut carol, "inst-one/carol")] {
        let id = random_id();
        tx.send_envelope(&m.envelope(id, "m", to, now_ms(), b"good"))
            .await;
        assert_eq!(recv(agent).await.id.0, id);
        assert!(matches!(
            tx.read().await.unwrap().get(),
            RelayToPeer::Receipt { .. }
        ));
    }
    assert_eq!(
        relay.relay().stats().refused_count(ErrorCode::BadSignature),
        0
    );
}

// ---------------------------------------------------------------------------
// Replay window: reorders and duplicates
// ---------------------------------------------------------------------------

fn receipt_of(f: &OwnedFrame, id: [u8; 16], case: &str) -> u64 {
    match f.get() {
        RelayToPeer::Receipt { receipt } => {
            assert_eq!(receipt.id, id, "{case}");
            assert_eq!(receipt.from.to_string(), "inst-one/bob", "{case}");
            receipt.delivered_at_ms
        }
        other => panic!("{case}: expected a receipt, got {other:?}"),
    }
}

#[tokio::test]
async fn reordered_messages_are_each_delivered_once_and_duplicates_get_the_first_receipt() {
    let relay = TestRelay::start(|_| {}).await;
    let one = peer(&relay, "inst-one").await;
    let mut bob = one.attach("bob").await.unwrap();
    let key = Identity::generate();
    relay.register("inst-r", &key);
    let r = RawClient::connect(&relay, key, "inst-r").await.unwrap();
    let mut tx = r.attach("r", false).await;

    // A, B, C written in that order, arriving as C, A, B.
    let now = now_ms();
    let ids = [random_id(), random_id(), random_id()];
    let payloads: [&[u8]; 3] = [b"A", b"B", b"C"];
    let envs: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            r.envelope(
                ids[i],
                "r",
                "inst-one/bob",
                now - 3000 + 1000 * i as u64,
                payloads[i],
            )
        })
        .collect();
    let mut first = [0u64; 3];
    for i in [2usize, 0, 1] {
        tx.send_envelope(&envs[i]).await;
        // The receipt comes once bob's application has taken it.
        let m = recv(&mut bob).await;
        first[i] = receipt_of(&tx.read().await.expect("receipt"), ids[i], "first delivery");
        assert_eq!(
            (m.id.0, &m.payload[..]),
            (ids[i], payloads[i]),
            "in arrival order"
        );
    }
    // Duplicates of B and of A, and an old id with new content (same id,
    // another payload, validly sealed): each answered with its first
    // receipt, none delivered again.
    let same_id_new_content = r.envelope(ids[2], "r", "inst-one/bob", now_ms(), b"not C");
    for (case, env, i) in [
        ("duplicate of B", &envs[1], 1usize),
        ("duplicate of A", &envs[0], 0),
        ("C's id, other content", &same_id_new_content, 2),
        ("duplicate of B again", &envs[1], 1),
    ] {
        tx.send_envelope(env).await;
        let at = receipt_of(&tx.read().await.expect("receipt"), ids[i], case);
        assert_eq!(at, first[i], "{case}: not the first receipt");
        nothing_for(&mut bob, case).await;
    }
    // And the agent is still receiving.
    let id = random_id();
    tx.send_envelope(&r.envelope(id, "r", "inst-one/bob", now_ms(), b"D"))
        .await;
    assert_eq!(recv(&mut bob).await.id.0, id);
}

// ---------------------------------------------------------------------------
// Framing: length prefixes, truncation, trailing bytes, unknown tags, UTF-8
// ---------------------------------------------------------------------------

/// Where on a connection a hostile frame is written.
#[derive(Debug, Clone, Copy)]
enum At {
    /// The first frame of a new stream.
    FirstFrame,
    /// After `Attach` (an agent stream).
    AgentStream,
    /// After a `StatusRequest` was answered (a control stream).
    ControlStream,
}

const EVERYWHERE: [At; 3] = [At::FirstFrame, At::AgentStream, At::ControlStream];

async fn open_at(c: &RawClient, at: At) -> RawStream {
    match at {
        At::FirstFrame => c.open().await,
        At::AgentStream => c.attach("alice", false).await,
        At::ControlStream => {
            let mut s = c.open().await;
            s.write(&PeerToRelay::StatusRequest).await;
            let f = s.read().await.expect("status");
            assert!(
                matches!(f.get(), RelayToPeer::Status { .. }),
                "{:?}",
                f.get()
            );
            s
        }
    }
}

/// Write `bytes` (then FIN if `fin`) at each position in `at` on `net.a`:
/// exactly `Error{code}`, the stream ends, and the connection still sends.
async fn refused_at(
    net: &mut Net,
    case: &str,
    at: &[At],
    bytes: &[u8],
    fin: bool,
    code: ErrorCode,
) {
    for &at in at {
        let case = format!("{case} ({at:?})");
        let mut s = open_at(&net.a, at).await;
        // The relay may stop the stream as soon as it has seen the header.
        let _ = s.send.write_all(bytes).await;
        if fin {
            let _ = s.send.finish();
        }
        error_then_end(&mut s, code, &case).await;
        same_connection_flows(&net.a, &mut net.rx, &case).await;
    }
}

/// The same from a key that is not registered yet: `Error{code}` on its only
/// stream, then the connection is closed with `code`.
async fn refused_before_registration(
    relay: &TestRelay,
    case: &str,
    bytes: &[u8],
    fin: bool,
    code: ErrorCode,
) {
    let c = RawClient::connect(relay, Identity::generate(), "stranger")
        .await
        .unwrap();
    let mut s = c.open().await;
    let _ = s.send.write_all(bytes).await;
    if fin {
        let _ = s.send.finish();
    }
    let f = s
        .read()
        .await
        .unwrap_or_else(|| panic!("{case} before registration: no answer"));
    assert_eq!(
        f.get(),
        RelayToPeer::Error { code },
        "{case} before registration"
    );
    let reason = tokio::time::timeout(WAIT, c.conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{case} before registration: connection not closed"));
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            u64::from(close.error_code),
            u64::from(code.as_u32()),
            "{case} before registration: close code"
        ),
        other => panic!("{case} before registration: {other:?}"),
    }
}

#[tokio::test]
async fn length_prefix_of_eight_ff_bytes_is_too_large_on_every_stream() {
    let mut net = net(|_| {}).await;
    let bytes = [0xff; 8];
    refused_at(
        &mut net,
        "ff x 8",
        &EVERYWHERE,
        &bytes,
        false,
        ErrorCode::TooLarge,
    )
    .await;
    refused_before_registration(&net.relay, "ff x 8", &bytes, false, ErrorCode::TooLarge).await;
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
        "1 GiB header",
        &EVERYWHERE,
        &bytes,
        false,
        ErrorCode::TooLarge,
    )
    .await;
    refused_before_registration(
        &net.relay,
        "1 GiB header",
        &bytes,
        false,
        ErrorCode::TooLarge,
    )
    .await;
    // Before registration the limit is 1024 bytes: a 1025-byte frame is
    // already too large.
    let mut big = raw_frame(&[0u8; 1025]);
    big.truncate(4 + 16);
    refused_before_registration(
        &net.relay,
        "1025-byte frame",
        &big,
        false,
        ErrorCode::TooLarge,
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
        "2 of 50 bytes",
        &EVERYWHERE,
        &[0, 0, 0, 50, 1, 2],
        true,
        ErrorCode::Malformed,
    )
    .await;
    // Only part of a header.
    refused_at(
        &mut net,
        "half a header",
        &[At::AgentStream],
        &[0, 0],
        true,
        ErrorCode::Malformed,
    )
    .await;
    // A real message cut in half: nothing of it is delivered.
    let env = net
        .a
        .envelope(random_id(), "alice", "inst-b/bob", now_ms(), b"half of me");
    let whole = raw_frame(&send_body(&env));
    refused_at(
        &mut net,
        "half a Send",
        &[At::AgentStream],
        &whole[..whole.len() / 2],
        true,
        ErrorCode::Malformed,
    )
    .await;
    refused_before_registration(
        &net.relay,
        "2 of 50 bytes",
        &[0, 0, 0, 50, 1, 2],
        true,
        ErrorCode::Malformed,
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
        "Attach + 1 byte",
        &[At::FirstFrame],
        &with_trailing(&attach, &[0]),
        false,
        ErrorCode::Malformed,
    )
    .await;
    let status = codec::encode_body(&PeerToRelay::StatusRequest).unwrap();
    refused_at(
        &mut net,
        "StatusRequest + 1 byte",
        &[At::ControlStream],
        &with_trailing(&status, &[1]),
        false,
        ErrorCode::Malformed,
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
            case,
            &[At::AgentStream],
            &bytes,
            false,
            ErrorCode::Malformed,
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
        "Ack + 1 byte",
        &[At::AgentStream],
        &with_trailing(&ack, &[0]),
        false,
        ErrorCode::Malformed,
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
    // PeerToRelay has 7 variants (0..=6).
    for (case, body) in [
        ("variant 7", vec![7u8]),
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
            case,
            &EVERYWHERE,
            &raw_frame(&body),
            false,
            ErrorCode::Malformed,
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
        "Nack with unknown ErrorCode",
        &[At::AgentStream],
        &raw_frame(&nack),
        false,
        ErrorCode::Malformed,
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
        "Attach with bool 2",
        &[At::FirstFrame],
        &raw_frame(&attach),
        false,
        ErrorCode::Malformed,
    )
    .await;
    refused_before_registration(
        &net.relay,
        "variant 7",
        &raw_frame(&[7]),
        false,
        ErrorCode::Malformed,
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
        "Send first",
        &[At::FirstFrame],
        &send,
        false,
        ErrorCode::NotAttached,
    )
    .await;
    refused_at(
        &mut net,
        "Nack first",
        &[At::FirstFrame],
        &nack,
        false,
        ErrorCode::NotAttached,
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
        "Attach on an agent stream",
        &[At::AgentStream],
        &attach,
        false,
        ErrorCode::Malformed,
    )
    .await;
    refused_at(
        &mut net,
        "StatusRequest on an agent stream",
        &[At::AgentStream],
        &status,
        false,
        ErrorCode::Malformed,
    )
    .await;
    refused_at(
        &mut net,
        "Send on a control stream",
        &[At::ControlStream],
        &send,
        false,
        ErrorCode::Malformed,
    )
    .await;
    refused_at(
        &mut net,
        "Attach on a control stream",
        &[At::ControlStream],
        &attach,
        false,
        ErrorCode::Malformed,
    )
    .await;
    others_unaffected(&mut net).await;
}

#[tokio::test]
async fn invalid_utf8_and_invalid_ids_in_attach_register_and_addresses_are_refused() {
    let mut net = net(|_| {}).await;
    // Attach: agent "\xc3(" (a lead byte without its continuation), then
    // valid UTF-8 that is not a valid id.
    refused_at(
        &mut net,
        "Attach, invalid UTF-8",
        &[At::FirstFrame],
        &raw_frame(&[2, 2, 0xc3, b'(', 0]),
        false,
        ErrorCode::Malformed,
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
            &format!("Attach {agent:?}"),
            &[At::FirstFrame],
            &attach(agent),
            false,
            ErrorCode::BadAddress,
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
        "Register, invalid UTF-8",
        &[At::ControlStream],
        &register,
        false,
        ErrorCode::Malformed,
    )
    .await;
    refused_before_registration(
        &net.relay,
        "Register, invalid UTF-8",
        &register,
        false,
        ErrorCode::Malformed,
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
        "Register, non-ASCII id",
        &register_non_ascii,
        false,
        ErrorCode::BadAddress,
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
        refused_at(&mut net, case, &[At::AgentStream], bytes, false, *code).await;
    }
    others_unaffected(&mut net).await;
}

// ---------------------------------------------------------------------------
// Slowloris: a frame trickled byte by byte
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Weak (small-order) client keys
// ---------------------------------------------------------------------------

/// Small-order Ed25519 points, encoded: the identity (order 1), the point of
/// order 2, the two of order 4, one of order 8.
const SMALL_ORDER: [&str; 5] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
];

/// A real self-signed instance certificate with its key replaced by `weak`
/// (same length, so the DER stays well-formed; its own signature no longer
/// matches, which no one checks: the handshake signature proves the key).
fn cert_with_key(weak: [u8; 32]) -> rustls::pki_types::CertificateDer<'static> {
    let id = Identity::generate();
    let mut der = TlsIdentity::self_signed(&id, "weak").unwrap().cert.to_vec();
    let pk = id.public_key().0;
    let at = der
        .windows(32)
        .position(|w| w == pk)
        .expect("key in the certificate");
    der[at..at + 32].copy_from_slice(&weak);
    rustls::pki_types::CertificateDer::from(der)
}

/// Signs every handshake as the identity point could: R = identity, s = 0
/// satisfies [s]B = R + [k]A for A = identity and any message, so only an
/// explicit small-order check stops it.
#[derive(Debug)]
struct IdentityPointKey;

impl rustls::sign::SigningKey for IdentityPointKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ED25519)
            .then(|| Box::new(IdentityPointSigner) as Box<dyn rustls::sign::Signer>)
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ED25519
    }
}

#[derive(Debug)]
struct IdentityPointSigner;

impl rustls::sign::Signer for IdentityPointSigner {
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut sig = vec![0u8; 64];
        sig[0] = 1;
        Ok(sig)
    }
    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ED25519
    }
}

#[derive(Debug)]
struct Present(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Present {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[test]
fn small_order_keys_in_a_certificate_are_refused() {
    for hex_key in SMALL_ORDER {
        let mut weak = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut weak).unwrap();
        assert!(
            matches!(
                instance_key_from_cert(&cert_with_key(weak)),
                Err(CryptoError::WeakPublicKey)
            ),
            "{hex_key} accepted"
        );
    }
    // The same certificate with a strong key is accepted (the surgery is
    // not what is refused).
    let strong = Identity::generate().public_key();
    assert_eq!(
        instance_key_from_cert(&cert_with_key(strong.0)).unwrap(),
        strong
    );
}

#[tokio::test]
async fn a_client_with_a_small_order_key_fails_the_handshake() {
    let mut net = net(|c| c.auth_timeout_secs = 1).await;
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    let tls_id = TlsIdentity::self_signed(&Identity::generate(), "x").unwrap();
    let mut cfg = instance_client_config(&tls_id, net.relay.token.fingerprint).unwrap();
    cfg.client_auth_cert_resolver = Arc::new(Present(Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert_with_key(identity_point)],
        Arc::new(IdentityPointKey),
    ))));
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let accepted_before = net
        .relay
        .relay()
        .stats()
        .connections_accepted
        .load(std::sync::atomic::Ordering::Relaxed);
    let attempt = tokio::time::timeout(
        WAIT,
        ep.connect(net.relay.addr, "agent-link-relay").unwrap(),
    )
    .await
    .expect("refused promptly");
    // TLS 1.3: the client may consider its side done before the relay has
    // judged its certificate; then the refusal arrives as the close.
    let reason = match attempt {
        Err(e) => e,
        Ok(conn) => tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("closed promptly"),
    };
    match reason {
        // The TLS alert bad_certificate (42) as a QUIC crypto error.
        quinn::ConnectionError::ConnectionClosed(c) => {
            assert_eq!(c.error_code, quinn::TransportErrorCode::crypto(42), "{c:?}")
        }
        other => panic!("expected the handshake to fail on the certificate, got {other:?}"),
    }
    let stats = net.relay.relay().stats();
    assert!(
        stats
            .handshakes_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(
        stats
            .connections_accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        accepted_before
    );
    same_connection_flows(&net.a, &mut net.rx, "after the weak key").await;
    others_unaffected(&mut net).await;
}
