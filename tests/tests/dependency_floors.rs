//! Cargo.lock must not go below versions with known remote advisories:
//! quinn-proto >= 0.11.17 and rustls >= 0.23.45 (remote panic / memory
//! exhaustion below those; 0.11.16 and 0.11.17 of quinn-proto fixed more
//! memory-exhaustion advisories, per the 2026-12-01 security review), and bincode exactly 2.0.1 (3.0.0 is a tombstone;
//! the wire format is written against 2.0.1's encoding).

fn locked_versions(name: &str) -> Vec<Vec<u64>> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("Cargo.lock at the workspace root");
    let mut out = Vec::new();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{name}\"") {
            let v = lines.next().expect("version line");
            let v = v.trim().trim_start_matches("version = ").trim_matches('"');
            out.push(
                v.split(['.', '-', '+'])
                    .take(3)
                    .map(|p| p.parse().expect("numeric version"))
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn quinn_proto_and_rustls_are_above_advisory_floors() {
    for (name, floor) in [
        ("quinn-proto", vec![0, 11, 17]),
        ("rustls", vec![0, 23, 45]),
    ] {
        let versions = locked_versions(name);
        assert!(!versions.is_empty(), "{name} not in Cargo.lock");
        for v in versions {
            assert!(v >= floor, "{name} {v:?} is below the floor {floor:?}");
        }
    }
}

#[test]
fn bincode_is_pinned_to_2_0_1() {
    assert_eq!(locked_versions("bincode"), vec![vec![2, 0, 1]]);
}
