//! The agent-link relay: a QUIC server that authenticates instances by their
//! Ed25519 keys, checks every message (size, sender binding, fleet HMAC,
//! timestamp, optionally Ed25519) and forwards the envelope's original bytes
//! to the target agent's stream. It stores no message content: only the
//! registry of instances is persisted.
//!
//! Where things live:
//! - [`config`]: `relay-config.json`, every limit, validated at load.
//! - [`state`]: the state directory (keys, certificate, fleet secret).
//! - [`registry`]: instance ids ↔ keys, revocations, crash-safe persistence.
//! - [`checks`]: the pure per-message checks; `router`: the routing table.
//! - `server`: [`Relay`] lifecycle; `connection`, `stream`, `control`: the
//!   tasks per connection and per stream; `framed`: frame I/O on streams.
//! - [`admin`]: admin socket and metrics; [`stats`]: counters.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/tmp/relay-state");
//! let state = agent_link_relay::state::init(dir, Some("127.0.0.1:0".parse()?))?;
//! let relay = agent_link_relay::Relay::spawn(state, Default::default()).await?;
//! println!("join token: {}", relay.join_token());
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod checks;
pub mod config;
mod connection;
mod control;
mod framed;
pub mod rate;
pub mod registry;
// Public only so the bench crate's criterion suite can time route lookups;
// not part of the relay's supported API.
#[doc(hidden)]
pub mod router;
mod server;
pub mod state;
pub mod stats;
mod stream;

pub use config::RelayConfig;
pub use server::{Relay, SpawnError, SpawnOptions};
