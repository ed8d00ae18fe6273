//! The end-to-end figure: the `agent-link` library on both sides with every
//! check on. Each sender signs every message as it sends it; each receiver
//! verifies HMAC, Ed25519 (strict) and the replay window before it answers
//! with a receipt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link::AgentLink;
use anyhow::{bail, Context, Result};

use crate::ceiling::{run_names, RelayTarget, RelayUnderTest};
use crate::load::{new_histogram, Outcome, RunCfg};
use crate::progress::Progress;
use crate::report::{Figure, System};

pub async fn run(cfg: &RunCfg, target: &RelayTarget) -> Result<Figure> {
    if !cfg.topo.workload.is_pairs() || cfg.rate.is_some() || cfg.topo.senders.agents != 1 {
        bail!("the e2e figure is measured for the pairs workload, closed loop, one agent per instance");
    }
    let pairs = cfg.topo.senders.endpoints();
    let relay = RelayUnderTest::start(target, cfg)?;
    let token = relay.token.clone();
    let prefix = run_names().prefix;
    let dir = tempfile::tempdir()?;
    let mut links = Vec::new();
    for k in 0..pairs {
        for role in ["s", "r"] {
            let id = format!("{prefix}-e2e-{role}{k}");
            let pdir = dir.path().join(&id);
            agent_link::init(&pdir, &id, &token, None)
                .await
                .with_context(|| format!("init {id}"))?;
            links.push(
                AgentLink::connect(&pdir)
                    .await
                    .with_context(|| format!("connect {id}"))?,
            );
        }
    }
    let start = Instant::now() + Duration::from_millis(300);
    let measure_from = start + cfg.warmup;
    let measure_until = measure_from + cfg.duration;
    let mut handlers = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..pairs {
        let sender = links[2 * k].attach_sender("tx").await?;
        let receiver = links[2 * k + 1].attach("rx").await?;
        handlers.push(receiver.on_message(|_m| {}));
        let sender = Arc::new(sender);
        let to = format!("{prefix}-e2e-r{k}/rx");
        let payload = bytes::Bytes::from(vec![0x5au8; cfg.size]);
        for _ in 0..cfg.window {
            let (sender, to, payload) = (sender.clone(), to.clone(), payload.clone());
            tasks.spawn(async move {
                let mut hist = new_histogram();
                let (mut ok, mut failed) = (0u64, 0u64);
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let t0 = Instant::now();
                    if t0 >= measure_until {
                        break;
                    }
                    let r = sender.send(&to, payload.clone()).await;
                    let t1 = Instant::now();
                    if t0 >= measure_from && t1 <= measure_until {
                        match r {
                            Ok(_) => {
                                ok += 1;
                                let _ = hist.record(t1.duration_since(t0).as_micros() as u64);
                            }
                            Err(_) => failed += 1,
                        }
                    }
                }
                (ok, failed, hist)
            });
        }
    }
    let _bar = Progress::start(
        format!("e2e {} {} B", cfg.topo.label(), cfg.size),
        measure_from,
        measure_until,
    );
    let watch = relay.watch();
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = watch.map(|w| w.cpu_seconds());
    let packets = crate::netstat::PacketMeter::start();
    let mut out = Outcome::new();
    while let Some(r) = tasks.join_next().await {
        let (ok, f, h) = r?;
        out.delivered += ok;
        out.failed += f;
        out.offered += ok + f;
        out.latency.add(&h)?;
    }
    let server = watch
        .zip(cpu0)
        .map(|(w, c0)| (w.cpu_seconds() - c0, w.peak_rss_kib()));
    let packets = packets.stop();
    for h in handlers {
        h.abort();
    }
    for l in links {
        l.close().await;
    }
    relay.stop();
    Ok(Figure::new(System::E2e, &cfg.info(), &out, server, packets))
}
