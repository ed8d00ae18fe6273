//! The relay under test, as a real child process started from the built
//! `agent-link-relay` binary, plus readings of its CPU time and peak memory
//! from `/proc`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A running relay process.
pub struct RelayProcess {
    child: Child,
    pub addr: SocketAddr,
    pub token: String,
}

/// Find `agent-link-relay`: beside this executable (cargo puts both in
/// `target/<profile>/`), else on PATH.
pub fn relay_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("agent-link-relay");
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from("agent-link-relay"))
}

impl RelayProcess {
    /// Initialise `dir` (the bench's instances register online with the
    /// join token, as `agent-link init` does), then start serving on
    /// 127.0.0.1:0 and wait for its `listening on` line.
    pub fn start(bin: &Path, dir: &Path, config: &serde_json::Value) -> Result<Self> {
        Self::start_with(bin, dir, config, |_| Ok(()))
    }

    /// As [`RelayProcess::start`], calling `before_run` with the initialised
    /// state directory before the relay starts serving (e.g. to register
    /// instances offline, so the relay loads them at start).
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        config: &serde_json::Value,
        before_run: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        let run = |args: &[&str]| -> Result<String> {
            let out = Command::new(bin)
                .args(args)
                .output()
                .with_context(|| format!("running {}", bin.display()))?;
            if !out.status.success() {
                bail!(
                    "{} {:?} failed: {}",
                    bin.display(),
                    args,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let d = dir.to_str().context("non-UTF-8 temp dir")?;
        run(&["init", "--dir", d, "--listen", "127.0.0.1:0"])?;
        // Apply config overrides (the bench's own limits).
        let cfg_path = dir.join("relay-config.json");
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path)?)?;
        if let (Some(c), Some(o)) = (cfg.as_object_mut(), config.as_object()) {
            for (k, v) in o {
                c.insert(k.clone(), v.clone());
            }
        }
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
        before_run(dir)?;
        let mut child = Command::new(bin)
            .args(["run", "--dir", d])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the relay")?;
        let stderr = child.stderr.take().context("relay stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr: SocketAddr = rx
            .recv_timeout(Duration::from_secs(20))
            .context("relay did not report its address")?
            .parse()?;
        let token = run(&["invite", "--dir", d, "--addr", &addr.to_string()])?;
        Ok(Self { child, addr, token })
    }

    /// CPU and memory readings of the relay process.
    pub fn watch(&self) -> ProcWatch {
        ProcWatch(self.child.id())
    }

    /// Stop with SIGTERM (graceful), bounded.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time and peak memory of a child process, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy)]
pub struct ProcWatch(pub u32);

impl ProcWatch {
    /// User+system CPU seconds the process has used so far.
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
        ticks / clock_ticks()
    }

    /// Peak resident set size in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Current resident set size in KiB (VmRSS).
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

fn clock_ticks() -> f64 {
    // Linux's USER_HZ is 100 on every mainstream architecture.
    100.0
}
