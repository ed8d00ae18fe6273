//! The soak engine: pairs of agents (each side its own instance, through the
//! `agent-link` library, every check on) exchange messages through a real
//! relay process for a set time while faults are injected; at the end every
//! message id is reconciled against what each receiving application saw.
//!
//! The delivery promise (DESIGN.md) it checks: every send ends in exactly one
//! outcome; a message whose send returned a receipt reached its receiving
//! application exactly once; nothing reaches an application that was not
//! sent; and an explicit refusal is never given for a message that was in
//! fact delivered. A timeout ("outcome unknown") may go either way.
//!
//! Errors are not a free outcome: a relay that silently dropped one message
//! in 256 would show up only as timeouts. So every send that ended in an
//! error must be explained by a relay kill — its life overlapped a window in
//! which the relay was dead — and each kill explains at most the sends that
//! can be in flight at once (`pairs × window`). Anything else is counted as
//! `unexplained_errors` and fails the run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_link::{AgentLink, SendError};
use agent_link_proto::JoinToken;
use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::netns::LossyNamespace;
use crate::proxy::{Impairment, ProxyStats, UdpProxy};
use crate::relay_process::RelayProcess;

/// Which faults, and how hard.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// SIGKILL the relay this often and start it again after `down_for`.
    pub kill_every: Option<Duration>,
    /// How long the relay stays dead each time.
    pub down_for: Duration,
    /// Impair every datagram between peers and relay through a UDP proxy.
    pub proxy: Option<Impairment>,
    /// Run the relay in a network namespace whose veth drops this percentage
    /// of packets each way (nftables; needs root).
    pub netns_loss_pct: Option<u32>,
    /// A fleet only: SIGKILL a NATS node (each in turn) this often and
    /// start it again after `down_for`.
    pub nats_kill_every: Option<Duration>,
}

impl FaultPlan {
    /// A one-line description, e.g. `kill/3s, proxy(delay 20ms ...)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(k) = self.kill_every {
            parts.push(format!("SIGKILL every {:?} (down {:?})", k, self.down_for));
        }
        if let Some(p) = &self.proxy {
            parts.push(format!(
                "proxy: loss {}%, delay {:?}+{:?} jitter, dup {}%, reorder {}% by {:?}",
                p.loss_pct, p.delay, p.jitter, p.duplicate_pct, p.reorder_pct, p.reorder_hold
            ));
        }
        if let Some(k) = self.nats_kill_every {
            parts.push(format!(
                "SIGKILL a NATS node every {:?} (down {:?})",
                k, self.down_for
            ));
        }
        if let Some(l) = self.netns_loss_pct {
            parts.push(format!("nftables loss {l}% each way"));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("; ")
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The `agent-link-relay` binary.
    pub relay_bin: PathBuf,
    /// How long messages are sent (faults are active for this long).
    pub duration: Duration,
    /// Sender→receiver pairs.
    pub pairs: usize,
    /// Messages in flight per sender.
    pub window: usize,
    /// Offered messages per second over all senders (`None`: as fast as the
    /// window allows).
    pub rate: Option<u32>,
    /// Payload bytes (at least 8: the soak's own id).
    pub payload: usize,
    /// Deadline of each send.
    pub send_timeout: Duration,
    /// Faults.
    pub faults: FaultPlan,
    /// Run a fleet of relays on a 3-node NATS cluster instead of one relay.
    pub fleet: Option<FleetSoak>,
}

/// A fleet for the soak: `relays` relays on a 3-node nats-server cluster;
/// pair `k`'s sender joins relay `k mod relays`, its receiver the next one,
/// so every message crosses relays. A relay kill takes the relays in turn.
#[derive(Debug, Clone)]
pub struct FleetSoak {
    /// How many relays (at least 2).
    pub relays: usize,
    /// The nats-server binary.
    pub nats_bin: PathBuf,
}

/// How long after a relay of a fleet comes back its peers may still be
/// failing over (they notice a silent relay after 7 s, dial, re-attach,
/// and the attach reaches the other relays through NATS; on a loaded
/// 2-core machine running several soaks at once that took more than 12 s):
/// a send to an agent attached there may meet `TargetOffline` until then.
const FLEET_FAILOVER_GRACE: Duration = Duration::from_secs(20);

