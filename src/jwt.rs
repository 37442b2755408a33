//! The JWTs mailgate signs: client assertions that authenticate it at a token endpoint with a
//! certificate (RFC 7523 2.2; PS256 with the `x5t#S256` thumbprint, as Microsoft Entra now
//! asks, and the older SHA-1 `x5t` too), and service-account assertions that ask for a
//! mailbox's token (RFC 7523 2.1, Google domain-wide delegation; RS256, as Google asks); and
//! loading the keys they are signed with.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use ring::rand::{SecureRandom as _, SystemRandom};
use ring::signature::{KeyPair as _, RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaEncoding, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_json::json;

use crate::secret::Secret;
use crate::x509;

/// How long an assertion is valid: long enough for clock skew, short against replay
/// (Microsoft refuses assertions valid for more than 10 minutes).
const ASSERTION_LIFETIME_SECS: u64 = 300;
/// Google's limit for service-account assertions.
const SERVICE_ASSERTION_LIFETIME_SECS: u64 = 3600;

/// A certificate registered with a provider, and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedCertificate {
    /// SHA-256 of the certificate's DER: the assertion's `x5t#S256` header.
    pub sha256: Vec<u8>,
    /// SHA-1 of the certificate's DER: the `x5t` header that older endpoints read.
    sha1: Vec<u8>,
    key: RsaKeyDer,
}

/// An RSA private key in one of the two encodings PEM files carry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RsaKeyDer {
    Pkcs8(Secret<Vec<u8>>),
    Pkcs1(Secret<Vec<u8>>),
}

/// The parts of a Google service-account key file that mailgate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: Option<String>,
    key: RsaKeyDer,
}

#[derive(Deserialize)]
struct ServiceAccountFile {
    client_email: String,
    #[serde(default)]
    private_key_id: Option<String>,
    private_key: Secret<String>,
}

/// Reads a PEM certificate and its RSA key (PKCS#8 or PKCS#1), checking that the key signs
/// and belongs to the certificate.
///
/// # Errors
/// A description of what is wrong, naming the file but never quoting the key.
pub fn load_certificate(cert_file: &Path, key_file: &Path) -> Result<LoadedCertificate, String> {
    let cert = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?
        .next()
        .ok_or_else(|| format!("no certificate in {}", cert_file.display()))?
        .map_err(|e| format!("cannot read {}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|_| format!("no RSA private key (PEM) in {}", key_file.display()))?;
    let key = rsa_key(key).map_err(|reason| format!("{}: {reason}", key_file.display()))?;
    let parsed = x509::parse(&cert).map_err(|e| format!("{}: {e}", cert_file.display()))?;
    // The SPKI ends with the RSA public key: a key from another pair would have every
    // assertion refused, but only at runtime (Microsoft: AADSTS700027).
    let pair = key
        .pair()
        .map_err(|reason| format!("{}: {reason}", key_file.display()))?;
    if !parsed.public_key_info.ends_with(pair.public_key().as_ref()) {
        return Err(format!(
            "{}: the key does not belong to the certificate in {}",
            key_file.display(),
            cert_file.display()
        ));
    }
    let digest = |algorithm| {
        ring::digest::digest(algorithm, cert.as_ref())
            .as_ref()
            .to_vec()
    };
    Ok(LoadedCertificate {
        sha256: digest(&ring::digest::SHA256),
        sha1: digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY),
        key,
    })
}

/// Reads a Google service-account JSON key.
///
/// # Errors
/// The JSON lacks `client_email` or `private_key`, or the key is not a usable RSA key.
pub fn load_service_account(json: &str) -> Result<ServiceAccount, String> {
    let file: ServiceAccountFile = serde_json::from_str(json).map_err(|_| {
        "not a service-account key (JSON with client_email and private_key)".to_owned()
    })?;
    let key = PrivateKeyDer::from_pem_slice(file.private_key.expose().as_bytes())
        .map_err(|_| "private_key is not a PEM private key".to_owned())?;
    Ok(ServiceAccount {
        client_email: file.client_email,
        private_key_id: file.private_key_id,
        key: rsa_key(key)?,
    })
}

fn rsa_key(key: PrivateKeyDer<'_>) -> Result<RsaKeyDer, String> {
    let key = match key {
        PrivateKeyDer::Pkcs8(der) => RsaKeyDer::Pkcs8(Secret::new(der.secret_pkcs8_der().to_vec())),
        PrivateKeyDer::Pkcs1(der) => RsaKeyDer::Pkcs1(Secret::new(der.secret_pkcs1_der().to_vec())),
        _ => return Err("the private key must be RSA (PKCS#8 or PKCS#1)".to_owned()),
    };
    key.pair()?;
    Ok(key)
}

impl RsaKeyDer {
    fn pair(&self) -> Result<RsaKeyPair, String> {
        match self {
            RsaKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.expose()),
            RsaKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.expose()),
        }
        .map_err(|e| format!("unusable RSA key: {e}"))
    }
}

