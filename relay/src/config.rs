//! The relay's configuration (`relay-config.json` in the state directory): a
//! plain struct with defaults, validated once at load so a bad value fails at
//! start with the field's name, never deep inside a task. Every bound the
//! relay enforces lives here.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Default listen address: port 8765, as in the tool agent-link replaces.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8765";

/// Relay configuration. Unknown fields are refused (a typo must not silently
/// fall back to a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Largest message payload, in bytes.
    pub max_message_size: u32,
    /// Concurrent connections, relay-wide.
    pub max_connections: u32,
    /// Concurrent connections of one instance (each CLI process is one).
    pub max_connections_per_instance: u32,
    /// Agent streams one connection may open (control streams come on top).
    pub max_agents_per_connection: u32,
    /// Close a connection silent for this long.
    pub idle_timeout_secs: u64,
    /// Keep-alive interval, well under the idle timeout.
    pub keep_alive_secs: u64,
    /// Time allowed for the QUIC/TLS handshake.
    pub handshake_timeout_secs: u64,
    /// New connections accepted per second, relay-wide (token bucket with a
    /// burst of the same size); more are refused before any cryptography.
    pub handshakes_per_sec: u32,
    /// New connections accepted per second from one source address (an
    /// IPv4 address or an IPv6 /64; bucket of the same size). Only
    /// addresses QUIC has validated (by a Retry or NEW_TOKEN round trip)
    /// are counted, so forged Initials cannot spend a member's share; see
    /// `retry_threshold`.
    pub handshakes_per_sec_per_ip: u32,
    /// From how many handshakes in progress, or unvalidated connection
    /// attempts in about a second, the relay answers an attempt from an
    /// address not yet validated with a stateless QUIC Retry instead of a
    /// handshake. A real client comes back at once with the token (one
    /// round trip more); a spoofed source never does, so a flood of forged
    /// Initials costs one small packet each and no state. 0: always Retry.
    pub retry_threshold: u32,
    /// Connections of unregistered keys (which may only register) held at
    /// once; more are closed at once with `TooManyConnections`. Each holds
    /// its slot for at most `auth_timeout_secs`. Registered keys never
    /// wait for these slots.
    pub max_stranger_connections: u32,
    /// Time an unregistered key has to register, and any stream to send its
    /// first frame.
    pub auth_timeout_secs: u64,
    /// Time a frame that has begun arriving has to arrive whole; a stream
    /// that trickles a frame slower than this is ended (slowloris). A stream
    /// idle between frames is not affected.
    pub frame_timeout_secs: u64,
    /// Messages per second one instance may send (token bucket rate).
    pub rate_per_instance: u32,
    /// Burst size of that bucket.
    pub rate_burst: u32,
    /// Accepted distance between a message's timestamp and the relay's clock.
    pub timestamp_window_secs: u64,
    /// Also verify every Ed25519 signature at the relay (receivers always do).
    pub verify_signatures: bool,
    /// Frames queued for one agent stream before senders get `Busy`.
    pub agent_queue_len: u32,
    /// Bytes of deliveries queued for one agent stream before senders get
    /// `Busy` (bounds memory when messages are large; at least one frame).
    pub agent_queue_bytes: u32,
    /// Bytes of deliveries queued for all of one instance's agent streams
    /// together (over all its connections) before senders get `Busy`: the
    /// memory one member can make the relay hold for it, however many
    /// agents it attaches. At least `agent_queue_bytes`.
    pub instance_queue_bytes: u64,
    /// QUIC per-stream receive window, bytes.
    pub stream_receive_window: u32,
    /// QUIC per-connection receive window, bytes.
    pub receive_window: u32,
    /// QUIC per-connection send window, bytes.
    pub send_window: u64,
    /// Largest UDP payload the relay accepts and lets QUIC path MTU
    /// discovery probe for, in both directions of every connection (peers
    /// take up to 4096, `agent_link::MAX_UDP_PAYLOAD`). The default, 1452,
    /// is quinn's and fits any 1500-byte path. Where the paths carry more
    /// (peers on the same host, a jumbo-frame LAN), 4096 puts about three
    /// times as many small messages in a packet: on loopback the 10-pair
    /// ceiling went from 184k to 351k msg/s and relay CPU from 5.35 to
    /// 2.80 µs per message (README, Performance). It costs ~3 KiB more per
    /// idle connection and a few probes per connection and direction, and
    /// it slowed the 10,000-instance one-in-flight exchange here; hence
    /// opt-in.
    pub max_udp_payload_size: u16,
    /// Accept `Register` proved with the fleet secret (the open fleet token,
    /// `invite --reusable`) from any new key. Off by default: joining takes a
    /// single-use invite bound to one id (`invite --instance-id`), so a
    /// member who is revoked cannot come back under another id with the
    /// secret every member holds.
    pub open_registration: bool,
    /// Registrations per second, relay-wide (token bucket, burst the same),
    /// invites and open registration together: each is a registry write and
    /// an fsync. Over it the peer gets `RegistrationClosed` and may retry.
    pub registrations_per_sec: u32,
    /// Run as one relay of a fleet on a NATS cluster (`init --cluster`):
    /// the registry, who is attached where, and relay-to-relay deliveries
    /// go through NATS. Absent: the relay runs alone on its
    /// `registry.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// Present a certificate chain from a certificate authority instead of
    /// the relay's pinned self-signed certificate (public deployments).
    /// Join tokens then tell peers to check the chain against their CA
    /// roots for the host they dial (`invite --addr`, or `advertise` in a
    /// fleet), which must be a name (or IP address) the certificate is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// `tls` in `relay-config.json`: PEM files, absolute or relative to the
