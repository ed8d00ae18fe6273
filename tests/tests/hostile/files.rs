//! Hostile input on disk and on the command line: join tokens, key and
//! secret files, configuration files and registries that are malformed,
//! missing or readable by others are refused with a message that names the
//! path (or the token's problem), at the library level and through the real
//! binaries.
//!
//! Covered elsewhere and not repeated: a fleet secret of mode 0644 and a
//! malformed key file (`crypto/src/files.rs`), `relay.key` of mode 0644 and a
//! config field out of range at `run`, `init --join al1garbage`
//! (`tests/tests/cli/cli.rs`), truncated tokens (`proto/src/join.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use agent_link::config::{CONFIG_FILE, KEY_FILE, PINS_FILE, SECRET_FILE};
use agent_link::AgentLink;
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_proto::JoinToken;
use agent_link_tests::{workspace_bin, write_peer_dir};

// ---------------------------------------------------------------------------
// Join tokens
// ---------------------------------------------------------------------------

/// Unpadded base64url (RFC 4648 §5), written out so the test does not share
/// the implementation under test.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The bincode of a token, field by field (PROTOCOL.md §8).
fn token_bytes(version: u8, addr: &[u8]) -> Vec<u8> {
    assert!(addr.len() < 251, "one-byte length");
    let mut b = vec![version, addr.len() as u8];
    b.extend_from_slice(addr);
    b.extend_from_slice(&[3; 32]); // fingerprint
    b.extend_from_slice(&[0x5e; 32]); // secret
    b
}

fn token(version: u8, addr: &[u8]) -> String {
    format!("al1{}", b64url(&token_bytes(version, addr)))
}

