//! Shared harness for the end-to-end tests in `tests/tests/`: a relay started
//! in process on 127.0.0.1:0 in a temporary directory, and a *raw* client
//! that speaks the wire protocol frame by frame (to send what the peer
//! library never would: spoofed senders, bad tags, oversized frames).
//!
//! Every wait is bounded by [`WAIT`]; nothing here sleeps for a fixed time
//! to "let things settle".
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_link_crypto::tls::{instance_client_config, TlsIdentity};
use agent_link_crypto::{FleetKey, FleetSecret, Identity};
use agent_link_proto::{codec, Address, EnvelopeBody, JoinToken, PeerToRelay, RelayToPeer};
use agent_link_relay::{Relay, RelayConfig, SpawnOptions};

/// Upper bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Start tracing once, so a failing test shows the relay's view.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An in-process relay in its own temporary state directory.
pub struct TestRelay {
    pub relay: Option<Relay>,
    pub dir: tempfile::TempDir,
    pub token: JoinToken,
    pub addr: SocketAddr,
}

impl TestRelay {
    /// Start with the default config, changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut RelayConfig)) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("relay");
        agent_link_relay::state::init(&state_dir, Some("127.0.0.1:0".parse().unwrap())).unwrap();
        let cfg_path = state_dir.join(agent_link_relay::state::CONFIG_FILE);
        let mut cfg = RelayConfig::load(&cfg_path).unwrap();
        tweak(&mut cfg);
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let mut me = Self {
            relay: None,
            dir,
            token: placeholder_token(),
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        me.restart_on(None).await;
        me
    }

    /// The relay's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("relay")
    }

    /// (Re)start the relay from its state directory, on `addr` if given.
    pub async fn restart_on(&mut self, addr: Option<SocketAddr>) {
        let st = agent_link_relay::state::load(&self.state_dir()).unwrap();
        let relay = Relay::spawn(
            st,
            SpawnOptions {
                listen: addr,
                metrics: None,
                admin_socket: true,
            },
        )
        .await
        .unwrap();
        self.addr = relay.local_addr();
        self.token = JoinToken::parse(&relay.join_token()).unwrap();
        self.relay = Some(relay);
    }

    /// Stop the relay (graceful).
    pub async fn stop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.shutdown().await;
        }
    }

    /// Restart on the same port (peers reconnect to the same address).
    pub async fn restart(&mut self) {
        let addr = self.addr;
        self.stop().await;
        // The old endpoint keeps its socket until every connection has
        // drained (1,000 of them take a while in a debug build), so retry
        // binding for up to 30 s.
        for _ in 0..300 {
            let st = agent_link_relay::state::load(&self.state_dir()).unwrap();
            match Relay::spawn(
                st,
                SpawnOptions {
                    listen: Some(addr),
                    metrics: None,
                    admin_socket: true,
                },
            )
            .await
            {
                Ok(relay) => {
                    self.relay = Some(relay);
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        panic!("could not rebind {addr}");
    }

    /// The relay handle.
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay running")
    }

    /// Register `identity` as `instance_id` offline, as the admin would.
    pub fn register(&self, instance_id: &str, identity: &Identity) {
        agent_link_relay::registry::RegistryStore::new(&self.state_dir())
            .update(|r| r.register(instance_id, &identity.public_key(), instance_id))
            .unwrap()
            .unwrap();
    }

    /// The join token as text.
    pub fn token_text(&self) -> String {
        self.token.encode().unwrap()
    }
}

fn placeholder_token() -> JoinToken {
    JoinToken {
        addr: "127.0.0.1:1".into(),
        fingerprint: [0; 32],
        secret: FleetSecret::from_bytes([0; 32]),
    }
}

/// A protocol-level client: one QUIC connection, frames by hand.
pub struct RawClient {
    pub conn: quinn::Connection,
    pub identity: Identity,
    pub fleet: FleetKey,
    pub instance: String,
    pub endpoint: quinn::Endpoint,
}

/// One bidirectional stream of a [`RawClient`].
pub struct RawStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buf: Vec<u8>,
}

