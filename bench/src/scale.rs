//! `agent-link-bench scale`: many instances on one relay.
//!
//! Starts the relay binary, registers `--instances` generated instances with
//! one `agent-link-relay register --batch` (one registry write), writes
//! their peer directories offline, then connects them with the `agent-link`
//! library (`AgentLink::connect` + `attach`, each link its own UDP socket)
//! with bounded concurrency. It reads the relay's resident memory before any
//! connection, after 1,000 and after all of them (after a short idle hold),
//! asks the relay for its `Status` listing with every instance registered,
//! then lets every instance send to the next one (a ring) for
//! `--exchange-secs` and counts receipts and errors.
//!
//! The bench process hosts every peer, so its own memory and CPU are
//! reported too: per link the library runs a supervisor task, a quinn
//! endpoint and connection driver, and an agent task, which on two shared
//! cores is a large part of what the bench measures while it holds 10,000
//! links.
//!
//! Then, when `nats-server` is found, the same shape on NATS
//! ([`crate::scale_nats`]): as many client connections, the same memory and
//! idle readings and the same ring, for the side by side.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_link::config::{PeerConfig, CONFIG_FILE, KEY_FILE, SECRET_FILE};
use agent_link::{Agent, AgentLink, JoinToken};
use agent_link_crypto::Identity;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::relay_proc::{register_batch, ProcWatch, RelayProcess};

#[derive(clap::Args, Debug)]
pub(crate) struct ScaleArgs {
    /// Instances (each one QUIC connection with its own UDP socket)
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Receiving agents attached per instance
    #[arg(long, default_value_t = 1)]
    agents_per_instance: usize,
    /// Connections being set up at once
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds every instance sends to the next one (ring), one message in
    /// flight per instance; 0 skips the exchange
    #[arg(long, default_value_t = 5)]
    exchange_secs: u64,
    /// Seconds to hold every connection idle before the memory reading
    #[arg(long, default_value_t = 2)]
    hold_secs: u64,
    /// Payload bytes of the exchange
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Where the relay and peer directories go (default: /dev/shm when it
    /// exists, so 30,000 fsynced key files do not dominate, else the temp dir)
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Also write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(flatten)]
    nats: crate::nats::NatsArgs,
}

/// Relay memory at one point.
#[derive(Debug, Serialize)]
struct RssPoint {
    connected: usize,
    relay_rss_kib: u64,
    /// (RSS − RSS before any connection) / connected.
    kib_per_connection: f64,
}

#[derive(Debug, Default, Serialize)]
struct Exchange {
    seconds: f64,
    senders: usize,
    /// Receipts that arrived within the exchange window.
    receipts_in_window: u64,
    msg_per_sec: f64,
    /// Wall time until every sender's last message had its outcome.
    elapsed_secs: f64,
    /// All receipts over `elapsed_secs`.
    msg_per_sec_overall: f64,
    /// All receipts, including in-flight sends completed after the window.
    receipts_total: u64,
    /// Messages handed to receiving agents (verified).
    received: u64,
    errors: u64,
    errors_by_kind: std::collections::BTreeMap<String, u64>,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    relay_cpu_us_per_msg: f64,
    bench_cpu_us_per_msg: f64,
    /// UDP datagrams sent on the machine per receipt (see `netstat`).
    packets_per_msg: Option<f64>,
    /// Relay CPU per receipt beyond what it spends holding the connections
    /// idle (keep-alives, timers: `relay_cpu_idle_cores` over the same time).
    relay_cpu_us_per_msg_above_idle: f64,
    /// Datagrams the kernel dropped for full socket receive buffers (all
    /// UDP sockets of the machine, from /proc/net/snmp).
    udp_rcvbuf_drops: u64,
}

