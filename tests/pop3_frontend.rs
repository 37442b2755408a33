//! Transcripts of the POP3 front end before authentication, over in-memory streams through
//! `frontend::serve`, STLS included (a real TLS handshake with the test CA's certificate).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailgate::client_tls::ClientTls;
use mailgate::config::DEFAULT_MAX_LINE_LENGTH;
use mailgate::frontend::settings::FrontendSettings;
use mailgate::frontend::{self, MailProtocol, Step};
use mailgate::io::BoxedIo;
use mailgate::limits::{MAX_ERRORS, MAX_LOGIN_FAILURES};
use mailgate::login::{Authenticator, Closing, Handoff, LoginError, LoginRequest, Upstream};
use mailgate::metrics::Metrics;
use mailgate::pop3::Pop3;
use rustls_pki_types::ServerName;
use support::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

const GREETING: &str = "+OK mx.test mailgate ready";
const COMPLETION: &str = "+OK Logged in.";
const PRE_AUTH_TIMEOUT: Duration = Duration::from_secs(60);
const PRE_AUTH_LIFETIME: Duration = Duration::from_secs(300);
/// Every test gives up after this long instead of hanging.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
const CAPA_TAIL: [&str; 4] = ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "."];

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

/// How a session under test is set up.
struct Setup {
    failure: LoginError,
    max_line_length: usize,
    /// STLS offered with the CA's certificate; `true`: required.
    stls: Option<(Arc<TestCa>, bool)>,
}

impl Setup {
    fn refusing(failure: LoginError) -> Self {
        Self {
            failure,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            stls: None,
        }
    }

    async fn with_stls(required: bool) -> Self {
        Self {
            stls: Some((Arc::new(TestCa::create().await), required)),
            ..Self::refusing(LoginError::BadCredentials)
        }
    }
}

/// The client's end of a session under test.
struct Client {
    io: BoxedIo,
    received: Vec<u8>,
    session: JoinHandle<Outcome>,
    authenticator: Arc<StandIn>,
    ca: Option<Arc<TestCa>>,
    /// Dropping it tells the session that mailgate is shutting down.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Client {
    async fn start(setup: Setup) -> Self {
        mailgate::tls::install_crypto_provider();
        let (io, server) = duplex(64 * 1024);
        let authenticator = Arc::new(StandIn {
            failure: setup.failure,
            seen: Mutex::new(Vec::new()),
        });
        let starttls = setup.stls.as_ref().map(|(ca, required)| {
            let config = mailgate::tls::server_config(&ca.cert_pem(), &ca.key_pem(), None).unwrap();
            Arc::new(ClientTls::new(
                config,
                *required,
                "pop3",
                Arc::new(Metrics::new()),
            ))
        });
        let settings = FrontendSettings {
            hostname: "mx.test".to_owned(),
            pre_auth_timeout: PRE_AUTH_TIMEOUT,
            pre_auth_lifetime: PRE_AUTH_LIFETIME,
            client: None,
            starttls,
            max_line_length: setup.max_line_length,
            max_literal_size: 0,
            local: None,
        };
        let session_authenticator = Arc::clone(&authenticator);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
                Closing::ShuttingDown
            };
            let dialogue = Pop3.dialogue(&settings);
            let authenticator = session_authenticator.as_ref();
            frontend::serve(Box::new(server), authenticator, dialogue, &settings, stop).await
        });
        let mut client = Self {
            io: Box::new(io),
            received: Vec::new(),
            session,
            authenticator,
            ca: setup.stls.map(|(ca, _)| ca),
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

    /// Runs the client side of the TLS handshake after `+OK` to STLS.
    async fn start_tls(&mut self) {
        assert!(self.received.is_empty(), "unread: {:?}", self.received);
        let ca = self.ca.as_ref().expect("a session with STLS");
        let config = mailgate::tls::client_config(Some(&ca.ca_pem()), false).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let plain = std::mem::replace(&mut self.io, Box::new(duplex(1).0));
        let tls = TlsConnector::from(config)
            .connect(name, plain)
            .await
            .unwrap();
        self.io = Box::new(tls);
    }

    /// Waits for the session to end and returns its outcome, checking it sent nothing more.
    async fn finish(mut self) -> Option<Handoff<BoxedIo>> {
        let outcome = self.session.await.unwrap().unwrap();
        if outcome.is_none() {
            let mut rest = Vec::new();
            // A TLS client may see the close without close_notify.
            let _ = self.io.read_to_end(&mut rest).await;
            self.received.extend_from_slice(&rest);
        }
        assert!(self.received.is_empty(), "unread: {:?}", self.received);
        outcome
    }

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

fn capa(head: &[&str]) -> Vec<&'static str> {
    let mut lines = vec!["+OK Capability list follows"];
    lines.extend(head.iter().map(|line| -> &'static str {
        match *line {
            "USER" => "USER",
            "SASL" => "SASL PLAIN LOGIN",
            "STLS" => "STLS",
            other => panic!("unknown capability {other}"),
        }
    }));
    lines.extend(CAPA_TAIL);
    lines
}

