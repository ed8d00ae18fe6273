//! `agent-link`: the peer command line. Exit codes: 0 success · 1 other
//! failure · 2 bad usage or input · 3 target offline or unknown · 4 refused ·
//! 5 timed out (outcome unknown).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent_link::daemon::client::Client;
use agent_link::{AgentLink, Exit, JoinToken, LinkError, SendError};
use agent_link_proto::text::with_target;
use clap::{Parser, Subcommand};

mod local;

const EXIT_CODES: &str = "Exit codes: 0 success · 1 other failure · 2 bad usage or input · \
3 target offline or unknown · 4 refused (not registered, revoked, id taken, bad signature or tag) · \
5 timed out (outcome unknown). Errors are one line on stderr; set RUST_LOG=info (or debug) for logs.";

#[derive(Parser)]
#[command(
    name = "agent-link",
    version,
    about = "Send and receive agent messages through an agent-link relay",
    after_help = EXIT_CODES
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
        /// Join token from `agent-link-relay invite`, or `-` to read it from
        /// standard input (it holds the fleet secret: prefer `-` or
        /// --join-file, which keep it out of `ps` and shell history)
        #[arg(
            long,
            value_name = "TOKEN",
            required_unless_present = "join_file",
            conflicts_with = "join_file"
        )]
        join: Option<String>,
        /// Read the join token from FILE
        #[arg(long, value_name = "FILE")]
        join_file: Option<PathBuf>,
        /// Human-readable name
        #[arg(long)]
        name: Option<String>,
        /// PEM CA certificates to check relays with a CA-issued certificate
        /// against, instead of the system's CA roots (copied into DIR)
        #[arg(long, value_name = "FILE")]
        relay_ca_file: Option<PathBuf>,
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
        /// Target, INSTANCE/AGENT, or a bare AGENT: the one online instance
        /// where an agent of that name receives
        #[arg(long, value_name = "INSTANCE/AGENT")]
        to: String,
        /// Seconds to wait in all, connecting included (default: the config's send_timeout_secs)
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Also wait (up to SECS after delivery) until the target agent has
        /// read the message (acked it at its daemon); exit 5 if it has not
        #[arg(long, value_name = "SECS")]
        wait_read: Option<u64>,
        /// JSON output
        #[arg(long)]
        json: bool,
        /// The message; read from standard input when left out
        message: Option<String>,
    },
    /// Print each message for AGENT as it arrives; keeps going across relay restarts.
    /// Prints one line `listening as INSTANCE/AGENT` on stderr once attached.
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
        /// Deliver only from instances whose key is pinned (`agent-link trust`);
        /// refuse the others (KeyChanged) instead of pinning on first contact
        /// (also: `strict_pins: true` in the config)
        #[arg(long)]
        strict: bool,
    },
    /// Pin INSTANCE's public KEY out of band, before first contact: its
    /// messages under any other key are then refused (KeyChanged).
    Trust {
        #[command(flatten)]
        dir: DirArg,
        /// The instance id
        instance: String,
        /// Its public key, 64 hex digits (`agent-link whoami` on that computer)
        key: String,
    },
    /// Connection to the relay, round-trip time, attached agents, online peers.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// JSON output
        #[arg(long)]
        json: bool,
    },
    /// Run this instance's daemon in the foreground: one relay connection,
    /// durable inboxes for the registered agents, the local API on
    /// DIR/agent-link.sock. SIGINT/SIGTERM stop it.
    Daemon {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Register, unregister and list the agents of this instance.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// List the messages waiting for AGENT, oldest first, without removing them.
    Inbox {
        #[command(flatten)]
        dir: DirArg,
        /// The registered agent
        #[arg(long, value_name = "AGENT")]
        agent: String,
        /// One JSON object per line (the `listen --json` fields plus received_at)
        #[arg(long)]
        json: bool,
    },
    /// Print the oldest waiting message(s) for AGENT and remove them once printed.
    Recv {
        #[command(flatten)]
        dir: DirArg,
        /// The registered agent
        #[arg(long, value_name = "AGENT")]
        agent: String,
        /// Wait up to SECS for a message; none: exit 5, nothing printed
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Up to N messages (default 1)
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Remove messages by id (after reading them with `inbox`).
    Ack {
        #[command(flatten)]
        dir: DirArg,
        /// The registered agent
        #[arg(long, value_name = "AGENT")]
        agent: String,
        /// Message ids (32 hex digits each)
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Register AGENT here: it receives into its inbox even when no process of it runs.
    Add {
        #[command(flatten)]
        dir: DirArg,
        /// The agent id
        agent: String,
        /// POST {agent, id, from} to this loopback URL when a message lands
        #[arg(long, value_name = "URL")]
        notify_url: Option<String>,
    },
    /// Unregister AGENT (its waiting messages are dropped).
    Remove {
        #[command(flatten)]
        dir: DirArg,
        /// The agent id
        agent: String,
    },
    /// The registered agents and their inbox depths.
    List {
        #[command(flatten)]
        dir: DirArg,
        /// JSON output: {"agents": [{"agent", "inbox", "notify_url"}]}
        #[arg(long)]
        json: bool,
    },
}

struct Failure(Exit, String);

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Self {
        Failure(e.exit(), e.to_string())
    }
}

fn main() -> ExitCode {
    // Before anything reads a key: no core file may hold it.
    if let Err(e) = agent_link_crypto::process::no_core_dumps() {
        eprintln!("warning: could not turn core dumps off: {e}");
    }
    // Every subcommand's --help ends with the exit codes too.
    let matches = <Cli as clap::CommandFactory>::command()
        .mut_subcommands(|c| c.after_help(EXIT_CODES))
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // Logs only when asked for: otherwise stderr carries exactly one line,
    // the error, for scripts and agents to read. A listener is the
    // exception: a sender it refuses for its key (changed, or not pinned
    // under strict pins) is one warning line, since its operator is the one
    // who can act on it (`agent-link trust`).
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter)
            .init();
    } else if matches!(cli.command, Command::Daemon { .. }) {
        // A service: its journal gets what it does (never message content).
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .init();
    } else if matches!(cli.command, Command::Listen { .. }) {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
                "{}=warn",
                agent_link::PINS_LOG_TARGET
            )))
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::from(Exit::Other.code());
        }
    };
    let result = rt.block_on(run(cli));
    // Nothing is left to wait for: every command has printed its answer and
    // closed its link; do not wait for background tasks.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::from(code.code())
        }
    }
}

