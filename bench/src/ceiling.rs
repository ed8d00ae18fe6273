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
    /// A fleet of two relays of this binary on one JetStream nats-server
    /// (`--cluster 2`): senders join relay 1, receivers relay 2, so every
    /// message crosses relays.
    Fleet { bin: PathBuf, nats_bin: PathBuf },
}

/// A relay for one run: where it is, its join token, and its process when
/// it is our child.
pub struct RelayUnderTest {
    pub addr: SocketAddr,
    pub token: JoinToken,
    pub process: Option<RelayProcess>,
    /// Where receivers join, and its certificate fingerprint: `addr` but
    /// in a fleet.
    pub receivers_at: (SocketAddr, [u8; 32]),
    /// A fleet's other relay, and the nats-server under both.
    fleet: Option<(RelayProcess, crate::nats::NatsServer)>,
    _dir: Option<tempfile::TempDir>,
}

impl RelayUnderTest {
    pub fn start(target: &RelayTarget, cfg: &RunCfg) -> Result<Self> {
        Self::start_with_members(target, cfg, &[])
    }

    /// As [`RelayUnderTest::start`]; a relay of our own has `members`
    /// (instance id, public key) registered offline, in one registry write
    /// before it starts (online registrations rewrite the registry file
    /// each, which dominates setting up thousands of connections).
    pub fn start_with_members(
        target: &RelayTarget,
        cfg: &RunCfg,
        members: &[(String, agent_link_crypto::PublicKey)],
    ) -> Result<Self> {
        let batch_of = |dir: &std::path::Path| -> Result<PathBuf> {
            let batch = dir.join("members.txt");
            let lines: String = members
                .iter()
                .map(|(id, key)| format!("{id} {key}\n"))
                .collect();
            std::fs::write(&batch, lines)?;
            Ok(batch)
        };
        let register = |bin: &std::path::Path, relay_dir: &std::path::Path, batch: &PathBuf| {
            if members.is_empty() {
                Ok(())
            } else {
                crate::relay_proc::register_batch(bin, relay_dir, batch)
            }
        };
        match target {
            RelayTarget::Own(bin) => {
                let dir = tempfile::tempdir()?;
                let batch = batch_of(dir.path())?;
                let relay = RelayProcess::start_with(
                    bin,
                    &dir.path().join("relay"),
                    &bench_relay_config(cfg),
                    |relay_dir| register(bin, relay_dir, &batch),
                )?;
                let token = JoinToken::parse(&relay.token)?;
                Ok(Self {
                    addr: relay.addr,
                    receivers_at: (relay.addr, token.pinned().expect("a pinned relay")),
                    token,
                    process: Some(relay),
                    fleet: None,
                    _dir: Some(dir),
                })
            }
            RelayTarget::Fleet { bin, nats_bin } => {
                let dir = tempfile::tempdir()?;
                let batch = batch_of(dir.path())?;
                let nats = crate::nats::NatsServer::start_with(nats_bin, cfg.size + 4096, true)?;
                let config = |id: &str| {
                    let mut c = bench_relay_config(cfg);
                    c["cluster"] = serde_json::json!({
                        "nats": [format!("nats://127.0.0.1:{}", nats.port)],
                        "relay_id": id,
                        "replicas": 1,
                    });
                    c
                };
                let d1 = dir.path().join("relay-1");
                // Members go into the fleet's registry (in NATS) through
                // relay 1's directory, before either relay serves.
                let r1 = RelayProcess::start_with(bin, &d1, &config("bench-1"), |relay_dir| {
                    register(bin, relay_dir, &batch)
                })?;
                let r2 = RelayProcess::start_with(
                    bin,
                    &dir.path().join("relay-2"),
                    &config("bench-2"),
                    |relay_dir| {
                        // One fleet: relay 2 takes relay 1's secret.
                        std::fs::copy(d1.join("fleet.secret"), relay_dir.join("fleet.secret"))?;
                        Ok(())
                    },
                )?;
                let token = JoinToken::parse(&r1.token)?;
                let fp2 = JoinToken::parse(&r2.token)?
                    .pinned()
                    .expect("a pinned relay");
                Ok(Self {
                    addr: r1.addr,
                    receivers_at: (r2.addr, fp2),
                    token,
                    process: Some(r1),
                    fleet: Some((r2, nats)),
                    _dir: Some(dir),
                })
            }
            RelayTarget::Remote { addr, token } => {
                let token = JoinToken::parse(token).context("--join")?;
                Ok(Self {
                    addr: *addr,
                    receivers_at: (*addr, token.pinned().expect("a pinned relay")),
                    token,
                    process: None,
                    fleet: None,
                    _dir: None,
                })
            }
        }
    }

