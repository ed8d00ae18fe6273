//! `agent-link-bench flood`: forged QUIC Initials at a set rate (from one
//! process, as from spoofed addresses: the flood never reads what the relay
//! answers) against a relay process, while registered members connect. It
//! reports each member's time from its first attempt to an attached agent
//! (connect, admission, `Attach` answered), its attempts, and the relay's
//! peak memory (VmHWM) — issue 14, finding 3, whose acceptance figure is:
//! under a 26,000/s flood every one of 8 members connects within 5 s and
//! the relay stays under 256 MiB.
//!
//! A refused member tries again every 200 ms (the library backs off
//! longer; this measures when the relay first lets it in).

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link_crypto::Identity;
use agent_link_faults::initials::{self, FloodCount, InitialForge};
use agent_link_proto::JoinToken;
use anyhow::{bail, Context, Result};

use crate::raw::RawConn;
use crate::relay_proc::{register_batch, ProcWatch, RelayProcess};

#[derive(clap::Args, Debug)]
pub struct FloodArgs {
    /// Forged Initials per second, in total
    #[arg(long, default_value_t = 26_000.0)]
    rate: f64,
    /// Sending threads (each its own UDP socket), sharing the rate
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Registered members that connect during the flood
    #[arg(long, default_value_t = 8)]
    members: usize,
    /// Seconds of flood before the members start connecting
    #[arg(long, default_value_t = 3)]
    lead: u64,
    /// Seconds a member keeps trying before it counts as locked out
    #[arg(long, default_value_t = 30)]
    give_up: u64,
    /// Seconds the flood goes on after the last member is done (memory
    /// keeps growing while half-open handshakes pile up)
    #[arg(long, default_value_t = 5)]
    tail: u64,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<std::path::PathBuf>,
    /// Also write the results as JSON here
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, serde::Serialize)]
struct Member {
    connected: bool,
    secs: f64,
    attempts: u32,
}

#[derive(Debug, serde::Serialize)]
struct FloodReport {
    rate_asked: f64,
    rate_sent: f64,
    send_errors: u64,
    members: Vec<Member>,
    relay_peak_rss_kib: u64,
    relay_rss_kib_at_end: u64,
}

fn member_id(i: usize) -> String {
    format!("member-{i:02}")
}

