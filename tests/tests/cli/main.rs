//! The real binaries as child processes, one module per subject. The
//! binaries come from the same `target/` as the test (built on first use by
//! `agent_link_tests::workspace_bin`). Every wait is bounded.
//!
//! | module | subject |
//! |---|---|
//! | `cli` | the command-line contract: the README quickstart, exit codes, `--help` everywhere, relay admin commands, receipts, listeners across restarts |
//! | `daemon` | the local instance: two daemons, durable inboxes across kill -9, read receipts, limits, the local API's refusals |
//! | `cli_batch` | `agent-link-relay register --batch`: many registrations in one write, all or nothing |

mod cli;
mod cli_batch;
mod daemon;
mod fleet_init;
