//! Which connection attempts the relay takes on, decided on the first
//! Initial packet before any cryptography (PROTOCOL.md §9.1). Pure: the
//! accept loop passes the source, whether QUIC has validated it, how many
//! handshakes are in progress, and `now`; it carries out the [`Attempt`].
//!
//! Three bounds, in this order:
//!
//! 1. **Retry for unvalidated addresses under load.** A bare Initial's
//!    source address can be forged, and accepting it costs a TLS handshake
//!    and connection state held for `handshake_timeout_secs`. Once
//!    `retry_threshold` handshakes are in progress, or more than that many
//!    unvalidated attempts arrived within about a second, an attempt from
//!    an unvalidated address is answered with a stateless QUIC Retry: one
//!    small packet, no state, no cryptography beyond sealing the token. A
//!    real client echoes the token and comes back validated; a spoofer
//!    never sees it. So a flood of forged Initials costs the relay one
//!    Retry each and locks no member out.
//! 2. **A per-source rate (`handshakes_per_sec_per_ip`)** for validated
//!    addresses only, so one real address cannot take the whole relay-wide
//!    rate. Only validated attempts are counted, on purpose: were
//!    unvalidated ones counted, a spoofer could forge Initials *from a
//!    member's address* and empty that member's bucket, locking it out with
//!    packets it never sent. A validated attempt proved it receives at its
//!    address (it echoed a Retry or NEW_TOKEN token), so its count is
//!    honest. Unvalidated attempts are bounded by the Retry rule above and
//!    the relay-wide rate instead.
//! 3. **The relay-wide rate (`handshakes_per_sec`)**, for everything
//!    accepted.
//!
//! The per-source map is bounded ([`MAX_SOURCES`]): only validated sources
//! enter it, so growing it takes real addresses, and when it is full the
//! sources idle for a second or more (whose buckets are full again, the
//! same as a new one) are dropped first, then the least recently seen.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::rate::TokenBucket;

/// Sources whose per-source bucket the relay keeps. At about 100 bytes an
/// entry this is well under a MiB; a source evicted early only gets a fresh
/// (full) bucket, never a refusal it did not earn.
pub const MAX_SOURCES: usize = 4096;

/// What to do with a connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Run the handshake.
    Accept,
    /// Answer with a QUIC Retry: the client must prove its address.
    Retry,
    /// Refuse at the QUIC level (CONNECTION_REFUSED); the peer backs off.
    Refuse(Refusal),
}

/// Why an attempt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its (validated) source is over `handshakes_per_sec_per_ip`.
    Source,
    /// The relay is over `handshakes_per_sec`.
    Relay,
}

/// The bounds a [`HandshakeGate`] applies (from `RelayConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes accepted per second, relay-wide (and the burst).
    pub per_sec: u32,
    /// Handshakes accepted per second from one validated source (and the
    /// burst).
    pub per_source_per_sec: u32,
    /// Handshakes in progress, and unvalidated attempts per second, from
    /// which unvalidated addresses get a Retry (0: always).
    pub retry_threshold: u32,
}

/// The accept loop's state: see the module docs.
#[derive(Debug)]
pub struct HandshakeGate {
    relay: TokenBucket,
    unvalidated: TokenBucket,
    sources: SourceBuckets,
    retry_threshold: u32,
}

impl HandshakeGate {
    /// Full buckets at `now`.
    pub fn new(limits: HandshakeLimits, now: Instant) -> Self {
        Self {
            relay: TokenBucket::new(limits.per_sec, limits.per_sec, now),
            unvalidated: TokenBucket::new(limits.retry_threshold, limits.retry_threshold, now),
            sources: SourceBuckets::new(limits.per_source_per_sec, MAX_SOURCES),
            retry_threshold: limits.retry_threshold,
        }
    }

    /// Decide on an attempt from `source`; `validated` is QUIC's
    /// `remote_address_validated()`, `handshaking` the handshakes in
    /// progress now.
    pub fn decide(
        &mut self,
        now: Instant,
        source: IpAddr,
        validated: bool,
        handshaking: usize,
    ) -> Attempt {
        if !validated {
            // Both conditions are evaluated, so the unvalidated rate is
            // measured even while the in-progress count alone says "load".
            let busy = handshaking >= self.retry_threshold as usize;
            let fast = !self.unvalidated.try_take(now);
            if busy || fast {
                return Attempt::Retry;
            }
        } else if !self.sources.try_take(source, now) {
            return Attempt::Refuse(Refusal::Source);
        }
        if !self.relay.try_take(now) {
            return Attempt::Refuse(Refusal::Relay);
        }
        Attempt::Accept
    }

