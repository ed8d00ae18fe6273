//! Failover in a fleet of relays (DESIGN.md, "A fleet of relays"): two relay
//! processes on a real 3-node NATS cluster; join tokens list the relays that
//! are up; a peer whose relay is killed with -9 goes on through the other
//! with the outbox promise (every send answered, nothing lost, nothing
//! twice); a token whose first relay is down still joins; a killed relay
//! drops out of the tokens once its presence expires.
//!
//! Skips without nats-server unless `AGENT_LINK_REQUIRE_NATS` is set.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use agent_link_faults::RelayProcess;
use agent_link_proto::JoinToken;
use agent_link_relay::cluster::presence;
use agent_link_tests::*;
use tokio::time::Instant;

/// Messages alice sends to bob across the kill.
const MESSAGES: usize = 20;
/// Sent (and answered) before the kill.
const BEFORE_KILL: usize = 5;

/// Relay `id` of the fleet as a child process in `dir`, served by NATS node
/// `node`; with `fleet_of`, it takes that relay directory's fleet secret
/// (one fleet).
fn relay_process(
    nats: &NatsCluster,
    node: usize,
    id: &str,
    dir: &Path,
    fleet_of: Option<&Path>,
) -> RelayProcess {
    let bin = workspace_bin("agent-link-relay");
    let cluster = serde_json::to_value(nats.config(node, id)).unwrap();
    RelayProcess::init(
        &bin,
        dir,
        "127.0.0.1:0".parse().unwrap(),
        &serde_json::json!({ "cluster": cluster }),
    )
    .unwrap();
    if let Some(first) = fleet_of {
        std::fs::copy(first.join("fleet.secret"), dir.join("fleet.secret")).unwrap();
    }
    RelayProcess::start(&bin, dir, vec![]).unwrap()
}

/// `agent-link-relay invite` from `dir` for `id`.
fn invite(dir: &Path, id: &str) -> JoinToken {
    let out = relay_cmd()
        .args(["invite", "--dir"])
        .arg(dir)
        .args(["--instance-id", id])
        .output()
        .unwrap();
    assert!(out.status.success(), "invite: {}", text(&out.stderr));
    JoinToken::parse(&text(&out.stdout)).unwrap()
}

fn addrs(t: &JoinToken) -> Vec<String> {
    t.relays().map(|(a, _)| a.to_string()).collect()
}

