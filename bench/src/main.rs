//! `agent-link-bench`: throughput and latency through a real relay process,
//! side by side with NATS and with a direct (no relay) baseline.
//!
//! - **ceiling** (`--mode ceiling`): bench-side raw clients send envelopes
//!   signed before the timed window, receivers acknowledge without checking
//!   Ed25519; the relay still checks size, decoding, sender binding, HMAC and
//!   timestamp on every message. This is what the relay itself can forward.
//! - **e2e** (`--mode e2e`): the `agent-link` library on both sides, every
//!   check on (signing per message, HMAC + Ed25519 + replay at the receiver).
//! - **direct** (`--mode direct`): the ceiling's raw clients talking QUIC
//!   straight to each other, same framing, no relay.
//! - **nats** (`--nats`, on when `nats-server` is found): the same workload
//!   through `nats-server` with `async-nats` request/reply.
//!
//! Latency is send→receipt (send→reply for NATS). Closed loop with `--window`
//! in flight per sender, or open loop with `--rate` (latency from the
//! intended send time).

mod ceiling;
mod cli;
mod daemon;
mod direct;
mod e2e;
mod flood;
mod load;
mod nats;
mod netstat;
mod progress;
mod raw;
mod relay_proc;
mod report;
mod scale;
mod scale_nats;
mod soak;
mod svg;
mod workload;

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use ceiling::RelayTarget;
use load::RunCfg;
use report::Figure;
use workload::{Topology, Workload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Mode {
    /// Relay ceiling: pre-signed messages, receivers not verifying.
    Ceiling,
    /// End to end through the agent-link library, every check on.
    E2e,
    /// Raw clients straight to each other, no relay.
    Direct,
    /// Ceiling and e2e.
    Both,
    /// Ceiling, e2e and direct.
    All,
}

#[derive(Parser, Debug)]
#[command(
    name = "agent-link-bench",
    version,
    about = "Throughput and latency through a real agent-link relay, side by side with NATS",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    bench: Args,
}

