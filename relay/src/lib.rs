//! The agent-link relay: a QUIC server that authenticates instances by their
//! Ed25519 keys, checks every message (size, sender binding, fleet HMAC,
//! timestamp, optionally Ed25519) and forwards the envelope's original bytes
//! to the target agent's stream. It stores no message content: only the
//! registry of instances is persisted.
//!
//! Where things live, from the bottom up (no module imports one above it):
//! - [`RelayConfig`]: `relay-config.json`, every limit, validated at load;
//!   [`state`]: the state directory (keys, certificate, fleet secret).
//! - [`core`]: the pure relay, every decision about keys, streams and frames
//!   with `now` passed in (no tokio, no quinn).
//! - [`router`]: the routing table; [`registry`]: instance ids ↔ keys,
//!   revocations, crash-safe persistence, and the running relay's live view.
//! - `server`: [`Relay`] lifecycle and the tasks per connection and per
//!   stream, which read frames (`agent_link_quic::frames`, the reader the peer uses too), call into [`core`] and carry out
//!   what it decides.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // A directory of your own (not /tmp, where others may plant or read
//! // files): the per-user default, `~/.local/share/agent-link-relay`.
//! let dir = agent_link_relay::state::default_dir();
//! let state = agent_link_relay::state::init(&dir, Some("127.0.0.1:0".parse()?))?;
//! let relay = agent_link_relay::Relay::spawn(state, Default::default()).await?;
//! let week = std::time::Duration::from_secs(7 * 24 * 3600);
//! println!("invite for instance-001: {}", relay.invite("instance-001", week)?);
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(missing_docs, unreachable_pub)]

/// A fleet of relays on NATS (issue 12, in progress; see the module).
pub mod cluster;
mod config;
pub mod core;
pub mod registry;
/// The routing table. Public for the criterion suite
/// (`bench/benches/hot_path.rs`), which times route lookups and queueing a
/// delivery the way an agent stream does; a relay is run through [`Relay`].
pub mod router;
mod server;
pub mod state;
mod stats;

pub use config::{ClusterConfig, ConfigError, RelayConfig, TlsConfig};
pub use server::admin::{query_online, OnlineInstance};
pub use server::writer::Outbound;
pub use server::{Relay, SpawnError, SpawnOptions};
pub use stats::Stats;
