//! What a connection and a stream may do, decided from what the relay knows
//! of the key and from the frames read so far (PROTOCOL.md §4.3, §9.1,
//! §9.2). Pure: the caller reads the frames, looks the key up, reloads the
//! registry when told to, and writes the answers.

use agent_link_crypto::{FleetKey, PublicKey};
use agent_link_proto::{codec, ErrorCode, PeerToRelay};

use crate::registry::KeyStatus;

/// Frames before registration are small; this bounds what an unknown key
/// can make the relay buffer (PROTOCOL.md §9.1).
pub const PRE_AUTH_MAX_FRAME: usize = 1024;

/// QUIC connection receive window until a connection is admitted as a
/// member (PROTOCOL.md §9.1): room for a `Register` frame and then some,
/// so an unknown key can make the relay buffer at most this much over all
/// its streams. Admission raises it to `receive_window`.
/// (The per-stream window, `stream_receive_window`, goes out in the
/// handshake's transport parameters before the key is known and quinn
/// cannot change it afterwards; the connection window bounds the total.)
pub const PRE_ADMISSION_RECEIVE_WINDOW: u32 = 16 << 10;
// The window must hold a maximal pre-auth frame (and its length prefix)
// several times over, or a `Register` could stall before admission.
const _: () = assert!(PRE_ADMISSION_RECEIVE_WINDOW as usize >= 4 * (PRE_AUTH_MAX_FRAME + 4));

/// What a connection whose handshake presented a key may do (PROTOCOL.md
/// §9.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Serve this registered instance.
    Serve(String),
    /// Close the connection with `code` (a revoked key).
    Refuse {
        /// The instance the key was registered as.
        instance: String,
        /// Why.
        code: ErrorCode,
    },
    /// The key is unknown: reload the registry (an operator may have just
    /// run `agent-link-relay register`) and decide again with `reloaded`.
    LookAgain,
    /// Still unknown after a reload: the connection may register, on its
    /// first stream, and nothing else.
    RegisterOnly,
}

/// Decide on a key's registry status; `reloaded` says whether the registry
/// was already re-read for this key.
pub fn admit(status: KeyStatus, reloaded: bool) -> Admission {
    match status {
        KeyStatus::Active(id) => Admission::Serve(id),
        KeyStatus::Revoked(instance) => Admission::Refuse {
            instance,
            code: ErrorCode::Revoked,
        },
        KeyStatus::Unknown if reloaded => Admission::RegisterOnly,
        KeyStatus::Unknown => Admission::LookAgain,
    }
}

/// What a stream of a registered connection is, by its first frame
/// (PROTOCOL.md §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstFrame<'f> {
    /// An agent stream for a valid agent id.
    Agent {
        /// The agent attached on this stream.
        agent: &'f str,
        /// Whether the stream takes the agent's deliveries.
        receive: bool,
    },
    /// A control stream; the first frame is its first request.
    Control,
    /// Answer `Error{code}` and end the stream.
    Refuse(ErrorCode),
}

/// Classify a stream by its first frame's body.
pub fn first_frame(body: &[u8]) -> FirstFrame<'_> {
    match codec::decode::<PeerToRelay>(body) {
        Ok(PeerToRelay::Attach { agent, receive }) => match agent_link_proto::check_id(agent) {
            Ok(()) => FirstFrame::Agent { agent, receive },
            Err(_) => FirstFrame::Refuse(ErrorCode::BadAddress),
        },
        Ok(
            PeerToRelay::StatusRequest
            | PeerToRelay::StatusPageRequest { .. }
            | PeerToRelay::Register { .. }
            | PeerToRelay::RegisterInvite { .. },
        ) => FirstFrame::Control,
        Ok(_) => FirstFrame::Refuse(ErrorCode::NotAttached),
        Err(_) => FirstFrame::Refuse(ErrorCode::Malformed),
    }
}

/// Which secret keys a registration's proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// `Register`: the fleet secret (open registration only).
    Fleet,
    /// `RegisterInvite`: the single-use invite's own secret.
    Invite,
}

/// A `Register` or `RegisterInvite` request, not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration<'f> {
    /// The id asked for.
    pub instance_id: &'f str,
    /// Its human-readable name.
    pub name: &'f str,
    /// The proof over the TLS exporter, key and id (PROTOCOL.md §5.3).
    pub proof: [u8; 32],
    /// The secret the proof is keyed with.
    pub via: Via,
}

