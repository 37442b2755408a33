//! The POP3 upstream login against the real test Dovecot (oauth2 passdb checking tokens at the
//! introspection server): XOAUTH2 and OAUTHBEARER over POP3S and after STLS, a password by
//! AUTH PLAIN, a refused token, the response boundary following a real session, and a client
//! session through `frontend::serve` and the splice to Dovecot.

mod support;

use std::time::Duration;

use mailgate::config::DEFAULT_MAX_LINE_LENGTH;
use mailgate::config::{
    DEFAULT_MAX_CONCURRENT_CONNECTS, ForwardClient, MechanismSetting, TlsMode, UpstreamConfig,
};
use mailgate::frontend::settings::FrontendSettings;
use mailgate::frontend::{self, MailProtocol};
use mailgate::io::BoxedIo;
use mailgate::login::{
    Authenticator, BackendError, Closing, LoginError, LoginRequest, Upstream, UpstreamAuth,
};
use mailgate::pop3::boundary::ResponseBoundary;
use mailgate::pop3::{Pop3, backend};
use mailgate::secret::Secret;
use mailgate::splice::{Boundary, Counters, SpliceEnd, Stop, splice};
use mailgate::upstream::Connector;
use prometheus_client::metrics::counter::Counter;
use support::dovecot::{PASSWORD_USER, PASSWORD_USER_SECRET};
use support::scripted::{plain_connector, scripted_upstream};
use support::{TEST_TIMEOUT, TestUpstream, mint_token, with_timeout};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, duplex};

const USER: &str = "alice@example.org";
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const GREETING: &str = "+OK mx.test mailgate ready";

fn connector(up: &TestUpstream, tls: TlsMode, mechanism: MechanismSetting) -> Connector {
    let port = match tls {
        TlsMode::Implicit => up.dovecot.pop3s_port,
        TlsMode::Starttls | TlsMode::None => up.dovecot.pop3_port,
    };
    Connector::new(&UpstreamConfig {
        ca_file: Some(up.ca.ca_pem()),
        system_roots: false,
        mechanism,
        connect_timeout: STEP_TIMEOUT,
        forward_client: ForwardClient::None,
        max_concurrent_connects: DEFAULT_MAX_CONCURRENT_CONNECTS,
        ..UpstreamConfig::new("127.0.0.1".to_owned(), port, tls)
    })
    .unwrap()
}

/// A token the introspection server vouches for, for `user`.
fn token_for(up: &TestUpstream, user: &str) -> UpstreamAuth {
    let token = mint_token();
    up.introspection.add_token(&token, user);
    UpstreamAuth::Bearer {
        user: user.to_owned(),
        token: Secret::new(token),
    }
}

/// Sends `command` and reads one line of the answer.
async fn command(io: &mut BufReader<BoxedIo>, command: &str) -> String {
    io.get_mut().write_all(command.as_bytes()).await.unwrap();
    read_line(io).await
}

async fn read_line(io: &mut BufReader<BoxedIo>) -> String {
    let mut line = String::new();
    tokio::time::timeout(STEP_TIMEOUT, io.read_line(&mut line))
        .await
        .expect("upstream answered in time")
        .unwrap();
    line
}

/// Logs in with `auth`, then checks the session is in the TRANSACTION state.
async fn logs_in(up: &TestUpstream, tls: TlsMode, mechanism: MechanismSetting, auth: UpstreamAuth) {
    let connector = connector(up, tls, mechanism);
    let upstream = backend::login(&connector, &auth, None)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", up.dovecot.log()));
    assert!(
        upstream.completion.starts_with("+OK"),
        "{}",
        upstream.completion
    );
    let mut io = BufReader::new(upstream.io);
    assert!(command(&mut io, "STAT\r\n").await.starts_with("+OK 0 0"));
    assert!(command(&mut io, "QUIT\r\n").await.starts_with("+OK"));
}

#[tokio::test]
async fn xoauth2_over_pop3s() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let auth = token_for(&up, USER);
        logs_in(&up, TlsMode::Implicit, MechanismSetting::Xoauth2, auth).await;
        assert!(up.dovecot.log().contains("method=XOAUTH2"));
    })
    .await;
}

#[tokio::test]
async fn oauthbearer_after_stls() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let auth = token_for(&up, USER);
        logs_in(&up, TlsMode::Starttls, MechanismSetting::Oauthbearer, auth).await;
        assert!(up.dovecot.log().contains("method=OAUTHBEARER"));
    })
    .await;
}

