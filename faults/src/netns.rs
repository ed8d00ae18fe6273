//! Random packet loss for real: the relay runs inside a network namespace
//! joined to the host by a veth pair, and nftables drops a percentage of the
//! datagrams crossing that veth (`numgen random mod 100 < P drop`), in both
//! directions. Needs root, `ip` (iproute2) and `nft` (nftables); where any is
//! missing, [`LossyNamespace::create`] says so and callers skip.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Why a namespace could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// This machine cannot do it (not root, no iproute2, no nftables).
    #[error("network namespaces unavailable: {0}")]
    Unavailable(String),
    /// A setup command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
}

/// A namespace with a lossy veth; deleted (with the veth) on drop.
pub struct LossyNamespace {
    name: String,
    inner_ip: Ipv4Addr,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl LossyNamespace {
    /// Create a namespace whose veth drops `loss_pct`% of packets each way.
    pub fn create(loss_pct: u32) -> Result<Self, NetnsError> {
        preflight()?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}{n:x}", std::process::id() & 0xffff);
        let name = format!("al-loss-{tag}");
        // Interface names are limited to 15 bytes.
        let (host_if, ns_if) = (format!("alh{tag}"), format!("aln{tag}"));
        // A /30 out of 10.231.0.0/16 chosen at random, so parallel tests
        // (and a leftover namespace of a killed run) do not collide.
        let block: u16 = rand::random::<u16>() & 0xfffc;
        let [hi, lo] = block.to_be_bytes();
        let host_ip = Ipv4Addr::new(10, 231, hi, lo + 1);
        let inner_ip = Ipv4Addr::new(10, 231, hi, lo + 2);
        // The first step needs CAP_SYS_ADMIN; a container without it cannot
        // do any of this, which is a reason to skip, not a failure.
        sh(&["ip", "netns", "add", &name]).map_err(|e| NetnsError::Unavailable(e.to_string()))?;
        let me = Self { name, inner_ip };
        let ns = &me.name;
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", ns])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "addr",
            "add",
            &format!("{inner_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", &ns_if, "up"])?;
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
        let rules = format!(
            "table inet agent_link_loss {{\n\
             chain input {{ type filter hook input priority 0; policy accept;\n\
               iifname \"{ns_if}\" numgen random mod 100 < {loss_pct} counter drop; }}\n\
             chain output {{ type filter hook output priority 0; policy accept;\n\
               oifname \"{ns_if}\" numgen random mod 100 < {loss_pct} counter drop; }}\n\
             }}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetnsError::Unavailable(format!("running nft: {e}")))?;
        {
            use std::io::Write;
            let mut stdin = nft.stdin.take().expect("piped stdin");
            stdin
                .write_all(rules.as_bytes())
                .map_err(|e| NetnsError::Unavailable(format!("feeding nft: {e}")))?;
        }
        let out = nft
            .wait_with_output()
            .map_err(|e| NetnsError::Unavailable(format!("running nft: {e}")))?;
        if !out.status.success() {
            return Err(NetnsError::Command {
                cmd: "nft -f (loss rules)".into(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(me)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace, reachable from the host.
    pub fn inner_ip(&self) -> IpAddr {
        IpAddr::V4(self.inner_ip)
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn wrapper(&self) -> Vec<std::ffi::OsString> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.into())
            .collect()
    }

    /// Packets nftables has dropped so far (both directions).
    pub fn dropped_packets(&self) -> u64 {
        let Ok(out) = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "nft",
                "list",
                "table",
                "inet",
                "agent_link_loss",
            ])
            .output()
        else {
            return 0;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }
}

impl Drop for LossyNamespace {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether this machine can make namespaces at all (root, `ip`, `nft`);
/// the reason when not.
pub fn preflight() -> Result<(), NetnsError> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        });
    if uid.as_deref() != Some("0") {
        return Err(NetnsError::Unavailable(
            "needs root (effective uid 0)".into(),
        ));
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(NetnsError::Unavailable(format!(
                "`{tool}` not found (apt-get install {pkg})"
            )));
        }
    }
    Ok(())
}

fn sh(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetnsError::Unavailable(format!("running {}: {e}", args[0])))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
