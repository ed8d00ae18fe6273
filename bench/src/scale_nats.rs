//! The `scale` shape on NATS, for the side by side: `nats-server` as our
//! child, one `async-nats` client (one TCP connection) per instance, each
//! subscribed to its own subject and to its own reply subject before
//! anything is measured. Then the same readings as for the relay: server
//! memory before any connection and with every connection held idle, idle
//! CPU, and the same ring for the same seconds (every instance sends to
//! the next one, one request in flight each, the receiver answers with a
//! 40-byte reply as in the main bench).
//!
//! What differs from the relay's side: these clients sign nothing and check
//! nothing (NATS has no per-message authentication to check), so the bench
//! CPU figures are not comparable; the server's are.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::{Client, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::nats::NatsServer;

/// How long one request may wait for its reply (as the relay side's send
/// timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What `scale` measured on NATS.
#[derive(Debug, Default, Serialize)]
pub(crate) struct NatsScale {
    pub connected: usize,
    pub connect_failures: usize,
    pub connect_secs: f64,
    pub server_rss_before_kib: u64,
    pub server_rss_connected_kib: u64,
    /// (RSS with every connection idle − RSS before) / connected.
    pub kib_per_connection: f64,
    pub server_cpu_idle_cores: f64,
    pub exchange_secs: f64,
    pub receipts_in_window: u64,
    pub msg_per_sec: f64,
    pub elapsed_secs: f64,
    pub receipts_total: u64,
    pub msg_per_sec_overall: f64,
    pub errors: u64,
    pub timeouts: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub server_cpu_us_per_msg: f64,
    pub server_cpu_us_per_msg_above_idle: f64,
    /// TCP segments sent on the machine per reply (see `netstat`).
    pub packets_per_msg: Option<f64>,
    pub server_peak_rss_kib: u64,
}

fn subject(i: usize) -> Subject {
    Subject::from(format!("scale.{i}"))
}

fn reply_subject(i: usize) -> Subject {
    Subject::from(format!("scale.reply.{i}"))
}

/// One connected instance: its client and its reply subscription.
struct Instance {
    client: Client,
    replies: async_nats::Subscriber,
}

async fn connect_one(
    port: u16,
    i: usize,
) -> Result<(Instance, tokio::task::JoinHandle<Result<()>>)> {
    let client = crate::nats::connect(port).await?;
    let requests = client.subscribe(subject(i)).await?;
    let replies = client.subscribe(reply_subject(i)).await?;
    client.flush().await?;
    // The main bench's receiver: a 40-byte reply per request.
    let responder = tokio::spawn(crate::nats::receiver(client.clone(), requests));
    Ok((Instance { client, replies }, responder))
}

