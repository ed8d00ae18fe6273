//! The commands of the local instance (`daemon`, `agent`, `inbox`, `recv`,
//! `ack`) and the daemon paths of `send`, `listen` and `status`: each a
//! request to the daemon's socket (LOCAL-API.md), or, for the inbox
//! commands without a daemon, the inbox files themselves.

use std::io::Write;
use std::path::Path;

use agent_link::daemon::client::{Client, ClientError};
use agent_link::Exit;
use serde_json::{json, Value};

use crate::Failure;

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let exit = match e.exit_code() {
            2 => Exit::Usage,
            3 => Exit::Offline,
            4 => Exit::Refused,
            5 => Exit::Timeout,
            _ => Exit::Other,
        };
        Failure(exit, e.to_string())
    }
}

/// A path segment: ids are checked by the daemon; this only keeps the
/// request line well formed.
fn seg(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c.to_string(),
            c => format!("%{:02X}", c as u32 & 0xff),
        })
        .collect()
}

/// One line for a message: `FROM: text` (binary payloads by size).
pub(crate) fn message_line(m: &Value) -> String {
    let from = m["from"].as_str().unwrap_or("?");
    let text = match (m["message"].as_str(), m["message_base64"].as_str()) {
        (Some(t), _) => agent_link_proto::text::one_line(t),
        (None, Some(b)) => format!("<binary, {} bytes base64>", b.len()),
        _ => String::new(),
    };
    format!("{from}: {text}")
}

fn print_line(line: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|_| out.flush())
        .map_err(|e| Failure(Exit::Other, format!("writing standard output: {e}")))
}

pub(crate) async fn send(
    client: &Client,
    from: &str,
    to: &str,
    payload: Vec<u8>,
    timeout: Option<u64>,
    wait_read: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let mut body = json!({"from": from, "to": to});
    match String::from_utf8(payload) {
        Ok(s) => body["message"] = s.into(),
        Err(e) => {
            use base64::Engine as _;
            body["message_base64"] = base64::engine::general_purpose::STANDARD
                .encode(e.as_bytes())
                .into();
        }
    }
    if let Some(t) = timeout {
        body["timeout_secs"] = t.max(1).into();
    }
    if let Some(w) = wait_read {
        body["wait_read_secs"] = w.max(1).into();
    }
    let r = client.request("POST", "/v1/send", Some(&body)).await?;
    if json {
        print_line(&r.to_string())
    } else {
        let (id, to, at) = (
            r["id"].as_str().unwrap_or(""),
            r["to"].as_str().unwrap_or(""),
            r["delivered_at"].as_u64().unwrap_or(0),
        );
        match r["read_at"].as_u64() {
            Some(read) => print_line(&format!("delivered {id} to {to} at {at}, read at {read}")),
            None => print_line(&format!("delivered {id} to {to} at {at}")),
        }
    }
}

/// `listen` through the daemon: the agent is registered (so what arrives
/// is kept even between listens), its inbox drained, then each arrival
/// printed; a message is acked only once printed.
pub(crate) async fn listen(
    client: &Client,
    agent: &str,
    json: bool,
    count: Option<u64>,
) -> Result<(), Failure> {
    let added = client
        .request("POST", "/v1/agents", Some(&json!({"agent": agent})))
        .await?;
    if added["added"].as_bool() == Some(true) {
        eprintln!(
            "registered agent {agent} at the local daemon (undo: agent-link agent remove {agent})"
        );
    }
    let mut lines = client
        .stream(&format!("/v1/agents/{}/events", seg(agent)))
        .await?;
    let status = client.request("GET", "/v1/status", None).await?;
    eprintln!(
        "listening as {}/{agent}",
        status["instance_id"].as_str().unwrap_or("?")
    );
    let mut seen = 0u64;
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        if count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
        let m = tokio::select! {
            m = lines.next() => m,
            _ = &mut stop => return Ok(()),
        };
        let Some(mut m) = m else {
            return Err(Failure(Exit::Other, "the daemon stopped".into()));
        };
        let id = m["id"].as_str().unwrap_or("").to_string();
        let line = if json {
            if let Some(o) = m.as_object_mut() {
                o.remove("received_at");
            }
            m.to_string()
        } else {
            message_line(&m)
        };
        print_line(&line)?;
        seen += 1;
        ack_one(client, agent, &id).await?;
    }
}

async fn ack_one(client: &Client, agent: &str, id: &str) -> Result<(), Failure> {
    match client
        .request(
            "DELETE",
            &format!("/v1/agents/{}/inbox/{}", seg(agent), seg(id)),
            None,
        )
        .await
    {
        // Another reader acked it first: it was read.
        Err(ClientError::Api { code, .. }) if code == "UnknownMessage" => Ok(()),
        r => r.map(|_| ()).map_err(Failure::from),
    }
}

