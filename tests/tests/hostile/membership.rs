//! Membership (security review, finding 1): every member holds the fleet
//! secret, revoked ones included, so at a relay without open registration
//! it registers nothing. Joining takes a single-use invite bound to one id,
//! whose own secret keys the proof; the fleet secret comes from the relay
//! once registered. New registrations are capped relay-wide.

use std::path::Path;
use std::time::Duration;

use agent_link::LinkError;
use agent_link_crypto::FleetSecret;
use agent_link_proto::{ErrorCode, JoinSecret, JoinToken};
use agent_link_tests::TestRelay;

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

/// An invites-only relay: the default configuration.
async fn invites_only() -> TestRelay {
    TestRelay::start(|c| c.open_registration = false).await
}

fn invite(relay: &TestRelay, id: &str) -> JoinToken {
    JoinToken::parse(&relay.relay().invite(id, WEEK).unwrap()).unwrap()
}

/// The open fleet token a member can make from what its directory holds.
fn fleet_token_from(relay: &TestRelay, dir: &Path) -> JoinToken {
    JoinToken {
        addr: relay.token.addr.clone(),
        trust: relay.token.trust,
        secret: JoinSecret::Fleet(FleetSecret::read(&dir.join("fleet.secret")).unwrap()),
        other_relays: vec![],
    }
}

fn refused(r: Result<agent_link_crypto::PublicKey, LinkError>) -> ErrorCode {
    match r {
        Err(LinkError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_revoked_member_cannot_rejoin_under_another_id_with_the_fleet_secret() {
    let relay = invites_only().await;
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let inv = invite(&relay, "inst-a");
    agent_link::init(&a, "inst-a", &inv, None).await.unwrap();
    // The member learnt the fleet secret from the relay, once registered.
    let learnt = FleetSecret::read(&a.join("fleet.secret")).unwrap();
    assert_eq!(
        learnt.expose(),
        relay.token.fleet_secret().unwrap().expose()
    );
    agent_link_relay::registry::RegistryStore::new(&relay.state_dir())
        .update(|r| r.revoke("inst-a"))
        .unwrap()
        .unwrap();
    // With the secret it holds: no new id, no free id, not its old one.
    let stolen = fleet_token_from(&relay, &a);
    for id in ["inst-a2", "inst-b", "inst-a"] {
        let code = refused(agent_link::init(&tmp.path().join(id), id, &stolen, None).await);
        assert_eq!(code, ErrorCode::RegistrationClosed, "{id}");
        assert!(!tmp.path().join(id).exists(), "{id}: nothing written");
    }
    // Its used invite is worth nothing, and the id cannot be invited again.
    let code = refused(agent_link::init(&tmp.path().join("again"), "inst-a", &inv, None).await);
    assert_eq!(code, ErrorCode::InviteInvalid);
    assert!(relay.relay().invite("inst-a", WEEK).is_err());
    assert!(
        agent_link_relay::registry::RegistryStore::new(&relay.state_dir())
            .load()
            .unwrap()
            .get("inst-a2")
            .is_none()
    );
}

#[tokio::test]
async fn an_invite_registers_only_its_own_id_only_with_its_own_secret_and_only_once() {
    let relay = invites_only().await;
    let tmp = tempfile::tempdir().unwrap();
    let inv = invite(&relay, "inst-c");
    // The fleet secret in the invite's place (a member trying to take an
    // id the operator invited someone else to): the proof does not verify.
    let forged = JoinToken {
        secret: JoinSecret::Invite {
            instance_id: "inst-c".into(),
            secret: relay.token.fleet_secret().unwrap().clone(),
        },
        ..inv.clone()
    };
    let code = refused(agent_link::init(&tmp.path().join("f"), "inst-c", &forged, None).await);
    assert_eq!(code, ErrorCode::InviteInvalid);
    // An invite's secret under another id: no invite for that id.
    let moved = JoinToken {
        secret: JoinSecret::Invite {
            instance_id: "inst-d".into(),
            secret: match &inv.secret {
                JoinSecret::Invite { secret, .. } => secret.clone(),
                JoinSecret::Fleet(_) => unreachable!(),
            },
        },
        ..inv.clone()
    };
    let code = refused(agent_link::init(&tmp.path().join("m"), "inst-d", &moved, None).await);
    assert_eq!(code, ErrorCode::InviteInvalid);
    // The real holder still gets in (the failed tries did not use it up),
    // once; a second key with the same invite does not.
    agent_link::init(&tmp.path().join("c"), "inst-c", &inv, None)
        .await
        .unwrap();
    let code = refused(agent_link::init(&tmp.path().join("c2"), "inst-c", &inv, None).await);
    assert_eq!(code, ErrorCode::InviteInvalid);
    // An expired invite is refused.
    let brief = JoinToken::parse(
        &relay
            .relay()
            .invite("inst-e", Duration::from_millis(1))
            .unwrap(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let code = refused(agent_link::init(&tmp.path().join("e"), "inst-e", &brief, None).await);
    assert_eq!(code, ErrorCode::InviteInvalid);
    // A re-invite replaces the old token.
    let first = invite(&relay, "inst-g");
    let second = invite(&relay, "inst-g");
    let code = refused(agent_link::init(&tmp.path().join("g1"), "inst-g", &first, None).await);
    assert_eq!(code, ErrorCode::InviteInvalid);
    agent_link::init(&tmp.path().join("g2"), "inst-g", &second, None)
        .await
        .unwrap();
}

/// Each registration is a registry write and an fsync: over
/// `registrations_per_sec` (a bucket of 1 here) new keys are told
/// `RegistrationClosed`, and a registered member is not held back.
#[tokio::test]
async fn registrations_over_the_relay_wide_cap_are_refused_by_name() {
    let relay = TestRelay::start(|c| c.registrations_per_sec = 1).await;
    let tmp = tempfile::tempdir().unwrap();
    let token = relay.token.clone();
    let tries: Vec<_> = (0..6)
        .map(|i| {
            let (dir, token) = (tmp.path().join(format!("p{i}")), token.clone());
            tokio::spawn(async move {
                let id = format!("inst-{i}");
                agent_link::init(&dir, &id, &token, None).await
            })
        })
        .collect();
    let (mut ok, mut capped) = (0, 0);
    for t in tries {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(LinkError::Refused(ErrorCode::RegistrationClosed)) => capped += 1,
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    // Six at once against a bucket of one (refilling at 1/s): at least one
    // gets in, and unless the six were spread over 5 s, some are refused.
    assert!(ok >= 1, "ok {ok}");
    assert!(capped >= 1, "ok {ok}, capped {capped}");
}

/// Anyone can send `RegisterInvite` (no secret is needed to try): requests
/// whose proof fails are refused as `InviteInvalid` without spending the
/// registration tokens, so strangers cannot lock invited members out.
#[tokio::test]
async fn bad_proofs_do_not_use_up_the_registration_cap() {
    let relay = TestRelay::start(|c| {
        c.open_registration = false;
        c.registrations_per_sec = 1;
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let inv = invite(&relay, "inst-z");
    let forged = JoinToken {
        secret: JoinSecret::Invite {
            instance_id: "inst-z".into(),
            secret: FleetSecret::generate(),
        },
        ..inv.clone()
    };
    for i in 0..5 {
        let code = refused(
            agent_link::init(&tmp.path().join(format!("f{i}")), "inst-z", &forged, None).await,
        );
        assert_eq!(code, ErrorCode::InviteInvalid, "try {i}");
    }
    agent_link::init(&tmp.path().join("z"), "inst-z", &inv, None)
        .await
        .expect("the bucket's one token is still there");
}
