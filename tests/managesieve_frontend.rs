//! Transcripts of the ManageSieve front end before authentication (RFC 5804), run by
//! `frontend::serve` over in-memory streams with a stand-in authenticator.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailgate::client_tls::ClientTls;
use mailgate::config::{DEFAULT_MAX_LINE_LENGTH, DEFAULT_MAX_LITERAL_SIZE};
use mailgate::frontend::settings::FrontendSettings;
use mailgate::frontend::{self, MailProtocol};
use mailgate::io::BoxedIo;
use mailgate::limits::{MAX_ERRORS, MAX_LOGIN_FAILURES};
use mailgate::login::{Authenticator, Closing, Handoff, LoginError, LoginRequest, Upstream};
use mailgate::managesieve::ManageSieve;
use mailgate::metrics::Metrics;
use support::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio::task::JoinHandle;

const COMPLETION: &str = "OK \"Logged in.\"";
const NO_UPSTREAM: [&str; 5] = [
    "\"IMPLEMENTATION\" \"mailgate\"",
    "\"SASL\" \"PLAIN LOGIN\"",
    "\"SIEVE\" \"\"",
    "\"VERSION\" \"1.0\"",
    "OK \"mx.test ManageSieve ready\"",
];
/// Every test gives up after this long instead of hanging.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Accepts the password "right" for anyone and fails every other login with `failure`.
struct StandIn {
    failure: LoginError,
    capabilities: Vec<String>,
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
        self.capabilities.clone()
    }
}

type Outcome = std::io::Result<Option<Handoff<BoxedIo>>>;

/// How a session under test is set up.
struct Setup {
    failure: LoginError,
    capabilities: Vec<String>,
    /// STARTTLS offered (and whether required), with the CA the client trusts.
    tls: Option<(Arc<TestCa>, bool)>,
    max_literal_size: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            failure: LoginError::BadCredentials,
            capabilities: Vec::new(),
            tls: None,
            max_literal_size: DEFAULT_MAX_LITERAL_SIZE,
        }
    }
}

/// The client's end of a session under test.
struct Client {
    io: BoxedIo,
    received: Vec<u8>,
    session: JoinHandle<Outcome>,
    authenticator: Arc<StandIn>,
    /// Dropping it tells the session that mailgate is shutting down.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Client {
    async fn start(setup: Setup) -> Self {
        let (io, server) = duplex(64 * 1024);
        let authenticator = Arc::new(StandIn {
            failure: setup.failure,
            capabilities: setup.capabilities,
            seen: Mutex::new(Vec::new()),
        });
        let starttls = setup.tls.map(|(ca, required)| {
            mailgate::tls::install_crypto_provider();
            let config = mailgate::tls::server_config(
                &ca.cert_pem(),
                &ca.key_pem(),
                Some(ManageSieve.alpn_id()),
            )
            .unwrap();
            Arc::new(ClientTls::new(
                config,
                required,
                "sieve",
                Arc::new(Metrics::new()),
            ))
        });
        let settings = FrontendSettings {
            hostname: "mx.test".to_owned(),
            pre_auth_timeout: Duration::from_secs(60),
            pre_auth_lifetime: Duration::from_secs(300),
            client: None,
            starttls,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            max_literal_size: setup.max_literal_size,
            local: None,
        };
        let session_authenticator = Arc::clone(&authenticator);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let session = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
                Closing::ShuttingDown
            };
            let dialogue = ManageSieve.dialogue(&settings);
            frontend::serve(
                Box::new(server),
                session_authenticator.as_ref(),
                dialogue,
                &settings,
                stop,
            )
            .await
        });
        Self {
            io: Box::new(io),
            received: Vec::new(),
            session,
            authenticator,
            stop: Some(stop),
        }
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

    async fn expect(&mut self, lines: &[&str]) {
        for line in lines {
            assert_eq!(self.line().await, *line);
        }
    }

    /// Sends `command` and expects exactly `replies`.
    async fn exchange(&mut self, command: &str, replies: &[&str]) {
        self.send(command).await;
        self.expect(replies).await;
    }

    /// Runs the client side of the handshake after `OK` to STARTTLS.
    async fn start_tls(&mut self, ca: &TestCa) {
        assert!(self.received.is_empty(), "unread: {:?}", self.received);
        let config = mailgate::tls::client_config(Some(&ca.ca_pem()), false).unwrap();
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (plain, _) = duplex(1);
        let io = std::mem::replace(&mut self.io, Box::new(plain));
        self.io = Box::new(connector.connect(name, io).await.unwrap());
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

    fn seen(&self) -> Vec<(String, String)> {
        self.authenticator.seen.lock().unwrap().clone()
    }
}

