//! The workspace's binaries as child processes: where they are (built on
//! first use), a `Command` for each CLI, and their output as text.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The path of a workspace binary in this test's own `target/` directory.
/// `cargo test` builds binaries only for the package under test, so the
/// first call builds the relay and peer CLIs (a no-op when they are fresh);
/// this keeps `cargo test --workspace` and `cargo test -p agent-link-tests`
/// honest.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    BUILT.get_or_init(|| {
        let target_dir = profile_dir.parent().expect("target dir");
        let mut c = std::process::Command::new(env!("CARGO"));
        c.args([
            "build",
            "--bins",
            "-p",
            "agent-link",
            "-p",
            "agent-link-relay",
            "--target-dir",
        ])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let status = c.status().expect("running cargo build");
        assert!(status.success(), "building the CLI binaries failed");
    });
    let p = profile_dir.join(name);
    assert!(p.exists(), "{} is missing", p.display());
    p
}

/// A command for `agent-link-relay`.
pub fn relay_cmd() -> Command {
    Command::new(workspace_bin("agent-link-relay"))
}

/// A command for `agent-link`.
pub fn peer_cmd() -> Command {
    Command::new(workspace_bin("agent-link"))
}

/// A child's output (stdout or stderr) as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
