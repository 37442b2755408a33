//! What the fuzz targets share: runtimes, a stand-in for everything behind a front end, and
//! the checks every front-end transcript must pass whatever the client sent.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mailgate::client_tls::ClientTls;
use mailgate::config::Protocol;
use mailgate::frontend::settings::FrontendSettings;
use mailgate::io::BoxedIo;
use mailgate::login::{Authenticator, LoginError, LoginRequest, Upstream};
use mailgate::metrics::Metrics;
use mailgate::{frontend, protocols, sanitize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};
use tokio::runtime::Runtime;

/// A runtime whose clock is paused: when every task waits, it jumps to the next timer, so a
/// session's timeouts and lifetime are reached without waiting for them.
pub fn paused_runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

/// A runtime on the real clock with sockets, for targets that talk over loopback TCP.
pub fn network_runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// How the client's bytes are cut into writes, so that framing across reads is exercised.
const CHUNK_SIZES: [usize; 8] = [1, 2, 3, 7, 16, 64, 512, usize::MAX];

/// The password the stand-in accepts.
const RIGHT_PASSWORD: &str = "right";

/// Runs one front-end session: the first two bytes pick the settings and the stand-in's
/// answer, the rest is what the client sends (then it closes its side and reads everything).
pub fn run_front_end(protocol: Protocol, data: &[u8]) {
    let [knobs, tls_knobs, client_bytes @ ..] = data else {
        return;
    };
    let (knobs, settings) = (*knobs, settings(*knobs, *tls_knobs));
    let authenticator = StandIn {
        protocol,
        failure: LoginError::ALL[usize::from(knobs & 0b111) % LoginError::ALL.len()],
    };
    let chunk = CHUNK_SIZES[usize::from(knobs >> 5)];
    let transcript = paused_runtime().block_on(async {
        let (client, server) = duplex(4096);
        let (mut from_mailgate, mut to_mailgate) = tokio::io::split(client);
        let write = async {
            for piece in client_bytes.chunks(chunk) {
                if to_mailgate.write_all(piece).await.is_err() {
                    break;
                }
            }
            let _ = to_mailgate.shutdown().await;
        };
        let read = async {
            let mut transcript = Vec::new();
            let _ = from_mailgate.read_to_end(&mut transcript).await;
            transcript
        };
        let session = async {
            let stop = std::future::pending::<mailgate::login::Closing>();
            let dialogue = protocols::named(protocol).dialogue(&settings);
            let client: BoxedIo = Box::new(server);
            let outcome = frontend::serve(client, &authenticator, dialogue, &settings, stop).await;
            // Dropping the handoff closes the client's stream, which ends the read.
            drop(outcome);
        };
        let ((), (), transcript) = tokio::join!(write, session, read);
        transcript
    });
    check_transcript(protocol, &transcript, client_bytes.len());
}

/// Bit 3 of `knobs` picks tiny limits, so that the line and literal limits are met often;
/// bit 0 of `tls_knobs` offers STARTTLS, bit 1 requires it.
fn settings(knobs: u8, tls_knobs: u8) -> FrontendSettings {
    let tiny = knobs & 0b1000 != 0;
    let starttls = (tls_knobs & 1 != 0)
        .then(|| client_tls(tls_knobs & 0b10 != 0))
        .flatten();
    FrontendSettings {
        hostname: "mx.fuzz".to_owned(),
        pre_auth_timeout: Duration::from_secs(60),
        pre_auth_lifetime: Duration::from_secs(300),
        client: None,
        starttls,
        max_line_length: if tiny {
            64
        } else {
            mailgate::config::DEFAULT_MAX_LINE_LENGTH
        },
        max_literal_size: if tiny {
            32
        } else {
            mailgate::config::DEFAULT_MAX_LITERAL_SIZE
        },
        local: None,
    }
}

