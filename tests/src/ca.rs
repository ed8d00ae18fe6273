//! A certificate authority of a test's own, issuing relay certificates
//! (PEM, as an operator gets them from a CA) for the relay's CA mode.

use std::path::{Path, PathBuf};

/// A CA: its certificate and the key that signs what it issues.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: rcgen::Certificate,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A fresh CA.
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "agent-link test CA");
        let cert = params.self_signed(&key).unwrap();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            cert,
        }
    }

    /// The CA's certificate as PEM, written to `dir/name`.
    pub fn write_cert(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, pem("CERTIFICATE", self.cert.der())).unwrap();
        p
    }

    /// A relay certificate for `names` (DNS names or IP addresses) and its
    /// key, as PEM, written to `dir/chain.pem` and `dir/key.pem`.
    pub fn issue(&self, names: &[&str], dir: &Path) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        std::fs::write(dir.join("chain.pem"), pem("CERTIFICATE", cert.der())).unwrap();
        std::fs::write(
            dir.join("key.pem"),
            pem("PRIVATE KEY", &key.serialize_der()),
        )
        .unwrap();
    }
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
