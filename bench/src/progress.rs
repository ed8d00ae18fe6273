//! A progress bar per run (stderr; when stderr is not a terminal, one line
//! as the measured window starts instead, so a log or a profiling script
//! can tell when it is).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Show `label` filling up from now until `until`, marking warm-up until
/// `measure_from`. The bar clears itself when dropped.
pub struct Progress(ProgressBar, tokio::task::JoinHandle<()>);

impl Progress {
    pub fn start(label: String, measure_from: Instant, until: Instant) -> Self {
        let begin = Instant::now();
        let total = until.saturating_duration_since(begin).as_millis().max(1) as u64;
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>28} [{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        bar.set_prefix(label.clone());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            if !tty {
                tokio::time::sleep_until(measure_from.into()).await;
                eprintln!(
                    "{label}: measuring for {:.0} s",
                    until
                        .saturating_duration_since(Instant::now())
                        .as_secs_f64()
                );
                return;
            }
            loop {
                let now = Instant::now();
                b.set_position(now.saturating_duration_since(begin).as_millis() as u64);
                b.set_message(if now < measure_from {
                    "warm-up".to_string()
                } else if now < until {
                    format!(
                        "{:.0} s left",
                        until.saturating_duration_since(now).as_secs_f64()
                    )
                } else {
                    "collecting".to_string()
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self(bar, task)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.1.abort();
        self.0.finish_and_clear();
    }
}
