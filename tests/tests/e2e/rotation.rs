//! Fleet secret rotation (`agent-link-relay rotate-secret`, PROTOCOL.md
//! §9.7): the running relay picks up the new secret and pushes it to every
//! registered connection; members that were offline get it when they
//! connect; a revoked member never does; once the grace period is over the
//! old secret is refused.

use std::path::Path;
use std::time::Duration;

use agent_link::AgentLink;
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::{ErrorCode, RelayToPeer};
use agent_link_tests::{exchange, now_ms, random_id, wait_until, RawClient, TestRelay};

fn secret(dir: &Path) -> [u8; 32] {
    *FleetSecret::read(&dir.join("fleet.secret"))
        .unwrap()
        .expose()
}

#[tokio::test]
async fn a_rotated_secret_reaches_members_live_and_at_reconnect_and_never_a_revoked_one() {
    let relay = TestRelay::start(|_| {}).await;
    let base = relay.dir.path();
    let dir = |n: &str| base.join(n);
    for id in ["inst-a", "inst-b", "inst-c", "inst-r"] {
        agent_link::init(&dir(id), id, &relay.token, None)
            .await
            .unwrap();
    }
    let a = AgentLink::connect(dir("inst-a")).await.unwrap();
    let b = AgentLink::connect(dir("inst-b")).await.unwrap();
    let r = AgentLink::connect(dir("inst-r")).await.unwrap();
    let alice = a.attach("alice").await.unwrap();
    let mut bob = b.attach("bob").await.unwrap();
    let old = secret(&dir("inst-a"));
    // inst-r is revoked (and cut off) before the rotation; inst-c is offline.
    agent_link_relay::registry::RegistryStore::new(&relay.state_dir())
        .update(|reg| reg.revoke("inst-r"))
        .unwrap()
        .unwrap();
    assert!(
        wait_until(|| !relay.relay().online().contains_key("inst-r")).await,
        "the revoked instance is cut off"
    );

    // No grace: the old secret is refused as soon as the relay has the new.
    agent_link_relay::state::rotate_secret(&relay.state_dir(), Duration::ZERO).unwrap();
    let new = secret(&relay.state_dir());
    assert_ne!(new, old);
    assert!(
        wait_until(|| secret(&dir("inst-a")) == new && secret(&dir("inst-b")) == new).await,
        "both live members got the new secret over their connections"
    );
    // Sealed and checked under the new secret, relay and receiver alike.
    let (_, m) = exchange(&alice, "inst-b/bob", "after", &mut bob).await;
    assert_eq!(&m.payload[..], b"after");

    // A message still tagged with the old secret is refused by name.
    let raw = RawClient::connect(&relay, Identity::generate(), "inst-x")
        .await
        .unwrap();
    assert!(
        matches!(
            raw.register("inst-x").await.get(),
            RelayToPeer::Error {
                code: ErrorCode::BadProof
            }
        ),
        "the old secret no longer registers either"
    );
    drop(raw);
    let c_key = Identity::read(&dir("inst-c").join("instance.key")).unwrap();
    let stale = RawClient::connect(&relay, c_key, "inst-c").await.unwrap();
    let mut s = stale.attach("carol", false).await;
    let id = random_id();
    s.send_envelope(&stale.envelope(id, "carol", "inst-b/bob", now_ms(), b"old"))
        .await;
    match s.read().await.unwrap().get() {
        RelayToPeer::Failed { id: got, code } => {
            assert_eq!((got, code), (id, ErrorCode::BadTag));
        }
        other => panic!("expected Failed(BadTag), got {other:?}"),
    }
    drop(s);
    stale.conn.close(0u32.into(), b"");

    // The member that was offline gets it when it connects, and can send.
    assert_eq!(secret(&dir("inst-c")), old);
    let c = AgentLink::connect(dir("inst-c")).await.unwrap();
    assert!(
        wait_until(|| secret(&dir("inst-c")) == new).await,
        "pushed at connect"
    );
    let carol = c.attach_sender("carol").await.unwrap();
    let (_, m) = exchange(&carol, "inst-b/bob", "late", &mut bob).await;
    assert_eq!(&m.payload[..], b"late");

    // The revoked member never learnt it.
    assert_eq!(secret(&dir("inst-r")), old);
    drop(r);
}

#[tokio::test]
async fn within_the_grace_period_the_old_secret_still_passes() {
    let relay = TestRelay::start(|_| {}).await;
    let base = relay.dir.path();
    agent_link::init(&base.join("inst-b"), "inst-b", &relay.token, None)
        .await
        .unwrap();
    let b = AgentLink::connect(base.join("inst-b")).await.unwrap();
    let mut bob = b.attach("bob").await.unwrap();
    // A raw member that never reads its pushes keeps sealing with the old
    // secret.
    let id_a = Identity::generate();
    relay.register("inst-a", &id_a);
    let old_client = RawClient::connect(&relay, id_a, "inst-a").await.unwrap();
    let mut s = old_client.attach("alice", false).await;
    agent_link_relay::state::rotate_secret(&relay.state_dir(), Duration::from_secs(3600)).unwrap();
    let new = secret(&relay.state_dir());
    assert!(wait_until(|| secret(&base.join("inst-b")) == new).await);
    let id = random_id();
    s.send_envelope(&old_client.envelope(id, "alice", "inst-b/bob", now_ms(), b"grace"))
        .await;
    let m = agent_link_tests::recv(&mut bob).await;
    assert_eq!(
        &m.payload[..],
        b"grace",
        "relay and receiver accept the old tag"
    );
}