/// relay's directory. Read at start; a renewed certificate takes a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The relay's certificate, then its intermediates.
    pub cert_chain: String,
    /// The certificate's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: String,
}

/// `cluster` in `relay-config.json` (DESIGN.md, "A fleet of relays").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS servers to connect to (any of the cluster's; the client learns
    /// the others from them), as `nats://HOST:PORT`.
    pub nats: Vec<String>,
    /// This relay's name in the fleet, unique among its relays: 1-64
    /// characters from A-Z a-z 0-9 _ - (it is a NATS subject token).
    pub relay_id: String,
    /// Replicas of the fleet's JetStream buckets when this relay is the one
    /// that creates them. Absent: 3, or fewer when the NATS cluster has
    /// fewer servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    /// The address peers dial for this relay, as the join token lists it
    /// (absent: the listen address, loopback for an unspecified one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid literal address"),
            max_message_size: 1 << 20,
            max_connections: 16_384,
            max_connections_per_instance: 16,
            max_agents_per_connection: 64,
            idle_timeout_secs: 30,
            keep_alive_secs: 10,
            handshake_timeout_secs: 10,
            handshakes_per_sec: 2_000,
            handshakes_per_sec_per_ip: 100,
            retry_threshold: 64,
            max_stranger_connections: 64,
            auth_timeout_secs: 10,
            frame_timeout_secs: 30,
            rate_per_instance: 200_000,
            rate_burst: 20_000,
            timestamp_window_secs: 60,
            verify_signatures: false,
            agent_queue_len: 1024,
            agent_queue_bytes: 4 << 20,
            instance_queue_bytes: 32 << 20,
            stream_receive_window: (1 << 20) + (64 << 10),
            receive_window: 8 << 20,
            send_window: 8 << 20,
            max_udp_payload_size: 1452,
            open_registration: false,
            registrations_per_sec: 10,
            cluster: None,
            tls: None,
        }
    }
}

/// A configuration that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why (missing, no permission).
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed or has an unknown field.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field is out of range.
    #[error("{path}: field `{field}` {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// The field, as spelled in the file.
        field: &'static str,
        /// What is wrong with its value, and the range allowed.
        problem: String,
    },
}

/// Bytes a frame may carry beyond the payload (ids, addresses, tag,
/// signature, framing); generous, so valid messages at the size limit fit.
pub(crate) const FRAME_OVERHEAD: u32 = 1024;

impl RelayConfig {
    /// Largest frame body accepted on a stream.
    pub fn max_frame(&self) -> usize {
        (self.max_message_size + FRAME_OVERHEAD) as usize
    }