#[derive(Debug, Default, Serialize)]
struct ScaleReport {
    instances: usize,
    agents_per_instance: usize,
    connect_concurrency: usize,
    register_batch_secs: f64,
    peer_dirs_secs: f64,
    connected: usize,
    connect_failures: usize,
    connect_errors: Vec<String>,
    connect_secs: f64,
    connects_per_sec: f64,
    /// UDP datagrams dropped for full receive buffers while connecting
    /// (machine-wide, /proc/net/snmp `RcvbufErrors`).
    udp_rcvbuf_drops_connect: u64,
    relay_rss_before_kib: u64,
    rss: Vec<RssPoint>,
    /// KiB per idle connection at all instances (the headline figure).
    kib_per_connection: f64,
    relay_cpu_idle_cores: f64,
    bench_cpu_idle_cores: f64,
    bench_rss_kib: u64,
    bench_kib_per_link: f64,
    status_ok: bool,
    status_instances: usize,
    status_ms: f64,
    status_error: Option<String>,
    exchange: Option<Exchange>,
    relay_peak_rss_kib: u64,
    bench_peak_rss_kib: u64,
    /// The same shape on nats-server, when it ran.
    nats: Option<crate::scale_nats::NatsScale>,
}

/// One connected instance.
struct Conn {
    link: AgentLink,
    agents: Vec<Agent>,
}

fn instance_id(i: usize) -> String {
    format!("scale-{i:05}")
}

/// Descriptors this process has open (0 where `/proc` is not readable).
fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Soft limit of open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Write the peer directory `agent-link init` would leave, without the
/// online registration (the relay already knows the key).
fn write_peer_dir(dir: &Path, id: &str, identity: &Identity, token: &JoinToken) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    identity.write_new(&dir.join(KEY_FILE))?;
    token
        .fleet_secret()
        .expect("an open fleet token")
        .write_new(&dir.join(SECRET_FILE))?;
    let cfg = PeerConfig::new(
        &token.addr,
        &hex_encode(&token.pinned().expect("a pinned relay")),
        id,
        id,
    );
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&cfg)?)?;
    Ok(())
}

