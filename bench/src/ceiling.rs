//! The relay-ceiling figure: bench-side raw clients through the relay (our
//! own child process, or a running relay given by `--relay`/`--join`).
//! Senders send envelopes signed before the timed window; receivers
//! acknowledge without verifying Ed25519; the relay checks size, decoding,
//! sender binding, the fleet HMAC and the timestamp on every message.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link_crypto::Identity;
use agent_link_proto::JoinToken;
use anyhow::{Context, Result};

use crate::load::{Outcome, RunCfg};
use crate::progress::Progress;
use crate::raw::{self, RawConn};
use crate::relay_proc::{ProcWatch, RelayProcess};
use crate::report::{Figure, System};
use crate::workload::Names;

/// Which relay to measure.
#[derive(Debug, Clone)]
pub enum RelayTarget {
    /// Start this relay binary as our child for each run.
    Own(PathBuf),
    /// A running relay: its address and a join token of its fleet.
    Remote { addr: SocketAddr, token: String },
}

/// A relay for one run: where it is, its join token, and its process when
/// it is our child.
pub struct RelayUnderTest {
    pub addr: SocketAddr,
    pub token: JoinToken,
    pub process: Option<RelayProcess>,
    _dir: Option<tempfile::TempDir>,
}

impl RelayUnderTest {
    pub fn start(target: &RelayTarget, cfg: &RunCfg) -> Result<Self> {
        match target {
            RelayTarget::Own(bin) => {
                let dir = tempfile::tempdir()?;
                let relay =
                    RelayProcess::start(bin, &dir.path().join("relay"), &bench_relay_config(cfg))?;
                Ok(Self {
                    addr: relay.addr,
                    token: JoinToken::parse(&relay.token)?,
                    process: Some(relay),
                    _dir: Some(dir),
                })
            }
            RelayTarget::Remote { addr, token } => Ok(Self {
                addr: *addr,
                token: JoinToken::parse(token).context("--join")?,
                process: None,
                _dir: None,
            }),
        }
    }

    pub fn watch(&self) -> Option<ProcWatch> {
        self.process.as_ref().map(RelayProcess::watch)
    }

    pub fn stop(self) {
        if let Some(p) = self.process {
            p.stop();
        }
    }
}

/// Limits of the bench's own relay: room for the load, not a tuned relay.
pub fn bench_relay_config(cfg: &RunCfg) -> serde_json::Value {
    let mut c = serde_json::json!({
        "max_message_size": (cfg.size as u64 + 1024).max(1 << 20),
        "agent_queue_len": (cfg.window * 4).max(1024),
        "rate_per_instance": 10_000_000u64,
        "rate_burst": 1_000_000u64,
        "handshakes_per_sec": 100_000u64,
        "handshakes_per_sec_per_ip": 100_000u64,
        "max_agents_per_connection": (cfg.topo.senders.agents.max(cfg.topo.receivers.agents) as u64).max(64),
    });
    if let Some(m) = cfg.max_udp_payload {
        c["max_udp_payload_size"] = m.into();
    }
    c
}

/// Unique ids per run, so runs against a long-lived relay never collide.
pub fn run_names() -> Names {
    Names {
        prefix: format!("bench{:06x}", rand::random::<u32>() & 0xff_ffff),
    }
}

pub async fn run(cfg: &RunCfg, target: &RelayTarget) -> Result<Figure> {
    let relay = RelayUnderTest::start(target, cfg)?;
    let topo = &cfg.topo;
    let names = run_names();
    let token = &relay.token;
    let fleet = token.fleet_secret().expect("an open fleet token").key();
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = tokio::task::JoinSet::new();
    let mut conns = Vec::new();
    for i in 0..topo.receivers.instances {
        let id = Identity::generate();
        let instance = names.receiver_instance(i);
        let c = RawConn::connect(relay.addr, token.fingerprint, &id)
            .await
            .context("connecting to the relay")?;
        c.register(
            &id,
            &instance,
            token.fleet_secret().expect("an open fleet token"),
        )
        .await?;
        for a in 0..topo.receivers.agents {
            let agent = Names::receiver_agent(a);
            let rx = c.attach(&agent, true).await?;
            receivers.spawn(raw::run_receiver(
                rx,
                (instance.clone(), agent),
                stop.clone(),
            ));
        }
        conns.push(c);
    }
    let slots = cfg.slots();
    let mut ready = Vec::new();
    for i in 0..topo.senders.instances {
        let id = Identity::generate();
        let instance = names.sender_instance(i);
        let c = RawConn::connect(relay.addr, token.fingerprint, &id).await?;
        c.register(
            &id,
            &instance,
            token.fleet_secret().expect("an open fleet token"),
        )
        .await?;
        for a in 0..topo.senders.agents {
            let agent = Names::sender_agent(a);
            let k = i * topo.senders.agents + a;
            let targets = topo.target_names(k, &names);
            let pool = raw::sign_pool(&id, &fleet, (&instance, &agent), &targets, cfg.size, slots)?;
            ready.push((c.attach(&agent, false).await?, pool));
        }
        conns.push(c);
    }
    let plan = cfg.plan(Instant::now() + Duration::from_millis(100));
    let mut senders = tokio::task::JoinSet::new();
    for (tx, pool) in ready {
        senders.spawn(raw::run_sender(tx, pool, plan));
    }
    let _bar = Progress::start(
        format!("ceiling {} {} B", topo.label(), cfg.size),
        plan.measure_from,
        plan.measure_until,
    );
    let watch = relay.watch();
    tokio::time::sleep_until(plan.measure_from.into()).await;
    let cpu0 = watch.map(|w| w.cpu_seconds());
    let mut out = Outcome::new();
    while let Some(r) = senders.join_next().await {
        out.add(&r??);
    }
    let server = watch
        .zip(cpu0)
        .map(|(w, c0)| (w.cpu_seconds() - c0, w.peak_rss_kib()));
    stop.store(true, Ordering::Relaxed);
    receivers.abort_all();
    for c in conns {
        c.conn.close(0u32.into(), b"done");
    }
    relay.stop();
    Ok(Figure::new(System::Ceiling, &cfg.info(), &out, server))
}
