//! Transcripts of the IMAP front end before authentication, over in-memory streams.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailgate::config::{DEFAULT_MAX_LINE_LENGTH, DEFAULT_MAX_LITERAL_SIZE};
use mailgate::frontend::settings::FrontendSettings;
use mailgate::imap::frontend;
use mailgate::io::BoxedIo;
use mailgate::limits::MAX_ERRORS;
use mailgate::login::{Authenticator, Handoff, LoginError, LoginRequest, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::task::JoinHandle;

const GREETING: &str =
    "* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN] mx.test mailgate ready";
const COMPLETION: &str = "OK [CAPABILITY IMAP4rev1 IDLE] Logged in";
const PRE_AUTH_TIMEOUT: Duration = Duration::from_secs(60);
const PRE_AUTH_LIFETIME: Duration = Duration::from_secs(300);
/// Every test gives up after this long instead of hanging.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the password "right" for anyone and fails every other login with `failure`.
struct StandIn {
    failure: LoginError,
    seen: Mutex<Vec<(String, String)>>,
}

impl Authenticator for StandIn {
    async fn login(&self, request: LoginRequest) -> Result<Upstream, LoginError> {
        let credentials = request.credentials;
        let password = credentials.password.expose().clone();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((credentials.account, password.clone()));
        }
        if password != "right" {
            return Err(self.failure);
        }
        let (io, _server) = duplex(64);
        Ok(Upstream {
            io: Box::new(io),
            completion: COMPLETION.to_owned(),
            account: None,
            xclient_guard: None,
        })
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        Vec::new()
    }
}

type Outcome = std::io::Result<Option<Handoff<BoxedIo>>>;

/// The client's end of a session under test.
struct Client {
    io: DuplexStream,
    received: Vec<u8>,
    session: JoinHandle<Outcome>,
    authenticator: Arc<StandIn>,
    /// Dropping it tells the session that mailgate is shutting down.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Client {
    async fn start(failure: LoginError) -> Self {
        let (io, server) = duplex(64 * 1024);
        let authenticator = Arc::new(StandIn {
            failure,
            seen: Mutex::new(Vec::new()),
        });
        let settings = FrontendSettings {
            hostname: "mx.test".to_owned(),
            pre_auth_timeout: PRE_AUTH_TIMEOUT,
            pre_auth_lifetime: PRE_AUTH_LIFETIME,
            client: None,
            starttls: None,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            max_literal_size: DEFAULT_MAX_LITERAL_SIZE,
            local: None,
        };
        let session_authenticator = Arc::clone(&authenticator);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
                mailgate::login::Closing::ShuttingDown
            };
            frontend::serve(
                Box::new(server),
                session_authenticator.as_ref(),
                &settings,
                stop,
            )
            .await
        });
        let mut client = Self {
            io,
            received: Vec::new(),
            session,
            authenticator,
            stop: Some(stop),
        };
        client.expect(GREETING).await;
        client
    }

    async fn send(&mut self, bytes: &str) {
        self.io.write_all(bytes.as_bytes()).await.unwrap();
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.received.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.received.drain(..end + 2).collect();
                return String::from_utf8(line[..end].to_vec()).unwrap();
            }
            let mut chunk = [0u8; 1024];
            let n = self.io.read(&mut chunk).await.unwrap();
            assert!(n > 0, "session closed; had {:?}", self.received);
            self.received.extend_from_slice(&chunk[..n]);
        }
    }

    async fn expect(&mut self, line: &str) {
        assert_eq!(self.line().await, line);
    }

    /// Sends `command` and expects exactly `replies`.
    async fn exchange(&mut self, command: &str, replies: &[&str]) {
        self.send(command).await;
        for reply in replies {
            self.expect(reply).await;
        }
    }

    /// Waits for the session to end and returns its outcome, checking it sent nothing more.
    async fn finish(mut self) -> Option<Handoff<BoxedIo>> {
        let outcome = self.session.await.unwrap().unwrap();
        if outcome.is_none() {
            let mut rest = Vec::new();
            self.io.read_to_end(&mut rest).await.unwrap();
            self.received.extend_from_slice(&rest);
        }
        assert!(self.received.is_empty(), "unread: {:?}", self.received);
        outcome
    }

    /// Tells the session that mailgate is shutting down.
    fn shut_down(&mut self) {
        self.stop.take();
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.authenticator.seen.lock().unwrap().clone()
    }
}

async fn with_timeout<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

fn pair(account: &str, password: &str) -> Vec<(String, String)> {
    vec![(account.to_owned(), password.to_owned())]
}

