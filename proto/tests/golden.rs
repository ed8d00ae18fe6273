//! Golden vectors: the exact bytes of every frame, the envelope, the
//! registration proof and the join token, rebuilt from fixed inputs and
//! compared with `tests/vectors/*.hex` at the repository root (and with the
//! worked examples in PROTOCOL.md). A change to the wire format fails here
//! first. Regenerate deliberately with
//! `GOLDEN_UPDATE=1 cargo test -p agent-link-proto --test golden`.

use std::path::PathBuf;

use agent_link_crypto::{Domain, FleetSecret, Identity};
use agent_link_proto::{
    codec, Address, EnvelopeBody, ErrorCode, InstanceStatus, JoinSecret, JoinToken, OpenedEnvelope,
    PeerToRelay, Receipt, RelayToPeer, RelayTrust,
};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn check(name: &str, bytes: &[u8]) {
    let path = vectors_dir().join(format!("{name}.hex"));
    let hex = hex::encode(bytes);
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        std::fs::create_dir_all(vectors_dir()).unwrap();
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with GOLDEN_UPDATE=1 to create)",
            path.display()
        )
    });
    assert_eq!(
        hex,
        want.trim(),
        "{name}: bytes differ from {}",
        path.display()
    );
}

fn read(name: &str) -> Vec<u8> {
    let path = vectors_dir().join(format!("{name}.hex"));
    hex::decode(std::fs::read_to_string(path).unwrap().trim()).unwrap()
}

const SENDER_SEED: [u8; 32] = [1; 32];
const FLEET: [u8; 32] = [2; 32];
const ID: [u8; 16] = [0x11; 16];
const SENT_AT: u64 = 1_700_000_000_000;

fn body() -> EnvelopeBody<'static> {
    EnvelopeBody {
        version: 1,
        id: ID,
        from: Address {
            instance: "instance-002",
            agent: "healthguard",
        },
        to: Address {
            instance: "instance-001",
            agent: "xiaobaozi",
        },
        sent_at_ms: SENT_AT,
        payload: b"hi",
    }
}

fn envelope() -> Vec<u8> {
    body()
        .seal(
            &Identity::from_seed(&SENDER_SEED),
            &FleetSecret::from_bytes(FLEET).key(),
        )
        .unwrap()
}

#[test]
fn envelope_vector() {
    let env = envelope();
    check("envelope", &env);
    check(
        "envelope_body",
        OpenedEnvelope::open(&env).unwrap().outer.body,
    );
    // The files decode and verify with the fixed keys.
    let body_bytes = read("envelope_body");
    assert_eq!(codec::decode::<EnvelopeBody>(&body_bytes).unwrap(), body());
    let bytes = read("envelope");
    let opened = OpenedEnvelope::open(&bytes).unwrap();
    assert_eq!(opened.body, body());
    assert_eq!(opened.outer.body, body_bytes.as_slice());
    assert_eq!(
        hex::encode(Identity::from_seed(&SENDER_SEED).public_key().as_bytes()),
        hex::encode(read("public_key"))
    );
    opened
        .check_tag(&FleetSecret::from_bytes(FLEET).key())
        .unwrap();
    opened
        .check_signature(&Identity::from_seed(&SENDER_SEED).public_key())
        .unwrap();
}

/// Every vector file this test writes; a stray or missing file fails
/// `vector_files_are_exactly_these`.
const VECTORS: [&str; 28] = [
    "envelope",
    "envelope_body",
    "public_key",
    "register_proof",
    "join_token",
    "frame_register",
    "frame_status_request",
    "frame_attach",
    "frame_send",
    "frame_ack",
    "frame_nack",
    "frame_detach",
    "frame_registered",
    "frame_status",
    "frame_attached",
    "frame_deliver",
    "frame_receipt",
    "frame_failed",
    "frame_error",
    "frame_detached",
    "join_token_ca_invite",
    "join_token_fleet_invite",
    "join_token_invite",
    "invite_proof",
    "frame_register_invite",
    "frame_fleet_secret",
    "frame_status_page_request",
    "frame_status_page",
];

