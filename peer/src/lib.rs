//! The agent-link peer library: connect an instance to a relay, attach
//! agents, send messages that come back with a delivery receipt or an error
//! that names the cause, and receive messages verified end to end (fleet
//! HMAC, strict Ed25519 under the sender's pinned key, timestamp, replay
//! window).
//!
//! The entry point is [`AgentLink`]: connect with a peer directory made by
//! `agent-link init`, attach an [`Agent`], then [`Agent::send`] and
//! [`Agent::recv`]. A [`Receipt`] means the receiving agent's application
//! took the message; anything else is a [`SendError`] that says why.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use agent_link::AgentLink;
//! let link = AgentLink::connect("/path/to/peer-dir").await?;
//! let mut me = link.attach("healthguard").await?;
//! let receipt = me.send("instance-002/xiaobaozi", "hi").await?;
//! println!("delivered {} to {} at {}", receipt.id, receipt.to, receipt.delivered_at_ms);
//! while let Some(msg) = me.recv().await {
//!     println!("{}: {}", msg.from, String::from_utf8_lossy(&msg.payload));
//! }
//! me.close().await;
//! link.close().await;
//! # Ok(()) }
//! ```
//!
//! Inside: `link` (the handle), `agent` (an agent's handle; seals each
//! message once), `task` (an agent's driver), `supervisor` (connects and
//! reconnects), `core` (the sans-IO state machine of an agent: outbox,
//! receiver checks, backoff), `transport` (QUIC set-up and frame I/O),
//! `config`, `pins` (trust on first use), `init` (online registration).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(missing_docs, unreachable_pub)]

mod agent;
pub mod config;
mod core;
#[cfg(feature = "daemon")]
pub mod daemon;
mod error;
mod find;
mod fleet;
mod init;
mod link;
mod message;
mod pins;
mod supervisor;
mod task;
mod transport;

pub use agent::{Agent, AgentSender};
pub use agent_link_proto::{ErrorCode, Exit, InstanceStatus, JoinToken};
pub use error::{CloseReason, LinkError, Phase, SendError};
pub use find::{find_agent, FindAgentError};
pub use init::{init, init_with, trust};
pub use link::{AgentLink, AgentLinkBuilder, StatusReport};
pub use message::{Message, MessageId, Receipt};

/// The `tracing` target of a receiver's refusals for a sender's key
/// (changed, or not pinned under strict pins) and of pin-file trouble: the
/// CLI's `listen` prints these even when `RUST_LOG` is unset.
pub const PINS_LOG_TARGET: &str = "agent_link::pins";
