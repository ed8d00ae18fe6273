//! Relay statistics: lock-free counters, rendered in the Prometheus text
//! format for `--metrics ADDR`. Counts and sizes only, never content.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use agent_link_proto::ErrorCode;

/// Counters shared by every task.
#[derive(Debug)]
pub struct Stats {
    /// Connections accepted (handshake completed).
    pub connections_accepted: AtomicU64,
    /// Connections refused or closed for a reason (revoked, unregistered, …).
    pub connections_refused: AtomicU64,
    /// Handshakes that failed (bad certificate, wrong ALPN, timeout).
    pub handshakes_failed: AtomicU64,
    /// Connection attempts answered with a QUIC Retry (unvalidated
    /// addresses under load, `retry_threshold`).
    pub retries_sent: AtomicU64,
    /// Envelopes forwarded to a target stream.
    pub messages_forwarded: AtomicU64,
    /// Payload-carrying bytes forwarded (envelope sizes).
    pub bytes_forwarded: AtomicU64,
    /// Receipts routed back to senders.
    pub receipts_routed: AtomicU64,
    /// Receipts whose sender stream had gone away.
    pub receipts_orphaned: AtomicU64,
    /// Registrations accepted.
    pub registrations: AtomicU64,
    /// `Ack`/`Nack` frames dropped: no delivery outstanding on the replying
    /// stream under that token and id (a forged, repeated or stray reply).
    pub replies_dropped: AtomicU64,
    /// Deliveries failed `TargetOffline` because their target stream ended
    /// before they were answered.
    pub deliveries_failed_unanswered: AtomicU64,
    /// In a fleet: envelopes forwarded to the relay holding their target.
    pub fleet_forwards: AtomicU64,
    /// In a fleet: forwards sent again, unanswered after 2 s.
    pub fleet_forwards_resent: AtomicU64,
    /// In a fleet: forwards given up unanswered after 10 s (their senders'
    /// own deadline and retry take over).
    pub fleet_forwards_unanswered: AtomicU64,
    /// In a fleet: NATS messages of forwards sent (each a batch).
    pub fleet_batches_sent: AtomicU64,
    refused: [AtomicU64; ErrorCode::ALL.len()],
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            connections_accepted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            handshakes_failed: AtomicU64::new(0),
            retries_sent: AtomicU64::new(0),
            messages_forwarded: AtomicU64::new(0),
            bytes_forwarded: AtomicU64::new(0),
            receipts_routed: AtomicU64::new(0),
            receipts_orphaned: AtomicU64::new(0),
            registrations: AtomicU64::new(0),
            replies_dropped: AtomicU64::new(0),
            deliveries_failed_unanswered: AtomicU64::new(0),
            fleet_forwards: AtomicU64::new(0),
            fleet_forwards_resent: AtomicU64::new(0),
            fleet_forwards_unanswered: AtomicU64::new(0),
            fleet_batches_sent: AtomicU64::new(0),
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Stats {
    /// Count a refusal by code.
    pub fn refused(&self, code: ErrorCode) {
        if let Some(c) = self.refused.get(code.as_u32() as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// Refusals counted for `code`.
    pub fn refused_count(&self, code: ErrorCode) -> u64 {
        self.refused
            .get(code.as_u32() as usize)
            .map_or(0, |c| c.load(Relaxed))
    }

    /// Prometheus text exposition.
    pub fn render(&self, online_instances: usize) -> String {
        let mut out = String::new();
        let mut line = |name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP agent_link_{name} {help}\n# TYPE agent_link_{name} counter\nagent_link_{name} {v}\n"
            ));
        };
        line(
            "connections_accepted_total",
            "Connections accepted.",
            self.connections_accepted.load(Relaxed),
        );
        line(
            "connections_refused_total",
            "Connections refused or closed by policy.",
            self.connections_refused.load(Relaxed),
        );
        line(
            "handshakes_failed_total",
            "Failed QUIC/TLS handshakes.",
            self.handshakes_failed.load(Relaxed),
        );
        line(
            "retries_sent_total",
            "Connection attempts answered with a QUIC Retry.",
            self.retries_sent.load(Relaxed),
        );
        line(
            "messages_forwarded_total",
            "Envelopes forwarded.",
            self.messages_forwarded.load(Relaxed),
        );
        line(
            "bytes_forwarded_total",
            "Envelope bytes forwarded.",
            self.bytes_forwarded.load(Relaxed),
        );
        line(
            "receipts_routed_total",
            "Receipts routed back.",
            self.receipts_routed.load(Relaxed),
        );
        line(
            "receipts_orphaned_total",
            "Receipts whose sender had gone.",
            self.receipts_orphaned.load(Relaxed),
        );
        line(
            "registrations_total",
            "Registrations accepted.",
            self.registrations.load(Relaxed),
        );
        line(
            "replies_dropped_total",
            "Acks and Nacks for no delivery outstanding on their stream.",
            self.replies_dropped.load(Relaxed),
        );
        line(
            "deliveries_failed_unanswered_total",
            "Deliveries failed TargetOffline: their target stream ended unanswered.",
            self.deliveries_failed_unanswered.load(Relaxed),
        );
        line(
            "fleet_forwards_total",
            "Envelopes forwarded to the relay of the fleet holding their target.",
            self.fleet_forwards.load(Relaxed),
        );
        line(
            "fleet_forwards_resent_total",
            "Forwards sent again, unanswered after 2 s.",
            self.fleet_forwards_resent.load(Relaxed),
        );
        line(
            "fleet_forwards_unanswered_total",
            "Forwards given up unanswered after 10 s.",
            self.fleet_forwards_unanswered.load(Relaxed),
        );
        line(
            "fleet_batches_sent_total",
            "NATS messages carrying forwards (batches).",
            self.fleet_batches_sent.load(Relaxed),
        );
        out.push_str("# HELP agent_link_refused_total Frames and messages refused, by code.\n# TYPE agent_link_refused_total counter\n");
        for code in ErrorCode::ALL {
            out.push_str(&format!(
                "agent_link_refused_total{{code=\"{code:?}\"}} {}\n",
                self.refused_count(code)
            ));
        }
        out.push_str(&format!(
            "# HELP agent_link_online_instances Instances with an open connection.\n# TYPE agent_link_online_instances gauge\nagent_link_online_instances {online_instances}\n"
        ));
        out
    }
}
