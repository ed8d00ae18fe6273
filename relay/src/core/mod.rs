//! The pure relay: every decision the relay makes about a connection, a
//! stream or a frame, as plain functions and structs. No tokio, no quinn, no
//! clock read (the caller passes `now`), no counters: the tasks under
//! `server/` read bytes, call in here and carry out what comes back. So the
//! hard cases are unit tests that run in microseconds, and fuzz targets can
//! call the same code as the relay.
//!
//! - [`checks`]: the per-message checks (size, sender binding, fleet HMAC,
//!   timestamp, Ed25519) and batch signature verification.
//! - [`rate`]: the token bucket behind per-instance and handshake rates.
//! - [`handshake`]: which connection attempts get a handshake, a QUIC
//!   Retry or a refusal (per-source and relay-wide rates).
//! - [`limits`]: how many streams a connection may open, and when to raise
//!   the limit.
//! - [`admission`]: what a key may do, what a stream's first frame makes it,
//!   which control requests and registrations are acceptable.
//! - [`agent_stream`]: an agent stream's frames in, [`agent_stream::Action`]s
//!   out.
//! - [`deliveries`]: a receiving stream's queued and unanswered deliveries:
//!   bounds, each sender's share, and which replies are genuine.
//! - [`status`]: Status and StatusPage answers from a cached, pre-encoded
//!   snapshot, and when to rebuild it.

pub mod admission;
pub mod agent_stream;
pub mod checks;
pub mod deliveries;
pub mod handshake;
pub mod limits;
pub mod rate;
pub mod status;

/// A map keyed by a number this relay hands out itself (stream tokens,
/// delivery and forward numbers): no peer chooses these keys, so the
/// hash-flooding resistance of the default hasher buys nothing, and on the
/// message path its cost shows in profiles.
pub type TokenMap<V> = std::collections::HashMap<u64, V, rustc_hash::FxBuildHasher>;
