//! Instance and agent ids (PROTOCOL.md §3.1).

use crate::ProtoError;

/// Longest id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Check an instance or agent id: 1 to 64 characters from `[A-Za-z0-9._-]`,
/// and not `.` or `..`. The restriction keeps ids safe as file names and in
/// logs and shell commands, and keeps `/` free as the address separator.
pub fn check_id(id: &str) -> Result<(), ProtoError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ProtoError::BadId(id.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "instance-001", "health.guard_2", &"x".repeat(64)] {
            check_id(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65), "a\0"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