/// Wait (bounded) until the relays that are up are exactly `want`.
async fn relays_up_become(nats: &NatsCluster, want: &[&str], within: Duration) {
    let cluster = nats.connect(0, "probe").await;
    let deadline = Instant::now() + within;
    loop {
        let up = presence::relays_up(cluster.relays_store()).await.unwrap();
        let ids: Vec<&str> = up.iter().map(|(id, _)| id.as_str()).collect();
        if ids == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "relays up {ids:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_fails_over_when_its_relay_is_killed_and_keeps_the_outbox_promise() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    nats.ready().await;
    let base = tempfile::tempdir().unwrap();
    let (d1, d2) = (base.path().join("r1"), base.path().join("r2"));
    let mut r1 = relay_process(&nats, 0, "relay-1", &d1, None);
    let r2 = relay_process(&nats, 1, "relay-2", &d2, Some(&d1));
    relays_up_become(&nats, &["relay-1", "relay-2"], WAIT).await;
    let (a1, a2) = (r1.addr().to_string(), r2.addr().to_string());

    // Each relay's invite lists itself first, then the other.
    let alice_token = invite(&d1, "alice");
    assert_eq!(addrs(&alice_token), [a1.clone(), a2.clone()]);
    let bob_token = invite(&d2, "bob");
    assert_eq!(addrs(&bob_token), [a2.clone(), a1.clone()]);
    // Made while relay 1 is up, used after it is killed.
    let carol_token = invite(&d1, "carol");

    let dir = |n: &str| base.path().join(n);
    agent_link::init(&dir("alice"), "alice", &alice_token, None)
        .await
        .unwrap();
    agent_link::init(&dir("bob"), "bob", &bob_token, None)
        .await
        .unwrap();
    let alice = agent_link::AgentLink::connect(dir("alice")).await.unwrap();
    let bob = agent_link::AgentLink::connect(dir("bob")).await.unwrap();
    assert_eq!(&*alice.relay(), a1);
    assert_eq!(&*bob.relay(), a2);
    let alice_agent = alice.attach("a").await.unwrap();
    let sender = alice_agent.sender();
    let mut receiver = bob.attach("b").await.unwrap();

    // Bob takes everything that arrives, counting each payload.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let taker = tokio::spawn(async move {
        while let Some(m) = receiver.recv().await {
            let _ = seen_tx.send(String::from_utf8_lossy(&m.payload).into_owned());
        }
    });

    // The first sends may meet bob's attach not yet seen on relay 1.
    let deadline = Instant::now() + WAIT;
    loop {
        match sender.send("bob/b", "warm-up").await {
            Ok(_) => break,
            Err(e) if e.exit().code() == 3 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("warm-up: {e}"),
        }
    }
    for i in 0..BEFORE_KILL {
        sender.send("bob/b", format!("m{i}")).await.unwrap();
    }

    r1.kill();
    let killed = Instant::now();
    // Sent while relay 1 is gone and alice does not know yet: they wait in
    // alice's outbox and go again through relay 2.
    let sends: Vec<_> = (BEFORE_KILL..MESSAGES)
        .map(|i| {
            let s = sender.clone();
            tokio::spawn(async move {
                let r = s.send("bob/b", format!("m{i}")).await;
                (r, killed.elapsed())
            })
        })
        .collect();
    let mut first_answer = Duration::MAX;
    for s in sends {
        let (r, at) = s.await.unwrap();
        r.expect("a send across the kill ends in a receipt");
        first_answer = first_answer.min(at);
    }
    println!(
        "failover: first receipt through relay 2 {:.1} s after relay 1 was killed",
        first_answer.as_secs_f64()
    );
    assert_eq!(&*alice.relay(), a2, "alice went on through relay 2");
    // Well before the 30 s idle timeout a lone relay's peer waits out (the
    // promise is 10 s; the margin is for a loaded 2-core machine).
    assert!(first_answer < Duration::from_secs(20), "{first_answer:?}");

    // Every message reached bob's application exactly once.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + WAIT;
    while counts.len() < MESSAGES + 1 && Instant::now() < deadline {
        if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), seen_rx.recv()).await
        {
            *counts.entry(p).or_default() += 1;
        }
    }
    // Anything late (a duplicate) would arrive now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(p) = seen_rx.try_recv() {
        *counts.entry(p).or_default() += 1;
    }
    for i in 0..MESSAGES {
        assert_eq!(counts.get(&format!("m{i}")), Some(&1), "m{i}: {counts:?}");
    }

    // A token whose first relay is down joins through the next.
    assert_eq!(addrs(&carol_token)[0], a1);
    agent_link::init(&dir("carol"), "carol", &carol_token, None)
        .await
        .expect("init through relay 2");
    let carol = agent_link::AgentLink::connect(dir("carol")).await.unwrap();
    assert_eq!(&*carol.relay(), a2);

    // Relay 1's presence expires; from then on invites list relay 2 alone
    // (and a lone relay's token is the version any peer reads).
    relays_up_become(
        &nats,
        &["relay-2"],
        presence::REFRESH + agent_link_relay::cluster::PRESENCE_TTL + WAIT,
    )
    .await;
    assert_eq!(addrs(&invite(&d2, "dave")), [a2]);

    carol.close().await;
    drop(alice_agent);
    alice.close().await;
    bob.close().await;
    taker.abort();
    r2.stop();
}
