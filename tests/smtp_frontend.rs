//! Transcript tests for the SMTP front end over in-memory streams, and for the SMTP backend
//! against a scripted fake server on loopback.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailgate::config::{MechanismSetting, TlsMode, UpstreamConfig};
use mailgate::frontend::settings::FrontendSettings;
use mailgate::io::BoxedIo;
use mailgate::login::{
    Authenticator, BackendError, Handoff, LoginError, LoginRequest, Upstream, UpstreamAuth,
};
use mailgate::sasl::{Mechanism, encode_base64, plain_message};
use mailgate::secret::Secret;
use mailgate::smtp::{backend, frontend};
use mailgate::upstream::Connector;
use tokio::io::{
    AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the stand-in upstream answers a login; relayed to the client as is.
const UPSTREAM_COMPLETION: &str = "235 2.7.0 Logged in (upstream)";
/// Every wait in these tests is bounded by this.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const PRE_AUTH_LIFETIME: Duration = Duration::from_secs(300);
const UPSTREAM_EXTENSIONS: [&str; 6] = [
    "SIZE 1000",
    "8BITMIME",
    "AUTH XOAUTH2 OAUTHBEARER",
    "STARTTLS",
    "PIPELINING",
    "CHUNKING",
];

/// Password `right` logs in, `down` finds the upstream unavailable, anything else is refused.
#[derive(Default)]
struct StandIn {
    helo: Mutex<Option<String>>,
}

impl Authenticator for StandIn {
    async fn login(&self, request: LoginRequest) -> Result<Upstream, LoginError> {
        *self.helo.lock().unwrap() = request.helo;
        match request.credentials.password.expose().as_str() {
            "right" => {
                let (near, _far) = tokio::io::duplex(64);
                Ok(Upstream {
                    io: Box::new(near),
                    completion: UPSTREAM_COMPLETION.to_owned(),
                    account: None,
                    xclient_guard: None,
                })
            }
            "down" => Err(LoginError::UpstreamUnavailable),
            _ => Err(LoginError::BadCredentials),
        }
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        UPSTREAM_EXTENSIONS
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }
}

type Outcome = io::Result<Option<Handoff<BoxedIo>>>;

struct Transcript {
    reader: BufReader<ReadHalf<DuplexStream>>,
    writer: WriteHalf<DuplexStream>,
    session: JoinHandle<Outcome>,
    authenticator: Arc<StandIn>,
    /// Dropping it tells the session that mailgate is shutting down.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Transcript {
    fn start(pre_auth_timeout: Duration) -> Self {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let authenticator = Arc::new(StandIn::default());
        let settings = FrontendSettings {
            hostname: "mx".to_owned(),
            pre_auth_timeout,
            pre_auth_lifetime: PRE_AUTH_LIFETIME,
            client: None,
            starttls: None,
            max_line_length: mailgate::config::DEFAULT_MAX_LINE_LENGTH,
            max_literal_size: mailgate::config::DEFAULT_MAX_LITERAL_SIZE,
            local: None,
        };
        let shared = Arc::clone(&authenticator);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
                mailgate::login::Closing::ShuttingDown
            };
            frontend::serve(Box::new(server), shared.as_ref(), &settings, stop).await
        });
        let (read, writer) = tokio::io::split(client);
        Self {
            reader: BufReader::new(read),
            writer,
            session,
            authenticator,
            stop: Some(stop),
        }
    }

    /// A session past the greeting and EHLO.
    async fn greeted() -> Self {
        let mut transcript = Self::start(Duration::from_secs(30));
        transcript.expect("220 mx ESMTP mailgate").await;
        transcript.send("EHLO client.example\r\n").await;
        transcript.expect_until("250 AUTH PLAIN LOGIN").await;
        transcript
    }

    async fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).await.unwrap();
    }

    async fn line(&mut self) -> String {
        self.line_within(STEP_TIMEOUT).await
    }

    async fn line_within(&mut self, limit: Duration) -> String {
        let mut line = String::new();
        tokio::time::timeout(limit, self.reader.read_line(&mut line))
            .await
            .expect("reply in time")
            .unwrap();
        line
    }

    async fn expect(&mut self, expected: &str) {
        assert_eq!(self.line().await, format!("{expected}\r\n"));
    }

    async fn expect_until(&mut self, last: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            assert!(!line.is_empty(), "closed before {last:?}: {lines:?}");
            let line = line.trim_end().to_owned();
            lines.push(line.clone());
            if line == last {
                return lines;
            }
        }
    }

    async fn expect_closed(mut self) -> Outcome {
        assert_eq!(self.line().await, "");
        tokio::time::timeout(STEP_TIMEOUT, self.session)
            .await
            .expect("session ends")
            .unwrap()
    }

    async fn finish(self) -> Outcome {
        tokio::time::timeout(STEP_TIMEOUT, self.session)
            .await
            .expect("session ends")
            .unwrap()
    }
}

