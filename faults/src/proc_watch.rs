//! CPU time and memory of a child process, read from `/proc/<pid>`.

/// Readings of one process by its pid.
#[derive(Debug, Clone, Copy)]
pub struct ProcWatch(pub u32);

impl ProcWatch {
    /// User + system CPU seconds the process has used so far (NaN when it
    /// cannot be read).
    pub fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.0)) else {
            return f64::NAN;
        };
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 (1-based) of the whole line.
        let after = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
            + f.get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
        // Linux's USER_HZ is 100 on every mainstream architecture.
        ticks / 100.0
    }

    /// Peak resident set size in KiB (VmHWM; 0 when it cannot be read).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Current resident set size in KiB (VmRSS; 0 when it cannot be read).
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.0))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = ProcWatch(std::process::id());
        // Current first: the peak read after it can only be as large.
        let now = me.rss_kib();
        assert!(now > 0);
        assert!(me.peak_rss_kib() >= now);
        assert!(me.cpu_seconds() >= 0.0);
        assert_eq!(ProcWatch(u32::MAX).rss_kib(), 0);
    }
}
