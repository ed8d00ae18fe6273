//! End to end: the relay and the `agent-link` library over real QUIC on
//! loopback, one module per subject. Each module opens with what it covers.
//!
//! | module | subject |
//! |---|---|
//! | `daemon_replay` | the daemon's replay memory: the same envelope bytes after a kill -9 restart, waiting and after the read, get the first receipt and are stored once |
//! | `peer` | the peer library: messages both ways with receipts, explicit errors, signatures, replays, reconnection, status, close |
//! | `peer_faults` | the peer's delivery rules while the relay is down or an attach is replaced |
//! | `relay_protocol` | the relay frame by frame through raw clients: routing, receipts, every refusal code, registration, revocation |
//! | `rotation` | fleet secret rotation: pushed to live members, to offline ones at connect, never to a revoked one; the grace period |
//! | `fleet` | two relays on a 3-node NATS cluster: messages and receipts across relays, the newest attach wins across relays, a revoke through one relay reaches the other |
//! | `limits` | connection limits, idle and handshake timeouts |
//! | `stream_limit` | the QUIC stream limit growing to every allowed agent |
//! | `datagram_size` | how far path MTU discovery grows a connection's datagrams |
//! | `storm` | 1,000 instances reconnecting at once; a handshake flood beside a working client |

mod ca_relay;
mod daemon_replay;
mod datagram_size;
mod failover;
mod fleet;
mod limits;
mod peer;
mod peer_faults;
mod relay_protocol;
mod rotation;
mod storm;
mod stream_limit;