#[test]
fn join_tokens_malformed_in_each_way_are_refused_with_the_reason() {
    let good = token(1, b"127.0.0.1:8765");
    let parsed = JoinToken::parse(&good).expect("the hand-made token is valid");
    assert_eq!(parsed.addr, "127.0.0.1:8765");
    assert_eq!(parsed.fleet_secret().unwrap().expose(), &[0x5e; 32]);

    let body = &good[3..];
    // The last character carries 2 padding bits (80 bytes = 26 groups + 2);
    // setting one makes the encoding non-canonical.
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = alphabet.find(body.chars().last().unwrap()).unwrap();
    let non_canonical = format!(
        "al1{}{}",
        &body[..body.len() - 1],
        alphabet.as_bytes()[last ^ 1] as char
    );
    let mut trailing = token_bytes(1, b"127.0.0.1:8765");
    trailing.push(0);
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "does not start with \"al1\""),
        (
            "another prefix",
            format!("al2{body}"),
            "does not start with \"al1\"",
        ),
        ("prefix only", "al1".into(), "do not decode"),
        (
            "too long",
            format!("{good}{}", "A".repeat(8192)),
            "too long",
        ),
        ("padded", format!("{good}="), "not valid base64url"),
        (
            "standard alphabet",
            format!("{good}+"),
            "not valid base64url",
        ),
        ("space inside", format!("al1 {body}"), "not valid base64url"),
        (
            "non-canonical last character",
            non_canonical,
            "not valid base64url",
        ),
        (
            "trailing byte",
            format!("al1{}", b64url(&trailing)),
            "do not decode",
        ),
        (
            "version 0",
            token(0, b"127.0.0.1:8765"),
            "unsupported token version",
        ),
        (
            "version 7",
            token(7, b"127.0.0.1:8765"),
            "unsupported token version",
        ),
        (
            "version 5 (relays a CA may vouch for) in the one relay layout",
            token(5, b"127.0.0.1:8765"),
            "do not decode",
        ),
        (
            "version 3 (a fleet of relays) in the one relay layout",
            token(3, b"127.0.0.1:8765"),
            "do not decode",
        ),
        (
            "version 2 (an invite) in the open token's layout",
            token(2, b"127.0.0.1:8765"),
            "do not decode",
        ),
        ("address without port", token(1, b"127.0.0.1"), "HOST:PORT"),
        ("empty address", token(1, b""), "HOST:PORT"),
        (
            "address not UTF-8",
            token(1, b"127.0.0.1:\xff"),
            "do not decode",
        ),
    ];
    for (case, text, reason) in cases {
        let err = match JoinToken::parse(&text) {
            Ok(t) => panic!("{case}: accepted as {t:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(reason), "{case}: {err}");
        assert!(
            !err.contains(&hex::encode([0x5e; 4])) && !err.contains(body),
            "{case}: the error repeats the token or its secret: {err}"
        );
    }
    // An address over 255 bytes (needs a two-byte length).
    let mut long = vec![1u8, 0xfb, 0x00, 0x01];
    long.extend_from_slice(&[b'a'; 255]);
    long.push(b':');
    long.extend_from_slice(&[0; 64]);
    let err = JoinToken::parse(&format!("al1{}", b64url(&long)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("HOST:PORT"), "{err}");
}

// ---------------------------------------------------------------------------
// The peer directory, through the library
// ---------------------------------------------------------------------------

/// A complete peer directory for a relay that is not there (nothing here
/// gets as far as connecting).
fn peer_dir(base: &Path) -> std::path::PathBuf {
    let dir = base.join("peer");
    let token = JoinToken {
        addr: "127.0.0.1:9".into(),
        trust: agent_link_proto::RelayTrust::Pinned([3; 32]),
        secret: agent_link_proto::JoinSecret::Fleet(FleetSecret::generate()),
        other_relays: vec![],
    };
    write_peer_dir(&dir, "inst-x", &Identity::generate(), &token);
    dir
}

async fn connect_error(dir: &Path) -> agent_link::LinkError {
    match AgentLink::connect(dir).await {
        Ok(_) => panic!("connected with a broken directory"),
        Err(e) => e,
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn peer_key_and_secret_files_readable_by_others_are_refused_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    for (file, mode) in [
        (KEY_FILE, 0o644),
        (KEY_FILE, 0o640),
        (KEY_FILE, 0o604),
        (KEY_FILE, 0o660),
        (SECRET_FILE, 0o640),
        (SECRET_FILE, 0o604),
    ] {
        let base = tmp.path().join(format!("{file}-{mode:o}"));
        let dir = peer_dir(&base);
        let path = dir.join(file);
        chmod(&path, mode);
        let e = connect_error(&dir).await;
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("chmod 600"),
            "{file} {mode:o}: {msg}"
        );
        assert_eq!(e.exit().code(), 2, "{file} {mode:o}");
        // Refused, not "fixed" behind the user's back.
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            mode
        );
    }
}

#[tokio::test]
async fn a_key_file_symlinked_to_a_world_readable_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = peer_dir(tmp.path());
    let key = dir.join(KEY_FILE);
    let exposed = tmp.path().join("exposed.key");
    std::fs::rename(&key, &exposed).unwrap();
    chmod(&exposed, 0o644);
    std::os::unix::fs::symlink(&exposed, &key).unwrap();
    let msg = connect_error(&dir).await.to_string();
    assert!(
        msg.contains(&key.display().to_string()) && msg.contains("chmod 600"),
        "{msg}"
    );
}

