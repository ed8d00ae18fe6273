//! The end-to-end figure: the `agent-link` library on both sides with every
//! check on. Each sender signs every message as it sends it; each receiver
//! verifies HMAC, Ed25519 (strict) and the replay window before it answers
//! with a receipt.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link::AgentLink;
use agent_link_proto::JoinToken;
use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::{bench_relay_config, figure, relay_proc, Args, Figure, Mode};

pub async fn run(args: &Args, bin: &std::path::Path) -> Result<Figure> {
    let dir = tempfile::tempdir()?;
    let relay = relay_proc::RelayProcess::start(
        bin,
        &dir.path().join("relay"),
        &[],
        &bench_relay_config(args),
    )?;
    let token = JoinToken::parse(&relay.token)?;
    let mut links = Vec::new();
    for k in 0..args.pairs {
        for role in ["s", "r"] {
            let id = format!("e2e-{role}{k}");
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
    let measure_from = start + Duration::from_secs(args.warmup);
    let measure_until = measure_from + Duration::from_secs(args.duration);
    let mut handlers = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..args.pairs {
        let sender = links[2 * k].sender("tx").await?;
        let receiver = links[2 * k + 1].attach("rx").await?;
        handlers.push(receiver.on_message(|_m| {}));
        let sender = Arc::new(sender);
        let to = format!("e2e-r{k}/rx");
        let payload = bytes::Bytes::from(vec![0x5au8; args.size]);
        for _ in 0..args.window {
            let (sender, to, payload) = (sender.clone(), to.clone(), payload.clone());
            tasks.spawn(async move {
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
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
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = relay.cpu_seconds();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut delivered, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (ok, f, h) = r?;
        delivered += ok;
        failed += f;
        hist.add(&h)?;
    }
    let cpu = relay.cpu_seconds() - cpu0;
    for h in handlers {
        h.abort();
    }
    for l in links {
        l.close().await;
    }
    let peak = relay.peak_rss_kib();
    relay.stop();
    Ok(figure(Mode::E2e, args, delivered, failed, &hist, cpu, peak))
}
