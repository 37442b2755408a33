//! Test harness shared by the integration tests (`mod support;`): a throwaway CA, an OAuth2
//! introspection server, an EmailEngine-style auth server, an OAuth2 provider, an SMTP sink, a
//! private Dovecot, the mailgate binary as a child process, and curl. Everything listens on
//! 127.0.0.1 with OS-assigned ports, every wait is bounded, and every process is stopped on
//! drop.
//!
//! # Layout
//! - [`process`] runs programs with a timeout (curl, openssl), finds free ports, sends signals.
//! - [`certs`] makes a [`TestCa`].
//! - [`http`] serves [`Introspection`] and [`AuthServer`].
//! - [`sink`] is the [`SmtpSink`].
//! - [`dovecot`] runs a [`Dovecot`].
//! - [`mailgate`] runs the binary as a [`Mailgate`].
//! - [`oauth2`] is an [`OAuthProvider`], a local OAuth2 authorization server whose tokens the
//!   test Dovecot accepts.
//! - [`redis`] runs a [`redis::RedisServer`] for the replicas' shared state; [`cluster`]
//!   runs replicas on it.
//! - [`imap_client`] is a raw-line IMAP client for transcripts and the benchmark;
//!   [`line_client`] a raw-line client for POP3 and ManageSieve, over TLS too.
//! - [`scripted`] is an upstream that follows a script, for what real servers never do.
//! - [`transcript`] runs one protocol's front-end session in memory for transcripts before
//!   login, with a stand-in authenticator.
//! - [`secrets`] remembers every password and token a test uses; [`Mailgate`] checks its
//!   output for them.
// Not every test file uses every helper or re-export.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod certs;
pub mod cluster;
pub mod dovecot;
pub mod http;
pub mod imap_client;
pub mod line_client;
pub mod mailgate;
pub mod oauth2;
pub mod process;
pub mod redis;
pub mod scripted;
pub mod secrets;
pub mod sink;
pub mod transcript;

use std::future::Future;
use std::time::Duration;

pub use browser::{Browser, BrowserOptions, Element};
pub use certs::TestCa;
pub use dovecot::{Dovecot, DovecotOptions};
pub use http::{AuthAnswer, AuthRequest, AuthServer, Introspection, PasswordCheck, mint_token};
pub use mailgate::Mailgate;
pub use oauth2::{ClientCredential, OAuthProvider, TestKeys, TokenRequestRecord};
pub use process::{
    CmdOutput, curl, curl_send_mail, curl_with_timeout, free_port, free_ports, wait_for_port,
};
pub use sink::{ReceivedMessage, SmtpSink};

/// The overall bound most tests use.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `test` and panics when it takes longer than `limit`.
pub async fn with_timeout<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// Checks `condition` every 50 ms until it holds or `limit` has passed; whether it held.
/// For effects that happen soon after a signal or a close, without guessing a sleep.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition; `-1` when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(-1.0)
}