#[tokio::test]
async fn missing_or_malformed_peer_files_are_refused_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    type Break = fn(&Path);
    let cases: [(&str, &str, Break, &str); 11] = [
        (
            "key missing",
            KEY_FILE,
            |p| std::fs::remove_file(p).unwrap(),
            "",
        ),
        (
            "key not hex",
            KEY_FILE,
            |p| std::fs::write(p, "not a key").unwrap(),
            "malformed",
        ),
        (
            "key empty",
            KEY_FILE,
            |p| std::fs::write(p, "").unwrap(),
            "malformed",
        ),
        (
            "key one digit short",
            KEY_FILE,
            |p| {
                let t = std::fs::read_to_string(p).unwrap();
                std::fs::write(p, &t.trim()[1..]).unwrap()
            },
            "malformed",
        ),
        (
            "secret missing",
            SECRET_FILE,
            |p| std::fs::remove_file(p).unwrap(),
            "",
        ),
        (
            "secret not hex",
            SECRET_FILE,
            |p| std::fs::write(p, "zz").unwrap(),
            "malformed",
        ),
        (
            "config missing",
            CONFIG_FILE,
            |p| std::fs::remove_file(p).unwrap(),
            "agent-link init",
        ),
        (
            "config not JSON",
            CONFIG_FILE,
            |p| std::fs::write(p, "{relay_url:").unwrap(),
            "",
        ),
        (
            "config unknown field",
            CONFIG_FILE,
            |p| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                v["secret"] = "the old tool kept it here".into();
                std::fs::write(p, v.to_string()).unwrap()
            },
            "secret",
        ),
        (
            "config bad fingerprint",
            CONFIG_FILE,
            |p| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                v["relay_fingerprint"] = "abcd".into();
                std::fs::write(p, v.to_string()).unwrap()
            },
            "relay_fingerprint",
        ),
        (
            "pins corrupt",
            PINS_FILE,
            |p| std::fs::write(p, "{\"inst-y\": 5").unwrap(),
            "",
        ),
    ];
    for (i, (case, file, break_it, hint)) in cases.into_iter().enumerate() {
        let dir = peer_dir(&tmp.path().join(i.to_string()));
        let path = dir.join(file);
        break_it(&path);
        let e = connect_error(&dir).await;
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(hint),
            "{case}: {msg}"
        );
        assert_eq!(e.exit().code(), 2, "{case}: {msg}");
        assert_eq!(msg.lines().count(), 1, "{case}: one line: {msg}");
    }
}

// ---------------------------------------------------------------------------
// The relay's state directory, through the library
// ---------------------------------------------------------------------------

fn relay_dir(base: &Path) -> std::path::PathBuf {
    let dir = base.join("relay");
    agent_link_relay::state::init(&dir, Some("127.0.0.1:0".parse().unwrap())).unwrap();
    dir
}

fn load_error(dir: &Path, case: &str) -> String {
    match agent_link_relay::state::load(dir) {
        Ok(_) => panic!("{case}: loaded a broken state directory"),
        Err(e) => e.to_string(),
    }
}

/// Small-order point: the identity, y = 1.
const WEAK_KEY: &str = "0100000000000000000000000000000000000000000000000000000000000000";

