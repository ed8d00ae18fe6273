//! `agent-link`: the peer command line. Exit codes: 0 success · 1 other
//! failure · 2 bad usage or input · 3 target offline or unknown · 4 refused ·
//! 5 timed out (outcome unknown).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_link::{AgentLink, JoinToken, LinkError, SendError};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agent-link",
    version,
    about = "Send and receive agent messages through an agent-link relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct DirArg {
    /// Peer directory (default: $XDG_DATA_HOME/agent-link or ~/.local/share/agent-link)
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl DirArg {
    fn path(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(agent_link::config::default_dir)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Make this instance's key (0600), register it with the relay, write the config; print the public key.
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Instance id (1-64 characters from A-Z a-z 0-9 . _ -)
        #[arg(long)]
        instance_id: String,
        /// Join token from `agent-link-relay invite`
        #[arg(long, value_name = "TOKEN")]
        join: String,
        /// Human-readable name
        #[arg(long)]
        name: Option<String>,
    },
    /// Print this instance's id and public key.
    Whoami {
        #[command(flatten)]
        dir: DirArg,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Send MESSAGE (or standard input) and print the receipt; exit 0 only when delivered.
    Send {
        #[command(flatten)]
        dir: DirArg,
        /// Sending agent on this instance
        #[arg(long, value_name = "AGENT")]
        from: String,
        /// Target, INSTANCE/AGENT
        #[arg(long, value_name = "INSTANCE/AGENT")]
        to: String,
        /// Seconds to wait for the receipt (default: the config's send_timeout_secs)
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// JSON output
        #[arg(long)]
        json: bool,
        /// The message; read from standard input when left out
        message: Option<String>,
    },
    /// Print each message for AGENT as it arrives; keeps going across relay restarts.
    Listen {
        #[command(flatten)]
        dir: DirArg,
        /// Agent to receive for
        #[arg(long, value_name = "AGENT")]
        agent: String,
        /// One JSON object per line: id, from, to, sent_at, message
        #[arg(long)]
        json: bool,
        /// Stop after N messages
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Connection to the relay, round-trip time, attached agents, online peers.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
}

struct Failure(u8, String);

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Self {
        Failure(e.exit_code(), e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Init {
            dir,
            instance_id,
            join,
            name,
        } => {
            let token = JoinToken::parse(&join).map_err(|e| Failure(2, format!("--join: {e}")))?;
            let key = agent_link::init(&dir.path(), &instance_id, &token, name.as_deref())
                .await
                .map_err(|e| match e {
                    LinkError::Refused(agent_link::ErrorCode::InstanceIdTaken) => Failure(
                        4,
                        format!("instance id {instance_id:?} is already registered to another key; choose another --instance-id"),
                    ),
                    other => other.into(),
                })?;
            println!("{key}");
            Ok(())
        }
        Command::Whoami { dir, json } => {
            let dir = dir.path();
            let cfg = agent_link::config::PeerConfig::load(&dir)?;
            let id = agent_link_crypto::Identity::read(&dir.join(agent_link::config::KEY_FILE))
                .map_err(|e| Failure(2, e.to_string()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"instance_id": cfg.instance_id, "name": cfg.name, "public_key": id.public_key().to_string(), "relay": cfg.relay_url})
                );
            } else {
                println!("{} {}", cfg.instance_id, id.public_key());
            }
            Ok(())
        }
        Command::Send {
            dir,
            from,
            to,
            timeout,
            json,
            message,
        } => {
            agent_link_proto::Address::parse(&to).map_err(|e| Failure(2, format!("--to: {e}")))?;
            agent_link_proto::check_id(&from).map_err(|e| Failure(2, format!("--from: {e}")))?;
            let payload = match message {
                Some(m) => m.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Failure(1, format!("reading standard input: {e}")))?;
                    buf
                }
            };
            let link = AgentLink::connect(dir.path()).await?;
            let agent = link.sender(&from).await?;
            let result = match timeout {
                Some(s) => {
                    agent
                        .send_with_timeout(&to, payload, Duration::from_secs(s.max(1)))
                        .await
                }
                None => agent.send(&to, payload).await,
            };
            agent.close().await;
            link.close().await;
            match result {
                Ok(r) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"status": "delivered", "id": hex::encode(r.id), "to": r.from, "delivered_at": r.delivered_at_ms})
                        );
                    } else {
                        println!(
                            "delivered {} to {} at {}",
                            hex::encode(r.id),
                            r.from,
                            r.delivered_at_ms
                        );
                    }
                    Ok(())
                }
                Err(e) => Err(Failure(e.exit_code(), send_error_line(&e, &to))),
            }
        }
        Command::Listen {
            dir,
            agent,
            json,
            count,
        } => listen(dir.path(), &agent, json, count).await,
        Command::Status { dir, json } => {
            let dir = dir.path();
            let relay = agent_link::config::PeerConfig::load(&dir)?.relay_url;
            let report = async {
                let link = AgentLink::connect(&dir).await?;
                let st = link.status().await;
                link.close().await;
                st
            }
            .await;
            let st = match report {
                Ok(st) => st,
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"relay": relay, "connected": false, "error": e.to_string()})
                        );
                    } else {
                        println!("relay      {relay} (not connected)");
                    }
                    return Err(e.into());
                }
            };
            let rtt_ms = st.rtt.as_secs_f64() * 1000.0;
            if json {
                let peers: Vec<_> = st
                    .instances
                    .iter()
                    .map(|i| serde_json::json!({"instance_id": i.instance_id, "name": i.name, "online": i.online, "agents": i.agents}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"relay": st.relay, "connected": true, "rtt_ms": rtt_ms, "instance_id": st.you.instance_id, "agents": st.you.agents, "instances": peers})
                );
            } else {
                println!("relay      {} (connected, rtt {rtt_ms:.2} ms)", st.relay);
                println!(
                    "instance   {} (agents: {})",
                    st.you.instance_id,
                    join_or_dash(&st.you.agents)
                );
                for i in st
                    .instances
                    .iter()
                    .filter(|i| i.instance_id != st.you.instance_id)
                {
                    println!(
                        "peer       {:<24} {:<8} {}",
                        i.instance_id,
                        if i.online { "online" } else { "offline" },
                        join_or_dash(&i.agents)
                    );
                }
            }
            Ok(())
        }
    }
}

