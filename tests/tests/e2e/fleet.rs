//! A fleet of two relays on a real 3-node NATS cluster on loopback
//! (DESIGN.md, "A fleet of relays"): a message whose sender and receiver sit
//! on different relays is forwarded and its receipt comes back, both ways;
//! an agent attached on no relay fails with the cause; the newest attach
//! wins across relays (the older gets `Replaced`); a revoke made through one
//! relay closes the instance's connection on the other; a NATS node killed
//! with -9 (the one a relay was connected to) does not stop the fleet;
//! what a client of NATS publishes on a relay's subject meets the checks of
//! a local send at that relay.
//!
//! Skips without nats-server unless `AGENT_LINK_REQUIRE_NATS` is set.

use std::time::Duration;

use agent_link::config::KEY_FILE;
use agent_link_crypto::Identity;
use agent_link_proto::{ErrorCode, RelayToPeer};
use agent_link_tests::*;

/// Two relays of one fleet (the same fleet secret), relay `i` served by
/// NATS node `i`.
async fn two_relays(nats: &NatsCluster) -> (TestRelay, TestRelay) {
    nats.ready().await;
    let r1 = TestRelay::start(|c| c.cluster = Some(nats.config(0, "relay-1"))).await;
    let secret = r1.state_dir().join("fleet.secret");
    let r2 = TestRelay::start_with(
        |c| c.cluster = Some(nats.config(1, "relay-2")),
        |dir| {
            // Copies the mode (0600) too.
            std::fs::copy(&secret, dir.join("fleet.secret")).unwrap();
        },
    )
    .await;
    (r1, r2)
}

/// One send, the receiver taking the message while the send waits (the
/// receipt comes once the receiver's application took it).
async fn send_taking(
    sender: &agent_link::Agent,
    to: &str,
    payload: String,
    receiver: &mut agent_link::Agent,
) -> (
    Result<agent_link::Receipt, agent_link::SendError>,
    Option<agent_link::Message>,
) {
    let send = sender.send_with_timeout(to, payload, WAIT);
    tokio::pin!(send);
    let mut taken = None;
    let sent = loop {
        tokio::select! {
            r = &mut send => break r,
            m = receiver.recv(), if taken.is_none() => taken = Some(m.expect("still attached")),
        }
    };
    (sent, taken)
}

