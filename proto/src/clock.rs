//! The one conversion from a clock reading to the wire's timestamps
//! (`sent_at_ms`, `delivered_at_ms`: milliseconds since the Unix epoch,
//! PROTOCOL.md §3). The caller reads the clock and passes the reading in, so
//! this crate stays clock-free and tests can use any instant they like.
//!
//! ```
//! use std::time::{Duration, UNIX_EPOCH};
//! use agent_link_proto::clock::unix_ms;
//! assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)), 1_700_000_000_123);
//! assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch at `t`. A time before the epoch (a
/// clock set far back) reads as 0, and one past `u64::MAX` ms (half a
/// billion years) as `u64::MAX`: the relay's timestamp window then refuses
/// the message with `StaleTimestamp`, which tells the user to check the
/// clock, instead of this panicking.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
