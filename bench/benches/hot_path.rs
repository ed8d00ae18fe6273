//! Criterion suite for the relay's per-message hot path (DESIGN.md
//! "Performance targets"): read a frame, check it, look up the route, hand
//! the original bytes to the target's stream. Each step is timed alone on a
//! `Send` frame carrying a 256-byte payload, plus the whole per-message path
//! without I/O.
//!
//! ```sh
//! cargo bench -p agent-link-bench --bench hot_path             # full
//! cargo bench -p agent-link-bench --bench hot_path -- --quick  # a few seconds
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{
    instance_client_config, relay_server_config, TlsIdentity, RELAY_SERVER_NAME,
};
use agent_link_crypto::{Domain, FleetKey, FleetSecret, Identity, PublicKey};
use agent_link_proto::{
    codec, Address, EnvelopeBody, OpenedEnvelope, PeerToRelay, RelayToPeer, VERSION,
};
use agent_link_relay::core::checks::{check_send, verify_batch, CheckPolicy, SenderContext};
use agent_link_relay::router::{Router, StreamHandle};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const PAYLOAD: usize = 256;
const SENT_AT_MS: u64 = 1_700_000_000_000;
/// Instances in the routing table for the lookup benches.
const ROUTED_INSTANCES: usize = 1000;

struct Fixture {
    identity: Identity,
    key: PublicKey,
    fleet: FleetKey,
    /// A sealed envelope (256-byte payload) from `bench-s0/tx` to `inst-517/rx`.
    envelope: Vec<u8>,
    /// The same envelope as a whole `Send` frame (header included).
    send_frame: Vec<u8>,
}

fn fixture() -> Fixture {
    let identity = Identity::from_seed(&[7; 32]);
    let key = identity.public_key();
    let fleet = FleetSecret::from_bytes([9; 32]).key();
    let payload = vec![0x5a; PAYLOAD];
    let envelope = EnvelopeBody {
        version: VERSION,
        id: [1; 16],
        from: Address {
            instance: "bench-s0",
            agent: "tx",
        },
        to: Address {
            instance: "inst-517",
            agent: "rx",
        },
        sent_at_ms: SENT_AT_MS,
        payload: &payload,
    }
    .seal(&identity, &fleet)
    .expect("seal");
    let send_frame = codec::frame(&PeerToRelay::Send {
        envelope: &envelope,
    })
    .expect("frame");
    Fixture {
        identity,
        key,
        fleet,
        envelope,
        send_frame,
    }
}

fn policy(f: &Fixture, verify_signatures: bool) -> CheckPolicy {
    CheckPolicy {
        fleet: f.fleet.clone().into(),
        window_ms: 60_000,
        verify_signatures,
        max_payload: 1 << 20,
    }
}

fn sender(f: &Fixture) -> SenderContext<'_> {
    SenderContext {
        instance: "bench-s0",
        agent: "tx",
        key: &f.key,
    }
}

fn decode_send(frame: &[u8]) -> &[u8] {
    let (body, _) = codec::split_frame(frame, codec::HARD_MAX_FRAME)
        .expect("split")
        .expect("whole frame");
    match codec::decode::<PeerToRelay>(body).expect("decode") {
        PeerToRelay::Send { envelope } => envelope,
        other => panic!("unexpected {other:?}"),
    }
}

