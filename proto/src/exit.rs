//! The exit codes of both command-line programs (DESIGN.md, "Command-line
//! contract"): one enum, so neither binary spells them as literals.

use crate::ErrorCode;

/// How a command ended, as its process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: any other failure (I/O, the relay going away, `Busy`, …).
    Other = 1,
    /// 2: bad usage or input (flags, ids, files, a message too large).
    Usage = 2,
    /// 3: the target is offline or unknown.
    Offline = 3,
    /// 4: refused (not registered, revoked, id taken, bad signature or tag).
    Refused = 4,
    /// 5: timed out; the outcome is unknown.
    Timeout = 5,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<ErrorCode> for Exit {
    fn from(code: ErrorCode) -> Self {
        use ErrorCode::*;
        match code {
            TargetOffline | UnknownTarget | TargetRevoked => Exit::Offline,
            NotRegistered | Revoked | InstanceIdTaken | BadProof | BadTag | BadSignature
            | SenderMismatch | KeyChanged | RegistrationClosed | InviteInvalid => Exit::Refused,
            TooLarge | BadAddress => Exit::Usage,
            _ => Exit::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_map_to_the_contract() {
        assert_eq!(Exit::from(ErrorCode::TargetOffline).code(), 3);
        assert_eq!(Exit::from(ErrorCode::UnknownTarget).code(), 3);
        assert_eq!(Exit::from(ErrorCode::Revoked).code(), 4);
        assert_eq!(Exit::from(ErrorCode::BadSignature).code(), 4);
        assert_eq!(Exit::from(ErrorCode::RegistrationClosed).code(), 4);
        assert_eq!(Exit::from(ErrorCode::InviteInvalid).code(), 4);
        assert_eq!(Exit::from(ErrorCode::TooLarge).code(), 2);
        assert_eq!(Exit::from(ErrorCode::Busy).code(), 1);
        assert_eq!(Exit::from(ErrorCode::InboxFull).code(), 1);
        for c in ErrorCode::ALL {
            assert!((1..=4).contains(&Exit::from(c).code()), "{c:?}");
        }
    }
}