/// A client assertion for `client_id` at `token_url` (RFC 7523 3, Microsoft's rules).
///
/// # Errors
/// Signing failed (never for a key that loaded).
pub fn client_assertion(
    certificate: &LoadedCertificate,
    client_id: &str,
    token_url: &str,
    now: u64,
) -> Result<Secret<String>, String> {
    let header = json!({
        "alg": "PS256",
        "typ": "JWT",
        "x5t#S256": BASE64URL.encode(&certificate.sha256),
        "x5t": BASE64URL.encode(&certificate.sha1),
    });
    let claims = json!({
        "aud": token_url,
        "iss": client_id,
        "sub": client_id,
        "jti": random_id()?,
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    sign(&certificate.key, &RSA_PSS_SHA256, &header, &claims)
}

/// An assertion asking `token_url` for a token for `mailbox` with `scope` (RFC 7523 2.1).
///
/// # Errors
/// Signing failed (never for a key that loaded).
pub fn service_account_assertion(
    account: &ServiceAccount,
    mailbox: &str,
    scope: &str,
    token_url: &str,
    now: u64,
) -> Result<Secret<String>, String> {
    let mut header = json!({ "alg": "RS256", "typ": "JWT" });
    if let Some(id) = &account.private_key_id {
        header["kid"] = id.clone().into();
    }
    let claims = json!({
        "iss": account.client_email,
        "sub": mailbox,
        "scope": scope,
        "aud": token_url,
        "iat": now,
        "exp": now + SERVICE_ASSERTION_LIFETIME_SECS,
    });
    sign(&account.key, &RSA_PKCS1_SHA256, &header, &claims)
}

fn sign(
    key: &RsaKeyDer,
    padding: &'static dyn RsaEncoding,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> Result<Secret<String>, String> {
    let signing_input = format!(
        "{}.{}",
        BASE64URL.encode(header.to_string()),
        BASE64URL.encode(claims.to_string())
    );
    let pair = key.pair()?;
    let mut signature = vec![0u8; pair.public().modulus_len()];
    pair.sign(
        padding,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "signing the assertion failed".to_owned())?;
    Ok(Secret::new(format!(
        "{signing_input}.{}",
        BASE64URL.encode(signature)
    )))
}

/// 16 random bytes, base64url: an assertion's `jti`, or a `state` or PKCE verifier seed.
///
/// # Errors
/// The system's random source failed.
pub fn random_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness from the system".to_owned())?;
    Ok(BASE64URL.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway RSA key and certificate made with the openssl command.
    fn openssl_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = dir.join("key.pem");
        let cert = dir.join("cert.pem");
        let status = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=mailgate-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        (cert, key)
    }

    fn parts(jwt: &Secret<String>) -> (serde_json::Value, serde_json::Value) {
        let mut pieces = jwt.expose().split('.');
        let decode = |piece: &str| -> serde_json::Value {
            serde_json::from_slice(&BASE64URL.decode(piece).unwrap()).unwrap()
        };
        let header = decode(pieces.next().unwrap());
        let claims = decode(pieces.next().unwrap());
        assert_eq!(pieces.count(), 1, "a signature");
        (header, claims)
    }

    #[test]
    fn client_assertions_carry_the_thumbprint_and_microsofts_claims() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = openssl_pair(dir.path());
        let loaded = load_certificate(&cert, &key).unwrap();
        let jwt = client_assertion(&loaded, "app", "https://idp.example/token", 1000).unwrap();
        let (header, claims) = parts(&jwt);
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["x5t#S256"], BASE64URL.encode(&loaded.sha256));
        assert_eq!(
            header["x5t"].as_str().unwrap().len(),
            27,
            "SHA-1, base64url"
        );
        assert_eq!(claims["aud"], "https://idp.example/token");
        assert_eq!(claims["iss"], "app");
        assert_eq!(claims["sub"], "app");
        assert_eq!(claims["exp"], 1300);
        assert!(claims["jti"].as_str().unwrap().len() >= 16);
    }

    #[test]
    fn unusable_keys_are_refused_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = openssl_pair(dir.path());
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = load_certificate(&cert, &bad).unwrap_err();
        assert!(!error.contains("c2VjcmV0"), "{error}");
        assert!(load_service_account("{}").is_err());
    }
}
