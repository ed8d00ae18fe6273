//! Hostile input, one module per subject. Each case asserts the exact error
//! code or close reason, that nothing reaches the target, that the relay
//! stays up, and that the same connection and other clients go on working.
//!
//! | module | subject |
//! |---|---|
//! | `common` | the fixture ([`common::Net`]), the shared assertions, [`common::Case`] |
//! | `handshake` | ALPN, certificates on both sides, 0-RTT |
//! | `envelope` | bit flips, foreign signatures, re-addressed messages, reorders and duplicates |
//! | `framing` | length prefixes, the frame limit, truncation, trailing bytes, unknown tags, frames in the wrong place |
//! | `ids` | invalid UTF-8 and invalid ids in attach, register and addresses |
//! | `deadlines` | the auth deadline, the first-frame and frame deadlines, trickled frames, idle streams |
//! | `flood` | forged QUIC Initials while members connect, the stranger slot pool, the pre-admission window |
//! | `bounds` | agents per connection, a receiver that stops reading |
//! | `replies` | forged, repeated and stray `Ack`/`Nack`; a target stream ending unanswered; one sender flooding an agent |
//! | `small_order_keys` | weak Ed25519 client keys in a certificate and in a handshake |
//! | `files` | join tokens, key, secret, config and registry files, through the library and the binaries |
//! | `membership` | invites bound to one id, the fleet secret refused without open registration, the registration cap |
//!
//! Cases already covered elsewhere are not repeated here: a spoofed sender,
//! a wrong fleet secret, stale and future timestamps at the relay, a
//! signature by another key (relay and receiver), a plain replay
//! (`e2e/relay_protocol.rs`, `e2e/peer.rs`); a declared 1 GiB frame on an
//! agent stream, an oversized message with the connection staying usable
//! (`e2e/relay_protocol.rs::oversized_frame_closes_only_that_stream`).

mod bounds;
mod common;
mod deadlines;
mod envelope;
mod files;
mod flood;
mod framing;
mod handshake;
mod ids;
mod membership;
mod replies;
mod small_order_keys;
