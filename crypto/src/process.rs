//! Process hardening shared by both binaries: no core dumps. A core file of
//! the relay or of a peer holds its private key, the fleet secret and
//! whatever messages were in memory, written to disk (or to a crash
//! collector) for anyone who can read it. Through `rustix`, so no `unsafe`.

/// Turn core dumps off for this process and its children: the core-size
/// limit to 0 (soft and hard, so it cannot be raised again), and on Linux
/// `PR_SET_DUMPABLE` 0, which also covers a `core_pattern` pipe to a crash
/// collector (that ignores the size limit) and keeps other processes of the
/// same user from attaching with ptrace or reading `/proc/PID/mem`.
///
/// Call it first thing in `main`, before any secret is read.
pub fn no_core_dumps() -> std::io::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}
