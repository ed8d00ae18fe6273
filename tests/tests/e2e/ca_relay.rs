//! A relay presenting a certificate chain from a CA (config `tls`), for
//! public deployments: its tokens say so, peers check the chain against
//! their CA roots (a CA file here; the system's by default) for the host
//! they dial, and one that cannot check it joins nothing.

use agent_link::LinkError;
use agent_link_proto::RelayTrust;
use agent_link_relay::TlsConfig;
use agent_link_tests::{exchange, TestCa, TestRelay};

async fn ca_relay(ca: &TestCa, names: &'static [&'static str]) -> TestRelay {
    TestRelay::start_with(
        |c| {
            c.tls = Some(TlsConfig {
                cert_chain: "chain.pem".into(),
                key: "key.pem".into(),
            })
        },
        |dir| ca.issue(names, dir),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_join_and_talk_through_a_relay_a_ca_vouches_for() {
    let ca = TestCa::new();
    let relay = ca_relay(&ca, &["127.0.0.1", "localhost"]).await;
    assert_eq!(
        relay.token.trust,
        RelayTrust::Ca,
        "the token says: check the chain"
    );
    let base = tempfile::tempdir().unwrap();
    let ca_file = ca.write_cert(base.path(), "ca.pem");

    // The system's roots do not know this CA: refused in the handshake,
    // and nothing is written.
    let nobody = base.path().join("nobody");
    let e = agent_link::init(&nobody, "nobody", &relay.token, None)
        .await
        .unwrap_err();
    eprintln!("without the CA: {e}");
    assert!(matches!(e, LinkError::UntrustedRelay { .. }), "{e:?}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(!nobody.join("agent-link-config.json").exists());

    // With it: both join, and a message goes through with its receipt.
    let mut links = Vec::new();
    for name in ["alice", "bob"] {
        let dir = base.path().join(name);
        agent_link::init_with(&dir, name, &relay.token, None, Some(&ca_file))
            .await
            .unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("agent-link-config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["relay_fingerprint"], "ca");
        assert_eq!(cfg["relay_ca_file"], "relay-ca.pem");
        // Its own copy: the file it was given may go away.
        assert_eq!(
            std::fs::read(dir.join("relay-ca.pem")).unwrap(),
            std::fs::read(&ca_file).unwrap()
        );
        links.push(agent_link::AgentLink::connect(&dir).await.unwrap());
    }
    std::fs::remove_file(&ca_file).unwrap();
    let a1 = links[0].attach_sender("a1").await.unwrap();
    let mut b1 = links[1].attach("b1").await.unwrap();
    let (receipt, msg) = exchange(&a1, "bob/b1", "through a CA", &mut b1).await;
    assert_eq!(receipt.id, msg.id);
    assert_eq!(&msg.payload[..], b"through a CA");
    for l in links {
        l.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_chain_for_another_name_or_from_another_ca_is_refused() {
    let ca = TestCa::new();
    let base = tempfile::tempdir().unwrap();
    let ca_file = ca.write_cert(base.path(), "ca.pem");
    // Issued by the right CA, for a name the peer does not dial.
    let relay = ca_relay(&ca, &["relay.example.org"]).await;
    let e = agent_link::init_with(
        &base.path().join("p1"),
        "p1",
        &relay.token,
        None,
        Some(&ca_file),
    )
    .await
    .unwrap_err();
    eprintln!("another name: {e}");
    assert!(matches!(e, LinkError::UntrustedRelay { .. }), "{e:?}");
    // Right name, another CA.
    let other = TestCa::new();
    let relay = ca_relay(&other, &["127.0.0.1"]).await;
    let e = agent_link::init_with(
        &base.path().join("p2"),
        "p2",
        &relay.token,
        None,
        Some(&ca_file),
    )
    .await
    .unwrap_err();
    eprintln!("another CA: {e}");
    assert!(matches!(e, LinkError::UntrustedRelay { .. }), "{e:?}");
    // A CA file that holds no certificate: refused before anything is sent.
    let junk = base.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = agent_link::init_with(
        &base.path().join("p3"),
        "p3",
        &relay.token,
        None,
        Some(&junk),
    )
    .await
    .unwrap_err();
    eprintln!("a junk CA file: {e}");
    assert!(!base.path().join("p3").exists());
}

/// A relay whose `tls` key is not its certificate's does not start.
#[test]
fn a_relay_whose_key_is_not_its_certificates_does_not_load() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("relay");
    agent_link_relay::state::init(&state, Some("127.0.0.1:0".parse().unwrap())).unwrap();
    ca.issue(&["127.0.0.1"], &state);
    let key = std::fs::read(state.join("key.pem")).unwrap();
    ca.issue(&["127.0.0.1"], &state);
    std::fs::write(state.join("key.pem"), key).unwrap();
    let path = state.join(agent_link_relay::state::CONFIG_FILE);
    let mut cfg = agent_link_relay::RelayConfig::load(&path).unwrap();
    cfg.tls = Some(TlsConfig {
        cert_chain: "chain.pem".into(),
        key: "key.pem".into(),
    });
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let e = agent_link_relay::state::load(&state).unwrap_err();
    assert!(e.to_string().contains("is not the key"), "{e}");
}
