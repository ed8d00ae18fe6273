//! Many connections at once: a reconnect storm of 1,000 instances after a
//! relay restart, and a connection flood of thousands of handshakes while a
//! connected client keeps getting its messages through.
//!
//! Both use the in-process relay and the real `agent-link` library over QUIC
//! on loopback. Every wait is bounded; nothing here asserts a duration.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link::AgentLink;
use agent_link_crypto::Identity;
use agent_link_proto::ErrorCode;
use agent_link_tests::*;

/// The two tests here each load both cores; they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound of the storm's waits: generous, since 1,000 handshakes on a loaded
/// 2-core machine in a debug build take a while.
const STORM_WAIT: Duration = Duration::from_secs(180);

fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Instances online with agent `agent` attached for receiving.
fn attached(relay: &TestRelay, agent: &str) -> usize {
    relay
        .relay()
        .online()
        .values()
        .filter(|agents| agents.iter().any(|a| a == agent))
        .count()
}

async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_instances_reconnect_at_once_after_a_relay_restart() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const N: usize = 1000;
    // Each instance holds one UDP socket; the relay and harness need more.
    let limit = open_file_limit().unwrap_or(0);
    assert!(
        limit >= (N as u64) + 512,
        "this test needs {} open files, the limit is {limit}: raise it (ulimit -n)",
        N + 512
    );
    let mut relay = TestRelay::start(|c| {
        c.max_connections = 4 * N as u32;
        // Every instance here is on 127.0.0.1: one source address.
        c.handshakes_per_sec_per_ip = c.handshakes_per_sec;
    })
    .await;
    let base = tempfile::tempdir().unwrap();
    let instances: Vec<(String, Identity)> = (0..N)
        .map(|i| (format!("storm-{i:04}"), Identity::generate()))
        .collect();
    relay.register_many(&instances);
    for (id, identity) in &instances {
        write_peer_dir(&base.path().join(id), id, identity, &relay.token);
    }

    // Connect everyone (64 at a time) and attach one receiving agent each.
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    for (i, (id, _)) in instances.iter().enumerate() {
        let dir = base.path().join(id);
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let link = AgentLink::connect(&dir).await.expect("connect");
            // Under this load a handshake can take longer than the relay's
            // limit, and `attach` then times out while the link reconnects:
            // an explicit error, so try again (bounded).
            for _ in 0..3 {
                match link.attach("a").await {
                    Ok(agent) => return (i, link, agent),
                    Err(agent_link::LinkError::Timeout(_)) => continue,
                    Err(e) => panic!("attach: {e}"),
                }
            }
            panic!("instance {i}: attach timed out three times")
        });
    }
    let mut peers: Vec<Option<(AgentLink, agent_link::Agent)>> = (0..N).map(|_| None).collect();
    while let Some(r) = tokio::time::timeout(STORM_WAIT, set.join_next())
        .await
        .expect("connecting 1,000 instances")
    {
        let (i, link, agent) = r.unwrap();
        peers[i] = Some((link, agent));
    }
    wait_for("1,000 attached agents", STORM_WAIT, || {
        attached(&relay, "a") == N
    })
    .await;
    println!(
        "1,000 instances connected and attached in {:?}",
        started.elapsed()
    );

    // The relay goes away and comes back: every instance reconnects at once
    // (backoff with jitter) and re-attaches by itself.
    let accepted_before = relay
        .relay()
        .stats()
        .connections_accepted
        .load(Ordering::Relaxed);
    let restarted = Instant::now();
    relay.restart().await;
    let mut last_print = Instant::now();
    wait_for("1,000 agents re-attached", STORM_WAIT, || {
        let n = attached(&relay, "a");
        if last_print.elapsed() > Duration::from_secs(10) {
            let online = relay.relay().online();
            let missing: Vec<&String> = instances
                .iter()
                .map(|(id, _)| id)
                .filter(|id| !online.get(*id).is_some_and(|a| a.iter().any(|a| a == "a")))
                .take(5)
                .collect();
            println!(
                "{n} agents re-attached after {:?}; missing e.g. {missing:?} (online: {:?})",
                restarted.elapsed(),
                missing.iter().map(|m| online.get(*m)).collect::<Vec<_>>()
            );
            last_print = Instant::now();
        }
        n == N
    })
    .await;
    println!(
        "1,000 instances reconnected in {:?} (accepted before restart: {accepted_before}; refused since: {})",
        restarted.elapsed(),
        relay
            .relay()
            .stats()
            .refused_count(ErrorCode::TooManyConnections)
    );

    // Messages flow after the storm, both ways across the fleet.
    for (from, to) in [(0usize, N - 1), (N - 1, 0), (N / 2, 1)] {
        let to_addr = format!("storm-{to:04}/a");
        let [s, r] = peers.get_disjoint_mut([from, to]).unwrap();
        let (sender, receiver) = (&s.as_ref().unwrap().1, &mut r.as_mut().unwrap().1);
        // The receipt comes once the receiver's application has taken it.
        let (r, m) = tokio::join!(
            sender.send_with_timeout(&to_addr, &b"after the storm"[..], WAIT),
            tokio::time::timeout(WAIT, receiver.recv())
        );
        assert!(r.is_ok(), "{from} -> {to}: {r:?}");
        let m = m.expect("delivery").expect("agent running");
        assert_eq!(&m.payload[..], b"after the storm");
    }
    // Close everyone at once (each close waits for its goodbye, bounded).
    let mut closing = tokio::task::JoinSet::new();
    for (link, agent) in peers.into_iter().flatten() {
        closing.spawn(async move {
            drop(agent);
            link.close().await;
        });
    }
    let _ = tokio::time::timeout(STORM_WAIT, async {
        while closing.join_next().await.is_some() {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_flood_does_not_stop_a_connected_client() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const FLOOD: usize = 3000;
    let relay = TestRelay::start(|c| {
        c.auth_timeout_secs = 2;
        c.handshakes_per_sec = 50;
        c.retry_threshold = 10;
    })
    .await;
    let base = tempfile::tempdir().unwrap();
    let (ia, ib) = (Identity::generate(), Identity::generate());
    relay.register("alice", &ia);
    relay.register("bob", &ib);
    write_peer_dir(&base.path().join("alice"), "alice", &ia, &relay.token);
    write_peer_dir(&base.path().join("bob"), "bob", &ib, &relay.token);
    let alice = AgentLink::connect(base.path().join("alice")).await.unwrap();
    let bob = AgentLink::connect(base.path().join("bob")).await.unwrap();
    let tx = alice.attach_sender("tx").await.unwrap();
    let mut rx = bob.attach("rx").await.unwrap();

    // The flood: strangers (unregistered keys) opening connection after
    // connection from 20 sockets, as fast as they can.
    let (ok, failed, cut) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (ok, failed, cut) = (ok.clone(), failed.clone(), cut.clone());
        let (addr, fp) = (relay.addr, relay.token.pinned().expect("a pinned relay"));
        flood.spawn(async move {
            let stranger = Identity::generate();
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.set_default_client_config(client_config(&stranger, fp));
            let mut conns = tokio::task::JoinSet::new();
            for _ in 0..FLOOD / 20 {
                let connecting = ep.connect(addr, "agent-link-relay").unwrap();
                let (ok, failed, cut) = (ok.clone(), failed.clone(), cut.clone());
                conns.spawn(async move {
                    match tokio::time::timeout(WAIT, connecting).await {
                        Ok(Ok(c)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            // Hold it until the relay ends it: at the auth
                            // deadline, or at once when every stranger slot
                            // (`max_stranger_connections`) is taken. The
                            // relay's one CONNECTION_CLOSE can be lost in
                            // the flood; the stranger then learns of the end
                            // by a stateless reset or its idle timeout. And a
                            // handshake the client finished but the relay did
                            // not (within `handshake_timeout_secs`, under this
                            // load) ends in a close sent from the handshake,
                            // where QUIC carries it as APPLICATION_ERROR.
                            let ended_by_relay =
                                [ErrorCode::AuthTimeout, ErrorCode::TooManyConnections]
                                    .map(|code| u64::from(code.as_u32()));
                            let end =
                                tokio::time::timeout(Duration::from_secs(60), c.closed()).await;
                            match &end {
                                Ok(quinn::ConnectionError::ApplicationClosed(c))
                                    if ended_by_relay.contains(&u64::from(c.error_code)) =>
                                {
                                    cut.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(quinn::ConnectionError::ConnectionClosed(c))
                                    if c.error_code
                                        == quinn::TransportErrorCode::APPLICATION_ERROR =>
                                {
                                    eprintln!("stranger ended in its handshake: {end:?}");
                                    cut.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(
                                    quinn::ConnectionError::Reset
                                    | quinn::ConnectionError::TimedOut,
                                ) => {
                                    eprintln!("stranger ended without its close: {end:?}");
                                    cut.fetch_add(1, Ordering::Relaxed);
                                }
                                other => eprintln!("stranger ended otherwise: {other:?}"),
                            }
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            while conns.join_next().await.is_some() {}
            ep
        });
    }

    // Meanwhile the connected client sends; every message gets its receipt
    // and arrives exactly once.
    const MESSAGES: usize = 100;
    let mut got = HashSet::new();
    for i in 0..MESSAGES {
        let payload = format!("during the flood {i}");
        let (r, m) = tokio::join!(
            tx.send_with_timeout(
                "bob/rx",
                payload.clone().into_bytes(),
                Duration::from_secs(30),
            ),
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
        );
        assert!(r.is_ok(), "message {i} during the flood: {r:?}");
        let m = m
            .expect("delivery during the flood")
            .expect("agent running");
        assert!(got.insert(m.payload.clone()), "delivered twice: {m:?}");
        assert_eq!(m.payload, payload.as_bytes());
    }
    let mut endpoints = Vec::new();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(120), flood.join_next())
        .await
        .expect("flood ends")
    {
        endpoints.push(r.unwrap());
    }
    let stats = relay.relay().stats();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "flood: {ok} handshakes completed, {failed} refused or failed; relay refused {} over the handshake rate, {} not registered",
        stats.refused_count(ErrorCode::TooManyConnections),
        stats.refused_count(ErrorCode::NotRegistered),
    );
    assert_eq!(ok + failed, FLOOD as u64);
    assert!(
        stats.refused_count(ErrorCode::TooManyConnections) > 0,
        "the handshake rate limit never engaged"
    );
    assert!(ok > 0, "no stranger got as far as a handshake");
    // Every stranger that got in was cut off: at the auth deadline, or at
    // once for want of a stranger slot (see the stderr for any other end).
    assert_eq!(
        cut.load(Ordering::Relaxed),
        ok,
        "strangers not closed with AuthTimeout or TooManyConnections"
    );
    let (r, m) = tokio::join!(
        tx.send_with_timeout("bob/rx", &b"after"[..], WAIT),
        tokio::time::timeout(WAIT, rx.recv())
    );
    assert!(r.is_ok(), "after the flood: {r:?}");
    assert!(matches!(m, Ok(Some(_))));
    alice.close().await;
    bob.close().await;
}