/// `\0alice\0right`
const ALICE_RIGHT: &str = "AGFsaWNlAHJpZ2h0";
/// `\0alice\0wrong`
const ALICE_WRONG: &str = "AGFsaWNlAHdyb25n";
/// `\0alice\0down`
const ALICE_DOWN: &str = "AGFsaWNlAGRvd24=";

fn handoff(outcome: Outcome) -> Handoff<BoxedIo> {
    outcome.unwrap().expect("a handoff")
}

#[tokio::test]
async fn ehlo_relays_upstream_extensions_but_offers_its_own_auth() {
    let mut t = Transcript::start(Duration::from_secs(30));
    t.expect("220 mx ESMTP mailgate").await;
    t.send("EHLO client.example\r\n").await;
    let lines = t.expect_until("250 AUTH PLAIN LOGIN").await;
    assert_eq!(
        lines,
        [
            "250-mx",
            "250-SIZE 1000",
            "250-8BITMIME",
            "250-PIPELINING",
            "250-CHUNKING",
            "250-ENHANCEDSTATUSCODES",
            "250 AUTH PLAIN LOGIN",
        ]
    );
    t.send("HELO other.example\r\n").await;
    t.expect("250 mx").await;
    t.send("QUIT\r\n").await;
    t.expect("221 2.0.0 Bye").await;
    assert!(t.expect_closed().await.unwrap().is_none());
}

#[tokio::test]
async fn auth_plain_with_initial_response() {
    let mut t = Transcript::greeted().await;
    t.send(&format!("AUTH PLAIN {ALICE_RIGHT}\r\n")).await;
    t.expect(UPSTREAM_COMPLETION).await;
    let authenticator = Arc::clone(&t.authenticator);
    let handoff = handoff(t.finish().await);
    assert_eq!(handoff.account, "alice");
    assert_eq!(
        authenticator.helo.lock().unwrap().as_deref(),
        Some("client.example")
    );
}

#[tokio::test]
async fn auth_plain_after_empty_challenge() {
    let mut t = Transcript::greeted().await;
    t.send("AUTH PLAIN\r\n").await;
    t.expect("334 ").await;
    t.send(&format!("{ALICE_RIGHT}\r\n")).await;
    t.expect(UPSTREAM_COMPLETION).await;
    assert_eq!(handoff(t.finish().await).account, "alice");
}

#[tokio::test]
async fn auth_login() {
    let mut t = Transcript::greeted().await;
    t.send("AUTH LOGIN\r\n").await;
    t.expect("334 VXNlcm5hbWU6").await;
    t.send("YWxpY2U=\r\n").await;
    t.expect("334 UGFzc3dvcmQ6").await;
    t.send("cmlnaHQ=\r\n").await;
    t.expect(UPSTREAM_COMPLETION).await;
    assert_eq!(handoff(t.finish().await).account, "alice");
}

#[tokio::test]
async fn cancelled_auth_leaves_the_session_usable() {
    let mut t = Transcript::greeted().await;
    t.send("AUTH LOGIN\r\n").await;
    t.expect("334 VXNlcm5hbWU6").await;
    t.send("*\r\n").await;
    t.expect("501 5.7.0 Authentication cancelled").await;
    t.send("NOOP\r\n").await;
    t.expect("250 2.0.0 OK").await;
}