/// A fleet run starts no fault in its last this long: a NATS node kill
/// leaves JetStream electing leaders for up to ~11 s (a relay restarted
/// meanwhile waits for it), and peers need their 7 s idle timeout to fail
/// over; a fault later than this would leave no time to show that the
/// fleet recovered ("receipts after last restart").
const FLEET_SETTLE: Duration = Duration::from_secs(12);

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            relay_bin: PathBuf::from("agent-link-relay"),
            duration: Duration::from_secs(10),
            pairs: 2,
            window: 8,
            rate: Some(200),
            payload: 256,
            send_timeout: Duration::from_secs(30),
            faults: FaultPlan::default(),
            fleet: None,
        }
    }
}

/// The reconciliation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// Faults applied.
    pub faults: String,
    /// Seconds of sending.
    pub seconds: f64,
    /// Sends started.
    pub sent: u64,
    /// Sends that ended in a receipt.
    pub receipts: u64,
    /// Sends that ended in an error, by cause.
    pub errored: BTreeMap<String, u64>,
    /// Distinct messages the receiving applications got.
    pub delivered: u64,
    /// Extra deliveries of a message already delivered (must be 0).
    pub duplicated: u64,
    /// Receipted messages no application got (must be 0).
    pub lost: u64,
    /// Deliveries of something never sent, or from the wrong sender (must be 0).
    pub unexpected: u64,
    /// Sends that never ended (must be 0).
    pub unresolved: u64,
    /// Timed-out sends that had in fact been delivered (allowed: a timeout
    /// says "outcome unknown").
    pub timed_out_but_delivered: u64,
    /// Sends refused with a definite cause that had in fact been delivered
    /// (must be 0: the error would be a lie).
    pub refused_but_delivered: u64,
    /// Sends that ended in an error while no relay kill can explain it, or
    /// beyond what a kill can explain (`pairs × window` per kill). Must be 0:
    /// with the relay up, a send that gets no receipt is a lost message.
    pub unexplained_errors: u64,
    /// The unexplained errors by cause.
    pub unexplained_by: BTreeMap<String, u64>,
    /// Receipts obtained after the last fault healed (the system recovered).
    pub receipts_after_last_restart: u64,
    /// Times the relay was started (1 + restarts).
    pub relay_starts: u32,
    /// Highest relay VmHWM over all its lives, KiB.
    pub relay_peak_rss_kib: u64,
    /// What the UDP proxy did.
    pub proxy: Option<ProxyStats>,
    /// Packets nftables dropped.
    pub netns_dropped_packets: Option<u64>,
}

impl SoakReport {
    /// Something got through, and: no loss, no duplicate, nothing
    /// unexpected, every send ended, no lie.
    pub fn is_clean(&self) -> bool {
        self.receipts > 0
            && self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.unresolved == 0
            && self.refused_but_delivered == 0
            && self.unexplained_errors == 0
    }

    /// Sends that ended in an error.
    pub fn errored_total(&self) -> u64 {
        self.errored.values().sum()
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| t.push_str(&format!("  {k:<32} {v}\n"));
        row("faults", self.faults.clone());
        row("seconds sending", format!("{:.1}", self.seconds));
        row("sent", self.sent.to_string());
        row("receipts", self.receipts.to_string());
        let causes = if self.errored.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self
                .errored
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!(" ({})", list.join(", "))
        };
        row("errored", format!("{}{causes}", self.errored_total()));
        row("delivered (distinct)", self.delivered.to_string());
        row("duplicated", self.duplicated.to_string());
        row("lost (receipt, not delivered)", self.lost.to_string());
        row("unexpected", self.unexpected.to_string());
        row("unresolved sends", self.unresolved.to_string());
        row(
            "timed out but delivered",
            self.timed_out_but_delivered.to_string(),
        );
        row(
            "refused but delivered",
            self.refused_but_delivered.to_string(),
        );
        row(
            "errors no kill explains",
            if self.unexplained_by.is_empty() {
                self.unexplained_errors.to_string()
            } else {
                format!("{} ({:?})", self.unexplained_errors, self.unexplained_by)
            },
        );
        row(
            "receipts after last restart",
            self.receipts_after_last_restart.to_string(),
        );
        row("relay starts", self.relay_starts.to_string());
        row(
            "relay peak RSS",
            format!("{:.1} MiB", self.relay_peak_rss_kib as f64 / 1024.0),
        );
        if let Some(p) = &self.proxy {
            row(
                "proxy datagrams",
                format!(
                    "{} seen, {} dropped, {} duplicated, {} reordered",
                    p.received, p.dropped, p.duplicated, p.reordered
                ),
            );
        }
        if let Some(d) = self.netns_dropped_packets {
            row("nftables dropped packets", d.to_string());
        }
        row(
            "verdict",
            if self.is_clean() {
                "CLEAN: nothing lost, nothing duplicated".into()
            } else {
                "FAILED: see receipts / lost / duplicated / unexpected / unresolved / refused / errors no kill explains"
                    .into()
            },
        );
        t
    }
}