fn join_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// One line naming the cause, the target, and what to do next.
fn send_error_line(e: &SendError, to: &str) -> String {
    match e {
        SendError::Refused(code) => with_target(code.describe(), to),
        SendError::Timeout => format!(
            "no receipt from {to} before the deadline; the message may or may not have been delivered (raise --timeout, or check with the receiver before resending)"
        ),
        other => with_target(&other.to_string(), to),
    }
}

/// `"what; next"` → `"what (to); next"`.
fn with_target(text: &str, to: &str) -> String {
    match text.split_once("; ") {
        Some((what, next)) => format!("{what} ({to}); {next}"),
        None => format!("{text} ({to})"),
    }
}

async fn listen(dir: PathBuf, agent: &str, json: bool, count: Option<u64>) -> Result<(), Failure> {
    let link = AgentLink::connect(&dir).await?;
    let mut me = link.attach(agent).await?;
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        if count.is_some_and(|n| seen >= n) {
            break;
        }
        let m = tokio::select! {
            m = me.recv() => m,
            _ = &mut stop => break,
        };
        let Some(m) = m else {
            return Err(match me.stop_reason() {
                Some(code) => Failure(
                    agent_link::exit_code_of(code),
                    format!("agent {agent} stopped receiving: {code}"),
                ),
                None => Failure(
                    1,
                    format!("agent {agent} stopped receiving: the link closed"),
                ),
            });
        };
        seen += 1;
        let mut out = stdout.lock();
        let line = if json {
            let mut v = serde_json::json!({
                "id": hex::encode(m.id), "from": m.from, "to": m.to, "sent_at": m.sent_at_ms,
            });
            match std::str::from_utf8(&m.payload) {
                Ok(s) => v["message"] = s.into(),
                Err(_) => {
                    use base64::Engine as _;
                    v["message_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(&m.payload)
                        .into();
                }
            }
            v.to_string()
        } else {
            format!("{}: {}", m.from, String::from_utf8_lossy(&m.payload))
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    me.close().await;
    link.close().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link::ErrorCode;

    #[test]
    fn error_lines_name_the_target_and_the_next_step() {
        assert_eq!(
            send_error_line(
                &SendError::Refused(ErrorCode::TargetOffline),
                "instance-002/xiaobaozi"
            ),
            "target agent is not connected (instance-002/xiaobaozi); try again when it is listening"
        );
        assert!(send_error_line(&SendError::Timeout, "a/b").contains("a/b"));
        assert_eq!(with_target("no next step", "a/b"), "no next step (a/b)");
    }

    #[test]
    fn usage_errors_exit_2() {
        let e = Cli::try_parse_from(["agent-link", "send", "--to", "a/b"]).err();
        assert_eq!(e.map(|e| e.exit_code()), Some(2));
        assert!(
            Cli::try_parse_from(["agent-link", "listen", "--agent", "x", "--count", "3"]).is_ok()
        );
    }
}