    pub fn watch(&self) -> Option<ProcWatch> {
        self.process.as_ref().map(RelayProcess::watch)
    }

    /// Every relay process of ours (a fleet's two, and nats-server under
    /// them), for CPU and memory.
    pub fn watches(&self) -> Vec<ProcWatch> {
        let fleet = self
            .fleet
            .iter()
            .flat_map(|(r, nats)| [r.watch(), nats.watch()]);
        self.watch().into_iter().chain(fleet).collect()
    }

    pub fn stop(self) {
        if let Some(p) = self.process {
            p.stop();
        }
        if let Some((r, _nats)) = self.fleet {
            r.stop();
        }
    }
}

/// The relay's `core::deliveries::SENDER_SHARE` (a test checks they agree).
const RELAY_SENDER_SHARE: u64 = 4;

/// Limits of the bench's own relay: room for the load, not a tuned relay.
pub fn bench_relay_config(cfg: &RunCfg) -> serde_json::Value {
    // A sender may hold a quarter of a stream's queued bytes
    // (`SENDER_SHARE`): room for a whole window of the largest messages
    // from one sender, so large-message runs measure forwarding, not `Busy`.
    let per_agent = (cfg.window as u64 * (cfg.size as u64 + 2048) * RELAY_SENDER_SHARE)
        .clamp(4 << 20, u64::from(u32::MAX));
    let agents = cfg.topo.senders.agents.max(cfg.topo.receivers.agents) as u64;
    let mut c = serde_json::json!({
        "agent_queue_bytes": per_agent,
        "instance_queue_bytes": (per_agent * agents).max(32 << 20),
        "max_message_size": (cfg.size as u64 + 1024).max(1 << 20),
        "agent_queue_len": (cfg.window * 4).max(1024),
        "rate_per_instance": 10_000_000u64,
        "rate_burst": 1_000_000u64,
        "handshakes_per_sec": 100_000u64,
        "handshakes_per_sec_per_ip": 100_000u64,
        "registrations_per_sec": 1_000_000u64,
        "retry_threshold": 10_000u64,
        "max_connections": (cfg.topo.senders.instances + cfg.topo.receivers.instances + 64) as u64,
        "max_agents_per_connection": agents.max(64),
    });
    if let Some(m) = cfg.max_udp_payload {
        c["max_udp_payload_size"] = m.into();
    }
    for (k, v) in &cfg.relay_set {
        c[k.as_str()] = v.clone();
    }
    c
}

/// Connections being set up at once (each a handshake, and an online
/// registration against a running relay): a fleet run sets up thousands.
const CONNECT_CONCURRENCY: usize = 64;