async fn with_timeout<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

fn base64(text: &str) -> String {
    BASE64.encode(text)
}

fn pair(account: &str, password: &str) -> Vec<(String, String)> {
    vec![(account.to_owned(), password.to_owned())]
}

/// Logs in with a PLAIN initial response sent as `argument` (`"..."` or a literal).
async fn logs_in_with(argument: impl Fn(&str) -> String) {
    let mut client = Client::start(Setup::default()).await;
    client.expect(&NO_UPSTREAM).await;
    let command = format!(
        "AUTHENTICATE \"PLAIN\" {}\r\n",
        argument(&base64("\0alice\0right"))
    );
    client.exchange(&command, &[COMPLETION]).await;
    assert_eq!(client.seen(), pair("alice", "right"));
    assert!(client.finish().await.is_some());
}

#[tokio::test]
async fn greeting_capability_noop_logout() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        client.send("capability\r\n").await;
        client.expect(&NO_UPSTREAM[..4]).await;
        client.expect(&["OK \"Capability completed\""]).await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
        client
            .exchange(
                "NOOP {3+}\r\na\"b\r\n",
                &["OK (TAG \"a\\\"b\") \"NOOP completed\""],
            )
            .await;
        client
            .exchange(
                "PUTSCRIPT \"s\" {5+}\r\nkeep;\r\n",
                &["NO \"Authenticate first\""],
            )
            .await;
        client
            .exchange("XYZZY\r\n", &["NO \"Unknown command\""])
            .await;
        client
            .exchange("Logout\r\n", &["OK \"Logout completed\""])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn greeting_relays_the_upstream_capabilities_validated() {
    with_timeout(async {
        let capabilities = [
            "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"",
            "\"SASL\" \"XOAUTH2 OAUTHBEARER\"",
            "\"SIEVE\" \"fileinto reject envelope\"",
            "\"NOTIFY\" \"mailto\"\r\nOK \"forged\"",
            "\"MAXREDIRECTS\" \"4\"",
            "\"UNAUTHENTICATE\"",
            "\"VERSION\" \"1.0\"",
        ];
        let setup = Setup {
            capabilities: capabilities.iter().map(|line| line.to_string()).collect(),
            ..Setup::default()
        };
        let mut client = Client::start(setup).await;
        client
            .expect(&[
                "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"",
                "\"SASL\" \"PLAIN LOGIN\"",
                "\"SIEVE\" \"fileinto reject envelope\"",
                "\"MAXREDIRECTS\" \"4\"",
                "\"VERSION\" \"1.0\"",
                "OK \"mx.test ManageSieve ready\"",
            ])
            .await;
    })
    .await;
}

#[tokio::test]
async fn authenticate_plain_with_a_quoted_initial_response() {
    with_timeout(logs_in_with(|encoded| format!("\"{encoded}\""))).await;
}

#[tokio::test]
async fn authenticate_plain_with_a_non_synchronizing_literal() {
    with_timeout(logs_in_with(|encoded| {
        format!("{{{}+}}\r\n{encoded}", encoded.len())
    }))
    .await;
}

#[tokio::test]
async fn authenticate_plain_with_a_synchronizing_literal_gets_no_continuation() {
    with_timeout(logs_in_with(|encoded| {
        format!("{{{}}}\r\n{encoded}", encoded.len())
    }))
    .await;
}

