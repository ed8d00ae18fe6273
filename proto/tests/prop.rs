//! Property tests: every decoder round-trips what the encoder makes, no
//! decoder panics on arbitrary bytes or on mutations of valid encodings
//! (bit flips, truncations, appended bytes), and whatever a decoder borrows
//! lies inside the buffer it was given.

use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::{
    check_id, codec, Address, EnvelopeBody, ErrorCode, InstanceStatus, JoinToken, OpenedEnvelope,
    PeerToRelay, ProtoError, Receipt, RelayToPeer, RelayTrust,
};
use proptest::prelude::*;

// ---------------------------------------------------------------- strategies

fn id_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}".prop_filter("`.` and `..` are not ids", |s| s != "." && s != "..")
}

/// Any text at all (names are free text; also used for invalid ids).
fn text_strategy() -> impl Strategy<Value = String> {
    prop_oneof![".{0,40}", "[A-Za-z0-9._/ -]{0,70}", id_strategy()]
}

fn code_strategy() -> impl Strategy<Value = ErrorCode> {
    (0..ErrorCode::ALL.len()).prop_map(|i| ErrorCode::ALL[i])
}

/// u64s biased towards the varint boundaries (250/251, 2^16, 2^32).
fn varint_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..=260,
        0xff00u64..=0x1_00ff,
        0xffff_ff00u64..=0x1_0000_00ff,
        Just(u64::MAX),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

#[derive(Debug, Clone)]
struct OwnedReceipt {
    id: [u8; 16],
    instance: String,
    agent: String,
    at: u64,
}

impl OwnedReceipt {
    fn view(&self) -> Receipt<'_> {
        Receipt {
            id: self.id,
            from: Address {
                instance: &self.instance,
                agent: &self.agent,
            },
            delivered_at_ms: self.at,
        }
    }
}

fn receipt_strategy() -> impl Strategy<Value = OwnedReceipt> {
    (
        any::<[u8; 16]>(),
        text_strategy(),
        text_strategy(),
        varint_u64(),
    )
        .prop_map(|(id, instance, agent, at)| OwnedReceipt {
            id,
            instance,
            agent,
            at,
        })
}

/// Owned mirror of `PeerToRelay`, so a strategy can produce it.
#[derive(Debug, Clone)]
enum OwnedPeer {
    Register(String, String, [u8; 32]),
    RegisterInvite(String, String, [u8; 32]),
    StatusRequest,
    Attach(String, bool),
    Send(Vec<u8>),
    Ack(u64, OwnedReceipt),
    Nack(u64, [u8; 16], ErrorCode),
    StatusPageRequest(u32),
}

impl OwnedPeer {
    fn view(&self) -> PeerToRelay<'_> {
        match self {
            Self::Register(i, n, p) => PeerToRelay::Register {
                instance_id: i,
                name: n,
                proof: *p,
            },
            Self::RegisterInvite(i, n, p) => PeerToRelay::RegisterInvite {
                instance_id: i,
                name: n,
                proof: *p,
            },
            Self::StatusRequest => PeerToRelay::StatusRequest,
            Self::Attach(a, r) => PeerToRelay::Attach {
                agent: a,
                receive: *r,
            },
            Self::Send(e) => PeerToRelay::Send { envelope: e },
            Self::Ack(t, r) => PeerToRelay::Ack {
                reply_token: *t,
                receipt: r.view(),
            },
            Self::Nack(t, id, c) => PeerToRelay::Nack {
                reply_token: *t,
                id: *id,
                code: *c,
            },
            Self::StatusPageRequest(start) => PeerToRelay::StatusPageRequest { start: *start },
        }
    }
}

fn peer_strategy() -> impl Strategy<Value = OwnedPeer> {
    prop_oneof![
        (text_strategy(), text_strategy(), any::<[u8; 32]>())
            .prop_map(|(i, n, p)| OwnedPeer::Register(i, n, p)),
        (text_strategy(), text_strategy(), any::<[u8; 32]>())
            .prop_map(|(i, n, p)| OwnedPeer::RegisterInvite(i, n, p)),
        Just(OwnedPeer::StatusRequest),
        (text_strategy(), any::<bool>()).prop_map(|(a, r)| OwnedPeer::Attach(a, r)),
        bytes(600).prop_map(OwnedPeer::Send),
        (varint_u64(), receipt_strategy()).prop_map(|(t, r)| OwnedPeer::Ack(t, r)),
        (varint_u64(), any::<[u8; 16]>(), code_strategy())
            .prop_map(|(t, id, c)| OwnedPeer::Nack(t, id, c)),
        any::<u32>().prop_map(OwnedPeer::StatusPageRequest),
    ]
}

