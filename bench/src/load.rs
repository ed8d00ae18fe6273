//! The load schedule shared by every system under test (relay, NATS,
//! direct): which message slot to send next and when, and what to record
//! when its receipt (or reply) comes back.
//!
//! - Closed loop: at most `window` messages in flight per sender; a slot is
//!   sent as soon as one completes; latency runs from the actual send.
//! - Open loop (`--rate`): messages are due on a fixed schedule; latency runs
//!   from the *intended* send time, so a stalled system is charged for the
//!   messages it held up (no coordinated omission). A sender never has more
//!   than `slots` in flight; past that, due messages wait and their latency
//!   keeps growing.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// When and how hard one sender sends.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Closed loop: messages in flight.
    pub window: usize,
    /// Open loop: time between two messages of this sender.
    pub interval: Option<Duration>,
    /// First send.
    pub start: Instant,
    /// Completions from here on are counted...
    pub measure_from: Instant,
    /// ...up to here; the sender stops here.
    pub measure_until: Instant,
}

impl Plan {
    /// Sender `k` of `n`: in open loop its first message is due `k/n` of an
    /// interval after `start`, so the senders' schedules are spread evenly
    /// instead of all firing at the same instants (a burst of `n` at once
    /// every interval, which measures the burst, not the rate). Closed loop:
    /// unchanged.
    pub fn staggered(mut self, k: usize, n: usize) -> Self {
        if let Some(i) = self.interval {
            self.start += i.mul_f64(k as f64 / n.max(1) as f64);
        }
        self
    }
}

/// What one sender measured.
#[derive(Debug)]
pub struct Outcome {
    /// Successful completions inside the measured window.
    pub delivered: u64,
    /// Explicit failures inside the measured window.
    pub failed: u64,
    /// Messages whose (intended) send time fell inside the measured window.
    pub offered: u64,
    /// Send→completion latency, microseconds.
    pub latency: Histogram<u64>,
    /// The explicit failures by error code, where the system names one.
    pub failed_by: std::collections::BTreeMap<String, u64>,
}

impl Outcome {
    pub fn new() -> Self {
        Self {
            delivered: 0,
            failed: 0,
            offered: 0,
            latency: new_histogram(),
            failed_by: Default::default(),
        }
    }

    pub fn add(&mut self, other: &Outcome) {
        self.delivered += other.delivered;
        self.failed += other.failed;
        self.offered += other.offered;
        let _ = self.latency.add(&other.latency);
        for (code, n) in &other.failed_by {
            *self.failed_by.entry(code.clone()).or_default() += n;
        }
    }
}

/// The receipts of a ring exchange (`scale`, on the relay and on NATS):
/// how many came inside the window and in all, and their latencies in one
/// shared histogram. Each sender keeps its latencies in a plain `Vec` and
/// hands them over once at its end: a histogram per sender is ~150 KiB,
/// and 16,000 of them zeroed at the start of an exchange (2.4 GB) held up
/// every sender's first message by seconds.
pub struct RingTally {
    in_window: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
    hist: std::sync::Mutex<Histogram<u64>>,
}

impl RingTally {
    pub fn new() -> Self {
        Self {
            in_window: 0.into(),
            total: 0.into(),
            hist: std::sync::Mutex::new(new_histogram()),
        }
    }

    /// A receipt for a send started at `sent`, in a window ending at `end`;
    /// its latency goes to the sender's `lat`.
    pub fn receipt(&self, sent: Instant, end: Instant, lat: &mut Vec<u64>) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        self.total.fetch_add(1, Relaxed);
        if now <= end {
            self.in_window.fetch_add(1, Relaxed);
        }
        lat.push(now.duration_since(sent).as_micros().max(1) as u64);
    }

    /// One sender's latencies into the shared histogram, under one lock.
    pub fn record(&self, lat: Vec<u64>) {
        let mut hist = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        for v in lat {
            let _ = hist.record(v);
        }
    }

    /// Receipts inside the window, receipts in all, and a copy of the
    /// histogram (once every sender has recorded).
    pub fn finish(&self) -> (u64, u64, Histogram<u64>) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.in_window.load(Relaxed),
            self.total.load(Relaxed),
            self.hist.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        )
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds")
}

/// Per-sender bookkeeping: slot `i` is message `i` of the sender's pool.
pub struct Tracker {
    plan: Plan,
    started: Vec<Option<Instant>>,
    next_slot: usize,
    in_flight: usize,
    next_due: Instant,
    pub out: Outcome,
}

impl Tracker {
    pub fn new(plan: Plan, slots: usize) -> Self {
        Self {
            plan,
            started: vec![None; slots],
            next_slot: 0,
            in_flight: 0,
            next_due: plan.start,
            out: Outcome::new(),
        }
    }

