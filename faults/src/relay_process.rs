//! The relay as a real child process that can be SIGKILLed and started again
//! on the same address, optionally inside a network namespace.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::proc_watch::ProcWatch;

/// How long a starting relay may take to report its address.
const START_WAIT: Duration = Duration::from_secs(30);

/// A relay process with its state directory.
pub struct RelayProcess {
    bin: PathBuf,
    dir: PathBuf,
    /// Command prefix, e.g. `ip netns exec NAME` (empty: run directly).
    wrapper: Vec<OsString>,
    child: Option<Child>,
    addr: SocketAddr,
    /// Highest VmHWM seen over all lives of the process, KiB.
    peak_rss_kib: u64,
    starts: u32,
}

impl RelayProcess {
    /// `init` a relay state directory listening on `listen` (port 0 allowed)
    /// and merge `config` into its `relay-config.json`.
    pub fn init(
        bin: &Path,
        dir: &Path,
        listen: SocketAddr,
        config: &serde_json::Value,
    ) -> Result<()> {
        run(
            bin,
            &[
                "init".as_ref(),
                "--dir".as_ref(),
                dir.as_os_str(),
                "--listen".as_ref(),
                listen.to_string().as_ref(),
            ],
        )?;
        edit_config(dir, |c| {
            if let (Some(c), Some(o)) = (c.as_object_mut(), config.as_object()) {
                // Harnesses join with the open fleet token (`invite`
                // below); a config that says otherwise wins. Only where the
                // relay knows the field (an older build, run for an A/B
                // comparison, would refuse it).
                if c.contains_key("open_registration") {
                    c.insert("open_registration".into(), true.into());
                }
                for (k, v) in o {
                    c.insert(k.clone(), v.clone());
                }
            }
        })
    }

    /// Start `bin run --dir dir` (behind `wrapper`), wait for its address,
    /// and pin that address in the config so restarts come back on it.
    pub fn start(bin: &Path, dir: &Path, wrapper: Vec<OsString>) -> Result<Self> {
        let mut me = Self {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            wrapper,
            child: None,
            addr: "127.0.0.1:0".parse().expect("literal address"),
            peak_rss_kib: 0,
            starts: 0,
        };
        me.spawn()?;
        let addr = me.addr;
        edit_config(dir, |c| {
            c["listen"] = serde_json::Value::String(addr.to_string());
        })?;
        Ok(me)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let mut child = cmd
            .arg("run")
            .arg("--dir")
            .arg(&self.dir)
            // `AGENT_LINK_RELAY_RUST_LOG`: another filter for the relay's log.
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LINK_RELAY_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let stderr = child.stderr.take().context("relay stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // `AGENT_LINK_RELAY_LOG=FILE`: the relay's log lines are appended
        // there too (to see why a bench or fault run went wrong).
        let mut log = std::env::var_os("AGENT_LINK_RELAY_LOG").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::thread::spawn(move || {
            // Keep draining stderr for the process's whole life so it never
            // blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = log.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{name}: {line}");
                }
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let reported = match rx.recv_timeout(START_WAIT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("the relay did not report its address (exit status {status:?})");
            }
        };
        self.addr = reported
            .parse()
            .with_context(|| format!("relay reported {reported:?}"))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many times it has been started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The open fleet token for this relay at `addr` (`invite --reusable`;
    /// plain `invite` on a build that predates invites, for A/B runs).
    pub fn invite(&self, addr: SocketAddr) -> Result<String> {
        let addr = addr.to_string();
        let base: [&std::ffi::OsStr; 5] = [
            "invite".as_ref(),
            "--dir".as_ref(),
            self.dir.as_os_str(),
            "--addr".as_ref(),
            addr.as_ref(),
        ];
        let mut reusable = base.to_vec();
        reusable.push("--reusable".as_ref());
        run(&self.bin, &reusable).or_else(|_| run(&self.bin, &base))
    }

    /// SIGKILL: no goodbye to anyone, exactly like a crash.
    pub fn kill(&mut self) {
        self.observe_rss();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same address (after [`Self::kill`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Peak resident set size over every life so far, KiB.
    pub fn peak_rss_kib(&mut self) -> u64 {
        self.observe_rss();
        self.peak_rss_kib
    }

    /// CPU and memory readings of the current life (`None` while dead).
    pub fn watch(&self) -> Option<ProcWatch> {
        self.child.as_ref().map(|c| ProcWatch(c.id()))
    }

    fn observe_rss(&mut self) {
        let kib = self.watch().map_or(0, |w| w.peak_rss_kib());
        self.peak_rss_kib = self.peak_rss_kib.max(kib);
    }

    /// SIGTERM and wait (bounded), then SIGKILL.
    pub fn stop(mut self) {
        self.observe_rss();
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            for _ in 0..50 {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(bin: &Path, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed: {}",
            bin.display(),
            args,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> Result<()> {
    let path = dir.join("relay-config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    f(&mut cfg);
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)
        .with_context(|| format!("writing {}", path.display()))
}