/// How one send ended.
#[derive(Debug, Clone)]
enum Outcome {
    Receipt {
        at: Instant,
    },
    Error {
        cause: String,
        definite: bool,
        started: Instant,
        at: Instant,
    },
}

/// A span of time in which the relay was dead: from its SIGKILL to the
/// moment its restart returned.
#[derive(Debug, Clone, Copy)]
struct Outage {
    killed: Instant,
    restarted: Instant,
    /// In a fleet: until when an agent attached to the killed relay may be
    /// attached nowhere (its peer failing over), so `TargetOffline` for
    /// it is the truth, however many sends meet it.
    offline_until: Option<Instant>,
}

/// What the ledger holds at the end, reconciled (pure: no clock, no I/O).
/// `in_flight_max` is how many sends can be open at once (`pairs × window`):
/// the most one outage can explain.
fn reconcile(
    outcomes: &HashMap<u64, Outcome>,
    deliveries: &HashMap<u64, u32>,
    sent_ids: &HashSet<u64>,
    outages: &[Outage],
    in_flight_max: u64,
    last_restart: Option<Instant>,
    report: &mut SoakReport,
) {
    for (id, n) in deliveries.iter() {
        report.duplicated += u64::from(n.saturating_sub(1));
        if !sent_ids.contains(id) {
            report.unexpected += 1;
        }
    }
    report.delivered = deliveries.len() as u64;
    let mut explained = vec![0u64; outages.len()];
    for (id, o) in outcomes.iter() {
        let delivered = deliveries.contains_key(id);
        match o {
            Outcome::Receipt { at } => {
                report.receipts += 1;
                if !delivered {
                    report.lost += 1;
                }
                if last_restart.is_none_or(|r| *at > r) {
                    report.receipts_after_last_restart += 1;
                }
            }
            Outcome::Error {
                cause,
                definite,
                started,
                at,
            } => {
                *report.errored.entry(cause.clone()).or_default() += 1;
                if delivered && *definite {
                    report.refused_but_delivered += 1;
                } else if delivered {
                    report.timed_out_but_delivered += 1;
                }
                // A fleet's receiver failing over is offline: the relay says
                // so, each send at once (not capped: it is the truth).
                let offline = *definite
                    && cause == "refused TargetOffline"
                    && outages.iter().any(|w| {
                        w.offline_until
                            .is_some_and(|until| *started <= until && *at >= w.killed)
                    });
                if offline {
                    continue;
                }
                // The first outage this send's life overlaps, with room left.
                let by = outages.iter().enumerate().position(|(k, w)| {
                    *started <= w.restarted && *at >= w.killed && explained[k] < in_flight_max
                });
                match by {
                    Some(k) => explained[k] += 1,
                    None => {
                        report.unexplained_errors += 1;
                        *report.unexplained_by.entry(cause.clone()).or_default() += 1;
                    }
                }
            }
        }
    }
}

fn classify(e: &SendError) -> (String, bool) {
    match e {
        SendError::Refused(code) => (format!("refused {code:?}"), true),
        SendError::Timeout => ("timeout".into(), false),
        SendError::TooLarge { .. } => ("too large".into(), true),
        SendError::BadAddress { .. } => ("bad address".into(), true),
        SendError::OutboxFull { .. } => ("outbox full".into(), true),
        // The link went away with the message possibly on the wire.
        SendError::Closed(_) => ("closed".into(), false),
        _ => ("other".into(), false),
    }
}

