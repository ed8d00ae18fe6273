//! TLS identities and verifiers for QUIC.
//!
//! - The relay presents a self-signed certificate made (with rcgen) from its
//!   own Ed25519 key. Instances pin the SHA-256 fingerprint of that exact
//!   certificate, taken from the join token: stricter than a CA chain, and
//!   there is no switch that skips the check.
//! - Each instance presents a self-signed certificate made from its instance
//!   key. TLS 1.3's CertificateVerify proves possession of that key; the relay
//!   then reads the key out of the certificate ([`instance_key_from_cert`]) and
//!   looks it up in its registry. Unknown keys are *not* refused inside the
//!   handshake (that would surface as an opaque TLS alert): the relay admits
//!   them for registration only and refuses everything else with a clear error.
//! - TLS 1.3 only, Ed25519 only, ALPN [`ALPN`], and no early data (0-RTT data
//!   can be replayed by a network attacker).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::identity::{Identity, PublicKey};
use crate::CryptoError;

/// The ALPN protocol id; a different one is refused in the handshake.
pub const ALPN: &[u8] = b"agent-link/1";

/// The TLS server name instances ask for. Authentication does not rest on it
/// (the certificate is pinned), but it must be a valid DNS name.
pub const RELAY_SERVER_NAME: &str = "agent-link-relay";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4); the 32 key
/// bytes follow it.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// SHA-256 of a certificate's DER encoding.
pub type Fingerprint = [u8; 32];

/// A certificate and its private key, ready for rustls.
pub struct TlsIdentity {
    /// The self-signed certificate.
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("fingerprint", &hex::encode(fingerprint(&self.cert)))
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// A self-signed certificate for `identity`'s Ed25519 key, with
    /// `subject_alt_name` as its DNS name.
    pub fn self_signed(identity: &Identity, subject_alt_name: &str) -> Result<Self, CryptoError> {
        let der = identity.pkcs8_der()?;
        let pkcs8 = PrivatePkcs8KeyDer::from(der.to_vec());
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
            .map_err(|e| CryptoError::Tls(format!("loading key into rcgen: {e}")))?;
        let params = rcgen::CertificateParams::new(vec![subject_alt_name.to_string()])
            .map_err(|e| CryptoError::Tls(format!("certificate parameters: {e}")))?;
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| CryptoError::Tls(format!("self-signing certificate: {e}")))?;
        Ok(Self {
            cert: cert.der().clone(),
            key: pkcs8,
        })
    }

    /// Rebuild from a stored certificate (DER) and the identity that owns it.
    /// Fails when the certificate's key is not `identity`'s.
    pub fn from_parts(identity: &Identity, cert_der: Vec<u8>) -> Result<Self, CryptoError> {
        let cert = CertificateDer::from(cert_der);
        let key_in_cert = instance_key_from_cert(&cert)?;
        if key_in_cert != identity.public_key() {
            return Err(CryptoError::Tls(
                "certificate does not belong to this key".into(),
            ));
        }
        let der = identity.pkcs8_der()?;
        Ok(Self {
            cert,
            key: PrivatePkcs8KeyDer::from(der.to_vec()),
        })
    }

    /// SHA-256 fingerprint of the certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint(&self.cert)
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// SHA-256 of `cert`'s DER bytes.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Fingerprint {
    Sha256::digest(cert.as_ref()).into()
}

