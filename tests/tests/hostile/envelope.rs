//! Hostile envelopes: bit flips in the tag, the header, the payload and the
//! signature; signatures valid for something else, and re-addressed
//! messages, at a verifying relay and at the receiver; reordered and
//! duplicated messages against the replay window.

use agent_link_crypto::{Domain, Identity};
use agent_link_proto::{ErrorCode, OpenedEnvelope, RelayToPeer};
use agent_link_tests::*;

use crate::common::*;

fn expect_failed(f: &OwnedFrame, id: [u8; 16], code: ErrorCode, case: &str) {
    assert_eq!(f.get(), RelayToPeer::Failed { id, code }, "{case}");
}

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