/// Machine-wide UDP datagrams dropped because a socket's receive buffer was
/// full (`Udp: RcvbufErrors` in /proc/net/snmp).
fn udp_rcvbuf_errors() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/net/snmp") else {
        return 0;
    };
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) async fn run(args: ScaleArgs) -> Result<()> {
    let n = args.instances;
    if n == 0 || args.agents_per_instance == 0 || args.connect_concurrency == 0 {
        bail!("--instances, --agents-per-instance and --connect-concurrency must be at least 1");
    }
    if args.size < 8 {
        bail!("--size must be at least 8 bytes");
    }
    // Every link holds one UDP socket in this process; the relay is a
    // separate process with its own limit (it needs one socket in all).
    let need = n as u64 + 256;
    match open_files_limit() {
        Some(limit) if limit < need => bail!(
            "{n} instances need about {need} open files in this process (one UDP socket per \
             instance), but the soft limit is {limit}: raise it (`ulimit -n {need}`, up to the \
             hard limit `ulimit -Hn`) or lower --instances"
        ),
        _ => {}
    }
    let relay_bin = crate::relay_proc::relay_binary(args.relay_bin.as_deref())?;
    let nats_bin = args.nats.server()?;
    let base = match &args.work_dir {
        Some(d) => d.clone(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    let tmp = tempfile::Builder::new()
        .prefix("al-scale-")
        .tempdir_in(&base)
        .with_context(|| format!("temp dir in {}", base.display()))?;
    let relay_dir = tmp.path().join("relay");
    let mut report = ScaleReport {
        instances: n,
        agents_per_instance: args.agents_per_instance,
        connect_concurrency: args.connect_concurrency,
        ..Default::default()
    };

    eprintln!("scale: generating {n} instance keys");
    let identities: Vec<Identity> = (0..n).map(|_| Identity::generate()).collect();
    let mut batch = String::with_capacity(n * 80);
    for (i, id) in identities.iter().enumerate() {
        batch.push_str(&format!("{} {}\n", instance_id(i), id.public_key()));
    }
    let batch_file = tmp.path().join("register.txt");
    std::fs::write(&batch_file, &batch)?;

    // Register before the relay starts, so it loads the whole registry
    // once and the "before" reading already includes it.
    let max_conns = (n as u64 + 64).max(16_384);
    // Every instance connects from 127.0.0.1: one source address, so the
    // per-source handshake rate is lifted to the relay-wide one.
    let config = serde_json::json!({
        "max_connections": max_conns,
        "handshakes_per_sec_per_ip": 2_000,
    });
    let mut reg_secs = 0.0;
    let relay = RelayProcess::start_with(&relay_bin, &relay_dir, &config, |dir| {
        let t = Instant::now();
        register_batch(&relay_bin, dir, &batch_file)?;
        reg_secs = t.elapsed().as_secs_f64();
        Ok(())
    })?;
    report.register_batch_secs = reg_secs;
    eprintln!(
        "scale: registered {n} instances in one registry write in {:.2} s; relay at {}",
        reg_secs, relay.addr
    );
    let watch = relay.watch();
    let me = ProcWatch(std::process::id());
    let result = drive(
        &args,
        &mut report,
        &relay,
        watch,
        me,
        tmp.path(),
        identities,
    )
    .await;
    report.relay_peak_rss_kib = watch.peak_rss_kib();
    report.bench_peak_rss_kib = me.peak_rss_kib();
    relay.stop();
    result?;
    if let Some(bin) = &nats_bin {
        // After the relay's run, with its links gone: one server at a time.
        // Closing links end their sockets in the background; NATS needs as
        // many descriptors again, so wait (bounded) until they are released.
        let until = Instant::now() + Duration::from_secs(30);
        while open_files() > 512 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if open_files() > 512 {
            eprintln!(
                "scale: {} descriptors still open from the relay's run; some NATS connections may fail",
                open_files()
            );
        }
        report.nats = Some(
            crate::scale_nats::run(
                bin,
                n,
                args.connect_concurrency,
                Duration::from_secs(args.hold_secs),
                args.exchange_secs,
                args.size,
            )
            .await?,
        );
    }
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn drive(
    args: &ScaleArgs,
    report: &mut ScaleReport,
    relay: &RelayProcess,
    watch: ProcWatch,
    me: ProcWatch,
    base: &Path,
    identities: Vec<Identity>,
) -> Result<()> {
    let n = args.instances;
    let token = JoinToken::parse(&relay.token).context("the relay's join token")?;
    let t = Instant::now();
    let dirs: Vec<PathBuf> = (0..n).map(|i| base.join(instance_id(i))).collect();
    {
        // Two threads: the files are small, the syscalls are the cost.
        let identities = Arc::new(identities);
        let dirs = Arc::new(dirs.clone());
        let mut jobs = Vec::new();
        for part in 0..2usize {
            let (identities, dirs, token) = (identities.clone(), dirs.clone(), token.clone());
            jobs.push(tokio::task::spawn_blocking(move || -> Result<()> {
                for i in (part..dirs.len()).step_by(2) {
                    write_peer_dir(&dirs[i], &instance_id(i), &identities[i], &token)?;
                }
                Ok(())
            }));
        }
        for j in jobs {
            j.await??;
        }
    }
    report.peer_dirs_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "scale: wrote {n} peer directories in {:.2} s",
        report.peer_dirs_secs
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = watch.rss_kib();
    report.relay_rss_before_kib = rss0;
    let bench0 = me.rss_kib();
    eprintln!(
        "scale: relay RSS before any connection: {:.1} MiB",
        mib(rss0)
    );

    let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let mut errors: Vec<String> = Vec::new();
    let mut connect_time = Duration::ZERO;
    let first = n.min(1000);
    let drops0 = udp_rcvbuf_errors();
    let mut phases = Vec::with_capacity(2);
    phases.push(0..first);
    if first < n {
        phases.push(first..n);
    }
    for range in phases {
        let t = Instant::now();
        connect_range(args, &dirs, range.clone(), &mut conns, &mut errors).await;
        connect_time += t.elapsed();
        let connected = conns.iter().filter(|c| c.is_some()).count();
        // Let the relay finish the handshakes' leftovers before reading.
        tokio::time::sleep(Duration::from_secs(if range.end == n {
            args.hold_secs
        } else {
            1
        }))
        .await;
        let rss = watch.rss_kib();
        let per = (rss.saturating_sub(rss0)) as f64 / connected.max(1) as f64;
        eprintln!(
            "scale: {connected} connected: relay RSS {:.1} MiB, {per:.1} KiB per connection",
            mib(rss)
        );
        report.rss.push(RssPoint {
            connected,
            relay_rss_kib: rss,
            kib_per_connection: per,
        });
    }
    report.udp_rcvbuf_drops_connect = udp_rcvbuf_errors().saturating_sub(drops0);
    report.connected = conns.iter().filter(|c| c.is_some()).count();
    report.connect_failures = n - report.connected;
    errors.truncate(10);
    report.connect_errors = errors;
    report.connect_secs = connect_time.as_secs_f64();
    report.connects_per_sec = report.connected as f64 / report.connect_secs.max(1e-9);
    report.kib_per_connection = report.rss.last().map_or(0.0, |p| p.kib_per_connection);

    // Idle cost while holding: CPU of both processes over one second.
    let (r0, b0) = (watch.cpu_seconds(), me.cpu_seconds());
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.relay_cpu_idle_cores = watch.cpu_seconds() - r0;
    report.bench_cpu_idle_cores = me.cpu_seconds() - b0;
    report.bench_rss_kib = me.rss_kib();
    report.bench_kib_per_link =
        report.bench_rss_kib.saturating_sub(bench0) as f64 / report.connected.max(1) as f64;

    // The Status frame lists every registered instance.
    if let Some(c) = conns.iter().flatten().next() {
        let t = Instant::now();
        match c.link.status().await {
            Ok(st) => {
                report.status_ok = true;
                report.status_instances = st.instances.len();
                report.status_ms = t.elapsed().as_secs_f64() * 1e3;
            }
            Err(e) => report.status_error = Some(e.to_string()),
        }
        eprintln!(
            "scale: status: {}",
            match &report.status_error {
                None => format!(
                    "{} instances listed in {:.1} ms",
                    report.status_instances, report.status_ms
                ),
                Some(e) => format!("FAILED: {e}"),
            }
        );
    }

    if args.exchange_secs > 0 && report.connected >= 2 {
        let idle = report.relay_cpu_idle_cores;
        report.exchange = Some(exchange(args, conns, watch, me, idle).await?);
    } else {
        drop(conns);
    }
    Ok(())
}

/// Connect instances `range` with at most `--connect-concurrency` at once,
/// printing progress every second.
async fn connect_range(
    args: &ScaleArgs,
    dirs: &[PathBuf],
    range: std::ops::Range<usize>,
    conns: &mut [Option<Conn>],
    errors: &mut Vec<String>,
) {
    let sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let total = range.len();
    let start = Instant::now();
    let progress = {
        let (done, failed) = (done.clone(), failed.clone());
        let from = range.start;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Relaxed);
                eprintln!(
                    "scale: connecting {}/{} ({:.0}/s), failed {}",
                    from + d,
                    from + total,
                    d as f64 / start.elapsed().as_secs_f64(),
                    failed.load(Relaxed)
                );
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in range {
        let permit = sem.clone().acquire_owned().await;
        let dir = dirs[i].clone();
        let agents = args.agents_per_instance;
        let (done, failed) = (done.clone(), failed.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let r = async {
                let link = AgentLink::connect(&dir).await?;
                let mut list = Vec::with_capacity(agents);
                for a in 0..agents {
                    list.push(link.attach(&format!("rx{a}")).await?);
                }
                Ok::<_, agent_link::LinkError>(Conn { link, agents: list })
            }
            .await;
            match &r {
                Ok(_) => done.fetch_add(1, Relaxed),
                Err(_) => failed.fetch_add(1, Relaxed),
            };
            (i, r)
        });
        // Collect finished ones as we go (bounded memory of results).
        while let Some(res) = tasks.try_join_next() {
            store(res, conns, errors);
        }
    }
    while let Some(res) = tasks.join_next().await {
        store(res, conns, errors);
    }
    progress.abort();
    eprintln!(
        "scale: connected {} of {total} in {:.2} s ({:.0}/s), failed {}",
        done.load(Relaxed),
        start.elapsed().as_secs_f64(),
        done.load(Relaxed) as f64 / start.elapsed().as_secs_f64(),
        failed.load(Relaxed)
    );
}

type ConnResult = (usize, Result<Conn, agent_link::LinkError>);

fn store(
    res: Result<ConnResult, tokio::task::JoinError>,
    conns: &mut [Option<Conn>],
    errors: &mut Vec<String>,
) {
    match res {
        Ok((i, Ok(c))) => conns[i] = Some(c),
        Ok((i, Err(e))) => {
            if errors.len() < 100 {
                errors.push(format!("{}: {e}", instance_id(i)));
            }
        }
        Err(e) => errors.push(format!("connect task: {e}")),
    }
}

/// Every connected instance sends to the next connected one (ring), one
/// message in flight each, for `--exchange-secs`.
async fn exchange(
    args: &ScaleArgs,
    conns: Vec<Option<Conn>>,
    watch: ProcWatch,
    me: ProcWatch,
    relay_idle_cores: f64,
) -> Result<Exchange> {
    let live: Vec<(usize, Conn)> = conns
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| c.map(|c| (i, c)))
        .collect();
    let received = Arc::new(AtomicU64::new(0));
    // The first receiving agent of each instance also sends (a second,
    // send-only agent per instance would double the library's per-agent
    // tasks, which are what limits this bench); further agents only
    // receive, drained by a handler.
    let mut handlers = Vec::new();
    let mut links = Vec::with_capacity(live.len());
    let mut senders = Vec::with_capacity(live.len());
    for (i, c) in live {
        let mut agents = c.agents.into_iter();
        // The first agent sends (from its own task) and receives (in a
        // handler): a receipt comes only once the receiver has taken the
        // message, so receiving must not wait behind sending.
        senders.push(agents.next().map(|a| {
            let tx = a.sender();
            let received = received.clone();
            handlers.push(a.on_message(move |_| {
                received.fetch_add(1, Relaxed);
            }));
            tx
        }));
        for a in agents {
            let received = received.clone();
            handlers.push(a.on_message(move |_| {
                received.fetch_add(1, Relaxed);
            }));
        }
        links.push((i, c.link));
    }
    let m = links.len();
    let agents = args.agents_per_instance;
    let payload = Bytes::from(vec![b'x'; args.size]);
    let tally = Arc::new(crate::load::RingTally::new());
    let errors = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let secs = args.exchange_secs;
    eprintln!("scale: exchanging for {secs} s ({m} senders, ring)");
    let (r0, b0) = (watch.cpu_seconds(), me.cpu_seconds());
    let packets = crate::netstat::PacketMeter::start();
    let drops0 = udp_rcvbuf_errors();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut jobs = tokio::task::JoinSet::new();
    let mut active = 0usize;
    for (k, sender) in senders.into_iter().enumerate() {
        let Some(sender) = sender else { continue };
        active += 1;
        let next = links[(k + 1) % m].0;
        let (payload, tally, errors) = (payload.clone(), tally.clone(), errors.clone());
        jobs.spawn(async move {
            let mut j = 0usize;
            let mut lat = Vec::new();
            while Instant::now() < end {
                let to = format!("{}/rx{}", instance_id(next), j % agents);
                j += 1;
                let t = Instant::now();
                match sender
                    .send_with_timeout(&to, payload.clone(), Duration::from_secs(15))
                    .await
                {
                    Ok(_) => tally.receipt(t, end, &mut lat),
                    Err(e) => {
                        let kind = format!("{e:?}");
                        let kind = kind
                            .split(['(', ' ', '{'])
                            .next()
                            .unwrap_or("?")
                            .to_string();
                        *errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(match e {
                                agent_link::SendError::Refused(c) => format!("Refused({c:?})"),
                                _ => kind,
                            })
                            .or_default() += 1;
                    }
                }
            }
            tally.record(lat);
            drop(sender);
        });
    }
    while jobs.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let relay_cpu = watch.cpu_seconds() - r0;
    let bench_cpu = me.cpu_seconds() - b0;
    let packets = packets.stop();
    // The last messages' handlers, before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let udp_rcvbuf_drops = udp_rcvbuf_errors().saturating_sub(drops0);
    // Let the last deliveries reach their handlers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (receipts_in_window, receipts_total, h) = tally.finish();
    let errors_by_kind = std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let ex = Exchange {
        seconds: secs as f64,
        senders: active,
        receipts_in_window,
        msg_per_sec: receipts_in_window as f64 / secs as f64,
        elapsed_secs: elapsed,
        msg_per_sec_overall: receipts_total as f64 / elapsed.max(1e-9),
        receipts_total,
        received: received.load(Relaxed),
        errors: errors_by_kind.values().sum(),
        errors_by_kind,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1e3,
        relay_cpu_us_per_msg: relay_cpu * 1e6 / receipts_total.max(1) as f64,
        bench_cpu_us_per_msg: bench_cpu * 1e6 / receipts_total.max(1) as f64,
        packets_per_msg: packets.map(|p| p as f64 / receipts_total.max(1) as f64),
        relay_cpu_us_per_msg_above_idle: (relay_cpu - relay_idle_cores * elapsed).max(0.0) * 1e6
            / receipts_total.max(1) as f64,
        udp_rcvbuf_drops,
    };
    eprintln!(
        "scale: exchange done in {elapsed:.1} s: {} receipts, {} errors",
        ex.receipts_total, ex.errors
    );
    for h in handlers {
        h.abort();
    }
    drop(links);
    Ok(ex)
}

fn print_report(r: &ScaleReport) {
    println!(
        "scale: {} instances × {} receiving agent(s), connect concurrency {}",
        r.instances, r.agents_per_instance, r.connect_concurrency
    );
    println!(
        "  registration   one `register --batch` write: {:.2} s; peer dirs written in {:.2} s",
        r.register_batch_secs, r.peer_dirs_secs
    );
    println!(
        "  connect        {} connected, {} failed, {:.2} s → {:.0} instances/s; {} UDP datagrams dropped (full receive buffers)",
        r.connected, r.connect_failures, r.connect_secs, r.connects_per_sec, r.udp_rcvbuf_drops_connect
    );
    for e in &r.connect_errors {
        println!("    error: {e}");
    }
    println!(
        "  relay RSS      {:.1} MiB before any connection",
        mib(r.relay_rss_before_kib)
    );
    for p in &r.rss {
        println!(
            "                 {:.1} MiB at {} connected → {:.1} KiB per connection",
            mib(p.relay_rss_kib),
            p.connected,
            p.kib_per_connection
        );
    }
    println!(
        "  idle CPU       relay {:.2} cores, bench {:.2} cores (while holding every connection)",
        r.relay_cpu_idle_cores, r.bench_cpu_idle_cores
    );
    println!(
        "  bench process  RSS {:.1} MiB ({:.1} KiB per link it hosts), peak {:.1} MiB",
        mib(r.bench_rss_kib),
        r.bench_kib_per_link,
        mib(r.bench_peak_rss_kib)
    );
    match &r.status_error {
        None => println!(
            "  status         ok: {} instances listed in {:.1} ms",
            r.status_instances, r.status_ms
        ),
        Some(e) => println!("  status         FAILED: {e}"),
    }
    if let Some(x) = &r.exchange {
        println!(
            "  exchange       {} senders, ring, {:.0} s: {:.0} msg/s in the window ({} receipts); {} receipts in {:.1} s until the last outcome = {:.0} msg/s; {} received, {} errors",
            x.senders, x.seconds, x.msg_per_sec, x.receipts_in_window, x.receipts_total, x.elapsed_secs, x.msg_per_sec_overall, x.received, x.errors
        );
        for (k, v) in &x.errors_by_kind {
            println!("    {k}: {v}");
        }
        println!(
            "                 latency p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms; relay CPU {:.1} µs/msg ({:.1} above its idle cost), bench CPU {:.1} µs/msg; {} packets/msg; {} UDP datagrams dropped",
            x.p50_ms, x.p99_ms, x.p999_ms, x.max_ms, x.relay_cpu_us_per_msg, x.relay_cpu_us_per_msg_above_idle, x.bench_cpu_us_per_msg,
            x.packets_per_msg.map_or_else(|| "—".into(), |p| format!("{p:.2}")), x.udp_rcvbuf_drops
        );
    }
    println!("  relay peak RSS {:.1} MiB", mib(r.relay_peak_rss_kib));
    if let Some(n) = &r.nats {
        crate::scale_nats::print(n);
    }
}