/// Further tools (the default, with no subcommand, is the benchmark).
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run agents under faults for a set time and reconcile every message
    /// id (sent, delivered, errored, duplicated, lost); exits 1 on any loss
    /// or duplicate
    Soak(soak::SoakArgs),
    /// Connect many instances (default 10,000) to one relay, each with a
    /// receiving agent; report relay memory per idle connection, the connect
    /// rate, and a ring exchange among all of them
    Scale(scale::ScaleArgs),
    /// Time the peer CLI as scripts call it: whole `agent-link send` and
    /// `status` processes against a relay on loopback (min/median/max)
    Cli(cli::CliArgs),
    /// The local instance: N local clients on a daemon's socket sending
    /// into another daemon's durable inbox, beside the direct library path,
    /// and the whole-process CLI `send` through the daemon vs direct
    Daemon(daemon::DaemonArgs),
    /// Flood the relay with forged QUIC Initials (default 26,000/s) while
    /// registered members connect; report each member's connect time and
    /// the relay's peak memory
    Flood(flood::FloodArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Which figures to measure
    #[arg(long, value_enum, default_value = "both")]
    mode: Mode,
    /// Who sends to whom, comma-separated for several runs in one command
    /// (`all`: pairs, fleet, large); each brings its own defaults for
    /// --pairs, --window and --sizes, which flags given override
    #[arg(long, value_enum, value_delimiter = ',', default_value = "pairs")]
    workload: Vec<Workload>,
    /// Sender→receiver pairs (shorthand for --instances N --agents 1)
    /// [default: 4; fleet 500]
    #[arg(long)]
    pairs: Option<usize>,
    /// Instances (connections) on the many side [default: --pairs]
    #[arg(long)]
    instances: Option<usize>,
    /// Agents (streams) per instance
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Messages in flight per sender (closed loop) [default: 64; fleet 1,
    /// large 16]
    #[arg(long)]
    window: Option<usize>,
    /// Open loop: messages/s offered in total, on a fixed schedule
    #[arg(long)]
    rate: Option<f64>,
    /// Payload sizes in bytes, comma-separated (one run each) [default:
    /// 256; large 65536,1048576]
    #[arg(long, alias = "size", value_delimiter = ',')]
    sizes: Option<Vec<usize>>,
    /// Measured seconds (after warm-up), at most 45
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Warm-up seconds, not measured
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The started relay's `max_udp_payload_size` (default: the relay's
    /// default, 1452); 4096 lets loopback packets carry ~3x the messages
    #[arg(long)]
    max_udp_payload: Option<u16>,
    /// Set a field of the started relay's `relay-config.json`, after the
    /// bench's own settings (repeatable; the value is JSON, e.g.
    /// `--relay-set stream_receive_window=4194304`); the relay checks it
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_relay_set)]
    relay_set: Vec<(String, serde_json::Value)>,
    /// Measure a running relay at this address instead of starting one
    /// (needs --join; relay CPU and memory are then not reported)
    #[arg(long, requires = "join")]
    relay: Option<String>,
    /// Join token of the running relay's fleet (the bench registers its
    /// instances online with it)
    #[arg(long)]
    join: Option<String>,
    #[command(flatten)]
    nats: nats::NatsArgs,
    /// Also measure the ceiling through a fleet of this many relays on a
    /// JetStream nats-server (2: senders on relay 1, receivers on relay 2,
    /// every message forwarded between them), beside the single relay
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(2..=2), conflicts_with = "relay")]
    cluster: Option<u8>,
    /// Also write the results as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write an SVG chart here
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// `KEY=VALUE` of `--relay-set`: the value as JSON (a number, `true`, a
/// quoted string...).
fn parse_relay_set(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}`: the key is empty"));
    }
    let v = serde_json::from_str(v)
        .map_err(|e| format!("`{s}`: the value is not JSON ({e}); quote strings"))?;
    Ok((k.to_string(), v))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    if let Some(Cmd::Cli(args)) = cli.cmd {
        return match cli::run(args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(Cmd::Daemon(args)) = cli.cmd {
        return match rt.block_on(daemon::run(args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(Cmd::Flood(args)) = cli.cmd {
        return match rt.block_on(flood::run(args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(Cmd::Scale(args)) = cli.cmd {
        return match rt.block_on(scale::run(args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(Cmd::Soak(args)) = cli.cmd {
        return match rt.block_on(soak::run(args)) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("soak FAILED: messages lost, duplicated, without an outcome, or none got through");
                std::process::ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    match rt.block_on(run(cli.bench)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn relay_target(args: &Args) -> Result<RelayTarget> {
    match (&args.relay, &args.join) {
        (Some(addr), Some(token)) => {
            let addr = addr
                .to_socket_addrs()
                .with_context(|| format!("--relay {addr}"))?
                .next()
                .with_context(|| format!("--relay {addr}: no address"))?;
            Ok(RelayTarget::Remote {
                addr,
                token: token.clone(),
            })
        }
        (None, Some(token)) => {
            let t = agent_link_proto::JoinToken::parse(token).context("--join")?;
            let addr = t
                .addr
                .to_socket_addrs()
                .with_context(|| format!("join token address {}", t.addr))?
                .next()
                .context("join token address resolves to nothing")?;
            Ok(RelayTarget::Remote {
                addr,
                token: token.clone(),
            })
        }
        _ => Ok(RelayTarget::Own(relay_proc::relay_binary(
            args.relay_bin.as_deref(),
        )?)),
    }
}

async fn run(args: Args) -> Result<()> {
    if args.duration == 0 || args.duration > 45 {
        bail!("--duration must be between 1 and 45 seconds (pre-signed messages must stay inside the relay's 60 s timestamp window)");
    }
    if args.pairs == Some(0)
        || args.instances == Some(0)
        || args.agents == 0
        || args.window == Some(0)
    {
        bail!("--pairs/--instances, --agents and --window must be at least 1");
    }
    if args.sizes.iter().flatten().any(|&s| s < 16) {
        bail!("--sizes must be at least 16 bytes each");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of messages per second");
    }
    let target = relay_target(&args)?;
    let nats_bin = args.nats.server()?;
    let fleet = match (args.cluster, &target, args.nats.binary()) {
        (None, ..) => None,
        (Some(_), RelayTarget::Own(bin), Some(nats_bin)) => Some(RelayTarget::Fleet {
            bin: bin.clone(),
            nats_bin,
        }),
        (Some(_), RelayTarget::Own(_), None) => {
            bail!("--cluster needs nats-server: {}", nats::INSTALL_HINT)
        }
        (Some(_), ..) => {
            bail!("--cluster starts its own relays: it does not take --relay or --join")
        }
    };
    let mut figures: Vec<Figure> = Vec::new();
    for workload in Workload::expand(&args.workload) {
        let d = workload.defaults();
        let instances = args.instances.or(args.pairs).unwrap_or(d.pairs);
        let topo = Topology::new(workload, instances, args.agents);
        let window = args.window.unwrap_or(d.window);
        for &size in args.sizes.as_ref().unwrap_or(&d.sizes) {
            let cfg = RunCfg {
                topo: topo.clone(),
                window,
                rate: args.rate,
                size,
                warmup: Duration::from_secs(args.warmup),
                duration: Duration::from_secs(args.duration),
                max_udp_payload: args.max_udp_payload,
                relay_set: args.relay_set.clone(),
            };
            run_one(&args, &cfg, &target, nats_bin.as_deref(), &mut figures).await?;
            if let Some(fleet) = &fleet {
                if matches!(args.mode, Mode::Ceiling | Mode::Both | Mode::All) {
                    figures.push(
                        ceiling::run(&cfg, fleet)
                            .await
                            .context("relay-fleet ceiling run")?,
                    );
                }
            }
        }
    }
    report::print_table(&figures);
    if fleet.is_some() {
        report::print_fleet_comparison(&figures);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg::render(&figures))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Every figure `args.mode` asks for, for one workload and size.
async fn run_one(
    args: &Args,
    cfg: &RunCfg,
    target: &RelayTarget,
    nats_bin: Option<&std::path::Path>,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    if matches!(args.mode, Mode::Ceiling | Mode::Both | Mode::All) {
        figures.push(
            ceiling::run(cfg, target)
                .await
                .context("relay-ceiling run")?,
        );
        if let Some(bin) = nats_bin {
            figures.push(nats::run(cfg, bin).await.context("NATS run")?);
        }
    }
    if matches!(args.mode, Mode::Direct | Mode::All) {
        match direct::run(cfg).await {
            Ok(f) => figures.push(f),
            Err(e) if args.mode != Mode::Direct => eprintln!("direct skipped: {e:#}"),
            Err(e) => return Err(e.context("direct run")),
        }
    }
    if matches!(args.mode, Mode::E2e | Mode::Both | Mode::All) {
        match e2e::run(cfg, target).await {
            Ok(f) => figures.push(f),
            Err(e) if args.mode != Mode::E2e => eprintln!("e2e skipped: {e:#}"),
            Err(e) => return Err(e.context("end-to-end run")),
        }
    }
    Ok(())
}