/// Owned mirror of `RelayToPeer`.
#[derive(Debug, Clone)]
enum OwnedRelay {
    Registered(String),
    Status(InstanceStatus, Vec<InstanceStatus>),
    Attached(String, u32, u64),
    Deliver(u64, [u8; 32], Vec<u8>),
    Receipt(OwnedReceipt),
    Failed([u8; 16], ErrorCode),
    Error(ErrorCode),
    FleetSecret([u8; 32], u64),
}

impl OwnedRelay {
    fn view(&self) -> RelayToPeer<'_> {
        match self {
            Self::Registered(i) => RelayToPeer::Registered { instance_id: i },
            Self::Status(you, all) => RelayToPeer::Status {
                you: you.clone(),
                instances: all.clone(),
            },
            Self::Attached(a, m, w) => RelayToPeer::Attached {
                agent: a,
                max_message_size: *m,
                timestamp_window_ms: *w,
            },
            Self::Deliver(t, k, e) => RelayToPeer::Deliver {
                reply_token: *t,
                sender_key: *k,
                envelope: e,
            },
            Self::Receipt(r) => RelayToPeer::Receipt { receipt: r.view() },
            Self::Failed(id, c) => RelayToPeer::Failed { id: *id, code: *c },
            Self::Error(c) => RelayToPeer::Error { code: *c },
            Self::FleetSecret(s, u) => RelayToPeer::FleetSecret {
                secret: *s,
                previous_valid_until_ms: *u,
            },
        }
    }
}

fn status_strategy() -> impl Strategy<Value = InstanceStatus> {
    (
        text_strategy(),
        text_strategy(),
        any::<[u8; 32]>(),
        any::<bool>(),
        proptest::collection::vec(text_strategy(), 0..4),
    )
        .prop_map(
            |(instance_id, name, public_key, online, agents)| InstanceStatus {
                instance_id,
                name,
                public_key,
                online,
                agents,
            },
        )
}

fn relay_strategy() -> impl Strategy<Value = OwnedRelay> {
    prop_oneof![
        text_strategy().prop_map(OwnedRelay::Registered),
        (
            status_strategy(),
            proptest::collection::vec(status_strategy(), 0..4)
        )
            .prop_map(|(y, a)| OwnedRelay::Status(y, a)),
        (
            text_strategy(),
            any::<u32>(),
            varint_u64().prop_map(|v| v % (1 << 40))
        )
            .prop_map(|(a, m, w)| OwnedRelay::Attached(a, m, w)),
        (varint_u64(), any::<[u8; 32]>(), bytes(600))
            .prop_map(|(t, k, e)| OwnedRelay::Deliver(t, k, e)),
        receipt_strategy().prop_map(OwnedRelay::Receipt),
        (any::<[u8; 16]>(), code_strategy()).prop_map(|(id, c)| OwnedRelay::Failed(id, c)),
        code_strategy().prop_map(OwnedRelay::Error),
        (any::<[u8; 32]>(), varint_u64()).prop_map(|(s, u)| OwnedRelay::FleetSecret(s, u)),
    ]
}

/// A mutation of a valid encoding.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip these bits (positions taken modulo the length).
    Flip(Vec<(usize, u8)>),
    /// Keep only a prefix (length taken modulo len + 1).
    Truncate(usize),
    /// Append bytes.
    Append(Vec<u8>),
    /// Overwrite one byte with a varint marker or a boundary value.
    Poke(usize, u8),
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        proptest::collection::vec((any::<usize>(), 0u8..8), 1..4).prop_map(Mutation::Flip),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        (
            any::<usize>(),
            prop_oneof![
                Just(0xfbu8),
                Just(0xfc),
                Just(0xfd),
                Just(0xfe),
                Just(0xff),
                Just(0),
                Just(0xfa)
            ]
        )
            .prop_map(|(p, b)| Mutation::Poke(p, b)),
    ]
}

