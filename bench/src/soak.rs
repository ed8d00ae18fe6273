//! `agent-link-bench soak`: run agents through a real relay for a set time
//! under faults and reconcile every message id at the end (the engine lives
//! in `agent-link-faults`, shared with the fault tests). Exits non-zero on
//! any loss, duplicate, unexpected delivery or send without an outcome, or
//! when nothing got through.

use std::path::PathBuf;
use std::time::Duration;

use agent_link_faults::{soak, FaultPlan, Impairment, SoakConfig};
use anyhow::{bail, Result};
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Fault {
    /// SIGKILL the relay every --kill-every seconds, restart it on the same address (with
    /// --cluster: the fleet's relays in turn)
    #[value(alias = "relay-kill")]
    Kill,
    /// With --cluster: SIGKILL a NATS node (each in turn) every --kill-every seconds, restart
    /// it after --down-ms
    NatsKill,
    /// Random packet loss: nftables in a network namespace (needs root),
    /// else the UDP proxy
    Loss,
    /// Delay and jitter every datagram (UDP proxy)
    Delay,
    /// Duplicate datagrams (UDP proxy)
    Dup,
    /// Reorder datagrams (UDP proxy)
    Reorder,
}

#[derive(clap::Args, Debug)]
pub(crate) struct SoakArgs {
    /// Faults to inject, comma-separated
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,loss,delay,dup,reorder"
    )]
    faults: Vec<Fault>,
    /// Seconds of sending under faults
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Sender→receiver pairs (each side its own instance)
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Messages in flight per sender
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Messages per second offered over all senders (0: as fast as the window allows)
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Payload bytes
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Deadline of each send, seconds
    #[arg(long, default_value_t = 30)]
    send_timeout: u64,
    /// Seconds between SIGKILLs of the relay
    #[arg(long, default_value_t = 10)]
    kill_every: u64,
    /// Milliseconds the relay stays down after each SIGKILL
    #[arg(long, default_value_t = 1000)]
    down_ms: u64,
    /// Packet loss, percent each way
    #[arg(long, default_value_t = 5)]
    loss_pct: u32,
    /// Added delay, ms (plus up to the same again as jitter)
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
    /// Duplicated datagrams, percent
    #[arg(long, default_value_t = 5.0)]
    dup_pct: f64,
    /// Reordered (held back 30 ms) datagrams, percent
    #[arg(long, default_value_t = 5.0)]
    reorder_pct: f64,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Run a fleet of N relays on a 3-node nats-server cluster (JetStream) instead of one
    /// relay: pair k's sender on relay k mod N, its receiver on the next; faults kill and
    /// nats-kill only
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(2..=8))]
    cluster: Option<u8>,
    /// The nats-server binary for --cluster (default: PATH)
    #[arg(long)]
    nats_bin: Option<PathBuf>,
    /// Also write the reconciliation as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Run the soak; `Ok(true)` when the delivery promise held.
pub(crate) async fn run(args: SoakArgs) -> Result<bool> {
    if args.duration == 0 || args.pairs == 0 || args.window == 0 || args.size < 8 {
        bail!("--duration, --pairs and --window must be at least 1, --size at least 8");
    }
    let has = |f| args.faults.contains(&f);
    if args.cluster.is_some()
        && args
            .faults
            .iter()
            .any(|f| !matches!(f, Fault::Kill | Fault::NatsKill))
    {
        bail!("with --cluster, --faults takes relay-kill and nats-kill only");
    }
    if args.cluster.is_none() && has(Fault::NatsKill) {
        bail!("nats-kill needs --cluster");
    }
    let fleet = match args.cluster {
        None => None,
        Some(n) => Some(agent_link_faults::soak::FleetSoak {
            relays: usize::from(n),
            nats_bin: crate::nats::find_server(args.nats_bin.as_deref())
                .ok_or_else(|| anyhow::anyhow!("{}", crate::nats::INSTALL_HINT))?,
        }),
    };
    let mut proxy = Impairment::none();
    let mut use_proxy = false;
    if has(Fault::Delay) {
        proxy.delay = Duration::from_millis(args.delay_ms);
        proxy.jitter = Duration::from_millis(args.delay_ms);
        use_proxy = true;
    }
    if has(Fault::Dup) {
        proxy.duplicate_pct = args.dup_pct;
        use_proxy = true;
    }
    if has(Fault::Reorder) {
        proxy.reorder_pct = args.reorder_pct;
        proxy.reorder_hold = Duration::from_millis(30);
        use_proxy = true;
    }
    let mut netns_loss = None;
    if has(Fault::Loss) {
        match agent_link_faults::netns::preflight() {
            Ok(()) => netns_loss = Some(args.loss_pct),
            Err(e) => {
                eprintln!("note: {e}; dropping packets in the UDP proxy instead");
                proxy.loss_pct = f64::from(args.loss_pct);
                use_proxy = true;
            }
        }
    }
    let cfg = SoakConfig {
        relay_bin: crate::relay_proc::relay_binary(args.relay_bin.as_deref())?,
        duration: Duration::from_secs(args.duration),
        pairs: args.pairs,
        window: args.window,
        rate: (args.rate > 0).then_some(args.rate),
        payload: args.size,
        send_timeout: Duration::from_secs(args.send_timeout),
        faults: FaultPlan {
            kill_every: has(Fault::Kill).then(|| Duration::from_secs(args.kill_every.max(1))),
            down_for: Duration::from_millis(args.down_ms),
            proxy: use_proxy.then_some(proxy),
            netns_loss_pct: netns_loss,
            nats_kill_every: has(Fault::NatsKill)
                .then(|| Duration::from_secs(args.kill_every.max(1))),
        },
        fleet,
    };
    eprintln!(
        "soak: {} pairs{}, {} s, faults: {}",
        cfg.pairs,
        cfg.fleet.as_ref().map_or(String::new(), |f| format!(
            " on a fleet of {} relays",
            f.relays
        )),
        args.duration,
        cfg.faults.describe()
    );
    let report = soak::run(&cfg).await?;
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report.is_clean())
}