fn protocol_md() -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../PROTOCOL.md")).unwrap();
    // Hex in the document may be split into fields by spaces or lines.
    doc.split_whitespace().collect()
}

#[test]
fn protocol_md_shows_every_vector() {
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        return;
    }
    let doc = protocol_md();
    for name in VECTORS {
        let bytes = read(name);
        let shown = if name.starts_with("join_token") {
            String::from_utf8(bytes).unwrap()
        } else {
            hex::encode(bytes)
        };
        assert!(
            doc.contains(&shown),
            "PROTOCOL.md does not show the {name} vector: {shown}"
        );
    }
}

#[test]
fn protocol_md_shows_the_domain_strings_and_labels() {
    let doc = protocol_md();
    for d in [
        Domain::EnvelopeTag,
        Domain::EnvelopeSignature,
        Domain::RegisterProof,
        Domain::InviteProof,
    ] {
        let hex = hex::encode(d.as_bytes());
        assert!(doc.contains(&hex), "PROTOCOL.md lacks the bytes of {d:?}");
        assert_eq!(d.as_bytes().last(), Some(&0), "{d:?} ends in NUL");
    }
    let label = std::str::from_utf8(agent_link_proto::REGISTER_EXPORTER_LABEL).unwrap();
    assert!(doc.contains(&format!("\"{label}\"").replace(' ', "")));
    let alpn = std::str::from_utf8(agent_link_crypto::tls::ALPN).unwrap();
    assert!(doc.contains(&format!("ALPN**`{alpn}`**")));
    let name = agent_link_crypto::tls::RELAY_SERVER_NAME;
    assert!(doc.contains(&format!("**`{name}`**")));
    let limit = codec::HARD_MAX_FRAME.to_string();
    assert!(doc.contains(&format!("`codec::HARD_MAX_FRAME`={limit}")));
}

#[test]
fn vector_files_are_exactly_these() {
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        return;
    }
    let mut found: Vec<String> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".hex").map(str::to_owned)
        })
        .collect();
    found.sort();
    let mut want: Vec<String> = VECTORS.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(found, want, "tests/vectors/*.hex and VECTORS differ");
}

#[test]
fn register_proof_vector() {
    let exporter = [4u8; 32];
    let key = Identity::from_seed(&SENDER_SEED).public_key();
    let proof = FleetSecret::from_bytes(FLEET).key().tag(
        Domain::RegisterProof,
        &[&exporter, key.as_bytes(), b"instance-001"],
    );
    check("register_proof", &proof);
    check("public_key", key.as_bytes());
}

#[test]
fn join_token_vector() {
    let token = JoinToken {
        addr: "127.0.0.1:8765".into(),
        trust: RelayTrust::Pinned([3; 32]),
        secret: JoinSecret::Fleet(FleetSecret::from_bytes(FLEET)),
        other_relays: vec![],
    };
    let text = token.encode().unwrap();
    check("join_token", text.as_bytes());
    let back = JoinToken::parse(std::str::from_utf8(&read("join_token")).unwrap()).unwrap();
    assert_eq!(back.addr, "127.0.0.1:8765");
    assert_eq!(back.pinned(), Some([3; 32]));
    assert_eq!(back.fleet_secret().unwrap().expose(), &FLEET);
    assert_eq!(back.encode().unwrap(), text);
}

const INVITE: [u8; 32] = [7; 32];

