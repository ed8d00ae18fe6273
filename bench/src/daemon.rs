//! `agent-link-bench daemon`: the local instance under load. A relay
//! process and two daemons (instance A sends, instance B receives into the
//! durable inbox of agent `bob`), then:
//! 1. N local clients on A's socket (`POST /v1/send`, one request per
//!    connection, as a CLI or a script client makes it), closed loop, for
//!    `--duration`: msg/s, p50/p99 send→receipt, each daemon's CPU per
//!    message and RSS;
//! 2. the direct library path in the same run: N tasks of one `AgentLink`
//!    on a third instance (no daemon) sending to the same durable inbox;
//! 3. the whole-process `agent-link send` through A's daemon vs direct
//!    (instance C, no daemon), alternated, min/median/max.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link::daemon::client::Client;
use agent_link_faults::ProcWatch;
use anyhow::{bail, Context, Result};
use tokio::sync::Mutex;

use crate::cli::{init, summary, timed};
use crate::relay_proc::{relay_binary, sibling_binary, RelayProcess};

/// Options of `agent-link-bench daemon`.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Local clients sending at once (each one message in flight)
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Payload bytes
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Measured seconds per path, at most 60
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Whole-process CLI calls of each kind
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The peer binary (default: beside this one, then PATH)
    #[arg(long)]
    peer_bin: Option<PathBuf>,
}

struct DaemonProc(Child);

