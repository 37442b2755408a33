//! Transcripts of one front-end session before login: [`Client`] starts a protocol's dialogue
//! through `frontend::serve` over an in-memory stream, with a stand-in authenticator, and
//! reads its replies line by line; STARTTLS is a real handshake with a [`TestCa`]'s
//! certificate. The stand-in accepts the password "right" for any account.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailgate::client_tls::ClientTls;
use mailgate::config::{DEFAULT_MAX_LINE_LENGTH, DEFAULT_MAX_LITERAL_SIZE};
use mailgate::frontend::settings::FrontendSettings;
use mailgate::frontend::{self, MailProtocol};
use mailgate::io::BoxedIo;
use mailgate::login::{Authenticator, Closing, Handoff, LoginError, LoginRequest, Upstream};
use mailgate::metrics::Metrics;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::TestCa;

/// The only password the stand-in accepts.
const RIGHT_PASSWORD: &str = "right";
/// Every transcript gives up after this long instead of hanging.
pub const TRANSCRIPT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `test`, panicking when it takes longer than [`TRANSCRIPT_TIMEOUT`].
pub async fn with_timeout<T>(test: impl Future<Output = T>) -> T {
    super::with_timeout(TRANSCRIPT_TIMEOUT, test).await
}

/// One login the stand-in saw, as [`Client::seen`] lists them.
pub fn pair(account: &str, password: &str) -> Vec<(String, String)> {
    vec![(account.to_owned(), password.to_owned())]
}

/// How a session under test is set up. [`Setup::new`] gives the listener's defaults; change
/// fields with struct update syntax.
pub struct Setup {
    pub protocol: &'static dyn MailProtocol,
    /// The upstream's completion line, which the stand-in hands over on a login.
    pub completion: &'static str,
    /// What the stand-in says the upstream announces (the protocol's probe).
    pub capabilities: Vec<String>,
    /// What the stand-in answers to a wrong password.
    pub failure: LoginError,
    /// STARTTLS offered with the CA's certificate; `true`: required.
    pub tls: Option<(Arc<TestCa>, bool)>,
    /// The listener's `max_line_length`.
    pub max_line_length: usize,
    /// The listener's `max_literal_size` (IMAP and ManageSieve literals).
    pub max_literal_size: usize,
}

impl Setup {
    /// `protocol` without TLS, with no upstream capabilities and the default limits; wrong
    /// passwords fail with [`LoginError::BadCredentials`].
    pub fn new(protocol: &'static dyn MailProtocol, completion: &'static str) -> Self {
        Self {
            protocol,
            completion,
            capabilities: Vec::new(),
            failure: LoginError::BadCredentials,
            tls: None,
            max_line_length: DEFAULT_MAX_LINE_LENGTH,
            max_literal_size: DEFAULT_MAX_LITERAL_SIZE,
        }
    }

    /// This setup with STARTTLS offered (`required`: before any login) by a new test CA.
    pub async fn with_tls(self, required: bool) -> Self {
        Self {
            tls: Some((Arc::new(TestCa::create().await), required)),
            ..self
        }
    }

    /// The settings a listener so configured gives its sessions; the CA's certificate and the
    /// protocol's ALPN id when it offers STARTTLS, as the server builds them.
    pub fn settings(&self) -> FrontendSettings {
        let starttls = self.tls.as_ref().map(|(ca, required)| {
            mailgate::tls::install_crypto_provider();
            let alpn = Some(self.protocol.alpn_id());
            let config = mailgate::tls::server_config(&ca.cert_pem(), &ca.key_pem(), alpn).unwrap();
            let listener = self.protocol.name().name();
            Arc::new(ClientTls::new(
                config,
                *required,
                listener,
                Arc::new(Metrics::new()),
            ))
        });
        FrontendSettings {
            hostname: "mx.test".to_owned(),
            pre_auth_timeout: Duration::from_secs(60),
            pre_auth_lifetime: Duration::from_secs(300),
            client: None,
            starttls,
            max_line_length: self.max_line_length,
            max_literal_size: self.max_literal_size,
            local: None,
        }
    }
}