/// A fleet of relays' invite (version 4): three relays, the first to dial
/// first.
#[test]
fn fleet_invite_vector() {
    let token = JoinToken {
        addr: "127.0.0.1:8765".into(),
        trust: RelayTrust::Pinned([3; 32]),
        secret: JoinSecret::Invite {
            instance_id: "instance-001".into(),
            secret: FleetSecret::from_bytes(INVITE),
        },
        other_relays: vec![
            agent_link_proto::RelayEndpoint {
                addr: "127.0.0.1:8766".into(),
                trust: RelayTrust::Pinned([5; 32]),
            },
            agent_link_proto::RelayEndpoint {
                addr: "relay-3.example:443".into(),
                trust: RelayTrust::Pinned([6; 32]),
            },
        ],
    };
    let text = token.encode().unwrap();
    check("join_token_fleet_invite", text.as_bytes());
    let back =
        JoinToken::parse(std::str::from_utf8(&read("join_token_fleet_invite")).unwrap()).unwrap();
    let relays: Vec<_> = back
        .relays()
        .map(|(a, t)| (a.to_string(), t.pinned().unwrap()))
        .collect();
    assert_eq!(
        relays,
        [
            ("127.0.0.1:8765".to_string(), [3; 32]),
            ("127.0.0.1:8766".to_string(), [5; 32]),
            ("relay-3.example:443".to_string(), [6; 32]),
        ]
    );
    assert_eq!(back.invited_id(), Some("instance-001"));
    assert_eq!(back.encode().unwrap(), text);
}

/// An invite (version 6) whose first relay a CA vouches for, the second
/// pinned.
#[test]
fn ca_invite_vector() {
    let token = JoinToken {
        addr: "relay.example.org:4433".into(),
        trust: RelayTrust::Ca,
        secret: JoinSecret::Invite {
            instance_id: "instance-001".into(),
            secret: FleetSecret::from_bytes(INVITE),
        },
        other_relays: vec![agent_link_proto::RelayEndpoint {
            addr: "127.0.0.1:8766".into(),
            trust: RelayTrust::Pinned([5; 32]),
        }],
    };
    let text = token.encode().unwrap();
    check("join_token_ca_invite", text.as_bytes());
    let back =
        JoinToken::parse(std::str::from_utf8(&read("join_token_ca_invite")).unwrap()).unwrap();
    let relays: Vec<_> = back.relays().map(|(a, t)| (a.to_string(), t)).collect();
    assert_eq!(
        relays,
        [
            ("relay.example.org:4433".to_string(), RelayTrust::Ca),
            ("127.0.0.1:8766".to_string(), RelayTrust::Pinned([5; 32])),
        ]
    );
    assert_eq!(back.encode().unwrap(), text);
}

#[test]
fn invite_vectors() {
    let token = JoinToken {
        addr: "127.0.0.1:8765".into(),
        trust: RelayTrust::Pinned([3; 32]),
        secret: JoinSecret::Invite {
            instance_id: "instance-001".into(),
            secret: FleetSecret::from_bytes(INVITE),
        },
        other_relays: vec![],
    };
    let text = token.encode().unwrap();
    check("join_token_invite", text.as_bytes());
    let back = JoinToken::parse(std::str::from_utf8(&read("join_token_invite")).unwrap()).unwrap();
    assert_eq!(back.invited_id(), Some("instance-001"));
    assert!(back.fleet_secret().is_none());
    assert_eq!(back.encode().unwrap(), text);
    let exporter = [4u8; 32];
    let key = Identity::from_seed(&SENDER_SEED).public_key();
    let proof = agent_link_proto::invite_proof(
        &FleetSecret::from_bytes(INVITE).key(),
        &exporter,
        &key,
        "instance-001",
    );
    check("invite_proof", &proof);
}

fn receipt() -> Receipt<'static> {
    Receipt {
        id: ID,
        from: Address {
            instance: "instance-001",
            agent: "xiaobaozi",
        },
        delivered_at_ms: SENT_AT + 1,
    }
}