/// The Ed25519 public key in a certificate. Refuses other key types and
/// small-order keys (a weak key would let anyone impersonate it).
pub fn instance_key_from_cert(cert: &CertificateDer<'_>) -> Result<PublicKey, CryptoError> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| CryptoError::Tls(format!("unparseable certificate: {e}")))?;
    let spki = parsed.subject_public_key_info();
    let spki = spki.as_ref();
    if spki.len() != ED25519_SPKI_PREFIX.len() + 32 || !spki.starts_with(&ED25519_SPKI_PREFIX) {
        return Err(CryptoError::Tls("certificate key is not Ed25519".into()));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&spki[ED25519_SPKI_PREFIX.len()..]);
    PublicKey::from_bytes_checked(key)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls(e: rustls::Error) -> CryptoError {
    CryptoError::Tls(e.to_string())
}

/// The relay's rustls configuration: TLS 1.3, ALPN `agent-link/1`, client
/// certificates mandatory (Ed25519), early data off.
pub fn relay_server_config(identity: &TlsIdentity) -> Result<rustls::ServerConfig, CryptoError> {
    let provider = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(InstanceCertVerifier { provider }))
        .with_single_cert(vec![identity.cert.clone()], identity.key_der())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data is replayable by anyone on the path: never accept it.
    cfg.max_early_data_size = 0;
    cfg.send_half_rtt_data = false;
    Ok(cfg)
}

/// An instance's rustls configuration: pins the relay certificate's
/// fingerprint, presents the instance certificate, TLS 1.3, ALPN, no early data.
pub fn instance_client_config(
    identity: &TlsIdentity,
    relay_fingerprint: Fingerprint,
) -> Result<rustls::ClientConfig, CryptoError> {
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        // "dangerous" only in rustls' vocabulary: it replaces CA validation
        // with an exact pin of the relay's certificate, which is stricter.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedRelayVerifier {
            fingerprint: relay_fingerprint,
            provider,
        }))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key_der())
        .map_err(tls)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(cfg)
}

fn verify_ed25519_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Pins the relay certificate by SHA-256 fingerprint.
#[derive(Debug)]
struct PinnedRelayVerifier {
    fingerprint: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedRelayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Fingerprints are public values; a plain comparison leaks nothing.
        if fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is disabled in the config; refuse if ever reached.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Accepts any client certificate that carries a strong Ed25519 key; the
/// handshake signature proves possession. Registry decisions happen after the
/// handshake (see the module docs).
#[derive(Debug)]
struct InstanceCertVerifier {
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for InstanceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        instance_key_from_cert(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let id = Identity::generate();
        let tls_id = TlsIdentity::self_signed(&id, RELAY_SERVER_NAME).unwrap();
        assert_eq!(
            instance_key_from_cert(&tls_id.cert).unwrap(),
            id.public_key()
        );
        let again = TlsIdentity::from_parts(&id, tls_id.cert.to_vec()).unwrap();
        assert_eq!(again.fingerprint(), tls_id.fingerprint());
        assert!(TlsIdentity::from_parts(&Identity::generate(), tls_id.cert.to_vec()).is_err());
    }

    #[test]
    fn configs_build_without_early_data() {
        let relay = TlsIdentity::self_signed(&Identity::generate(), RELAY_SERVER_NAME).unwrap();
        let inst = TlsIdentity::self_signed(&Identity::generate(), "instance").unwrap();
        let s = relay_server_config(&relay).unwrap();
        assert_eq!(s.max_early_data_size, 0);
        assert_eq!(s.alpn_protocols, vec![ALPN.to_vec()]);
        let c = instance_client_config(&inst, relay.fingerprint()).unwrap();
        assert!(!c.enable_early_data);
    }

    /// Found by cargo mutants: the pin comparison inverted survived the
    /// crate's own tests (only the end-to-end tests covered it).
    #[test]
    fn the_relay_pin_accepts_exactly_the_pinned_certificate() {
        let relay = TlsIdentity::self_signed(&Identity::generate(), RELAY_SERVER_NAME).unwrap();
        let impostor = TlsIdentity::self_signed(&Identity::generate(), RELAY_SERVER_NAME).unwrap();
        let v = PinnedRelayVerifier {
            fingerprint: relay.fingerprint(),
            provider: provider(),
        };
        let name = ServerName::try_from(RELAY_SERVER_NAME).unwrap();
        let check = |cert: &CertificateDer<'_>| {
            v.verify_server_cert(cert, &[], &name, &[], UnixTime::now())
        };
        assert!(check(&relay.cert).is_ok());
        assert!(check(&impostor.cert).is_err());
    }

    #[test]
    fn garbage_certificate_is_refused() {
        assert!(instance_key_from_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