#[tokio::test]
async fn auto_picks_xoauth2_after_stls_and_a_password_uses_plain() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let auth = token_for(&up, USER);
        logs_in(&up, TlsMode::Starttls, MechanismSetting::Auto, auth).await;
        let password = UpstreamAuth::Password {
            user: PASSWORD_USER.to_owned(),
            password: Secret::new(PASSWORD_USER_SECRET.to_owned()),
        };
        logs_in(&up, TlsMode::Implicit, MechanismSetting::Auto, password).await;
        let log = up.dovecot.log();
        assert!(log.contains("method=XOAUTH2"), "{log}");
        assert!(log.contains("method=PLAIN"), "{log}");
    })
    .await;
}

#[tokio::test]
async fn a_refused_token_is_a_rejection_without_the_secret_for_either_mechanism() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        for (tls, mechanism) in [
            (TlsMode::Implicit, MechanismSetting::Xoauth2),
            (TlsMode::Starttls, MechanismSetting::Oauthbearer),
        ] {
            // Never given to the introspection server: Dovecot refuses it.
            let token = mint_token();
            let auth = UpstreamAuth::Bearer {
                user: USER.to_owned(),
                token: Secret::new(token.clone()),
            };
            let connector = connector(&up, tls, mechanism);
            let error = backend::login(&connector, &auth, None).await.err().unwrap();
            assert!(
                matches!(error, BackendError::Rejected(_)),
                "{mechanism:?}: {error:?}"
            );
            let text = format!("{error} {error:?}");
            assert!(!text.contains(&token), "{text}");
        }
    })
    .await;
}

/// Reads from `io` into `boundary` until it is at a boundary; what was read.
async fn until_boundary(io: &mut BoxedIo, boundary: &mut ResponseBoundary) -> String {
    let mut read = Vec::new();
    while !boundary.at_boundary() {
        let mut chunk = [0u8; 7];
        let n = tokio::time::timeout(STEP_TIMEOUT, io.read(&mut chunk))
            .await
            .expect("upstream answered in time")
            .unwrap();
        assert!(
            n > 0,
            "upstream closed after {:?}",
            String::from_utf8_lossy(&read)
        );
        boundary.observe(&chunk[..n]);
        read.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(read).unwrap()
}

#[tokio::test]
async fn the_boundary_follows_pipelined_multi_line_responses_of_a_real_session() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        // Dot-stuffed on the wire both ways: stored as `.leading dot`.
        let body = "Subject: hello\r\n\r\n..leading dot\r\nbye\r\n";
        up.dovecot.deliver(USER, body).await;
        let auth = token_for(&up, USER);
        let connector = connector(&up, TlsMode::Implicit, MechanismSetting::Auto);
        let mut upstream = backend::login(&connector, &auth, None).await.unwrap();
        let mut boundary = ResponseBoundary::default();
        assert!(boundary.at_boundary());
        // Read in 7-byte pieces, so lines and the final `.` arrive split.
        let commands = "STAT\r\nCAPA\r\nLIST\r\nUIDL 1\r\nRETR 1\r\nTOP 1 0\r\nRETR 9\r\n";
        boundary.observe_request(commands.as_bytes());
        upstream.io.write_all(commands.as_bytes()).await.unwrap();
        let read = until_boundary(&mut upstream.io, &mut boundary).await;
        assert!(read.starts_with("+OK 1 "), "{read}");
        assert!(read.contains("\r\n..leading dot\r\nbye\r\n.\r\n"), "{read}");
        assert!(read.ends_with("-ERR There's no message 9.\r\n"), "{read}");
        let mut rest = [0u8; 1];
        let more = tokio::time::timeout(Duration::from_millis(200), upstream.io.read(&mut rest));
        assert!(more.await.is_err(), "more than the answers owed");
        boundary.observe_request(b"QUIT\r\n");
        upstream.io.write_all(b"QUIT\r\n").await.unwrap();
        assert!(
            until_boundary(&mut upstream.io, &mut boundary)
                .await
                .starts_with("+OK")
        );
    })
    .await;
}

#[tokio::test]
async fn a_token_too_long_for_the_auth_line_goes_after_the_challenge() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        let token = format!("{}-{}", mint_token(), "x".repeat(400));
        up.introspection.add_token(&token, USER);
        let auth = UpstreamAuth::Bearer {
            user: USER.to_owned(),
            token: Secret::new(token),
        };
        logs_in(&up, TlsMode::Implicit, MechanismSetting::Oauthbearer, auth).await;
    })
    .await;
}

// ---- against a scripted upstream, for what Dovecot does not show ----

