//! [`TestRelay`]: a relay started in process on 127.0.0.1:0 in its own
//! temporary state directory, with the admin's offline registration and a
//! restart on the same port (peers reconnect to the same address).
//! Starting one starts tracing, so a failing test shows the relay's view.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::JoinToken;
use agent_link_relay::{Relay, RelayConfig, SpawnOptions};

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
        Self::start_with(tweak, |_| {}).await
    }

    /// Start with the config changed by `tweak`, after `prepare` has had
    /// the state directory (to give relays of one fleet the same fleet
    /// secret, say).
    pub async fn start_with(
        tweak: impl FnOnce(&mut RelayConfig),
        prepare: impl FnOnce(&std::path::Path),
    ) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("relay");
        agent_link_relay::state::init(&state_dir, Some("127.0.0.1:0".parse().unwrap())).unwrap();
        let cfg_path = state_dir.join(agent_link_relay::state::CONFIG_FILE);
        let mut cfg = RelayConfig::load(&cfg_path).unwrap();
        // Most tests register with the open fleet token (`token`); the
        // tests of invites turn this off in `tweak`.
        cfg.open_registration = true;
        tweak(&mut cfg);
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        prepare(&state_dir);
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
        self.token = JoinToken::parse(&relay.open_token().unwrap()).unwrap();
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

    /// The key of the open fleet token (`token`), which most tests register
    /// and seal with.
    pub fn fleet_key(&self) -> agent_link_crypto::FleetKey {
        self.token
            .fleet_secret()
            .expect("a test relay's token is the open fleet token")
            .key()
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

    /// The join token as text.
    pub fn token_text(&self) -> String {
        self.token.encode().unwrap()
    }
}

fn placeholder_token() -> JoinToken {
    JoinToken {
        addr: "127.0.0.1:1".into(),
        trust: agent_link_proto::RelayTrust::Pinned([0; 32]),
        secret: agent_link_proto::JoinSecret::Fleet(FleetSecret::from_bytes([0; 32])),
        other_relays: vec![],
    }
}