/// A decoded relay frame, owned (so it outlives the read buffer).
#[derive(Debug)]
pub struct OwnedFrame(pub Vec<u8>);

impl OwnedFrame {
    /// Decode the frame.
    pub fn get(&self) -> RelayToPeer<'_> {
        codec::decode(&self.0).unwrap()
    }
}

/// The client TLS/QUIC config for `identity` against `fingerprint`.
pub fn client_config(identity: &Identity, fingerprint: [u8; 32]) -> quinn::ClientConfig {
    let tls_id = TlsIdentity::self_signed(identity, "agent-link-instance").unwrap();
    let tls = instance_client_config(&tls_id, fingerprint).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

impl RawClient {
    /// Connect with `identity` (registered or not) as `instance`.
    pub async fn connect(
        relay: &TestRelay,
        identity: Identity,
        instance: &str,
    ) -> anyhow::Result<Self> {
        Self::connect_with(
            relay.addr,
            relay.token.fingerprint,
            relay.token.secret.key(),
            identity,
            instance,
        )
        .await
    }

    /// Connect to `addr`, pinning `fingerprint`.
    pub async fn connect_with(
        addr: SocketAddr,
        fingerprint: [u8; 32],
        fleet: FleetKey,
        identity: Identity,
        instance: &str,
    ) -> anyhow::Result<Self> {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())?;
        endpoint.set_default_client_config(client_config(&identity, fingerprint));
        Self::connect_on(endpoint, addr, fleet, identity, instance).await
    }

    /// Connect to `addr` on `endpoint`, whose default client config the
    /// caller set (to try other endpoint or transport settings).
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        fleet: FleetKey,
        identity: Identity,
        instance: &str,
    ) -> anyhow::Result<Self> {
        let conn = tokio::time::timeout(
            WAIT,
            endpoint.connect(addr, agent_link_crypto::tls::RELAY_SERVER_NAME)?,
        )
        .await??;
        Ok(Self {
            conn,
            identity,
            fleet,
            instance: instance.to_string(),
            endpoint,
        })
    }

    /// Open a stream.
    pub async fn open(&self) -> RawStream {
        let (send, recv) = self.conn.open_bi().await.unwrap();
        RawStream {
            send,
            recv,
            buf: Vec::new(),
        }
    }

    /// Open an agent stream and wait for `Attached`.
    pub async fn attach(&self, agent: &str, receive: bool) -> RawStream {
        let mut s = self.open().await;
        s.write(&PeerToRelay::Attach { agent, receive }).await;
        let f = s.read().await.expect("attach reply");
        assert!(
            matches!(f.get(), RelayToPeer::Attached { .. }),
            "{:?}",
            f.get()
        );
        s
    }

    /// Register online with the fleet secret, as `agent-link init` does.
    pub async fn register(&self, instance_id: &str) -> OwnedFrame {
        let mut exporter = [0u8; 32];
        self.conn
            .export_keying_material(
                &mut exporter,
                agent_link_proto::REGISTER_EXPORTER_LABEL,
                b"",
            )
            .unwrap();
        let proof = agent_link_proto::register_proof(
            &self.fleet,
            &exporter,
            &self.identity.public_key(),
            instance_id,
        );
        let mut s = self.open().await;
        s.write(&PeerToRelay::Register {
            instance_id,
            name: instance_id,
            proof,
        })
        .await;
        s.read().await.expect("register reply")
    }

    /// A sealed envelope from `self.instance/from_agent` to `to`.
    pub fn envelope(
        &self,
        id: [u8; 16],
        from_agent: &str,
        to: &str,
        sent_at_ms: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        EnvelopeBody {
            version: agent_link_proto::VERSION,
            id,
            from: Address {
                instance: &self.instance,
                agent: from_agent,
            },
            to: Address::parse(to).unwrap(),
            sent_at_ms,
            payload,
        }
        .seal(&self.identity, &self.fleet)
        .unwrap()
    }
}

impl RawStream {
    /// Write one frame.
    pub async fn write(&mut self, f: &PeerToRelay<'_>) {
        self.write_raw(&codec::frame(f).unwrap()).await;
    }