const CAPA: &str = "+OK\r\nUSER\r\nSASL PLAIN XOAUTH2 OAUTHBEARER\r\n.\r\n";

/// RFC 7628 3.2.3: the error challenge is acknowledged as the mechanism wants before the
/// server sends its `-ERR`; the refusal's response code decides whether it is a rejection.
async fn refused_after(
    mechanism: MechanismSetting,
    acknowledgement: &str,
    refusal: &'static str,
) -> BackendError {
    let (port, server) = scripted_upstream(vec![
        (None, "+OK ready\r\n"),
        (Some("CAPA"), CAPA),
        (Some("AUTH "), "+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
        (Some(""), refusal),
    ])
    .await;
    let auth = UpstreamAuth::Bearer {
        user: USER.to_owned(),
        token: Secret::new("tok-Zq81x-secret".to_owned()),
    };
    let error = backend::login(&plain_connector(port, mechanism), &auth, None)
        .await
        .err()
        .unwrap();
    let received = server.await.unwrap();
    assert_eq!(received[2], acknowledgement);
    assert!(
        !format!("{error} {error:?}").contains("tok-Zq81x"),
        "{error}"
    );
    error
}

#[tokio::test]
async fn error_challenges_are_acknowledged_per_mechanism_and_refusals_classified() {
    with_timeout(TEST_TIMEOUT, async {
        let error = refused_after(
            MechanismSetting::Xoauth2,
            "",
            "-ERR [AUTH] Authentication failed.\r\n",
        )
        .await;
        assert!(matches!(error, BackendError::Rejected(_)), "{error:?}");
        let error = refused_after(
            MechanismSetting::Oauthbearer,
            "AQ==",
            "-ERR [SYS/TEMP] Try later, tok-Zq81x-secret\r\n",
        )
        .await;
        assert!(matches!(error, BackendError::Protocol(_)), "{error:?}");
    })
    .await;
}

#[tokio::test]
async fn an_initial_response_too_long_for_the_auth_line_waits_for_the_challenge() {
    with_timeout(TEST_TIMEOUT, async {
        let (port, server) = scripted_upstream(vec![
            (None, "+OK ready\r\n"),
            (Some("CAPA"), CAPA),
            (Some("AUTH XOAUTH2"), "+ \r\n"),
            (Some(""), "+OK Logged in.\r\n"),
        ])
        .await;
        let auth = UpstreamAuth::Bearer {
            user: USER.to_owned(),
            token: Secret::new("t".repeat(300)),
        };
        let connector = plain_connector(port, MechanismSetting::Auto);
        let upstream = backend::login(&connector, &auth, None).await.unwrap();
        assert_eq!(upstream.completion, "+OK Logged in.");
        let received = server.await.unwrap();
        assert_eq!(received[1], "AUTH XOAUTH2");
        assert!(received[2].len() + 2 > backend::MAX_INITIAL_RESPONSE_LINE);
    })
    .await;
}

#[tokio::test]
async fn bytes_after_the_stls_answer_are_refused_not_read_as_if_encrypted() {
    with_timeout(TEST_TIMEOUT, async {
        let ca = support::TestCa::create().await;
        let (port, _server) = scripted_upstream(vec![
            (None, "+OK ready\r\n"),
            (Some("CAPA"), "+OK\r\nSTLS\r\nSASL XOAUTH2\r\n.\r\n"),
            (Some("STLS"), "+OK Begin TLS\r\n+OK Logged in.\r\n"),
        ])
        .await;
        let connector = Connector::new(&UpstreamConfig {
            ca_file: Some(ca.ca_pem()),
            system_roots: false,
            mechanism: MechanismSetting::Auto,
            connect_timeout: STEP_TIMEOUT,
            forward_client: ForwardClient::None,
            max_concurrent_connects: DEFAULT_MAX_CONCURRENT_CONNECTS,
            ..UpstreamConfig::new("127.0.0.1".to_owned(), port, TlsMode::Starttls)
        })
        .unwrap();
        let auth = UpstreamAuth::Bearer {
            user: USER.to_owned(),
            token: Secret::new("tok".to_owned()),
        };
        let error = backend::login(&connector, &auth, None).await.err().unwrap();
        assert!(
            matches!(&error, BackendError::Protocol(text) if text.contains("after its STLS")),
            "{error:?}"
        );
    })
    .await;
}

/// Logs every client in upstream with one token, whatever password it gave.
struct ToDovecot {
    connector: Connector,
    token: String,
}

impl Authenticator for ToDovecot {
    async fn login(&self, request: LoginRequest) -> Result<Upstream, LoginError> {
        let auth = UpstreamAuth::Bearer {
            user: request.credentials.account,
            token: Secret::new(self.token.clone()),
        };
        backend::login(&self.connector, &auth, None)
            .await
            .map_err(|_| LoginError::UpstreamRejected)
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        Vec::new()
    }
}

#[tokio::test]
async fn commands_pipelined_with_the_login_reach_the_real_upstream_through_the_splice() {
    with_timeout(TEST_TIMEOUT, async {
        let up = TestUpstream::start().await;
        up.dovecot
            .deliver(USER, "Subject: pipelined\r\n\r\nhello\r\n")
            .await;
        let token = mint_token();
        up.introspection.add_token(&token, USER);
        let authenticator = ToDovecot {
            connector: connector(&up, TlsMode::Starttls, MechanismSetting::Auto),
            token,
        };
        let settings = FrontendSettings {
            hostname: "mx.test".to_owned(),
            pre_auth_timeout: STEP_TIMEOUT,
            pre_auth_lifetime: TEST_TIMEOUT,
            client: None,
            starttls: None,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            max_literal_size: 0,
            local: None,
        };
        let (mut client, server) = duplex(64 * 1024);
        // One write: the login and every command after it.
        let commands = "STAT\r\nRETR 1\r\nQUIT\r\n";
        client
            .write_all(format!("USER {USER}\r\nPASS anything\r\n{commands}").as_bytes())
            .await
            .unwrap();
        let dialogue = Pop3.dialogue(&settings);
        let never = std::future::pending::<Closing>();
        let handoff = frontend::serve(Box::new(server), &authenticator, dialogue, &settings, never)
            .await
            .unwrap()
            .expect("logged in");
        let mut upstream = handoff.upstream.io;
        let mut session = handoff.client;
        let splice = tokio::spawn(async move {
            let counters = Counters {
                client_to_upstream: Counter::default(),
                upstream_to_client: Counter::default(),
            };
            let mut boundary = Pop3.boundary();
            let stop = Stop {
                signal: std::future::pending::<()>(),
                flush_timeout: STEP_TIMEOUT,
            };
            splice(
                &mut session,
                &mut upstream,
                STEP_TIMEOUT,
                &counters,
                boundary.as_mut(),
                stop,
            )
            .await
        });
        let mut transcript = String::new();
        client.read_to_string(&mut transcript).await.unwrap();
        // The upstream closed after QUIT; the client follows.
        drop(client);
        let (result, _) = splice.await.unwrap();
        assert_eq!(result.unwrap(), SpliceEnd::Closed);
        let lines: Vec<&str> = transcript.split("\r\n").collect();
        assert_eq!(lines[0], GREETING);
        assert_eq!(lines[1], "+OK Send PASS");
        assert!(lines[2].starts_with("+OK"), "{transcript}");
        assert!(lines[3].starts_with("+OK 1 "), "{transcript}");
        assert!(
            transcript.contains("Subject: pipelined\r\n\r\nhello\r\n.\r\n+OK Logging out"),
            "{transcript}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_endless_challenge_loop_and_a_ten_megabyte_capa_are_refused() {
    with_timeout(TEST_TIMEOUT, async {
        let auth = UpstreamAuth::Bearer {
            user: USER.to_owned(),
            token: Secret::new("tok-Zq81x-secret".to_owned()),
        };
        // Challenges after the acknowledgement are not answered again.
        let (port, _server) = scripted_upstream(vec![
            (None, "+OK ready\r\n"),
            (Some("CAPA"), CAPA),
            (Some("AUTH "), "+ \r\n"),
            (Some(""), "+ \r\n"),
            (Some(""), "+ \r\n"),
        ])
        .await;
        let connector = plain_connector(port, MechanismSetting::Xoauth2);
        let error = backend::login(&connector, &auth, None).await.err().unwrap();
        assert!(matches!(error, BackendError::Protocol(_)), "{error}");

        // Ten megabytes of capability lines: refused after a bounded number of them.
        let capa = format!("+OK\r\n{}.\r\n", "X-JUNK\r\n".repeat(1_250_000)).leak();
        let (port, _server) =
            scripted_upstream(vec![(None, "+OK ready\r\n"), (Some("CAPA"), capa)]).await;
        let connector = plain_connector(port, MechanismSetting::Xoauth2);
        let error = backend::login(&connector, &auth, None).await.err().unwrap();
        assert!(matches!(error, BackendError::Protocol(_)), "{error}");
    })
    .await;
}