fn codec_and_checks(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));

    g.bench_function("frame_decode_send_256B", |b| {
        b.iter(|| black_box(decode_send(black_box(&f.send_frame))).len())
    });
    g.bench_function("envelope_open_256B", |b| {
        b.iter(|| OpenedEnvelope::open(black_box(&f.envelope)).expect("open"))
    });
    let env = OpenedEnvelope::open(&f.envelope).expect("open");
    g.bench_function("hmac_check_256B", |b| {
        b.iter(|| {
            f.fleet
                .check(
                    Domain::EnvelopeTag,
                    &[black_box(env.outer.body)],
                    black_box(&env.outer.tag),
                )
                .expect("tag")
        })
    });
    g.bench_function("ed25519_verify_strict_256B", |b| {
        b.iter(|| black_box(&env).check_signature(&f.key).expect("signature"))
    });
    g.bench_function("open_and_verify_256B", |b| {
        b.iter(|| {
            let env = OpenedEnvelope::open(black_box(&f.envelope)).expect("open");
            env.check_tag(&f.fleet).expect("tag");
            env.check_signature(&f.key).expect("signature");
        })
    });
    let (no_sig, with_sig) = (policy(&f, false), policy(&f, true));
    let ctx = sender(&f);
    g.bench_function("relay_check_send_256B", |b| {
        b.iter(|| {
            check_send(black_box(&f.envelope), &ctx, &no_sig, SENT_AT_MS + 5)
                .expect("check")
                .body
                .id
        })
    });
    g.bench_function("relay_check_send_with_signature_256B", |b| {
        b.iter(|| {
            check_send(black_box(&f.envelope), &ctx, &with_sig, SENT_AT_MS + 5)
                .expect("check")
                .body
                .id
        })
    });
    g.bench_function("seal_256B", |b| {
        let payload = vec![0x5a; PAYLOAD];
        b.iter(|| {
            EnvelopeBody {
                version: VERSION,
                id: [1; 16],
                from: Address {
                    instance: "bench-s0",
                    agent: "tx",
                },
                to: Address {
                    instance: "inst-517",
                    agent: "rx",
                },
                sent_at_ms: SENT_AT_MS,
                payload: black_box(&payload),
            }
            .seal(&f.identity, &f.fleet)
            .expect("seal")
        })
    });
    g.finish();

    // Batch verification as the relay runs it with verify_signatures on:
    // one batch per read of up to 64 frames from one sender.
    let mut g = c.benchmark_group("hot_path_batch");
    let envs: Vec<OpenedEnvelope<'_>> = (0..64).map(|_| env).collect();
    g.throughput(Throughput::Elements(envs.len() as u64));
    g.bench_function("relay_verify_batch_64x256B", |b| {
        b.iter(|| verify_batch(black_box(&envs), &f.key))
    });
    g.finish();

    // What a receiving agent pays per signature for the deliveries that
    // arrived together (`verify_deliveries`: one checked batch), by how
    // many arrived: the e2e figure depends on it. Distinct messages, so
    // every signature has its own `R`.
    let key = agent_link_crypto::CheckedKey::new(&f.key).expect("key");
    let signed: Vec<(Vec<u8>, agent_link_crypto::Signature)> = (0..64u8)
        .map(|i| {
            let body = vec![i; PAYLOAD + 80];
            let sig = f.identity.sign(Domain::EnvelopeSignature, &body);
            (body, sig)
        })
        .collect();
    let mut g = c.benchmark_group("receiver_batch");
    for n in [1usize, 4, 16, 64] {
        let items: Vec<_> = signed[..n]
            .iter()
            .map(|(m, s)| (&key, Domain::EnvelopeSignature, m.as_slice(), s))
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("verify_batch_checked_{n}x336B"), |b| {
            b.iter(|| agent_link_crypto::verify_batch_checked(black_box(&items)).expect("batch"))
        });
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("ed25519_sign_336B", |b| {
        let body = vec![0x5a; PAYLOAD + 80];
        b.iter(|| f.identity.sign(Domain::EnvelopeSignature, black_box(&body)))
    });
    g.finish();
}

/// One real loopback QUIC connection: `Router::add_connection` stores a
/// `quinn::Connection`, and the bench wants the relay's own table.
struct Loopback {
    _server: quinn::Endpoint,
    _client: quinn::Endpoint,
    conn: quinn::Connection,
}

async fn loopback() -> Loopback {
    let server_tls =
        TlsIdentity::self_signed(&Identity::generate(), RELAY_SERVER_NAME).expect("relay cert");
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(
        relay_server_config(&server_tls).expect("server tls"),
    )
    .expect("quic server");
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("server endpoint");
    let addr = server.local_addr().expect("server addr");
    let accept = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await?.await.ok() })
    };
    let client_tls =
        TlsIdentity::self_signed(&Identity::generate(), "agent-link-instance").expect("cert");
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(
        instance_client_config(&client_tls, server_tls.fingerprint()).expect("client tls"),
    )
    .expect("quic client");
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = client
        .connect(addr, RELAY_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let _ = accept.await;
    Loopback {
        _server: server,
        _client: client,
        conn,
    }
}

