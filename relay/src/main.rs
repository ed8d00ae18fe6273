//! `agent-link-relay`: run and administer an agent-link relay.
//!
//! Exit codes: 0 success · 1 other failure · 2 bad usage or input · 3 target
//! unknown · 4 refused (id taken, revoked) · 5 timed out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agent_link_crypto::{CryptoError, FleetSecret};
use agent_link_proto::Exit;
use agent_link_relay::cluster::membership::Claim;
use agent_link_relay::registry::RegisterError;
use agent_link_relay::state::{self, StateError};
use agent_link_relay::{Relay, SpawnOptions};
use clap::{Parser, Subcommand};

const EXIT_CODES: &str = "Exit codes: 0 success · 1 other failure · 2 bad usage or input · \
3 target offline or unknown · 4 refused (id or key taken, …) · 5 timed out. \
Errors are one line on stderr.";

#[derive(Parser)]
#[command(
    name = "agent-link-relay",
    version,
    about = "The agent-link relay: forwards signed messages between agent instances over QUIC",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct DirArg {
    /// State directory (default: $XDG_DATA_HOME/agent-link-relay or ~/.local/share/agent-link-relay)
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl DirArg {
    fn path(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(state::default_dir)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve. On an empty or missing DIR, initialise it first and print on stdout how to invite the first instance.
    Run {
        #[command(flatten)]
        dir: DirArg,
        /// UDP address to listen on (overrides the config; default 127.0.0.1:8765)
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve Prometheus metrics over HTTP on this TCP address
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
    },
    /// Initialise state (config, TLS identity, fleet secret, registry); refuses to overwrite.
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Listen address to write into the config
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Serve in a fleet of relays on this NATS cluster: found the fleet, or with
        /// --fleet-secret-file join it (NATS must be up)
        #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
        cluster: Vec<String>,
        /// Join the fleet whose secret is in FILE: a copy of the first relay's fleet.secret
        #[arg(long, value_name = "FILE", requires = "cluster")]
        fleet_secret_file: Option<PathBuf>,
        /// This relay's name in the fleet, unique among its relays (default: relay- and 8 hex
        /// digits of its key)
        #[arg(long, value_name = "ID", requires = "cluster")]
        relay_id: Option<String>,
        /// The address peers dial for this relay, as join tokens list it (default: the listen
        /// address)
        #[arg(long, value_name = "HOST:PORT", requires = "cluster")]
        advertise: Option<String>,
        /// Present this certificate chain from a CA (PEM, the relay's certificate first) instead
        /// of the pinned self-signed certificate; join tokens then tell peers to check it
        /// against their CA roots for the host they dial
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert_chain: Option<PathBuf>,
        /// The private key of --tls-cert-chain (PEM)
        #[arg(long, value_name = "FILE", requires = "tls_cert_chain")]
        tls_key: Option<PathBuf>,
    },
    /// Print one line: a single-use join token for one instance id (relay address, certificate
    /// fingerprint, the invite's own secret), or with --reusable the open fleet token.
    Invite {
        #[command(flatten)]
        dir: DirArg,
        /// Address instances should dial (default: the configured listen address)
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// The one instance id this invite registers (it is used up by that registration)
        #[arg(long, value_name = "ID", required_unless_present = "reusable")]
        instance_id: Option<String>,
        /// Seconds the invite stays valid
        #[arg(long, value_name = "SECS", default_value_t = 7 * 24 * 3600, conflicts_with = "reusable")]
        expires: u64,
        /// The open fleet token (carries the fleet secret; registers any free id), accepted only
        /// while relay-config.json has `open_registration: true`
        #[arg(long, conflicts_with = "instance_id")]
        reusable: bool,
    },
    /// New fleet secret: a running relay pushes it to registered members over their authenticated
    /// connections within a second; the old one is refused after the grace period; revoked members
    /// never get it.
    RotateSecret {
        #[command(flatten)]
        dir: DirArg,
        /// Seconds the old secret stays accepted (members offline longer pick up the new one when
        /// they reconnect; until then their messages are refused with a bad tag)
        #[arg(long, value_name = "SECS", default_value_t = 7 * 24 * 3600)]
        grace: u64,
    },
    /// Register an instance's public key (works whether the relay runs or not).
    Register {
        #[command(flatten)]
        dir: DirArg,
        /// Instance id (1-64 characters from A-Z a-z 0-9 . _ -)
        #[arg(long, required_unless_present = "batch")]
        instance_id: Option<String>,
        /// The instance's public key (64 hex digits, from `agent-link whoami`)
        #[arg(long, required_unless_present = "batch")]
        public_key: Option<String>,
        /// Human-readable name
        #[arg(long)]
        name: Option<String>,
        /// Register every `instance_id public_key_hex` line of FILE (`-`:
        /// stdin) in one registry write: all of them, or none when any line
        /// is refused
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with_all = ["instance_id", "public_key", "name"]
        )]
        batch: Option<PathBuf>,
    },
    /// Revoke an instance; a running relay closes its connections within 2 s.
    Revoke {
        #[command(flatten)]
        dir: DirArg,
        /// Instance id to revoke
        #[arg(long)]
        instance_id: String,
    },
    /// List registered instances: id, name, key, online, attached agents.
    Instances {
        #[command(flatten)]
        dir: DirArg,
        /// One JSON document instead of a table
        #[arg(long)]
        json: bool,
    },
}

