//! A 3-node nats-server cluster with JetStream on loopback, for the fleet
//! tests: [`NatsCluster::start`], [`nats_server`]. Needs `nats-server`
//! (Debian's 2.9.10 will do) on PATH or in `AGENT_LINK_NATS_SERVER`; a
//! test without it skips, unless `AGENT_LINK_REQUIRE_NATS` is set (CI sets
//! it), see [`nats_or_skip`].

use std::time::{Duration, Instant};

use agent_link_relay::cluster::Cluster;
use agent_link_relay::ClusterConfig;

pub use agent_link_faults::{nats_or_skip, nats_server};

/// Three nats-server processes clustered with JetStream
/// ([`agent_link_faults::NatsCluster`]); killed on drop.
pub struct NatsCluster {
    nodes: agent_link_faults::NatsCluster,
}

impl NatsCluster {
    /// Start the three nodes (not ready yet: see [`NatsCluster::ready`]).
    pub fn start(bin: &std::path::Path) -> Self {
        Self {
            nodes: agent_link_faults::NatsCluster::start(bin, 3).expect("start nats-server"),
        }
    }

    /// The cluster section of relay `relay_id`, served by node `node`.
    pub fn config(&self, node: usize, relay_id: &str) -> ClusterConfig {
        ClusterConfig {
            nats: vec![self.nodes.url(node)],
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
        self.nodes.kill(node);
    }

    /// Wait until the cluster serves JetStream and the fleet's buckets
    /// exist (bounded like [`NatsCluster::connect`]).
    pub async fn ready(&self) {
        drop(self.connect(0, "ready-check").await);
    }
}