/// STARTTLS towards clients with a throwaway self-signed certificate, made once with openssl;
/// `None` (STARTTLS not fuzzed) where openssl is missing.
fn client_tls(required: bool) -> Option<Arc<ClientTls>> {
    static TLS: OnceLock<Option<[Arc<ClientTls>; 2]>> = OnceLock::new();
    let both = TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mailgate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = self_signed(&cert, &key);
        let config = made.then(|| {
            mailgate::tls::server_config(&cert, &key, None).expect("the harness's own certificate")
        });
        let _ = std::fs::remove_dir_all(&dir);
        let config = config?;
        let metrics = Arc::new(Metrics::new());
        Some([false, true].map(|required| {
            Arc::new(ClientTls::new(
                config.clone(),
                required,
                "fuzz",
                metrics.clone(),
            ))
        }))
    });
    both.as_ref()
        .map(|[optional, required_tls]| Arc::clone(if required { required_tls } else { optional }))
}

fn self_signed(cert: &Path, key: &Path) -> bool {
    Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=mx.fuzz", "-keyout"])
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Where TLS starts, the clear-text transcript ends: what follows this reply is TLS records.
fn tls_starts(protocol: Protocol) -> &'static [u8] {
    match protocol {
        Protocol::Imap => b"Begin TLS negotiation now\r\n",
        Protocol::Smtp => b"Ready to start TLS\r\n",
        Protocol::Pop3 => b"+OK Begin TLS negotiation\r\n",
        Protocol::Managesieve => b"OK \"Begin TLS negotiation now\"\r\n",
    }
}

/// Everything a front end sends is CRLF-terminated lines without other line breaks or
/// control characters (a client's bytes echoed raw could forge replies), and a client cannot
/// make it send much more than it sent.
fn check_transcript(protocol: Protocol, transcript: &[u8], sent: usize) {
    let transcript = clear_text(transcript, tls_starts(protocol));
    assert!(
        transcript.is_empty() || transcript.ends_with(b"\r\n"),
        "unterminated reply: {:?}",
        String::from_utf8_lossy(transcript)
    );
    for line in transcript.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            !line.iter().any(|&b| b.is_ascii_control()),
            "control character in reply line {:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert!(
        transcript.len() <= 4096 + 256 * sent,
        "{} bytes of replies to {sent} bytes",
        transcript.len()
    );
}

fn clear_text<'a>(transcript: &'a [u8], marker: &[u8]) -> &'a [u8] {
    transcript
        .windows(marker.len())
        .position(|w| w == marker)
        .map_or(transcript, |at| &transcript[..at + marker.len()])
}

/// Stands in for the password check, token source and upstream: accepts [`RIGHT_PASSWORD`]
/// and fails every other login with `failure`; answers as `protocol`'s upstream would.
struct StandIn {
    protocol: Protocol,
    failure: LoginError,
}

impl Authenticator for StandIn {
    async fn login(&self, request: LoginRequest) -> Result<Upstream, LoginError> {
        let credentials = request.credentials;
        assert_usable_account(&credentials.account);
        if credentials.password.expose() != RIGHT_PASSWORD {
            return Err(self.failure);
        }
        let (io, _upstream) = duplex(64);
        Ok(Upstream {
            io: Box::new(io),
            completion: completion(self.protocol).to_owned(),
            account: None,
            xclient_guard: None,
        })
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        let lines: &[&str] = match self.protocol {
            Protocol::Managesieve => &[
                "\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"",
                "\"SIEVE\" \"fileinto reject envelope vacation\"",
                "\"NOTIFY\" \"mailto\"",
                "\"VERSION\" \"1.0\"",
            ],
            _ => &["SIZE 35882577", "8BITMIME", "PIPELINING", "CHUNKING"],
        };
        lines.iter().copied().map(str::to_owned).collect()
    }
}

/// What an upstream of `protocol` answers a login with, as the front end relays it.
fn completion(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Imap => "OK [CAPABILITY IMAP4rev1] Logged in",
        Protocol::Smtp => "235 2.7.0 Authentication successful",
        Protocol::Pop3 => "+OK Logged in.",
        Protocol::Managesieve => "OK \"Logged in.\"",
    }
}

/// What every path to a login must have checked: an account name is never empty and holds
/// nothing that could forge a log line or a SASL field.
pub fn assert_usable_account(account: &str) {
    assert!(!account.is_empty(), "empty account reached a login");
    assert!(
        !account.chars().any(sanitize::is_hidden),
        "account with hidden characters reached a login: {account:?}"
    );
}
