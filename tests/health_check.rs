//! The health check of a pool's server, per protocol: against the real test Dovecot it opens a
//! session over plain TCP, STARTTLS and implicit TLS (and after a PROXY LOCAL header) and says
//! goodbye without authenticating; it fails against a closed port, a server that greets with a
//! refusal, and one that never greets.

mod support;

use std::io::ErrorKind;
use std::time::Duration;

use mailgate::config::{
    DEFAULT_MAX_CONCURRENT_CONNECTS, ForwardClient, MechanismSetting, TlsMode, UpstreamConfig,
};
use mailgate::frontend::MailProtocol;
use mailgate::imap::Imap;
use mailgate::login::BackendError;
use mailgate::managesieve::ManageSieve;
use mailgate::pop3::Pop3;
use mailgate::smtp::Smtp;
use mailgate::upstream::Connector;
use support::dovecot::DovecotOptions;
use support::scripted::{plain_connector, scripted_upstream};
use support::{TEST_TIMEOUT, TestCa, TestUpstream, eventually, with_timeout};
use tokio::net::TcpListener;

const HOSTNAME: &str = "mailgate.test";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Dovecot may take to write a session's last log line after closing it.
const LOG_WAIT: Duration = Duration::from_secs(10);
/// How Dovecot's login processes log a session that ended with LOGOUT or QUIT before any login.
const LOGGED_OUT: &str = "Disconnected: Aborted login by logging out (no auth attempts";

/// A connector to `port` on loopback, trusting `ca` (else the system's roots) for TLS.
fn connector(
    ca: Option<&TestCa>,
    port: u16,
    tls: TlsMode,
    forward_client: ForwardClient,
) -> Connector {
    mailgate::tls::install_crypto_provider();
    Connector::new(&UpstreamConfig {
        ca_file: ca.map(TestCa::ca_pem),
        system_roots: ca.is_none(),
        mechanism: MechanismSetting::Auto,
        connect_timeout: CONNECT_TIMEOUT,
        forward_client,
        max_concurrent_connects: DEFAULT_MAX_CONCURRENT_CONNECTS,
        ..UpstreamConfig::new("127.0.0.1".to_owned(), port, tls)
    })
    .unwrap()
}

/// The four protocols.
fn all() -> [&'static dyn MailProtocol; 4] {
    [&Imap, &Smtp, &Pop3, &ManageSieve]
}

/// Each protocol with its plain (STARTTLS offered) and implicit TLS ports.
fn protocols(up: &TestUpstream) -> [(&'static dyn MailProtocol, u16, u16); 4] {
    let dovecot = &up.dovecot;
    [
        (&Imap, dovecot.imap_port, dovecot.imaps_port),
        (&Smtp, dovecot.submission_port, dovecot.submissions_port),
        (&Pop3, dovecot.pop3_port, dovecot.pop3s_port),
        (&ManageSieve, dovecot.sieve_port, dovecot.sieves_port),
    ]
}

#[tokio::test]
async fn every_protocol_is_healthy_over_plain_starttls_and_implicit_tls_without_logging_in() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let logouts = || up.dovecot.log().matches(LOGGED_OUT).count();
        for (protocol, plain, implicit) in protocols(&up) {
            for (port, tls) in [
                (plain, TlsMode::None),
                (plain, TlsMode::Starttls),
                (implicit, TlsMode::Implicit),
            ] {
                let before = logouts();
                let connector = connector(Some(&up.ca), port, tls, ForwardClient::None);
                let name = protocol.name();
                let result = protocol.check_health(&connector, HOSTNAME).await;
                assert!(result.is_ok(), "{name:?} over {tls:?}: {result:?}");
                // The server logs the goodbye as such, not a dropped connection.
                let logged_out = eventually(LOG_WAIT, || async { logouts() == before + 1 }).await;
                assert!(logged_out, "{name:?} over {tls:?}\n{}", up.dovecot.log());
            }
        }
        let log = up.dovecot.log();
        assert!(log.contains("EHLO mailgate.test"), "{log}");
        assert!(
            !log.contains("auth failed") && !log.contains("Login:"),
            "{log}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_proxy_local_header_goes_first_where_the_server_requires_one() {
    with_timeout(TEST_TIMEOUT, async {
        let options = DovecotOptions {
            haproxy_trusted_networks: Some("127.0.0.1/32".to_owned()),
            ..DovecotOptions::default()
        };
        let up = TestUpstream::start_with(&options).await;
        let dovecot = &up.dovecot;
        for (protocol, port, tls) in [
            (
                &Imap as &dyn MailProtocol,
                dovecot.imaps_haproxy_port,
                TlsMode::Implicit,
            ),
            (&Smtp, dovecot.submission_haproxy_port, TlsMode::Starttls),
        ] {
            let connector = connector(Some(&up.ca), port, tls, ForwardClient::ProxyV2);
            protocol
                .check_health(&connector, HOSTNAME)
                .await
                .unwrap_or_else(|error| {
                    panic!("{:?}: {error}\n{}", protocol.name(), dovecot.log())
                });
        }
    })
    .await;
}

#[tokio::test]
async fn a_closed_port_is_unhealthy() {
    with_timeout(TEST_TIMEOUT, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let connector = plain_connector(port, MechanismSetting::Auto);
        for protocol in all() {
            let result = protocol.check_health(&connector, HOSTNAME).await;
            assert!(
                matches!(result, Err(BackendError::Io(_))),
                "{:?}: {result:?}",
                protocol.name()
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_refusing_greeting_is_unhealthy_and_its_text_made_safe() {
    with_timeout(TEST_TIMEOUT, async {
        for (protocol, greeting) in [
            (&Imap as &dyn MailProtocol, "* BYE Too busy \x1b[31m\r\n"),
            (&Smtp, "421 4.3.2 Too busy \x1b[31m\r\n"),
            (&Smtp, "554 5.3.2 Too busy \x1b[31m\r\n"),
            (&Pop3, "-ERR [SYS/TEMP] Too busy \x1b[31m\r\n"),
            (&ManageSieve, "BYE \"Too busy \x1b[31m\"\r\n"),
            (&ManageSieve, "NO \"Too busy\"\r\n"),
        ] {
            let (port, server) = scripted_upstream(vec![(None, greeting)]).await;
            let connector = plain_connector(port, MechanismSetting::Auto);
            let result = protocol.check_health(&connector, HOSTNAME).await;
            let Err(BackendError::Protocol(text)) = &result else {
                panic!("{greeting:?} gave {result:?}");
            };
            assert!(
                text.contains("Too busy") && !text.contains('\x1b'),
                "{text}"
            );
            assert!(server.await.unwrap().is_empty(), "nothing is sent");
        }
    })
    .await;
}

/// Time is paused: the deadlines pass as soon as nothing else can happen.
#[tokio::test(start_paused = true)]
async fn a_server_that_never_greets_is_unhealthy_within_the_deadlines() {
    // Never accepted: the kernel completes the handshake, and no byte ever comes.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    for tls in [TlsMode::None, TlsMode::Implicit] {
        let connector = connector(None, port, tls, ForwardClient::None);
        for protocol in all() {
            let check = protocol.check_health(&connector, HOSTNAME);
            let result = with_timeout(TEST_TIMEOUT, check).await;
            assert!(
                matches!(&result, Err(BackendError::Io(error)) if error.kind() == ErrorKind::TimedOut),
                "{:?} over {tls:?}: {result:?}",
                protocol.name()
            );
        }
    }
}