/// The join token from `--join TOKEN`, `--join -` (standard input) or
/// `--join-file FILE`. Every copy of its text is zeroed when dropped (it
/// holds the fleet secret); the parsed token keeps it in a `FleetSecret`.
fn read_join(join: Option<String>, file: Option<PathBuf>) -> Result<JoinToken, Failure> {
    use zeroize::Zeroizing;
    let usage = |m: String| Failure(Exit::Usage, m);
    let join = join.map(Zeroizing::new);
    // A token is well under 1 KiB: room for it up front, so reading does
    // not reallocate and leave copies behind.
    let mut text = Zeroizing::new(String::with_capacity(1024));
    let flag = match (join.as_deref().map(String::as_str), file) {
        (_, Some(path)) => {
            let flag = format!("--join-file {}", path.display());
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_string(&mut text))
                .map_err(|e| usage(format!("{flag}: {e}")))?;
            flag
        }
        (Some("-"), None) => {
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| usage(format!("--join -: reading standard input: {e}")))?;
            "--join -".to_string()
        }
        (Some(t), None) => {
            text.push_str(t);
            "--join".to_string()
        }
        (None, None) => {
            return Err(usage(
                "--join TOKEN, --join - or --join-file FILE is required".into(),
            ))
        }
    };
    // The error names the flag, never the token (it holds the fleet secret).
    JoinToken::parse(text.trim()).map_err(|e| usage(format!("{flag}: {e}")))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Init {
            dir,
            instance_id,
            join,
            join_file,
            name,
            relay_ca_file,
        } => {
            let token = read_join(join, join_file)?;
            let key = agent_link::init_with(
                &dir.path(),
                &instance_id,
                &token,
                name.as_deref(),
                relay_ca_file.as_deref(),
            )
            .await
                .map_err(|e| match e {
                    LinkError::Refused(agent_link::ErrorCode::InstanceIdTaken) => Failure(
                        Exit::Refused,
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
                .map_err(|e| Failure(Exit::Usage, e.to_string()))?;
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
            wait_read,
            json,
            message,
        } => {
            if to.contains('/') {
                agent_link_proto::Address::parse(&to)
                    .map_err(|e| Failure(Exit::Usage, format!("--to: {e}")))?;
            } else {
                agent_link_proto::check_id(&to)
                    .map_err(|e| Failure(Exit::Usage, format!("--to: {e}")))?;
            }
            agent_link_proto::check_id(&from)
                .map_err(|e| Failure(Exit::Usage, format!("--from: {e}")))?;
            let payload = match message {
                Some(m) => m.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                        Failure(Exit::Other, format!("reading standard input: {e}"))
                    })?;
                    buf
                }
            };
            let dir = dir.path();
            if let Some(client) = Client::find(&dir).await {
                return local::send(&client, &from, &to, payload, timeout, wait_read, json).await;
            }
            if wait_read.is_some() {
                return Err(Failure(
                    Exit::Usage,
                    format!(
                        "--wait-read needs this instance's daemon (read receipts come to it): start `agent-link daemon --dir {}`",
                        dir.display()
                    ),
                ));
            }
            // --timeout bounds the whole call: connecting, attaching, sending.
            let deadline = match timeout {
                Some(s) => Duration::from_secs(s.max(1)),
                None => Duration::from_secs(
                    agent_link::config::PeerConfig::load(&dir)?.send_timeout_secs,
                ),
            };
            let start = tokio::time::Instant::now();
            let link = AgentLink::builder(&dir)
                .connect_timeout(deadline)
                .setup_timeout(deadline)
                .connect()
                .await?;
            let agent = link.attach_sender(&from).await?;
            let to = if to.contains('/') {
                to
            } else {
                resolve(&link, &to).await?
            };
            let left = deadline.saturating_sub(start.elapsed());
            let result = agent.send_with_timeout(&to, payload, left).await;
            // The answer first, then the goodbye (which does not wait out
            // QUIC's drain).
            let printed = match &result {
                Ok(r) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"status": "delivered", "id": r.id.to_string(), "to": r.to, "delivered_at": r.delivered_at_ms})
                        );
                    } else {
                        println!("delivered {} to {} at {}", r.id, r.to, r.delivered_at_ms);
                    }
                    Ok(())
                }
                Err(e) => Err(Failure(e.exit(), send_error_line(e, &to))),
            };
            agent.close().await;
            link.close().await;
            printed
        }
        Command::Listen {
            dir,
            agent,
            json,
            count,
            strict,
        } => {
            let dir = dir.path();
            if let Some(client) = Client::find(&dir).await {
                if strict {
                    return Err(Failure(Exit::Usage, "--strict is the daemon's to set: put `strict_pins: true` in the config and restart the daemon".into()));
                }
                return local::listen(&client, &agent, json, count).await;
            }
            listen(dir, &agent, json, count, strict).await
        }
        Command::Trust { dir, instance, key } => {
            let key: agent_link_crypto::PublicKey = key
                .parse()
                .map_err(|e| Failure(Exit::Usage, format!("KEY: {e}")))?;
            match agent_link::trust(&dir.path(), &instance, &key) {
                Ok(true) => println!("pinned {instance} {key}"),
                Ok(false) => println!("{instance} was already pinned to {key}"),
                Err(LinkError::Refused(agent_link::ErrorCode::KeyChanged)) => {
                    return Err(Failure(
                        Exit::Refused,
                        format!("{instance} is already pinned to another key; remove its entry from {} to re-pin it on purpose", dir.path().join("known_instances.json").display()),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
        Command::Daemon { dir } => local::daemon(&dir.path()).await,
        Command::Agent { command } => match command {
            AgentCommand::Add {
                dir,
                agent,
                notify_url,
            } => local::agent_add(&dir.path(), &agent, notify_url).await,
            AgentCommand::Remove { dir, agent } => local::agent_remove(&dir.path(), &agent).await,
            AgentCommand::List { dir, json } => local::agent_list(&dir.path(), json).await,
        },
        Command::Inbox { dir, agent, json } => local::inbox(&dir.path(), &agent, json).await,
        Command::Recv {
            dir,
            agent,
            wait,
            count,
            json,
        } => local::recv(&dir.path(), &agent, wait, count, json).await,
        Command::Ack { dir, agent, ids } => local::ack(&dir.path(), &agent, &ids).await,
        Command::Status { dir, json } => {
            let dir = dir.path();
            if let Some(client) = Client::find(&dir).await {
                return local::status(&client, json).await;
            }
            let relay = agent_link::config::PeerConfig::load(&dir)?.relay_url;
            let (link, report) = match AgentLink::connect(&dir).await {
                Ok(link) => {
                    let st = link.status().await;
                    (Some(link), st)
                }
                Err(e) => (None, Err(e)),
            };
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
                    if let Some(link) = link {
                        link.close().await;
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
            if let Some(link) = link {
                link.close().await;
            }
            Ok(())
        }
    }
}

/// A bare agent name: the one online instance where it receives.
async fn resolve(link: &AgentLink, agent: &str) -> Result<String, Failure> {
    let st = link.status().await?;
    agent_link::find_agent(&st.instances, agent).map_err(|e| {
        let exit = match e {
            agent_link::FindAgentError::Nowhere { .. } => Exit::Offline,
            _ => Exit::Usage,
        };
        Failure(exit, e.to_string())
    })
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

async fn listen(
    dir: PathBuf,
    agent: &str,
    json: bool,
    count: Option<u64>,
    strict: bool,
) -> Result<(), Failure> {
    let mut builder = AgentLink::builder(&dir);
    if strict {
        builder = builder.strict_pins(true);
    }
    let link = builder.connect().await?;
    let mut me = link.attach(agent).await?;
    // Scripts wait for this line before they send.
    eprintln!("listening as {}", me.address());
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
                    Exit::from(code),
                    format!("agent {agent} stopped receiving: {code}"),
                ),
                None => Failure(
                    Exit::Other,
                    format!("agent {agent} stopped receiving: the link closed"),
                ),
            });
        };
        seen += 1;
        let mut out = stdout.lock();
        let line = if json {
            let mut v = serde_json::json!({
                "id": m.id.to_string(), "from": m.from, "to": m.to, "sent_at": m.sent_at_ms,
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
            format!(
                "{}: {}",
                m.from,
                agent_link_proto::text::one_line(&String::from_utf8_lossy(&m.payload))
            )
        };
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    me.close().await;
    link.close().await;
    Ok(())
}

pub(crate) async fn shutdown_signal() {
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