#[tokio::test]
async fn malformed_auth_commands() {
    let mut t = Transcript::start(Duration::from_secs(30));
    t.expect("220 mx ESMTP mailgate").await;
    t.send(&format!("AUTH PLAIN {ALICE_RIGHT}\r\n")).await;
    t.expect("503 5.5.1 Send EHLO first").await;
    t.send("EHLO client.example\r\n").await;
    t.expect_until("250 AUTH PLAIN LOGIN").await;
    t.send("AUTH CRAM-MD5\r\n").await;
    t.expect("504 5.5.4 Unrecognized authentication type").await;
    t.send("AUTH PLAIN !!!\r\n").await;
    t.expect("501 5.5.2 Invalid base64 data").await;
    t.send("AUTH\r\n").await;
    t.expect("501 5.5.4 Syntax error in parameters").await;
}

#[tokio::test]
async fn wrong_password_then_right_one() {
    let mut t = Transcript::greeted().await;
    t.send(&format!("AUTH PLAIN {ALICE_WRONG}\r\n")).await;
    t.expect("535 5.7.8 Authentication credentials invalid")
        .await;
    t.send(&format!("AUTH PLAIN {ALICE_RIGHT}\r\n")).await;
    t.expect(UPSTREAM_COMPLETION).await;
    assert_eq!(handoff(t.finish().await).account, "alice");
}

#[tokio::test]
async fn three_failed_logins_close_the_session() {
    let mut t = Transcript::greeted().await;
    for _ in 0..3 {
        t.send(&format!("AUTH PLAIN {ALICE_WRONG}\r\n")).await;
        t.expect("535 5.7.8 Authentication credentials invalid")
            .await;
    }
    t.expect("421 4.7.0 Too many authentication failures, closing connection")
        .await;
    assert!(t.expect_closed().await.unwrap().is_none());
}

#[tokio::test]
async fn unavailable_upstream_is_temporary() {
    let mut t = Transcript::greeted().await;
    t.send(&format!("AUTH PLAIN {ALICE_DOWN}\r\n")).await;
    t.expect("454 4.7.0 Temporary authentication failure").await;
}

#[tokio::test]
async fn mail_needs_authentication() {
    let mut t = Transcript::greeted().await;
    t.send("MAIL FROM:<alice@example.org>\r\n").await;
    t.expect("530 5.7.0 Authentication required").await;
    t.send("RCPT TO:<bob@example.org>\r\n").await;
    t.expect("530 5.7.0 Authentication required").await;
    // RFC 3030 2: the refused chunk is swallowed, not read as commands.
    t.send("BDAT 10 LAST\r\nNOOP\r\nxx\r\nRSET\r\n").await;
    t.expect("530 5.7.0 Authentication required").await;
    t.expect("250 2.0.0 OK").await;
    t.send("STARTTLS\r\n").await;
    t.expect("502 5.5.1 Command not implemented").await;
    t.send("QUIT\r\n").await;
    t.expect("221 2.0.0 Bye").await;
    assert!(t.expect_closed().await.unwrap().is_none());
}

#[tokio::test]
async fn garbage_and_oversized_lines() {
    let mut t = Transcript::greeted().await;
    t.send("BLAH\r\n").await;
    t.expect("500 5.5.2 Command unrecognized").await;
    t.send("\x01\x02\x03\r\n").await;
    t.expect("501 5.5.2 Control characters are not allowed")
        .await;
    t.send(&format!("NOOP {}\r\n", "x".repeat(600))).await;
    t.expect("500 5.5.2 Line too long").await;
    t.send(&format!("NOOP {}\r\n", "x".repeat(100_000))).await;
    t.expect("500 5.5.2 Line too long").await;
    t.send("NOOP\r\n").await;
    t.expect("250 2.0.0 OK").await;
}

