//! The library quickstart (README, "Library"): two instances of a fleet, a
//! message from `healthguard` to `xiaobaozi` and its receipt. A relay runs in
//! this process on 127.0.0.1 so the example is self-contained; in a fleet it
//! is `agent-link-relay run` on a reachable host, and each peer directory is
//! made once by `agent-link init`.
//!
//! Run it: `cargo run -p agent-link --example quickstart`.

use agent_link::{AgentLink, JoinToken};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let relay_dir = tmp.path().join("relay");
    agent_link_relay::state::init(&relay_dir, Some("127.0.0.1:0".parse()?))?;
    let relay = agent_link_relay::Relay::spawn(
        agent_link_relay::state::load(&relay_dir)?,
        agent_link_relay::SpawnOptions::default(),
    )
    .await?;
    // What `agent-link-relay invite --instance-id ID` prints, one per computer.
    let week = std::time::Duration::from_secs(7 * 24 * 3600);
    let invite_one = JoinToken::parse(&relay.invite("instance-001", week)?)?;
    let invite_two = JoinToken::parse(&relay.invite("instance-002", week)?)?;
    let (dir_one, dir_two) = (tmp.path().join("one"), tmp.path().join("two"));

    // README: begin
    // Once per computer (what `agent-link init --join-file FILE` does).
    agent_link::init(&dir_one, "instance-001", &invite_one, None).await?;
    agent_link::init(&dir_two, "instance-002", &invite_two, None).await?;

    // Instance 1: agent xiaobaozi receives. Its handler runs on a task of
    // its own; the sender's receipt comes once the handler has run.
    let one = AgentLink::connect(&dir_one).await?;
    let (got_tx, got) = tokio::sync::oneshot::channel();
    let mut got_tx = Some(got_tx);
    let xiaobaozi = one.attach("xiaobaozi").await?;
    let handler = xiaobaozi.on_message(move |msg| {
        println!(
            "{} -> {}: {}",
            msg.from,
            msg.to,
            String::from_utf8_lossy(&msg.payload)
        );
        if let Some(tx) = got_tx.take() {
            let _ = tx.send(msg.id);
        }
    });

    // Instance 2: agent healthguard sends and waits for the receipt.
    let two = AgentLink::connect(&dir_two).await?;
    let healthguard = two.attach_sender("healthguard").await?;
    let receipt = healthguard
        .send("instance-001/xiaobaozi", "你好，小包子!")
        .await?;
    println!(
        "delivered {} to {} at {} ms",
        receipt.id, receipt.to, receipt.delivered_at_ms
    );
    assert_eq!(
        got.await?,
        receipt.id,
        "the receipt is for the message taken"
    );

    healthguard.close().await;
    two.close().await;
    handler.abort();
    one.close().await;
    // README: end
    relay.shutdown().await;
    Ok(())
}
