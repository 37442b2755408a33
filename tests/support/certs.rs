//! A throwaway certificate authority and a server certificate for 127.0.0.1/localhost, made
//! with the `openssl` command line in a temp dir that lives as long as the [`TestCa`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::process::run_command;

const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// CA key + certificate and a server key + certificate signed by it (P-256, valid two days,
/// subjectAltName `IP:127.0.0.1, DNS:localhost`). Files are readable by everyone so that
/// unprivileged Dovecot processes can use them.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// Creates the CA and the server certificate.
    ///
    /// # Panics
    /// When `openssl` is missing or fails.
    pub async fn create() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("mailgate-ca-")
            .tempdir()
            .expect("create temp dir for the CA");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod CA dir");
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n\
             basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n",
        )
        .expect("write server.ext");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let steps: [Vec<&str>; 3] = [
            [
                &["req", "-x509"][..],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=mailgate test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
            [
                &["req"][..],
                &ec[..],
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
            vec![
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        ];
        for args in &steps {
            let out = run_command("openssl", args, Some(dir.path()), OPENSSL_TIMEOUT).await;
            assert!(out.success(), "openssl {args:?} failed: {}", out.stderr);
        }
        for name in ["ca.pem", "ca.key", "server.pem", "server.key"] {
            std::fs::set_permissions(
                dir.path().join(name),
                std::fs::Permissions::from_mode(0o644),
            )
            .expect("chmod cert file");
        }
        TestCa { dir }
    }

    /// The CA certificate (PEM): the trust root for clients (`curl --cacert`, mailgate `ca_file`).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM) for 127.0.0.1/localhost, signed by the CA.
    pub fn cert_pem(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server's private key (PEM, unencrypted).
    pub fn key_pem(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
