//! TLS to PostgreSQL, as libpq's URL parameters ask for it, with rustls.
//!
//! `sslmode`: `disable` (plain TCP), `prefer` (the default: TLS when the server offers it,
//! without checking its certificate, as libpq does), `require` (TLS, certificate not
//! checked), `verify-ca` (TLS, certificate signed by a trusted CA) or `verify-full` (also
//! for the host connected to). Trusted CAs: `sslrootcert` (a PEM file), else the system's
//! roots; `require` or `prefer` with `sslrootcert` check the CA, as libpq does. A client
//! certificate: `sslcert` and `sslkey` (PEM files). tokio-postgres knows only the first
//! three modes and none of the files, so these parameters are taken out of the URL here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS parameters of a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgTls {
    pub mode: Mode,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl PgTls {
    /// Splits `url` (`postgres://…?sslmode=…` or `key=value …`) into the URL
    /// tokio-postgres parses, without the TLS parameters, and those parameters.
    pub(crate) fn split(url: &str) -> Result<(String, PgTls), String> {
        let mut tls = PgTls {
            mode: Mode::Prefer,
            root_cert: None,
            cert: None,
            key: None,
        };
        let mut take = |k: &str, v: &str| -> Result<bool, String> {
            match k {
                "sslmode" => {
                    tls.mode = match v {
                        "disable" => Mode::Disable,
                        "prefer" | "allow" => Mode::Prefer,
                        "require" => Mode::Require,
                        "verify-ca" => Mode::VerifyCa,
                        "verify-full" => Mode::VerifyFull,
                        _ => {
                            return Err(format!(
                                "sslmode {v:?} is not one of disable, prefer, require, \
                                 verify-ca, verify-full"
                            ))
                        }
                    }
                }
                "sslrootcert" => tls.root_cert = Some(PathBuf::from(v)),
                "sslcert" => tls.cert = Some(PathBuf::from(v)),
                "sslkey" => tls.key = Some(PathBuf::from(v)),
                _ => return Ok(false),
            }
            Ok(true)
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_string(),
                Some((base, query)) => {
                    let mut kept = form_urlencoded::Serializer::new(String::new());
                    let mut any = false;
                    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
                        if !take(&k, &v)? {
                            kept.append_pair(&k, &v);
                            any = true;
                        }
                    }
                    if any {
                        format!("{base}?{}", kept.finish())
                    } else {
                        base.to_string()
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for word in url.split_whitespace() {
                match word.split_once('=') {
                    Some((k, v)) if take(k, v.trim_matches('\''))? => {}
                    _ => kept.push(word),
                }
            }
            kept.join(" ")
        };
        if tls.cert.is_some() != tls.key.is_some() {
            return Err("sslcert and sslkey go together: give both, or neither".into());
        }
        Ok((rest, tls))
    }

    /// The mode tokio-postgres applies (it only tells disable, prefer and require apart).
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The connector: reads the certificate files now, so that a missing or bad one is
    /// an error at start rather than at each connection.
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let check_ca = match self.mode {
            Mode::Disable => false,
            Mode::Prefer | Mode::Require => self.root_cert.is_some(),
            Mode::VerifyCa | Mode::VerifyFull => true,
        };
        let verifier: Arc<dyn ServerCertVerifier> = if check_ca {
            let roots = self.roots()?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("cannot use the trusted certificates: {e}"))?;
            if self.mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        } else {
            Arc::new(Unchecked(provider))
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("sslcert/sslkey: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                for cert in certificates(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(format!(
                        "sslmode={} needs trusted certificates: the system has none \
                         readable; name the CA with sslrootcert=/path/to/ca.pem",
                        self.mode_name()
                    ));
                }
            }
        }
        Ok(roots)
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// `verify-ca`: the chain must lead to a trusted CA; the name is not checked.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: encrypted, but whoever answers is
/// trusted (libpq's behaviour; `verify-full` is what authenticates the server).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_the_tls_parameters() {
        let (rest, tls) = PgTls::split(
            "postgres://u@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(tls.ssl_mode(), SslMode::Require);

        let (rest, tls) = PgTls::split("postgres://u@h/db").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://u@h/db", Mode::Prefer)
        );
        let (rest, tls) = PgTls::split("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://u@h/db", Mode::Disable)
        );
        assert_eq!(tls.ssl_mode(), SslMode::Disable);

        let (rest, tls) =
            PgTls::split("host=h user=u sslmode=require sslcert=/c.pem sslkey=/k.pem").unwrap();
        assert_eq!((rest.as_str(), tls.mode), ("host=h user=u", Mode::Require));
        assert!(tls.cert.is_some() && tls.key.is_some());

        for bad in [
            "postgres://h/db?sslmode=maybe",
            "postgres://h/db?sslcert=/c.pem",
        ] {
            assert!(PgTls::split(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_files_are_errors_at_start() {
        let (_, tls) =
            PgTls::split("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem")
                .unwrap();
        let err = tls.connector().err().unwrap();
        assert!(err.contains("/nonexistent.pem"), "{err}");
        let (_, tls) = PgTls::split("postgres://h/db?sslmode=require").unwrap();
        assert!(tls.connector().is_ok());
    }
}
