//! `agent-link-bench`: throughput and latency through a real relay process.
//!
//! It starts the built `agent-link-relay` binary on loopback, registers its
//! own instances, and drives `pairs` sender→receiver pairs in a closed loop
//! with `window` messages in flight per sender. Two figures:
//!
//! - **relay ceiling** (`--mode ceiling`): bench-side clients send envelopes
//!   signed before the timed window, receivers acknowledge without checking
//!   Ed25519; the relay still checks size, decoding, sender binding, HMAC and
//!   timestamp on every message. This is what the relay itself can forward.
//! - **end to end** (`--mode e2e`): the `agent-link` library on both sides,
//!   every check on (signing per message, HMAC + Ed25519 + replay at the
//!   receiver).
//!
//! Latency is send→receipt (two relay hops plus the receipt's way back).

mod raw;
mod relay_proc;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::JoinToken;
use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Relay ceiling: pre-signed messages, receivers not verifying.
    Ceiling,
    /// End to end through the agent-link library, every check on.
    E2e,
    /// Both, one after the other.
    Both,
}

#[derive(Parser, Debug)]
#[command(
    name = "agent-link-bench",
    version,
    about = "Throughput and latency through a real agent-link relay"
)]
pub(crate) struct Args {
    /// Which figure to measure
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Sender→receiver pairs (each side its own instance and connection)
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Messages in flight per sender
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Payload size in bytes
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Measured seconds (after warm-up), at most 45
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Warm-up seconds, not measured
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<std::path::PathBuf>,
    /// Also write the results as JSON here
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Figure {
    mode: Mode,
    pairs: usize,
    window: usize,
    payload_bytes: usize,
    seconds: f64,
    delivered: u64,
    failed: u64,
    messages_per_sec: f64,
    payload_mb_per_sec: f64,
    latency_us: Percentiles,
    relay_cpu_us_per_msg: f64,
    relay_peak_rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<()> {
    if args.duration == 0 || args.duration > 45 {
        bail!("--duration must be between 1 and 45 seconds (pre-signed messages must stay inside the relay's 60 s timestamp window)");
    }
    if args.pairs == 0 || args.window == 0 {
        bail!("--pairs and --window must be at least 1");
    }
    let bin = relay_proc::relay_binary(args.relay_bin.as_deref())?;
    let mut figures = Vec::new();
    if matches!(args.mode, Mode::Ceiling | Mode::Both) {
        figures.push(ceiling(&args, &bin).await.context("relay-ceiling run")?);
    }
    if matches!(args.mode, Mode::E2e | Mode::Both) {
        figures.push(end_to_end(&args, &bin).await.context("end-to-end run")?);
    }
    print_table(&figures);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub(crate) fn bench_relay_config(args: &Args) -> serde_json::Value {
    serde_json::json!({
        "max_message_size": (args.size.max(1024) as u64).max(1 << 20),
        "agent_queue_len": (args.window * 4).max(1024),
        "rate_per_instance": 10_000_000u64,
        "rate_burst": 1_000_000u64,
    })
}

async fn ceiling(args: &Args, bin: &std::path::Path) -> Result<Figure> {
    let dir = tempfile::tempdir()?;
    let seeds: Vec<([u8; 32], [u8; 32])> = (0..args.pairs)
        .map(|_| (rand::random(), rand::random()))
        .collect();
    let ids: Vec<(Identity, Identity)> = seeds
        .iter()
        .map(|(s, r)| (Identity::from_seed(s), Identity::from_seed(r)))
        .collect();
    let mut keys = Vec::new();
    for (k, (s, r)) in ids.iter().enumerate() {
        keys.push((format!("bench-s{k}"), s.public_key().to_string()));
        keys.push((format!("bench-r{k}"), r.public_key().to_string()));
    }
    let relay = relay_proc::RelayProcess::start(
        bin,
        &dir.path().join("relay"),
        &keys,
        &bench_relay_config(args),
    )?;
    let token = JoinToken::parse(&relay.token)?;
    let fleet: FleetSecret = token.secret.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = tokio::task::JoinSet::new();
    let mut senders = tokio::task::JoinSet::new();
    let mut tx_agents = Vec::new();
    for (k, (s, r)) in ids.iter().enumerate() {
        let rx = raw::RawAgent::connect(relay.addr, token.fingerprint, r, "rx", true).await?;
        receivers.spawn(raw::run_receiver(
            rx,
            (format!("bench-r{k}"), "rx".into()),
            stop.clone(),
        ));
        tx_agents
            .push(raw::RawAgent::connect(relay.addr, token.fingerprint, s, "tx", false).await?);
    }
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs(args.warmup);
    let measure_until = measure_from + Duration::from_secs(args.duration);
    let cpu_before = Arc::new(std::sync::Mutex::new(f64::NAN));
    for (k, tx) in tx_agents.into_iter().enumerate() {
        let (size, window) = (args.size, args.window);
        let fleet = fleet.key();
        let seed_identity = Identity::from_seed(&seeds[k].0);
        senders.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            raw::run_sender(
                tx,
                &seed_identity,
                &fleet,
                (&format!("bench-s{k}"), "tx"),
                (&format!("bench-r{k}"), "rx"),
                size,
                window,
                measure_from,
                measure_until,
            )
            .await
        });
    }
    tokio::time::sleep_until(measure_from.into()).await;
    *cpu_before.lock().unwrap_or_else(|e| e.into_inner()) = relay.cpu_seconds();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut delivered, mut failed) = (0, 0);
    while let Some(r) = senders.join_next().await {
        let r = r??;
        delivered += r.delivered_in_window;
        failed += r.failed;
        hist.add(&r.latency)?;
    }
    let cpu = relay.cpu_seconds() - *cpu_before.lock().unwrap_or_else(|e| e.into_inner());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    receivers.abort_all();
    let peak = relay.peak_rss_kib();
    relay.stop();
    Ok(figure(
        Mode::Ceiling,
        args,
        delivered,
        failed,
        &hist,
        cpu,
        peak,
    ))
}

