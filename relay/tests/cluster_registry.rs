//! The fleet's registry on a real 3-node NATS cluster on loopback: two
//! relays registering one id at once (exactly one wins), a revoke written
//! through one relay read through the other, and NATS unreachable at start
//! (a clear error, never a relay running alone).
//!
//! Needs `nats-server` (Debian's 2.9.10 will do) on PATH or in
//! `AGENT_LINK_NATS_SERVER`; without it the test skips, unless
//! `AGENT_LINK_REQUIRE_NATS` is set (CI sets it).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agent_link_crypto::Identity;
use agent_link_faults::nats_or_skip;
use agent_link_relay::cluster::{registry, Cluster, ClusterError};
use agent_link_relay::registry::RegisterError;
use agent_link_relay::ClusterConfig;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three nats-server processes clustered with JetStream
/// ([`agent_link_faults::NatsCluster`]); killed on drop.
struct NatsCluster {
    nodes: agent_link_faults::NatsCluster,
}

impl NatsCluster {
    fn start(bin: &std::path::Path) -> Self {
        Self {
            nodes: agent_link_faults::NatsCluster::start(bin, 3).expect("start nats-server"),
        }
    }

    fn config(&self, node: usize, relay_id: &str) -> ClusterConfig {
        ClusterConfig {
            nats: vec![self.nodes.url(node)],
            relay_id: relay_id.into(),
            replicas: Some(3),
            advertise: None,
        }
    }

