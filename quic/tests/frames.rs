//! The frame reader, requests and the exporter over real QUIC on
//! 127.0.0.1:0: one client and one server endpoint in the test, the same TLS
//! configurations as the relay and the peer. Every wait is bounded by
//! [`WAIT`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use agent_link_crypto::tls::{
    instance_client_config, relay_server_config, TlsIdentity, RELAY_SERVER_NAME,
};
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::{codec, ErrorCode, PeerToRelay, ProtoError, RelayToPeer};
use agent_link_quic::exporter::{register_exporter, register_proof};
use agent_link_quic::frames::{
    encode, refuse_stream, request, write_frame, FrameReader, ReadError, RequestError,
};
use tokio::time::{timeout, Instant};

/// Upper bound on any single wait.
const WAIT: Duration = Duration::from_secs(10);

/// A connected pair; the endpoints are kept so the connections stay up.
struct Pair {
    client: quinn::Connection,
    server: quinn::Connection,
    client_identity: Identity,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

async fn pair() -> Pair {
    let relay_tls = TlsIdentity::self_signed(&Identity::generate(), RELAY_SERVER_NAME).unwrap();
    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(relay_server_config(&relay_tls).unwrap())
            .unwrap();
    let server_ep = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server_crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let client_identity = Identity::generate();
    let client_tls = TlsIdentity::self_signed(&client_identity, "agent-link-instance").unwrap();
    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
        instance_client_config(&client_tls, relay_tls.fingerprint()).unwrap(),
    )
    .unwrap();
    let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    client_ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(client_crypto)));
    let addr = server_ep.local_addr().unwrap();
    let (client, server) = timeout(WAIT, async {
        let connecting = client_ep.connect(addr, RELAY_SERVER_NAME).unwrap();
        let incoming = server_ep.accept().await.unwrap();
        let (c, s) = tokio::join!(connecting, incoming);
        (c.unwrap(), s.unwrap())
    })
    .await
    .expect("handshake in time");
    Pair {
        client,
        server,
        client_identity,
        _endpoints: (client_ep, server_ep),
    }
}

/// A stream from the client, with `first` written so the server sees it.
async fn stream(p: &Pair, first: &[u8]) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, _client_recv) = p.client.open_bi().await.unwrap();
    send.write_all(first).await.unwrap();
    let (_server_send, recv) = timeout(WAIT, p.server.accept_bi()).await.unwrap().unwrap();
    (send, recv)
}

/// A frame with a `len`-byte body of `fill`.
fn raw_frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = (len as u32).to_be_bytes().to_vec();
    f.extend(std::iter::repeat_n(fill, len));
    f
}

#[tokio::test]
async fn a_clean_end_at_a_frame_boundary_is_ok_none() {
    let p = pair().await;
    let two = [raw_frame(3, 1), raw_frame(5, 2)].concat();
    let (mut send, recv) = stream(&p, &two).await;
    send.finish().unwrap();
    let mut r = FrameReader::new(recv, 100);
    assert_eq!(
        timeout(WAIT, r.next()).await.unwrap().unwrap().unwrap(),
        vec![1; 3]
    );
    assert_eq!(
        timeout(WAIT, r.next()).await.unwrap().unwrap().unwrap(),
        vec![2; 5]
    );
    assert!(timeout(WAIT, r.next()).await.unwrap().unwrap().is_none());
}

#[tokio::test]
async fn a_stream_ending_mid_frame_is_truncated() {
    let p = pair().await;
    let f = raw_frame(10, 7);
    // A whole frame, then 7 of the next one's 14 bytes, then FIN.
    let (mut send, recv) = stream(&p, &[&f[..], &f[..7]].concat()).await;
    send.finish().unwrap();
    let mut r = FrameReader::new(recv, 100);
    assert_eq!(
        timeout(WAIT, r.next()).await.unwrap().unwrap().unwrap(),
        vec![7; 10]
    );
    let e = timeout(WAIT, r.next()).await.unwrap().unwrap_err();
    assert!(
        matches!(e, ReadError::Truncated { have: 7, need: 14 }),
        "{e:?}"
    );
    assert_eq!(e.code(), Some(ErrorCode::Malformed));

    // A header cut in two is truncation too, not a clean end.
    let (mut send, recv) = stream(&p, &[0, 0]).await;
    send.finish().unwrap();
    let mut r = FrameReader::new(recv, 100);
    let e = timeout(WAIT, r.next()).await.unwrap().unwrap_err();
    assert!(
        matches!(e, ReadError::Truncated { have: 2, need: 4 }),
        "{e:?}"
    );
}