/// A failure with its exit code and one line for stderr.
struct Failure(Exit, String);

impl From<StateError> for Failure {
    fn from(e: StateError) -> Self {
        let code = match e {
            StateError::Config(_) | StateError::NotInitialised(_) | StateError::NotEmpty(_) => {
                Exit::Usage
            }
            StateError::AlreadyInitialised(_) | StateError::FleetRotation => Exit::Usage,
            // The wrong fleet secret for this cluster: the operator's to fix.
            StateError::Cluster(agent_link_relay::state::RegistryAccessError::Cluster(
                agent_link_relay::cluster::ClusterError::NotThisFleet,
            )) => Exit::Usage,
            // Files or a directory others could read or change: the
            // operator's to fix (as the peer answers them).
            StateError::Crypto(
                CryptoError::InsecurePermissions { .. }
                | CryptoError::InsecureDirectory { .. }
                | CryptoError::ForeignDirectory { .. },
            ) => Exit::Usage,
            _ => Exit::Other,
        };
        Failure(code, e.to_string())
    }
}

fn main() -> ExitCode {
    // Before anything reads a key: no core file may hold it.
    let core_dumps = agent_link_crypto::process::no_core_dumps();
    // Every subcommand's --help ends with the exit codes too.
    let matches = <Cli as clap::CommandFactory>::command()
        .mut_subcommands(|c| c.after_help(EXIT_CODES))
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The operator's commands (init, invite, register…) in a fleet connect
    // to NATS once each: the client's connection notes are noise there.
    let default_filter = match cli.command {
        Command::Run { .. } => "info",
        _ => "info,async_nats=warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    if let Err(e) = core_dumps {
        tracing::warn!("could not turn core dumps off: {e}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code.code())
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run {
            dir,
            listen,
            metrics,
        } => serve(&dir.path(), listen, metrics),
        Command::Init {
            dir,
            listen,
            cluster,
            fleet_secret_file,
            relay_id,
            advertise,
            tls_cert_chain,
            tls_key,
        } => {
            let dir = dir.path();
            let tls = match (tls_cert_chain, tls_key) {
                (Some(c), Some(k)) => Some(agent_link_relay::TlsConfig {
                    cert_chain: c.display().to_string(),
                    key: k.display().to_string(),
                }),
                _ => None,
            };
            let fleet_secret = match &fleet_secret_file {
                None => None,
                Some(f) => Some(FleetSecret::read(f).map_err(|e| {
                    Failure(
                        Exit::Usage,
                        format!("--fleet-secret-file {}: {e}", f.display()),
                    )
                })?),
            };
            let founding_or_joining = !cluster.is_empty();
            let cluster = founding_or_joining.then_some(state::ClusterInit {
                nats: cluster,
                relay_id,
                advertise,
            });
            let (st, claim) = state::init_with(
                &dir,
                state::InitOptions {
                    listen,
                    cluster,
                    fleet_secret,
                    tls,
                },
            )?;
            eprintln!("initialised {}", dir.display());
            if let (Some(c), Some(claim)) = (&st.config.cluster, claim) {
                let urls = c.nats.join(",");
                match claim {
                    Claim::Founded => eprintln!(
                        "relay {} founded a fleet on {urls}; join more relays with \
                         `agent-link-relay init --dir DIR --listen ADDR --cluster {urls} \
                         --fleet-secret-file COPY`, COPY a copy (mode 0600) of {}",
                        c.relay_id,
                        dir.join("fleet.secret").display()
                    ),
                    Claim::Member => {
                        eprintln!("relay {} joined the fleet on {urls}", c.relay_id);
                        // Its registry is the fleet's: not a new relay's.
                        return Ok(());
                    }
                }
            }
            eprintln!("{}", first_invite_hint(&dir));
            Ok(())
        }
        Command::Invite {
            dir,
            addr,
            instance_id,
            expires,
            reusable,
        } => {
            let st = state::load(&dir.path())?;
            let addr = match addr.or_else(|| st.default_dial_addr()) {
                Some(a) => a,
                None => {
                    return Err(Failure(
                        Exit::Usage,
                        "the configured listen port is 0; pass --addr HOST:PORT".into(),
                    ))
                }
            };
            let token = match instance_id {
                Some(id) if !reusable => {
                    if expires == 0 {
                        return Err(Failure(Exit::Usage, "--expires must be at least 1".into()));
                    }
                    st.invite(&addr, &id, std::time::Duration::from_secs(expires))
                        .map_err(|e| match e {
                            state::InviteStateError::Refused(
                                agent_link_relay::registry::InviteError::Register(
                                    RegisterError::BadId(m),
                                ),
                            ) => Failure(Exit::Usage, format!("--instance-id: {m}")),
                            state::InviteStateError::Refused(r) => {
                                Failure(Exit::Refused, format!("cannot invite {id}: {r}"))
                            }
                            e => Failure(Exit::Other, e.to_string()),
                        })?
                }
                _ => {
                    if !st.config.open_registration {
                        return Err(Failure(
                            Exit::Usage,
                            "open registration is off: invite one id with `--instance-id ID`, \
                             or set \"open_registration\": true in relay-config.json first"
                                .into(),
                        ));
                    }
                    st.open_token(&addr)
                        .map_err(|e| Failure(Exit::Other, e.to_string()))?
                }
            };
            println!(
                "{}",
                token
                    .encode()
                    .map_err(|e| Failure(Exit::Other, e.to_string()))?
            );
            Ok(())
        }
        Command::Register {
            dir,
            batch: Some(file),
            ..
        } => register_batch(&dir.path(), &file),
        Command::Register {
            dir,
            instance_id,
            public_key,
            name,
            batch: None,
        } => {
            // clap requires both unless --batch is given.
            let (Some(instance_id), Some(public_key)) = (instance_id, public_key) else {
                return Err(Failure(
                    Exit::Usage,
                    "--instance-id and --public-key are required".into(),
                ));
            };
            let st = state::load(&dir.path())?;
            let key: agent_link_crypto::PublicKey = public_key
                .parse()
                .map_err(|e| Failure(Exit::Usage, format!("--public-key: {e}")))?;
            let name = name.unwrap_or_else(|| instance_id.clone());
            let res = st
                .update_registry(|r| r.register(&instance_id, &key, &name))
                .map_err(|e| Failure(Exit::Other, e.to_string()))?;
            match res {
                Ok((true, _)) => println!("registered {instance_id}"),
                Ok((false, _)) => println!("already registered {instance_id} (same key)"),
                Err(e @ RegisterError::BadId(_)) => {
                    return Err(Failure(Exit::Usage, e.to_string()))
                }
                Err(e) => return Err(Failure(Exit::Refused, e.to_string())),
            }
            Ok(())
        }
        Command::Revoke { dir, instance_id } => {
            let st = state::load(&dir.path())?;
            let res = st
                .update_registry(|r| r.revoke(&instance_id))
                .map_err(|e| Failure(Exit::Other, e.to_string()))?;
            match res {
                Ok((true, _)) => println!("revoked {instance_id}"),
                Ok((false, _)) => println!("{instance_id} was already revoked"),
                Err(e) => return Err(Failure(Exit::Offline, e)),
            }
            Ok(())
        }
        Command::Instances { dir, json } => instances(&dir.path(), json),
        Command::RotateSecret { dir, grace } => {
            let dir = dir.path();
            state::load(&dir)?;
            let until = state::rotate_secret(&dir, std::time::Duration::from_secs(grace))?;
            let left = until.saturating_sub(agent_link_proto::clock::unix_ms(
                std::time::SystemTime::now(),
            )) / 1000;
            println!("rotated the fleet secret; the old one is accepted for {left} s more");
            Ok(())
        }
    }
}

/// `register --batch FILE`: parse every line first, then apply them all in
/// one registry update (one lock, one rewrite of `registry.json`). Any bad
/// line, or any registration the single `register` would refuse, leaves the
/// registry untouched and names the line.
fn register_batch(dir: &Path, file: &Path) -> Result<(), Failure> {
    use std::io::Read;
    let st = state::load(dir)?;
    let mut text = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text))
    };
    read.map_err(|e| Failure(Exit::Usage, format!("--batch {}: {e}", file.display())))?;
    let mut entries: Vec<(usize, String, agent_link_crypto::PublicKey)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, key] = fields[..] else {
            return Err(Failure(Exit::Usage,
                format!(
                    "--batch line {n}: expected `instance_id public_key_hex`, found {} fields; nothing registered",
                    fields.len()
                ),
            ));
        };
        agent_link_proto::check_id(id).map_err(|e| {
            Failure(
                Exit::Usage,
                format!("--batch line {n}: {e}; nothing registered"),
            )
        })?;
        let key: agent_link_crypto::PublicKey = key.parse().map_err(|e| {
            Failure(
                Exit::Usage,
                format!("--batch line {n}: public key: {e}; nothing registered"),
            )
        })?;
        entries.push((n, id.to_string(), key));
    }
    let res = st
        .update_registry(|r| {
            let mut added = 0usize;
            for (n, id, key) in &entries {
                match r.register(id, key, id) {
                    Ok(true) => added += 1,
                    Ok(false) => {}
                    Err(e) => return Err((*n, e)),
                }
            }
            Ok(added)
        })
        .map_err(|e| Failure(Exit::Other, e.to_string()))?;
    match res {
        Ok((added, _)) => {
            println!(
                "registered {added} new, {} already registered (same key)",
                entries.len() - added
            );
            Ok(())
        }
        Err((n, e)) => {
            let code = if matches!(e, RegisterError::BadId(_)) {
                Exit::Usage
            } else {
                Exit::Refused
            };
            Err(Failure(
                code,
                format!("--batch line {n}: {e}; nothing registered"),
            ))
        }
    }
}

