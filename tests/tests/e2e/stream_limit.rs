//! The relay starts each connection with a small QUIC stream limit (quinn
//! keeps state for every stream a peer may open, ~5 KiB per connection at
//! the full limit) and raises it as the connection uses streams: a peer
//! still gets every one of its `max_agents_per_connection` agents, and the
//! next attach is refused with `TooManyStreams` as before.

use agent_link_crypto::Identity;
use agent_link_proto::{ErrorCode, PeerToRelay, RelayToPeer};
use agent_link_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_limit_grows_to_every_allowed_agent() {
    let relay = TestRelay::start(|_| {}).await;
    let max = agent_link_relay::RelayConfig::default().max_agents_per_connection as usize;
    let id = Identity::generate();
    relay.register("many", &id);
    let client = RawClient::connect(&relay, id, "many").await.unwrap();
    let mut streams = Vec::new();
    for i in 0..max {
        // `attach` waits (bounded) for `Attached`: it would time out if the
        // limit were not raised in time.
        streams.push(client.attach(&format!("a{i}"), true).await);
    }
    let mut extra = client.open().await;
    extra
        .write(&PeerToRelay::Attach {
            agent: "one-too-many",
            receive: true,
        })
        .await;
    let f = extra.read().await.expect("refusal");
    assert_eq!(
        f.get(),
        RelayToPeer::Error {
            code: ErrorCode::TooManyStreams
        }
    );
}
