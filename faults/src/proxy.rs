//! An impairing UDP proxy: it sits between QUIC peers and the relay and
//! delays, duplicates, reorders and drops datagrams in both directions.
//!
//! This kernel has no netem, so the harness impairs traffic itself. Each
//! client address gets its own upstream socket (like a NAT), so the relay
//! sees one peer per client and QUIC's path handling is exercised as it would
//! be behind a real middlebox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

/// What happens to each datagram, in each direction, independently.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Percentage of datagrams dropped (0–100).
    pub loss_pct: f64,
    /// Fixed delay added to every datagram.
    pub delay: Duration,
    /// Extra random delay, uniform in `0..jitter` (reorders as a side effect).
    pub jitter: Duration,
    /// Percentage of datagrams sent twice.
    pub duplicate_pct: f64,
    /// Percentage of datagrams held back by `reorder_hold`, so that the ones
    /// behind them overtake.
    pub reorder_pct: f64,
    /// How long a reordered datagram is held back.
    pub reorder_hold: Duration,
}

impl Impairment {
    /// No impairment: a plain forwarder.
    pub fn none() -> Self {
        Self::default()
    }

    fn passes_through(&self) -> bool {
        *self == Self::default()
            || (self.loss_pct <= 0.0
                && self.delay.is_zero()
                && self.jitter.is_zero()
                && self.duplicate_pct <= 0.0
                && self.reorder_pct <= 0.0)
    }
}

/// What the proxy did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProxyStats {
    /// Datagrams received from either side.
    pub received: u64,
    /// Datagrams dropped on purpose.
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Datagrams held back so later ones overtook them.
    pub reordered: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

struct Shared {
    /// Toward the relay, and toward the clients.
    plan: Mutex<(Impairment, Impairment)>,
    counters: Counters,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn plan(&self, dest: &Dest) -> Impairment {
        let p = *self.plan.lock().unwrap_or_else(|e| e.into_inner());
        match dest {
            Dest::Upstream(_) => p.0,
            Dest::Client(..) => p.1,
        }
    }

    fn track(&self, h: AbortHandle) {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(h);
    }
}

/// Where an impaired datagram goes.
#[derive(Clone)]
enum Dest {
    /// Back to a client, through the proxy's front socket.
    Client(Arc<UdpSocket>, SocketAddr),
    /// To the relay, through this client's connected upstream socket.
    Upstream(Arc<UdpSocket>),
}

impl Dest {
    async fn send(&self, data: &[u8]) {
        // A send error (e.g. the relay is down: ICMP port unreachable) is
        // what a lossy network does too; QUIC retransmits.
        let _ = match self {
            Dest::Client(s, to) => s.send_to(data, to).await,
            Dest::Upstream(s) => s.send(data).await,
        };
    }
}

/// A running proxy; stops when dropped.
pub struct UdpProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl UdpProxy {
    /// Listen on 127.0.0.1:0 and forward to `upstream` with `plan`.
    pub async fn start(upstream: SocketAddr, plan: Impairment) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            plan: Mutex::new((plan, plan)),
            counters: Counters::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(front_loop(front, upstream, shared.clone()));
        shared.track(task.abort_handle());
        Ok(Self { addr, shared })
    }

    /// The address clients should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Change the impairment (takes effect for the next datagram).
    pub fn set(&self, plan: Impairment) {
        self.set_each_way(plan, plan);
    }

    /// Impair the two directions differently: datagrams toward the relay,
    /// and datagrams toward the clients.
    pub fn set_each_way(&self, to_relay: Impairment, to_clients: Impairment) {
        *self.shared.plan.lock().unwrap_or_else(|e| e.into_inner()) = (to_relay, to_clients);
    }

    /// Counters so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            received: c.received.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            duplicated: c.duplicated.load(Ordering::Relaxed),
            reordered: c.reordered.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        for h in self
            .shared
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

async fn front_loop(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            // Linux reports ICMP errors of earlier sends here; keep serving.
            continue;
        };
        let up = match clients.get(&from) {
            Some(s) => s.clone(),
            None => {
                // Loopback to a loopback relay; otherwise (a relay in a
                // network namespace) any local address that routes there.
                let local: SocketAddr = if upstream.ip().is_loopback() {
                    "127.0.0.1:0".parse().expect("literal address")
                } else {
                    "0.0.0.0:0".parse().expect("literal address")
                };
                let Ok(s) = UdpSocket::bind(local).await else {
                    continue;
                };
                if s.connect(upstream).await.is_err() {
                    continue;
                }
                let s = Arc::new(s);
                let back = tokio::spawn(back_loop(
                    s.clone(),
                    Dest::Client(front.clone(), from),
                    shared.clone(),
                ));
                shared.track(back.abort_handle());
                clients.insert(from, s.clone());
                s
            }
        };
        impair(&shared, Dest::Upstream(up), &buf[..n]).await;
    }
}

