//! TLS as the hub trusts its cloud: not by a certificate authority but by
//! the SHA-256 of the cloud's public key (its SubjectPublicKeyInfo),
//! learnt at enrolment from the token an operator handed over. A renewed
//! certificate for the same key keeps working; any other key is refused,
//! whoever signed it. The handshake's signatures are still checked, so a
//! server must hold the pinned key's private half.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    #[error("the certificate is not X.509 DER: {0}")]
    BadCertificate(String),
    #[error("the pin is not 64 hex digits")]
    BadPin,
}

/// The SHA-256 of a certificate's public key, hex: the pin.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, PinError> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PinError::BadCertificate(e.to_string()))?;
    Ok(hex::encode(sha2::Sha256::digest(cert.public_key().raw)))
}

/// The pin of the first certificate in a PEM file.
pub fn pem_pin(path: &Path) -> Result<String, PinError> {
    let name = path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| PinError::Read(name.clone(), e))?;
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| PinError::NoCertificate(name.clone()))?
        .map_err(|e| PinError::Read(name, e))?;
    spki_pin(&cert)
}

/// A client configuration that accepts only a server holding the key
/// whose pin is `pin_hex`.
pub fn pinned_client_config(pin_hex: &str) -> Result<Arc<rustls::ClientConfig>, PinError> {
    let pin: [u8; 32] = hex::decode(pin_hex)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(PinError::BadPin)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = spki_pin(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if found == hex::encode(self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
