//! PROTOCOL.md §2 states how bincode 2.0.1 (`codec::CONFIG`) lays out each
//! type. These tests hold the real encoder to every one of those claims, so a
//! dependency bump or a config change that moves a byte fails here, with the
//! rule's name, before it reaches a peer written in another language.

use agent_link_proto::{codec, ErrorCode};
use bincode::{Decode, Encode};

fn enc<T: Encode>(v: &T) -> String {
    hex::encode(codec::encode_body(v).unwrap())
}

fn dec<T: bincode::BorrowDecode<'static, ()>>(
    hex_body: &str,
) -> Result<T, agent_link_proto::ProtoError> {
    let bytes: &'static [u8] = Box::leak(hex::decode(hex_body).unwrap().into_boxed_slice());
    codec::decode::<T>(bytes)
}

#[test]
fn varint_u64_boundaries() {
    // < 251: the value itself, one byte.
    assert_eq!(enc(&0u64), "00");
    assert_eq!(enc(&250u64), "fa");
    // 251 ..= u16::MAX: 0xfb then u16 little-endian.
    assert_eq!(enc(&251u64), "fbfb00");
    assert_eq!(enc(&300u64), "fb2c01");
    assert_eq!(enc(&0xffffu64), "fbffff");
    // ..= u32::MAX: 0xfc then u32 little-endian.
    assert_eq!(enc(&0x1_0000u64), "fc00000100");
    assert_eq!(enc(&0xffff_ffffu64), "fcffffffff");
    // beyond: 0xfd then u64 little-endian.
    assert_eq!(enc(&0x1_0000_0000u64), "fd0000000001000000");
    assert_eq!(enc(&u64::MAX), "fdffffffffffffffff");
    assert_eq!(enc(&1_700_000_000_000u64), "fd0068e5cf8b010000");
}

#[test]
fn varint_u32_and_u16_follow_the_same_rule() {
    assert_eq!(enc(&250u32), "fa");
    assert_eq!(enc(&251u32), "fbfb00");
    assert_eq!(enc(&(1u32 << 20)), "fc00001000");
    assert_eq!(enc(&u32::MAX), "fcffffffff");
    assert_eq!(enc(&251u16), "fbfb00");
}

#[test]
fn u8_is_one_raw_byte_not_a_varint() {
    assert_eq!(enc(&250u8), "fa");
    assert_eq!(enc(&251u8), "fb");
    assert_eq!(enc(&255u8), "ff");
}

#[test]
fn varint_decoding_rules() {
    // Non-minimal forms are accepted (why tags and signatures cover the
    // received bytes, never a re-encoding).
    assert_eq!(dec::<u64>("fb0500").unwrap(), 5);
    assert_eq!(dec::<u64>("fc05000000").unwrap(), 5);
    assert_eq!(dec::<u64>("fd0500000000000000").unwrap(), 5);
    // A marker wider than the target type is refused.
    assert!(dec::<u32>("fd0500000000000000").is_err());
    assert!(dec::<u16>("fc05000000").is_err());
    // 0xfe (u128 marker) and 0xff are refused for u64/u32.
    assert!(dec::<u64>("fe05000000000000000000000000000000").is_err());
    assert!(dec::<u64>("ff").is_err());
    assert!(dec::<u32>("fe").is_err());
    // Truncated wide forms are refused.
    assert!(dec::<u64>("fb05").is_err());
}

#[test]
fn bool_is_one_byte_zero_or_one() {
    assert_eq!(enc(&false), "00");
    assert_eq!(enc(&true), "01");
    assert!(!dec::<bool>("00").unwrap());
    assert!(dec::<bool>("01").unwrap());
    assert!(dec::<bool>("02").is_err(), "any other byte is refused");
}

#[test]
fn byte_and_str_slices_are_varint_length_then_bytes() {
    assert_eq!(enc(&&b""[..]), "00");
    assert_eq!(enc(&&b"hi"[..]), "026869");
    assert_eq!(enc(&"hi"), "026869");
    assert_eq!(enc(&"hi".to_string()), "026869");
    let long = vec![0xabu8; 251];
    assert_eq!(enc(&long.as_slice()), format!("fbfb00{}", "ab".repeat(251)));
    assert_eq!(dec::<&str>("026869").unwrap(), "hi");
    assert!(dec::<&str>("02ff69").is_err(), "str must be UTF-8");
    assert!(dec::<&[u8]>("036869").is_err(), "length past the end");
}

#[test]
fn fixed_arrays_are_raw_bytes_without_length() {
    assert_eq!(enc(&[0x11u8; 4]), "11111111");
    assert_eq!(enc(&[7u8; 16]), "07".repeat(16));
}

#[test]
fn vec_is_varint_count_then_items() {
    assert_eq!(enc(&Vec::<String>::new()), "00");
    assert_eq!(
        enc(&vec!["a".to_string(), "bc".to_string()]),
        "0201610262 63".replace(' ', "")
    );
    assert_eq!(enc(&vec![300u64, 1]), "02fb2c0101");
}

#[test]
fn option_is_a_tag_byte_then_the_value() {
    assert_eq!(enc(&None::<u64>), "00");
    assert_eq!(enc(&Some(300u64)), "01fb2c01");
    assert!(dec::<Option<u8>>("02").is_err());
}

#[derive(Encode, Decode, Debug, PartialEq)]
enum Sample {
    A,
    B(u8),
    C { x: u64, y: bool },
}

#[derive(Encode, Decode, Debug, PartialEq)]
enum Wide {
    V0,
    V1,
    V2,
    V3,
    V4,
    V5,
    V6,
    V7,
    V8,
    V9,
    V10,
    V11,
    V12,
    V13,
    V14,
    V15,
}

#[test]
fn enums_are_varint_u32_variant_index_then_fields() {
    assert_eq!(enc(&Sample::A), "00");
    assert_eq!(enc(&Sample::B(9)), "0109");
    assert_eq!(enc(&Sample::C { x: 300, y: true }), "02fb2c0101");
    assert!(dec::<Sample>("03").is_err(), "unknown variant index");
    // The index is a varint u32, so a non-minimal form decodes too.
    assert_eq!(dec::<Sample>("fb0000").unwrap(), Sample::A);
    assert_eq!(enc(&Wide::V15), "0f");
    // The error code enum is encoded the same way.
    assert_eq!(enc(&ErrorCode::TooManyConnections), "17");
}

#[derive(Encode, Decode)]
struct Pair {
    a: u8,
    b: u64,
    c: [u8; 2],
}

#[test]
fn structs_are_fields_in_order_with_nothing_between() {
    assert_eq!(
        enc(&Pair {
            a: 1,
            b: 251,
            c: [2, 3]
        }),
        "01fbfb000203"
    );
}

#[test]
fn decode_refuses_trailing_bytes_and_oversized_claims() {
    assert!(matches!(
        dec::<u8>("0100"),
        Err(agent_link_proto::ProtoError::TrailingBytes { extra: 1 })
    ));
    // A declared length over the 16 MiB limit is refused before reading.
    let over = (codec::HARD_MAX_FRAME as u64) + 1;
    let body = format!("fd{}", hex::encode(over.to_le_bytes()));
    assert!(dec::<&[u8]>(&body).is_err());
}
