//! [`TestKeys`]: an RSA key in the formats OAuth clients meet (PKCS#8 and PKCS#1 PEM, PKCS#8
//! and SPKI DER), a self-signed certificate for it, and a Google-style service-account key
//! file, made with the `openssl` command line like [`super::super::certs`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;

use super::super::process::run_command;
use super::crypto::x5t_s256;

const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// Paths of one RSA 2048 key set, in its own directory under the one given to
/// [`TestKeys::rsa`].
#[derive(Debug, Clone)]
pub struct TestKeys {
    pub dir: PathBuf,
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8, what Google's JSON key files hold).
    pub key_pem: PathBuf,
    /// `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1, "traditional" OpenSSL format).
    pub key_pkcs1_pem: PathBuf,
    /// PKCS#8 DER (what `ring::signature::RsaKeyPair::from_pkcs8` takes).
    pub key_pkcs8_der: PathBuf,
    /// SubjectPublicKeyInfo DER of the public key.
    pub public_key_der: PathBuf,
    /// Self-signed certificate (CN=mailgate test client, two days), PEM and DER.
    pub cert_pem: PathBuf,
    pub cert_der: PathBuf,
}

impl TestKeys {
    /// Generates a fresh key set in a new subdirectory of `dir` (about 100 ms).
    ///
    /// # Panics
    /// When `openssl` is missing or fails.
    pub async fn rsa(dir: &Path) -> TestKeys {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = loop {
            let candidate = dir.join(format!("rsa-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
            match std::fs::create_dir(&candidate) {
                Ok(()) => break candidate,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {e}", candidate.display()),
            }
        };
        let steps: [&[&str]; 6] = [
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
            &[
                "pkey",
                "-in",
                "key.pem",
                "-traditional",
                "-out",
                "key-pkcs1.pem",
            ],
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "key.pem",
                "-outform",
                "DER",
                "-out",
                "key.pk8.der",
            ],
            &[
                "pkey", "-in", "key.pem", "-pubout", "-outform", "DER", "-out", "pub.der",
            ],
            &[
                "req",
                "-new",
                "-x509",
                "-sha256",
                "-key",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=mailgate test client",
            ],
            &[
                "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
            ],
        ];
        for args in steps {
            let out = run_command("openssl", args, Some(&dir), OPENSSL_TIMEOUT).await;
            assert!(out.success(), "openssl {args:?} failed: {}", out.stderr);
        }
        TestKeys {
            key_pem: dir.join("key.pem"),
            key_pkcs1_pem: dir.join("key-pkcs1.pem"),
            key_pkcs8_der: dir.join("key.pk8.der"),
            public_key_der: dir.join("pub.der"),
            cert_pem: dir.join("cert.pem"),
            cert_der: dir.join("cert.der"),
            dir,
        }
    }

    /// The PKCS#8 DER private key, for [`super::sign_jwt_rs256`].
    pub fn pkcs8_der(&self) -> Vec<u8> {
        read(&self.key_pkcs8_der)
    }

    /// The certificate DER, for [`super::ClientCredential::Certificate`].
    pub fn cert_der_bytes(&self) -> Vec<u8> {
        read(&self.cert_der)
    }

    /// The SubjectPublicKeyInfo DER, for [`super::OAuthProvider::add_service_account`].
    pub fn public_key_der_bytes(&self) -> Vec<u8> {
        read(&self.public_key_der)
    }

    /// base64url(SHA-256(certificate DER)), the `x5t#S256` a client assertion must carry.
    pub fn x5t_s256(&self) -> String {
        x5t_s256(&self.cert_der_bytes())
    }

    /// A stable key id: the first 20 bytes of SHA-256(SPKI) in hex (40 digits, the shape of
    /// Google's `private_key_id`).
    pub fn key_id(&self) -> String {
        ring::digest::digest(&ring::digest::SHA256, &self.public_key_der_bytes()).as_ref()[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Writes `service-account.json` in the layout of a Google service-account key file
    /// (`type`, `project_id`, `private_key_id`, `private_key` as PKCS#8 PEM, `client_email`,
    /// `client_id`, `auth_uri`, `token_uri`, ...) and returns its path. `token_uri` is usually
    /// [`super::OAuthProvider::token_url`].
    pub fn service_account_json(&self, client_email: &str, token_uri: &str) -> PathBuf {
        let private_key = std::fs::read_to_string(&self.key_pem).expect("read key.pem");
        let body = serde_json::json!({
            "type": "service_account",
            "project_id": "mailgate-test",
            "private_key_id": self.key_id(),
            "private_key": private_key,
            "client_email": client_email,
            "client_id": "100000000000000000001",
            "auth_uri": "http://127.0.0.1/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "http://127.0.0.1/oauth2/v1/certs",
            "client_x509_cert_url": "http://127.0.0.1/robot/v1/metadata/x509/test",
            "universe_domain": "googleapis.com",
        });
        let path = self.dir.join("service-account.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&body).expect("serialize"),
        )
        .expect("write service-account.json");
        path
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The DER inside the first PEM block of `pem` (any label).
///
/// # Panics
/// When there is no well-formed PEM block.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END "))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body is base64")
}