#[tokio::test]
async fn capability_noop_id_logout() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a CAPABILITY\r\n",
                &[
                    "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN",
                    "a OK Capability completed",
                ],
            )
            .await;
        client
            .exchange("b NOOP\r\n", &["b OK NOOP completed"])
            .await;
        client
            .exchange(
                "c ID (\"name\" \"client\")\r\n",
                &["* ID (\"name\" \"mailgate\")", "c OK ID completed"],
            )
            .await;
        client
            .exchange(
                "d ID NIL\r\n",
                &["* ID (\"name\" \"mailgate\")", "d OK ID completed"],
            )
            .await;
        client
            .exchange(
                "e LOGOUT\r\n",
                &["* BYE Logging out", "e OK LOGOUT completed"],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn login_with_quoted_strings() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a LOGIN \"alice@example.org\" \"right\"\r\n",
                &[&format!("a {COMPLETION}")],
            )
            .await;
        assert_eq!(client.seen(), pair("alice@example.org", "right"));
        let handoff = client.finish().await.unwrap();
        assert_eq!(handoff.account, "alice@example.org");
        assert_eq!(handoff.upstream.completion, COMPLETION);
        assert!(handoff.client.prefix_consumed());
    })
    .await;
}

#[tokio::test]
async fn login_with_synchronizing_literals_gets_continuations() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange("a LOGIN {5}\r\n", &["+ Ready for literal data"])
            .await;
        client
            .exchange("alice {5}\r\n", &["+ Ready for literal data"])
            .await;
        client
            .exchange("right\r\n", &[&format!("a {COMPLETION}")])
            .await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn login_with_non_synchronizing_literals_gets_no_continuation() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a LOGIN {5+}\r\nalice {7+}\r\nri ght\"\r\n",
                &["a NO [AUTHENTICATIONFAILED] Authentication failed"],
            )
            .await;
        assert_eq!(client.seen(), pair("alice", "ri ght\""));
        client
            .exchange(
                "b LOGIN {5+}\r\nalice {5+}\r\nright\r\n",
                &[&format!("b {COMPLETION}")],
            )
            .await;
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn pipelined_commands_after_login_become_the_handoff_prefix() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a LOGIN u right\r\nb SELECT INBOX\r\n",
                &[&format!("a {COMPLETION}")],
            )
            .await;
        let handoff = client.finish().await.unwrap();
        let (prefix, _client) = handoff.client.into_parts();
        assert_eq!(prefix, b"b SELECT INBOX\r\n");
    })
    .await;
}

#[tokio::test]
async fn pipelined_bytes_after_a_literal_login_are_kept_too() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a LOGIN u {5+}\r\nright\r\nb APPEND x {3+}\r\nabc\r\nc NOOP",
                &[&format!("a {COMPLETION}")],
            )
            .await;
        let mut handoff = client.finish().await.unwrap();
        let mut replayed = vec![0u8; 64];
        let n = handoff.client.read(&mut replayed).await.unwrap();
        assert_eq!(&replayed[..n], b"b APPEND x {3+}\r\nabc\r\nc NOOP");
    })
    .await;
}

#[tokio::test]
async fn authenticate_plain_with_initial_response() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        // base64 of "\0alice\0right"
        client
            .exchange(
                "a AUTHENTICATE PLAIN AGFsaWNlAHJpZ2h0\r\n",
                &[&format!("a {COMPLETION}")],
            )
            .await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn authenticate_plain_with_continuation() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client.exchange("a AUTHENTICATE PLAIN\r\n", &["+ "]).await;
        client
            .exchange("AGFsaWNlAHJpZ2h0\r\n", &[&format!("a {COMPLETION}")])
            .await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn authenticate_cancelled_with_star() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client.exchange("a AUTHENTICATE PLAIN\r\n", &["+ "]).await;
        client
            .exchange("*\r\n", &["a BAD AUTHENTICATE cancelled"])
            .await;
        client
            .exchange("b NOOP\r\n", &["b OK NOOP completed"])
            .await;
        assert!(client.seen().is_empty());
    })
    .await;
}