async fn back_loop(up: Arc<UdpSocket>, to_client: Dest, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match up.recv(&mut buf).await {
            Ok(n) => impair(&shared, to_client.clone(), &buf[..n]).await,
            // ICMP "connection refused" while the relay is down: keep going,
            // it may come back on the same port.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn impair(shared: &Arc<Shared>, dest: Dest, data: &[u8]) {
    let c = &shared.counters;
    c.received.fetch_add(1, Ordering::Relaxed);
    let plan = shared.plan(&dest);
    if plan.passes_through() {
        dest.send(data).await;
        return;
    }
    if chance(plan.loss_pct) {
        c.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let copies = if chance(plan.duplicate_pct) {
        c.duplicated.fetch_add(1, Ordering::Relaxed);
        2
    } else {
        1
    };
    for _ in 0..copies {
        let mut wait = plan.delay;
        if !plan.jitter.is_zero() {
            wait += plan.jitter.mul_f64(rand::random::<f64>());
        }
        if chance(plan.reorder_pct) {
            c.reordered.fetch_add(1, Ordering::Relaxed);
            wait += plan.reorder_hold;
        }
        if wait.is_zero() {
            dest.send(data).await;
        } else {
            let (dest, data) = (dest.clone(), data.to_vec());
            let h = tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                dest.send(&data).await;
            });
            // Finished timers are not tracked: only the proxy's long-lived
            // loops need aborting, a delayed datagram ends by itself.
            drop(h);
        }
    }
}

fn chance(pct: f64) -> bool {
    pct > 0.0 && rand::random::<f64>() * 100.0 < pct
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, h)
    }

    async fn roundtrips(proxy: &UdpProxy, count: u8) -> Vec<u8> {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(proxy.addr()).await.unwrap();
        for i in 0..count {
            c.send(&[i]).await.unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), c.recv(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
            if got.len() > 4 * count as usize {
                break;
            }
        }
        got
    }

    #[tokio::test]
    async fn forwards_both_ways_unchanged_without_impairment() {
        let (up, _h) = echo().await;
        let p = UdpProxy::start(up, Impairment::none()).await.unwrap();
        assert_eq!(roundtrips(&p, 20).await, (0..20).collect::<Vec<u8>>());
        assert_eq!(p.stats().received, 40);
    }

    #[tokio::test]
    async fn total_loss_drops_everything_and_counts_it() {
        let (up, _h) = echo().await;
        let p = UdpProxy::start(
            up,
            Impairment {
                loss_pct: 100.0,
                ..Impairment::none()
            },
        )
        .await
        .unwrap();
        assert!(roundtrips(&p, 10).await.is_empty());
        assert_eq!(p.stats().dropped, 10);
    }

    #[tokio::test]
    async fn duplication_sends_extra_copies() {
        let (up, _h) = echo().await;
        let p = UdpProxy::start(
            up,
            Impairment {
                duplicate_pct: 100.0,
                ..Impairment::none()
            },
        )
        .await
        .unwrap();
        // Duplicated on the way there and again on the way back: 4 copies.
        let got = roundtrips(&p, 5).await;
        assert_eq!(got.len(), 20, "{got:?}");
        assert_eq!(p.stats().duplicated, 15, "5 + 10 echoes of duplicates");
    }

    #[tokio::test]
    async fn held_back_datagrams_are_overtaken() {
        let (up, _h) = echo().await;
        let p = UdpProxy::start(up, Impairment::none()).await.unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(p.addr()).await.unwrap();
        p.set(Impairment {
            reorder_pct: 100.0,
            reorder_hold: Duration::from_millis(300),
            ..Impairment::none()
        });
        c.send(&[1]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.set(Impairment::none());
        c.send(&[2]).await.unwrap();
        let mut buf = [0u8; 4];
        let mut order = Vec::new();
        for _ in 0..2 {
            let n = tokio::time::timeout(Duration::from_secs(5), c.recv(&mut buf))
                .await
                .unwrap()
                .unwrap();
            order.push(buf[..n][0]);
        }
        assert_eq!(order, vec![2, 1], "the held-back datagram arrived first");
    }
}
