//! MQTT over TLS (rustls with ring): the server certificate, and optionally
//! a client CA whose verified client certificates authenticate devices by
//! their common name.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;

#[derive(Clone)]
pub struct MqttTls {
    pub config: Arc<rustls::ServerConfig>,
}

fn bad(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
}

fn certs(path: &Path) -> std::io::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let f = std::fs::File::open(path)
        .map_err(|e| bad(&format!("cannot open {}", path.display()), e))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&format!("{} is not PEM", path.display()), e))?;
    if certs.is_empty() {
        return Err(bad("no certificate found in", path.display()));
    }
    Ok(certs)
}

impl MqttTls {
    /// Loads the server's certificate chain and key; with `client_ca`,
    /// client certificates signed by it are required.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> std::io::Result<Self> {
        let chain = certs(cert)?;
        let f = std::fs::File::open(key)
            .map_err(|e| bad(&format!("cannot open {}", key.display()), e))?;
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
            .map_err(|e| bad("the key file is not PEM", e))?
            .ok_or_else(|| bad("no private key in", key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS setup", e))?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c).map_err(|e| bad("the client CA", e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| bad("the client CA", e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| bad("the certificate and key do not fit", e))?;
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}
