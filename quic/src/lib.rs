//! Frames on quinn streams, shared by the relay, the peer, the tests and the
//! bench, so every side reads frames with the same limits and the same
//! truncation rule (review of 2026-12-01, §1.4).
//!
//! This is the thin I/O layer over `agent_link_proto`: the buffering rules
//! live in the pure [`Deframer`](agent_link_proto::deframe::Deframer); this
//! crate adds the stream, the clock (the frame deadline) and quinn's errors.
//!
//! - [`frames`]: [`FrameReader`](frames::FrameReader) (a per-stream limit, a
//!   frame deadline, truncation reported), [`encode`](frames::encode) and
//!   [`write_frame`](frames::write_frame) for our own frames,
//!   [`refuse_stream`](frames::refuse_stream), and
//!   [`request`](frames::request): one request and one reply on a fresh
//!   stream.
//! - [`endpoint`]: the UDP socket, path MTU discovery, the client transport
//!   baseline, and the relay's close code from a connection error.
//! - [`exporter`]: the TLS exporter the registration proof is bound to.
//!
//! ```no_run
//! use agent_link_proto::{codec, PeerToRelay, RelayToPeer};
//! use agent_link_quic::frames::{request, RequestError};
//!
//! async fn status(conn: &quinn::Connection) -> Result<usize, RequestError> {
//!     let reply = request(conn, &PeerToRelay::StatusRequest, codec::HARD_MAX_FRAME).await?;
//!     Ok(match codec::decode::<RelayToPeer>(&reply) {
//!         Ok(RelayToPeer::Status { instances, .. }) => instances.len(),
//!         _ => 0,
//!     })
//! }
//! ```
#![deny(missing_docs, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod endpoint;
pub mod exporter;
pub mod frames;
