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
//! - For public deployments a relay may instead present a certificate chain
//!   from a certificate authority ([`CaIssued`]); instances then check it
//!   against CA roots ([`ca_roots`]: a CA file, or the system's) for the
//!   relay's host name, as any TLS client would ([`instance_client_config_ca`]).
//! - TLS 1.3 only, Ed25519 only for instances (a CA-issued relay certificate
//!   may carry any key rustls verifies), ALPN [`ALPN`], and no early data
//!   (0-RTT data can be replayed by a network attacker).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::identity::{Identity, PublicKey};
use crate::CryptoError;

/// The ALPN protocol id; a different one is refused in the handshake.
pub const ALPN: &[u8] = b"agent-link/1";

/// CA roots ([`ca_roots`]).
pub use rustls::RootCertStore;

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

/// A certificate chain from a certificate authority and its private key,
/// read from PEM files (what certbot and most CAs hand out): the relay's
/// certificate first, then its intermediates.
pub struct CaIssued {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for CaIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaIssued")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl CaIssued {
    /// Read `chain` (PEM certificates, the relay's first) and `key` (a PEM
    /// private key: PKCS#8, SEC1 or PKCS#1); the key must be the first
    /// certificate's.
    pub fn from_pem_files(chain: &Path, key: &Path) -> Result<Self, CryptoError> {
        let certs = pem_certificates(chain, "PEM")?;
        if certs.is_empty() {
            return Err(CryptoError::MalformedFile {
                path: chain.display().to_string(),
                what: "PEM certificate chain (no CERTIFICATE in it)",
            });
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key, "PEM"))?;
        let me = Self {
            chain: certs,
            key: key_der,
        };
        // Refuse a key that is not the certificate's now, not at the first
        // handshake.
        let signer = provider()
            .key_provider
            .load_private_key(me.key.clone_key())
            .map_err(|e| CryptoError::Tls(format!("{}: {e}", key.display())))?;
        rustls::sign::CertifiedKey::new(me.chain.clone(), signer)
            .keys_match()
            .map_err(|_| {
                CryptoError::Tls(format!(
                    "{} is not the key of the first certificate in {}",
                    key.display(),
                    chain.display()
                ))
            })?;
        Ok(me)
    }
}

/// The `what` that `path` should hold could not be read (`Io`) or is not
/// PEM of that kind (`MalformedFile`).
fn pem_error(
    path: &Path,
    what: &'static str,
) -> impl FnOnce(rustls::pki_types::pem::Error) -> CryptoError {
    let path = path.display().to_string();
    move |e| match e {
        rustls::pki_types::pem::Error::Io(source) => CryptoError::Io { path, source },
        _ => CryptoError::MalformedFile { path, what },
    }
}

/// Every CERTIFICATE of the PEM file `path` (`what` names it in errors).
fn pem_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CryptoError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(pem_error(path, what))
}

/// CA roots to check relay certificates against: the PEM certificates in
/// `file`, or the system's (`None`).
pub fn ca_roots(file: Option<&Path>) -> Result<rustls::RootCertStore, CryptoError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, source) = match file {
        Some(path) => {
            let certs = pem_certificates(path, "PEM CA")?;
            (
                roots.add_parsable_certificates(certs).0,
                path.display().to_string(),
            )
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            (
                roots.add_parsable_certificates(found.certs).0,
                "the system's CA store".to_string(),
            )
        }
    };
    if added == 0 {
        return Err(CryptoError::Tls(format!(
            "no usable CA certificate in {source}"
        )));
    }
    Ok(roots)
}

/// The relay's rustls configuration: TLS 1.3, ALPN `agent-link/1`, client
/// certificates mandatory (Ed25519), early data off; it presents its
/// self-signed certificate.
pub fn relay_server_config(identity: &TlsIdentity) -> Result<rustls::ServerConfig, CryptoError> {
    server_config(vec![identity.cert.clone()], identity.key_der())
}

