//! Time in tests: the one bound on every wait ([`WAIT`]), a polling wait
//! under that bound, and the wall clock that envelopes are stamped with.

use std::time::{Duration, SystemTime};

/// Upper bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    agent_link_proto::clock::unix_ms(SystemTime::now())
}

/// Wait until `cond` holds, polling every 20 ms, for at most [`WAIT`].
pub async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
