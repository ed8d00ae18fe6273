//! `agent-link-relay init --cluster` as an operator runs it (child
//! processes, a real 3-node nats-server cluster): the first relay founds
//! the fleet, the next joins with a copy of its fleet secret, and a relay
//! with no secret or another fleet's is refused with nothing left behind;
//! NATS unreachable is a clear error; `rotate-secret` on a relay of a fleet
//! is refused rather than splitting the fleet.
//!
//! Skips without nats-server unless `AGENT_LINK_REQUIRE_NATS` is set.

use std::path::Path;

use agent_link_tests::*;

use crate::cli::run;

fn init(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = relay_cmd();
    c.arg("init")
        .arg("--dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra);
    run(c)
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_cluster_founds_a_fleet_joins_it_and_refuses_another_fleets_secret() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    nats.ready().await;
    let url = nats.config(0, "x").nats[0].clone();
    let base = tempfile::tempdir().unwrap();
    let d = |n: &str| base.path().join(n);

    let out = init(&d("r1"), &["--cluster", &url, "--relay-id", "relay-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("founded a fleet"),
        "{}",
        text(&out.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d("r1").join("relay-config.json")).unwrap()).unwrap();
    assert_eq!(cfg["cluster"]["nats"][0], url.as_str());
    assert_eq!(cfg["cluster"]["relay_id"], "relay-1");

    // A second founder on the same cluster: refused, nothing written.
    let out = init(&d("r2"), &["--cluster", &url]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("serves another fleet"),
        "{}",
        text(&out.stderr)
    );
    assert!(empty(&d("r2")));

    // Another fleet's secret: refused the same way.
    let foreign = d("foreign.secret");
    agent_link_crypto::FleetSecret::generate()
        .write_new(&foreign)
        .unwrap();
    let out = init(
        &d("r3"),
        &[
            "--cluster",
            &url,
            "--fleet-secret-file",
            foreign.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(empty(&d("r3")));

    // The first relay's secret: joined, with a relay id of its own.
    let secret = d("r1").join("fleet.secret");
    let out = init(
        &d("r4"),
        &[
            "--cluster",
            &url,
            "--fleet-secret-file",
            secret.to_str().unwrap(),
            "--advertise",
            "relay-4.example:8765",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("joined the fleet"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(d("r4").join("fleet.secret")).unwrap(),
        std::fs::read(&secret).unwrap()
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d("r4").join("relay-config.json")).unwrap()).unwrap();
    let id = cfg["cluster"]["relay_id"].as_str().unwrap();
    assert!(id.starts_with("relay-") && id.len() == 14, "{id}");
    assert_eq!(cfg["cluster"]["advertise"], "relay-4.example:8765");

    // Rotating one relay's secret would split the fleet.
    let mut c = relay_cmd();
    c.args(["rotate-secret", "--dir"]).arg(d("r1"));
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not supported"),
        "{}",
        text(&out.stderr)
    );

    // No NATS there: a clear error, nothing written.
    let out = init(&d("r5"), &["--cluster", "nats://127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot reach the fleet's NATS cluster"),
        "{}",
        text(&out.stderr)
    );
    assert!(empty(&d("r5")));

    // A secret file without --cluster is a usage error.
    let out = init(&d("r6"), &["--fleet-secret-file", secret.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
