//! The `direct` baseline: the same bench-side raw senders and the same
//! framing, but each receiving instance is a QUIC server the senders dial
//! straight, no relay. A receiver decodes each `Send` frame, opens the
//! envelope and answers with the `Receipt` frame the relay would have
//! routed back. This is the "relay path ≥ 0.5× direct" yardstick.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_link_crypto::tls::{relay_server_config, TlsIdentity, RELAY_SERVER_NAME};
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::{codec, Address, OpenedEnvelope, PeerToRelay, Receipt, RelayToPeer};
use agent_link_quic::endpoint::{mtu_discovery, udp_socket, UDP_RECV_BUFFER};
use anyhow::{bail, Result};

use crate::load::{Outcome, RunCfg};
use crate::progress::Progress;
use crate::raw::{self, now_ms, RawAgent};
use crate::report::{Figure, System};
use crate::workload::{Names, Workload};

/// The relay's default `max_udp_payload_size` (quinn's discovery bound).
const RELAY_DEFAULT_UDP_PAYLOAD: u16 = 1452;

/// A receiving instance's server endpoint and its certificate fingerprint.
/// It takes and probes for datagrams of at most `max_udp` bytes, as the relay
/// of a run with the same `--max-udp-payload` would.
fn server(identity: &Identity, max_udp: u16) -> Result<(quinn::Endpoint, [u8; 32])> {
    let tls = TlsIdentity::self_signed(identity, RELAY_SERVER_NAME)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(relay_server_config(&tls)?)?;
    // The same datagram size as the relay path of the run, so the baseline
    // differs from it only by the hop.
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.mtu_discovery_config(Some(mtu_discovery(max_udp)));
    server.transport_config(Arc::new(t));
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.max_udp_payload_size(max_udp)?;
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server),
        udp_socket("127.0.0.1:0".parse()?, UDP_RECV_BUFFER)?,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, tls.fingerprint()))
}

async fn serve(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(answer(RawAgent::from_streams(conn.clone(), send, recv)));
            }
        });
    }
}

/// Answer every `Send` with a `Receipt`, in batches.
async fn answer(mut s: RawAgent) -> Result<()> {
    let mut frames = Vec::new();
    let mut out = Vec::new();
    while s.frames(&mut frames).await? {
        out.clear();
        for f in &frames {
            let PeerToRelay::Send { envelope } = codec::decode::<PeerToRelay>(f)? else {
                bail!("unexpected frame");
            };
            let env = OpenedEnvelope::open(envelope)?;
            let receipt = Receipt {
                id: env.body.id,
                from: Address {
                    instance: env.body.to.instance,
                    agent: env.body.to.agent,
                },
                delivered_at_ms: now_ms(),
            };
            codec::encode_frame(&RelayToPeer::Receipt { receipt }, &mut out)?;
        }
        s.send.write_all(&out).await?;
    }
    Ok(())
}

pub async fn run(cfg: &RunCfg) -> Result<Figure> {
    let topo = &cfg.topo;
    if topo.workload == Workload::FanOut {
        bail!("--mode direct supports the pairs and fan-in workloads (a fan-out sender would need one stream per receiver)");
    }
    let names = Names {
        prefix: "bench".into(),
    };
    let fleet = FleetSecret::generate().key();
    let mut servers = Vec::new();
    let mut serving = tokio::task::JoinSet::new();
    for _ in 0..topo.receivers.instances {
        let max_udp = cfg.max_udp_payload.unwrap_or(RELAY_DEFAULT_UDP_PAYLOAD);
        let (endpoint, fp) = server(&Identity::generate(), max_udp)?;
        servers.push((endpoint.local_addr()?, fp));
        serving.spawn(serve(endpoint));
    }
    let slots = cfg.slots();
    let mut ready = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..topo.senders.instances {
        let id = Identity::generate();
        let instance = names.sender_instance(i);
        // Every agent of this instance sends to one receiving instance.
        let (ri, _) = topo
            .receivers
            .locate(topo.targets[i * topo.senders.agents][0]);
        let (addr, fp) = servers[ri];
        let endpoint = raw::client_endpoint(&id, fp)?;
        let conn = endpoint.connect(addr, RELAY_SERVER_NAME)?.await?;
        for a in 0..topo.senders.agents {
            let agent = Names::sender_agent(a);
            let k = i * topo.senders.agents + a;
            let targets = topo.target_names(k, &names);
            let pool = raw::sign_pool(&id, &fleet, (&instance, &agent), &targets, cfg.size, slots)?;
            ready.push((RawAgent::open(&conn).await?, pool));
        }
        endpoints.push((endpoint, conn));
    }
    let plan = cfg.plan(Instant::now() + Duration::from_millis(100));
    let mut senders = tokio::task::JoinSet::new();
    let n = ready.len();
    for (k, (tx, pool)) in ready.into_iter().enumerate() {
        senders.spawn(raw::run_sender(tx, pool, plan.staggered(k, n)));
    }
    let _bar = Progress::start(
        format!("direct {} {} B", topo.label(), cfg.size),
        plan.measure_from,
        plan.measure_until,
    );
    tokio::time::sleep_until(plan.measure_from.into()).await;
    let packets = crate::netstat::PacketMeter::start();
    let mut out = Outcome::new();
    while let Some(r) = senders.join_next().await {
        out.add(&r??);
    }
    let packets = packets.stop();
    for (_, conn) in endpoints {
        conn.close(0u32.into(), b"done");
    }
    serving.abort_all();
    Ok(Figure::new(
        System::Direct,
        &cfg.info(),
        &out,
        None,
        packets,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_baseline_assumes_the_relays_default_datagram_size() {
        assert_eq!(
            super::RELAY_DEFAULT_UDP_PAYLOAD,
            agent_link_relay::RelayConfig::default().max_udp_payload_size
        );
    }
}
