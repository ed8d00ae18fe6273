//! The local instance (DESIGN.md "The local instance", LOCAL-API.md) with
//! the real binaries: two daemons on one relay, an agent that was not
//! running gets its message later, delivered means stored (across kill -9),
//! read receipts, a full inbox, a full disk, one daemon per directory, and
//! the local API's refusals. Every wait is bounded.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use agent_link_tests::{peer_cmd, text};

use super::cli::{instances_json, lines_of, run, two_peers, wait_exit, WAIT};

/// A daemon child process; killed on drop.
struct DaemonChild {
    child: Child,
    dir: PathBuf,
    _stderr: mpsc::Receiver<String>,
}

impl DaemonChild {
    /// Start the daemon of `dir` and wait for `listening on DIR/agent-link.sock`.
    fn start(dir: &Path) -> Self {
        let mut child = peer_cmd()
            .args(["daemon", "--dir", dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start daemon");
        let rx = lines_of(child.stderr.take().unwrap());
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => {
                    assert!(line.contains("agent-link.sock"), "{line}");
                    break;
                }
                Ok(_) => {}
                Err(_) => panic!("the daemon did not start"),
            }
        }
        Self {
            child,
            dir: dir.to_path_buf(),
            _stderr: rx,
        }
    }

    /// SIGTERM, as a service manager stops it; wait for the exit.
    fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        assert!(
            wait_exit(&mut self.child).success(),
            "a stopped daemon exits 0"
        );
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `agent-link ARGS` with `--dir DIR` put in after the (sub)command.
fn cli_cmd(dir: &Path, args: &[&str]) -> std::process::Command {
    let words = if args[0] == "agent" { 2 } else { 1 };
    let mut c = peer_cmd();
    c.args(&args[..words])
        .args(["--dir", dir.to_str().unwrap()])
        .args(&args[words..]);
    c
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    run(cli_cmd(dir, args))
}

/// `cli_cmd` started, its stdout and stderr piped.
fn spawn_cli(dir: &Path, args: &[&str]) -> Child {
    cli_cmd(dir, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    ok(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn agent_add(dir: &Path, agent: &str) {
    ok(&cli(dir, &["agent", "add", agent]));
}

#[test]
fn an_agent_that_was_not_running_gets_its_message_later() {
    let (_tmp, relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    agent_add(&two, "xiaobaozi");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&cli(&two, &["agent", "list", "--json"]))).unwrap();
    assert_eq!(list["agents"][0]["agent"], "xiaobaozi");
    assert_eq!(list["agents"][0]["inbox"], 0);
    // Nobody is listening; the message lands in the inbox.
    let out = cli(
        &one,
        &[
            "send",
            "--from",
            "xiaodingding",
            "--to",
            "inst-2/xiaobaozi",
            "你好",
        ],
    );
    let line = ok(&out);
    assert!(line.starts_with("delivered "), "{line}");
    // A bare name resolves to the one instance where it is attached.
    let out = cli(
        &one,
        &[
            "send",
            "--from",
            "xiaodingding",
            "--to",
            "xiaobaozi",
            "--json",
            "second",
        ],
    );
    let receipt: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(receipt["to"], "inst-2/xiaobaozi");
    let waiting = json_lines(&cli(&two, &["inbox", "--agent", "xiaobaozi", "--json"]));
    assert_eq!(waiting.len(), 2);
    assert_eq!(waiting[0]["message"], "你好");
    assert_eq!(waiting[0]["from"], "inst-1/xiaodingding");
    assert!(waiting[0]["received_at"].as_u64().unwrap() > 0);
    // recv prints the oldest and removes it.
    let got = ok(&cli(&two, &["recv", "--agent", "xiaobaozi"]));
    assert_eq!(got.trim(), "inst-1/xiaodingding: 你好");
    let got = json_lines(&cli(
        &two,
        &["recv", "--agent", "xiaobaozi", "--json", "--count", "5"],
    ));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["id"], receipt["id"]);
    assert!(ok(&cli(&two, &["inbox", "--agent", "xiaobaozi", "--json"])).is_empty());
    // Nothing waiting within --wait: exit 5, nothing printed.
    let out = cli(&two, &["recv", "--agent", "xiaobaozi", "--wait", "1"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(out.stdout.is_empty());
    // However many agents and CLI calls: one connection per instance.
    let inst = instances_json(&relay);
    for i in inst["instances"].as_array().unwrap() {
        assert_eq!(i["connections"], 1, "{i}");
    }
    // Through the daemon, status says so.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&cli(&two, &["status", "--json"]))).unwrap();
    assert_eq!(st["daemon"], true);
    assert_eq!(st["connected"], true);
    assert_eq!(st["local_agents"][0]["agent"], "xiaobaozi");
}

#[test]
fn recv_wait_returns_when_a_message_lands_and_read_receipts_come_back() {
    let (_tmp, _relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    let waiter = spawn_cli(&two, &["recv", "--agent", "bob", "--wait", "20", "--json"]);
    let sender = spawn_cli(
        &one,
        &[
            "send",
            "--from",
            "alice",
            "--to",
            "inst-2/bob",
            "--wait-read",
            "20",
            "--json",
            "read me",
        ],
    );
    let got = waiter.wait_with_output().unwrap();
    let m: serde_json::Value = serde_json::from_str(&ok(&got)).unwrap();
    assert_eq!(m["message"], "read me");
    let sent = sender.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(&sent)).unwrap();
    assert_eq!(r["status"], "read", "the read receipt came back: {r}");
    assert_eq!(r["id"], m["id"]);
    assert!(r["read_at"].as_u64().unwrap() >= r["delivered_at"].as_u64().unwrap());
    // Not read in time: exit 5, and it says it was delivered.
    let out = cli(
        &one,
        &[
            "send",
            "--from",
            "alice",
            "--to",
            "inst-2/bob",
            "--wait-read",
            "1",
            "unread",
        ],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("delivered"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn delivered_means_stored_across_a_kill_9_of_the_receiving_daemon() {
    let (_tmp, _relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let mut d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    let mut ids = Vec::new();
    for i in 0..5 {
        let out = cli(
            &one,
            &[
                "send",
                "--from",
                "alice",
                "--to",
                "inst-2/bob",
                "--json",
                &format!("m{i}"),
            ],
        );
        let r: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    d2.kill9();
    // The socket file a crashed daemon leaves does not fool the CLI: it
    // reads the inbox files itself.
    assert!(two.join("agent-link.sock").exists());
    let waiting = json_lines(&cli(&two, &["inbox", "--agent", "bob", "--json"]));
    let got: Vec<&str> = waiting.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        got,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "all five, in order"
    );
    let mut d2 = DaemonChild::start(&d2.dir.clone());
    let got = json_lines(&cli(
        &two,
        &["recv", "--agent", "bob", "--count", "10", "--json"],
    ));
    assert_eq!(got.len(), 5, "none lost, none twice");
    // A daemon stopped by SIGTERM detaches: a send names the cause at once.
    d2.stop();
    let out = cli(
        &one,
        &[
            "send",
            "--from",
            "alice",
            "--to",
            "inst-2/bob",
            "--timeout",
            "5",
            "x",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

#[test]
fn a_full_inbox_is_a_named_error_and_keeps_what_it_has() {
    let (_tmp, _relay, one, two) = two_peers();
    let cfg_path = two.join("agent-link-config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["inbox_max_messages"] = 2.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    for i in 0..2 {
        ok(&cli(
            &one,
            &[
                "send",
                "--from",
                "alice",
                "--to",
                "inst-2/bob",
                &format!("m{i}"),
            ],
        ));
    }
    let out = cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", "m2"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("inbox is full"),
        "{}",
        text(&out.stderr)
    );
    let waiting = json_lines(&cli(&two, &["inbox", "--agent", "bob", "--json"]));
    let texts: Vec<&str> = waiting
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m0", "m1"]);
    // Room again: the next send is stored.
    ok(&cli(&two, &["recv", "--agent", "bob"]));
    ok(&cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", "m3"],
    ));
}

#[test]
fn a_full_disk_refuses_the_message_instead_of_a_receipt() {
    let (_tmp, _relay, one, two) = two_peers();
    let inbox = two.join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&inbox)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("AGENT_LINK_REQUIRE_NETNS").is_none(),
            "root tests required, but a tmpfs could not be mounted"
        );
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(inbox.clone());
    let _d1 = DaemonChild::start(&one);
    let d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    // Fill the disk but for a few hundred bytes.
    let mut filler = std::fs::File::create(inbox.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    while filler.write_all(&chunk).is_ok() {}
    let _ = filler.write_all(&chunk[..256]);
    let _ = filler.sync_all();
    let big = "x".repeat(8192);
    let out = cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", &big],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("inbox is full"),
        "{}",
        text(&out.stderr)
    );
    assert!(ok(&cli(&two, &["inbox", "--agent", "bob", "--json"])).is_empty());
    // Space again: stored.
    drop(filler);
    std::fs::remove_file(inbox.join("filler")).unwrap();
    ok(&cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", &big],
    ));
    assert_eq!(
        json_lines(&cli(&two, &["inbox", "--agent", "bob", "--json"])).len(),
        1
    );
    drop(d2);
}

#[test]
fn a_second_daemon_on_the_same_dir_is_refused() {
    let (_tmp, _relay, one, _two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let mut second = peer_cmd()
        .args(["daemon", "--dir", one.to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut second);
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("already running"), "{err}");
}

/// One raw HTTP/1.1 request on the daemon's socket; (status, JSON body).
fn http(dir: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(dir.join("agent-link.sock")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status: u16 = out.split(' ').nth(1).unwrap().parse().unwrap();
    let json = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn the_local_api_names_every_bad_request() {
    let (_tmp, _relay, one, _two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    agent_add(&one, "bob");
    for (method, path, body, status, code) in [
        ("POST", "/v1/send", "{not json", 400, "BadRequest"),
        (
            "POST",
            "/v1/send",
            r#"{"from":"a","to":"b/c","message":"x","extra":1}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/send",
            r#"{"from":"a","to":"b/c"}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/send",
            r#"{"from":"a","to":"b/c/d","message":"x"}"#,
            400,
            "BadAddress",
        ),
        (
            "POST",
            "/v1/send",
            r#"{"from":".read","to":"b/c","message":"x"}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/agents",
            r#"{"agent":".read"}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/agents",
            r#"{"agent":"x","notify_url":"http://10.1.2.3:80/"}"#,
            400,
            "BadRequest",
        ),
        ("GET", "/v1/agents/nobody/inbox", "", 404, "UnknownAgent"),
        (
            "DELETE",
            "/v1/agents/bob/inbox/..%2Fx",
            "",
            400,
            "BadRequest",
        ),
        ("DELETE", "/v1/agents/bob/inbox/../x", "", 404, "NotFound"),
        (
            "DELETE",
            &format!("/v1/agents/bob/inbox/{}", "ab".repeat(16)),
            "",
            404,
            "UnknownMessage",
        ),
        (
            "GET",
            "/v1/agents/bob/inbox?wait=soon",
            "",
            400,
            "BadRequest",
        ),
        ("GET", "/v2/status", "", 404, "NotFound"),
        (
            "POST",
            "/v1/agents/bob/ack",
            r#"{"ids":[]}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/agents/bob/ack",
            r#"{"ids":["../x"]}"#,
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/v1/agents/nobody/ack",
            &format!(r#"{{"ids":["{}"]}}"#, "ab".repeat(16)),
            404,
            "UnknownAgent",
        ),
    ] {
        let (got, v) = http(&one, method, path, body);
        assert_eq!(
            (got, v["error"].as_str()),
            (status, Some(code)),
            "{method} {path} {body}: {v}"
        );
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(v["exit_code"].as_u64().is_some());
    }
    // An oversized body is refused, not read into memory.
    let mut s = UnixStream::connect(one.join("agent-link.sock")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST /v1/send HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        64 * 1024 * 1024
    )
    .unwrap();
    // (Only the header: the answer must come before any body is read.)
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(
        out.starts_with("HTTP/1.1 413"),
        "{}",
        &out[..out.len().min(200)]
    );
    let (status, v) = http(&one, "GET", "/v1/status", "");
    assert_eq!(
        (status, &v["daemon"]),
        (200, &serde_json::Value::Bool(true))
    );
}

#[test]
fn a_client_of_another_user_is_refused_by_its_peer_credentials() {
    let (_tmp, _relay, one, _two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    if rustix_like_euid() != 0 {
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    // Past the file modes on purpose: only the credential check is left.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&one, std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock = one.join("agent-link.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    // The daemon may close before, during or after the request is written:
    // a closed connection, a reset or a broken pipe are all "nothing", and
    // any answer byte is a failure.
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(10)\ns.connect({:?})\ntry:\n    s.sendall(b'GET /v1/status HTTP/1.1\\r\\nhost: x\\r\\n\\r\\n')\n    d=s.recv(100)\nexcept (BrokenPipeError, ConnectionResetError):\n    d=b''\nsys.stdout.write('GOT:'+repr(d))\n",
        sock.to_str().unwrap()
    );
    let mut c = std::process::Command::new("python3");
    std::os::unix::process::CommandExt::uid(&mut c, 65534);
    let out = c.args(["-c", &script]).output().unwrap();
    let said = text(&out.stdout);
    assert_eq!(
        said,
        "GOT:b''",
        "a client of uid 65534 must get nothing: {}",
        text(&out.stderr)
    );
    // The daemon's own user still gets in.
    assert_eq!(http(&one, "GET", "/v1/status", "").0, 200);
}

fn rustix_like_euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

#[test]
fn listen_through_the_daemon_drains_the_inbox_then_streams() {
    let (_tmp, _relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    ok(&cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", "early"],
    ));
    let mut listen = spawn_cli(&two, &["listen", "--agent", "bob", "--count", "2"]);
    let lines = lines_of(listen.stdout.take().unwrap());
    assert_eq!(lines.recv_timeout(WAIT).unwrap(), "inst-1/alice: early");
    ok(&cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", "late"],
    ));
    assert_eq!(lines.recv_timeout(WAIT).unwrap(), "inst-1/alice: late");
    assert!(wait_exit(&mut listen).success());
    assert!(
        ok(&cli(&two, &["inbox", "--agent", "bob", "--json"])).is_empty(),
        "printed means acked"
    );
}

/// A loopback HTTP endpoint that records each request body; with `stall`,
/// it accepts and never answers (a slow hook).
fn hook(stall: bool) -> (String, mpsc::Receiver<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/agent", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().map_while(Result::ok) {
            if stall {
                held.push(s);
                let _ = tx.send(String::new());
                continue;
            }
            let mut s = s;
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Until the body announced by content-length is in.
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let t = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = t.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        let _ =
                            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
                        let _ = tx.send(body.to_string());
                        break;
                    }
                }
            }
        }
    });
    (url, rx)
}

#[test]
fn notify_url_gets_the_id_never_the_content_and_a_slow_one_blocks_nothing() {
    let (_tmp, _relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    let (url, hits) = hook(false);
    let (slow_url, slow_hits) = hook(true);
    for (agent, u) in [("bob", &url), ("carol", &slow_url)] {
        let out = cli(&two, &["agent", "add", agent, "--notify-url", u]);
        ok(&out);
    }
    let out = cli(
        &one,
        &[
            "send",
            "--from",
            "alice",
            "--to",
            "inst-2/bob",
            "--json",
            "secret words",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let body: serde_json::Value = serde_json::from_str(&hits.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"agent": "bob", "id": r["id"], "from": "inst-1/alice"})
    );
    // A hook that never answers: sends to its agent are stored and
    // receipted all the same, one after another.
    for i in 0..5 {
        ok(&cli(
            &one,
            &[
                "send",
                "--from",
                "alice",
                "--to",
                "inst-2/carol",
                &format!("c{i}"),
            ],
        ));
    }
    slow_hits
        .recv_timeout(WAIT)
        .expect("the slow hook was called");
    assert_eq!(
        json_lines(&cli(&two, &["inbox", "--agent", "carol", "--json"])).len(),
        5
    );
    // Only loopback http:// is accepted.
    let out = cli(
        &two,
        &[
            "agent",
            "add",
            "dave",
            "--notify-url",
            "http://192.0.2.1:80/",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn many_concurrent_cli_calls_share_the_one_connection_and_all_land() {
    let (_tmp, relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    let children: Vec<Child> = (0..24)
        .map(|i| {
            spawn_cli(
                &one,
                &[
                    "send",
                    "--from",
                    &format!("a{}", i % 6),
                    "--to",
                    "inst-2/bob",
                    &format!("n{i}"),
                ],
            )
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut got: Vec<String> = json_lines(&cli(&two, &["inbox", "--agent", "bob", "--json"]))
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut want: Vec<String> = (0..24).map(|i| format!("n{i}")).collect();
    want.sort();
    assert_eq!(got, want);
    for i in instances_json(&relay)["instances"].as_array().unwrap() {
        assert_eq!(i["connections"], 1, "{i}");
    }
}

#[test]
fn daemons_keep_going_across_a_relay_restart_and_waiting_messages_stay() {
    let (tmp, mut relay, one, two) = two_peers();
    let _d1 = DaemonChild::start(&one);
    let _d2 = DaemonChild::start(&two);
    agent_add(&two, "bob");
    ok(&cli(
        &one,
        &["send", "--from", "alice", "--to", "inst-2/bob", "before"],
    ));
    let addr = relay.addr.clone();
    relay.stop();
    drop(relay);
    // While the relay is down: the inbox is still there to read.
    assert_eq!(
        json_lines(&cli(&two, &["inbox", "--agent", "bob", "--json"])).len(),
        1
    );
    let (_relay, _) = super::cli::RelayChild::start(&tmp.path().join("relay"), &addr);
    // Both daemons reconnect and re-attach by themselves (bounded retries:
    // the send fails with "offline" until bob is attached again).
    let deadline = Instant::now() + WAIT;
    loop {
        let out = cli(
            &one,
            &[
                "send",
                "--from",
                "alice",
                "--to",
                "inst-2/bob",
                "--timeout",
                "5",
                "after",
            ],
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no delivery after the relay came back: {}",
            text(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let texts: Vec<String> = json_lines(&cli(&two, &["inbox", "--agent", "bob", "--json"]))
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["before", "after"]);
}
