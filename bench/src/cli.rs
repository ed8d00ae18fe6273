//! `agent-link-bench cli`: the peer command line as a script or an agent
//! calls it — one whole process per `send` or `status` — timed from spawn
//! to exit, against a relay process on loopback, with a `listen` process as
//! the receiver. Reports min / median / max of each over `--runs` calls.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::relay_proc::{relay_binary, sibling_binary, RelayProcess};

/// Options of `agent-link-bench cli`.
#[derive(clap::Args, Debug)]
pub struct CliArgs {
    /// Calls of each command, after 3 unmeasured ones
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The relay binary (default: beside this one, then PATH)
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The peer binary (default: beside this one, then PATH)
    #[arg(long)]
    peer_bin: Option<PathBuf>,
}

/// Run `cmd`, fail unless it exits 0; its wall time.
pub(crate) fn timed(cmd: &mut Command) -> Result<Duration> {
    let t0 = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().context("spawn")?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// min / median / max of `v`, after `name` padded to `width`.
pub(crate) fn summary(name: &str, width: usize, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<width$} runs {:>3}  min {:>6.1} ms  median {:>6.1} ms  max {:>6.1} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
}

/// `agent-link init` of instance `id` in `dir`, the join token on its
/// standard input (never in its arguments).
pub(crate) fn init(
    peer: &std::path::Path,
    dir: &std::path::Path,
    id: &str,
    token: &str,
) -> Result<()> {
    let mut child = Command::new(peer)
        .arg("init")
        .arg("--dir")
        .arg(dir)
        .args(["--instance-id", id, "--join", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("agent-link init")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(token.as_bytes())?;
    }
    if !child.wait()?.success() {
        bail!("agent-link init {id} failed");
    }
    Ok(())
}

/// The benchmark.
pub fn run(args: CliArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let relay_bin = relay_binary(args.relay_bin.as_deref())?;
    let peer = sibling_binary("agent-link", args.peer_bin.as_deref())?;
    let tmp = tempfile::tempdir()?;
    let relay = RelayProcess::start(
        &relay_bin,
        &tmp.path().join("relay"),
        &serde_json::json!({}),
    )?;
    let dirs = [tmp.path().join("one"), tmp.path().join("two")];
    for (dir, id) in dirs.iter().zip(["cli-1", "cli-2"]) {
        init(&peer, dir, id, &relay.token)?;
    }
    let mut listen = Command::new(&peer)
        .arg("listen")
        .arg("--dir")
        .arg(&dirs[0])
        .args(["--agent", "bob"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("agent-link listen")?;
    // Its ready line says it is attached.
    {
        use std::io::BufRead;
        let stderr = listen.stderr.take().context("stderr")?;
        let mut line = String::new();
        std::io::BufReader::new(stderr).read_line(&mut line)?;
        if !line.starts_with("listening as ") {
            bail!("listen: {line}");
        }
    }
    let send = || {
        let mut c = Command::new(&peer);
        c.arg("send").arg("--dir").arg(&dirs[1]);
        c.args(["--from", "alice", "--to", "cli-1/bob", "hello"]);
        c.stdout(Stdio::null());
        c
    };
    let status = || {
        let mut c = Command::new(&peer);
        c.arg("status").arg("--dir").arg(&dirs[1]);
        c.stdout(Stdio::null());
        c
    };
    let result = (|| -> Result<()> {
        for _ in 0..3 {
            timed(&mut send())?;
            timed(&mut status())?;
        }
        let mut sends = Vec::with_capacity(args.runs);
        let mut statuses = Vec::with_capacity(args.runs);
        // Alternated, so both see the same machine.
        for _ in 0..args.runs {
            sends.push(timed(&mut send())?);
            statuses.push(timed(&mut status())?);
        }
        println!("whole-process CLI calls on loopback ({} each):", args.runs);
        summary("send", 8, sends);
        summary("status", 8, statuses);
        Ok(())
    })();
    let _ = listen.kill();
    let _ = listen.wait();
    drop(relay);
    result
}
