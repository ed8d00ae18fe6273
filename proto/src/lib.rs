//! The agent-link wire format, in one place. No I/O, no clock: callers pass
//! `now` in. `PROTOCOL.md` at the repository root mirrors this crate byte for
//! byte, and the golden vectors under `tests/vectors/` prove they agree.
//!
//! - [`codec`]: the frame layout (4-byte big-endian length, then a bincode
//!   body) and the only bincode configuration in the project.
//! - [`deframe`]: the [`Deframer`](deframe::Deframer), bytes in and whole
//!   frames out, for every reader of a stream (no I/O, no clock).
//! - [`clock`]: the one conversion of a clock reading to wire milliseconds.
//! - [`frames`]: [`PeerToRelay`] and [`RelayToPeer`], split by direction so a
//!   decoder cannot accept a frame the other side should never send.
//! - [`envelope`]: the signed and tagged message, built by senders, checked
//!   by the relay and by receivers, forwarded as the original bytes.
//! - [`DeliverHead`]: a `Deliver` frame's head, so the relay forwards an
//!   envelope's original bytes behind it without copying them.
//! - [`ErrorCode`]: every refusal, as sent on the wire and mapped to exit codes.
//! - [`Exit`]: the exit codes of both command-line programs.
//! - [`text`]: untrusted text (payloads, names) as one printable line.
//! - [`ReplayWindow`]: receivers' bounded memory of message ids.
//! - [`JoinToken`]: the one-line invitation (relay address, certificate
//!   fingerprint, fleet secret).
//!
//! ```
//! use agent_link_proto::{codec, frames::PeerToRelay};
//! let mut buf = Vec::new();
//! codec::encode_frame(&PeerToRelay::Attach { agent: "healthguard", receive: true }, &mut buf).unwrap();
//! let body = codec::split_frame(&buf, 1 << 20).unwrap().unwrap().0;
//! let frame: PeerToRelay = codec::decode(body).unwrap();
//! assert!(matches!(frame, PeerToRelay::Attach { agent: "healthguard", receive: true }));
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod clock;
pub mod codec;
pub mod deframe;
mod deliver;
pub mod envelope;
mod error;
mod exit;
pub mod frames;
mod ids;
mod join;
mod register;
mod replay;
pub mod text;

pub use deliver::DeliverHead;
pub use envelope::{Envelope, EnvelopeBody, MessageId, OpenedEnvelope};
pub use error::{ErrorCode, ProtoError};
pub use exit::Exit;
pub use frames::{Address, InstanceStatus, PeerToRelay, Receipt, RelayToPeer};
pub use ids::{check_id, MAX_ID_LEN};
pub use join::{JoinSecret, JoinToken, RelayEndpoint, RelayTrust, MAX_RELAYS};
pub use register::{check_invite_proof, check_register_proof, invite_proof, register_proof};
pub use replay::{ReplayVerdict, ReplayWindow};

/// Protocol version carried in every envelope body (and in the ALPN).
pub const VERSION: u8 = 1;

/// TLS exporter label for the registration proof (PROTOCOL.md §5.3); the
/// context is empty and the output 32 bytes.
pub const REGISTER_EXPORTER_LABEL: &[u8] = b"EXPORTER-agent-link/1 register";
