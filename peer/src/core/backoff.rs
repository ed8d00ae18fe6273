//! Reconnect backoff: 100 ms doubling to 5 s, with ±50 % jitter so a fleet
//! that lost its relay does not come back in lockstep. The jitter source is
//! passed in, so tests are deterministic.

use std::time::Duration;

/// Exponential backoff with jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// The base of the next delay (before jitter).
    pub(crate) fn peek(&self) -> Duration {
        self.next
    }

    /// The next delay; `unit` in `[0, 1)` picks the jitter.
    pub(crate) fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(unit.clamp(0.0, 1.0) + 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_five_seconds_with_jitter() {
        let mut b = Backoff::new();
        let mut bases = Vec::new();
        for i in 0..12 {
            let base = b.peek();
            let d = b.next_delay(f64::from(i) / 12.0);
            assert!(d >= base / 2 && d <= base.mul_f64(1.5), "{d:?} vs {base:?}");
            bases.push(base);
        }
        assert_eq!(bases[0], Duration::from_millis(100));
        assert_eq!(bases[1], Duration::from_millis(200));
        assert_eq!(*bases.last().unwrap(), Duration::from_secs(5));
        assert!(bases.windows(2).all(|w| w[0] <= w[1]));
        let mut b = Backoff::new();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(1.0), Duration::from_millis(300));
    }
}