/// Run the scale shape on NATS with `instances` connections (connected
/// `concurrency` at a time), holding them `hold` before the memory reading,
/// then the ring for `secs` with `size`-byte requests.
pub(crate) async fn run(
    bin: &std::path::Path,
    instances: usize,
    concurrency: usize,
    hold: Duration,
    secs: u64,
    size: usize,
) -> Result<NatsScale> {
    let server = NatsServer::start(bin, size + 1024)?;
    let watch = server.watch();
    let mut r = NatsScale::default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.server_rss_before_kib = watch.rss_kib();
    eprintln!("scale nats: connecting {instances} clients");
    let t = Instant::now();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..instances {
        let permit = sem.clone().acquire_owned().await?;
        let port = server.port;
        tasks.spawn(async move {
            let _permit = permit;
            (i, connect_one(port, i).await)
        });
    }
    let mut conns: Vec<Option<Instance>> = (0..instances).map(|_| None).collect();
    let mut responders = Vec::with_capacity(instances);
    let mut first_error = None;
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok((i, Ok((inst, responder)))) => {
                conns[i] = Some(inst);
                responders.push(responder);
            }
            Ok((_, Err(e))) => {
                r.connect_failures += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                r.connect_failures += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    r.connect_secs = t.elapsed().as_secs_f64();
    r.connected = conns.iter().filter(|c| c.is_some()).count();
    if let Some(e) = first_error {
        eprintln!(
            "scale nats: {} connections failed, first: {e}",
            r.connect_failures
        );
    }
    tokio::time::sleep(hold).await;
    r.server_rss_connected_kib = watch.rss_kib();
    r.kib_per_connection = r
        .server_rss_connected_kib
        .saturating_sub(r.server_rss_before_kib) as f64
        / r.connected.max(1) as f64;
    let cpu0 = watch.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.server_cpu_idle_cores = watch.cpu_seconds() - cpu0;
    eprintln!(
        "scale nats: {} connected in {:.2} s, {:.1} KiB per connection; exchanging for {secs} s",
        r.connected, r.connect_secs, r.kib_per_connection
    );

    let live: Vec<(usize, Instance)> = conns
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|c| (i, c)))
        .collect();
    let m = live.len();
    if m < 2 {
        // A ring needs two; the connect failures above say why.
        anyhow::bail!("only {m} of {instances} NATS clients connected: no ring to run");
    }
    let order: Vec<usize> = live.iter().map(|(i, _)| *i).collect();
    let tally = Arc::new(crate::load::RingTally::new());
    let (errors, timeouts) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let payload = Bytes::from(vec![0x5au8; size.max(8)]);
    let cpu0 = watch.cpu_seconds();
    let packets = crate::netstat::PacketMeter::start();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut jobs = tokio::task::JoinSet::new();
    for (k, (i, mut inst)) in live.into_iter().enumerate() {
        let next = subject(order[(k + 1) % m]);
        let reply_to = reply_subject(i);
        let (payload, tally, errors, timeouts) = (
            payload.clone(),
            tally.clone(),
            errors.clone(),
            timeouts.clone(),
        );
        jobs.spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                if inst
                    .client
                    .publish_with_reply(next.clone(), reply_to.clone(), payload.clone())
                    .await
                    .is_err()
                {
                    errors.fetch_add(1, Relaxed);
                    break;
                }
                match tokio::time::timeout(REQUEST_TIMEOUT, inst.replies.next()).await {
                    Ok(Some(_)) => tally.receipt(t, end, &mut lat),
                    Ok(None) => {
                        errors.fetch_add(1, Relaxed);
                        break;
                    }
                    Err(_) => {
                        timeouts.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
            tally.record(lat);
            inst
        });
    }
    let mut kept = Vec::with_capacity(m);
    while let Some(j) = jobs.join_next().await {
        if let Ok(inst) = j {
            kept.push(inst);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = watch.cpu_seconds() - cpu0;
    let packets = packets.stop();
    let (in_window, total, h) = tally.finish();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    r.exchange_secs = secs as f64;
    r.receipts_in_window = in_window;
    r.msg_per_sec = r.receipts_in_window as f64 / secs.max(1) as f64;
    r.elapsed_secs = elapsed;
    r.receipts_total = total;
    r.msg_per_sec_overall = r.receipts_total as f64 / elapsed.max(1e-9);
    r.errors = errors.load(Relaxed);
    r.timeouts = timeouts.load(Relaxed);
    r.p50_ms = ms(0.5);
    r.p99_ms = ms(0.99);
    r.p999_ms = ms(0.999);
    r.max_ms = h.max() as f64 / 1e3;
    let per = |c: f64| c * 1e6 / r.receipts_total.max(1) as f64;
    r.server_cpu_us_per_msg = per(cpu);
    r.server_cpu_us_per_msg_above_idle = per((cpu - r.server_cpu_idle_cores * elapsed).max(0.0));
    r.packets_per_msg = packets.map(|p| p as f64 / r.receipts_total.max(1) as f64);
    r.server_peak_rss_kib = watch.peak_rss_kib();
    for t in responders {
        t.abort();
    }
    drop(kept);
    drop(server);
    Ok(r)
}

/// The report's lines for NATS, under the relay's.
pub(crate) fn print(r: &NatsScale) {
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "  nats-server    {} connected, {} failed, {:.2} s; RSS {:.1} MiB before, {:.1} MiB connected → {:.1} KiB per connection; idle CPU {:.2} cores",
        r.connected,
        r.connect_failures,
        r.connect_secs,
        mib(r.server_rss_before_kib),
        mib(r.server_rss_connected_kib),
        r.kib_per_connection,
        r.server_cpu_idle_cores
    );
    println!(
        "                 ring, {:.0} s: {:.0} msg/s in the window; {} replies in {:.1} s = {:.0} msg/s; {} errors, {} timed out",
        r.exchange_secs, r.msg_per_sec, r.receipts_total, r.elapsed_secs, r.msg_per_sec_overall, r.errors, r.timeouts
    );
    println!(
        "                 latency p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; server CPU {:.1} µs/msg ({:.1} above its idle cost); {} packets/msg; peak RSS {:.1} MiB",
        r.p50_ms,
        r.p99_ms,
        r.p999_ms,
        r.max_ms,
        r.server_cpu_us_per_msg,
        r.server_cpu_us_per_msg_above_idle,
        r.packets_per_msg.map_or_else(|| "—".into(), |p| format!("{p:.2}")),
        mib(r.server_peak_rss_kib)
    );
}
