//! Arbitrary bytes as the first frame of an unknown key's only stream
//! (PROTOCOL.md §9.1, §9.2), decided as the relay decides it, under fixed
//! keys and a fixed TLS exporter output (the seeds are valid registrations
//! under them, so mutations reach the proof checks). No panic; a
//! fleet-secret proof passes only when it is exactly the proof for this
//! session, key and id; an invite is redeemed only for its own id, only with
//! the proof of its own secret, and only once.
#![no_main]
use agent_link_crypto::{FleetSecret, Identity};
use agent_link_relay::core::admission::{self, Via};
use agent_link_relay::registry::Registry;
use libfuzzer_sys::fuzz_target;

const INVITED: &str = "instance-001";

fuzz_target!(|data: &[u8]| {
    let fleet = FleetSecret::from_bytes([2; 32]).key();
    let key = Identity::from_seed(&[1; 32]).public_key();
    let exporter = [4u8; 32];
    let Ok(reg) = admission::registration(data) else {
        return;
    };
    match reg.via {
        Via::Fleet => {
            let ok = admission::check_registration(&reg, &key, &fleet, Some(exporter)).is_ok();
            let want = agent_link_proto::register_proof(&fleet, &exporter, &key, reg.instance_id);
            let valid_id = agent_link_proto::check_id(reg.instance_id).is_ok();
            assert_eq!(ok, valid_id && reg.proof == want, "fleet proof verdict");
        }
        Via::Invite => {
            let invite = [7u8; 32];
            let hex: String = invite.iter().map(|b| format!("{b:02x}")).collect();
            let mut r = Registry::default();
            r.add_invite(INVITED, hex, u64::MAX, 0).expect("a fresh id");
            let (id, proof) = (reg.instance_id, reg.proof);
            let check = |s: &[u8; 32]| {
                let k = FleetSecret::from_bytes(*s).key();
                agent_link_proto::check_invite_proof(&k, &exporter, &key, id, &proof).is_ok()
            };
            let got = r.redeem_invite(id, &key, reg.name, 1, check);
            let want = agent_link_proto::invite_proof(
                &FleetSecret::from_bytes(invite).key(),
                &exporter,
                &key,
                INVITED,
            );
            assert_eq!(
                got.is_ok(),
                id == INVITED && proof == want,
                "invite verdict"
            );
            if got.is_ok() {
                assert!(r.invites().is_empty(), "used up");
                let other = Identity::from_seed(&[3; 32]).public_key();
                assert!(
                    r.redeem_invite(id, &other, "x", 1, |_| true).is_err(),
                    "a used invite registers nobody else"
                );
            }
        }
    }
});
