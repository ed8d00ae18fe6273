//! Which relays of the fleet are up: each running relay keeps an entry in
//! [`RELAYS_BUCKET`] (its relay id → the address peers dial and its
//! certificate fingerprint), refreshed every [`REFRESH`] and gone
//! [`PRESENCE_TTL`] after the last refresh (the bucket's max age), so a
//! relay killed with -9 drops out by itself. Join tokens list the relays
//! found here ([`token_relays`]).

use std::time::Duration;

use agent_link_proto::{RelayEndpoint, MAX_RELAYS};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::{ClusterError, PRESENCE_TTL, RELAYS_BUCKET};

/// How often a running relay refreshes its entry: three refreshes fit in
/// the entry's lifetime, so one late refresh does not make it vanish.
pub const REFRESH: Duration = Duration::from_secs(PRESENCE_TTL.as_secs() / 3);

/// A relay's entry in [`RELAYS_BUCKET`] (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// `host:port` peers dial.
    addr: String,
    /// SHA-256 of its certificate, hex; or `ca` (a CA vouches for it).
    fingerprint: String,
}

/// The value announcing `relay` as up.
pub fn value(relay: &RelayEndpoint) -> Bytes {
    let e = Entry {
        addr: relay.addr.clone(),
        fingerprint: relay.trust.to_config(),
    };
    Bytes::from(serde_json::to_vec(&e).expect("a presence entry encodes as JSON"))
}

fn decode(key: &str, value: &[u8]) -> Result<RelayEndpoint, ClusterError> {
    let corrupt = |reason: String| ClusterError::Corrupt {
        bucket: RELAYS_BUCKET,
        key: key.to_string(),
        reason,
    };
    let e: Entry = serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
    let trust = agent_link_proto::RelayTrust::from_config(&e.fingerprint)
        .ok_or_else(|| corrupt("fingerprint is not 64 hex digits or `ca`".into()))?;
    if !e.addr.contains(':') {
        return Err(corrupt("addr is not HOST:PORT".into()));
    }
    Ok(RelayEndpoint {
        addr: e.addr,
        trust,
    })
}

/// Announce (or refresh) `relay_id` as up at `relay`.
pub async fn announce(
    store: &kv::Store,
    relay_id: &str,
    relay: &RelayEndpoint,
) -> Result<(), ClusterError> {
    store
        .put(relay_id, value(relay))
        .await
        .map_err(|e| ClusterError::js("announcing this relay")(e.to_string()))?;
    Ok(())
}

/// Take `relay_id`'s entry away (a relay shutting down cleanly).
pub async fn withdraw(store: &kv::Store, relay_id: &str) -> Result<(), ClusterError> {
    store
        .delete(relay_id)
        .await
        .map_err(|e| ClusterError::js("withdrawing this relay")(e.to_string()))
}

/// The relays that are up, by relay id. An entry that does not decode is
/// an error: the bucket is the fleet's and nothing else writes it.
pub async fn relays_up(store: &kv::Store) -> Result<Vec<(String, RelayEndpoint)>, ClusterError> {
    let js = ClusterError::js("listing the relays that are up");
    let mut keys = store.keys().await.map_err(|e| js(e.to_string()))?;
    let mut ids = Vec::new();
    while let Some(k) = keys.next().await {
        ids.push(k.map_err(|e| ClusterError::js("listing the relays that are up")(e.to_string()))?);
    }
    let mut up = Vec::with_capacity(ids.len());
    for id in ids {
        let got = store
            .get(&id)
            .await
            .map_err(|e| ClusterError::js("reading a relay's entry")(e.to_string()))?;
        // Gone between the listing and the read: it went down meanwhile.
        if let Some(v) = got {
            up.push((id.clone(), decode(&id, &v)?));
        }
    }
    up.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(up)
}

/// The relays a join token made on relay `own_id` lists, first to dial
/// first: this relay at `own` first when it is up, then the others that are
/// up by relay id; this relay last when it is not up (a peer that cannot
/// reach the others still finds it once it is back). At most
/// [`MAX_RELAYS`]; an address listed twice is kept once.
pub fn token_relays(
    own_id: &str,
    own: RelayEndpoint,
    up: Vec<(String, RelayEndpoint)>,
) -> (RelayEndpoint, Vec<RelayEndpoint>) {
    let own_up = up.iter().any(|(id, _)| id == own_id);
    let mut list: Vec<RelayEndpoint> = Vec::with_capacity(up.len() + 1);
    if own_up {
        list.push(own.clone());
    }
    for (id, r) in up {
        if id != own_id && !list.iter().any(|l| l.addr == r.addr) {
            list.push(r);
        }
    }
    if !own_up && !list.iter().any(|l| l.addr == own.addr) {
        list.push(own);
    }
    list.truncate(MAX_RELAYS);
    let first = list.remove(0);
    (first, list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: &str, f: u8) -> RelayEndpoint {
        RelayEndpoint {
            addr: addr.into(),
            trust: agent_link_proto::RelayTrust::Pinned([f; 32]),
        }
    }

    #[test]
    fn this_relay_first_when_up_and_last_when_down() {
        let up = vec![
            ("relay-1".to_string(), r("10.0.0.1:1", 1)),
            ("relay-2".to_string(), r("10.0.0.2:1", 2)),
            ("relay-3".to_string(), r("10.0.0.3:1", 3)),
        ];
        let (first, rest) = token_relays("relay-2", r("relay-2.example:1", 2), up.clone());
        assert_eq!(first, r("relay-2.example:1", 2));
        assert_eq!(rest, [r("10.0.0.1:1", 1), r("10.0.0.3:1", 3)]);

        let down = up[..1].to_vec();
        let (first, rest) = token_relays("relay-2", r("10.0.0.2:1", 2), down);
        assert_eq!(first, r("10.0.0.1:1", 1));
        assert_eq!(rest, [r("10.0.0.2:1", 2)]);

        let (first, rest) = token_relays("relay-2", r("10.0.0.2:1", 2), vec![]);
        assert_eq!(first, r("10.0.0.2:1", 2));
        assert!(rest.is_empty());
    }

    #[test]
    fn at_most_sixteen_and_no_address_twice() {
        let up: Vec<_> = (0..40)
            .map(|i| (format!("relay-{i:02}"), r(&format!("h:{}", i % 20), 1)))
            .collect();
        let (first, rest) = token_relays("relay-00", r("h:0", 1), up);
        assert_eq!(first.addr, "h:0");
        assert_eq!(rest.len(), MAX_RELAYS - 1);
        let mut addrs: Vec<_> = rest.iter().map(|r| r.addr.clone()).collect();
        addrs.push(first.addr);
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), MAX_RELAYS);
    }

    #[test]
    fn entries_round_trip_and_foreign_ones_are_named() {
        let e = r("127.0.0.1:9", 7);
        assert_eq!(decode("relay-1", &value(&e)).unwrap(), e);
        for bad in [&b"{}"[..], br#"{"addr":"x","fingerprint":"00"}"#, b"\xff"] {
            let err = decode("relay-1", bad).unwrap_err().to_string();
            assert!(err.contains("relay-1"), "{err}");
        }
    }
}