#[tokio::test]
async fn pipelined_commands_after_auth_reach_the_upstream() {
    let mut t = Transcript::start(Duration::from_secs(30));
    t.expect("220 mx ESMTP mailgate").await;
    t.send(&format!(
        "EHLO c.example\r\nNOOP\r\nAUTH PLAIN {ALICE_RIGHT}\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<b"
    ))
    .await;
    t.expect_until("250 AUTH PLAIN LOGIN").await;
    t.expect("250 2.0.0 OK").await;
    t.expect(UPSTREAM_COMPLETION).await;
    let (prefix, _client) = handoff(t.finish().await).client.into_parts();
    assert_eq!(prefix, b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<b");
}

#[tokio::test]
async fn client_closing_ends_the_session() {
    let mut t = Transcript::greeted().await;
    t.writer.shutdown().await.unwrap();
    assert!(t.finish().await.unwrap().is_none());
}

#[tokio::test]
async fn ehlo_names_with_control_characters_or_nothing_are_refused() {
    let mut t = Transcript::start(Duration::from_secs(30));
    t.expect("220 mx ESMTP mailgate").await;
    t.send("EHLO evil\0name\r\n").await;
    t.expect("501 5.5.2 Control characters are not allowed")
        .await;
    t.send("EHLO a\rb\r\n").await;
    t.expect("501 5.5.2 Control characters are not allowed")
        .await;
    t.send("EHLO \u{85}name\r\n").await;
    t.expect("501 5.5.4 Invalid domain name").await;
    // Not greeted: AUTH still needs a good EHLO.
    t.send(&format!("AUTH PLAIN {ALICE_RIGHT}\r\n")).await;
    t.expect("503 5.5.1 Send EHLO first").await;
    t.send("EHLO [192.0.2.1]\r\n").await;
    t.expect_until("250 AUTH PLAIN LOGIN").await;
}

#[tokio::test]
async fn shutting_down_says_421_between_commands() {
    let mut t = Transcript::greeted().await;
    t.send("NOO").await;
    t.stop.take();
    t.expect("421 4.3.2 mx Service shutting down").await;
    assert!(t.expect_closed().await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_busy_client_is_closed_when_its_lifetime_ends() {
    let mut t = Transcript::start(Duration::from_secs(60));
    t.expect("220 mx ESMTP mailgate").await;
    let started = tokio::time::Instant::now();
    // A NOOP well within every idle timeout, again and again.
    while started.elapsed() < PRE_AUTH_LIFETIME - Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(30)).await;
        t.send("NOOP\r\n").await;
        t.expect("250 2.0.0 OK").await;
    }
    let line = t.line_within(Duration::from_secs(3600)).await;
    assert_eq!(line, "421 4.4.2 mx Too long without authenticating\r\n");
    assert!(started.elapsed() >= PRE_AUTH_LIFETIME - Duration::from_secs(1));
    assert!(t.expect_closed().await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_commands_are_always_waiting_is_closed_at_its_lifetime() {
    let mut t = Transcript::start(Duration::from_secs(60));
    t.expect("220 mx ESMTP mailgate").await;
    // Input for many reads, all of it there before mailgate reads: no read ever waits, so
    // the read's deadline never fires; only a check between commands sees the lifetime end.
    let commands = 4096;
    t.send(&"NOOP\r\n".repeat(commands)).await;
    tokio::time::advance(PRE_AUTH_LIFETIME).await;
    let mut answered = 0;
    loop {
        let line = t.line().await;
        if line != "250 2.0.0 OK\r\n" {
            assert_eq!(line, "421 4.4.2 mx Too long without authenticating\r\n");
            break;
        }
        answered += 1;
    }
    assert!(
        answered < commands,
        "all {answered} answered past the lifetime"
    );
    assert!(t.expect_closed().await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn silent_client_times_out() {
    let mut t = Transcript::start(Duration::from_secs(60));
    t.expect("220 mx ESMTP mailgate").await;
    t.send("NOOP\r\nNO").await;
    t.expect("250 2.0.0 OK").await;
    let started = tokio::time::Instant::now();
    let line = t.line_within(Duration::from_secs(3600)).await;
    assert_eq!(line, "421 4.4.2 mx Timeout\r\n");
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(t.expect_closed().await.unwrap().is_none());
}

// ---- backend against a scripted upstream ----

/// One step of a fake upstream: optionally read a client line starting with the prefix, then send.
type Script = Vec<(Option<&'static str>, &'static str)>;

/// Serves one connection by `script`, then echoes `250 2.0.0 OK` to any further line until the
/// client closes; yields the lines it read.
async fn fake_upstream(script: Script) -> (u16, JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut received = Vec::new();
        for (expect, reply) in script {
            if let Some(prefix) = expect {
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                assert!(line.starts_with(prefix), "{line:?} lacks {prefix:?}");
                received.push(line.trim_end_matches("\r\n").to_owned());
            }
            write.write_all(reply.as_bytes()).await.unwrap();
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return received;
            }
            received.push(line.trim_end_matches("\r\n").to_owned());
            write.write_all(b"250 2.0.0 OK\r\n").await.unwrap();
        }
    });
    (port, task)
}

fn connector(port: u16, mechanism: MechanismSetting) -> Connector {
    Connector::new(&UpstreamConfig {
        ca_file: None,
        system_roots: false,
        mechanism,
        connect_timeout: STEP_TIMEOUT,
        forward_client: mailgate::config::ForwardClient::None,
        max_concurrent_connects: mailgate::config::DEFAULT_MAX_CONCURRENT_CONNECTS,
        ..UpstreamConfig::new("127.0.0.1".to_owned(), port, TlsMode::None)
    })
    .unwrap()
}

fn bearer(token: &str) -> UpstreamAuth {
    UpstreamAuth::Bearer {
        user: "alice@example.org".to_owned(),
        token: Secret::new(token.to_owned()),
    }
}

fn encoded(mechanism: Mechanism, token: &str, port: u16) -> String {
    let message = mechanism.initial_response(
        "alice@example.org",
        &Secret::new(token.to_owned()),
        "127.0.0.1",
        port,
    );
    encode_base64(&message).expose().clone()
}

const GREETING: &str = "220-fake.example ESMTP\r\n220 second greeting line\r\n";
const EHLO_REPLY: &str =
    "250-fake.example\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n";

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .expect("in time")
}

#[tokio::test]
async fn short_token_goes_on_the_auth_line() {
    let (port, server) = fake_upstream(vec![
        (None, GREETING),
        (Some("EHLO client.example"), EHLO_REPLY),
        (Some("AUTH XOAUTH2 "), "235 2.7.0 Accepted\r\n"),
    ])
    .await;
    let connector = connector(port, MechanismSetting::Auto);
    let mut upstream = within(backend::login(
        &connector,
        &bearer("tok"),
        "client.example",
        None,
    ))
    .await
    .unwrap();
    assert_eq!(upstream.completion, "235 2.7.0 Accepted");
    // Nothing is lost between the login and the splice.
    upstream.io.write_all(b"MAIL FROM:<a@b>\r\n").await.unwrap();
    let mut reply = [0u8; 14];
    within(upstream.io.read_exact(&mut reply)).await.unwrap();
    assert_eq!(&reply, b"250 2.0.0 OK\r\n");
    drop(upstream);
    let received = within(server).await.unwrap();
    let expected = format!("AUTH XOAUTH2 {}", encoded(Mechanism::XOAuth2, "tok", port));
    assert!(expected.len() + 2 <= backend::MAX_INITIAL_RESPONSE_LINE);
    assert_eq!(received[1], expected);
    assert_eq!(received[2], "MAIL FROM:<a@b>");
}

#[tokio::test]
async fn long_token_goes_after_the_challenge() {
    let token = "t".repeat(800);
    let (port, server) = fake_upstream(vec![
        (None, GREETING),
        (Some("EHLO client.example"), EHLO_REPLY),
        (Some("AUTH OAUTHBEARER"), "334 \r\n"),
        (Some(""), "235 2.7.0 Accepted\r\n"),
    ])
    .await;
    let connector = connector(port, MechanismSetting::Oauthbearer);
    let upstream = within(backend::login(
        &connector,
        &bearer(&token),
        "client.example",
        None,
    ))
    .await
    .unwrap();
    drop(upstream);
    let received = within(server).await.unwrap();
    assert_eq!(received[1], "AUTH OAUTHBEARER");
    assert_eq!(received[2], encoded(Mechanism::OAuthBearer, &token, port));
}

async fn refused_with_challenge(mechanism: MechanismSetting, acknowledgement: &str) {
    let (port, server) = fake_upstream(vec![
        (None, "220 fake.example ESMTP\r\n"),
        (Some("EHLO client.example"), EHLO_REPLY),
        (Some("AUTH "), "334 eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
        (Some(""), "535 5.7.8 Authentication failed\r\n"),
    ])
    .await;
    let connector = connector(port, mechanism);
    let error = within(backend::login(
        &connector,
        &bearer("tok"),
        "client.example",
        None,
    ))
    .await
    .err()
    .unwrap();
    assert!(
        matches!(&error, BackendError::Rejected(text) if text == "535 5.7.8 Authentication failed"),
        "{error:?}"
    );
    let received = within(server).await.unwrap();
    assert_eq!(received[2], acknowledgement);
}

#[tokio::test]
async fn xoauth2_failure_challenge_is_acknowledged_with_an_empty_line() {
    refused_with_challenge(MechanismSetting::Xoauth2, "").await;
}

#[tokio::test]
async fn oauthbearer_failure_challenge_is_acknowledged_with_0x01() {
    refused_with_challenge(MechanismSetting::Oauthbearer, "AQ==").await;
}

#[tokio::test]
async fn password_login_uses_plain() {
    let (port, server) = fake_upstream(vec![
        (None, GREETING),
        (Some("EHLO client.example"), EHLO_REPLY),
        (Some("AUTH PLAIN "), "235 2.7.0 Accepted\r\n"),
    ])
    .await;
    let connector = connector(port, MechanismSetting::Auto);
    let password = Secret::new("pw".to_owned());
    let auth = UpstreamAuth::Password {
        user: "alice".to_owned(),
        password: password.clone(),
    };
    drop(
        within(backend::login(&connector, &auth, "client.example", None))
            .await
            .unwrap(),
    );
    let received = within(server).await.unwrap();
    let message = encode_base64(&plain_message("alice", &password));
    assert_eq!(received[1], format!("AUTH PLAIN {}", message.expose()));
}

#[tokio::test]
async fn temporary_refusal_and_missing_mechanism() {
    let (port, _server) = fake_upstream(vec![
        (None, GREETING),
        (Some("EHLO client.example"), EHLO_REPLY),
        (Some("AUTH XOAUTH2 "), "454 4.7.0 Try later\r\n"),
    ])
    .await;
    let error = within(backend::login(
        &connector(port, MechanismSetting::Auto),
        &bearer("tok"),
        "client.example",
        None,
    ))
    .await
    .err()
    .unwrap();
    assert!(matches!(error, BackendError::Protocol(_)), "{error:?}");

    let (port, _server) = fake_upstream(vec![
        (None, GREETING),
        (
            Some("EHLO client.example"),
            "250-fake.example\r\n250 SIZE 10\r\n",
        ),
    ])
    .await;
    let error = within(backend::login(
        &connector(port, MechanismSetting::Auto),
        &bearer("tok"),
        "client.example",
        None,
    ))
    .await
    .err()
    .unwrap();
    assert!(matches!(error, BackendError::NoMechanism), "{error:?}");
}

#[tokio::test]
async fn probe_returns_extension_lines_and_quits() {
    let (port, server) = fake_upstream(vec![
        (None, GREETING),
        (Some("EHLO mailgate"), EHLO_REPLY),
        (Some("QUIT"), "221 2.0.0 Bye\r\n"),
    ])
    .await;
    let connector = connector(port, MechanismSetting::Auto);
    let extensions = within(backend::probe_extensions(&connector, "mailgate"))
        .await
        .unwrap();
    assert_eq!(
        extensions,
        ["SIZE 1000", "8BITMIME", "AUTH PLAIN XOAUTH2 OAUTHBEARER"]
    );
    let received = within(server).await.unwrap();
    assert_eq!(received, ["EHLO mailgate", "QUIT"]);
}

/// Found by fuzzing: only the AUTH exchange's errors were scrubbed, so a refusal of an
/// earlier command quoting the secret carried it into the log.
#[tokio::test]
async fn no_upstream_error_carries_the_token_whichever_command_it_answers() {
    let (port, _server) = fake_upstream(vec![
        (None, GREETING),
        (
            Some("EHLO client.example"),
            "554 5.7.1 tok-Zq81x not welcome\r\n",
        ),
    ])
    .await;
    let connector = connector(port, MechanismSetting::Auto);
    let auth = bearer("tok-Zq81x");
    let login = backend::login(&connector, &auth, "client.example", None);
    let Err(error) = within(login).await else {
        panic!("a refused EHLO logged in");
    };
    assert!(
        !format!("{error} {error:?}").contains("tok-Zq81x"),
        "{error}"
    );
}
