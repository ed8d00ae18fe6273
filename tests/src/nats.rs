//! A 3-node nats-server cluster with JetStream on loopback, for the fleet
//! tests: [`NatsCluster::start`], [`nats_server`]. Needs `nats-server`
//! (Debian's 2.9.10 will do) on PATH or in `AGENT_LINK_NATS_SERVER`; a
//! test without it skips, unless `AGENT_LINK_REQUIRE_NATS` is set (CI sets
//! it), see [`nats_or_skip`].

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_link_relay::cluster::Cluster;
use agent_link_relay::ClusterConfig;

/// The nats-server binary, if there is one.
pub fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AGENT_LINK_NATS_SERVER") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// The nats-server binary; `None` (the test skips) when there is none and
/// `AGENT_LINK_REQUIRE_NATS` is unset.
///
/// # Panics
/// When `AGENT_LINK_REQUIRE_NATS` is set and there is no nats-server.
pub fn nats_or_skip() -> Option<PathBuf> {
    let bin = nats_server();
    if bin.is_none() {
        assert!(
            std::env::var_os("AGENT_LINK_REQUIRE_NATS").is_none(),
            "AGENT_LINK_REQUIRE_NATS is set but nats-server was not found"
        );
        eprintln!("skipped: nats-server not found");
    }
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three nats-server processes clustered with JetStream; killed on drop.
pub struct NatsCluster {
    children: Vec<Child>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl NatsCluster {
    /// Start the three nodes (not ready yet: see [`NatsCluster::ready`]).
    pub fn start(bin: &PathBuf) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let children = (0..3)
            .map(|i| {
                Command::new(bin)
                    .args(["-a", "127.0.0.1", "-p", &client_ports[i].to_string()])
                    .args([
                        "-js",
                        "-sd",
                        &dir.path().join(format!("n{i}")).display().to_string(),
                    ])
                    .args(["-n", &format!("n{i}"), "--cluster_name", "agent-link-test"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{}", route_ports[i])])
                    .args(["--routes", &routes])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start nats-server")
            })
            .collect();
        Self {
            children,
            client_ports,
            _dir: dir,
        }
    }

    /// The cluster section of relay `relay_id`, served by node `node`.
    pub fn config(&self, node: usize, relay_id: &str) -> ClusterConfig {
        ClusterConfig {
            nats: vec![format!("nats://127.0.0.1:{}", self.client_ports[node])],
            relay_id: relay_id.into(),
            replicas: Some(3),
            advertise: None,
        }
    }

    /// Connect once the cluster has elected its JetStream leader (bounded:
    /// 60 s, on a loaded 2-core machine it takes a few).
    pub async fn connect(&self, node: usize, relay_id: &str) -> Cluster {
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

    /// SIGKILL node `node` (a crash: no goodbye to its routes or clients).
    pub fn kill(&mut self, node: usize) {
        let _ = self.children[node].kill();
        let _ = self.children[node].wait();
    }

    /// Wait until the cluster serves JetStream and the fleet's buckets
    /// exist (bounded like [`NatsCluster::connect`]).
    pub async fn ready(&self) {
        drop(self.connect(0, "ready-check").await);
    }
}
