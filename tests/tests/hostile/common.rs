//! What the hostile modules share: [`Net`] (a hostile client, its target,
//! a bystander) and the assertions every case ends with (the target got
//! nothing else, the same connection and other clients still send);
//! [`Case`] and [`refused_at`] for a hostile write on each kind of stream;
//! envelopes and frames built byte by byte.

use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::{Domain, Identity};
use agent_link_proto::{
    codec, Address, Envelope, EnvelopeBody, ErrorCode, OpenedEnvelope, PeerToRelay, RelayToPeer,
};
use agent_link_relay::RelayConfig;
use agent_link_tests::*;

/// How long to wait for something that must *not* arrive.
pub(crate) const QUIET: Duration = Duration::from_millis(300);

/// A relay; `a` (inst-a) is the hostile client, `b` (inst-b) the target,
/// receiving as `bob` on `rx`; `z` (inst-z) an unrelated client.
pub(crate) struct Net {
    pub(crate) relay: TestRelay,
    pub(crate) a: RawClient,
    pub(crate) rx: RawStream,
    pub(crate) z: RawClient,
    _b: RawClient,
}

pub(crate) async fn net(tweak: impl FnOnce(&mut RelayConfig)) -> Net {
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
pub(crate) fn delivered_id(f: &OwnedFrame) -> [u8; 16] {
    match f.get() {
        RelayToPeer::Deliver { envelope, .. } => OpenedEnvelope::open(envelope).unwrap().body.id,
        other => panic!("expected Deliver, got {other:?}"),
    }
}

/// Send a good message on `tx` (attached as `agent`) and check that the
/// target's *next* frame is exactly that message: so nothing sent before it
/// reached the target either.
pub(crate) async fn flows(
    c: &RawClient,
    tx: &mut RawStream,
    agent: &str,
    rx: &mut RawStream,
    case: &str,
) {
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
pub(crate) async fn same_connection_flows(a: &RawClient, rx: &mut RawStream, case: &str) {
    let mut tx = a.attach("alice", false).await;
    flows(a, &mut tx, "alice", rx, case).await;
}

/// Another client still sends, and nothing else is waiting at the target.
pub(crate) async fn others_unaffected(net: &mut Net) {
    let mut tx = net.z.attach("zed", false).await;
    flows(&net.z, &mut tx, "zed", &mut net.rx, "other client").await;
    assert!(
        net.rx.read_within(QUIET).await.is_err(),
        "nothing else reached the target"
    );
}

/// The stream gets exactly `Error{code}` and then ends.
pub(crate) async fn error_then_end(s: &mut RawStream, code: ErrorCode, case: &str) {
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

/// A whole frame around `body`, whatever `body` is.
pub(crate) fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

pub(crate) fn send_body(envelope: &[u8]) -> Vec<u8> {
    codec::encode_body(&PeerToRelay::Send { envelope }).unwrap()
}

/// The encoded `EnvelopeBody` of a message from `c`.
pub(crate) fn body_bytes(
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

pub(crate) fn wrap(body: &[u8], tag: [u8; 32], signature: [u8; 64]) -> Vec<u8> {
    codec::encode_body(&Envelope {
        body,
        tag,
        signature,
    })
    .unwrap()
}

/// Tag and sign arbitrary body bytes as `c` would (valid tag and signature
/// over whatever the bytes are).
pub(crate) fn seal_bytes(c: &RawClient, body: &[u8]) -> Vec<u8> {
    wrap(
        body,
        c.fleet.tag(Domain::EnvelopeTag, &[body]),
        c.identity.sign(Domain::EnvelopeSignature, body).0,
    )
}

/// Where on a connection a hostile frame is written.
#[derive(Debug, Clone, Copy)]
pub(crate) enum At {
    /// The first frame of a new stream.
    FirstFrame,
    /// After `Attach` (an agent stream).
    AgentStream,
    /// After a `StatusRequest` was answered (a control stream).
    ControlStream,
}

pub(crate) const EVERYWHERE: [At; 3] = [At::FirstFrame, At::AgentStream, At::ControlStream];

pub(crate) async fn open_at(c: &RawClient, at: At) -> RawStream {
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

/// A hostile write and the refusal it must get: `bytes` written on a fresh
/// stream (then FIN, with [`Case::then_fin`]), answered with exactly
/// `Error{code}`; `name` says which case failed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Case<'a> {
    pub(crate) name: &'a str,
    pub(crate) bytes: &'a [u8],
    pub(crate) fin: bool,
    pub(crate) code: ErrorCode,
}

impl<'a> Case<'a> {
    /// `bytes`, the stream left open, refused with `code`.
    pub(crate) fn new(name: &'a str, bytes: &'a [u8], code: ErrorCode) -> Self {
        Self {
            name,
            bytes,
            fin: false,
            code,
        }
    }

    /// The same, with FIN after the bytes.
    pub(crate) fn then_fin(self) -> Self {
        Self { fin: true, ..self }
    }
}

/// Write `case.bytes` (then FIN if `case.fin`) at each position in `at` on
/// `net.a`: exactly `Error{case.code}`, the stream ends, and the connection
/// still sends.
pub(crate) async fn refused_at(net: &mut Net, at: &[At], case: Case<'_>) {
    let Case {
        name: case,
        bytes,
        fin,
        code,
    } = case;
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
pub(crate) async fn refused_before_registration(relay: &TestRelay, case: Case<'_>) {
    let Case {
        name: case,
        bytes,
        fin,
        code,
    } = case;
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

/// A relay with a short authentication deadline, and a registered client
/// that must keep working whatever the hostile one did.
pub(crate) async fn relay_and_bystander() -> (TestRelay, RawClient, RawClient) {
    let relay = TestRelay::start(|c| {
        c.auth_timeout_secs = 1;
        c.max_agents_per_connection = 2;
    })
    .await;
    let (a, b) = (Identity::generate(), Identity::generate());
    relay.register("good-a", &a);
    relay.register("good-b", &b);
    let a = RawClient::connect(&relay, a, "good-a").await.unwrap();
    let b = RawClient::connect(&relay, b, "good-b").await.unwrap();
    (relay, a, b)
}

pub(crate) async fn bystander_still_works(a: &RawClient, b: &RawClient) {
    let mut rx = b.attach("rx", true).await;
    let mut tx = a.attach("tx", false).await;
    tx.send_envelope(&a.envelope(random_id(), "tx", "good-b/rx", now_ms(), b"still here"))
        .await;
    let f = rx.read().await.expect("delivery");
    assert!(
        matches!(f.get(), RelayToPeer::Deliver { .. }),
        "{:?}",
        f.get()
    );
}

pub(crate) fn endpoint_with(cfg: rustls::ClientConfig) -> quinn::Endpoint {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}
