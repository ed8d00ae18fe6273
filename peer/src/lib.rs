//! The agent-link peer library: connect an instance to a relay, attach
//! agents, send messages that come back with a delivery receipt or an error
//! that names the cause, and receive messages that were verified end to end
//! (fleet HMAC, strict Ed25519 under the sender's pinned key, timestamp,
//! replay window).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use agent_link::AgentLink;
//! let link = AgentLink::connect("/path/to/peer-dir").await?;   // AgentLink(config_path=...)
//! let mut me = link.attach("healthguard").await?;
//! let receipt = me.send("instance-002/xiaobaozi", "hi").await?; // link.send(...)
//! println!("delivered at {}", receipt.delivered_at_ms);
//! while let Some(msg) = me.recv().await {                       // @link.on_message
//!     println!("{}: {}", msg.from, String::from_utf8_lossy(&msg.payload));
//! }
//! # Ok(()) }
//! ```
//!
//! Modules: [`config`] (the peer directory), `link` (connection supervisor
//! and agent tasks), `receive` (the receiver's checks), `pins` (trust on
//! first use of other instances' keys), `outbox` (messages waiting for an
//! outcome), `wire` (QUIC and frame I/O), `init`
//! (online registration), `error` (errors and exit codes).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod config;
mod error;
mod init;
mod link;
mod outbox;
mod pins;
mod receive;
mod wire;

pub use agent_link_proto::{ErrorCode, InstanceStatus, JoinToken};
pub use error::{exit_code_of, LinkError, SendError};
pub use init::init;
pub use link::{Agent, AgentLink, Message, Receipt, StatusReport, OUTBOX_LIMIT};
pub use wire::{
    client_transport_config, endpoint_config, mtu_discovery, udp_socket, MAX_UDP_PAYLOAD,
    UDP_RECV_BUFFER,
};
