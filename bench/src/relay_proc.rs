//! The relay under test, as a real child process started from the built
//! `agent-link-relay` binary (the process control and the `/proc` readings
//! are `agent-link-faults`', shared with the fault tests and the soak).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use agent_link_faults::ProcWatch;

/// A running relay process.
pub struct RelayProcess {
    inner: agent_link_faults::RelayProcess,
    pub addr: SocketAddr,
    pub token: String,
}

/// Find `agent-link-relay`: beside this executable (cargo puts both in
/// `target/<profile>/`), else on PATH.
pub fn relay_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    sibling_binary("agent-link-relay", explicit)
}

/// `explicit`, else the workspace binary `name` beside this executable,
/// else `name` on PATH.
pub fn sibling_binary(name: &str, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let beside = std::env::current_exe()?.with_file_name(name);
    if beside.exists() {
        return Ok(beside);
    }
    Ok(PathBuf::from(name))
}

/// `relay_bin register --dir dir --batch file`: every instance of the file
/// in one registry write (offline, before the relay starts serving).
pub fn register_batch(relay_bin: &Path, dir: &Path, batch_file: &Path) -> Result<()> {
    let out = std::process::Command::new(relay_bin)
        .args(["register", "--dir"])
        .arg(dir)
        .arg("--batch")
        .arg(batch_file)
        .output()
        .context("running agent-link-relay register --batch")?;
    if !out.status.success() {
        anyhow::bail!(
            "register --batch failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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
        let loopback: SocketAddr = "127.0.0.1:0".parse().context("loopback address")?;
        agent_link_faults::RelayProcess::init(bin, dir, loopback, config)?;
        before_run(dir)?;
        let inner = agent_link_faults::RelayProcess::start(bin, dir, Vec::new())?;
        let addr = inner.addr();
        let token = inner.invite(addr)?;
        Ok(Self { inner, addr, token })
    }

    /// CPU and memory readings of the relay process.
    pub fn watch(&self) -> ProcWatch {
        self.inner
            .watch()
            .expect("a started relay has a process until stopped")
    }

    /// Stop with SIGTERM (graceful), bounded.
    pub fn stop(self) {
        self.inner.stop();
    }
}