    /// Sources with a bucket now (for tests and metrics).
    pub fn sources(&self) -> usize {
        self.sources.map.len()
    }
}

/// The key a source is counted under: an IPv4 address, or an IPv6 /64 (one
/// host usually holds a whole /64, so counting single IPv6 addresses would
/// give it 2^64 buckets). IPv4-mapped IPv6 addresses count as IPv4.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// After this long unused a bucket (burst = rate) is full again: dropping
/// it loses nothing.
const REFILLED: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Source {
    bucket: TokenBucket,
    last: Instant,
}

#[derive(Debug)]
struct SourceBuckets {
    rate: u32,
    max: usize,
    map: HashMap<IpAddr, Source>,
}

impl SourceBuckets {
    fn new(rate: u32, max: usize) -> Self {
        Self {
            rate,
            max,
            map: HashMap::new(),
        }
    }

    fn try_take(&mut self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        if !self.map.contains_key(&key) && self.map.len() >= self.max {
            self.evict(now);
        }
        let rate = self.rate;
        let source = self.map.entry(key).or_insert_with(|| Source {
            bucket: TokenBucket::new(rate, rate, now),
            last: now,
        });
        source.last = source.last.max(now);
        source.bucket.try_take(now)
    }

    /// Make room for one: drop every refilled source, or else the least
    /// recently seen. O(n), but only when the map is full, and each call
    /// stands for a validated attempt, whose handshake costs far more.
    fn evict(&mut self, now: Instant) {
        self.map
            .retain(|_, s| now.saturating_duration_since(s.last) < REFILLED);
        if self.map.len() >= self.max {
            if let Some(oldest) = self.map.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k) {
                self.map.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MEMBER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn gate(per_sec: u32, per_source: u32, retry: u32, t0: Instant) -> HandshakeGate {
        HandshakeGate::new(
            HandshakeLimits {
                per_sec,
                per_source_per_sec: per_source,
                retry_threshold: retry,
            },
            t0,
        )
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    #[test]
    fn unvalidated_attempts_are_accepted_until_handshakes_pile_up_then_retried() {
        let t0 = Instant::now();
        let mut g = gate(1000, 100, 4, t0);
        assert_eq!(g.decide(t0, MEMBER, false, 0), Attempt::Accept);
        assert_eq!(g.decide(t0, MEMBER, false, 3), Attempt::Accept);
        assert_eq!(g.decide(t0, MEMBER, false, 4), Attempt::Retry);
        assert_eq!(g.decide(t0, MEMBER, false, 400), Attempt::Retry);
        // Once validated it is served, whatever the load.
        assert_eq!(g.decide(t0, MEMBER, true, 400), Attempt::Accept);
        // Unvalidated attempts never get a per-source bucket.
        assert_eq!(g.sources(), 1);
    }

    #[test]
    fn a_fast_stream_of_unvalidated_attempts_is_retried_even_when_none_is_in_progress() {
        let t0 = Instant::now();
        let mut g = gate(1000, 100, 4, t0);
        let taken = (0..10)
            .filter(|i| g.decide(t0, v4(*i), false, 0) == Attempt::Accept)
            .count();
        assert_eq!(taken, 4, "the burst, then Retry");
        assert_eq!(g.decide(t0, v4(99), false, 0), Attempt::Retry);
        // The rate refills: a quarter second later, one more (4/s).
        assert_eq!(g.decide(t0 + ms(250), v4(99), false, 0), Attempt::Accept);
    }

    #[test]
    fn zero_threshold_retries_every_unvalidated_attempt() {
        let t0 = Instant::now();
        let mut g = gate(1000, 100, 0, t0);
        assert_eq!(g.decide(t0, MEMBER, false, 0), Attempt::Retry);
        assert_eq!(g.decide(t0 + ms(5000), MEMBER, false, 0), Attempt::Retry);
        assert_eq!(g.decide(t0, MEMBER, true, 0), Attempt::Accept);
    }

    #[test]
    fn a_forged_flood_from_a_members_address_leaves_its_bucket_untouched() {
        let t0 = Instant::now();
        let mut g = gate(10_000, 3, 8, t0);
        // 10,000 forged Initials claiming the member's address, 8 handshakes
        // (the flood's first) already pending.
        for i in 0..10_000u64 {
            assert_eq!(
                g.decide(t0 + Duration::from_micros(i), MEMBER, false, 8),
                Attempt::Retry
            );
        }
        // The member, validated by its Retry token, still has its burst.
        let now = t0 + ms(10);
        for _ in 0..3 {
            assert_eq!(g.decide(now, MEMBER, true, 8), Attempt::Accept);
        }
        assert_eq!(
            g.decide(now, MEMBER, true, 8),
            Attempt::Refuse(Refusal::Source)
        );
        // Another validated source is not affected by this one.
        assert_eq!(g.decide(now, v4(7), true, 8), Attempt::Accept);
        // And the member's bucket refills.
        assert_eq!(g.decide(now + ms(400), MEMBER, true, 8), Attempt::Accept);
    }

    #[test]
    fn the_relay_wide_rate_bounds_everything_accepted() {
        let t0 = Instant::now();
        let mut g = gate(3, 100, 100, t0);
        assert_eq!(g.decide(t0, v4(1), true, 0), Attempt::Accept);
        assert_eq!(g.decide(t0, v4(2), false, 0), Attempt::Accept);
        assert_eq!(g.decide(t0, v4(3), true, 0), Attempt::Accept);
        assert_eq!(
            g.decide(t0, v4(4), true, 0),
            Attempt::Refuse(Refusal::Relay)
        );
        assert_eq!(
            g.decide(t0, v4(5), false, 0),
            Attempt::Refuse(Refusal::Relay)
        );
        // A Retry costs nothing from the relay-wide rate.
        let mut g = gate(3, 100, 0, t0);
        for i in 0..100 {
            assert_eq!(g.decide(t0, v4(i), false, 0), Attempt::Retry);
        }
        assert_eq!(g.decide(t0, v4(1), true, 0), Attempt::Accept);
    }

    #[test]
    fn the_source_map_stays_bounded_and_drops_idle_sources_first() {
        let t0 = Instant::now();
        let mut b = SourceBuckets::new(2, 4);
        // Four sources; the first two idle since t0.
        for i in 0..4 {
            assert!(b.try_take(v4(i), t0 + ms(if i < 2 { 0 } else { 900 })));
        }
        assert!(b.try_take(v4(3), t0 + ms(900)));
        assert!(!b.try_take(v4(3), t0 + ms(900)), "source 3 spent its burst");
        // A fifth at 1.2 s: the two idle ones go (refilled), 2 and 3 stay.
        assert!(b.try_take(v4(4), t0 + ms(1200)));
        assert_eq!(b.map.len(), 3);
        assert!(!b.map.contains_key(&v4(0)) && !b.map.contains_key(&v4(1)));
        assert!(!b.try_take(v4(3), t0 + ms(1200)), "source 3 kept its count");
        // All busy: the least recently seen goes, the map never grows.
        assert!(b.try_take(v4(5), t0 + ms(1300)));
        assert!(b.try_take(v4(6), t0 + ms(1400)));
        assert_eq!(b.map.len(), 4);
        for i in 100..10_000 {
            b.try_take(v4(i), t0 + ms(1400) + Duration::from_micros(i.into()));
            assert!(b.map.len() <= 4);
        }
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(mapped), MEMBER);
        let t0 = Instant::now();
        let mut g = gate(100, 1, 8, t0);
        assert_eq!(g.decide(t0, a, true, 0), Attempt::Accept);
        assert_eq!(g.decide(t0, b, true, 0), Attempt::Refuse(Refusal::Source));
        assert_eq!(g.decide(t0, c, true, 0), Attempt::Accept);
        // Three addresses, two buckets: a and b share their /64's.
        assert_eq!(g.sources(), 2);
    }

    #[test]
    fn a_full_map_never_evicts_a_known_source_so_its_spent_burst_stays_spent() {
        let t0 = Instant::now();
        let mut b = SourceBuckets::new(1, 2);
        assert!(b.try_take(v4(1), t0));
        assert!(b.try_take(v4(2), t0 + ms(1)));
        // The map is full and source 1 is the least recently seen; it comes
        // back before refilling. Evicting it here would hand it a new, full
        // bucket: a source could reset its own rate by waiting for a
        // full map.
        assert!(!b.try_take(v4(1), t0 + ms(2)), "source 1 spent its burst");
        assert_eq!(b.map.len(), 2);
    }

    #[test]
    fn a_source_idle_for_exactly_the_refill_time_is_dropped() {
        let t0 = Instant::now();
        let mut b = SourceBuckets::new(1, 2);
        assert!(b.try_take(v4(1), t0));
        assert!(b.try_take(v4(2), t0));
        // At exactly REFILLED both buckets are full again, so both go (not
        // only the least recently seen one).
        assert!(b.try_take(v4(3), t0 + REFILLED));
        assert_eq!(b.map.len(), 1);
        assert!(b.map.contains_key(&v4(3)));
    }
}