impl DaemonProc {
    fn start(peer: &Path, dir: &Path) -> Result<Self> {
        let child = Command::new(peer)
            .arg("daemon")
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("agent-link daemon")?;
        let d = DaemonProc(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(dir.join("agent-link.sock")).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon of {} did not start", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    fn watch(&self) -> ProcWatch {
        ProcWatch(self.0.id())
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Latencies (µs) and count of one path's measured window.
struct Figures {
    name: &'static str,
    sent: u64,
    errors: u64,
    secs: f64,
    lat: hdrhistogram::Histogram<u64>,
}

impl Figures {
    fn print(&self, cpu: &[(&str, f64)]) {
        let rate = self.sent as f64 / self.secs;
        let q = |p: f64| self.lat.value_at_quantile(p) as f64 / 1000.0;
        let mut line = format!(
            "{:<28} {:>9.0} msg/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}",
            self.name,
            rate,
            q(0.5),
            q(0.99),
            self.errors
        );
        for (who, secs) in cpu {
            line.push_str(&format!(
                "  {who} {:.1} µs/msg",
                secs * 1e6 / self.sent.max(1) as f64
            ));
        }
        println!("{line}");
    }
}

/// `clients` closed loops, each one send in flight, until `duration` is
/// up: how many succeeded and failed, and their latencies.
async fn closed_loop<F, Fut>(
    name: &'static str,
    clients: usize,
    duration: Duration,
    send: F,
) -> Figures
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop_at = Instant::now() + duration;
    let lat = Arc::new(Mutex::new(crate::load::new_histogram()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (send, lat) = (send.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut err) = (0u64, 0u64);
            while Instant::now() < stop_at {
                let t0 = Instant::now();
                if send().await {
                    ok += 1;
                    let us = t0.elapsed().as_micros() as u64;
                    let _ = lat.lock().await.record(us.max(1));
                } else {
                    err += 1;
                }
            }
            (ok, err)
        }));
    }
    let t0 = Instant::now();
    let (mut sent, mut errors) = (0, 0);
    for t in tasks {
        if let Ok((o, e)) = t.await {
            sent += o;
            errors += e;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let lat = lat.lock().await.clone();
    Figures {
        name,
        sent,
        errors,
        secs,
        lat,
    }
}

/// The measured time of each path.
fn measured(args: &DaemonArgs) -> Duration {
    Duration::from_secs(args.duration.min(60))
}

async fn through_socket(client: Client, args: &DaemonArgs, payload: String) -> Figures {
    let body =
        Arc::new(serde_json::json!({"from": "alice", "to": "bench-b/bob", "message": payload}));
    closed_loop(
        "local API → durable inbox",
        args.clients,
        measured(args),
        move || {
            let (client, body) = (client.clone(), body.clone());
            async move {
                client
                    .request("POST", "/v1/send", Some(&body))
                    .await
                    .is_ok()
            }
        },
    )
    .await
}

async fn direct(dir: &Path, args: &DaemonArgs, payload: String) -> Result<Figures> {
    let link = agent_link::AgentLink::connect(dir).await?;
    let agent = link.attach_sender("alice").await?;
    let (tx, payload) = (agent.sender(), bytes::Bytes::from(payload));
    let f = closed_loop(
        "library (no daemon) → inbox",
        args.clients,
        measured(args),
        move || {
            let (tx, payload) = (tx.clone(), payload.clone());
            async move { tx.send("bench-b/bob", payload).await.is_ok() }
        },
    )
    .await;
    agent.close().await;
    link.close().await;
    Ok(f)
}

/// The benchmark.
pub async fn run(args: DaemonArgs) -> Result<()> {
    if args.clients == 0 || args.runs == 0 {
        bail!("--clients and --runs must be at least 1");
    }
    let relay_bin = relay_binary(args.relay_bin.as_deref())?;
    let peer = sibling_binary("agent-link", args.peer_bin.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let relay = RelayProcess::start(
        &relay_bin,
        &tmp.path().join("relay"),
        &serde_json::json!({}),
    )?;
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for (dir, id) in [(&a, "bench-a"), (&b, "bench-b"), (&c, "bench-c")] {
        init(&peer, dir, id, &relay.token)?;
    }
    // B's inbox takes everything the run sends.
    let cfg_path = b.join("agent-link-config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
    cfg["inbox_max_messages"] = 10_000_000.into();
    cfg["inbox_max_bytes"] = (16u64 << 30).into();
    std::fs::write(&cfg_path, cfg.to_string())?;
    std::fs::write(b.join("agents.json"), r#"{"agents":[{"agent":"bob"}]}"#)?;
    let da = DaemonProc::start(&peer, &a)?;
    let db = DaemonProc::start(&peer, &b)?;
    let client = Client::find(&a).await.context("daemon A's socket")?;
    let payload = "x".repeat(args.size);
    println!(
        "{} local clients, {} B payloads, {} s per path; receiver: a daemon's durable inbox (fsync before the receipt)",
        args.clients, args.size, args.duration
    );
    // Warm-up: the send-only attach of `alice`, first contact pins.
    client
        .request(
            "POST",
            "/v1/send",
            Some(&serde_json::json!({"from": "alice", "to": "bench-b/bob", "message": "warm"})),
        )
        .await
        .map_err(|e| anyhow::anyhow!("warm-up send: {e}"))?;
    let (wa, wb) = (da.watch(), db.watch());
    let (ca, cb) = (wa.cpu_seconds(), wb.cpu_seconds());
    let f = through_socket(client.clone(), &args, payload.clone()).await;
    f.print(&[
        ("daemon A", wa.cpu_seconds() - ca),
        ("daemon B", wb.cpu_seconds() - cb),
    ]);
    let cb = wb.cpu_seconds();
    let f = direct(&c, &args, payload.clone()).await?;
    f.print(&[("daemon B", wb.cpu_seconds() - cb)]);
    println!(
        "RSS: daemon A {} KiB (peak {}), daemon B {} KiB (peak {})",
        wa.rss_kib(),
        wa.peak_rss_kib(),
        wb.rss_kib(),
        wb.peak_rss_kib()
    );
    // Whole processes: `send` through A's daemon vs direct from C.
    let send = |dir: &Path| {
        let mut cmd = Command::new(&peer);
        cmd.arg("send").arg("--dir").arg(dir);
        cmd.args(["--from", "cli", "--to", "bench-b/bob", "hello"]);
        cmd.stdout(Stdio::null());
        cmd
    };
    for _ in 0..3 {
        timed(&mut send(&a))?;
        timed(&mut send(&c))?;
    }
    let (mut via, mut dir) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        via.push(timed(&mut send(&a))?);
        dir.push(timed(&mut send(&c))?);
    }
    println!(
        "whole-process `agent-link send` ({} each, alternated):",
        args.runs
    );
    summary("through the daemon", 28, via);
    summary("direct (no daemon)", 28, dir);
    drop(da);
    drop(db);
    drop(relay);
    Ok(())
}