#[tokio::test]
async fn an_over_limit_header_is_refused_before_its_body_arrives() {
    let p = pair().await;
    // Only the header of a 1000-byte frame: the stream stays open and the
    // body never comes, so only the header can have caused the refusal.
    let (_send, recv) = stream(&p, &1000u32.to_be_bytes()).await;
    let mut r = FrameReader::new(recv, 100);
    let e = timeout(WAIT, r.next())
        .await
        .expect("refused without waiting for the body")
        .unwrap_err();
    assert!(
        matches!(
            e,
            ReadError::Frame(ProtoError::FrameTooLarge {
                len: 1000,
                max: 100
            })
        ),
        "{e:?}"
    );
    assert_eq!(e.code(), Some(ErrorCode::TooLarge));

    // Raised after authentication: the same size is then fine.
    let (mut send, recv) = stream(&p, &raw_frame(1000, 3)).await;
    send.finish().unwrap();
    let mut r = FrameReader::new(recv, 100);
    r.set_max(1000);
    assert_eq!(
        timeout(WAIT, r.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .len(),
        1000
    );
}

#[tokio::test]
async fn the_frame_deadline_runs_only_while_a_frame_is_awaited() {
    let p = pair().await;
    let deadline = Duration::from_millis(300);

    // Idle between frames: no deadline (our own, longer timeout fires).
    let (mut send, recv) = stream(&p, &raw_frame(1, 1)).await;
    let mut r = FrameReader::new(recv, 100);
    r.set_frame_timeout(deadline);
    assert!(timeout(WAIT, r.next()).await.unwrap().unwrap().is_some());
    assert!(
        timeout(deadline * 3, r.next()).await.is_err(),
        "an idle stream never times out"
    );

    // A frame begun and not completed: TimedOut after the deadline.
    send.write_all(&raw_frame(10, 2)[..5]).await.unwrap();
    let t0 = Instant::now();
    let e = timeout(WAIT, r.next()).await.unwrap().unwrap_err();
    assert!(matches!(e, ReadError::TimedOut), "{e:?}");
    assert!(t0.elapsed() >= deadline);
    assert_eq!(e.code(), Some(ErrorCode::AuthTimeout));

    // Trickling bytes does not restart it.
    let slow = raw_frame(60, 6);
    let (mut send, recv) = stream(&p, &slow[..1]).await;
    let mut r = FrameReader::new(recv, 100);
    r.set_frame_timeout(deadline);
    let trickle = tokio::spawn(async move {
        for b in &slow[1..] {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if send.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
        }
    });
    let t0 = Instant::now();
    let e = timeout(WAIT, r.next()).await.unwrap().unwrap_err();
    // The whole frame would take the trickle about 3 s.
    assert!(matches!(e, ReadError::TimedOut), "{e:?}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    trickle.abort();

    // Time the caller spends elsewhere is not charged: a frame half
    // buffered when the caller stops reading for longer than the deadline
    // still completes, because the deadline starts when the caller waits.
    // (A longer deadline here, so a loaded machine has a second to deliver
    // the rest.)
    let deadline = Duration::from_secs(1);
    let f = raw_frame(10, 4);
    let (mut send, recv) = stream(&p, &[&raw_frame(1, 9)[..], &f[..6]].concat()).await;
    let mut r = FrameReader::new(recv, 100);
    r.set_frame_timeout(deadline);
    assert_eq!(
        timeout(WAIT, r.next()).await.unwrap().unwrap().unwrap(),
        vec![9]
    );
    tokio::time::sleep(deadline * 3 / 2).await;
    send.write_all(&f[6..]).await.unwrap();
    assert_eq!(
        timeout(WAIT, r.next()).await.unwrap().unwrap().unwrap(),
        vec![4; 10]
    );
}

#[tokio::test]
async fn next_batch_takes_what_is_buffered_up_to_the_bound() {
    let p = pair().await;
    let frames: Vec<Vec<u8>> = (1..=5).map(|i| raw_frame(i, i as u8)).collect();
    let (mut send, recv) = stream(&p, &frames.concat()).await;
    send.finish().unwrap();
    let mut r = FrameReader::new(recv, 100);
    let mut out = Vec::new();
    let mut got = Vec::new();
    while timeout(WAIT, r.next_batch(&mut out, 3))
        .await
        .unwrap()
        .unwrap()
    {
        assert!((1..=3).contains(&out.len()));
        got.append(&mut out);
    }
    let want: Vec<Vec<u8>> = (1..=5).map(|i| vec![i as u8; i]).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn request_gets_the_reply_or_says_why_not() {
    let p = pair().await;
    let server = p.server.clone();
    let answering = tokio::spawn(async move {
        // First stream: answer. Second: refuse. Third: finish without a
        // reply. Then close the connection as the relay does on revocation.
        for i in 0..3 {
            let (mut send, recv) = server.accept_bi().await.unwrap();
            let mut r = FrameReader::new(recv, 1024);
            let body = r.next().await.unwrap().unwrap();
            assert_eq!(
                codec::decode::<PeerToRelay>(&body).unwrap(),
                PeerToRelay::StatusRequest
            );
            match i {
                0 => write_frame(
                    &mut send,
                    &RelayToPeer::Error {
                        code: ErrorCode::Busy,
                    },
                )
                .await
                .unwrap(),
                1 => refuse_stream(&mut send, ErrorCode::NotRegistered).await,
                _ => send.finish().unwrap(),
            }
            // Keep the stream until the client has read what it needs.
            let _ = timeout(WAIT, send.stopped()).await;
        }
        server.close(ErrorCode::Revoked.as_u32().into(), b"revoked");
    });
    let ask = || timeout(WAIT, request(&p.client, &PeerToRelay::StatusRequest, 1024));
    let reply = ask().await.unwrap().unwrap();
    assert_eq!(
        reply,
        encode(&RelayToPeer::Error {
            code: ErrorCode::Busy
        })
        .slice(4..)
    );
    let reply = ask().await.unwrap().unwrap();
    assert!(matches!(
        codec::decode::<RelayToPeer>(&reply).unwrap(),
        RelayToPeer::Error {
            code: ErrorCode::NotRegistered
        }
    ));
    let e = ask().await.unwrap().unwrap_err();
    assert!(matches!(e, RequestError::NoReply), "{e:?}");
    timeout(WAIT, answering).await.unwrap().unwrap();
    let _ = timeout(WAIT, p.client.closed()).await;
    let e = ask().await.unwrap().unwrap_err();
    assert_eq!(e.close_code(), Some(ErrorCode::Revoked), "{e:?}");
}

#[tokio::test]
async fn both_ends_derive_the_same_exporter_and_the_proof_checks() {
    let p = pair().await;
    let client = register_exporter(&p.client).unwrap();
    let server = register_exporter(&p.server).unwrap();
    assert_eq!(client, server);
    let other = pair().await;
    assert_ne!(
        register_exporter(&other.client).unwrap(),
        client,
        "per session"
    );
    let fleet = FleetSecret::generate().key();
    let key = p.client_identity.public_key();
    let proof = register_proof(&p.client, &fleet, &key, "instance-001").unwrap();
    agent_link_proto::check_register_proof(&fleet, &server, &key, "instance-001", &proof).unwrap();
}

/// `next_batch` takes what QUIC has already received without waiting; an
/// end of stream (clean or inside a frame) it meets on the way is reported
/// by the next call, exactly as `next` would have reported it.
#[tokio::test]
async fn next_batch_reports_an_end_it_met_while_taking_what_was_there() {
    let p = pair().await;
    // Many frames in separate writes (separate chunks at the receiver),
    // then FIN: every frame comes out, then a clean end.
    let (mut send, _) = p.client.open_bi().await.unwrap();
    for i in 1..=20u8 {
        send.write_all(&raw_frame(usize::from(i), i)).await.unwrap();
    }
    send.finish().unwrap();
    let (_s, recv) = timeout(WAIT, p.server.accept_bi()).await.unwrap().unwrap();
    let mut r = FrameReader::new(recv, 100);
    let mut out = Vec::new();
    let mut got = Vec::new();
    for _ in 0..40 {
        if !timeout(WAIT, r.next_batch(&mut out, 64))
            .await
            .unwrap()
            .unwrap()
        {
            break;
        }
        got.append(&mut out);
    }
    let want: Vec<Vec<u8>> = (1..=20u8).map(|i| vec![i; usize::from(i)]).collect();
    assert_eq!(got, want);
    assert!(!timeout(WAIT, r.next_batch(&mut out, 64))
        .await
        .unwrap()
        .unwrap());

    // Whole frames, then half a frame and FIN: the frames, then Truncated.
    let f = raw_frame(10, 7);
    let (mut send, _) = p.client.open_bi().await.unwrap();
    send.write_all(&f).await.unwrap();
    send.write_all(&f).await.unwrap();
    send.write_all(&f[..5]).await.unwrap();
    send.finish().unwrap();
    let (_s, recv) = timeout(WAIT, p.server.accept_bi()).await.unwrap().unwrap();
    let mut r = FrameReader::new(recv, 100);
    let mut frames = 0;
    let err = loop {
        match timeout(WAIT, r.next_batch(&mut out, 64)).await.unwrap() {
            Ok(true) => frames += out.len(),
            Ok(false) => panic!("a cut frame is no clean end"),
            Err(e) => break e,
        }
        assert!(frames <= 2);
    };
    assert_eq!(frames, 2);
    assert!(
        matches!(err, ReadError::Truncated { have: 5, need: 14 }),
        "{err:?}"
    );
}
