//! The connection supervisor: one loop that connects (the first time too),
//! watches the connection, and reconnects with backoff. It publishes the
//! connection's state on a `watch` channel that every agent's driver
//! follows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_link_proto::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::core::backoff::Backoff;
use crate::error::{CloseReason, LinkError};
use crate::transport::{self, CONNECT_TIMEOUT, FAILOVER_CONNECT_TIMEOUT};

/// How long a round of dialling waits for a relay before it also dials the
/// next: a handshake takes one round trip and a little, so a relay that
/// answers wins long before this, and one that is down costs only this.
const RACE_STAGGER: Duration = Duration::from_millis(250);

/// The connection as the agents see it.
#[derive(Clone, Debug)]
pub(crate) enum ConnState {
    /// Between connections.
    Connecting,
    /// Up.
    Up(quinn::Connection),
    /// The relay refused this instance for good (`Revoked`, `NotRegistered`).
    Failed(ErrorCode),
    /// Closed here, or lost with `auto_reconnect` off.
    Closed(CloseReason),
}

/// One relay to dial: its `host:port`, the client configuration that
/// knows its certificate, and the TLS server name to ask for.
#[derive(Clone, Debug)]
pub(crate) struct RelayTarget {
    pub(crate) label: String,
    pub(crate) config: quinn::ClientConfig,
    pub(crate) server_name: String,
}

/// Where to connect: the relays of the peer's config, tried in turn from
/// the one that served last (a fleet of relays: any of them will do).
#[derive(Debug)]
pub(crate) struct Dialer {
    pub(crate) endpoint: quinn::Endpoint,
    relays: Vec<RelayTarget>,
    /// The relay to try next.
    next: usize,
    /// The relay the connection is to (its label), for errors and status.
    current: Arc<Mutex<Arc<str>>>,
}

impl Dialer {
    /// A dialer over `relays` (at least one), the first tried first.
    pub(crate) fn new(endpoint: quinn::Endpoint, relays: Vec<RelayTarget>) -> Self {
        assert!(!relays.is_empty(), "a dialer needs a relay");
        let current = Arc::new(Mutex::new(Arc::from(relays[0].label.as_str())));
        Self {
            endpoint,
            relays,
            next: 0,
            current,
        }
    }

    /// The label of the relay connected to (or last tried), shared.
    pub(crate) fn current(&self) -> Arc<Mutex<Arc<str>>> {
        self.current.clone()
    }

    /// The connection to the current relay was lost: with other relays to
    /// go to, start with the next one (a relay killed or cut off would cost
    /// a whole connect timeout first).
    fn lost(&mut self) {
        self.next = (self.next + 1) % self.relays.len();
    }

    /// How long one attempt may take: less with other relays to try.
    fn attempt_limit(&self) -> Duration {
        if self.relays.len() > 1 {
            FAILOVER_CONNECT_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        }
    }

    /// Connect, retrying with backoff until `deadline`: each round tries
    /// every relay ([`Dialer::race`]), and pauses only after all failed. A
    /// refusal by a relay is final (the fleet shares one registry); each
    /// attempt is bounded by what is left.
    pub(crate) async fn connect_by(
        &mut self,
        deadline: Instant,
    ) -> Result<quinn::Connection, LinkError> {
        let mut backoff = Backoff::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = left.min(self.attempt_limit()).max(Duration::from_millis(1));
            match self.race(limit).await {
                Ok((i, c)) => {
                    self.next = i;
                    *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
                        Arc::from(self.relays[i].label.as_str());
                    return Ok(c);
                }
                Err(e @ LinkError::Refused(_)) => return Err(e),
                Err(e) if Instant::now() + backoff.peek() / 2 >= deadline => return Err(e),
                Err(e) => {
                    debug!("connect failed: {e}");
                    let pause = backoff.next_delay(rand::random());
                    tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
                }
            }
        }
    }

    /// One round: dial the relays from `next` on, each [`RACE_STAGGER`]
    /// after the one before (a relay that is down answers nothing, so the
    /// next must not wait for its timeout), each attempt bounded by `limit`;
    /// the first connection wins and the others are dropped. The error of
    /// the last attempt to fail when none connects.
    async fn race(&self, limit: Duration) -> Result<(usize, quinn::Connection), LinkError> {
        use futures_util::stream::{FuturesUnordered, StreamExt as _};
        let n = self.relays.len();
        let mut attempts: FuturesUnordered<_> = (0..n)
            .map(|k| {
                let i = (self.next + k) % n;
                let target = &self.relays[i];
                let endpoint = &self.endpoint;
                async move {
                    tokio::time::sleep(RACE_STAGGER * k as u32).await;
                    let addr = transport::resolve(&target.label).await;
                    let r = match addr {
                        Ok(addr) => {
                            transport::connect(
                                endpoint,
                                &target.config,
                                addr,
                                &target.label,
                                &target.server_name,
                                limit,
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    (i, r)
                }
            })
            .collect();
        let mut last = None;
        while let Some((i, r)) = attempts.next().await {
            match r {
                Ok(c) => return Ok((i, c)),
                Err(e @ LinkError::Refused(_)) => return Err(e),
                Err(e) => {
                    debug!(relay = %self.relays[i].label, "connect failed: {e}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("a dialer has a relay"))
    }
}

/// A deadline that is never reached in practice (a year).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Keep the connection up until `shutdown`; publish each change.
pub(crate) async fn supervise(
    mut dialer: Dialer,
    auto_reconnect: bool,
    mut conn: quinn::Connection,
    state: watch::Sender<ConnState>,
    shutdown: CancellationToken,
    fleet: Arc<crate::fleet::FleetRing>,
) {
    loop {
        // The relay pushes the fleet secret in force on every connection.
        tokio::spawn(crate::fleet::take_pushes(conn.clone(), fleet.clone()));
        let reason = tokio::select! {
            r = conn.closed() => r,
            _ = shutdown.cancelled() => {
                state.send_replace(ConnState::Closed(CloseReason::LinkClosed));
                return;
            }
        };
        match agent_link_quic::endpoint::connection_error(&reason) {
            Some(code @ (ErrorCode::Revoked | ErrorCode::NotRegistered)) => {
                info!("relay refused this instance: {code}");
                state.send_replace(ConnState::Failed(code));
                return;
            }
            _ => info!("connection to the relay lost: {reason}"),
        }
        if !auto_reconnect {
            state.send_replace(ConnState::Closed(CloseReason::ConnectionLost));
            return;
        }
        state.send_replace(ConnState::Connecting);
        dialer.lost();
        // The same loop as the first connect, without a deadline: only a
        // refusal or `shutdown` ends it. A short pause first, so a fleet
        // that lost its relay does not come back in lockstep.
        let reconnect = async {
            let pause = Backoff::new().next_delay(rand::random());
            tokio::time::sleep(pause).await;
            dialer.connect_by(Instant::now() + FOREVER).await
        };
        conn = tokio::select! {
            r = reconnect => match r {
                Ok(c) => c,
                Err(e) => {
                    let code = match e {
                        LinkError::Refused(code) => code,
                        _ => ErrorCode::Internal,
                    };
                    state.send_replace(ConnState::Failed(code));
                    return;
                }
            },
            _ = shutdown.cancelled() => {
                state.send_replace(ConnState::Closed(CloseReason::LinkClosed));
                return;
            }
        };
        info!(relay = %dialer.current.lock().unwrap_or_else(|e| e.into_inner()), "reconnected");
        state.send_replace(ConnState::Up(conn.clone()));
    }
}