pub async fn run(args: FloodArgs) -> Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) || args.threads == 0 || args.members == 0 {
        bail!("--rate, --threads and --members must be positive");
    }
    let relay_bin = crate::relay_proc::relay_binary(args.relay_bin.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let identities: Vec<Identity> = (0..args.members).map(|_| Identity::generate()).collect();
    let batch: String = identities
        .iter()
        .enumerate()
        .map(|(i, id)| format!("{} {}\n", member_id(i), id.public_key()))
        .collect();
    let batch_file = tmp.path().join("register.txt");
    std::fs::write(&batch_file, batch)?;
    let relay = RelayProcess::start_with(
        &relay_bin,
        &tmp.path().join("relay"),
        &serde_json::json!({}),
        |dir| register_batch(&relay_bin, dir, &batch_file),
    )?;
    let token = JoinToken::parse(&relay.token)?;
    let watch = relay.watch();
    let result = drive(
        &args,
        relay.addr,
        token.pinned().expect("a pinned relay"),
        identities,
        watch,
    )
    .await;
    relay.stop();
    let report = result?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn drive(
    args: &FloodArgs,
    addr: std::net::SocketAddr,
    fingerprint: [u8; 32],
    identities: Vec<Identity>,
    watch: ProcWatch,
) -> Result<FloodReport> {
    let forge = Arc::new(InitialForge::new(
        agent_link_crypto::tls::ALPN,
        agent_link_crypto::tls::RELAY_SERVER_NAME,
    )?);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(FloodCount::default());
    let mut senders = Vec::new();
    for _ in 0..args.threads {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let (forge, stop, count) = (forge.clone(), stop.clone(), count.clone());
        let rate = args.rate / args.threads as f64;
        senders.push(std::thread::spawn(move || {
            initials::flood(&forge, &socket, addr, rate, &stop, &count)
        }));
    }
    let started = Instant::now();
    eprintln!(
        "flood: {} forged Initials/s at {addr}; members connect in {} s",
        args.rate, args.lead
    );
    tokio::time::sleep(Duration::from_secs(args.lead)).await;
    let give_up = Duration::from_secs(args.give_up);
    let mut set = tokio::task::JoinSet::new();
    for (i, identity) in identities.into_iter().enumerate() {
        set.spawn(async move {
            let t0 = Instant::now();
            let mut attempts = 0;
            while t0.elapsed() < give_up {
                attempts += 1;
                let attempt = tokio::time::timeout(Duration::from_secs(10), async {
                    let conn = RawConn::connect(addr, fingerprint, &identity).await?;
                    let agent = conn.attach("a", true).await?;
                    anyhow::Ok((conn, agent))
                })
                .await;
                match attempt {
                    Ok(Ok(held)) => {
                        let secs = t0.elapsed().as_secs_f64();
                        return (
                            i,
                            Member {
                                connected: true,
                                secs,
                                attempts,
                            },
                            Some(held),
                        );
                    }
                    Ok(Err(e)) => note_failure(i, attempts, &e),
                    Err(_) => eprintln!("flood: member {i} attempt {attempts} timed out"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let secs = t0.elapsed().as_secs_f64();
            (
                i,
                Member {
                    connected: false,
                    secs,
                    attempts,
                },
                None,
            )
        });
    }
    let mut members: Vec<Option<Member>> = (0..args.members).map(|_| None).collect();
    let mut held = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, m, h) = r?;
        members[i] = Some(m);
        held.push(h);
    }
    tokio::time::sleep(Duration::from_secs(args.tail)).await;
    stop.store(true, Ordering::Relaxed);
    let flooded = started.elapsed().as_secs_f64();
    for s in senders {
        s.join()
            .map_err(|_| anyhow::anyhow!("flood thread panicked"))??;
    }
    let report = FloodReport {
        rate_asked: args.rate,
        rate_sent: count.sent.load(Ordering::Relaxed) as f64 / flooded,
        send_errors: count.send_errors.load(Ordering::Relaxed),
        members: members.into_iter().flatten().collect(),
        relay_peak_rss_kib: watch.peak_rss_kib(),
        relay_rss_kib_at_end: watch.rss_kib(),
    };
    drop(held);
    Ok(report)
}

fn note_failure(i: usize, attempt: u32, e: &anyhow::Error) {
    if attempt <= 3 || attempt.is_multiple_of(10) {
        eprintln!("flood: member {i} attempt {attempt} failed: {e:#}");
    }
}

fn print_report(r: &FloodReport) {
    println!(
        "flood: {:.0} forged Initials/s sent ({:.0} asked, {} send errors)",
        r.rate_sent, r.rate_asked, r.send_errors
    );
    let connected = r.members.iter().filter(|m| m.connected).count();
    println!("  members connected  {connected} of {}", r.members.len());
    for (i, m) in r.members.iter().enumerate() {
        println!(
            "    {}  {}  {:.2} s, {} attempt(s)",
            member_id(i),
            if m.connected {
                "attached "
            } else {
                "LOCKED OUT"
            },
            m.secs,
            m.attempts
        );
    }
    let worst = r.members.iter().map(|m| m.secs).fold(0.0, f64::max);
    println!("  slowest member     {worst:.2} s");
    println!(
        "  relay memory       peak (VmHWM) {:.1} MiB, at the end {:.1} MiB",
        r.relay_peak_rss_kib as f64 / 1024.0,
        r.relay_rss_kib_at_end as f64 / 1024.0
    );
}