/// Register a strong key as `inst-w`, then swap a weak one into the file,
/// as a hand-edited or tampered registry would.
fn registry_with_weak_key(dir: &Path) {
    let strong = Identity::generate().public_key();
    agent_link_relay::registry::RegistryStore::new(dir)
        .update(|r| r.register("inst-w", &strong, "w"))
        .unwrap()
        .unwrap();
    let path = dir.join("registry.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&strong.to_string()));
    std::fs::write(&path, text.replace(&strong.to_string(), WEAK_KEY)).unwrap();
}

#[test]
fn broken_relay_state_files_are_refused_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    type Break = fn(&Path);
    let cases: [(&str, &str, Break, &str); 9] = [
        (
            "secret readable by others",
            "fleet.secret",
            |p| chmod(p, 0o640),
            "chmod 600",
        ),
        (
            "key missing",
            "relay.key",
            |p| std::fs::remove_file(p).unwrap(),
            "",
        ),
        (
            "key malformed",
            "relay.key",
            |p| {
                std::fs::write(p, "nope").unwrap();
                chmod(p, 0o600)
            },
            "malformed",
        ),
        (
            "secret missing",
            "fleet.secret",
            |p| std::fs::remove_file(p).unwrap(),
            "",
        ),
        (
            "config not JSON",
            "relay-config.json",
            |p| std::fs::write(p, "[").unwrap(),
            "",
        ),
        (
            "config unknown field",
            "relay-config.json",
            |p| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                v["secret"] = "S".into();
                std::fs::write(p, v.to_string()).unwrap()
            },
            "secret",
        ),
        (
            "config frame deadline 0",
            "relay-config.json",
            |p| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                v["frame_timeout_secs"] = 0.into();
                std::fs::write(p, v.to_string()).unwrap()
            },
            "frame_timeout_secs",
        ),
        (
            "registry not JSON",
            "registry.json",
            |p| std::fs::write(p, "{").unwrap(),
            "corrupt registry",
        ),
        (
            "registry with a small-order key",
            "registry.json",
            |p| registry_with_weak_key(p.parent().unwrap()),
            "inst-w",
        ),
    ];
    for (i, (case, file, break_it, hint)) in cases.into_iter().enumerate() {
        let dir = relay_dir(&tmp.path().join(i.to_string()));
        let path = dir.join(file);
        break_it(&path);
        let msg = load_error(&dir, case);
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(hint),
            "{case}: {msg}"
        );
    }
    // A certificate that is not the relay key's own: refused, naming it.
    let dir = relay_dir(&tmp.path().join("crt"));
    let other = relay_dir(&tmp.path().join("other"));
    std::fs::copy(other.join("relay.crt"), dir.join("relay.crt")).unwrap();
    let msg = load_error(&dir, "foreign certificate");
    assert!(
        msg.contains("certificate does not belong to this key")
            && msg.contains(&dir.join("relay.crt").display().to_string()),
        "{msg}"
    );
    // No configuration: not a relay directory.
    let dir = relay_dir(&tmp.path().join("noconf"));
    std::fs::remove_file(dir.join("relay-config.json")).unwrap();
    let msg = load_error(&dir, "no configuration");
    assert!(
        msg.contains(&dir.display().to_string()) && msg.contains("agent-link-relay init"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------
// Through the binaries
// ---------------------------------------------------------------------------

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(workspace_bin(bin))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn")
}

/// `agent-link-relay run` must refuse to start: bounded, so a relay that
/// starts serving fails the test instead of hanging it.
fn run_must_refuse(dir: &str) -> Output {
    let mut child = Command::new(workspace_bin("agent-link-relay"))
        .args(["run", "--dir", dir, "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the relay started with broken state");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit `code`, one line on stderr containing every one of `needles`.
fn refused(o: &Output, code: i32, needles: &[&str], case: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "{case}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{case}: one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{case}: {n:?} not in {err}");
    }
}

#[test]
fn the_peer_cli_refuses_exposed_or_broken_files_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    // whoami reads the config and the key.
    let dir = peer_dir(&tmp.path().join("a"));
    let key = dir.join(KEY_FILE);
    chmod(&key, 0o644);
    let d = dir.to_str().unwrap();
    refused(
        &run("agent-link", &["whoami", "--dir", d]),
        2,
        &[key.to_str().unwrap(), "chmod 600"],
        "whoami, key 0644",
    );
    // send reads the secret before it connects.
    let dir = peer_dir(&tmp.path().join("b"));
    let secret = dir.join(SECRET_FILE);
    chmod(&secret, 0o604);
    let d = dir.to_str().unwrap();
    refused(
        &run(
            "agent-link",
            &["send", "--dir", d, "--from", "a", "--to", "x/y", "m"],
        ),
        2,
        &[secret.to_str().unwrap(), "chmod 600"],
        "send, secret 0604",
    );
    // status reads the config.
    let dir = peer_dir(&tmp.path().join("c"));
    let cfg = dir.join(CONFIG_FILE);
    std::fs::write(&cfg, "{\"relay_url\": 5}").unwrap();
    let d = dir.to_str().unwrap();
    refused(
        &run("agent-link", &["status", "--dir", d]),
        2,
        &[cfg.to_str().unwrap()],
        "status, config malformed",
    );
}