/// Writes `files` the way Kubernetes mounts a Secret: `NAME -> ..data/NAME`, `..data ->
/// ..GENERATION`. A new generation swaps every file at once by renaming `..data`, as the
/// kubelet does when a Secret (a cert-manager certificate, a password) is rotated.
pub fn kubernetes_secret(dir: &std::path::Path, generation: &str, files: &[(&str, &[u8])]) {
    let target = dir.join(format!("..{generation}"));
    std::fs::create_dir_all(&target).unwrap();
    for (name, content) in files {
        std::fs::write(target.join(name), content).unwrap();
    }
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(format!("..{generation}"), &staged).unwrap();
    std::fs::rename(&staged, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

/// One mailgate listener in front of the test Dovecot, for [`TestUpstream::config_with`].
#[derive(Debug, Clone, Copy)]
pub struct Listener {
    pub name: &'static str,
    /// `imap`, `smtp`, `pop3` or `managesieve`.
    pub protocol: &'static str,
    pub port: u16,
    /// The client-facing TLS mode (`implicit`, or `starttls` with `require: true`) with the
    /// test CA's certificate; `None`: plain.
    pub client_tls: Option<&'static str>,
    pub upstream_port: u16,
    /// `implicit` or `starttls`, as `upstream_port` speaks.
    pub upstream_tls: &'static str,
    /// `auto`, `xoauth2` or `oauthbearer`.
    pub mechanism: &'static str,
}

impl Listener {
    /// 127.0.0.1 at this listener's port.
    pub fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The listener's entry under `listeners:`.
    fn yaml(&self, up: &TestUpstream) -> String {
        let tls = match self.client_tls {
            Some(mode) => format!(
                "    tls:\n      mode: {mode}\n      require: true\n      cert_file: \"{}\"\n      key_file: \"{}\"\n",
                up.ca.cert_pem().display(),
                up.ca.key_pem().display(),
            ),
            None => String::new(),
        };
        format!(
            r#"  - name: {name}
    protocol: {protocol}
    listen: "127.0.0.1:{port}"
{tls}    upstream:
      host: 127.0.0.1
      port: {upstream_port}
      tls: {upstream_tls}
      ca_file: "{ca}"
      system_roots: false
      mechanism: {mechanism}
"#,
            name = self.name,
            protocol = self.protocol,
            port = self.port,
            upstream_port = self.upstream_port,
            upstream_tls = self.upstream_tls,
            ca = up.ca_path(),
            mechanism = self.mechanism,
        )
    }
}

/// Everything upstream of mailgate: CA, introspection, auth server, SMTP sink and Dovecot,
/// wired together. Fields drop in declaration order: Dovecot stops first.
pub struct TestUpstream {
    pub dovecot: Dovecot,
    pub auth: AuthServer,
    pub introspection: Introspection,
    pub sink: SmtpSink,
    pub ca: TestCa,
}

impl TestUpstream {
    /// Starts all parts (about half a second, most of it Dovecot).
    pub async fn start() -> TestUpstream {
        Self::start_with(&DovecotOptions::default()).await
    }

    /// Like [`TestUpstream::start`], with Dovecot started with `options`.
    pub async fn start_with(options: &DovecotOptions) -> TestUpstream {
        let ca = TestCa::create().await;
        let introspection = Introspection::start().await;
        let auth = AuthServer::start(Some(&introspection)).await;
        let sink = SmtpSink::start().await;
        let dovecot = Dovecot::start_with(&ca, &introspection.url(), sink.addr(), options).await;
        TestUpstream {
            dovecot,
            auth,
            introspection,
            sink,
            ca,
        }
    }

    /// A mailgate config with an IMAP listener on `127.0.0.1:imap_port` (upstream: Dovecot's
    /// imaps port, implicit TLS) and an SMTP listener on `127.0.0.1:smtp_port` (upstream:
    /// Dovecot's submission port, STARTTLS), both trusting only the test CA, tokens from the
    /// auth server. Append or edit lines for other cases.
    pub fn mailgate_config(&self, imap_port: u16, smtp_port: u16) -> String {
        let ca = self.ca_path();
        format!(
            r#"listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:{imap_port}"
    upstream:
      host: 127.0.0.1
      port: {imaps}
      tls: implicit
      ca_file: "{ca}"
      system_roots: false
  - name: smtp
    protocol: smtp
    listen: "127.0.0.1:{smtp_port}"
    upstream:
      host: 127.0.0.1
      port: {submission}
      tls: starttls
      ca_file: "{ca}"
      system_roots: false
tokens:
  auth_server:
    url: "{url}"
    timeout: 5s
"#,
            imaps = self.dovecot.imaps_port,
            submission = self.dovecot.submission_port,
            url = self.auth.url_with_credentials(),
        )
    }

    /// A mailgate config with `listeners`, tokens from the auth server at `token_url` (a dead
    /// address makes the token source unreachable) and the admin endpoint on `admin_port`.
    pub fn config_with(&self, listeners: &[Listener], token_url: &str, admin_port: u16) -> String {
        let mut text = String::from("listeners:\n");
        for listener in listeners {
            text.push_str(&listener.yaml(self));
        }
        text.push_str(&format!(
            "tokens:\n  auth_server:\n    url: \"{token_url}\"\n    timeout: 5s\n\
             admin:\n  listen: \"127.0.0.1:{admin_port}\"\n"
        ));
        text
    }

    /// Hands a message the sink received (by SMTP, through mailgate and Dovecot's submission
    /// relay) to Dovecot's LMTP for each of its recipients, as an MX would: mail submitted
    /// through mailgate lands in the maildrops POP3 reads.
    pub async fn deliver_received(&self, message: &ReceivedMessage) {
        let text = message.data_str();
        // RFC 5321 4.5.2: dot-stuffed again on the wire.
        let stuffed = text
            .split_inclusive("\r\n")
            .map(|line| {
                if line.starts_with('.') {
                    format!(".{line}")
                } else {
                    line.to_owned()
                }
            })
            .collect::<String>();
        for rcpt in &message.rcpts {
            self.dovecot.deliver(rcpt, &stuffed).await;
        }
    }

    /// The CA path as a string, ready for `curl --cacert` or a mailgate `ca_file`.
    pub fn ca_path(&self) -> String {
        self.ca.ca_pem().display().to_string()
    }
}
