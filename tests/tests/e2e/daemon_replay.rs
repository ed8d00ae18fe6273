//! The daemon's replay memory across restarts, frame by frame: a raw sender
//! re-sends the very same envelope bytes (what a retry after a reconnect,
//! or a replaying relay, delivers) to an agent whose daemon was killed
//! with -9 in between. The retry must be answered with the first receipt
//! and stored once — while the message waits, and after it was read.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use agent_link_crypto::Identity;
use agent_link_proto::RelayToPeer;
use agent_link_tests::{
    now_ms, peer_cmd, random_id, write_peer_dir, RawClient, RawStream, TestRelay, WAIT,
};

struct Daemon(Child);

impl Daemon {
    /// Start the daemon of `dir`; return once its socket answers.
    /// (Async: the relay runs on this test's runtime.)
    async fn start(dir: &std::path::Path) -> Self {
        let child = peer_cmd()
            .args(["daemon", "--dir", dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon(child);
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(dir.join("agent-link.sock")).is_err() {
            assert!(Instant::now() < deadline, "the daemon did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Send `env` and wait for its outcome, re-sending (bounded) while the
/// target is not attached yet (a restarted daemon attaches shortly after
/// its socket is up).
async fn receipt_of(s: &mut RawStream, env: &[u8]) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        s.send_envelope(env).await;
        let f = s.read().await.expect("an outcome");
        match f.get() {
            RelayToPeer::Receipt { receipt } => return receipt.delivered_at_ms,
            RelayToPeer::Failed {
                code: agent_link_proto::ErrorCode::TargetOffline,
                ..
            } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{other:?}"),
        }
    }
}

async fn waiting(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let dir = dir.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        peer_cmd()
            .args([
                "inbox",
                "--dir",
                dir.to_str().unwrap(),
                "--agent",
                "bob",
                "--json",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_retried_id_is_stored_once_and_answered_with_the_first_receipt_across_restarts() {
    let relay = TestRelay::start(|_| {}).await;
    let (a, b) = (Identity::generate(), Identity::generate());
    relay.register("raw-a", &a);
    relay.register("inst-b", &b);
    let dir = relay.dir.path().join("inst-b");
    write_peer_dir(&dir, "inst-b", &b, &relay.token);
    std::fs::write(dir.join("agents.json"), r#"{"agents":[{"agent":"bob"}]}"#).unwrap();
    let mut daemon = Daemon::start(&dir).await;
    let raw = RawClient::connect(&relay, a, "raw-a").await.unwrap();
    let mut s = raw.attach("alice", false).await;
    let env = raw.envelope(random_id(), "alice", "inst-b/bob", now_ms(), b"once");
    let first = receipt_of(&mut s, &env).await;

    // Killed after the receipt: stored. The same bytes again after the
    // restart: the first receipt, not a second copy.
    drop(daemon);
    daemon = Daemon::start(&dir).await;
    assert_eq!(receipt_of(&mut s, &env).await, first, "the first receipt");
    let w = waiting(&dir).await;
    assert_eq!(w.len(), 1, "stored once: {w:?}");
    assert_eq!(w[0]["message"], "once");

    // Read (acked), then the daemon restarts: still recognised.
    let d = dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        peer_cmd()
            .args(["recv", "--dir", d.to_str().unwrap(), "--agent", "bob"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    drop(daemon);
    let _daemon = Daemon::start(&dir).await;
    assert_eq!(receipt_of(&mut s, &env).await, first, "after the read too");
    assert!(
        waiting(&dir).await.is_empty(),
        "not delivered again after it was read"
    );
}