/// Accepts [`RIGHT_PASSWORD`] for anyone and fails every other login with `failure`,
/// remembering every account and password it is given.
struct StandIn {
    failure: LoginError,
    completion: &'static str,
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
        if password != RIGHT_PASSWORD {
            return Err(self.failure);
        }
        let (io, _server) = duplex(64);
        Ok(Upstream {
            io: Box::new(io),
            completion: self.completion.to_owned(),
            account: None,
            xclient_guard: None,
        })
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        self.capabilities.clone()
    }
}

type Outcome = std::io::Result<Option<Handoff<BoxedIo>>>;

/// The client's end of a session under test.
pub struct Client {
    io: BoxedIo,
    received: Vec<u8>,
    session: JoinHandle<Outcome>,
    authenticator: Arc<StandIn>,
    ca: Option<Arc<TestCa>>,
    /// Dropping it tells the session that mailgate is shutting down.
    stop: Option<oneshot::Sender<()>>,
}

impl Client {
    /// Starts a session as `setup` says; the greeting is still unread.
    pub async fn start(setup: Setup) -> Self {
        let settings = setup.settings();
        let (io, server) = duplex(64 * 1024);
        let authenticator = Arc::new(StandIn {
            failure: setup.failure,
            completion: setup.completion,
            capabilities: setup.capabilities,
            seen: Mutex::new(Vec::new()),
        });
        let session_authenticator = Arc::clone(&authenticator);
        let (stop, stopped) = oneshot::channel::<()>();
        let protocol = setup.protocol;
        let session = tokio::spawn(async move {
            let stop = async {
                let _ = stopped.await;
                Closing::ShuttingDown
            };
            let dialogue = protocol.dialogue(&settings);
            let authenticator = session_authenticator.as_ref();
            frontend::serve(Box::new(server), authenticator, dialogue, &settings, stop).await
        });
        Self {
            io: Box::new(io),
            received: Vec::new(),
            session,
            authenticator,
            ca: setup.tls.map(|(ca, _)| ca),
            stop: Some(stop),
        }
    }

    pub async fn send(&mut self, bytes: &str) {
        self.io.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// The next line, without its CRLF; panics when the session closes first.
    pub async fn line(&mut self) -> String {
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

    /// Expects exactly `lines`, in order.
    pub async fn expect(&mut self, lines: &[&str]) {
        for line in lines {
            assert_eq!(self.line().await, *line);
        }
    }

    /// Sends `command` and expects exactly `replies`.
    pub async fn exchange(&mut self, command: &str, replies: &[&str]) {
        self.send(command).await;
        self.expect(replies).await;
    }

    /// Runs the client side of the TLS handshake after the session agreed to STARTTLS.
    pub async fn start_tls(&mut self) {
        assert!(self.received.is_empty(), "unread: {:?}", self.received);
        let ca = self.ca.as_ref().expect("a session with STARTTLS");
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
    pub async fn finish(mut self) -> Option<Handoff<BoxedIo>> {
        let outcome = self.session.await.unwrap().unwrap();
        if outcome.is_none() {
            let mut rest = Vec::new();
            match self.io.read_to_end(&mut rest).await {
                // A TLS client may see the close without close_notify.
                Err(error) if error.kind() != std::io::ErrorKind::UnexpectedEof => {
                    panic!("reading the end of the session: {error}")
                }
                _ => self.received.extend_from_slice(&rest),
            }
        }
        assert!(self.received.is_empty(), "unread: {:?}", self.received);
        outcome
    }

    /// Tells the session that mailgate is shutting down.
    pub fn shut_down(&mut self) {
        self.stop.take();
    }

    /// Every account and password the stand-in was given, in order.
    /// Writes `command` over and over and never reads, until the session ends or `limit`
    /// passes; the session's outcome, `None` if it outlived `limit`.
    pub async fn flood_unread(self, command: &str, limit: Duration) -> Option<Outcome> {
        let Self {
            io, session, stop, ..
        } = self;
        let (_from_mailgate, mut to_mailgate) = tokio::io::split(io);
        let commands = command.repeat(100_000);
        let flood = tokio::spawn(async move {
            let _ = to_mailgate.write_all(commands.as_bytes()).await;
            to_mailgate
        });
        let ended = tokio::time::timeout(limit, session).await;
        flood.abort();
        drop(stop);
        ended.ok().map(|joined| joined.unwrap())
    }

    pub fn seen(&self) -> Vec<(String, String)> {
        self.authenticator.seen.lock().unwrap().clone()
    }
}
