#!/usr/bin/env python3
"""Rebuild every golden vector in this directory from PROTOCOL.md alone.

A second, independent implementation of the wire format (bincode varints,
frames, envelope tag and signature, registration proof, join token), written
from the document and not from the Rust code. If it and `proto/tests/golden.rs`
both pass, the document is precise enough to interoperate.

    pip install cryptography && python3 tests/vectors/rebuild_from_spec.py
"""
import base64
import hashlib
import hmac
import pathlib
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives import serialization
V = pathlib.Path(__file__).resolve().parent
def h(n): return V.joinpath(n + '.hex').read_text().strip()
def varint(n):
    if n < 251: return bytes([n])
    if n <= 0xffff: return b'\xfb' + struct.pack('<H', n)
    if n <= 0xffffffff: return b'\xfc' + struct.pack('<I', n)
    return b'\xfd' + struct.pack('<Q', n)
def bs(b): return varint(len(b)) + b
def s(t): return bs(t.encode())
def addr(i, a): return s(i) + s(a)
def frame(body): return struct.pack('>I', len(body)) + body
sk = Ed25519PrivateKey.from_private_bytes(bytes([1]*32))
pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
assert pk.hex() == h('public_key')
fleet = bytes([2]*32); ID = bytes([0x11]*16); T = 1_700_000_000_000
body = bytes([1]) + ID + addr('instance-002','healthguard') + addr('instance-001','xiaobaozi') + varint(T) + bs(b'hi')
assert body.hex() == h('envelope_body')
tag = hmac.new(fleet, b'agent-link/1 envelope tag\0' + body, hashlib.sha256).digest()
sig = sk.sign(b'agent-link/1 envelope signature\0' + body)
env = bs(body) + tag + sig
assert env.hex() == h('envelope'), 'envelope'
proof = hmac.new(fleet, b'agent-link/1 register proof\0' + bytes([4]*32) + pk + b'instance-001', hashlib.sha256).digest()
assert proof.hex() == h('register_proof')
receipt_peer = ID + addr('instance-001','xiaobaozi') + varint(T+1)
st = s('instance-001') + s('one') + bytes([6]*32) + b'\x01' + varint(1) + s('xiaobaozi')
want = {
 'frame_register': varint(0) + s('instance-001') + s('one') + bytes([5]*32),
 'frame_status_request': varint(1),
 'frame_attach': varint(2) + s('xiaobaozi') + b'\x01',
 'frame_send': varint(3) + bs(env),
 'frame_ack': varint(4) + varint(300) + receipt_peer,
 'frame_nack': varint(5) + varint(300) + ID + varint(18),
 'frame_detach': varint(6),
 'frame_register_invite': varint(7) + s('instance-001') + s('one') + bytes([5]*32),
 'frame_status_page_request': varint(8) + varint(300),
 'frame_registered': varint(0) + s('instance-001'),
 'frame_status': varint(1) + st + varint(1) + st,
 'frame_attached': varint(2) + s('xiaobaozi') + varint(1<<20) + varint(60000),
 'frame_deliver': varint(3) + varint(300) + bytes([6]*32) + bs(env),
 'frame_receipt': varint(4) + receipt_peer,
 'frame_failed': varint(5) + ID + varint(10),
 'frame_error': varint(6) + varint(2),
 'frame_detached': varint(7),
 'frame_fleet_secret': varint(8) + fleet + varint(T + 86_400_000),
 'frame_status_page': varint(9) + st + varint(7) + varint(0) + varint(1) + varint(1) + st,
}
for k, b in want.items():
    assert frame(b).hex() == h(k), k
tok = b'al1' + base64.urlsafe_b64encode(b'\x01' + s('127.0.0.1:8765') + bytes([3]*32) + fleet).rstrip(b'=')
assert tok.hex() == h('join_token')
invite = bytes([7]*32)
tok = b'al1' + base64.urlsafe_b64encode(b'\x02' + s('127.0.0.1:8765') + bytes([3]*32) + s('instance-001') + invite).rstrip(b'=')
assert tok.hex() == h('join_token_invite')
relays = varint(3) + s('127.0.0.1:8765') + bytes([3]*32) + s('127.0.0.1:8766') + bytes([5]*32) + s('relay-3.example:443') + bytes([6]*32)
tok = b'al1' + base64.urlsafe_b64encode(b'\x04' + relays + s('instance-001') + invite).rstrip(b'=')
assert tok.hex() == h('join_token_fleet_invite')
# Version 6: relays as (addr, trust), trust an enum: 1 = Ca, 0 = Pinned(fingerprint).
relays = varint(2) + s('relay.example.org:4433') + varint(1) + s('127.0.0.1:8766') + varint(0) + bytes([5]*32)
tok = b'al1' + base64.urlsafe_b64encode(b'\x06' + relays + s('instance-001') + invite).rstrip(b'=')
assert tok.hex() == h('join_token_ca_invite')
proof = hmac.new(invite, b'agent-link/1 invite proof\0' + bytes([4]*32) + pk + b'instance-001', hashlib.sha256).digest()
assert proof.hex() == h('invite_proof')
print('all', 4 + len(want) + 5, 'vectors rebuilt independently')