/// What to run next on a new relay: joining takes an invite per instance,
/// and the invite is a secret, so it is not printed where logs are kept.
fn first_invite_hint(dir: &Path) -> String {
    format!(
        "no instances yet: invite the first with `agent-link-relay invite --dir {} --instance-id ID` \
         and give its one-line token to `agent-link init --join-file FILE` on that computer",
        dir.display()
    )
}

fn instances(dir: &Path, json: bool) -> Result<(), Failure> {
    let st = state::load(dir)?;
    let reg = st
        .load_registry()
        .map_err(|e| Failure(Exit::Other, e.to_string()))?;
    let online = agent_link_relay::query_online(dir);
    let relay_running = online.is_some();
    let online = online.unwrap_or_default();
    let rows: Vec<serde_json::Value> = reg
        .records()
        .iter()
        .map(|r| {
            let live = online.iter().find(|o| o.instance_id == r.instance_id);
            let agents = live.map(|o| o.agents.clone());
            serde_json::json!({
                "instance_id": r.instance_id,
                "name": r.name,
                "public_key": r.public_key,
                "revoked": r.revoked,
                "online": agents.is_some(),
                "agents": agents.unwrap_or_default(),
                "connections": live.map_or(0, |o| o.connections),
            })
        })
        .collect();
    let now = agent_link_proto::clock::unix_ms(std::time::SystemTime::now());
    let invites: Vec<serde_json::Value> = reg
        .invites()
        .iter()
        .filter(|i| i.expires_at_ms > now)
        .map(
            |i| serde_json::json!({"instance_id": i.instance_id, "expires_at_ms": i.expires_at_ms}),
        )
        .collect();
    if json {
        let doc = serde_json::json!({
            "relay_running": relay_running,
            "instances": rows,
            "pending_invites": invites,
        });
        println!("{doc}");
        return Ok(());
    }
    if !relay_running {
        eprintln!("note: the relay is not running; everyone is shown offline");
    }
    println!(
        "{:<24} {:<20} {:<8} {:<24} KEY",
        "INSTANCE", "NAME", "ONLINE", "AGENTS"
    );
    for r in rows {
        let online = if r["revoked"] == true {
            "revoked".to_string()
        } else if r["online"] == true {
            "yes".to_string()
        } else {
            "no".to_string()
        };
        let agents: Vec<&str> = r["agents"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        println!(
            "{:<24} {:<20} {:<8} {:<24} {}",
            r["instance_id"].as_str().unwrap_or(""),
            // Names are free text chosen at registration: one line,
            // control characters escaped.
            agent_link_proto::text::one_line(r["name"].as_str().unwrap_or("")),
            online,
            if agents.is_empty() {
                "-".to_string()
            } else {
                agents.join(",")
            },
            r["public_key"].as_str().unwrap_or("")
        );
    }
    for i in invites {
        println!(
            "{:<24} {:<20} {:<8} invited, expires in {} s",
            i["instance_id"].as_str().unwrap_or(""),
            "-",
            "-",
            i["expires_at_ms"].as_u64().unwrap_or(0).saturating_sub(now) / 1000
        );
    }
    Ok(())
}

fn serve(
    dir: &Path,
    listen: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Result<(), Failure> {
    let fresh = !state::is_initialised(dir);
    // `init` itself refuses a non-empty directory that holds no relay state,
    // with an error that says so.
    let st = if fresh {
        let st = state::init(dir, listen)?;
        eprintln!("initialised {}", dir.display());
        st
    } else {
        state::load(dir)?
    };
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| Failure(Exit::Other, format!("starting runtime: {e}")))?;
    rt.block_on(async move {
        let relay = Relay::spawn(
            st,
            SpawnOptions {
                listen,
                metrics,
                admin_socket: true,
            },
        )
        .await
        .map_err(|e| Failure(Exit::Other, e.to_string()))?;
        if fresh {
            // Not a token: stdout of a service lands in its journal, and a
            // join token is a secret (SECURITY.md).
            println!("{}", first_invite_hint(dir));
        }
        if let Some(m) = relay.metrics_addr() {
            tracing::info!("metrics on http://{m}/metrics");
        }
        shutdown_signal().await;
        tracing::info!("shutting down");
        relay.shutdown().await;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