    /// Slots needed for `plan` (the pool of distinct in-flight messages).
    pub fn slots_for(window: usize, interval: Option<Duration>) -> usize {
        match interval {
            None => (window * 8).max(16),
            // Room for ~1 s of backlog at the offered rate before the sender
            // holds back (latency then still counts from intended times).
            Some(i) => ((1.0 / i.as_secs_f64()) as usize).clamp(256, 20_000),
        }
    }

    fn slot_free(&self) -> bool {
        self.started[self.next_slot].is_none()
    }

    /// The next slot to send now, if one is due; records its start time.
    pub fn take_due(&mut self, now: Instant) -> Option<usize> {
        if now >= self.plan.measure_until || !self.slot_free() {
            return None;
        }
        let t = match self.plan.interval {
            None if self.in_flight < self.plan.window => now,
            None => return None,
            Some(i) if self.next_due <= now => {
                let t = self.next_due;
                self.next_due += i;
                t
            }
            Some(_) => return None,
        };
        let slot = self.next_slot;
        self.started[slot] = Some(t);
        self.in_flight += 1;
        self.next_slot = (slot + 1) % self.started.len();
        if t >= self.plan.measure_from && t < self.plan.measure_until {
            self.out.offered += 1;
        }
        Some(slot)
    }

    /// When the sender must wake to send, besides completions (open loop
    /// with a free slot only).
    pub fn wake_at(&self) -> Option<Instant> {
        match self.plan.interval {
            Some(_) if self.slot_free() => Some(self.next_due.min(self.plan.measure_until)),
            _ => None,
        }
    }

    /// Slot `slot` completed at `now` (`ok`: receipt, else explicit
    /// failure). Whether it counted (inside the measured window).
    pub fn complete(&mut self, slot: usize, now: Instant, ok: bool) -> bool {
        let Some(started) = self.started.get_mut(slot).and_then(Option::take) else {
            return false;
        };
        self.in_flight -= 1;
        if now < self.plan.measure_from || now >= self.plan.measure_until {
            return false;
        }
        if ok {
            self.out.delivered += 1;
            let _ = self
                .out
                .latency
                .record(now.saturating_duration_since(started).as_micros().max(1) as u64);
        } else {
            self.out.failed += 1;
        }
        true
    }

    pub fn measure_until(&self) -> Instant {
        self.plan.measure_until
    }
}

/// One run's settings, shared by every system.
#[derive(Debug, Clone)]
pub struct RunCfg {
    pub topo: crate::workload::Topology,
    pub window: usize,
    /// Open loop: messages/s offered in total, split evenly over senders.
    pub rate: Option<f64>,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// The started relay's `max_udp_payload_size`, when not its default.
    pub max_udp_payload: Option<u16>,
    /// `--relay-set` settings, applied last to the started relay's config.
    pub relay_set: Vec<(String, serde_json::Value)>,
}

impl RunCfg {
    /// Open loop: time between two messages of one sender.
    pub fn interval(&self) -> Option<Duration> {
        self.rate
            .map(|r| Duration::from_secs_f64(self.topo.senders.endpoints() as f64 / r))
    }

    pub fn slots(&self) -> usize {
        Tracker::slots_for(self.window, self.interval())
    }

    /// The plan when the first message goes out at `start`.
    pub fn plan(&self, start: Instant) -> Plan {
        Plan {
            window: self.window,
            interval: self.interval(),
            start,
            measure_from: start + self.warmup,
            measure_until: start + self.warmup + self.duration,
        }
    }

    pub fn info(&self) -> crate::report::RunInfo {
        crate::report::RunInfo {
            shape: self.topo.label(),
            senders: self.topo.senders.endpoints(),
            receivers: self.topo.receivers.endpoints(),
            window: self.window,
            offered_rate: self.rate,
            payload_bytes: self.size,
            seconds: self.duration.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_senders_are_spread_over_one_interval() {
        let t0 = Instant::now();
        let plan = Plan {
            window: 1,
            interval: Some(Duration::from_millis(100)),
            start: t0,
            measure_from: t0 + Duration::from_secs(1),
            measure_until: t0 + Duration::from_secs(2),
        };
        assert_eq!(plan.staggered(0, 4).start, t0);
        assert_eq!(plan.staggered(3, 4).start, t0 + Duration::from_millis(75));
        assert_eq!(plan.staggered(3, 4).measure_from, plan.measure_from);
        let closed = Plan {
            interval: None,
            ..plan
        };
        assert_eq!(closed.staggered(3, 4).start, t0);
    }
}
