//! Shared harness for the end-to-end tests in `tests/tests/`: a relay started
//! in process on 127.0.0.1:0 in a temporary directory, and a *raw* client
//! that speaks the wire protocol frame by frame (to send what the peer
//! library never would: spoofed senders, bad tags, oversized frames).
//!
//! | module | what |
//! |---|---|
//! | `src/relay.rs` | [`TestRelay`]: an in-process relay in its own state directory; [`init_tracing`] |
//! | `src/raw.rs` | [`RawClient`], [`RawStream`], [`OwnedFrame`]: one QUIC connection, frames by hand |
//! | `src/peers.rs` | peer directories and the `agent-link` library: [`peer`], [`recv`], [`exchange`] |
//! | `src/bins.rs` | the CLIs as child processes: [`workspace_bin`], [`relay_cmd`], [`peer_cmd`] |
//! | `src/nats.rs` | [`NatsCluster`]: a 3-node nats-server cluster with JetStream on loopback, for the fleet tests |
//! | `src/time.rs` | [`WAIT`], [`wait_until`], [`now_ms`] |
//!
//! Everything is re-exported here, so a test writes `use agent_link_tests::*;`.
//!
//! The test binaries, one per subject:
//!
//! | binary | what |
//! |---|---|
//! | `tests/e2e/` | the peer library and the relay over QUIC on loopback: messages, protocol, limits, the peer under relay restarts, datagram size, storms, a fleet of relays on NATS |
//! | `tests/hostile/` | hostile input, one module per subject: handshakes, envelopes, framing, ids, deadlines, bounds, small-order keys, files |
//! | `tests/cli/` | the real binaries as child processes: the command-line contract, batch registration |
//! | `tests/faults.rs` | the delivery promise under SIGKILL, nftables loss in a network namespace, an impairing proxy |
//! | `tests/dependency_floors.rs` | `Cargo.lock` above the advisory floors |
//!
//! Every wait is bounded by [`WAIT`]; nothing here sleeps for a fixed time
//! to "let things settle".
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bins;
mod ca;
mod nats;
mod peers;
mod raw;
mod relay;
mod time;

pub use bins::{peer_cmd, relay_cmd, text, workspace_bin};
pub use ca::TestCa;
pub use nats::{nats_or_skip, nats_server, NatsCluster};
pub use peers::{exchange, peer, peer_dir, recv, write_peer_dir};
pub use raw::{client_config, random_id, OwnedFrame, RawClient, RawStream};
pub use relay::{init_tracing, TestRelay};
pub use time::{now_ms, wait_until, WAIT};