    /// Connect once the cluster has elected its JetStream leader (bounded:
    /// 60 s, on a loaded 2-core machine it takes a few).
    async fn connect(&self, node: usize, relay_id: &str) -> Cluster {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Cluster::connect(&self.config(node, relay_id)).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("cluster not ready yet: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("the NATS cluster never became ready: {e}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_id_registered_at_once_through_two_relays_has_exactly_one_owner() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    let r1 = nats.connect(0, "relay-1").await;
    let r2 = nats.connect(1, "relay-2").await;

    for round in 0..5 {
        let id = format!("race-{round}");
        let (a, b) = (
            Identity::generate().public_key(),
            Identity::generate().public_key(),
        );
        let (s1, s2) = (r1.registry_store().clone(), r2.registry_store().clone());
        let (id1, id2) = (id.clone(), id.clone());
        let one = tokio::spawn(async move {
            registry::update(&s1, None, |r| r.register(&id1, &a, "a")).await
        });
        let two = tokio::spawn(async move {
            registry::update(&s2, None, |r| r.register(&id2, &b, "b")).await
        });
        let outcomes = [one.await.unwrap().unwrap(), two.await.unwrap().unwrap()];
        let won = outcomes
            .iter()
            .filter(|o| matches!(o, Ok((true, _))))
            .count();
        let lost = outcomes
            .iter()
            .filter(|o| matches!(o, Err(RegisterError::IdTaken(_))))
            .count();
        assert_eq!((won, lost), (1, 1), "round {round}: {outcomes:?}");
        // Both relays read the same owner.
        let k1 = registry::load(r1.registry_store()).await.unwrap().0;
        let k2 = registry::load(r2.registry_store()).await.unwrap().0;
        let owner = k1.registry.get(&id).unwrap().public_key.clone();
        assert_eq!(k2.registry.get(&id).unwrap().public_key, owner);
        assert!(owner == a.to_string() || owner == b.to_string());
    }

    // A revoke through relay 2 is what relay 1 reads.
    let revoked = registry::update(r2.registry_store(), None, |r| r.revoke("race-0"))
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.0);
    let seen = registry::load(r1.registry_store()).await.unwrap().0;
    assert!(seen.registry.get("race-0").unwrap().revoked);
    // And it stays revoked: registering it again is refused.
    let again = registry::update(r1.registry_store(), None, |r| {
        r.register("race-0", &Identity::generate().public_key(), "x")
    })
    .await
    .unwrap();
    assert!(matches!(
        again,
        Err(RegisterError::IdTaken(_) | RegisterError::Revoked(_))
    ));
}

#[tokio::test]
async fn nats_unreachable_at_start_is_a_clear_error() {
    let port = free_port(); // nothing listens there now
    let cfg = ClusterConfig {
        nats: vec![format!("nats://127.0.0.1:{port}")],
        relay_id: "relay-1".into(),
        replicas: None,
        advertise: None,
    };
    let started = Instant::now();
    let err = Cluster::connect(&cfg).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(matches!(err, ClusterError::Connect { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&port.to_string()) && msg.contains("does not run alone"),
        "{msg}"
    );
}

/// A relay directory whose config joins the fleet through NATS node `node`.
fn fleet_dir(parent: &std::path::Path, nats: &NatsCluster, node: usize, relay_id: &str) -> PathBuf {
    let d = parent.join(relay_id);
    agent_link_relay::state::init(&d, Some("127.0.0.1:0".parse().unwrap())).unwrap();
    let path = d.join(agent_link_relay::state::CONFIG_FILE);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["cluster"] = serde_json::to_value(nats.config(node, relay_id)).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    d
}

/// Run `agent-link-relay ARGS --dir DIR` (stdin from `input`); its exit
/// code and stdout.
fn relay_cli(dir: &std::path::Path, args: &[&str], input: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent-link-relay"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "agent-link-relay {args:?}: {:?} {stderr}",
        out.status.code()
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn instances(dir: &std::path::Path) -> serde_json::Value {
    let (code, out) = relay_cli(dir, &["instances", "--json"], "");
    assert_eq!(code, 0);
    serde_json::from_str(&out).unwrap()
}

/// `register`, `register --batch`, `revoke`, `invite` and `instances`
/// run from either relay's directory read and change the one registry of
/// the fleet, not the directory's own file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_commands_from_any_relays_directory_change_the_fleets_registry() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    // Ready (leader elected, buckets made) before the commands' 5 s connect.
    drop(nats.connect(0, "relay-1").await);
    let parent = tempfile::tempdir().unwrap();
    let d1 = fleet_dir(parent.path(), &nats, 0, "relay-1");
    let d2 = fleet_dir(parent.path(), &nats, 1, "relay-2");
    let (a, b) = (
        Identity::generate().public_key().to_string(),
        Identity::generate().public_key().to_string(),
    );
    let register = |dir: &std::path::Path, id: &str, key: &str| {
        relay_cli(
            dir,
            &["register", "--instance-id", id, "--public-key", key],
            "",
        )
        .0
    };
    assert_eq!(register(&d1, "laptop", &a), 0);
    // Through the other relay: the id is taken, and so is the key.
    assert_eq!(
        register(&d2, "laptop", &b),
        4,
        "one id, one key, fleet-wide"
    );
    assert_eq!(register(&d2, "desk", &a), 4, "the key holds another id");
    assert_eq!(
        register(&d2, "laptop", &a),
        0,
        "the same pair again is fine"
    );
    let batch = format!(
        "# two more\ndesk {b}\nci {}\n",
        Identity::generate().public_key()
    );
    let (code, out) = relay_cli(&d2, &["register", "--batch", "-"], &batch);
    assert_eq!(
        (code, out.trim()),
        (0, "registered 2 new, 0 already registered (same key)")
    );
    let seen = instances(&d1);
    let ids: Vec<&str> = seen["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{seen}");
    for id in ["laptop", "desk", "ci"] {
        assert!(ids.contains(&id), "{id} missing from {seen}");
    }
    // Each relay's own file stays empty: nothing went around the fleet.
    for d in [&d1, &d2] {
        let file = agent_link_relay::registry::RegistryStore::new(d)
            .load()
            .unwrap();
        assert!(file.records().is_empty());
    }
    // Revoked through relay 2, read through relay 1.
    assert_eq!(
        relay_cli(&d2, &["revoke", "--instance-id", "laptop"], "").0,
        0
    );
    let seen = instances(&d1);
    let laptop = seen["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["instance_id"] == "laptop")
        .unwrap();
    assert_eq!(laptop["revoked"], true, "{seen}");
    // An invite made on relay 1 is pending for relay 2 too.
    let (code, token) = relay_cli(
        &d1,
        &["invite", "--instance-id", "phone", "--addr", "127.0.0.1:9"],
        "",
    );
    assert_eq!(code, 0);
    assert!(!token.trim().is_empty());
    let pending = instances(&d2)["pending_invites"].clone();
    assert_eq!(pending[0]["instance_id"], "phone", "{pending}");
}

/// A relay whose config has `cluster` and whose NATS is unreachable does
/// not start: it never runs alone on its own registry.
#[tokio::test]
async fn a_relay_configured_for_a_fleet_does_not_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("relay");
    let mut st = agent_link_relay::state::init(&d, Some("127.0.0.1:0".parse().unwrap())).unwrap();
    let port = free_port(); // nothing listens there now
    st.config.cluster = Some(ClusterConfig {
        nats: vec![format!("nats://127.0.0.1:{port}")],
        relay_id: "relay-1".into(),
        replicas: None,
        advertise: None,
    });
    let err = agent_link_relay::Relay::spawn(st, Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            agent_link_relay::SpawnError::Cluster(ClusterError::Connect { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("does not run alone"), "{err}");
}

/// A watch whose consumer is gone (as when the NATS node holding it dies:
/// the server sends nothing more, and the client only notices after two
/// missed 5 s heartbeats) opens itself again when someone waiting for a
/// revision pokes it: the next item is the write made meanwhile, not the
/// client's "missed idle heartbeat" 10 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_consumer_vanished_opens_again() {
    use agent_link_relay::cluster::watch::BucketWatch;
    use futures_util::StreamExt;
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    let relay = nats.connect(1, "relay-1").await;
    let store = relay.attach_store().clone();
    let first = store.put("a.b", "one".into()).await.unwrap();
    let watch = store.watch_all_from_revision(first).await.unwrap();
    let mut watch = BucketWatch::new(store.clone(), watch, 0);
    let e = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("the first entry")
        .unwrap()
        .unwrap();
    assert_eq!(e.revision, first);

    // The bucket has no other consumer: that one is the watch's.
    let names: Vec<String> = store
        .stream
        .consumer_names()
        .map(|n| n.unwrap())
        .collect()
        .await;
    assert_eq!(names.len(), 1, "{names:?}");
    store.stream.delete_consumer(&names[0]).await.unwrap();
    let second = store.put("a.b", "two".into()).await.unwrap();
    watch.poke().notify_one();
    let next = tokio::time::timeout(Duration::from_secs(60), watch.next())
        .await
        .expect("the watch goes on")
        .expect("not ended");
    match next {
        Ok(e) => assert_eq!((e.revision, &e.value[..]), (second, &b"two"[..])),
        Err(e) => panic!("the watch did not open again: {e}"),
    }
}
