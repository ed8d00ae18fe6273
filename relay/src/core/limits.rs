//! Stream limits: a connection may have every agent plus control streams
//! open, but starts with a few and is raised as it uses them. quinn keeps an
//! entry per stream a peer may open, so the full limit up front would cost
//! about 5 KiB per connection that almost no connection uses.

use crate::config::RelayConfig;

/// Control requests (status, registration) one instance may make per
/// second, over all its connections; and the burst. A `Status` costs the
/// relay work that grows with the fleet (tens of ms at 10,000 instances), so
/// an unbounded stream of them from one member would cost everyone else.
pub const CONTROL_PER_SEC: u32 = 5;
/// See [`CONTROL_PER_SEC`].
pub const CONTROL_BURST: u32 = 20;

/// Streams a connection may have open at once: every agent plus control.
pub fn max_streams(cfg: &RelayConfig) -> u32 {
    cfg.max_agents_per_connection + 4
}

/// Streams a new connection may open before the relay raises the limit.
pub fn initial_streams(cfg: &RelayConfig) -> u32 {
    initial_stream_limit(max_streams(cfg))
}

/// 8, or `max` when 8 would leave less than an eighth of it (a raise that
/// small would never be announced; see [`next_stream_limit`]).
pub fn initial_stream_limit(max: u32) -> u32 {
    let first = max.min(8);
    if max - first <= max / 8 {
        max
    } else {
        first
    }
}

/// The next stream limit: double, and go straight to `max` when less than
/// an eighth of it would be left. quinn only announces a raise (MAX_STREAMS)
/// that grows the limit by more than an eighth of the new limit, so a last
/// small step (64 → 68) would never reach the peer.
pub fn next_stream_limit(current: usize, max: usize) -> usize {
    let next = (current * 2).min(max);
    if max - next <= max / 8 {
        max
    } else {
        next
    }
}

/// The limit to announce now that `open` streams are open under `current`
/// (at most `max`), if any: raised two streams before the peer runs into it,
/// since a peer that does waits one round trip.
pub fn raise_stream_limit(open: usize, current: usize, max: usize) -> Option<usize> {
    (open + 2 >= current && current < max).then(|| next_stream_limit(current, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stream_limit_raise_is_large_enough_for_quinn_to_announce() {
        for max in [5usize, 6, 8, 9, 10, 12, 17, 18, 68, 100, 1028] {
            let mut limit = initial_stream_limit(max as u32) as usize;
            let mut steps = 0;
            while limit < max {
                let next = next_stream_limit(limit, max);
                assert!(next > limit && next <= max, "{limit} -> {next} (max {max})");
                // quinn: announced only when the raise exceeds next / 8.
                assert!(next - limit > next / 8, "{limit} -> {next} (max {max})");
                limit = next;
                steps += 1;
            }
            assert!(steps <= 8);
        }
    }

    #[test]
    fn the_limit_is_raised_two_streams_before_it_is_reached() {
        let cfg = RelayConfig::default();
        let max = max_streams(&cfg) as usize;
        let first = initial_streams(&cfg) as usize;
        assert_eq!(raise_stream_limit(first - 3, first, max), None);
        assert_eq!(
            raise_stream_limit(first - 2, first, max),
            Some(next_stream_limit(first, max))
        );
        assert_eq!(raise_stream_limit(max, max, max), None, "never past max");
    }
}