fn route_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let lb = rt.block_on(loopback());
    let router = Router::default();
    // Keep every receiver queue alive so routes stay open.
    let mut queues = Vec::new();
    for i in 0..ROUTED_INSTANCES {
        let instance = format!("inst-{i}");
        let conn_id = router.next_id();
        router
            .add_connection(
                &instance,
                conn_id,
                lb.conn.clone(),
                4,
                (1_000_000, 1_000_000),
            )
            .expect("connection slot");
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let handle = StreamHandle {
            token: router.next_id(),
            tx,
            ledger: std::sync::Arc::new(std::sync::Mutex::new(
                agent_link_relay::core::deliveries::Ledger::new(
                    agent_link_relay::core::deliveries::LedgerLimits {
                        queue_len: 1024,
                        queue_bytes: 4 << 20,
                        outstanding: 4096,
                        instance_bytes: 32 << 20,
                    },
                    router.instance_queue(&instance),
                ),
            )),
            opened: (0, 0),
            cancel: tokio_util::sync::CancellationToken::new(),
        };
        router.add_stream(handle.clone());
        assert!(matches!(
            router.attach_receiver(&instance, "rx", handle),
            agent_link_relay::router::AttachOutcome::Attached
        ));
        queues.push(rx);
    }
    let token = router.route("inst-517", "rx").expect("route").token;

    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    g.bench_function("router_route_1000_instances", |b| {
        b.iter(|| {
            router
                .route(black_box("inst-517"), black_box("rx"))
                .is_some()
        })
    });
    g.bench_function("router_reply_token_1000_streams", |b| {
        b.iter(|| router.stream(black_box(token)).is_some())
    });

    // The whole per-message work of the relay without the socket: decode
    // the Send frame, check it (signatures off, the default), look up the
    // route, build the Deliver frame, queue it, and the receiver's queue
    // is drained.
    let f = fixture();
    let no_sig = policy(&f, false);
    let ctx = sender(&f);
    let rx = &mut queues[517];
    g.bench_function("relay_per_message_256B", |b| {
        b.iter(|| {
            let envelope = decode_send(black_box(&f.send_frame));
            let env = check_send(envelope, &ctx, &no_sig, SENT_AT_MS + 5).expect("check");
            let target = router
                .route(env.body.to.instance, env.body.to.agent)
                .expect("route");
            let deliver = bytes::Bytes::from(
                codec::frame(&RelayToPeer::Deliver {
                    reply_token: token,
                    sender_key: *f.key.as_bytes(),
                    envelope: env.bytes,
                })
                .expect("frame"),
            );
            target
                .tx
                .try_send(agent_link_relay::Outbound::Frame(deliver))
                .expect("queue");
            rx.try_recv().expect("drain")
        })
    });
    // The same work the way the relay does it since issue 4: the envelope
    // stays a slice of the received frame behind a Deliver head (no frame
    // encoding, no allocation), queued with try_send under the router lock;
    // since issue 14 admitted to the target's ledger (bounds, the sender's
    // share, a reply token) and answered once, as the receiver's Ack does.
    let sender_name: std::sync::Arc<str> = std::sync::Arc::from("inst-1");
    let body = bytes::Bytes::from(f.send_frame[codec::FRAME_HEADER_LEN..].to_vec());
    g.bench_function("relay_per_message_256B_deliver_head", |b| {
        b.iter(|| {
            let body = black_box(&body);
            let envelope = match codec::decode::<PeerToRelay>(body).expect("decode") {
                PeerToRelay::Send { envelope } => envelope,
                other => panic!("unexpected {other:?}"),
            };
            let env = check_send(envelope, &ctx, &no_sig, SENT_AT_MS + 5).expect("check");
            let envelope = body.slice_ref(env.bytes);
            let id = env.body.id;
            let ledger = router
                .with_route(env.body.to.instance, env.body.to.agent, |target| {
                    let mut l = target.ledger.lock().expect("ledger");
                    let t = l
                        .admit(&sender_name, token, id, envelope.len() + 64)
                        .expect("admit");
                    let head =
                        agent_link_proto::DeliverHead::new(t, f.key.as_bytes(), envelope.len())
                            .expect("head");
                    target
                        .tx
                        .try_send(agent_link_relay::Outbound::Deliver {
                            head,
                            envelope,
                            token: t,
                        })
                        .expect("queue");
                    (target.ledger.clone(), t)
                })
                .expect("route");
            let out = rx.try_recv().expect("drain");
            let mut l = ledger.0.lock().expect("ledger");
            l.unqueue(ledger.1);
            l.reply(ledger.1, &id).expect("one reply");
            out
        })
    });
    g.finish();
    drop(queues);
    drop(router);
    drop(lb);
    rt.shutdown_timeout(Duration::from_secs(1));
}

criterion_group!(benches, codec_and_checks, route_lookup);
criterion_main!(benches);
