//! One measured run ([`Figure`]), the final table, the agent-link/NATS and
//! relay/direct ratios, and the JSON file.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::Outcome;

/// Which system carried the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// The relay, bench-side raw clients (pre-signed, receivers not verifying).
    Ceiling,
    /// The relay, the agent-link library on both ends, every check on.
    E2e,
    /// The same raw clients talking QUIC straight to each other, no relay.
    Direct,
    /// nats-server, async-nats clients, request/reply.
    Nats,
    /// As `Ceiling`, through a fleet of two relays on NATS: every sender on
    /// relay 1, every receiver on relay 2 (`--cluster 2`).
    Fleet,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Ceiling => "ceiling",
            System::E2e => "e2e",
            System::Direct => "direct",
            System::Nats => "nats",
            System::Fleet => "fleet-2",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub system: System,
    /// e.g. `pairs 4×1`.
    pub shape: String,
    pub senders: usize,
    pub receivers: usize,
    pub window: usize,
    /// Offered messages/s in total (open loop), none for closed loop.
    pub offered_rate: Option<f64>,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub delivered: u64,
    pub failed: u64,
    pub messages_per_sec: f64,
    pub payload_mb_per_sec: f64,
    pub latency_us: Percentiles,
    /// Server (relay or nats-server) CPU per delivered message; none when the
    /// server is not our child process or there is none (direct).
    pub server_cpu_us_per_msg: Option<f64>,
    pub server_peak_rss_kib: Option<u64>,
    /// Packets sent on the machine in the measured window per delivered
    /// message (UDP datagrams for the relay, TCP segments for NATS; see
    /// `netstat`); none where `/proc/net/snmp` is not readable.
    pub packets_per_msg: Option<f64>,
    /// Explicit failures by error code.
    pub failed_by: std::collections::BTreeMap<String, u64>,
}

/// Shape of the run a figure belongs to.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub shape: String,
    pub senders: usize,
    pub receivers: usize,
    pub window: usize,
    pub offered_rate: Option<f64>,
    pub payload_bytes: usize,
    pub seconds: f64,
}

impl Figure {
    pub fn new(
        system: System,
        run: &RunInfo,
        out: &Outcome,
        server: Option<(f64, u64)>,
        packets: Option<u64>,
    ) -> Self {
        let secs = run.seconds;
        Figure {
            system,
            shape: run.shape.clone(),
            senders: run.senders,
            receivers: run.receivers,
            window: run.window,
            offered_rate: run.offered_rate,
            payload_bytes: run.payload_bytes,
            seconds: secs,
            delivered: out.delivered,
            failed: out.failed,
            messages_per_sec: out.delivered as f64 / secs,
            payload_mb_per_sec: out.delivered as f64 * run.payload_bytes as f64 / secs / 1e6,
            latency_us: Percentiles::of(&out.latency),
            server_cpu_us_per_msg: server.and_then(|(cpu, _)| {
                (out.delivered > 0 && cpu.is_finite()).then(|| cpu * 1e6 / out.delivered as f64)
            }),
            server_peak_rss_kib: server.map(|(_, rss)| rss),
            packets_per_msg: packets
                .filter(|_| out.delivered > 0)
                .map(|p| p as f64 / out.delivered as f64),
            failed_by: out.failed_by.clone(),
        }
    }

