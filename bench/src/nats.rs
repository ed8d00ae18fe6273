//! The same workload on NATS, side by side: `nats-server` as our child on a
//! free loopback port, `async-nats` clients (one connection per instance).
//! Senders publish `size`-byte requests to one subject per receiving agent
//! with their own reply subject; receivers answer each with a 40-byte reply
//! (the receipt). Closed loop (`window`) or open loop (`--rate`) exactly as
//! for the relay, with the same [`Tracker`].

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::{Client, Subject, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use crate::load::{Outcome, Plan, RunCfg, Tracker};
use crate::progress::Progress;
use crate::relay_proc::ProcWatch;
use crate::report::{Figure, System};
use crate::workload::Names;

/// `nats-server` on PATH (or `explicit`), if it runs.
pub fn find_server(explicit: Option<&Path>) -> Option<PathBuf> {
    let bin = explicit.map_or_else(|| PathBuf::from("nats-server"), Path::to_path_buf);
    Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .map(|_| bin)
}

/// `--nats`, `--no-nats`, `--nats-bin`: whether a command also runs its
/// shape on nats-server, and which binary.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// Run the same shape on nats-server (default: when it is found)
    #[arg(long, conflicts_with = "no_nats")]
    nats: bool,
    /// Do not run NATS
    #[arg(long)]
    no_nats: bool,
    /// The nats-server binary (default: PATH)
    #[arg(long)]
    nats_bin: Option<PathBuf>,
}

impl NatsArgs {
    /// The nats-server binary whatever `--no-nats` says (a fleet of relays
    /// needs one under it), if there is one.
    pub fn binary(&self) -> Option<PathBuf> {
        find_server(self.nats_bin.as_deref())
    }

    /// The nats-server to run, if any: none with `--no-nats`; an error
    /// with `--nats` when none is found; else the one found, or none with
    /// a hint on stderr.
    pub fn server(&self) -> Result<Option<PathBuf>> {
        if self.no_nats {
            return Ok(None);
        }
        match find_server(self.nats_bin.as_deref()) {
            Some(b) => Ok(Some(b)),
            None if self.nats => bail!("{INSTALL_HINT}"),
            None => {
                eprintln!("{INSTALL_HINT}");
                Ok(None)
            }
        }
    }
}

pub const INSTALL_HINT: &str =
    "nats-server not found: install it with `apt-get install nats-server` \
(Debian/Ubuntu) or from https://github.com/nats-io/nats-server/releases, or pass --nats-bin; \
running agent-link alone";

/// A nats-server child process.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start(bin: &Path, max_payload: usize) -> Result<Self> {
        Self::start_with(bin, max_payload, false)
    }

    /// With `jetstream`: JetStream on (file store in its temporary
    /// directory), as a fleet of relays needs.
    pub fn start_with(bin: &Path, max_payload: usize, jetstream: bool) -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("nats.conf");
        let js = if jetstream {
            format!("jetstream {{ store_dir: {:?} }}\n", dir.path().join("js"))
        } else {
            String::new()
        };
        std::fs::write(
            &conf,
            format!(
                "host: 127.0.0.1\nport: {port}\nmax_payload: {}\n{js}",
                max_payload.max(1 << 20)
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let me = Self {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(me);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nats-server did not listen on 127.0.0.1:{port}")
    }

    pub fn watch(&self) -> ProcWatch {
        ProcWatch(self.child.id())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn connect(port: u16) -> Result<Client> {
    async_nats::ConnectOptions::new()
        .no_echo()
        .connect(format!("127.0.0.1:{port}"))
        .await
        .context("connecting to nats-server")
}

fn subject(instance: &str, agent: &str) -> Subject {
    Subject::from(format!("bench.{instance}.{agent}"))
}

fn slot_of(payload: &[u8]) -> Option<usize> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?) as usize)
}

/// Answer every request on `sub` with a 40-byte reply (the receipt) that
/// starts with the request's first 8 bytes.
pub(crate) async fn receiver(client: Client, mut sub: Subscriber) -> Result<()> {
    while let Some(msg) = sub.next().await {
        if let Some(reply) = msg.reply {
            let mut receipt = [0u8; 40];
            receipt[..8].copy_from_slice(msg.payload.get(..8).unwrap_or(&[0; 8]));
            client
                .publish(reply, Bytes::copy_from_slice(&receipt))
                .await?;
        }
    }
    Ok(())
}