#[tokio::test]
async fn authenticate_login_prompts_for_user_and_password() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange("a AUTHENTICATE LOGIN\r\n", &["+ VXNlcm5hbWU6"])
            .await;
        client.exchange("YWxpY2U=\r\n", &["+ UGFzc3dvcmQ6"]).await;
        client
            .exchange("cmlnaHQ=\r\n", &[&format!("a {COMPLETION}")])
            .await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn authenticate_refuses_bad_base64_and_other_mechanisms() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange("a AUTHENTICATE PLAIN !!!\r\n", &["a BAD Invalid command"])
            .await;
        client.exchange("b AUTHENTICATE PLAIN\r\n", &["+ "]).await;
        client
            .exchange("%%%\r\n", &["b BAD Invalid SASL response"])
            .await;
        client
            .exchange(
                "c AUTHENTICATE XOAUTH2\r\n",
                &["c NO [CANNOT] Unsupported mechanism"],
            )
            .await;
        // PLAIN naming someone else as authorization identity: "bob\0alice\0right".
        client
            .exchange(
                "d AUTHENTICATE PLAIN Ym9iAGFsaWNlAHJpZ2h0\r\n",
                &["d NO [AUTHORIZATIONFAILED] Authorization refused"],
            )
            .await;
        assert!(client.seen().is_empty());
    })
    .await;
}

#[tokio::test]
async fn wrong_password_is_refused_and_the_session_continues() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a LOGIN alice wrong\r\n",
                &["a NO [AUTHENTICATIONFAILED] Authentication failed"],
            )
            .await;
        client
            .exchange("b NOOP\r\n", &["b OK NOOP completed"])
            .await;
        client
            .exchange("c LOGIN alice right\r\n", &[&format!("c {COMPLETION}")])
            .await;
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn unavailable_upstream_asks_to_try_later() {
    with_timeout(async {
        let mut client = Client::start(LoginError::UpstreamUnavailable).await;
        client
            .exchange(
                "a LOGIN alice wrong\r\n",
                &["a NO [UNAVAILABLE] Temporary failure, try again later"],
            )
            .await;
    })
    .await;
}

#[tokio::test]
async fn too_many_failed_logins_end_the_session() {
    with_timeout(async {
        let mut client = Client::start(LoginError::UpstreamRejected).await;
        let refused = "NO [AUTHENTICATIONFAILED] Authentication failed";
        client
            .exchange("a LOGIN u x\r\n", &[&format!("a {refused}")])
            .await;
        client
            .exchange("b LOGIN u y\r\n", &[&format!("b {refused}")])
            .await;
        client
            .exchange(
                "c LOGIN u z\r\n",
                &[&format!("c {refused}"), "* BYE Too many failed logins"],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn commands_of_later_states_and_starttls_without_tls_are_refused() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a SELECT INBOX\r\n",
                &["a BAD Command not valid before login"],
            )
            .await;
        client
            .exchange(
                "b ENABLE UTF8=ACCEPT\r\n",
                &["b BAD ENABLE needs a login first"],
            )
            .await;
        client
            .exchange("c STARTTLS\r\n", &["c BAD STARTTLS not available"])
            .await;
        client
            .exchange("d NOOP\r\n", &["d OK NOOP completed"])
            .await;
    })
    .await;
}

#[tokio::test]
async fn garbage_gets_bad_and_too_much_of_it_ends_the_session() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange("GET / HTTP/1.1\r\n", &["GET BAD Invalid command"])
            .await;
        client
            .exchange("(junk)\r\n", &["* BAD Invalid command"])
            .await;
        client
            .exchange("a FROB\r\n", &["a BAD Invalid command"])
            .await;
        client
            .exchange("b NOOP\r\n", &["b OK NOOP completed"])
            .await;
        // Counted in total: the NOOP in between does not start the count again.
        for _ in 4..MAX_ERRORS {
            client.exchange("\r\n", &["* BAD Invalid command"]).await;
        }
        client
            .exchange(
                "\r\n",
                &["* BAD Invalid command", "* BYE Too many invalid commands"],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn oversized_line_is_discarded_and_the_session_stays_usable() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        let long = "x".repeat(DEFAULT_MAX_LINE_LENGTH * 2);
        client
            .exchange(
                &format!("a LOGIN u {long}\r\n"),
                &["a BAD Command too long"],
            )
            .await;
        client
            .exchange("b NOOP\r\n", &["b OK NOOP completed"])
            .await;
    })
    .await;
}