#[test]
fn the_peer_cli_refuses_bad_join_tokens_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let d = dir.to_str().unwrap();
    let v7 = token(7, b"127.0.0.1:8765");
    refused(
        &run(
            "agent-link",
            &["init", "--dir", d, "--instance-id", "i", "--join", &v7],
        ),
        2,
        &["--join", "unsupported token version"],
        "version 7 token",
    );
    assert!(
        !dir.join(KEY_FILE).exists() && !dir.join(CONFIG_FILE).exists(),
        "nothing written"
    );
    // No token at all: a usage error.
    let o = run("agent-link", &["init", "--dir", d, "--instance-id", "i"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--join"), "{}", stderr(&o));
    assert!(!dir.join(KEY_FILE).exists(), "nothing written");
}

#[test]
fn the_relay_cli_refuses_weak_keys_and_exposed_or_broken_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = relay_dir(tmp.path());
    let d = dir.to_str().unwrap();
    // An admin registration of a small-order key.
    refused(
        &run(
            "agent-link-relay",
            &[
                "register",
                "--dir",
                d,
                "--instance-id",
                "w",
                "--public-key",
                WEAK_KEY,
            ],
        ),
        2,
        &["--public-key", "weak"],
        "register a weak key",
    );
    let listed = run("agent-link-relay", &["instances", "--dir", d, "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(WEAK_KEY));
    // run: a fleet secret readable by others, then a tampered registry.
    let secret = dir.join("fleet.secret");
    chmod(&secret, 0o644);
    let o = run_must_refuse(d);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains(secret.to_str().unwrap()) && stderr(&o).contains("chmod 600"),
        "{}",
        stderr(&o)
    );
    chmod(&secret, 0o600);
    registry_with_weak_key(&dir);
    let o = run_must_refuse(d);
    assert_ne!(o.status.code(), Some(0));
    let registry = dir.join("registry.json");
    assert!(
        stderr(&o).contains(registry.to_str().unwrap()) && stderr(&o).contains("inst-w"),
        "{}",
        stderr(&o)
    );
}

/// A state directory someone else can change is refused, naming the fix:
/// group- or world-writable (another user could point the config at their
/// own relay), or owned by another user (root only can set that up here).
#[test]
fn directories_others_can_change_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // An initialised peer directory made world-writable.
    let dir = peer_dir(&tmp.path().join("open"));
    chmod(&dir, 0o777);
    let d = dir.to_str().unwrap();
    for args in [
        &["whoami", "--dir", d][..],
        &["status", "--dir", d],
        &["send", "--dir", d, "--from", "a", "--to", "x/y", "m"],
    ] {
        refused(
            &run("agent-link", args),
            2,
            &[d, "chmod 700"],
            &format!("{} in a 0777 dir", args[0]),
        );
    }
    // init into an empty directory another user prepared world-writable:
    // refused before anything goes on the wire, nothing written.
    let pre = tmp.path().join("prepared");
    std::fs::create_dir(&pre).unwrap();
    chmod(&pre, 0o777);
    let token = JoinToken {
        addr: "127.0.0.1:9".into(),
        trust: agent_link_proto::RelayTrust::Pinned([3; 32]),
        secret: agent_link_proto::JoinSecret::Fleet(FleetSecret::generate()),
        other_relays: vec![],
    }
    .encode()
    .unwrap();
    let p = pre.to_str().unwrap();
    refused(
        &run(
            "agent-link",
            &["init", "--dir", p, "--instance-id", "i", "--join", &token],
        ),
        2,
        &[p, "chmod 700"],
        "init into a 0777 dir",
    );
    assert_eq!(
        std::fs::read_dir(&pre).unwrap().count(),
        0,
        "nothing written"
    );
    // The relay's state directory, group-writable.
    let rdir = relay_dir(&tmp.path().join("r"));
    chmod(&rdir, 0o770);
    let r = rdir.to_str().unwrap();
    refused(
        &run("agent-link-relay", &["instances", "--dir", r]),
        2,
        &[r, "chmod 700"],
        "relay instances in a 0770 dir",
    );
    // Owned by another user (only root can hand a directory to another uid).
    if std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0) {
        let foreign = peer_dir(&tmp.path().join("foreign"));
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let f = foreign.to_str().unwrap();
        refused(
            &run("agent-link", &["whoami", "--dir", f]),
            2,
            &[f, "uid 65534"],
            "a directory of another user",
        );
    }
}