    /// The frame deadline (see [`RelayConfig::frame_timeout_secs`]).
    pub fn frame_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.frame_timeout_secs)
    }

    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: p.clone(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        cfg.validate(&p)?;
        Ok(cfg)
    }

    /// Check every bound; `path` names the file in errors.
    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |field: &'static str, problem: &str| ConfigError::Invalid {
            path: path.to_string(),
            field,
            problem: problem.to_string(),
        };
        let max_payload = (agent_link_proto::codec::HARD_MAX_FRAME as u32) - FRAME_OVERHEAD;
        if self.max_message_size == 0 || self.max_message_size > max_payload {
            return Err(bad(
                "max_message_size",
                &format!("must be between 1 and {max_payload}"),
            ));
        }
        let nonzero: [(&'static str, u64); 16] = [
            ("max_connections", self.max_connections.into()),
            (
                "max_connections_per_instance",
                self.max_connections_per_instance.into(),
            ),
            (
                "max_agents_per_connection",
                self.max_agents_per_connection.into(),
            ),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("keep_alive_secs", self.keep_alive_secs),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            ("handshakes_per_sec", self.handshakes_per_sec.into()),
            (
                "handshakes_per_sec_per_ip",
                self.handshakes_per_sec_per_ip.into(),
            ),
            (
                "max_stranger_connections",
                self.max_stranger_connections.into(),
            ),
            ("auth_timeout_secs", self.auth_timeout_secs),
            ("frame_timeout_secs", self.frame_timeout_secs),
            ("rate_per_instance", self.rate_per_instance.into()),
            ("rate_burst", self.rate_burst.into()),
            ("timestamp_window_secs", self.timestamp_window_secs),
            ("agent_queue_len", self.agent_queue_len.into()),
            ("registrations_per_sec", self.registrations_per_sec.into()),
        ];
        for (field, v) in nonzero {
            if v == 0 {
                return Err(bad(field, "must be greater than 0"));
            }
        }
        if self.keep_alive_secs >= self.idle_timeout_secs {
            return Err(bad(
                "keep_alive_secs",
                "must be less than idle_timeout_secs",
            ));
        }
        // Unvalidated attempts reach the relay-wide bucket at up to
        // `retry_threshold` a second; below `handshakes_per_sec`, a flood of
        // forged Initials can never spend the whole relay-wide rate.
        if self.retry_threshold >= self.handshakes_per_sec {
            return Err(bad(
                "retry_threshold",
                "must be less than handshakes_per_sec",
            ));
        }
        if self.timestamp_window_secs > 3600 {
            return Err(bad("timestamp_window_secs", "must be at most 3600"));
        }
        if (self.agent_queue_bytes as usize) < self.max_frame() + 4 {
            return Err(bad(
                "agent_queue_bytes",
                "must hold one whole frame (max_message_size + 1028 bytes)",
            ));
        }
        if self.instance_queue_bytes < u64::from(self.agent_queue_bytes) {
            return Err(bad(
                "instance_queue_bytes",
                "must be at least agent_queue_bytes",
            ));
        }
        if (self.stream_receive_window as usize) < self.max_frame() + 4 {
            return Err(bad(
                "stream_receive_window",
                "must hold one whole frame (max_message_size + 1028 bytes)",
            ));
        }
        if self.receive_window < self.stream_receive_window {
            return Err(bad(
                "receive_window",
                "must be at least stream_receive_window",
            ));
        }
        if self.send_window < u64::from(self.stream_receive_window) {
            return Err(bad("send_window", "must be at least stream_receive_window"));
        }
        if !(1200..=65_527).contains(&self.max_udp_payload_size) {
            return Err(bad(
                "max_udp_payload_size",
                "must be between 1200 and 65527 (QUIC's limits)",
            ));
        }
        if self.max_agents_per_connection > 1024 {
            return Err(bad("max_agents_per_connection", "must be at most 1024"));
        }
        if let Some(c) = &self.cluster {
            if c.nats.is_empty() {
                return Err(bad("cluster", "`nats` must list at least one server"));
            }
            if let Some(u) = c
                .nats
                .iter()
                .find(|u| !u.starts_with("nats://") && !u.starts_with("tls://"))
            {
                return Err(bad(
                    "cluster",
                    &format!(
                        "`nats` entry {:?} is not a nats:// or tls:// URL",
                        agent_link_proto::text::one_line(u)
                    ),
                ));
            }
            let id_ok = !c.relay_id.is_empty()
                && c.relay_id.len() <= 64
                && c.relay_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !id_ok {
                return Err(bad(
                    "cluster",
                    "`relay_id` must be 1-64 characters from A-Z a-z 0-9 _ -",
                ));
            }
            if c.replicas.is_some_and(|r| !(1..=5).contains(&r)) {
                return Err(bad("cluster", "`replicas` must be between 1 and 5"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_section_is_checked_and_round_trips() {
        let parse = |cluster: &str| -> Result<RelayConfig, String> {
            let cfg: RelayConfig = serde_json::from_str(&format!("{{\"cluster\": {cluster}}}"))
                .map_err(|e| e.to_string())?;
            cfg.validate("relay-config.json")
                .map_err(|e| e.to_string())?;
            Ok(cfg)
        };
        let good = parse(r#"{"nats": ["nats://127.0.0.1:4222"], "relay_id": "relay-1"}"#).unwrap();
        let c = good.cluster.clone().unwrap();
        assert_eq!((c.relay_id.as_str(), c.replicas), ("relay-1", None));
        let text = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<RelayConfig>(&text).unwrap(), good);
        assert!(!serde_json::to_string(&RelayConfig::default())
            .unwrap()
            .contains("cluster"));
        for (bad, says) in [
            (r#"{"nats": [], "relay_id": "r"}"#, "at least one"),
            (
                r#"{"nats": ["http://x:1"], "relay_id": "r"}"#,
                "not a nats://",
            ),
            (r#"{"nats": ["nats://x:1"], "relay_id": "a.b"}"#, "relay_id"),
            (r#"{"nats": ["nats://x:1"], "relay_id": ""}"#, "relay_id"),
            (
                r#"{"nats": ["nats://x:1"], "relay_id": "r", "replicas": 0}"#,
                "replicas",
            ),
            (
                r#"{"nats": ["nats://x:1"], "relay_id": "r", "nast": 1}"#,
                "unknown field",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn default_is_valid_and_round_trips() {
        let c = RelayConfig::default();
        c.validate("x").unwrap();
        // Generous enough for a whole 1 MiB frame on a slow link, short
        // enough that a trickling stream does not hold its slot for long.
        assert_eq!(c.frame_timeout(), std::time::Duration::from_secs(30));
        // A config written before the field existed still loads.
        let old: RelayConfig = serde_json::from_str(r#"{"auth_timeout_secs": 5}"#).unwrap();
        assert_eq!(old.frame_timeout_secs, 30);
        let text = serde_json::to_string_pretty(&c).unwrap();
        let back: RelayConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn errors_name_the_field() {
        let refused_naming = |c: RelayConfig, field: &str| {
            let err = c.validate("f").unwrap_err().to_string();
            assert!(err.contains(field), "{err} does not name {field}");
        };
        let d = RelayConfig::default;
        refused_naming(
            RelayConfig {
                max_message_size: 0,
                ..d()
            },
            "max_message_size",
        );
        refused_naming(
            RelayConfig {
                instance_queue_bytes: 1024,
                ..d()
            },
            "instance_queue_bytes",
        );
        refused_naming(
            RelayConfig {
                keep_alive_secs: 40,
                ..d()
            },
            "keep_alive_secs",
        );
        refused_naming(
            RelayConfig {
                frame_timeout_secs: 0,
                ..d()
            },
            "frame_timeout_secs",
        );
        refused_naming(
            RelayConfig {
                handshakes_per_sec_per_ip: 0,
                ..d()
            },
            "handshakes_per_sec_per_ip",
        );
        refused_naming(
            RelayConfig {
                retry_threshold: 2_000,
                ..d()
            },
            "retry_threshold",
        );
        refused_naming(
            RelayConfig {
                max_stranger_connections: 0,
                ..d()
            },
            "max_stranger_connections",
        );
        refused_naming(
            RelayConfig {
                max_udp_payload_size: 1199,
                ..d()
            },
            "max_udp_payload_size",
        );
        let err = serde_json::from_str::<RelayConfig>(r#"{"lisen": "1.2.3.4:5"}"#).unwrap_err();
        assert!(err.to_string().contains("lisen"));
    }
}