#[tokio::test]
async fn capa_transaction_commands_and_quit() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client.exchange("NOOP\r\n", &["-ERR Not logged in"]).await;
        client.exchange("stat\r\n", &["-ERR Not logged in"]).await;
        client
            .exchange("XYZZY\r\n", &["-ERR Unknown command"])
            .await;
        client
            .exchange("STLS\r\n", &["-ERR STLS not available"])
            .await;
        client
            .exchange("QUIT\r\n", &["+OK mx.test mailgate signing off"])
            .await;
        assert!(client.seen().is_empty());
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn user_pass_logs_in_and_pipelined_commands_reach_the_handoff() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        client
            .exchange("USER alice@example.org\r\n", &["+OK Send PASS"])
            .await;
        // PASS keeps its spaces (RFC 1939 7); the commands after it wait for the upstream.
        client
            .exchange("PASS right\r\nSTAT\r\nLIST\r\n", &[COMPLETION])
            .await;
        assert_eq!(client.seen(), pair("alice@example.org", "right"));
        let mut handoff = client.finish().await.unwrap();
        assert_eq!(handoff.account, "alice@example.org");
        let mut replayed = [0u8; 12];
        handoff.client.read_exact(&mut replayed).await.unwrap();
        assert_eq!(&replayed, b"STAT\r\nLIST\r\n");
        assert!(handoff.client.prefix_consumed());
    })
    .await;
}