#[tokio::test]
async fn authenticate_login_with_string_responses() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        client
            .exchange("AUTHENTICATE \"login\"\r\n", &["\"VXNlcm5hbWU6\""])
            .await;
        client
            .exchange(&format!("\"{}\"\r\n", base64("bob")), &["\"UGFzc3dvcmQ6\""])
            .await;
        let password = base64("right");
        client
            .exchange(
                &format!("{{{}+}}\r\n{password}\r\n", password.len()),
                &[COMPLETION],
            )
            .await;
        assert_eq!(client.seen(), pair("bob", "right"));
        assert!(client.finish().await.is_some());
    })
    .await;
}

#[tokio::test]
async fn cancelled_authentication_leaves_the_session_usable() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        client
            .exchange("AUTHENTICATE \"PLAIN\"\r\n", &["\"\""])
            .await;
        client
            .exchange("\"*\"\r\n", &["NO \"Authentication cancelled\""])
            .await;
        client
            .exchange(
                "AUTHENTICATE \"CRAM-MD5\"\r\n",
                &["NO \"Unsupported mechanism\""],
            )
            .await;
        client
            .exchange(
                "AUTHENTICATE \"PLAIN\" \"not base64!\"\r\n",
                &["NO \"Invalid SASL response\""],
            )
            .await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
        assert!(client.seen().is_empty());
    })
    .await;
}

#[tokio::test]
async fn failed_logins_are_mapped_and_close_the_session_at_the_limit() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        let wrong = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            base64("\0alice\0wrong")
        );
        for _ in 1..MAX_LOGIN_FAILURES {
            client
                .exchange(&wrong, &["NO \"Authentication failed\""])
                .await;
        }
        client
            .exchange(
                &wrong,
                &[
                    "NO \"Authentication failed\"",
                    "BYE \"Too many failed logins\"",
                ],
            )
            .await;
        assert!(client.finish().await.is_none());

        let setup = Setup {
            failure: LoginError::TokenUnavailable,
            ..Setup::default()
        };
        let mut client = Client::start(setup).await;
        client.expect(&NO_UPSTREAM).await;
        client
            .exchange(
                &wrong,
                &["NO (TRYLATER) \"Temporary failure, try again later\""],
            )
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_literal_too_large_is_read_past_and_refused() {
    with_timeout(async {
        let setup = Setup {
            max_literal_size: 16,
            ..Setup::default()
        };
        let mut client = Client::start(setup).await;
        client.expect(&NO_UPSTREAM).await;
        // The literal's bytes look like commands; none of them is run.
        let literal = "LOGOUT\r\nLOGOUT\r\nLOGOUT\r\n";
        for announcement in ["+}", "}"] {
            let command = format!("NOOP {{{}{announcement}\r\n{literal}\r\n", literal.len());
            client
                .exchange(&command, &["NO \"Command too long or malformed\""])
                .await;
        }
        let long = format!("NOOP \"{}\"\r\n", "a".repeat(DEFAULT_MAX_LINE_LENGTH));
        client
            .exchange(&long, &["NO \"Command too long or malformed\""])
            .await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
    })
    .await;
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        for _ in 1..MAX_ERRORS {
            client
                .exchange("HAVESPACE \"s\" \"1\"\r\n", &["NO \"Authenticate first\""])
                .await;
        }
        client
            .exchange(
                "\"not a command\"\r\n",
                &[
                    "NO \"Invalid command\"",
                    "BYE \"Too many invalid commands\"",
                ],
            )
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

#[tokio::test]
async fn starttls_sends_the_capabilities_again_and_drops_injected_commands() {
    with_timeout(async {
        let ca = Arc::new(TestCa::create().await);
        let setup = Setup {
            tls: Some((Arc::clone(&ca), false)),
            ..Setup::default()
        };
        let mut client = Client::start(setup).await;
        client
            .expect(&[
                "\"IMPLEMENTATION\" \"mailgate\"",
                "\"SASL\" \"PLAIN LOGIN\"",
                "\"SIEVE\" \"\"",
                "\"STARTTLS\"",
                "\"VERSION\" \"1.0\"",
                "OK \"mx.test ManageSieve ready\"",
            ])
            .await;
        // Sent in the clear with STARTTLS: must not be acted on after the handshake.
        client
            .exchange(
                "STARTTLS\r\nLOGOUT\r\n",
                &["OK \"Begin TLS negotiation now\""],
            )
            .await;
        client.start_tls(&ca).await;
        client.expect(&NO_UPSTREAM[..4]).await;
        client.expect(&["OK \"Capability completed\""]).await;
        client
            .exchange("NOOP\r\n", &["OK \"NOOP completed\""])
            .await;
        client
            .exchange("STARTTLS\r\n", &["NO \"STARTTLS not available\""])
            .await;
        logs_in_over(&mut client).await;
    })
    .await;
}

async fn logs_in_over(client: &mut Client) {
    let command = format!(
        "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
        base64("\0alice\0right")
    );
    client.exchange(&command, &[COMPLETION]).await;
}

#[tokio::test]
async fn required_tls_refuses_logins_before_it() {
    with_timeout(async {
        let ca = Arc::new(TestCa::create().await);
        let setup = Setup {
            tls: Some((Arc::clone(&ca), true)),
            ..Setup::default()
        };
        let mut client = Client::start(setup).await;
        client
            .expect(&[
                "\"IMPLEMENTATION\" \"mailgate\"",
                "\"SASL\" \"\"",
                "\"SIEVE\" \"\"",
                "\"STARTTLS\"",
                "\"VERSION\" \"1.0\"",
                "OK \"mx.test ManageSieve ready\"",
            ])
            .await;
        let command = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n",
            base64("\0alice\0right")
        );
        client
            .exchange(&command, &["NO (ENCRYPT-NEEDED) \"Log in after STARTTLS\""])
            .await;
        assert!(client.seen().is_empty());
        client
            .exchange("STARTTLS\r\n", &["OK \"Begin TLS negotiation now\""])
            .await;
        client.start_tls(&ca).await;
        client.expect(&NO_UPSTREAM[..4]).await;
        client.expect(&["OK \"Capability completed\""]).await;
        logs_in_over(&mut client).await;
        assert_eq!(client.seen(), pair("alice", "right"));
    })
    .await;
}

