//! `agent-link-relay register --batch FILE`, tested with the real binary as a
//! child process: many registrations in one registry write, all or nothing,
//! with the same rules as a single `register` (first key keeps an id, weak
//! keys refused) and errors that name the line.

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use agent_link_crypto::Identity;
use agent_link_tests::{relay_cmd, text};

/// An initialised relay state directory (the relay is not running).
fn relay_dir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = relay_cmd()
        .args(["init", "--dir"])
        .arg(tmp.path().join("relay"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    tmp
}

fn batch(dir: &Path, file: &Path) -> Output {
    relay_cmd()
        .args(["register", "--dir"])
        .arg(dir)
        .arg("--batch")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn batch_stdin(dir: &Path, input: &str) -> Output {
    let mut child = relay_cmd()
        .args(["register", "--dir"])
        .arg(dir)
        .args(["--batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Registered instance ids, from `instances --json`.
fn registered(dir: &Path) -> Vec<String> {
    let out = relay_cmd()
        .args(["instances", "--json", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "instances: {}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    doc["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_string())
        .collect()
}

fn key() -> String {
    Identity::generate().public_key().to_string()
}

/// The identity point: a small-order ("weak") Ed25519 key.
fn weak_key() -> String {
    let mut b = [0u8; 32];
    b[0] = 1;
    hex::encode(b)
}

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn batch_registers_every_line_in_one_go_and_is_idempotent() {
    let tmp = relay_dir();
    let dir = tmp.path().join("relay");
    let lines: Vec<(String, String)> = (0..500).map(|i| (format!("node-{i:04}"), key())).collect();
    let mut body = String::from("# id key\n\n");
    for (id, k) in &lines {
        body.push_str(&format!("{id}  {k}\n"));
    }
    let file = write(tmp.path(), "batch.txt", &body);
    let out = batch(&dir, &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("registered 500 new, 0 already"),
        "{}",
        text(&out.stdout)
    );
    let ids = registered(&dir);
    assert_eq!(ids.len(), 500);
    assert_eq!(ids[0], "node-0000");
    assert_eq!(ids[499], "node-0499");

    // The same file again: nothing new, success (as a repeated `register`).
    let out = batch(&dir, &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("registered 0 new, 500 already"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(registered(&dir).len(), 500);
}

#[test]
fn batch_reads_stdin() {
    let tmp = relay_dir();
    let dir = tmp.path().join("relay");
    let input = format!("a-1 {}\na-2 {}\n", key(), key());
    let out = batch_stdin(&dir, &input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(registered(&dir), ["a-1", "a-2"]);
}

#[test]
fn any_bad_line_registers_nothing_and_names_the_line() {
    let tmp = relay_dir();
    let dir = tmp.path().join("relay");
    let good = format!("ok-1 {}\nok-2 {}\n", key(), key());
    let cases = [
        // (third line, exit code, what the error says)
        (format!("ok-3 {}", weak_key()), 2, "weak"),
        ("ok-3 not-hex".to_string(), 2, "public key"),
        (format!("bad/id {}", key()), 2, "line 3"),
        (
            format!("ok-3 {} extra", key()),
            2,
            "expected `instance_id public_key_hex`",
        ),
        (
            "ok-3".to_string(),
            2,
            "expected `instance_id public_key_hex`",
        ),
        // The same id twice with different keys: the first key keeps it.
        (
            format!("ok-1 {}", key()),
            4,
            "already registered to another key",
        ),
    ];
    for (i, (third, code, says)) in cases.iter().enumerate() {
        let file = write(
            tmp.path(),
            &format!("bad{i}.txt"),
            &format!("{good}{third}\n"),
        );
        let out = batch(&dir, &file);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "case {i}: {err}");
        assert!(err.contains("line 3"), "case {i}: {err}");
        assert!(err.contains(says), "case {i}: {err}");
        assert!(err.contains("nothing registered"), "case {i}: {err}");
        assert!(
            registered(&dir).is_empty(),
            "case {i}: something was written"
        );
    }
    // The same key under two ids is refused too.
    let k = key();
    let file = write(tmp.path(), "twice.txt", &format!("x-1 {k}\nx-2 {k}\n"));
    let out = batch(&dir, &file);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );
    assert!(registered(&dir).is_empty());
}

#[test]
fn batch_respects_existing_registrations() {
    let tmp = relay_dir();
    let dir = tmp.path().join("relay");
    let taken = key();
    let out = relay_cmd()
        .args(["register", "--dir"])
        .arg(&dir)
        .args(["--instance-id", "first", "--public-key", &taken])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // `first` belongs to `taken`: a batch claiming it with another key is
    // refused as a whole.
    let file = write(
        tmp.path(),
        "steal.txt",
        &format!("new-1 {}\nfirst {}\n", key(), key()),
    );
    let out = batch(&dir, &file);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(registered(&dir), ["first"]);
    // Listing `first` with its own key is fine (idempotent).
    let file = write(
        tmp.path(),
        "same.txt",
        &format!("first {taken}\nnew-1 {}\n", key()),
    );
    let out = batch(&dir, &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("registered 1 new, 1 already"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(registered(&dir), ["first", "new-1"]);
}

#[test]
fn batch_usage_errors() {
    let tmp = relay_dir();
    let dir = tmp.path().join("relay");
    let file = write(tmp.path(), "one.txt", &format!("a {}\n", key()));
    // --batch excludes the single-registration flags.
    let out = relay_cmd()
        .args(["register", "--dir"])
        .arg(&dir)
        .arg("--batch")
        .arg(&file)
        .args(["--instance-id", "a"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // Without --batch, the single flags are required.
    let out = relay_cmd()
        .args(["register", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // A missing file.
    let out = batch(&dir, &tmp.path().join("missing.txt"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("missing.txt"),
        "{}",
        text(&out.stderr)
    );
    assert!(registered(&dir).is_empty());
}
