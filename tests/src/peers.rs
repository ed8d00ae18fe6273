//! Peers through the `agent-link` library: peer directories (online
//! `init`, or written as the offline registration leaves them), a connected
//! instance, and the next message or a whole send-and-receive, each within
//! [`WAIT`].

use std::path::{Path, PathBuf};

use agent_link_crypto::Identity;
use agent_link_proto::JoinToken;

use crate::{TestRelay, WAIT};

/// A fresh peer directory path inside `base`.
pub fn peer_dir(base: &Path, name: &str) -> PathBuf {
    base.join(name)
}

/// Write a peer directory for an instance the relay already knows (what
/// `agent-link init` leaves behind, without the online registration).
pub fn write_peer_dir(dir: &Path, instance_id: &str, identity: &Identity, token: &JoinToken) {
    use agent_link::config::{PeerConfig, CONFIG_FILE, KEY_FILE, SECRET_FILE};
    std::fs::create_dir_all(dir).unwrap();
    identity.write_new(&dir.join(KEY_FILE)).unwrap();
    token
        .fleet_secret()
        .expect("an open fleet token")
        .write_new(&dir.join(SECRET_FILE))
        .unwrap();
    let cfg = PeerConfig::for_join(token, instance_id, instance_id);
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