async fn sender(
    client: Client,
    mut inbox: Subscriber,
    reply_to: Subject,
    targets: Vec<Subject>,
    size: usize,
    slots: usize,
    plan: Plan,
) -> Result<Outcome> {
    let mut tr = Tracker::new(plan, slots);
    let template = vec![0x5au8; size];
    tokio::time::sleep_until(plan.start.into()).await;
    loop {
        let now = Instant::now();
        while let Some(slot) = tr.take_due(now) {
            let mut p = template.clone();
            p[..8].copy_from_slice(&(slot as u64).to_le_bytes());
            client
                .publish_with_reply(
                    targets[slot % targets.len()].clone(),
                    reply_to.clone(),
                    Bytes::from(p),
                )
                .await?;
        }
        if now >= tr.measure_until() {
            break;
        }
        let wake = tr.wake_at().unwrap_or(tr.measure_until());
        let first = tokio::select! {
            m = inbox.next() => m,
            _ = tokio::time::sleep_until(wake.into()) => continue,
        };
        let Some(first) = first else {
            bail!("nats subscription ended");
        };
        let now = Instant::now();
        if let Some(s) = slot_of(&first.payload) {
            tr.complete(s, now, true);
        }
        // Take every reply already here before sending again.
        while let Some(Some(m)) = inbox.next().now_or_never() {
            if let Some(s) = slot_of(&m.payload) {
                tr.complete(s, now, true);
            }
        }
    }
    Ok(tr.out)
}

pub async fn run(cfg: &RunCfg, bin: &Path) -> Result<Figure> {
    if cfg.size < 8 {
        bail!("NATS runs need payloads of at least 8 bytes");
    }
    let server = NatsServer::start(bin, cfg.size + 1024)?;
    let topo = &cfg.topo;
    let names = Names {
        prefix: "bench".into(),
    };
    let mut receivers = tokio::task::JoinSet::new();
    for i in 0..topo.receivers.instances {
        let client = connect(server.port).await?;
        for a in 0..topo.receivers.agents {
            let sub = client
                .subscribe(subject(
                    &names.receiver_instance(i),
                    &Names::receiver_agent(a),
                ))
                .await?;
            receivers.spawn(receiver(client.clone(), sub));
        }
        client.flush().await?;
    }
    let slots = cfg.slots();
    let mut ready = Vec::new();
    for i in 0..topo.senders.instances {
        let client = connect(server.port).await?;
        for a in 0..topo.senders.agents {
            let k = i * topo.senders.agents + a;
            let reply_to = subject(&names.sender_instance(i), &Names::sender_agent(a));
            let inbox = client.subscribe(reply_to.clone()).await?;
            let targets = topo
                .target_names(k, &names)
                .iter()
                .map(|(instance, agent)| subject(instance, agent))
                .collect();
            ready.push((client.clone(), inbox, reply_to, targets));
        }
        client.flush().await?;
    }
    let plan = cfg.plan(Instant::now() + Duration::from_millis(100));
    let mut senders = tokio::task::JoinSet::new();
    let n = ready.len();
    for (k, (client, inbox, reply_to, targets)) in ready.into_iter().enumerate() {
        senders.spawn(sender(
            client,
            inbox,
            reply_to,
            targets,
            cfg.size,
            slots,
            plan.staggered(k, n),
        ));
    }
    let _bar = Progress::start(
        format!("nats {} {} B", topo.label(), cfg.size),
        plan.measure_from,
        plan.measure_until,
    );
    let watch = server.watch();
    tokio::time::sleep_until(plan.measure_from.into()).await;
    let cpu0 = watch.cpu_seconds();
    let packets = crate::netstat::PacketMeter::start();
    let mut out = Outcome::new();
    while let Some(r) = senders.join_next().await {
        out.add(&r??);
    }
    let cpu = watch.cpu_seconds() - cpu0;
    let packets = packets.stop();
    let rss = watch.peak_rss_kib();
    receivers.abort_all();
    drop(server);
    Ok(Figure::new(
        System::Nats,
        &cfg.info(),
        &out,
        Some((cpu, rss)),
        packets,
    ))
}
