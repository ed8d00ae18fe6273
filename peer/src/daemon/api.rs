//! The local API: HTTP/1.1 + JSON on `DIR/agent-link.sock` (LOCAL-API.md
//! is the contract). Routing is a match on method and path segments; every
//! error is `{"error": CODE, "message": "...", "exit_code": N}`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::agents::AgentEntry;
use super::socket::Allowed;
use super::state::{Daemon, DaemonError, Failure};
use super::store::{self, parse_id};

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body: a message at the relay's hard limit in base64,
/// with room for the other fields.
const MAX_BODY: usize = 24 * 1024 * 1024;
/// Longest `wait` a client may ask for.
const MAX_WAIT_SECS: u64 = 3600;
/// Messages per inbox answer at most.
const MAX_LIMIT: usize = 1000;

/// Accept connections until the listener fails for good.
pub(crate) async fn serve(daemon: Daemon, listener: UnixListener) -> Result<(), DaemonError> {
    let allowed = Allowed::new(&daemon.config().local_api_uids);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin or die.
                tracing::warn!("local API accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !allowed.admits(&stream) {
            tracing::warn!("local API: refused a client of another user (peer credentials)");
            continue;
        }
        let d = daemon.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let d = d.clone();
                async move { Ok::<_, Infallible>(route(d, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn failure(f: &Failure) -> Response<Body> {
    json_response(
        f.http,
        &json!({"error": f.code, "message": f.message, "exit_code": f.exit.code()}),
    )
}

async fn route(d: Daemon, req: Request<Incoming>) -> Response<Body> {
    match route_inner(d, req).await {
        Ok(r) => r,
        Err(f) => failure(&f),
    }
}

async fn route_inner(d: Daemon, req: Request<Incoming>) -> Result<Response<Body>, Failure> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let method = req.method().clone();
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["v1", "status"]) => status(&d).await,
        (Method::GET, ["v1", "agents"]) => {
            let list: Vec<Value> = d.agents().await.iter().map(agent_json).collect();
            Ok(json_response(200, &json!({"agents": list})))
        }
        (Method::POST, ["v1", "agents"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Add {
                agent: String,
                #[serde(default)]
                notify_url: Option<String>,
            }
            let a: Add = read_json(req).await?;
            let new = d
                .add_agent(AgentEntry {
                    agent: a.agent.clone(),
                    notify_url: a.notify_url,
                })
                .await?;
            Ok(json_response(
                if new { 201 } else { 200 },
                &json!({"agent": a.agent, "added": new, "attached": true}),
            ))
        }
        (Method::DELETE, ["v1", "agents", agent]) => {
            let dropped = d.remove_agent(agent).await?;
            Ok(json_response(
                200,
                &json!({"agent": agent, "removed": true, "dropped_messages": dropped}),
            ))
        }
        (Method::POST, ["v1", "send"]) => send(&d, req).await,
        (Method::GET, ["v1", "agents", agent, "inbox"]) => {
            let q = Query::parse(&query)?;
            let msgs = d.inbox(agent, q.limit, q.wait).await?;
            let list: Vec<Value> = msgs.iter().map(message_json).collect();
            Ok(json_response(200, &json!({"messages": list})))
        }
        (Method::DELETE, ["v1", "agents", agent, "inbox", id]) => {
            let id = parse_id(id).ok_or_else(|| {
                Failure::bad_request(format!(
                    "{id:?} is not a message id (32 lower-case hex digits)"
                ))
            })?;
            d.ack(agent, id).await?;
            Ok(json_response(200, &json!({"acked": store::hex_id(&id)})))
        }
        (Method::POST, ["v1", "agents", agent, "ack"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Ack {
                ids: Vec<String>,
            }
            let agent = agent.to_string();
            let a: Ack = read_json(req).await?;
            if a.ids.is_empty() || a.ids.len() > MAX_LIMIT {
                return Err(Failure::bad_request(format!(
                    "ids: give 1 to {MAX_LIMIT} message ids"
                )));
            }
            let mut ids = Vec::with_capacity(a.ids.len());
            for t in &a.ids {
                ids.push(parse_id(t).ok_or_else(|| {
                    Failure::bad_request(format!(
                        "{t:?} is not a message id (32 lower-case hex digits)"
                    ))
                })?);
            }
            let out = d.ack_many(&agent, ids).await?;
            let (mut acked, mut unknown) = (Vec::new(), Vec::new());
            for (t, r) in a.ids.iter().zip(out) {
                match r {
                    Ok(()) => acked.push(t.clone()),
                    Err(f) if f.code == "UnknownMessage" => unknown.push(t.clone()),
                    Err(f) => return Err(f),
                }
            }
            Ok(json_response(
                200,
                &json!({"acked": acked, "unknown": unknown}),
            ))
        }
        (Method::GET, ["v1", "agents", agent, "events"]) => events(&d, agent).await,
        (_, ["v1", ..]) => Err(Failure::new(
            "NotFound",
            404,
            agent_link_proto::Exit::Usage,
            format!("no such request: {method} {path} (see LOCAL-API.md)"),
        )),
        _ => Err(Failure::new(
            "NotFound",
            404,
            agent_link_proto::Exit::Usage,
            format!("no such path {path}: the local API is under /v1 (see LOCAL-API.md)"),
        )),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Failure> {
    // A declared length over the limit is refused before a byte is read.
    if hyper::body::Body::size_hint(req.body()).lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Failure::new(
                    "TooLarge",
                    413,
                    agent_link_proto::Exit::Usage,
                    format!("request body over {MAX_BODY} bytes"),
                )
            } else {
                Failure::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| Failure::bad_request(format!("malformed JSON: {e}")))
}

fn too_large() -> Failure {
    Failure::new(
        "TooLarge",
        413,
        agent_link_proto::Exit::Usage,
        format!("request body over {MAX_BODY} bytes"),
    )
}

struct Query {
    wait: Option<Duration>,
    limit: usize,
}

impl Query {
    fn parse(q: &str) -> Result<Self, Failure> {
        let mut out = Query {
            wait: None,
            limit: 100,
        };
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = |v: &str| {
                v.parse::<u64>().map_err(|_| {
                    Failure::bad_request(format!("query {k}={v:?}: expected a whole number"))
                })
            };
            match k {
                "wait" => out.wait = Some(Duration::from_secs(num(v)?.min(MAX_WAIT_SECS))),
                "limit" => out.limit = (num(v)? as usize).clamp(1, MAX_LIMIT),
                other => {
                    return Err(Failure::bad_request(format!(
                        "unknown query parameter {other:?} (wait, limit)"
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn agent_json(a: &super::state::AgentInfo) -> Value {
    json!({
        "agent": a.agent,
        "inbox": a.inbox,
        "inbox_bytes": a.bytes,
        "expired": a.expired,
        "notify_url": a.notify_url,
        "receiving": a.receiving,
        "stopped": a.stopped,
    })
}

/// A message as `listen --json` prints it, plus `received_at`.
pub(crate) fn message_json(m: &store::Full) -> Value {
    let mut v = json!({
        "id": store::hex_id(&m.meta.id),
        "from": m.meta.from,
        "to": m.meta.to,
        "sent_at": m.meta.sent_at_ms,
        "received_at": m.meta.received_at_ms,
    });
    match std::str::from_utf8(&m.payload) {
        Ok(s) => v["message"] = s.into(),
        Err(_) => {
            v["message_base64"] = base64::engine::general_purpose::STANDARD
                .encode(&m.payload)
                .into()
        }
    }
    v
}

async fn status(d: &Daemon) -> Result<Response<Body>, Failure> {
    let local: Vec<Value> = d.agents().await.iter().map(agent_json).collect();
    let mut v = json!({
        "daemon": true,
        "instance_id": d.instance_id(),
        "relay": &*d.link().relay(),
        "local_agents": local,
    });
    match d.link().status().await {
        Ok(st) => {
            v["connected"] = true.into();
            v["rtt_ms"] = (st.rtt.as_secs_f64() * 1000.0).into();
            v["agents"] = json!(st.you.agents);
            v["instances"] = st
                .instances
                .iter()
                .map(|i| json!({"instance_id": i.instance_id, "name": i.name, "online": i.online, "agents": i.agents}))
                .collect::<Vec<_>>()
                .into();
        }
        Err(e) => {
            v["connected"] = false.into();
            v["error"] = e.to_string().into();
        }
    }
    Ok(json_response(200, &v))
}

async fn send(d: &Daemon, req: Request<Incoming>) -> Result<Response<Body>, Failure> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Send {
        from: String,
        to: String,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        message_base64: Option<String>,
        #[serde(default)]
        timeout_secs: Option<u64>,
        #[serde(default)]
        wait_read_secs: Option<u64>,
    }
    let s: Send = read_json(req).await?;
    let payload = match (s.message, s.message_base64) {
        (Some(m), None) => Bytes::from(m),
        (None, Some(b)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| Failure::bad_request(format!("message_base64: {e}")))?,
        ),
        _ => {
            return Err(Failure::bad_request(
                "give exactly one of message and message_base64",
            ))
        }
    };
    let timeout = Duration::from_secs(
        s.timeout_secs
            .unwrap_or(d.config().send_timeout_secs)
            .clamp(1, 3600),
    );
    let wait_read = s
        .wait_read_secs
        .map(|w| Duration::from_secs(w.clamp(1, 24 * 3600)));
    let (r, read_at) = d.send(&s.from, &s.to, payload, timeout, wait_read).await?;
    let mut v = json!({
        "status": "delivered",
        "id": r.id.to_string(),
        "to": r.to,
        "delivered_at": r.delivered_at_ms,
    });
    if let Some(at) = read_at {
        v["status"] = "read".into();
        v["read_at"] = at.into();
    }
    Ok(json_response(200, &v))
}

/// A streamed response body fed by a channel.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// NDJSON: every waiting message, then each as it lands, once per stream;
/// the client acks what it handled (DELETE), so nothing leaves the inbox
/// unread.
async fn events(d: &Daemon, agent: &str) -> Result<Response<Body>, Failure> {
    let (inbox, mut landed) = d.subscribe(agent).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let stop = d.stopping();
    tokio::spawn(async move {
        let mut sent: HashSet<store::Id> = HashSet::new();
        loop {
            landed.borrow_and_update();
            let fresh = {
                let inbox = inbox.clone();
                let already = sent.clone();
                tokio::task::spawn_blocking(move || {
                    let inbox = inbox.lock().unwrap_or_else(|e| e.into_inner());
                    let waiting = inbox.list(usize::MAX);
                    let still: HashSet<store::Id> = waiting.iter().map(|w| w.id).collect();
                    let new: Vec<store::Full> = waiting
                        .iter()
                        .filter(|w| !already.contains(&w.id))
                        .filter_map(|w| inbox.read(&w.id).ok().flatten())
                        .collect();
                    (still, new)
                })
                .await
            };
            let Ok((still, new)) = fresh else { return };
            sent.retain(|id| still.contains(id));
            for m in new {
                sent.insert(m.meta.id);
                let mut line = message_json(&m).to_string();
                line.push('\n');
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = landed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
            }
        }
    });
    let mut r = Response::new(ChannelBody { rx }.boxed());
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked() {
        let q = Query::parse("wait=5&limit=3").unwrap();
        assert_eq!((q.wait, q.limit), (Some(Duration::from_secs(5)), 3));
        assert_eq!(Query::parse("").unwrap().limit, 100);
        assert_eq!(Query::parse("limit=0").unwrap().limit, 1);
        assert!(Query::parse("wait=-1").is_err());
        assert!(Query::parse("other=1").is_err());
    }
}
