//! The connection supervisor: one loop that connects (the first time too),
//! watches the connection, and reconnects with backoff. It publishes the
//! connection's state on a `watch` channel that every agent's driver
//! follows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent_link_proto::ErrorCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::core::backoff::Backoff;
use crate::error::{CloseReason, LinkError};
use crate::transport::{self, CONNECT_TIMEOUT};

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

/// Where to connect.
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) addr: SocketAddr,
    pub(crate) label: String,
}

impl Dialer {
    /// Connect, retrying with backoff until `deadline`. A refusal by the
    /// relay is final; each attempt is bounded by what is left.
    pub(crate) async fn connect_by(
        &self,
        deadline: Instant,
    ) -> Result<quinn::Connection, LinkError> {
        let mut backoff = Backoff::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = left.min(CONNECT_TIMEOUT).max(Duration::from_millis(1));
            match transport::connect(&self.endpoint, self.addr, &self.label, limit).await {
                Ok(c) => return Ok(c),
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
}

/// A deadline that is never reached in practice (a year).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Keep the connection up until `shutdown`; publish each change.
pub(crate) async fn supervise(
    dialer: Dialer,
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
        info!("reconnected to the relay");
        state.send_replace(ConnState::Up(conn.clone()));
    }
}