fn mutate(good: &[u8], m: &Mutation) -> Vec<u8> {
    let mut v = good.to_vec();
    match m {
        Mutation::Flip(flips) => {
            if !v.is_empty() {
                for (pos, bit) in flips {
                    let i = pos % v.len();
                    v[i] ^= 1 << bit;
                }
            }
        }
        Mutation::Truncate(cut) => v.truncate(cut % (good.len() + 1)),
        Mutation::Append(extra) => v.extend_from_slice(extra),
        Mutation::Poke(pos, b) => {
            if !v.is_empty() {
                let i = pos % v.len();
                v[i] = *b;
            }
        }
    }
    v
}

// --------------------------------------------------------------- invariants

/// `inner` lies inside `outer`'s memory (what "borrows from the input" means).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr_range(), inner.as_ptr_range());
    inner.is_empty() || (o.start <= i.start && i.end <= o.end)
}

fn peer_borrows<'a>(f: &PeerToRelay<'a>) -> Vec<&'a [u8]> {
    match *f {
        PeerToRelay::Register {
            instance_id, name, ..
        }
        | PeerToRelay::RegisterInvite {
            instance_id, name, ..
        } => vec![instance_id.as_bytes(), name.as_bytes()],
        PeerToRelay::StatusRequest
        | PeerToRelay::Nack { .. }
        | PeerToRelay::Detach
        | PeerToRelay::StatusPageRequest { .. } => vec![],
        PeerToRelay::Attach { agent, .. } => vec![agent.as_bytes()],
        PeerToRelay::Send { envelope } => vec![envelope],
        PeerToRelay::Ack { receipt, .. } => {
            vec![
                receipt.from.instance.as_bytes(),
                receipt.from.agent.as_bytes(),
            ]
        }
    }
}

fn relay_borrows<'a>(f: &RelayToPeer<'a>) -> Vec<&'a [u8]> {
    match f {
        RelayToPeer::Registered { instance_id } => vec![instance_id.as_bytes()],
        RelayToPeer::Attached { agent, .. } => vec![agent.as_bytes()],
        RelayToPeer::Deliver { envelope, .. } => vec![envelope],
        RelayToPeer::Receipt { receipt } => {
            vec![
                receipt.from.instance.as_bytes(),
                receipt.from.agent.as_bytes(),
            ]
        }
        _ => vec![],
    }
}

/// Run every decoder on `bytes`; none may panic, and whatever decodes must
/// borrow only from `bytes`.
fn decode_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(f) = codec::decode::<PeerToRelay>(bytes) {
        for s in peer_borrows(&f) {
            prop_assert!(within(bytes, s), "PeerToRelay borrowed outside its input");
        }
    }
    if let Ok(f) = codec::decode::<RelayToPeer>(bytes) {
        for s in relay_borrows(&f) {
            prop_assert!(within(bytes, s), "RelayToPeer borrowed outside its input");
        }
    }
    if let Ok(env) = OpenedEnvelope::open(bytes) {
        prop_assert!(within(bytes, env.outer.body));
        prop_assert!(within(env.outer.body, env.body.payload));
        for s in [
            env.body.from.instance,
            env.body.from.agent,
            env.body.to.instance,
            env.body.to.agent,
        ] {
            prop_assert!(within(env.outer.body, s.as_bytes()));
            prop_assert!(check_id(s).is_ok(), "open() let an invalid id through");
        }
        prop_assert_eq!(env.body.version, agent_link_proto::VERSION);
    }
    for max in [0, 16, 1 << 20, usize::MAX] {
        check_split(bytes, max)?;
    }
    Ok(())
}