#[tokio::test]
async fn oversized_literals_are_refused() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        let too_large = DEFAULT_MAX_LITERAL_SIZE + 1;
        // Synchronizing: refused before the client sends it, no continuation.
        client
            .exchange(
                &format!("a LOGIN u {{{too_large}}}\r\n"),
                &["a BAD Literal too large"],
            )
            .await;
        client
            .exchange("b NOOP\r\n", &["b OK NOOP completed"])
            .await;
        // Non-synchronizing: arrives anyway and is discarded.
        let literal = "y".repeat(too_large);
        client
            .exchange(
                &format!("c LOGIN u {{{too_large}+}}\r\n{literal}\r\n"),
                &["c BAD Command too long"],
            )
            .await;
        client
            .exchange("d NOOP\r\n", &["d OK NOOP completed"])
            .await;
        assert!(client.seen().is_empty());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn idle_client_is_logged_out() {
    let mut client = Client::start(LoginError::BadCredentials).await;
    client
        .exchange("a NOOP\r\n", &["a OK NOOP completed"])
        .await;
    client.send("b NO").await;
    tokio::time::sleep(PRE_AUTH_TIMEOUT - Duration::from_secs(1)).await;
    client.send("OP\r\n").await;
    client.expect("b OK NOOP completed").await;
    // Nothing more: time runs out and the session says why.
    let started = tokio::time::Instant::now();
    client.expect("* BYE Autologout; idle too long").await;
    assert!(started.elapsed() >= PRE_AUTH_TIMEOUT);
    assert!(client.finish().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_busy_client_is_still_logged_out_when_its_lifetime_ends() {
    let mut client = Client::start(LoginError::BadCredentials).await;
    let started = tokio::time::Instant::now();
    // A NOOP well within every idle timeout, again and again.
    while started.elapsed() < PRE_AUTH_LIFETIME - Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(30)).await;
        client
            .exchange("a NOOP\r\n", &["a OK NOOP completed"])
            .await;
    }
    client
        .expect("* BYE Autologout; too long without logging in")
        .await;
    assert!(started.elapsed() >= PRE_AUTH_LIFETIME - Duration::from_secs(1));
    assert!(client.finish().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_commands_are_always_waiting_is_still_logged_out_at_its_lifetime() {
    let mut client = Client::start(LoginError::BadCredentials).await;
    // Input for many reads, all of it there before mailgate reads: no read ever waits, so
    // the read's deadline never fires; only a check between commands sees the lifetime end.
    let commands = 4096;
    client.send(&"a NOOP\r\n".repeat(commands)).await;
    tokio::time::advance(PRE_AUTH_LIFETIME).await;
    let mut answered = 0;
    loop {
        let line = client.line().await;
        if line != "a OK NOOP completed" {
            assert_eq!(line, "* BYE Autologout; too long without logging in");
            break;
        }
        answered += 1;
    }
    assert!(
        answered < commands,
        "all {answered} answered past the lifetime"
    );
    assert!(client.finish().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_loses_its_session() {
    // A pipe of 64 bytes that the client never reads from.
    let (mut io, server) = duplex(64);
    let settings = FrontendSettings {
        hostname: "mx.test".to_owned(),
        pre_auth_timeout: PRE_AUTH_TIMEOUT,
        pre_auth_lifetime: PRE_AUTH_LIFETIME,
        client: None,
        starttls: None,
        max_line_length: DEFAULT_MAX_LINE_LENGTH,
        max_literal_size: DEFAULT_MAX_LITERAL_SIZE,
        local: None,
    };
    let authenticator = StandIn {
        failure: LoginError::BadCredentials,
        seen: Mutex::new(Vec::new()),
    };
    let session = tokio::spawn(async move {
        frontend::serve(
            Box::new(server),
            &authenticator,
            &settings,
            std::future::pending(),
        )
        .await
    });
    let started = tokio::time::Instant::now();
    // Pipelined CAPABILITYs whose replies fill the pipe; the writes must give up.
    for _ in 0..100 {
        if io.write_all(b"a CAPABILITY\r\n").await.is_err() {
            break;
        }
    }
    let outcome = session.await.unwrap();
    let error = outcome.err().expect("the session fails");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() <= PRE_AUTH_TIMEOUT + Duration::from_secs(1));
}

#[tokio::test]
async fn shutting_down_says_bye_between_commands() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange("a NOOP\r\n", &["a OK NOOP completed"])
            .await;
        client.send("b NO").await;
        client.shut_down();
        client.expect("* BYE Server shutting down").await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn control_characters_in_a_user_name_are_refused() {
    with_timeout(async {
        let mut client = Client::start(LoginError::BadCredentials).await;
        client
            .exchange(
                "a LOGIN {15+}\r\nbob\nINFO forged \"x\"\r\n",
                &["a NO [AUTHENTICATIONFAILED] Authentication failed"],
            )
            .await;
        assert!(client.seen().is_empty());
    })
    .await;
}