pub(crate) fn figure(
    mode: Mode,
    args: &Args,
    delivered: u64,
    failed: u64,
    hist: &Histogram<u64>,
    cpu: f64,
    peak: u64,
) -> Figure {
    let secs = args.duration as f64;
    Figure {
        mode,
        pairs: args.pairs,
        window: args.window,
        payload_bytes: args.size,
        seconds: secs,
        delivered,
        failed,
        messages_per_sec: delivered as f64 / secs,
        payload_mb_per_sec: delivered as f64 * args.size as f64 / secs / 1e6,
        latency_us: Percentiles::of(hist),
        relay_cpu_us_per_msg: if delivered > 0 {
            cpu * 1e6 / delivered as f64
        } else {
            f64::NAN
        },
        relay_peak_rss_kib: peak,
    }
}

async fn end_to_end(args: &Args, bin: &std::path::Path) -> Result<Figure> {
    crate::e2e::run(args, bin).await
}

mod e2e;

fn print_table(figures: &[Figure]) {
    println!(
        "{:<9} {:>5} {:>6} {:>7} {:>10} {:>11} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}",
        "mode",
        "pairs",
        "window",
        "bytes",
        "delivered",
        "msg/s",
        "MB/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "relay µs",
        "peak RSS"
    );
    for f in figures {
        println!(
            "{:<9} {:>5} {:>6} {:>7} {:>10} {:>11.0} {:>9.2} {:>8} {:>8} {:>8} {:>8} {:>9.2} {:>7} MiB",
            format!("{:?}", f.mode).to_lowercase(),
            f.pairs,
            f.window,
            f.payload_bytes,
            f.delivered,
            f.messages_per_sec,
            f.payload_mb_per_sec,
            f.latency_us.p50,
            f.latency_us.p90,
            f.latency_us.p99,
            f.latency_us.p999,
            f.relay_cpu_us_per_msg,
            f.relay_peak_rss_kib / 1024
        );
        if f.failed > 0 {
            println!("  ({} messages failed with an explicit error)", f.failed);
        }
    }
    println!(
        "relay µs = relay CPU time (user+system) per delivered message; latency = send→receipt"
    );
}
