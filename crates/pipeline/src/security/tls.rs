//! The local certificate authority of `up --secure` and the managed server's certificate.
//!
//! `<data-dir>/tls/ca.pem` (give it to devices), `ca-key.pem` (0600), `server.pem` and
//! `server-key.pem` (0600), `server.names` (the names in the certificate). The CA is made
//! once; the server certificate again whenever the names asked for change, signed by the
//! same CA (its parameters are fixed, so the stored key is all it takes to sign).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::files::{private_dir, read_private, write_private, write_public};
use super::SecurityError;

/// Names every server certificate holds.
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Paths of the TLS material under `<data-dir>/tls`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    names: PathBuf,
}

impl TlsFiles {
    pub fn under(data_dir: &Path) -> TlsFiles {
        let dir = data_dir.join("tls");
        TlsFiles {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            names: dir.join("server.names"),
        }
    }

    /// Makes the CA if there is none, and the server certificate if there is none or its
    /// names differ from `extra_names` plus [`LOOPBACK_NAMES`]. Idempotent.
    pub fn ensure(&self, extra_names: &[String]) -> Result<(), SecurityError> {
        let dir = self.ca_cert.parent().unwrap_or(Path::new("."));
        private_dir(dir)?;
        let err = |e: rcgen::Error| SecurityError::Invalid(format!("certificate: {e}"));
        let ca_key = if self.ca_key.is_file() && self.ca_cert.is_file() {
            KeyPair::from_pem(&read_private(&self.ca_key)?).map_err(err)?
        } else {
            let key = KeyPair::generate().map_err(err)?;
            let cert = ca_params().self_signed(&key).map_err(err)?;
            write_private(&self.ca_key, key.serialize_pem().as_bytes())?;
            write_public(&self.ca_cert, cert.pem().as_bytes())?;
            // A new CA invalidates any server certificate signed by an old one.
            let _ = std::fs::remove_file(&self.names);
            key
        };
        let mut names: Vec<String> = LOOPBACK_NAMES.iter().map(|s| s.to_string()).collect();
        for n in extra_names {
            let n = n.trim();
            if !n.is_empty() && !names.iter().any(|have| have == n) {
                names.push(n.to_string());
            }
        }
        let wanted = names.join("\n");
        let current = std::fs::read_to_string(&self.names).unwrap_or_default();
        if current == wanted && self.server_cert.is_file() && self.server_key.is_file() {
            return Ok(());
        }
        let mut params = CertificateParams::new(names).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetpipe nats-server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let ca_params = ca_params();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(err)?;
        write_private(&self.server_key, key.serialize_pem().as_bytes())?;
        write_public(&self.server_cert, cert.pem().as_bytes())?;
        write_public(&self.names, wanted.as_bytes())
    }
}

/// The CA's parameters, always the same, so a certificate signed later with the stored
/// key names the same issuer.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "fleetpipe local CA");
    dn.push(DnType::OrganizationName, "fleetpipe");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_ca_is_kept_and_the_server_certificate_follows_the_names() {
        let tmp = tempfile::tempdir().unwrap();
        let files = TlsFiles::under(tmp.path());
        files.ensure(&[]).unwrap();
        let ca = std::fs::read(&files.ca_cert).unwrap();
        let server = std::fs::read(&files.server_cert).unwrap();
        for key in [&files.ca_key, &files.server_key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        files.ensure(&[]).unwrap();
        assert_eq!(
            std::fs::read(&files.server_cert).unwrap(),
            server,
            "unchanged"
        );
        files.ensure(&["nats.example.com".into()]).unwrap();
        assert_ne!(
            std::fs::read(&files.server_cert).unwrap(),
            server,
            "new names"
        );
        assert_eq!(std::fs::read(&files.ca_cert).unwrap(), ca, "same CA");
    }
}