/// `split_frame`'s contract, checked against the header by hand.
fn check_split(buf: &[u8], max: usize) -> Result<(), TestCaseError> {
    let declared = buf
        .get(..4)
        .map(|h| u32::from_be_bytes(h.try_into().unwrap()) as usize);
    match codec::split_frame(buf, max) {
        Ok(Some((body, used))) => {
            let declared = declared.expect("a frame needs a header");
            prop_assert!(declared >= 1 && declared <= max.min(codec::HARD_MAX_FRAME));
            prop_assert_eq!(used, 4 + declared);
            prop_assert!(used <= buf.len());
            prop_assert_eq!(body, &buf[4..used]);
        }
        Ok(None) => {
            if let Some(d) = declared {
                prop_assert!(d >= 1 && d <= max.min(codec::HARD_MAX_FRAME));
                prop_assert!(buf.len() < 4 + d, "complete frame reported incomplete");
            }
        }
        Err(ProtoError::EmptyFrame) => prop_assert_eq!(declared, Some(0)),
        Err(ProtoError::FrameTooLarge { len, max: m }) => {
            prop_assert_eq!(Some(len as usize), declared);
            prop_assert_eq!(m, max.min(codec::HARD_MAX_FRAME));
            prop_assert!(len as usize > m);
        }
        Err(e) => return Err(TestCaseError::fail(format!("unexpected split error {e:?}"))),
    }
    Ok(())
}

fn sealed(body: &EnvelopeBody<'_>) -> Vec<u8> {
    body.seal(
        &Identity::from_seed(&[1; 32]),
        &FleetSecret::from_bytes([2; 32]).key(),
    )
    .unwrap()
}

