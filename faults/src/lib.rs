//! Fault injection for agent-link, shared by the fault tests (`tests/`) and
//! `agent-link-bench soak`:
//!
//! - [`proxy::UdpProxy`]: delay, jitter, duplication, reordering and loss of
//!   UDP datagrams between peers and the relay (this kernel has no netem);
//! - [`relay_process::RelayProcess`]: the real relay binary as a child
//!   process that can be SIGKILLed and started again on the same address;
//! - [`netns::LossyNamespace`]: random packet loss by nftables on a veth into
//!   a network namespace that holds the relay;
//! - [`initials`]: forged QUIC Initial packets at a set rate, as a
//!   connection flood from spoofed addresses sends them;
//! - [`soak`]: runs agents through the `agent-link` library under those
//!   faults and reconciles every message id at the end.
//!
//! This is a test-support crate: its setup functions return `anyhow` errors
//! because callers only report them.

pub mod initials;
pub mod nats_cluster;
pub mod netns;
pub mod proc_watch;
pub mod proxy;
pub mod relay_process;
pub mod soak;

pub use nats_cluster::{nats_or_skip, nats_server, NatsCluster};
pub use netns::{LossyNamespace, NetnsError};
pub use proc_watch::ProcWatch;
pub use proxy::{Impairment, ProxyStats, UdpProxy};
pub use relay_process::RelayProcess;
pub use soak::{FaultPlan, SoakConfig, SoakReport};