fn peer_frames(env: &[u8]) -> Vec<(&'static str, PeerToRelay<'_>)> {
    vec![
        (
            "frame_register",
            PeerToRelay::Register {
                instance_id: "instance-001",
                name: "one",
                proof: [5; 32],
            },
        ),
        ("frame_status_request", PeerToRelay::StatusRequest),
        (
            "frame_attach",
            PeerToRelay::Attach {
                agent: "xiaobaozi",
                receive: true,
            },
        ),
        ("frame_send", PeerToRelay::Send { envelope: env }),
        (
            "frame_ack",
            PeerToRelay::Ack {
                reply_token: 300,
                receipt: receipt(),
            },
        ),
        (
            "frame_nack",
            PeerToRelay::Nack {
                reply_token: 300,
                id: ID,
                code: ErrorCode::KeyChanged,
            },
        ),
        ("frame_detach", PeerToRelay::Detach),
        (
            "frame_register_invite",
            PeerToRelay::RegisterInvite {
                instance_id: "instance-001",
                name: "one",
                proof: [5; 32],
            },
        ),
        (
            "frame_status_page_request",
            PeerToRelay::StatusPageRequest { start: 300 },
        ),
    ]
}

fn relay_frames(env: &[u8]) -> Vec<(&'static str, RelayToPeer<'_>)> {
    let st = InstanceStatus {
        instance_id: "instance-001".into(),
        name: "one".into(),
        public_key: [6; 32],
        online: true,
        agents: vec!["xiaobaozi".into()],
    };
    vec![
        (
            "frame_registered",
            RelayToPeer::Registered {
                instance_id: "instance-001",
            },
        ),
        (
            "frame_status",
            RelayToPeer::Status {
                you: st.clone(),
                instances: vec![st.clone()],
            },
        ),
        (
            "frame_status_page",
            RelayToPeer::StatusPage {
                you: st.clone(),
                snapshot: 7,
                start: 0,
                total: 1,
                instances: vec![st],
            },
        ),
        (
            "frame_attached",
            RelayToPeer::Attached {
                agent: "xiaobaozi",
                max_message_size: 1 << 20,
                timestamp_window_ms: 60_000,
            },
        ),
        (
            "frame_deliver",
            RelayToPeer::Deliver {
                reply_token: 300,
                sender_key: [6; 32],
                envelope: env,
            },
        ),
        ("frame_receipt", RelayToPeer::Receipt { receipt: receipt() }),
        (
            "frame_failed",
            RelayToPeer::Failed {
                id: ID,
                code: ErrorCode::TargetOffline,
            },
        ),
        (
            "frame_error",
            RelayToPeer::Error {
                code: ErrorCode::NotRegistered,
            },
        ),
        ("frame_detached", RelayToPeer::Detached),
        (
            "frame_fleet_secret",
            RelayToPeer::FleetSecret {
                secret: FLEET,
                previous_valid_until_ms: SENT_AT + 86_400_000,
            },
        ),
    ]
}

#[test]
fn frame_vectors() {
    let env = envelope();
    for (name, f) in peer_frames(&env) {
        check(name, &codec::frame(&f).unwrap());
        let file = read(name);
        let (body, used) = codec::split_frame(&file, codec::HARD_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(used, file.len());
        assert_eq!(codec::decode::<PeerToRelay>(body).unwrap(), f, "{name}");
    }
    for (name, f) in relay_frames(&env) {
        check(name, &codec::frame(&f).unwrap());
        let file = read(name);
        let (body, used) = codec::split_frame(&file, codec::HARD_MAX_FRAME)
            .unwrap()
            .unwrap();
        assert_eq!(used, file.len());
        assert_eq!(codec::decode::<RelayToPeer>(body).unwrap(), f, "{name}");
    }
}

#[test]
fn deliver_head_matches_the_golden_vector() {
    // frame_deliver is a Deliver head (token 300, key 06×32) and then the
    // envelope vector's bytes.
    let golden = read("frame_deliver");
    let envelope = envelope();
    let (head_bytes, rest) = golden.split_at(golden.len() - envelope.len());
    assert_eq!(rest, &envelope[..]);
    let head = agent_link_proto::DeliverHead::new(300, &[6; 32], envelope.len()).unwrap();
    assert_eq!(head.as_bytes(), head_bytes);
}
