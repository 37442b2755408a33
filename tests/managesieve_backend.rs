//! mailgate's ManageSieve upstream login and capability probe against the real Dovecot
//! (Pigeonhole's managesieve), over STARTTLS and implicit TLS, with tokens its oauth2 passdb
//! checks at the test introspection server.

mod support;

use std::time::Duration;

use mailgate::config::{
    DEFAULT_MAX_CONCURRENT_CONNECTS, ForwardClient, MechanismSetting, TlsMode, UpstreamConfig,
};
use mailgate::login::{BackendError, Upstream, UpstreamAuth};
use mailgate::managesieve::backend;
use mailgate::secret::Secret;
use mailgate::upstream::Connector;
use support::dovecot::{PASSWORD_USER, PASSWORD_USER_SECRET};
use support::{TEST_TIMEOUT, TestUpstream, mint_token, with_timeout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const USER: &str = "sieve-user@example.test";

fn connector(
    upstream: &TestUpstream,
    port: u16,
    tls: TlsMode,
    mechanism: MechanismSetting,
) -> Connector {
    mailgate::tls::install_crypto_provider();
    Connector::new(&UpstreamConfig {
        host: "127.0.0.1".to_owned(),
        port,
        tls,
        ca_file: Some(upstream.ca.ca_pem()),
        system_roots: false,
        mechanism,
        connect_timeout: Duration::from_secs(5),
        max_concurrent_connects: DEFAULT_MAX_CONCURRENT_CONNECTS,
        forward_client: ForwardClient::None,
    })
    .unwrap()
}

fn bearer(token: &str) -> UpstreamAuth {
    UpstreamAuth::Bearer {
        user: USER.to_owned(),
        token: Secret::new(token.to_owned()),
    }
}

/// Sends `command` on a logged-in stream and reads up to the `OK` that ends its answer.
async fn run(upstream: &mut Upstream, command: &str) -> String {
    upstream.io.write_all(command.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        let last = text
            .trim_end_matches("\r\n")
            .rsplit("\r\n")
            .next()
            .unwrap_or_default();
        if text.ends_with("\r\n") && (last.starts_with("OK") || last.starts_with("NO")) {
            return text;
        }
        let mut chunk = [0u8; 4096];
        let n = upstream.io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "upstream closed; had {text:?}");
        received.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn xoauth2_over_starttls_then_scripts_are_managed() {
    with_timeout(TEST_TIMEOUT, async {
        let upstream = TestUpstream::start().await;
        let token = mint_token();
        upstream.introspection.add_token(&token, USER);
        let port = upstream.dovecot.sieve_port;
        let connector = connector(
            &upstream,
            port,
            TlsMode::Starttls,
            MechanismSetting::Xoauth2,
        );
        let mut session = backend::login(&connector, &bearer(&token), None)
            .await
            .unwrap();
        assert!(
            session.completion.starts_with("OK"),
            "{}",
            session.completion
        );
        let script = "keep;\r\n";
        let put = format!(
            "PUTSCRIPT \"mailgate\" {{{}+}}\r\n{script}\r\n",
            script.len()
        );
        assert_eq!(
            run(&mut session, &put).await,
            "OK \"PUTSCRIPT completed.\"\r\n"
        );
        let listed = run(&mut session, "LISTSCRIPTS\r\n").await;
        assert!(listed.starts_with("\"mailgate\"\r\n"), "{listed}");
        assert!(upstream.dovecot.log().contains("method=XOAUTH2"));
    })
    .await;
}

#[tokio::test]
async fn oauthbearer_over_implicit_tls_with_a_long_token_as_literal() {
    with_timeout(TEST_TIMEOUT, async {
        let upstream = TestUpstream::start().await;
        // Over 1024 octets of base64: the initial response goes as a `{n+}` literal.
        let token = mint_token() + &"x".repeat(1200);
        upstream.introspection.add_token(&token, USER);
        let port = upstream.dovecot.sieves_port;
        let connector = connector(
            &upstream,
            port,
            TlsMode::Implicit,
            MechanismSetting::Oauthbearer,
        );
        let mut session = backend::login(&connector, &bearer(&token), None)
            .await
            .unwrap();
        assert!(
            session.completion.starts_with("OK"),
            "{}",
            session.completion
        );
        assert!(run(&mut session, "NOOP\r\n").await.starts_with("OK"));
        assert!(upstream.dovecot.log().contains("method=OAUTHBEARER"));
    })
    .await;
}

#[tokio::test]
async fn refused_tokens_are_rejections_without_the_secret() {
    with_timeout(TEST_TIMEOUT, async {
        let upstream = TestUpstream::start().await;
        let port = upstream.dovecot.sieve_port;
        for mechanism in [MechanismSetting::Xoauth2, MechanismSetting::Oauthbearer] {
            let token = mint_token();
            let connector = connector(&upstream, port, TlsMode::Starttls, mechanism);
            let error = backend::login(&connector, &bearer(&token), None)
                .await
                .err()
                .unwrap();
            assert!(
                matches!(error, BackendError::Rejected(_)),
                "{mechanism:?}: {error}"
            );
            assert!(!error.to_string().contains(&token), "{error}");
        }
    })
    .await;
}

#[tokio::test]
async fn passwords_log_in_with_plain() {
    with_timeout(TEST_TIMEOUT, async {
        let upstream = TestUpstream::start().await;
        let port = upstream.dovecot.sieves_port;
        let connector = connector(&upstream, port, TlsMode::Implicit, MechanismSetting::Auto);
        let auth = |password: &str| UpstreamAuth::Password {
            user: PASSWORD_USER.to_owned(),
            password: Secret::new(password.to_owned()),
        };
        let session = backend::login(&connector, &auth(PASSWORD_USER_SECRET), None).await;
        assert!(session.unwrap().completion.starts_with("OK"));
        let wrong = "wrong-password-for-sieve";
        let error = backend::login(&connector, &auth(wrong), None)
            .await
            .err()
            .unwrap();
        assert!(matches!(error, BackendError::Rejected(_)), "{error}");
        assert!(!error.to_string().contains(wrong));
    })
    .await;
}

#[tokio::test]
async fn probe_reads_the_capabilities_after_starttls() {
    with_timeout(TEST_TIMEOUT, async {
        let upstream = TestUpstream::start().await;
        for (port, tls) in [
            (upstream.dovecot.sieve_port, TlsMode::Starttls),
            (upstream.dovecot.sieves_port, TlsMode::Implicit),
        ] {
            let connector = connector(&upstream, port, tls, MechanismSetting::Auto);
            let lines = backend::probe_capabilities(&connector).await.unwrap();
            let named = |name: &str| {
                lines
                    .iter()
                    .any(|line| line.starts_with(&format!("\"{name}\"")))
            };
            assert!(
                named("IMPLEMENTATION") && named("SIEVE") && named("VERSION"),
                "{lines:?}"
            );
            // After TLS, STARTTLS is no longer on offer (RFC 5804 2.2).
            assert!(!named("STARTTLS"), "{lines:?}");
            let sasl = lines
                .iter()
                .find(|line| line.starts_with("\"SASL\""))
                .unwrap();
            assert!(
                sasl.contains("XOAUTH2") && sasl.contains("OAUTHBEARER"),
                "{sasl}"
            );
        }
    })
    .await;
}