/// Send until the attach has reached the sender's relay (the attach
/// bucket's watch takes a moment): the first sends may find the agent
/// offline. Bounded by [`WAIT`].
async fn send_when_attached(
    sender: &agent_link::Agent,
    to: &str,
    payload: &str,
    receiver: &mut agent_link::Agent,
) -> (agent_link::Receipt, agent_link::Message) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match send_taking(sender, to, payload.to_string(), receiver).await {
            (Ok(r), taken) => {
                return (
                    r,
                    taken.expect("a receipt only after the message was taken"),
                )
            }
            (Err(e), _) if e.exit().code() == 3 && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (Err(e), _) => panic!("send to {to}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crosses_relays_and_its_receipt_comes_back() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    let (r1, r2) = two_relays(&nats).await;
    let alice = peer(&r1, "alice").await;
    let bob = peer(&r2, "bob").await;
    let mut a1 = alice.attach("a1").await.unwrap();
    let mut b1 = bob.attach("b1").await.unwrap();

    let (r, m) = send_when_attached(&a1, "bob/b1", "over there", &mut b1).await;
    assert_eq!(r.to, "bob/b1");
    assert_eq!(
        (&m.payload[..], m.from.as_str()),
        (&b"over there"[..], "alice/a1")
    );
    assert_eq!(m.id, r.id);
    let (r, m) = send_when_attached(&b1, "alice/a1", "and back", &mut a1).await;
    assert_eq!((&m.payload[..], m.id), (&b"and back"[..], r.id));
    // Many in a row, each with its receipt.
    for i in 0..20 {
        let (r, m) = exchange(&a1, "bob/b1", format!("n{i}"), &mut b1).await;
        assert_eq!(
            (m.payload, m.id),
            (format!("n{i}").into_bytes().into(), r.id)
        );
    }
    // Counted for the operator (`--metrics`): relay 1 forwarded at least
    // the 21 sends of alice above, in at least one NATS message.
    let stats = r1.relay().stats();
    let forwards = stats
        .fleet_forwards
        .load(std::sync::atomic::Ordering::Relaxed);
    let batches = stats
        .fleet_batches_sent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        forwards >= 21 && (1..=forwards).contains(&batches),
        "{forwards} in {batches}"
    );
    assert!(stats
        .render(0)
        .contains(&format!("agent_link_fleet_forwards_total {forwards}")));
    // Registered, attached nowhere: the cause, from either relay.
    let e = a1.send("bob/nobody", "x").await.unwrap_err();
    assert_eq!(e.exit().code(), 3, "{e}");
    let e = a1.send("carol/x", "x").await.unwrap_err();
    assert_eq!(e.exit().code(), 3, "{e}");
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_attach_wins_across_relays_and_a_revoke_reaches_every_relay() {
    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    let (r1, r2) = two_relays(&nats).await;
    let alice = peer(&r1, "alice").await;
    let bob = peer(&r2, "bob").await;
    let a1 = alice.attach_sender("a1").await.unwrap();
    let mut old = bob.attach("b1").await.unwrap();
    let _ = send_when_attached(&a1, "bob/b1", "first", &mut old).await;

    // bob attaches b1 again, on relay 1: that one receives now, and the
    // older attach on relay 2 is told `Replaced`.
    let key = Identity::read(&r2.dir.path().join("bob").join(KEY_FILE)).unwrap();
    let raw = RawClient::connect(&r1, key, "bob").await.unwrap();
    let mut newer = raw.attach("b1", true).await;
    let closed = tokio::time::timeout(WAIT, old.recv()).await.unwrap();
    assert!(closed.is_none(), "the older attach is closed");
    assert_eq!(old.stop_reason(), Some(ErrorCode::Replaced));
    let send = tokio::spawn(async move { a1.send("bob/b1", "second").await });
    let f = newer.read().await.expect("the newer attach receives");
    assert!(
        matches!(f.get(), RelayToPeer::Deliver { .. }),
        "{:?}",
        f.get()
    );
    drop(send);

    // Revoked through relay 2's directory, while alice is connected to
    // relay 1: her connection there is closed as `Revoked`.
    // Made (and the CLI built, on first use) before the clock starts.
    let mut revoke = relay_cmd();
    revoke
        .args(["revoke", "--instance-id", "alice", "--dir"])
        .arg(r2.state_dir());
    let t0 = std::time::Instant::now();
    // Off the runtime: the relays run on its two workers.
    let out = tokio::task::spawn_blocking(move || revoke.output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    eprintln!("the revoke command took {:?}", t0.elapsed());
    let a2 = alice.attach_sender("a2").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = match &a2 {
            Err(e) => e.to_string(),
            Ok(a) => match a.send("bob/nobody", "after").await {
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            },
        };
        if e.to_lowercase().contains("revoked") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice still sends {:?} after the revoke: {e}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "revoked through relay 2, refused on relay 1 after {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_goes_on_when_a_nats_node_is_killed() {
    let Some(bin) = nats_or_skip() else { return };
    let mut nats = NatsCluster::start(&bin);
    let (r1, r2) = two_relays(&nats).await;
    let alice = peer(&r1, "alice").await;
    let bob = peer(&r2, "bob").await;
    let a1 = alice.attach("a1").await.unwrap();
    let mut b1 = bob.attach("b1").await.unwrap();
    let _ = send_when_attached(&a1, "bob/b1", "before", &mut b1).await;

    // The node relay 1 talks to: its client moves to another node (it
    // learnt them from the first), and the buckets (R3) keep a quorum.
    nats.kill(0);
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        match send_taking(&a1, "bob/b1", format!("after {n}"), &mut b1).await {
            (Ok(r), taken) => {
                assert_eq!(taken.map(|m| m.id), Some(r.id));
                break;
            }
            (Err(e), _) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no delivery after the kill: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!(
        "a message crossed relays {:?} after the NATS node was killed",
        t0.elapsed()
    );

    // The registry takes writes: a new instance joins (invited from relay
    // 2's directory, whose config names a node that is up; relay 1's names
    // only the dead one, so a command from there cannot connect).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let invite = loop {
        // It blocks this worker for one registry write; the relays go on
        // on the other.
        match r2.relay().invite("carol", Duration::from_secs(600)) {
            Ok(t) => break t,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no invite after the kill: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let dir = r2.dir.path().join("carol");
    let token = agent_link_proto::JoinToken::parse(&invite).unwrap();
    // The relay learns of the invite through its registry watch, whose
    // consumer may have died with the node: the relay notices and opens
    // the watch again (`cluster::watch`), but until then, and while the
    // bucket elects a new leader, the invite is unknown to it
    // (`InviteInvalid`). A refused init writes nothing, so it is tried
    // again, bounded.
    loop {
        match agent_link::init(&dir, "carol", &token, None).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "carol cannot join after the kill: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    eprintln!(
        "carol joined {:?} after the NATS node was killed",
        t0.elapsed()
    );
    let carol = agent_link::AgentLink::connect(&dir).await.unwrap();
    let c1 = carol.attach_sender("c1").await.unwrap();
    let _ = send_when_attached(&c1, "bob/b1", "new member", &mut b1).await;
    carol.close().await;
    alice.close().await;
    bob.close().await;
}

/// The answers to forwards `ns` from a relay, read from `sub` (bounded by
/// [`WAIT`]): each a decoded `RelayToPeer`, by its number.
async fn answers_to(
    sub: &mut (impl futures_util::Stream<Item = async_nats::Message> + Unpin),
    ns: &[u64],
) -> std::collections::HashMap<u64, Vec<u8>> {
    use futures_util::StreamExt;
    let mut got = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ns.iter().all(|n| got.contains_key(n)) {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("answers to {ns:?} in time; got {:?}", got.keys()))
            .expect("the subscription lasts");
        for (n, body) in agent_link_relay::cluster::batch::decode(&msg.payload).unwrap() {
            got.insert(n, body.to_vec());
        }
    }
    got
}

/// What arrives on a relay's NATS subject is checked like a local send:
/// NATS is inside the fleet's trust boundary, but a client of it without
/// the fleet secret cannot deliver (a wrong fleet tag), a capture cannot
/// be delivered late (the clock window), an envelope cannot name a sender
/// the fleet does not know, and what does not decode is answered nothing.
/// A good forward on the same subject is delivered and answered with its
/// receipt, so the refusals are the checks', not a dead path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_from_nats_are_checked_like_local_sends() {
    use agent_link_proto::{clock, codec, Address, EnvelopeBody};
    use agent_link_relay::cluster::batch::Batcher;

    let Some(bin) = nats_or_skip() else { return };
    let nats = NatsCluster::start(&bin);
    let (r1, r2) = two_relays(&nats).await;
    let alice = peer(&r1, "alice").await;
    let bob = peer(&r2, "bob").await;
    let mut b1 = bob.attach("b1").await.unwrap();
    // Alice's own key and the fleet's, to seal envelopes by hand.
    let key = Identity::read(&r1.dir.path().join("alice").join(KEY_FILE)).unwrap();
    let raw = RawClient::connect(&r1, key, "alice").await.unwrap();
    // Sent through the fleet first: alice is in relay 2's registry copy and
    // bob's attach is known, so what follows meets only the checks.
    let a1 = alice.attach_sender("a1").await.unwrap();
    let _ = send_when_attached(&a1, "bob/b1", "warm", &mut b1).await;

    let injector = nats.connect(0, "injector").await;
    let client = injector.client().clone();
    let mut sub = client.subscribe("test.answers.*").await.unwrap();
    let subject = agent_link_relay::cluster::deliver_subject("relay-2");
    let now = clock::unix_ms(std::time::SystemTime::now());
    let (bad_tag, stale, stranger, good) = (random_id(), random_id(), random_id(), random_id());
    let mut batch = Batcher::default();
    let other_fleet = agent_link_crypto::FleetSecret::generate().key();
    let body = |id, instance, sent_at_ms| EnvelopeBody {
        version: agent_link_proto::VERSION,
        id,
        from: Address {
            instance,
            agent: "a1",
        },
        to: Address::parse("bob/b1").unwrap(),
        sent_at_ms,
        payload: b"injected",
    };
    let wrong_fleet = body(bad_tag, "alice", now).seal(&raw.identity, &other_fleet);
    batch.push(2, wrong_fleet.unwrap().into());
    let an_hour_ago = now - 3_600_000;
    batch.push(
        3,
        raw.envelope(stale, "a1", "bob/b1", an_hour_ago, b"old")
            .into(),
    );
    let unknown = body(stranger, "mallory", now).seal(&raw.identity, &raw.fleet);
    batch.push(4, unknown.unwrap().into());
    batch.push(5, bytes::Bytes::from_static(b"\x07not an envelope"));
    let (payload, _) = batch.finish().remove(0);
    let codes = [
        ErrorCode::BadTag,
        ErrorCode::StaleTimestamp,
        ErrorCode::NotRegistered,
    ];
    let stats = r2.relay().stats();
    let before = codes.map(|c| stats.refused_count(c));
    client
        .publish_with_reply(subject.clone(), "test.answers.1".to_string(), payload)
        .await
        .unwrap();
    let mut got = answers_to(&mut sub, &[2, 3, 4]).await;
    for (n, id, code) in [
        (2, bad_tag, ErrorCode::BadTag),
        (3, stale, ErrorCode::StaleTimestamp),
        (4, stranger, ErrorCode::NotRegistered),
    ] {
        let answer: RelayToPeer<'_> = codec::decode(&got[&n]).unwrap();
        assert_eq!(answer, RelayToPeer::Failed { id, code }, "forward {n}");
    }
    // Refused by relay 2 itself, not only by bob's peer (which checks the
    // tag and the clock again): nothing was queued for him.
    let after = codes.map(|c| stats.refused_count(c));
    for i in 0..codes.len() {
        assert!(after[i] > before[i], "{:?} counted at relay 2", codes[i]);
    }

    // A good forward after them: delivered, then its receipt.
    let mut batch = Batcher::default();
    batch.push(6, raw.envelope(good, "a1", "bob/b1", now, b"fine").into());
    let (payload, _) = batch.finish().remove(0);
    client
        .publish_with_reply(subject, "test.answers.2".to_string(), payload)
        .await
        .unwrap();
    let m = recv(&mut b1).await;
    assert_eq!((&m.payload[..], m.id.0), (&b"fine"[..], good));
    got.extend(answers_to(&mut sub, &[6]).await);
    let answer: RelayToPeer<'_> = codec::decode(&got[&6]).unwrap();
    assert!(
        matches!(answer, RelayToPeer::Receipt { ref receipt } if receipt.id == good),
        "{answer:?}"
    );
    // Answers go in order: nothing came for the bytes that did not decode
    // before the receipt that followed them.
    assert!(!got.contains_key(&5), "an answer to what did not decode");
    alice.close().await;
    bob.close().await;
}