// -------------------------------------------------------------------- tests

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn envelope_round_trips_and_verifies(
        id in any::<[u8; 16]>(),
        from_i in id_strategy(), from_a in id_strategy(),
        to_i in id_strategy(), to_a in id_strategy(),
        sent in varint_u64(),
        payload in bytes(2048),
        seed in any::<[u8; 32]>(),
        fleet_bytes in any::<[u8; 32]>(),
    ) {
        let identity = Identity::from_seed(&seed);
        let fleet = FleetSecret::from_bytes(fleet_bytes).key();
        let body = EnvelopeBody {
            version: 1,
            id,
            from: Address { instance: &from_i, agent: &from_a },
            to: Address { instance: &to_i, agent: &to_a },
            sent_at_ms: sent,
            payload: &payload,
        };
        let bytes = body.seal(&identity, &fleet).unwrap();
        let env = OpenedEnvelope::open(&bytes).unwrap();
        prop_assert_eq!(env.body, body);
        let encoded = codec::encode_body(&body).unwrap();
        prop_assert_eq!(env.outer.body, encoded.as_slice());
        prop_assert!(env.check_tag(&fleet).is_ok());
        prop_assert!(env.check_signature(&identity.public_key()).is_ok());
        prop_assert!(env.check_sender(&from_i, &from_a).is_ok());
        prop_assert_eq!(env.bytes, bytes.as_slice());
        prop_assert!(env.check_time(sent, 0).is_ok());
        // Another key or another fleet refuses it.
        let other = Identity::from_seed(&seed.map(|b| b ^ 1));
        prop_assert_eq!(env.check_signature(&other.public_key()), Err(ErrorCode::BadSignature));
        let mut wrong = fleet_bytes;
        wrong[0] ^= 1;
        prop_assert_eq!(env.check_tag(&FleetSecret::from_bytes(wrong).key()), Err(ErrorCode::BadTag));
    }

    #[test]
    fn envelope_open_refuses_exactly_the_invalid_addresses(
        from_i in text_strategy(), from_a in text_strategy(),
        to_i in text_strategy(), to_a in text_strategy(),
        version in prop_oneof![Just(1u8), any::<u8>()],
    ) {
        let body = EnvelopeBody {
            version,
            id: [9; 16],
            from: Address { instance: &from_i, agent: &from_a },
            to: Address { instance: &to_i, agent: &to_a },
            sent_at_ms: 1,
            payload: b"p",
        };
        let bytes = sealed(&body);
        let valid = [&from_i, &from_a, &to_i, &to_a].iter().all(|s| check_id(s).is_ok());
        match OpenedEnvelope::open(&bytes) {
            Ok(env) => {
                prop_assert!(valid && version == 1);
                prop_assert_eq!(env.body, body);
            }
            Err(e) => {
                prop_assert!(!valid || version != 1);
                let want = if version != 1 { ErrorCode::Malformed } else { ErrorCode::BadAddress };
                prop_assert_eq!(e.code(), want);
            }
        }
    }

    #[test]
    fn peer_frames_round_trip(f in peer_strategy(), next in peer_strategy()) {
        let f = f.view();
        let bytes = codec::frame(&f).unwrap();
        let body = codec::encode_body(&f).unwrap();
        prop_assert_eq!(&bytes[..4], &(body.len() as u32).to_be_bytes()[..]);
        prop_assert_eq!(&bytes[4..], body.as_slice());
        // A second frame right behind it is left alone.
        let mut stream = bytes.clone();
        codec::encode_frame(&next.view(), &mut stream).unwrap();
        let (got, used) = codec::split_frame(&stream, codec::HARD_MAX_FRAME).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        let back = codec::decode::<PeerToRelay>(got).unwrap();
        for s in peer_borrows(&back) {
            prop_assert!(within(got, s));
        }
        prop_assert_eq!(back, f);
        let (got2, used2) = codec::split_frame(&stream[used..], codec::HARD_MAX_FRAME).unwrap().unwrap();
        prop_assert_eq!(used + used2, stream.len());
        prop_assert_eq!(codec::decode::<PeerToRelay>(got2).unwrap(), next.view());
    }

    #[test]
    fn relay_frames_round_trip(f in relay_strategy()) {
        let f = f.view();
        let bytes = codec::frame(&f).unwrap();
        let (body, used) = codec::split_frame(&bytes, codec::HARD_MAX_FRAME).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        let back = codec::decode::<RelayToPeer>(body).unwrap();
        for s in relay_borrows(&back) {
            prop_assert!(within(body, s));
        }
        prop_assert_eq!(back, f);
    }

    /// bincode is self-delimiting: a strict prefix of a valid body is never
    /// a valid body, and a valid body with bytes after it is refused.
    #[test]
    fn truncated_or_extended_bodies_never_decode(
        p in peer_strategy(),
        r in relay_strategy(),
        cut in any::<usize>(),
        extra in proptest::collection::vec(any::<u8>(), 1..8),
    ) {
        let pb = codec::encode_body(&p.view()).unwrap();
        let cut_p = cut % pb.len();
        prop_assert!(codec::decode::<PeerToRelay>(&pb[..cut_p]).is_err());
        let mut longer = pb.clone();
        longer.extend_from_slice(&extra);
        let is_trailing = matches!(
            codec::decode::<PeerToRelay>(&longer),
            Err(ProtoError::TrailingBytes { extra: n }) if n == extra.len()
        );
        prop_assert!(is_trailing);

        let rb = codec::encode_body(&r.view()).unwrap();
        let cut_r = cut % rb.len();
        prop_assert!(codec::decode::<RelayToPeer>(&rb[..cut_r]).is_err());
        let mut longer = rb.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(codec::decode::<RelayToPeer>(&longer).is_err());
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in bytes(4096)) {
        decode_everything(&bytes)?;
        let _ = JoinToken::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn decoders_never_panic_on_mutated_frames(
        p in peer_strategy(),
        r in relay_strategy(),
        m in mutation_strategy(),
    ) {
        for good in [codec::frame(&p.view()).unwrap(), codec::frame(&r.view()).unwrap()] {
            let bad = mutate(&good, &m);
            // As a whole frame (header included) and as a bare body.
            decode_everything(&bad)?;
            if bad.len() > 4 {
                decode_everything(&bad[4..])?;
            }
        }
    }

    #[test]
    fn mutated_envelopes_never_panic_and_never_verify(
        m in mutation_strategy(),
        payload in bytes(64),
    ) {
        let identity = Identity::from_seed(&[1; 32]);
        let fleet = FleetSecret::from_bytes([2; 32]).key();
        let good = EnvelopeBody {
            version: 1,
            id: [3; 16],
            from: Address { instance: "i1", agent: "a" },
            to: Address { instance: "i2", agent: "b" },
            sent_at_ms: 5,
            payload: &payload,
        }
        .seal(&identity, &fleet)
        .unwrap();
        let bad = mutate(&good, &m);
        decode_everything(&bad)?;
        // Also wrapped in the frames that carry it.
        decode_everything(&codec::frame(&PeerToRelay::Send { envelope: &bad }).unwrap())?;
        if bad != good {
            if let Ok(env) = OpenedEnvelope::open(&bad) {
                let verified = env.check_tag(&fleet).is_ok()
                    && env.check_signature(&identity.public_key()).is_ok();
                prop_assert!(!verified, "a changed envelope verified");
            }
        }
    }

    #[test]
    fn join_token_round_trips(
        host in "[a-z0-9.-]{1,40}",
        port in any::<u16>(),
        fingerprint in proptest::option::of(any::<[u8; 32]>()),
        secret in any::<[u8; 32]>(),
        others in proptest::collection::vec(("[a-z0-9.-]{1,40}", any::<u16>(), proptest::option::of(any::<[u8; 32]>())), 0..16),
    ) {
        // `None`: a relay a CA vouches for.
        let trust = |f: Option<[u8; 32]>| f.map_or(RelayTrust::Ca, RelayTrust::Pinned);
        let t = JoinToken {
            addr: format!("{host}:{port}"),
            trust: trust(fingerprint),
            secret: agent_link_proto::JoinSecret::Fleet(FleetSecret::from_bytes(secret)),
            other_relays: others
                .iter()
                .map(|(h, p, f)| agent_link_proto::RelayEndpoint { addr: format!("{h}:{p}"), trust: trust(*f) })
                .collect(),
        };
        let text = t.encode().unwrap();
        prop_assert!(text.starts_with("al1"));
        prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = JoinToken::parse(&format!(" {text}\n")).unwrap();
        prop_assert_eq!(&back.addr, &t.addr);
        prop_assert_eq!(back.pinned(), fingerprint);
        prop_assert_eq!(back.fleet_secret().unwrap().expose(), &secret);
        prop_assert_eq!(&back.other_relays, &t.other_relays);
        let shown = format!("{back:?}");
        prop_assert!(!shown.contains(&hex::encode(secret)));
    }

    #[test]
    fn join_token_parse_never_panics(
        s in prop_oneof![
            ".{0,200}",
            "al1[A-Za-z0-9_-]{0,200}",
            "al1[A-Za-z0-9_=+/-]{0,200}",
            bytes(200).prop_map(|b| format!("al1{}", base64_url(&b))),
        ],
    ) {
        let _ = JoinToken::parse(&s);
    }

    #[test]
    fn mutated_join_tokens_never_panic(
        m in mutation_strategy(),
        inner in any::<bool>(),
        fleet in any::<bool>(),
    ) {
        let good = JoinToken {
            addr: "relay.example:8765".into(),
            trust: RelayTrust::Pinned([3; 32]),
            secret: agent_link_proto::JoinSecret::Fleet(FleetSecret::from_bytes([2; 32])),
            other_relays: if fleet {
                vec![agent_link_proto::RelayEndpoint { addr: "relay-2.example:8765".into(), trust: RelayTrust::Ca }]
            } else {
                vec![]
            },
        }
        .encode()
        .unwrap();
        let text = if inner {
            // Mutate the bincode inside and re-wrap it, to reach the decoder.
            let raw = base64_url_decode(&good[3..]);
            format!("al1{}", base64_url(&mutate(&raw, &m)))
        } else {
            String::from_utf8_lossy(&mutate(good.as_bytes(), &m)).into_owned()
        };
        if let Ok(t) = JoinToken::parse(&text) {
            for (addr, _) in t.relays() {
                prop_assert!(addr.contains(':') && !addr.is_empty() && addr.len() <= 255);
            }
            prop_assert!(t.other_relays.len() < agent_link_proto::MAX_RELAYS);
        }
    }
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn base64_url_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

// ------------------------------------------------------------------ deframer

/// What a stream of `bytes` holds, read with `codec::split_frame` in one go:
/// its whole frames, then how it ends (`Ok` at a frame boundary, the
/// header's error, or `Truncated`).
fn frames_in(bytes: &[u8], max: usize) -> (Vec<Vec<u8>>, Result<(), ProtoError>) {
    let mut frames = Vec::new();
    let mut rest = bytes;
    loop {
        match codec::split_frame(rest, max) {
            Err(e) => return (frames, Err(e)),
            Ok(Some((body, used))) => {
                frames.push(body.to_vec());
                rest = &rest[used..];
            }
            Ok(None) if rest.is_empty() => return (frames, Ok(())),
            Ok(None) => {
                let need = match rest.first_chunk::<4>() {
                    Some(h) => 4 + u32::from_be_bytes(*h) as usize,
                    None => 4,
                };
                let have = rest.len();
                return (frames, Err(ProtoError::Truncated { have, need }));
            }
        }
    }
}

/// Feed `bytes` to a deframer cut at `cuts` (pushed as chunks or copied, as
/// `by_push` says), taking frames out after each piece the way a reader
/// does; reading at most `wanted()` while mid-frame is checked to keep the
/// buffer within the frame. Returns the frames and how the stream ended.
fn deframed(
    bytes: &[u8],
    max: usize,
    cuts: &[usize],
    by_push: &[bool],
) -> (Vec<Vec<u8>>, Result<(), ProtoError>) {
    let mut d = agent_link_proto::deframe::Deframer::new(max);
    let mut frames = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut at = 0;
    for (i, &end) in points.iter().enumerate() {
        let piece = &bytes[at..end];
        at = end;
        if by_push.get(i).copied().unwrap_or(false) {
            d.push(bytes::Bytes::copy_from_slice(piece));
        } else {
            d.extend(piece);
        }
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    assert!(d.is_mid_frame(), "an error leaves its header buffered");
                    assert_eq!(d.finish(), Err(e.clone()), "finish repeats it");
                    return (frames, Err(e));
                }
            }
        }
        assert_eq!(d.is_mid_frame(), d.buffered() > 0);
        assert!(
            d.wanted() > 0 || d.buffered() == 0,
            "incomplete means wanted"
        );
    }
    (frames, d.finish())
}