/// [`relay_server_config`] presenting a CA-issued chain instead.
pub fn relay_server_config_ca(issued: &CaIssued) -> Result<rustls::ServerConfig, CryptoError> {
    server_config(issued.chain.clone(), issued.key.clone_key())
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, CryptoError> {
    let provider = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(Arc::new(InstanceCertVerifier { provider }))
        .with_single_cert(chain, key)
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

/// An instance's rustls configuration for a relay a CA vouches for: the
/// relay's chain must lead to one of `roots` and name the host the
/// instance dials (the standard WebPKI checks, validity dates included);
/// otherwise as [`instance_client_config`].
pub fn instance_client_config_ca(
    identity: &TlsIdentity,
    roots: Arc<rustls::RootCertStore>,
) -> Result<rustls::ClientConfig, CryptoError> {
    let provider = provider();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| CryptoError::Tls(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_webpki_verifier(verifier)
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

    /// A CA, and a relay certificate it issued for `names`, as PEM.
    fn ca_and_leaf(names: &[&str]) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&leaf_key, &issuer)
                .unwrap();
        (
            pem("CERTIFICATE", ca_cert.der()),
            pem("CERTIFICATE", leaf.der()),
            pem("PRIVATE KEY", &leaf_key.serialize_der()),
        )
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// Run a whole TLS 1.3 handshake in memory: the client's verdict.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_string()).unwrap(),
        )?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn a_ca_issued_relay_certificate_is_checked_against_the_roots_and_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (ca, leaf, key) = ca_and_leaf(&["relay.example.org"]);
        let (other_ca, other_leaf, other_key) = ca_and_leaf(&["relay.example.org"]);
        let issued =
            CaIssued::from_pem_files(&write("chain.pem", &leaf), &write("key.pem", &key)).unwrap();
        let inst = TlsIdentity::self_signed(&Identity::generate(), "instance").unwrap();
        let roots = Arc::new(ca_roots(Some(&write("ca.pem", &ca))).unwrap());
        let client = || instance_client_config_ca(&inst, roots.clone()).unwrap();
        let server = || relay_server_config_ca(&issued).unwrap();
        handshake(client(), server(), "relay.example.org").unwrap();
        // Another name than the certificate's.
        assert!(handshake(client(), server(), "other.example.org").is_err());
        // A chain from another CA.
        let forged =
            CaIssued::from_pem_files(&write("c2.pem", &other_leaf), &write("k2.pem", &other_key))
                .unwrap();
        assert!(handshake(
            client(),
            relay_server_config_ca(&forged).unwrap(),
            "relay.example.org"
        )
        .is_err());
        // The pinned relay certificate is no CA chain either.
        let pinned = TlsIdentity::self_signed(&Identity::generate(), "relay.example.org").unwrap();
        assert!(handshake(
            client(),
            relay_server_config(&pinned).unwrap(),
            "relay.example.org"
        )
        .is_err());
        // Roots of the other CA refuse the first relay.
        let other_roots = Arc::new(ca_roots(Some(&write("ca2.pem", &other_ca))).unwrap());
        let c = instance_client_config_ca(&inst, other_roots).unwrap();
        assert!(handshake(c, server(), "relay.example.org").is_err());
    }

    #[test]
    fn bad_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let (ca, leaf, key) = ca_and_leaf(&["relay.example.org"]);
        let (_, _, other_key) = ca_and_leaf(&["relay.example.org"]);
        let chain = write("chain.pem", &leaf);
        // Not the certificate's key.
        let e = CaIssued::from_pem_files(&chain, &write("k2.pem", &other_key)).unwrap_err();
        assert!(e.to_string().contains("is not the key"), "{e}");
        // No certificate, no key, no file.
        assert!(
            CaIssued::from_pem_files(&write("empty.pem", ""), &write("key.pem", &key)).is_err()
        );
        assert!(CaIssued::from_pem_files(&chain, &write("nokey.pem", &ca)).is_err());
        assert!(CaIssued::from_pem_files(&dir.path().join("missing"), &chain).is_err());
        assert!(ca_roots(Some(&write("none.pem", "hello"))).is_err());
    }

    #[test]
    fn garbage_certificate_is_refused() {
        assert!(instance_key_from_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])).is_err());
    }
}
