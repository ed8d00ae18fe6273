//! A nats-server cluster with JetStream on loopback as child processes,
//! whose nodes can be SIGKILLed and started again on the same ports and
//! store (for the fleet tests and the fleet soak). Killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How long a starting node may take to listen.
const START_WAIT: Duration = Duration::from_secs(10);

/// The nats-server binary: `AGENT_LINK_NATS_SERVER`, else PATH, else
/// `/usr/sbin` and `/usr/bin` (Debian's package), if there is one.
pub fn nats_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("AGENT_LINK_NATS_SERVER") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
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

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` nats-server processes clustered with JetStream.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    route_ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Start `n` nodes and wait until each listens for clients (JetStream
    /// elects its leader a little later: clients retry).
    pub fn start(bin: &Path, n: usize) -> Result<Self> {
        let mut me = Self {
            bin: bin.to_path_buf(),
            nodes: (0..n).map(|_| None).collect(),
            client_ports: (0..n).map(|_| free_port()).collect::<Result<_>>()?,
            route_ports: (0..n).map(|_| free_port()).collect::<Result<_>>()?,
            dir: tempfile::tempdir()?,
        };
        for i in 0..n {
            me.spawn(i)?;
        }
        for i in 0..n {
            me.wait_listening(i)?;
        }
        Ok(me)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let routes = self
            .route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", &self.client_ports[i].to_string()])
            .args([
                "-js",
                "-sd",
                &self.dir.path().join(format!("n{i}")).display().to_string(),
            ])
            .args(["-n", &format!("n{i}"), "--cluster_name", "agent-link-test"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.route_ports[i]),
            ])
            .args(["--routes", &routes])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.nodes[i] = Some(child);
        Ok(())
    }

    fn wait_listening(&self, i: usize) -> Result<()> {
        let deadline = std::time::Instant::now() + START_WAIT;
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.client_ports[i])).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "nats-server node {i} did not listen on 127.0.0.1:{}",
            self.client_ports[i]
        )
    }

    /// Node `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.client_ports[i])
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.client_ports.len()).map(|i| self.url(i)).collect()
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has a node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// SIGKILL node `i` (a crash: no goodbye to its routes or clients).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start node `i` again (after [`NatsCluster::kill`]) on its ports and
    /// store.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_listening(i)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