fn stream_of(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any split of a valid stream into chunks yields the same frames, and it
    /// ends cleanly.
    #[test]
    fn deframer_any_split_same_frames(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        by_push in proptest::collection::vec(any::<bool>(), 0..21),
    ) {
        let bytes = stream_of(&bodies);
        let (frames, end) = deframed(&bytes, 300, &cuts, &by_push);
        prop_assert_eq!(&frames, &bodies);
        prop_assert_eq!(end, Ok(()));
    }

    /// A valid stream cut anywhere but at a frame boundary is reported as
    /// truncated, with the frames before the cut intact.
    #[test]
    fn deframer_truncation_is_always_reported(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..8),
        cut in any::<usize>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
        by_push in proptest::collection::vec(any::<bool>(), 0..11),
    ) {
        let bytes = stream_of(&bodies);
        let cut = cut % bytes.len();
        let (want_frames, want_end) = frames_in(&bytes[..cut], 300);
        let (frames, end) = deframed(&bytes[..cut], 300, &cuts, &by_push);
        prop_assert_eq!(&frames, &want_frames);
        prop_assert_eq!(&frames[..], &bodies[..frames.len()]);
        let mut boundary = 0;
        let mut at_boundary = cut == 0;
        for b in &bodies {
            boundary += 4 + b.len();
            at_boundary |= boundary == cut;
        }
        if at_boundary {
            prop_assert_eq!(end, Ok(()));
        } else {
            prop_assert!(matches!(end, Err(ProtoError::Truncated { .. })), "{:?}", end);
            prop_assert_eq!(end, want_end);
        }
    }

    /// Arbitrary bytes (any headers, limits from tiny to huge) at any split
    /// give what one pass over the whole input gives: no panic, no frame lost
    /// or invented, the same error or the same truncation.
    #[test]
    fn deframer_arbitrary_bytes_match_one_pass(
        bytes in prop_oneof![
            bytes(600),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6)
                .prop_map(|b| stream_of(&b)),
        ],
        max in prop_oneof![Just(0usize), 0usize..64, Just(usize::MAX)],
        cuts in proptest::collection::vec(any::<usize>(), 0..20),
        by_push in proptest::collection::vec(any::<bool>(), 0..21),
    ) {
        prop_assert_eq!(deframed(&bytes, max, &cuts, &by_push), frames_in(&bytes, max));
    }
}