fn as_registration<'f>(frame: &PeerToRelay<'f>) -> Option<Registration<'f>> {
    match *frame {
        PeerToRelay::Register {
            instance_id,
            name,
            proof,
        } => Some(Registration {
            instance_id,
            name,
            proof,
            via: Via::Fleet,
        }),
        PeerToRelay::RegisterInvite {
            instance_id,
            name,
            proof,
        } => Some(Registration {
            instance_id,
            name,
            proof,
            via: Via::Invite,
        }),
        _ => None,
    }
}

/// The first frame of an unknown key's only stream: it must be `Register`
/// or `RegisterInvite` (`NotRegistered` otherwise, `Malformed` if it does
/// not decode).
pub fn registration(body: &[u8]) -> Result<Registration<'_>, ErrorCode> {
    match codec::decode::<PeerToRelay>(body) {
        Ok(f) => as_registration(&f).ok_or(ErrorCode::NotRegistered),
        Err(_) => Err(ErrorCode::Malformed),
    }
}

/// Decide whether a registration may go on to the registry, in the order
/// that makes refusals cheapest and keeps strangers from spending what
/// members need:
/// 1. `Register` by fleet secret only where the relay allows open
///    registration (`open`), unless the key already holds that very id
///    (`already`: a member repeating its own registration changes nothing);
///    `RegistrationClosed`;
/// 2. the proof (`proof_ok`, checked by the caller in memory: the fleet
///    key, or the pending invite's secret): `BadProof` / `InviteInvalid`;
/// 3. only then, for a registration that would write the registry, a token
///    of the relay-wide registration bucket (`take_token`), so requests
///    without a valid proof (anyone can send them) never use up the
///    tokens invited members need; `RegistrationClosed` when empty.
pub fn may_register(
    reg: &Registration<'_>,
    open: bool,
    already: bool,
    proof_ok: bool,
    take_token: impl FnOnce() -> bool,
) -> Result<(), ErrorCode> {
    if reg.via == Via::Fleet && !open && !already {
        return Err(ErrorCode::RegistrationClosed);
    }
    if !proof_ok {
        return Err(match reg.via {
            Via::Fleet => ErrorCode::BadProof,
            Via::Invite => ErrorCode::InviteInvalid,
        });
    }
    if !already && !take_token() {
        return Err(ErrorCode::RegistrationClosed);
    }
    Ok(())
}

/// A request on a registered connection's control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest<'f> {
    /// `StatusRequest`.
    Status,
    /// `StatusPageRequest{start}`.
    StatusPage {
        /// The first instance of the page.
        start: u32,
    },
    /// `Register` for the connection's own instance (idempotent).
    Register(Registration<'f>),
}

/// Decode a control-stream frame of a connection serving `instance`: only
/// `StatusRequest` and `Register` for `instance` itself (`InstanceIdTaken`
/// for another id); anything else is `Malformed`.
pub fn control_request<'f>(
    body: &'f [u8],
    instance: &str,
) -> Result<ControlRequest<'f>, ErrorCode> {
    match codec::decode::<PeerToRelay>(body) {
        Ok(PeerToRelay::StatusRequest) => Ok(ControlRequest::Status),
        Ok(PeerToRelay::StatusPageRequest { start }) => Ok(ControlRequest::StatusPage { start }),
        Ok(f) => match as_registration(&f) {
            Some(reg) if reg.instance_id != instance => Err(ErrorCode::InstanceIdTaken),
            Some(reg) => Ok(ControlRequest::Register(reg)),
            None => Err(ErrorCode::Malformed),
        },
        _ => Err(ErrorCode::Malformed),
    }
}