/// `make(0..n)`, at most [`CONNECT_CONCURRENCY`] at once; the results in
/// index order, or the first error.
async fn connect_all<T, F, Fut>(n: usize, make: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let job = make(i);
        jobs.spawn(async move {
            let r = job.await;
            drop(permit);
            (i, r)
        });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(done) = jobs.join_next().await {
        let (i, r) = done?;
        out[i] = Some(r.with_context(|| format!("setting up connection {i}"))?);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Unique ids per run, so runs against a long-lived relay never collide.
pub fn run_names() -> Names {
    Names {
        prefix: format!("bench{:06x}", rand::random::<u32>() & 0xff_ffff),
    }
}

pub async fn run(cfg: &RunCfg, target: &RelayTarget) -> Result<Figure> {
    let topo = &cfg.topo;
    let names = run_names();
    let keys = |n: usize| -> Vec<Arc<Identity>> {
        (0..n).map(|_| Arc::new(Identity::generate())).collect()
    };
    let (rids, sids) = (keys(topo.receivers.instances), keys(topo.senders.instances));
    let members: Vec<(String, agent_link_crypto::PublicKey)> = rids
        .iter()
        .enumerate()
        .map(|(i, id)| (names.receiver_instance(i), id.public_key()))
        .chain(
            sids.iter()
                .enumerate()
                .map(|(i, id)| (names.sender_instance(i), id.public_key())),
        )
        .collect();
    let relay = RelayUnderTest::start_with_members(target, cfg, &members)?;
    // A relay of ours knows them already; a running one is joined online.
    let online = relay.process.is_none();
    let token = &relay.token;
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = tokio::task::JoinSet::new();
    let mut conns = Vec::new();
    let secret = token.fleet_secret().expect("an open fleet token").clone();
    let (addr, fp) = (relay.addr, token.pinned().expect("a pinned relay"));
    let (raddr, rfp) = relay.receivers_at;
    let receiver_agents = topo.receivers.agents;
    let receiving = connect_all(topo.receivers.instances, {
        let (names, secret) = (names.clone(), secret.clone());
        move |i| {
            let (names, secret, id) = (names.clone(), secret.clone(), rids[i].clone());
            async move {
                let instance = names.receiver_instance(i);
                let c =
                    RawConn::join(raddr, rfp, &id, &instance, online.then_some(&secret)).await?;
                let mut agents = Vec::new();
                for a in 0..receiver_agents {
                    let agent = Names::receiver_agent(a);
                    agents.push((c.attach(&agent, true).await?, (instance.clone(), agent)));
                }
                Ok((c, agents))
            }
        }
    })
    .await?;
    for (c, agents) in receiving {
        for (rx, me) in agents {
            receivers.spawn(raw::run_receiver(rx, me, stop.clone()));
        }
        conns.push(c);
    }
    let slots = cfg.slots();
    let mut ready = Vec::new();
    let sending = connect_all(topo.senders.instances, {
        let (names, secret, topo, size) = (names.clone(), secret.clone(), topo.clone(), cfg.size);
        move |i| {
            let (names, secret, topo) = (names.clone(), secret.clone(), topo.clone());
            let id = sids[i].clone();
            async move {
                let instance = names.sender_instance(i);
                let c = RawConn::join(addr, fp, &id, &instance, online.then_some(&secret)).await?;
                let fleet = secret.key();
                let mut agents = Vec::new();
                for a in 0..topo.senders.agents {
                    let agent = Names::sender_agent(a);
                    let k = i * topo.senders.agents + a;
                    let targets = topo.target_names(k, &names);
                    let pool =
                        raw::sign_pool(&id, &fleet, (&instance, &agent), &targets, size, slots)?;
                    agents.push((c.attach(&agent, false).await?, pool));
                }
                Ok((c, agents))
            }
        }
    })
    .await?;
    for (c, agents) in sending {
        ready.extend(agents);
        conns.push(c);
    }
    let plan = cfg.plan(Instant::now() + Duration::from_millis(100));
    let mut senders = tokio::task::JoinSet::new();
    let n = ready.len();
    for (k, (tx, pool)) in ready.into_iter().enumerate() {
        senders.spawn(raw::run_sender(tx, pool, plan.staggered(k, n)));
    }
    let _bar = Progress::start(
        format!("ceiling {} {} B", topo.label(), cfg.size),
        plan.measure_from,
        plan.measure_until,
    );
    let watches = relay.watches();
    let cpu = |ws: &[ProcWatch]| ws.iter().map(ProcWatch::cpu_seconds).sum::<f64>();
    tokio::time::sleep_until(plan.measure_from.into()).await;
    let cpu0 = (!watches.is_empty()).then(|| cpu(&watches));
    let packets = crate::netstat::PacketMeter::start();
    let quic0 = raw::QuicTally::of(&conns);
    let mut out = Outcome::new();
    while let Some(r) = senders.join_next().await {
        out.add(&r??);
    }
    // In a fleet: both relays' and nats-server's CPU, the largest RSS.
    let server = cpu0.map(|c0| {
        let rss = watches.iter().map(ProcWatch::peak_rss_kib).max();
        (cpu(&watches) - c0, rss.unwrap_or(0))
    });
    let packets = packets.stop();
    raw::QuicTally::of(&conns).print_since(&quic0, out.delivered);
    stop.store(true, Ordering::Relaxed);
    receivers.abort_all();
    for c in conns {
        c.conn.close(0u32.into(), b"done");
    }
    relay.stop();
    let system = if matches!(target, RelayTarget::Fleet { .. }) {
        System::Fleet
    } else {
        System::Ceiling
    };
    Ok(Figure::new(system, &cfg.info(), &out, server, packets))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_queue_room_assumes_the_relays_sender_share() {
        assert_eq!(
            super::RELAY_SENDER_SHARE,
            agent_link_relay::core::deliveries::SENDER_SHARE as u64
        );
    }
}