pub(crate) async fn status(client: &Client, json: bool) -> Result<(), Failure> {
    let st = client.request("GET", "/v1/status", None).await?;
    if json {
        return print_line(&st.to_string());
    }
    let relay = st["relay"].as_str().unwrap_or("?");
    if st["connected"].as_bool() == Some(true) {
        print_line(&format!(
            "relay      {relay} (connected, rtt {:.2} ms)",
            st["rtt_ms"].as_f64().unwrap_or(0.0)
        ))?;
    } else {
        print_line(&format!("relay      {relay} (not connected)"))?;
    }
    print_line(&format!(
        "instance   {} (daemon running)",
        st["instance_id"].as_str().unwrap_or("?")
    ))?;
    for a in st["local_agents"].as_array().into_iter().flatten() {
        print_line(&format!(
            "agent      {:<24} inbox {:<6} {}",
            a["agent"].as_str().unwrap_or("?"),
            a["inbox"].as_u64().unwrap_or(0),
            if a["receiving"].as_bool() == Some(true) {
                "receiving".to_string()
            } else {
                format!("stopped: {}", a["stopped"].as_str().unwrap_or("?"))
            }
        ))?;
    }
    let me = st["instance_id"].as_str().unwrap_or("");
    for i in st["instances"].as_array().into_iter().flatten() {
        if i["instance_id"].as_str() == Some(me) {
            continue;
        }
        let agents: Vec<&str> = i["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        print_line(&format!(
            "peer       {:<24} {:<8} {}",
            i["instance_id"].as_str().unwrap_or("?"),
            if i["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            if agents.is_empty() {
                "-".to_string()
            } else {
                agents.join(",")
            }
        ))?;
    }
    if st["connected"].as_bool() != Some(true) {
        return Err(Failure(
            Exit::Other,
            format!(
                "the daemon is not connected to the relay: {}",
                st["error"].as_str().unwrap_or("unknown")
            ),
        ));
    }
    Ok(())
}

pub(crate) async fn agent_add(
    dir: &Path,
    agent: &str,
    notify_url: Option<String>,
) -> Result<(), Failure> {
    let mut body = json!({"agent": agent});
    if let Some(u) = &notify_url {
        body["notify_url"] = u.as_str().into();
    }
    if let Some(client) = Client::find(dir).await {
        let r = client.request("POST", "/v1/agents", Some(&body)).await?;
        let verb = if r["added"].as_bool() == Some(true) {
            "added"
        } else {
            "updated"
        };
        return print_line(&format!("{verb} agent {agent} (attached at the relay)"));
    }
    use agent_link::daemon::agents::{check_agent, check_notify_url, AgentEntry, AgentsFile};
    check_agent(agent).map_err(|e| Failure(Exit::Usage, e.to_string()))?;
    if let Some(u) = &notify_url {
        check_notify_url(u).map_err(|e| Failure(Exit::Usage, e.to_string()))?;
    }
    agent_link::config::PeerConfig::load(dir)?;
    let mut file = AgentsFile::load(dir).map_err(|e| Failure(Exit::Usage, e.to_string()))?;
    let new = file.upsert(AgentEntry {
        agent: agent.to_string(),
        notify_url,
    });
    file.save(dir)
        .map_err(|e| Failure(Exit::Other, e.to_string()))?;
    print_line(&format!(
        "{} agent {agent}; the daemon is not running: it receives once `agent-link daemon --dir {}` runs",
        if new { "added" } else { "updated" },
        dir.display()
    ))
}

pub(crate) async fn agent_remove(dir: &Path, agent: &str) -> Result<(), Failure> {
    if let Some(client) = Client::find(dir).await {
        let r = client
            .request("DELETE", &format!("/v1/agents/{}", seg(agent)), None)
            .await?;
        return print_line(&format!(
            "removed agent {agent} ({} waiting messages dropped)",
            r["dropped_messages"].as_u64().unwrap_or(0)
        ));
    }
    use agent_link::daemon::agents::AgentsFile;
    let mut file = AgentsFile::load(dir).map_err(|e| Failure(Exit::Usage, e.to_string()))?;
    if !file.remove(agent) {
        return Err(Failure(
            Exit::Usage,
            format!("agent {agent} is not registered at this instance"),
        ));
    }
    file.save(dir)
        .map_err(|e| Failure(Exit::Other, e.to_string()))?;
    let inbox = dir.join(agent_link::daemon::INBOX_DIR).join(agent);
    let _ = std::fs::remove_dir_all(inbox);
    print_line(&format!(
        "removed agent {agent} (the daemon is not running)"
    ))
}