#[tokio::test]
async fn pass_comes_right_after_user() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        client
            .exchange("PASS right\r\n", &["-ERR USER first"])
            .await;
        client.exchange("USER bob\r\n", &["+OK Send PASS"]).await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client
            .exchange("PASS right\r\n", &["-ERR USER first"])
            .await;
        client.exchange("USER bob\r\n", &["+OK Send PASS"]).await;
        client
            .exchange("PASS two words\r\n", &["-ERR [AUTH] Authentication failed"])
            .await;
        assert_eq!(client.seen(), pair("bob", "two words"));
        client
            .exchange("QUIT\r\n", &["+OK mx.test mailgate signing off"])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn auth_plain_with_and_without_an_initial_response() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        // "\0alice\0wrong", then "\0alice\0right".
        client
            .exchange(
                "AUTH PLAIN AGFsaWNlAHdyb25n\r\n",
                &["-ERR [AUTH] Authentication failed"],
            )
            .await;
        client
            .exchange("AUTH PLAIN =\r\n", &["-ERR Malformed SASL message"])
            .await;
        client.exchange("auth plain\r\n", &["+ "]).await;
        client.exchange("AGFsaWNlAHJpZ2h0\r\n", &[COMPLETION]).await;
        assert_eq!(
            client.seen(),
            [pair("alice", "wrong"), pair("alice", "right")].concat()
        );
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn auth_login_after_challenges() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        client.exchange("AUTH LOGIN\r\n", &["+ VXNlcm5hbWU6"]).await;
        client.exchange("YWxpY2U=\r\n", &["+ UGFzc3dvcmQ6"]).await;
        client.exchange("cmlnaHQ=\r\n", &[COMPLETION]).await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn cancel_bare_auth_unknown_mechanisms_and_apop() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        client.exchange("AUTH PLAIN\r\n", &["+ "]).await;
        client
            .exchange("*\r\n", &["-ERR Authentication cancelled"])
            .await;
        client
            .exchange("AUTH\r\n", &["+OK", "PLAIN", "LOGIN", "."])
            .await;
        client
            .exchange(
                "AUTH XOAUTH2 dG9r\r\n",
                &["-ERR Unsupported authentication mechanism"],
            )
            .await;
        client
            .exchange(
                "APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
                &["-ERR APOP not supported; use USER/PASS or AUTH"],
            )
            .await;
        assert!(client.seen().is_empty());
        client
            .exchange("QUIT\r\n", &["+OK mx.test mailgate signing off"])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn temporary_failures_are_sys_temp_and_failed_logins_close_the_session() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::TokenUnavailable)).await;
        // The last failure allowed is answered, then the session ends.
        for _ in 0..MAX_LOGIN_FAILURES {
            client.exchange("USER alice\r\n", &["+OK Send PASS"]).await;
            client
                .exchange(
                    "PASS wrong\r\n",
                    &["-ERR [SYS/TEMP] Temporary authentication failure"],
                )
                .await;
        }
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn a_too_long_line_is_refused_and_skipped_to_its_end() {
    with_timeout(async {
        let setup = Setup {
            max_line_length: 64,
            ..Setup::refusing(LoginError::BadCredentials)
        };
        let mut client = Client::start(setup).await;
        let long = format!("USER {}", "a".repeat(100));
        client.send(&long).await;
        client.send(&long).await;
        client
            .exchange("\r\nCAPA\r\n", &["-ERR Line too long"])
            .await;
        for line in capa(&["USER", "SASL"]) {
            client.expect(line).await;
        }
        // A long line also ends an exchange in progress.
        client.exchange("AUTH LOGIN\r\n", &["+ VXNlcm5hbWU6"]).await;
        client
            .exchange(&format!("{long}\r\n"), &["-ERR Line too long"])
            .await;
        client
            .exchange("cmlnaHQ=\r\n", &["-ERR Unknown command"])
            .await;
        assert!(client.seen().is_empty());
        client
            .exchange("QUIT\r\n", &["+OK mx.test mailgate signing off"])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        for _ in 1..MAX_ERRORS {
            client
                .exchange("BOGUS\r\n", &["-ERR Unknown command"])
                .await;
        }
        client
            .exchange(
                "BOGUS\r\n",
                &["-ERR [SYS/TEMP] Too many errors, closing connection"],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn shutting_down_says_goodbye() {
    with_timeout(async {
        let mut client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
        client.exchange("USER alice\r\n", &["+OK Send PASS"]).await;
        client.shut_down();
        client
            .expect("-ERR [SYS/TEMP] mx.test Service shutting down")
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn stls_offered_drops_what_was_pipelined_in_the_clear() {
    with_timeout(async {
        let mut client = Client::start(Setup::with_stls(false).await).await;
        client
            .exchange("CAPA\r\n", &capa(&["USER", "SASL", "STLS"]))
            .await;
        // An injected USER after STLS, in the same packet, must never count.
        client
            .exchange("STLS\r\nUSER mallory\r\n", &["+OK Begin TLS negotiation"])
            .await;
        client.start_tls().await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client
            .exchange("PASS right\r\n", &["-ERR USER first"])
            .await;
        client
            .exchange("STLS\r\n", &["-ERR TLS already active"])
            .await;
        client.exchange("USER alice\r\n", &["+OK Send PASS"]).await;
        client.exchange("PASS right\r\n", &[COMPLETION]).await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn stls_required_refuses_logins_before_tls() {
    with_timeout(async {
        let mut client = Client::start(Setup::with_stls(true).await).await;
        client.exchange("CAPA\r\n", &capa(&["STLS"])).await;
        let refusal = "-ERR [AUTH] Plaintext authentication disallowed before STLS; use STLS first";
        client.exchange("USER alice\r\n", &[refusal]).await;
        client.exchange("PASS right\r\n", &[refusal]).await;
        client
            .exchange("AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n", &[refusal])
            .await;
        client.exchange("AUTH\r\n", &[refusal]).await;
        client
            .exchange("STLS\r\n", &["+OK Begin TLS negotiation"])
            .await;
        client.start_tls().await;
        client.exchange("CAPA\r\n", &capa(&["USER", "SASL"])).await;
        client
            .exchange("AUTH PLAIN AGFsaWNlAHJpZ2h0\r\n", &[COMPLETION])
            .await;
        assert_eq!(client.seen(), pair("alice", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

/// Pseudo-random bytes, biased towards command words and line ends, straight into the
/// dialogue (no I/O): it never panics, every reply is whole lines, and it closes in time.
#[test]
fn hostile_bytes_never_panic_and_every_reply_is_whole_lines() {
    const PIECES: [&[u8]; 12] = [
        b"USER ", b"PASS ", b"AUTH ", b"PLAIN", b"LOGIN", b"CAPA", b"STLS", b"*", b"=", b"\r\n",
        b"\n", b"\0\xff ",
    ];
    let settings = FrontendSettings {
        hostname: "mx.test".to_owned(),
        pre_auth_timeout: PRE_AUTH_TIMEOUT,
        pre_auth_lifetime: PRE_AUTH_LIFETIME,
        client: None,
        starttls: None,
        max_line_length: 64,
        max_literal_size: 0,
        local: None,
    };
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let nothing = || Vec::new();
    for _ in 0..200 {
        let mut dialogue = Pop3.dialogue(&settings);
        let mut closed = false;
        for _ in 0..200 {
            let piece = PIECES[(next() % PIECES.len() as u64) as usize];
            let random = next().to_le_bytes();
            dialogue.push(if next() % 4 == 0 { &random } else { piece });
            while let Some(step) = dialogue.next_step(&nothing) {
                let bytes = match step {
                    Step::Reply(bytes) | Step::StartTls(bytes) => bytes,
                    Step::Close(bytes) => {
                        closed = true;
                        bytes
                    }
                    Step::LogIn { .. } => match dialogue.login_failed(LoginError::BadCredentials) {
                        Step::Reply(bytes) => bytes,
                        Step::Close(bytes) => {
                            closed = true;
                            bytes
                        }
                        other => panic!("{other:?} after a failed login"),
                    },
                };
                assert!(bytes.ends_with(b"\r\n"), "{bytes:?}");
                assert!(!bytes[..bytes.len() - 2].contains(&b'\0'));
                if closed {
                    break;
                }
            }
            if closed {
                break;
            }
        }
    }
}

/// A client that floods CAPA and never reads its replies cannot hold the session: the
/// pending replies are given up at the idle deadline, not the (longer) lifetime.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_let_go_at_the_idle_deadline() {
    let client = Client::start(Setup::refusing(LoginError::BadCredentials)).await;
    let (_from_mailgate, mut to_mailgate) = tokio::io::split(client.io);
    let flood = tokio::spawn(async move {
        let commands = "CAPA\r\n".repeat(100_000);
        let _ = to_mailgate.write_all(commands.as_bytes()).await;
        to_mailgate
    });
    let ended = tokio::time::timeout(PRE_AUTH_TIMEOUT * 2, client.session).await;
    let outcome = ended
        .expect("the session outlived its idle deadline")
        .unwrap();
    assert!(!matches!(outcome, Ok(Some(_))), "no login happened");
    flood.abort();
}