    fn same_run(&self, other: &Figure) -> bool {
        self.shape == other.shape
            && self.payload_bytes == other.payload_bytes
            && self.window == other.window
            && self.offered_rate == other.offered_rate
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

/// Each fleet figure beside the single relay's ceiling of the same shape
/// and size in the same run, against the targets of a fleet of relays
/// (issue 12): at least half the throughput, p50 within +300 µs.
pub fn print_fleet_comparison(figures: &[Figure]) {
    for f in figures.iter().filter(|f| f.system == System::Fleet) {
        let Some(one) = figures.iter().find(|c| {
            c.system == System::Ceiling && c.shape == f.shape && c.payload_bytes == f.payload_bytes
        }) else {
            continue;
        };
        let ratio = f.messages_per_sec / one.messages_per_sec;
        let extra = f.latency_us.p50 as f64 - one.latency_us.p50 as f64;
        println!(
            "fleet-2 vs one relay, {} {} B: {:.2}x the msg/s (target >= 0.5x: {}), p50 {:+.0} µs (target <= +300 µs: {})",
            f.shape,
            f.payload_bytes,
            ratio,
            if ratio >= 0.5 { "met" } else { "missed" },
            extra,
            if extra <= 300.0 { "met" } else { "missed" },
        );
    }
}

pub fn print_table(figures: &[Figure]) {
    println!(
        "{:<8} {:<14} {:>6} {:>7} {:>10} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8}",
        "system",
        "shape",
        "window",
        "bytes",
        "offered/s",
        "msg/s",
        "MB/s",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "srv µs/m",
        "pkt/m",
        "srv RSS"
    );
    for f in figures {
        println!(
            "{:<8} {:<14} {:>6} {:>7} {:>10} {:>10.0} {:>8.2} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8}",
            f.system.name(),
            f.shape,
            f.window,
            f.payload_bytes,
            f.offered_rate
                .map_or_else(|| "closed".into(), |r| format!("{r:.0}")),
            f.messages_per_sec,
            f.payload_mb_per_sec,
            us(f.latency_us.p50),
            us(f.latency_us.p90),
            us(f.latency_us.p99),
            us(f.latency_us.p999),
            f.server_cpu_us_per_msg
                .map_or_else(|| "—".into(), |v| format!("{v:.2}")),
            f.packets_per_msg
                .map_or_else(|| "—".into(), |v| format!("{v:.2}")),
            f.server_peak_rss_kib
                .map_or_else(|| "—".into(), |v| format!("{} MiB", v / 1024)),
        );
        if f.failed > 0 {
            let by: Vec<String> = f
                .failed_by
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            println!(
                "  ({} messages failed with an explicit error{}{})",
                f.failed,
                if by.is_empty() { "" } else { ": " },
                by.join(", ")
            );
        }
    }
    println!("latency = send→receipt (relay, direct) / send→reply (NATS); srv µs/m = server CPU (user+system) per delivered message; pkt/m = UDP datagrams (relay) or TCP segments (NATS) sent on the machine per delivered message");
    print_ratios(figures, System::Nats, "agent-link ceiling / NATS");
    print_ratios(figures, System::Direct, "relay ceiling / direct");
}

/// Ratios of the relay ceiling to `base` for runs of the same shape and size.
/// Throughput above 1 and latency/CPU/RSS below 1 favour agent-link.
fn print_ratios(figures: &[Figure], base: System, title: &str) {
    let pairs: Vec<(&Figure, &Figure)> = figures
        .iter()
        .filter(|f| f.system == System::Ceiling)
        .filter_map(|a| {
            figures
                .iter()
                .find(|b| b.system == base && a.same_run(b))
                .map(|b| (a, b))
        })
        .collect();
    if pairs.is_empty() {
        return;
    }
    println!();
    println!("{title} (throughput > 1 and latency/CPU/RSS < 1 favour agent-link):");
    println!(
        "{:<14} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:>7}",
        "shape", "bytes", "msg/s", "MB/s", "p50", "p90", "p99", "p99.9", "srv µs/m", "pkt/m", "RSS"
    );
    let r = |a: f64, b: f64| {
        if b > 0.0 && a.is_finite() && b.is_finite() {
            format!("{:.2}", a / b)
        } else {
            "—".into()
        }
    };
    for (a, b) in pairs {
        println!(
            "{:<14} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>6} {:>7}",
            a.shape,
            a.payload_bytes,
            r(a.messages_per_sec, b.messages_per_sec),
            r(a.payload_mb_per_sec, b.payload_mb_per_sec),
            r(a.latency_us.p50 as f64, b.latency_us.p50 as f64),
            r(a.latency_us.p90 as f64, b.latency_us.p90 as f64),
            r(a.latency_us.p99 as f64, b.latency_us.p99 as f64),
            r(a.latency_us.p999 as f64, b.latency_us.p999 as f64),
            match (a.server_cpu_us_per_msg, b.server_cpu_us_per_msg) {
                (Some(x), Some(y)) => r(x, y),
                _ => "—".into(),
            },
            match (a.packets_per_msg, b.packets_per_msg) {
                (Some(x), Some(y)) => r(x, y),
                _ => "—".into(),
            },
            match (a.server_peak_rss_kib, b.server_peak_rss_kib) {
                (Some(x), Some(y)) => r(x as f64, y as f64),
                _ => "—".into(),
            },
        );
    }
}