pub(crate) async fn agent_list(dir: &Path, json: bool) -> Result<(), Failure> {
    let agents: Vec<Value> = match Client::find(dir).await {
        Some(client) => client.request("GET", "/v1/agents", None).await?["agents"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        None => {
            let file = agent_link::daemon::agents::AgentsFile::load(dir)
                .map_err(|e| Failure(Exit::Usage, e.to_string()))?;
            let mut out = Vec::new();
            for a in file.agents {
                let depth = agent_link::daemon::offline::inbox(dir, &a.agent, usize::MAX)
                    .map(|v| v.len())
                    .unwrap_or(0);
                out.push(json!({"agent": a.agent, "inbox": depth, "notify_url": a.notify_url}));
            }
            out
        }
    };
    if json {
        return print_line(&json!({"agents": agents}).to_string());
    }
    if agents.is_empty() {
        return print_line("no agents registered (add one: agent-link agent add AGENT)");
    }
    for a in &agents {
        print_line(&format!(
            "{:<24} inbox {:<6} {}",
            a["agent"].as_str().unwrap_or("?"),
            a["inbox"].as_u64().unwrap_or(0),
            a["notify_url"].as_str().unwrap_or("")
        ))?;
    }
    Ok(())
}

/// The waiting messages (daemon or files), oldest first.
async fn waiting(
    dir: &Path,
    agent: &str,
    limit: usize,
    wait: Option<u64>,
) -> Result<(Option<Client>, Vec<Value>), Failure> {
    match Client::find(dir).await {
        Some(client) => {
            let mut path = format!("/v1/agents/{}/inbox?limit={limit}", seg(agent));
            if let Some(w) = wait {
                path.push_str(&format!("&wait={w}"));
            }
            let r = client.request("GET", &path, None).await?;
            let msgs = r["messages"].as_array().cloned().unwrap_or_default();
            Ok((Some(client), msgs))
        }
        None => {
            let msgs = agent_link::daemon::offline::inbox(dir, agent, limit)?;
            if msgs.is_empty() && wait.is_some() {
                return Err(Failure(
                    Exit::Timeout,
                    format!(
                        "no message waiting for {agent}, and none can arrive: the daemon is not running (start it: agent-link daemon --dir {})",
                        dir.display()
                    ),
                ));
            }
            Ok((None, msgs))
        }
    }
}

pub(crate) async fn inbox(dir: &Path, agent: &str, json: bool) -> Result<(), Failure> {
    let (_, msgs) = waiting(dir, agent, 1000, None).await?;
    for m in &msgs {
        if json {
            print_line(&m.to_string())?;
        } else {
            print_line(&format!(
                "{} {}",
                m["id"].as_str().unwrap_or(""),
                message_line(m)
            ))?;
        }
    }
    Ok(())
}

pub(crate) async fn recv(
    dir: &Path,
    agent: &str,
    wait: Option<u64>,
    count: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let limit = count.unwrap_or(1).clamp(1, 1000) as usize;
    let (client, msgs) = waiting(dir, agent, limit, wait).await?;
    if msgs.is_empty() {
        return Err(Failure(
            Exit::Timeout,
            match wait {
                Some(w) => format!("no message for {agent} within {w} s"),
                None => format!("no message waiting for {agent} (wait for one with --wait SECS)"),
            },
        ));
    }
    for m in &msgs {
        let line = if json { m.to_string() } else { message_line(m) };
        // Printed first, removed after: a crash in between shows it again.
        print_line(&line)?;
        let id = m["id"].as_str().unwrap_or("").to_string();
        match &client {
            Some(c) => ack_one(c, agent, &id).await?,
            None => agent_link::daemon::offline::ack(dir, agent, &[id])?,
        }
    }
    Ok(())
}

pub(crate) async fn ack(dir: &Path, agent: &str, ids: &[String]) -> Result<(), Failure> {
    match Client::find(dir).await {
        Some(client) => {
            for id in ids {
                client
                    .request(
                        "DELETE",
                        &format!("/v1/agents/{}/inbox/{}", seg(agent), seg(id)),
                        None,
                    )
                    .await?;
            }
        }
        None => agent_link::daemon::offline::ack(dir, agent, ids)?,
    }
    Ok(())
}

pub(crate) async fn daemon(dir: &Path) -> Result<(), Failure> {
    agent_link::daemon::run(dir, crate::shutdown_signal(), |path| {
        eprintln!("listening on {}", path.display());
    })
    .await
    .map_err(|e| Failure(e.exit(), e.to_string()))
}