#[tokio::test]
async fn pipelined_commands_after_login_reach_the_upstream() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        let pipelined = "LISTSCRIPTS\r\nPUTSCRIPT \"s\" {5+}\r\nkeep;\r\n";
        let command = format!(
            "AUTHENTICATE \"PLAIN\" \"{}\"\r\n{pipelined}",
            base64("\0alice\0right")
        );
        client.exchange(&command, &[COMPLETION]).await;
        let mut handoff = client.finish().await.unwrap();
        let mut replayed = vec![0u8; pipelined.len()];
        handoff.client.read_exact(&mut replayed).await.unwrap();
        assert_eq!(replayed, pipelined.as_bytes());
    })
    .await;
}

#[tokio::test]
async fn shutting_down_says_bye_trylater() {
    with_timeout(async {
        let mut client = Client::start(Setup::default()).await;
        client.expect(&NO_UPSTREAM).await;
        client.stop.take();
        client
            .expect(&["BYE (TRYLATER) \"Server shutting down\""])
            .await;
        assert!(client.finish().await.is_none());
    })
    .await;
}

/// A client that floods CAPABILITY and never reads its replies cannot hold the session: the
/// pending replies are given up at the idle deadline, not the (longer) lifetime.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_let_go_at_the_idle_deadline() {
    let client = Client::start(Setup::default()).await;
    let (_from_mailgate, mut to_mailgate) = tokio::io::split(client.io);
    let flood = tokio::spawn(async move {
        let commands = "CAPABILITY\r\n".repeat(100_000);
        let _ = to_mailgate.write_all(commands.as_bytes()).await;
        to_mailgate
    });
    let idle = Duration::from_secs(60);
    let ended = tokio::time::timeout(idle * 2, client.session).await;
    let outcome = ended
        .expect("the session outlived its idle deadline")
        .unwrap();
    assert!(!matches!(outcome, Ok(Some(_))), "no login happened");
    flood.abort();
}