    /// Write raw bytes (may be a broken frame).
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// Send an envelope.
    pub async fn send_envelope(&mut self, envelope: &[u8]) {
        self.write(&PeerToRelay::Send { envelope }).await;
    }

    /// The next frame within [`WAIT`]; `None` on end of stream or error.
    pub async fn read(&mut self) -> Option<OwnedFrame> {
        self.read_within(WAIT).await.ok().flatten()
    }

    /// The next frame within `limit`: `Err(())` on timeout, `Ok(None)` at the
    /// end of the stream.
    pub async fn read_within(&mut self, limit: Duration) -> Result<Option<OwnedFrame>, ()> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some((body, used)) =
                    codec::split_frame(&self.buf, codec::HARD_MAX_FRAME).unwrap()
                {
                    let f = OwnedFrame(body.to_vec());
                    self.buf.drain(..used);
                    return Some(f);
                }
                let mut chunk = vec![0u8; 64 * 1024];
                match self.recv.read(&mut chunk).await {
                    Ok(None) | Err(_) => return None,
                    Ok(Some(n)) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .map_err(|_| ())
    }
}

/// A fresh peer directory path inside `base`.
pub fn peer_dir(base: &Path, name: &str) -> PathBuf {
    base.join(name)
}

/// Wait until `cond` holds, polling every 20 ms, for at most [`WAIT`].
pub async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Random 16-byte id.
pub fn random_id() -> [u8; 16] {
    rand::random()
}

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

impl TestRelay {
    /// Register many instances in one registry write (as the admin would,
    /// offline); `register` per instance rewrites the file each time.
    pub fn register_many(&self, instances: &[(String, Identity)]) {
        agent_link_relay::registry::RegistryStore::new(&self.state_dir())
            .update(|r| {
                for (id, identity) in instances {
                    r.register(id, &identity.public_key(), id)
                        .map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            })
            .unwrap()
            .unwrap();
    }
}

/// Write a peer directory for an instance the relay already knows (what
/// `agent-link init` leaves behind, without the online registration).
pub fn write_peer_dir(dir: &Path, instance_id: &str, identity: &Identity, token: &JoinToken) {
    use agent_link::config::{PeerConfig, CONFIG_FILE, KEY_FILE, SECRET_FILE};
    std::fs::create_dir_all(dir).unwrap();
    identity.write_new(&dir.join(KEY_FILE)).unwrap();
    token.secret.write_new(&dir.join(SECRET_FILE)).unwrap();
    let cfg = PeerConfig {
        relay_url: token.addr.clone(),
        relay_fingerprint: hex::encode(token.fingerprint),
        instance_id: instance_id.to_string(),
        name: instance_id.to_string(),
        auto_reconnect: true,
        send_timeout_secs: 30,
    };
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_vec(&cfg).unwrap()).unwrap();
}

/// An `agent-link` instance `name`, initialised online against `relay` (as
/// `agent-link init` does) and connected.
pub async fn peer(relay: &TestRelay, name: &str) -> agent_link::AgentLink {
    let dir = relay.dir.path().join(name);
    agent_link::init(&dir, name, &relay.token, None)
        .await
        .unwrap();
    agent_link::AgentLink::connect(&dir).await.unwrap()
}

/// The next message of `agent`, within [`WAIT`].
pub async fn recv(agent: &mut agent_link::Agent) -> agent_link::Message {
    tokio::time::timeout(WAIT, agent.recv())
        .await
        .expect("message in time")
        .expect("agent still attached")
}

/// `sender` sends `payload` to `to` while `receiver`'s application takes the
/// next message: the receipt only comes back once it has been taken. Both
/// within [`WAIT`].
pub async fn exchange(
    sender: &agent_link::Agent,
    to: &str,
    payload: impl Into<bytes::Bytes>,
    receiver: &mut agent_link::Agent,
) -> (agent_link::Receipt, agent_link::Message) {
    let (r, m) = tokio::join!(sender.send_with_timeout(to, payload, WAIT), recv(receiver));
    (r.expect("delivered"), m)
}