/// Soak ids: the pair in the top 24 bits, the sequence below.
fn soak_id(pair: usize, seq: u64) -> u64 {
    ((pair as u64) << 40) | seq
}

fn pair_of(id: u64) -> usize {
    (id >> 40) as usize
}

#[derive(Default)]
struct Ledger {
    /// Every id a send was started for.
    sent: Mutex<HashSet<u64>>,
    outcomes: Mutex<HashMap<u64, Outcome>>,
    /// Deliveries per id, as seen by the receiving applications.
    deliveries: Mutex<HashMap<u64, u32>>,
    unexpected: AtomicU64,
    last_delivery: Mutex<Option<Instant>>,
}

impl Ledger {
    fn outcome(&self, id: u64, o: Outcome) {
        self.outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, o);
    }
}

/// Run a soak; `Err` only when it could not be set up (a namespace that
/// cannot be created is an `Err` whose message says why).
pub async fn run(cfg: &SoakConfig) -> Result<SoakReport> {
    let tmp = tempfile::tempdir()?;
    let netns = match cfg.faults.netns_loss_pct {
        Some(p) => Some(LossyNamespace::create(p)?),
        None => None,
    };
    let (listen_ip, wrapper) = match &netns {
        Some(ns) => (ns.inner_ip(), ns.wrapper()),
        None => (IpAddr::V4(Ipv4Addr::LOCALHOST), Vec::new()),
    };
    let relay_config = serde_json::json!({
        // The soak measures delivery, not the rate limiter.
        "rate_per_instance": 1_000_000,
        "rate_burst": 1_000_000,
    });
    let (relays, nats, tokens) = match &cfg.fleet {
        None => {
            let relay_dir = tmp.path().join("relay");
            RelayProcess::init(
                &cfg.relay_bin,
                &relay_dir,
                SocketAddr::new(listen_ip, 0),
                &relay_config,
            )?;
            let relay = RelayProcess::start(&cfg.relay_bin, &relay_dir, wrapper)?;
            (vec![relay], None, Vec::new())
        }
        Some(fleet) => {
            if netns.is_some() || cfg.faults.proxy.is_some() {
                anyhow::bail!("a fleet soak takes relay and NATS kills only");
            }
            let (relays, nats) = start_fleet(cfg, fleet, tmp.path(), &relay_config)?;
            let tokens = fleet_tokens(&relays).await?;
            (relays, Some(nats), tokens)
        }
    };
    let proxy = match cfg.faults.proxy {
        Some(_) => Some(UdpProxy::start(relays[0].addr(), Impairment::none()).await?),
        None => None,
    };
    let dial = proxy.as_ref().map_or(relays[0].addr(), |p| p.addr());
    let lone_token = match tokens.is_empty() {
        true => Some(JoinToken::parse(&relays[0].invite(dial)?)?),
        false => None,
    };
    // Pair k's sender on relay k mod n, its receiver on the next relay.
    let token_for = |k: usize, receiver: bool| -> &JoinToken {
        match &lone_token {
            Some(t) => t,
            None => &tokens[(k + usize::from(receiver)) % tokens.len()],
        }
    };
    let n_relays = relays.len();
    let relays = Arc::new(Mutex::new(relays));
    let nats = nats.map(|n| Arc::new(Mutex::new(n)));

    // Instances join before any fault starts.
    let mut links = Vec::new();
    for k in 0..cfg.pairs {
        for (role, receiver) in [("s", false), ("r", true)] {
            let id = format!("soak-{role}{k}");
            let dir = tmp.path().join(&id);
            agent_link::init(&dir, &id, token_for(k, receiver), None)
                .await
                .with_context(|| format!("init {id}"))?;
            links.push(
                AgentLink::connect(&dir)
                    .await
                    .with_context(|| format!("connect {id}"))?,
            );
        }
    }
    let ledger = Arc::new(Ledger::default());
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for k in 0..cfg.pairs {
        senders.push(Arc::new(links[2 * k].attach_sender("tx").await?));
        let mut rx = links[2 * k + 1].attach("rx").await?;
        let ledger = ledger.clone();
        let expect_from = format!("soak-s{k}/tx");
        receivers.push(tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let id = m
                    .payload
                    .get(..8)
                    .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                match id {
                    Some(id) if pair_of(id) == k && m.from == expect_from => {
                        *ledger
                            .deliveries
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(id)
                            .or_default() += 1;
                    }
                    _ => {
                        ledger.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                *ledger
                    .last_delivery
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
        }));
    }

    // Faults on.
    if let (Some(p), Some(plan)) = (&proxy, cfg.faults.proxy) {
        p.set(plan);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let last_restart = Arc::new(Mutex::new(None::<Instant>));
    let outages = Arc::new(Mutex::new(Vec::<Outage>::new()));
    let fleet_grace = cfg.fleet.as_ref().map(|_| FLEET_FAILOVER_GRACE);
    let faults = Faults {
        stop: stop.clone(),
        outages: outages.clone(),
        last_restart: last_restart.clone(),
        down: cfg.faults.down_for,
        quiet_from: cfg
            .fleet
            .as_ref()
            .map(|_| Instant::now() + cfg.duration.saturating_sub(FLEET_SETTLE)),
    };
    let killer = cfg.faults.kill_every.map(|every| {
        let (kill, restart) = (relays.clone(), relays.clone());
        // A fleet's relays in turn.
        faults.spawn(
            every,
            Duration::ZERO,
            fleet_grace,
            move |cycle| {
                let mut r = kill.lock().unwrap_or_else(|e| e.into_inner());
                r[cycle % n_relays].kill();
            },
            move |cycle| {
                let mut r = restart.lock().unwrap_or_else(|e| e.into_inner());
                r[cycle % n_relays].restart()
            },
        )
    });
    // Half a period after the relay kills, when both run. A relay whose
    // node died reconnects to another; a forward caught in between times
    // out at the sender.
    let nats_killer = match (&nats, cfg.faults.nats_kill_every) {
        (Some(nats), Some(every)) => {
            let (kill, restart) = (nats.clone(), nats.clone());
            Some(faults.spawn(
                every,
                every / 2,
                None,
                move |cycle| {
                    let mut n = kill.lock().unwrap_or_else(|e| e.into_inner());
                    let which = cycle % n.len();
                    n.kill(which);
                    tracing::info!("soak: NATS node {which} killed");
                },
                move |cycle| {
                    let mut n = restart.lock().unwrap_or_else(|e| e.into_inner());
                    let which = cycle % n.len();
                    n.restart(which)
                },
            ))
        }
        _ => None,
    };

    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let mut drivers = Vec::new();
    for (k, sender) in senders.iter().enumerate() {
        let (sender, ledger, stop, sent) =
            (sender.clone(), ledger.clone(), stop.clone(), sent.clone());
        let to = format!("soak-r{k}/rx");
        let (window, payload_len, timeout) = (cfg.window, cfg.payload.max(8), cfg.send_timeout);
        let interval = cfg
            .rate
            .map(|r| Duration::from_secs_f64(cfg.pairs as f64 / f64::from(r.max(1))));
        drivers.push(tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(window));
            let mut tasks = tokio::task::JoinSet::new();
            let mut tick = interval.map(|i| {
                let mut t = tokio::time::interval(i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let permit = match tokio::time::timeout(
                    Duration::from_millis(100),
                    permits.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => continue,
                };
                let id = soak_id(k, seq);
                seq += 1;
                let mut body = vec![0x5a; payload_len];
                body[..8].copy_from_slice(&id.to_be_bytes());
                let (sender, ledger, to) = (sender.clone(), ledger.clone(), to.clone());
                sent.fetch_add(1, Ordering::Relaxed);
                ledger
                    .sent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id);
                tasks.spawn(async move {
                    let started = Instant::now();
                    let r = sender
                        .send_with_timeout(&to, Bytes::from(body), timeout)
                        .await;
                    let o = match r {
                        Ok(_) => Outcome::Receipt { at: Instant::now() },
                        Err(e) => {
                            let (cause, definite) = classify(&e);
                            Outcome::Error {
                                cause,
                                definite,
                                started,
                                at: Instant::now(),
                            }
                        }
                    };
                    ledger.outcome(id, o);
                    drop(permit);
                });
            }
            // Every send has its own deadline; give them that (and a margin)
            // to end, then count the ones that did not.
            let limit = Instant::now() + timeout + Duration::from_secs(5);
            while !tasks.is_empty() {
                match tokio::time::timeout_at(limit.into(), tasks.join_next()).await {
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let unresolved = tasks.len() as u64;
            tasks.abort_all();
            unresolved
        }));
    }

    tokio::time::sleep(cfg.duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    // Heal: the killer finishes its current cycle (the relay is up after),
    // the proxy stops impairing; messages still in flight get through.
    if let Some(k) = killer {
        k.await??;
    }
    if let Some(k) = nats_killer {
        k.await??;
    }
    if let Some(p) = &proxy {
        p.set(Impairment::none());
    }
    let mut unresolved = 0;
    for d in drivers {
        unresolved += d.await?;
    }
    // Receipts mean the receiving library handed the message to its inbox;
    // let the receiving loops drain it (bounded).
    let drain_until = Instant::now() + Duration::from_secs(10);
    loop {
        let quiet = ledger
            .last_delivery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() > Duration::from_millis(500));
        if quiet || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut report = SoakReport {
        faults: cfg.faults.describe(),
        seconds,
        sent: sent.load(Ordering::Relaxed),
        unresolved,
        unexpected: ledger.unexpected.load(Ordering::Relaxed),
        proxy: proxy.as_ref().map(UdpProxy::stats),
        netns_dropped_packets: netns.as_ref().map(LossyNamespace::dropped_packets),
        ..SoakReport::default()
    };
    let last_restart = *last_restart.lock().unwrap_or_else(|e| e.into_inner());
    {
        let outcomes = ledger.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        let deliveries = ledger.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        let sent_ids = ledger.sent.lock().unwrap_or_else(|e| e.into_inner());
        let outages = outages.lock().unwrap_or_else(|e| e.into_inner());
        reconcile(
            &outcomes,
            &deliveries,
            &sent_ids,
            &outages,
            (cfg.pairs * cfg.window) as u64,
            last_restart,
            &mut report,
        );
    }

    for l in links {
        l.close().await;
    }
    for r in receivers {
        r.abort();
    }
    drop(proxy);
    let relays = Arc::try_unwrap(relays)
        .map_err(|_| anyhow::anyhow!("relays still shared"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    for mut relay in relays {
        report.relay_starts += relay.starts();
        report.relay_peak_rss_kib = report.relay_peak_rss_kib.max(relay.peak_rss_kib());
        relay.stop();
    }
    drop(nats);
    drop(netns);
    Ok(report)
}

/// What a fault injector shares with the run: when to stop, and where it
/// records each outage.
struct Faults {
    stop: Arc<AtomicBool>,
    outages: Arc<Mutex<Vec<Outage>>>,
    last_restart: Arc<Mutex<Option<Instant>>>,
    down: Duration,
    /// No fault starts after this (see [`FLEET_SETTLE`]).
    quiet_from: Option<Instant>,
}

impl Faults {
    /// After `offset`, every `every` until stopped: `kill(cycle)`, wait
    /// `down`, `restart(cycle)` (both blocking, off the runtime), and record
    /// the outage; `offline_grace` as [`Outage::offline_until`] after the
    /// restart.
    fn spawn(
        &self,
        every: Duration,
        offset: Duration,
        offline_grace: Option<Duration>,
        kill: impl Fn(usize) + Send + Sync + 'static,
        restart: impl Fn(usize) -> Result<()> + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let (stop, outages, last_restart, down, quiet_from) = (
            self.stop.clone(),
            self.outages.clone(),
            self.last_restart.clone(),
            self.down,
            self.quiet_from,
        );
        let (kill, restart) = (Arc::new(kill), Arc::new(restart));
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            for cycle in 0.. {
                tokio::time::sleep(every).await;
                if stop.load(Ordering::Relaxed) || quiet_from.is_some_and(|q| Instant::now() > q) {
                    return Ok(());
                }
                // Taken before the kill: a send that failed as the kill
                // began is explained by it.
                let killed = Instant::now();
                let k = kill.clone();
                tokio::task::spawn_blocking(move || k(cycle)).await?;
                tokio::time::sleep(down).await;
                let r = restart.clone();
                tokio::task::spawn_blocking(move || r(cycle)).await??;
                let restarted = Instant::now();
                outages
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Outage {
                        killed,
                        restarted,
                        offline_until: offline_grace.map(|g| restarted + g),
                    });
                *last_restart.lock().unwrap_or_else(|e| e.into_inner()) = Some(restarted);
            }
            Ok(())
        })
    }
}

/// A fleet's relays, each on all of a fresh 3-node NATS cluster; the
/// first founds the fleet, the others take its secret. A relay that finds
/// JetStream not ready yet (it elects a leader after start) is started
/// again, for up to a minute.
fn start_fleet(
    cfg: &SoakConfig,
    fleet: &FleetSoak,
    base: &std::path::Path,
    config: &serde_json::Value,
) -> Result<(Vec<RelayProcess>, crate::NatsCluster)> {
    let nats = crate::NatsCluster::start(&fleet.nats_bin, 3)?;
    let mut relays: Vec<RelayProcess> = Vec::new();
    for i in 0..fleet.relays.max(2) {
        let dir = base.join(format!("relay-{i}"));
        let mut c = config.clone();
        c["cluster"] = serde_json::json!({
            "nats": nats.urls(),
            "relay_id": format!("soak-{i}"),
            "replicas": 3,
        });
        RelayProcess::init(&cfg.relay_bin, &dir, "127.0.0.1:0".parse()?, &c)?;
        if let Some(first) = relays.first() {
            std::fs::copy(first.dir().join("fleet.secret"), dir.join("fleet.secret"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let relay = loop {
            match RelayProcess::start(&cfg.relay_bin, &dir, Vec::new()) {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    tracing::info!("soak: relay {i} not up yet ({e:#}); again");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.context(format!("starting relay {i}"))),
            }
        };
        relays.push(relay);
    }
    Ok((relays, nats))
}

/// Each relay's open fleet token, once it lists every relay (their
/// presence entries take a moment to appear; bounded).
async fn fleet_tokens(relays: &[RelayProcess]) -> Result<Vec<JoinToken>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tokens = Vec::new();
    for r in relays {
        loop {
            let t = JoinToken::parse(&r.invite(r.addr())?)?;
            if t.relays().count() == relays.len() {
                tokens.push(t);
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "relay {} lists {} relays of {}",
                r.addr(),
                t.relays().count(),
                relays.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 512 sends with the relay up; the relay dropped two of them silently,
    /// so two sends timed out. Before errors had to be explained this was
    /// CLEAN.
    #[test]
    fn a_relay_that_drops_one_in_256_is_not_clean() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let (mut outcomes, mut deliveries, mut sent) =
            (HashMap::new(), HashMap::new(), HashSet::new());
        for id in 0..512u64 {
            sent.insert(id);
            if id % 256 == 0 {
                let (cause, definite) = classify(&SendError::Timeout);
                let o = Outcome::Error {
                    cause,
                    definite,
                    started: t0,
                    at: t0 + 30 * s,
                };
                outcomes.insert(id, o);
            } else {
                outcomes.insert(id, Outcome::Receipt { at: t0 + s });
                deliveries.insert(id, 1);
            }
        }
        let mut r = SoakReport::default();
        reconcile(&outcomes, &deliveries, &sent, &[], 16, None, &mut r);
        assert_eq!((r.receipts, r.lost, r.unexplained_errors), (510, 0, 2));
        assert!(!r.is_clean(), "{}", r.table());

        // The same two timeouts during a relay outage are explained.
        let outage = Outage {
            killed: t0 + 10 * s,
            restarted: t0 + 11 * s,
            offline_until: None,
        };
        let mut r = SoakReport::default();
        reconcile(&outcomes, &deliveries, &sent, &[outage], 16, None, &mut r);
        assert_eq!(r.unexplained_errors, 0);
        assert!(r.is_clean(), "{}", r.table());

        // But one outage explains at most what can be in flight at once.
        let mut r = SoakReport::default();
        reconcile(&outcomes, &deliveries, &sent, &[outage], 1, None, &mut r);
        assert_eq!(r.unexplained_errors, 1);

        // And not a send that ended before the kill.
        let early = Outage {
            killed: t0 + 31 * s,
            restarted: t0 + 32 * s,
            offline_until: None,
        };
        let mut r = SoakReport::default();
        reconcile(&outcomes, &deliveries, &sent, &[early], 16, None, &mut r);
        assert_eq!(r.unexplained_errors, 2);
    }
}
