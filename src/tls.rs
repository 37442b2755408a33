//! TLS with rustls and the ring provider (no OpenSSL anywhere): client configurations towards
//! upstreams and HTTP services (system roots plus extra CA files), and server configurations
//! whose certificate a reload can replace without touching open sessions.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("no trust roots: system roots are off and no ca_file is set")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    PrivateKey { path: String, reason: String },
}

impl From<TlsError> for io::Error {
    fn from(error: TlsError) -> Self {
        io::Error::other(error)
    }
}

/// Installs the ring provider process-wide; call once at start (reqwest relies on it too).
pub fn install_crypto_provider() {
    // Err means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds a TLS client configuration trusting the system's roots (when `system_roots`) and
/// the certificates in `ca_file`.
///
/// # Errors
/// An unreadable or empty `ca_file`, or no roots at all.
pub fn client_config(
    ca_file: Option<&Path>,
    system_roots: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    if system_roots {
        // Unreadable individual system certificates are skipped, as every TLS stack does.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
    }
    if let Some(path) = ca_file {
        let ca_error = |reason: String| TlsError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_error(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("no PEM certificates in it".to_owned()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A server certificate that a reload can replace: new handshakes get the new one, sessions
/// already established keep theirs.
#[derive(Debug)]
pub struct CertificateSlot(RwLock<Arc<CertifiedKey>>);

impl CertificateSlot {
    /// Loads the PEM certificate chain and private key.
    ///
    /// # Errors
    /// A file is unreadable, holds no certificate or key, or the key does not fit.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        Ok(Self(RwLock::new(Arc::new(certified_key(
            cert_file, key_file,
        )?))))
    }

    /// Replaces the certificate; on error the current one stays.
    ///
    /// # Errors
    /// As for [`CertificateSlot::load`].
    pub fn replace(&self, cert_file: &Path, key_file: &Path) -> Result<(), TlsError> {
        let loaded = Arc::new(certified_key(cert_file, key_file)?);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let certificate_error = |reason: String| TlsError::Certificate {
        path: cert_file.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| certificate_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| certificate_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(certificate_error("no PEM certificate in it".to_owned()));
    }
    let key_error = |reason: String| TlsError::PrivateKey {
        path: key_file.display().to_string(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| key_error(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signer);
    // The key must belong to the first certificate, or every handshake would fail.
    certified
        .keys_match()
        .map_err(|e| key_error(format!("does not belong to the certificate: {e}")))?;
    Ok(certified)
}

/// A server configuration (TLS 1.2 and 1.3 only) presenting whatever `slot` holds. With an
/// `alpn` id, a client offering ALPN ids without it is refused with the
/// `no_application_protocol` alert (RFC 7301 3.2); one offering none is served.
///
/// # Errors
/// The provider refuses the protocol versions (never with ring).
pub fn server_config_for(
    slot: Arc<CertificateSlot>,
    alpn: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(slot);
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    Ok(Arc::new(config))
}

/// Checks that `cert_file` and `key_file` make a server configuration, with `alpn` as for
/// [`server_config_for`].
///
/// # Errors
/// As for [`CertificateSlot::load`].
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    alpn: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_for(Arc::new(CertificateSlot::load(cert_file, key_file)?), alpn)
}