/// Check a fleet-secret registration before it is recorded (PROTOCOL.md
/// §9.2): the id (`BadAddress`), then the proof (`BadProof`). (An invite's
/// proof is checked against that invite's secret by the registry, in the
/// same locked change that uses the invite up.) The proof is bound to this
/// TLS session (`exporter`, `None` if the session could not export one:
/// `Internal`) and this key, so a captured proof cannot register another key
/// or be replayed elsewhere.
pub fn check_registration(
    reg: &Registration<'_>,
    key: &PublicKey,
    fleet: &FleetKey,
    exporter: Option<[u8; 32]>,
) -> Result<(), ErrorCode> {
    agent_link_proto::check_id(reg.instance_id).map_err(|_| ErrorCode::BadAddress)?;
    let exporter = exporter.ok_or(ErrorCode::Internal)?;
    agent_link_proto::check_register_proof(fleet, &exporter, key, reg.instance_id, &reg.proof)
        .map_err(|_| ErrorCode::BadProof)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_link_crypto::{FleetSecret, Identity};
    use agent_link_proto::{Address, Receipt};

    fn body(f: &PeerToRelay<'_>) -> Vec<u8> {
        codec::encode_body(f).unwrap()
    }

    #[test]
    fn a_key_is_served_refused_or_looked_up_again_then_register_only() {
        let cases = [
            (
                KeyStatus::Active("i1".into()),
                false,
                Admission::Serve("i1".into()),
            ),
            (
                KeyStatus::Active("i1".into()),
                true,
                Admission::Serve("i1".into()),
            ),
            (
                KeyStatus::Revoked("i1".into()),
                false,
                Admission::Refuse {
                    instance: "i1".into(),
                    code: ErrorCode::Revoked,
                },
            ),
            (KeyStatus::Unknown, false, Admission::LookAgain),
            (KeyStatus::Unknown, true, Admission::RegisterOnly),
        ];
        for (status, reloaded, want) in cases {
            assert_eq!(
                admit(status.clone(), reloaded),
                want,
                "{status:?} {reloaded}"
            );
        }
    }

    #[test]
    fn a_first_frame_makes_an_agent_or_control_stream_or_is_refused() {
        let receipt = Receipt {
            id: [1; 16],
            from: Address {
                instance: "i1",
                agent: "a",
            },
            delivered_at_ms: 5,
        };
        let attach = body(&PeerToRelay::Attach {
            agent: "bob",
            receive: true,
        });
        let mut trailing = attach.clone();
        trailing.push(0);
        let cases: Vec<(&str, Vec<u8>, FirstFrame<'_>)> = vec![
            (
                "attach",
                attach.clone(),
                FirstFrame::Agent {
                    agent: "bob",
                    receive: true,
                },
            ),
            (
                "send-only attach",
                body(&PeerToRelay::Attach {
                    agent: "bob",
                    receive: false,
                }),
                FirstFrame::Agent {
                    agent: "bob",
                    receive: false,
                },
            ),
            (
                "bad agent id",
                body(&PeerToRelay::Attach {
                    agent: "bo/b",
                    receive: true,
                }),
                FirstFrame::Refuse(ErrorCode::BadAddress),
            ),
            (
                "status",
                body(&PeerToRelay::StatusRequest),
                FirstFrame::Control,
            ),
            (
                "register",
                body(&PeerToRelay::Register {
                    instance_id: "i1",
                    name: "n",
                    proof: [0; 32],
                }),
                FirstFrame::Control,
            ),
            (
                "ack first",
                body(&PeerToRelay::Ack {
                    reply_token: 1,
                    receipt,
                }),
                FirstFrame::Refuse(ErrorCode::NotAttached),
            ),
            (
                "detach first",
                body(&PeerToRelay::Detach),
                FirstFrame::Refuse(ErrorCode::NotAttached),
            ),
            (
                "trailing byte",
                trailing,
                FirstFrame::Refuse(ErrorCode::Malformed),
            ),
            (
                "unknown tag",
                vec![0x7f],
                FirstFrame::Refuse(ErrorCode::Malformed),
            ),
            ("empty", vec![], FirstFrame::Refuse(ErrorCode::Malformed)),
        ];
        for (case, bytes, want) in &cases {
            assert_eq!(&first_frame(bytes), want, "{case}");
        }
    }

    #[test]
    fn an_unknown_key_may_only_register() {
        let register = body(&PeerToRelay::Register {
            instance_id: "i1",
            name: "n",
            proof: [3; 32],
        });
        assert_eq!(
            registration(&register),
            Ok(Registration {
                instance_id: "i1",
                name: "n",
                proof: [3; 32],
                via: Via::Fleet,
            })
        );
        let invite = body(&PeerToRelay::RegisterInvite {
            instance_id: "i1",
            name: "n",
            proof: [3; 32],
        });
        assert_eq!(
            registration(&invite),
            Ok(Registration {
                instance_id: "i1",
                name: "n",
                proof: [3; 32],
                via: Via::Invite,
            })
        );
        let status = body(&PeerToRelay::StatusRequest);
        assert_eq!(registration(&status), Err(ErrorCode::NotRegistered));
        let attach = body(&PeerToRelay::Attach {
            agent: "a",
            receive: true,
        });
        assert_eq!(registration(&attach), Err(ErrorCode::NotRegistered));
        assert_eq!(registration(&[0x7f, 1]), Err(ErrorCode::Malformed));
    }

    #[test]
    fn the_fleet_secret_registers_only_where_open_and_only_a_valid_proof_takes_a_token() {
        let reg = |via| Registration {
            instance_id: "i1",
            name: "n",
            proof: [0; 32],
            via,
        };
        let closed = Err(ErrorCode::RegistrationClosed);
        let asked = std::cell::Cell::new(0);
        let spy = |answer: bool| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                answer
            }
        };
        // Invites-only relay: the fleet secret is refused, whatever the
        // proof; a member repeating its own registration is not.
        assert_eq!(
            may_register(&reg(Via::Fleet), false, false, true, spy(true)),
            closed
        );
        assert_eq!(
            may_register(&reg(Via::Fleet), false, true, true, spy(false)),
            Ok(())
        );
        // A bad proof is refused by name and spends no token.
        assert_eq!(
            may_register(&reg(Via::Invite), false, false, false, spy(true)),
            Err(ErrorCode::InviteInvalid)
        );
        assert_eq!(
            may_register(&reg(Via::Fleet), true, false, false, spy(true)),
            Err(ErrorCode::BadProof)
        );
        assert_eq!(asked.get(), 0, "refused requests spend no token");
        assert_eq!(
            may_register(&reg(Via::Invite), false, false, true, spy(true)),
            Ok(())
        );
        assert_eq!(
            may_register(&reg(Via::Fleet), true, false, true, spy(true)),
            Ok(())
        );
        // Over the cap: refused, whichever secret.
        assert_eq!(
            may_register(&reg(Via::Invite), false, false, true, spy(false)),
            closed
        );
        assert_eq!(
            may_register(&reg(Via::Fleet), true, false, true, spy(false)),
            closed
        );
        assert_eq!(asked.get(), 4);
    }

    #[test]
    fn a_control_stream_takes_status_and_its_own_registration_only() {
        let status = body(&PeerToRelay::StatusRequest);
        assert_eq!(control_request(&status, "i1"), Ok(ControlRequest::Status));
        let page = body(&PeerToRelay::StatusPageRequest { start: 7 });
        assert_eq!(
            control_request(&page, "i1"),
            Ok(ControlRequest::StatusPage { start: 7 })
        );
        assert_eq!(first_frame(&page), FirstFrame::Control);
        // A reserved tag does not decode.
        assert_eq!(first_frame(&[7]), FirstFrame::Refuse(ErrorCode::Malformed));
        let own = body(&PeerToRelay::Register {
            instance_id: "i1",
            name: "n",
            proof: [0; 32],
        });
        assert!(matches!(
            control_request(&own, "i1"),
            Ok(ControlRequest::Register(_))
        ));
        let other = body(&PeerToRelay::Register {
            instance_id: "i2",
            name: "n",
            proof: [0; 32],
        });
        assert_eq!(
            control_request(&other, "i1"),
            Err(ErrorCode::InstanceIdTaken)
        );
        let attach = body(&PeerToRelay::Attach {
            agent: "a",
            receive: true,
        });
        assert_eq!(control_request(&attach, "i1"), Err(ErrorCode::Malformed));
        assert_eq!(control_request(&[0xff], "i1"), Err(ErrorCode::Malformed));
    }

    #[test]
    fn a_registration_needs_a_valid_id_a_session_and_a_proof_for_both() {
        let fleet = FleetSecret::generate().key();
        let key = Identity::generate().public_key();
        let exporter = [9u8; 32];
        let proof = agent_link_proto::register_proof(&fleet, &exporter, &key, "i1");
        let good = Registration {
            instance_id: "i1",
            name: "n",
            proof,
            via: Via::Fleet,
        };
        assert_eq!(
            check_registration(&good, &key, &fleet, Some(exporter)),
            Ok(())
        );
        let bad_id = Registration {
            instance_id: "i/1",
            ..good.clone()
        };
        assert_eq!(
            check_registration(&bad_id, &key, &fleet, None),
            Err(ErrorCode::BadAddress),
            "the id is checked first"
        );
        assert_eq!(
            check_registration(&good, &key, &fleet, None),
            Err(ErrorCode::Internal)
        );
        // Another session, another key, another id: the proof does not carry over.
        assert_eq!(
            check_registration(&good, &key, &fleet, Some([8; 32])),
            Err(ErrorCode::BadProof)
        );
        let other_key = Identity::generate().public_key();
        assert_eq!(
            check_registration(&good, &other_key, &fleet, Some(exporter)),
            Err(ErrorCode::BadProof)
        );
        let other_id = Registration {
            instance_id: "i2",
            ..good
        };
        assert_eq!(
            check_registration(&other_id, &key, &fleet, Some(exporter)),
            Err(ErrorCode::BadProof)
        );
    }
}
