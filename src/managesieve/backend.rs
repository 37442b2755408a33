//! The upstream side: the capability greeting, optional STARTTLS (RFC 5804 2.2), then
//! AUTHENTICATE with a bearer token or password (RFC 5804 2.1, RFC 7628), leaving an
//! authenticated stream.
//!
//! Responses are framed with the `Fragmentizer` as client commands are: lines, with the
//! literals a server announces as `{n}` read whole.

use std::io;
use std::time::Duration;

use imap_codec::fragmentizer::FragmentInfo;
use tokio::io::AsyncWriteExt;

use super::syntax::{self, MAX_QUOTED, Token, quote};
use crate::config::TlsMode;
use crate::forward::Origin;
use crate::frontend::framer::Framer;
use crate::io::{BoxedIo, LINGER_TIMEOUT, replaying, say_goodbye};
use crate::login::{BackendError, Upstream, UpstreamAuth};
use crate::sanitize;
use crate::sasl::{self, Exchange};
use crate::secret::Secret;
use crate::upstream::Connector;

/// How long mailgate waits for any one upstream response, to write a command, or for the
/// STARTTLS handshake. Dovecot delays a refusal by about 2 s and up to 15 s under its auth
/// penalty.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most one upstream response may hold, literals included: far above any capability
/// line or login answer, so only a broken or hostile upstream reaches it.
const MAX_RESPONSE: u32 = 64 * 1024;
/// The most capability lines taken before the `OK`: Dovecot sends about ten; they are kept
/// and relayed to every client, so an upstream must not send them without end.
const MAX_CAPABILITY_LINES: usize = 256;

/// Logs in upstream and returns the authenticated stream with the upstream's `OK` line, which
/// the client gets as the answer to its AUTHENTICATE (RFC 5804 2.1: it may carry SASL data).
///
/// # Errors
/// [`BackendError::Rejected`] for a refused login (`NO` without `TRYLATER`),
/// [`BackendError::NoMechanism`] when no usable SASL mechanism is offered,
/// [`BackendError::Protocol`] for `NO (TRYLATER)` (temporary), `BYE` or anything unexpected,
/// [`BackendError::Io`] when the connection fails, closes, or a response times out.
///
/// No error carries the token or password, whichever response the upstream quoted it in.
pub async fn login(
    connector: &Connector,
    auth: &UpstreamAuth,
    origin: Option<&Origin>,
) -> Result<Upstream, BackendError> {
    unredacted_login(connector, auth, origin)
        .await
        .map_err(|error| error.without(&sasl::sent_forms(auth, None)))
}

/// The login's dialogue; its errors may still quote what was sent, so [`login`] redacts them.
async fn unredacted_login(
    connector: &Connector,
    auth: &UpstreamAuth,
    origin: Option<&Origin>,
) -> Result<Upstream, BackendError> {
    let (mut connection, capabilities) = open(connector, origin).await?;
    let offered = sasl_mechanisms(&capabilities);
    let offers = |name: &str| offered.iter().any(|offer| offer == name);
    let target = (connector.host(), connector.port());
    let exchange = Exchange::for_upstream(auth, connector.mechanism(), target, offers)?
        .ok_or(BackendError::NoMechanism)?;
    let sent = sasl::sent_forms(auth, Some(&exchange));
    let completion = authenticate(&mut connection, &exchange)
        .await
        .map_err(|error| error.without(&sent))?;
    Ok(Upstream {
        completion,
        io: connection.into_io(),
        account: None,
        xclient_guard: None,
    })
}

/// Connects, reads the capabilities (again after STARTTLS when configured) and returns them
/// as validated, re-quoted lines; then sends LOGOUT. There is no client, so nothing is
/// forwarded (`proxy_v2`: a LOCAL header). Also the health check of a pool's server: nothing
/// authenticates.
///
/// # Errors
/// As for [`login`], except that no authentication is attempted: a greeting that does not
/// end in `OK` (`BYE`, `NO`) is an error.
pub async fn probe_capabilities(connector: &Connector) -> Result<Vec<String>, BackendError> {
    let (mut connection, capabilities) = open(connector, None).await?;
    // A polite goodbye; the capabilities are known already, so its answer does not matter.
    // It is not awaited, only the close, and that briefly: Dovecot 2.3's managesieve-login
    // over implicit TLS at times never answers, which held the capabilities back for the
    // whole reply timeout.
    say_goodbye(&mut connection.io, b"LOGOUT\r\n", LINGER_TIMEOUT).await;
    Ok(capabilities)
}

/// The part of a session shared by [`login`] and [`probe_capabilities`].
async fn open(
    connector: &Connector,
    origin: Option<&Origin>,
) -> Result<(Connection, Vec<String>), BackendError> {
    let mut connection = Connection::new(connector.connect(origin).await?);
    let mut capabilities = connection.capabilities().await?;
    if connector.tls_mode() == TlsMode::Starttls {
        expect_ok(connection.command(b"STARTTLS\r\n").await?)?;
        // Bytes received before the handshake must not be trusted after it.
        if connection.framer.buffered() > 0 {
            return Err(BackendError::Protocol(
                "upstream sent data after its STARTTLS response".to_owned(),
            ));
        }
        connection = Connection::new(connector.start_tls(connection.io).await?);
        // RFC 5804 2.2: the server sends its capabilities again after the handshake, and
        // everything learnt before it is discarded.
        capabilities = connection.capabilities().await?;
    }
    Ok((connection, capabilities))
}

/// Sends AUTHENTICATE with the initial response; returns the `OK` line.
async fn authenticate(
    connection: &mut Connection,
    exchange: &Exchange,
) -> Result<String, BackendError> {
    let name = exchange.mechanism;
    tracing::debug!(mechanism = name, "authenticating upstream");
    let encoded = sasl::encode_base64(&exchange.message);
    let command = Secret::new(format!(
        "AUTHENTICATE \"{name}\" {}\r\n",
        string(encoded.expose())
    ));
    let response = connection.command(command.expose().as_bytes()).await?;
    let response = match response.as_slice() {
        // RFC 7628 3.2.3: a challenge after the token reports the error; the client
        // acknowledges it and the server then sends its final failure. PLAIN has no such
        // step: `"*"` cancels (RFC 5804 2.1).
        [Token::String(_)] => {
            let answer = match exchange.acknowledgement {
                Some(bytes) => string(sasl::encode_base64(&Secret::new(bytes.to_vec())).expose()),
                None => "\"*\"".to_owned(),
            };
            let last = connection
                .command(format!("{answer}\r\n").as_bytes())
                .await?;
            if is_ok(&last) {
                return Err(BackendError::Protocol(
                    "upstream accepted after an error challenge".to_owned(),
                ));
            }
            last
        }
        _ => response,
    };
    if is_ok(&response) {
        Ok(completion(&response))
    } else {
        Err(classify(&response))
    }
}

/// A string argument: quoted, or a non-synchronizing literal when longer than a quoted string
/// may be (RFC 5804 4); base64 needs no escapes. Dovecot 2.3's managesieve-login takes a SASL
/// response of up to about 8 KB either way (measured: 8,101 octets of base64 accepted, 8,368
/// refused as "Authentication response too large", the connection closed).
fn string(text: &str) -> String {
    if text.len() <= MAX_QUOTED {
        format!("\"{text}\"")
    } else {
        format!("{{{}+}}\r\n{text}", text.len())
    }
}

fn is_ok(response: &[Token]) -> bool {
    matches!(response.first(), Some(Token::Atom(status)) if status.eq_ignore_ascii_case("OK"))
}

/// The response if it is `OK`; outside AUTHENTICATE anything else is a protocol error: a
/// fresh token would not help.
fn expect_ok(response: Vec<Token>) -> Result<Vec<Token>, BackendError> {
    if is_ok(&response) {
        Ok(response)
    } else {
        Err(BackendError::Protocol(response_text(&response)))
    }
}

/// Classifies a response that is not `OK`: `NO` is a refusal, unless its code is TRYLATER
/// (RFC 5804 1.3: temporary, so a fresh token would not help); `BYE` and anything else are
/// protocol errors.
fn classify(response: &[Token]) -> BackendError {
    let text = response_text(response);
    let try_later = response
        .windows(2)
        .any(|pair| matches!(pair, [Token::Open, Token::Atom(code)] if code.eq_ignore_ascii_case("TRYLATER")));
    match response.first() {
        Some(Token::Atom(status)) if status.eq_ignore_ascii_case("NO") && !try_later => {
            BackendError::Rejected(text)
        }
        _ => BackendError::Protocol(text),
    }
}

/// A response as text safe to log: servers may echo what they refuse, token included.
fn response_text(response: &[Token]) -> String {
    match syntax::render(response) {
        Some(text) => sanitize::for_log(&text),
        None => "unprintable response".to_owned(),
    }
}

/// The `OK` line to relay to the client: quoted anew, or a bare `OK` when a string in it
/// cannot be quoted (relaying a literal would put the upstream's raw bytes on the line).
fn completion(response: &[Token]) -> String {
    syntax::render(response)
        .map(|line| sanitize::for_wire(&line))
        .unwrap_or_else(|| "OK".to_owned())
}

/// Upper-cased mechanism names from the `"SASL"` capability (RFC 5804 1.7).
fn sasl_mechanisms(capabilities: &[String]) -> Vec<String> {
    capabilities
        .iter()
        .filter_map(|line| syntax::capability(line))
        .filter(|(name, _)| name == "SASL")
        .flat_map(|(_, value)| {
            value
                .split_ascii_whitespace()
                .map(str::to_ascii_uppercase)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// An upstream stream and the framer holding what was read past the last response.
struct Connection {
    io: BoxedIo,
    framer: Framer,
}

impl Connection {
    fn new(io: BoxedIo) -> Self {
        Self {
            io,
            framer: Framer::new(MAX_RESPONSE),
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<Vec<Token>, BackendError> {
        self.send(line).await?;
        self.response().await
    }

    /// Writes `line` under [`REPLY_TIMEOUT`].
    async fn send(&mut self, line: &[u8]) -> Result<(), BackendError> {
        let write = async {
            self.io.write_all(line).await?;
            self.io.flush().await
        };
        tokio::time::timeout(REPLY_TIMEOUT, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream write timed out"))??;
        Ok(())
    }

    /// The capability lines up to the `OK` that ends them (RFC 5804 1.7), each quoted anew;
    /// lines that are no capability are dropped, as they may be relayed to clients.
    async fn capabilities(&mut self) -> Result<Vec<String>, BackendError> {
        let mut lines = Vec::new();
        for _ in 0..=MAX_CAPABILITY_LINES {
            let response = self.response().await?;
            match response.first() {
                Some(Token::String(_)) => lines.extend(capability_line(&response)),
                _ => {
                    expect_ok(response)?;
                    return Ok(lines);
                }
            }
        }
        Err(BackendError::Protocol(format!(
            "capabilities longer than {MAX_CAPABILITY_LINES} lines"
        )))
    }

    /// Reads one complete response line, literals included, under [`REPLY_TIMEOUT`].
    async fn response(&mut self) -> Result<Vec<Token>, BackendError> {
        tokio::time::timeout(REPLY_TIMEOUT, self.receive())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream reply timed out"))?
    }

    async fn receive(&mut self) -> Result<Vec<Token>, BackendError> {
        loop {
            while let Some(fragment) = self.framer.progress() {
                // Refused as announced, rather than read and dropped up to its length.
                if let FragmentInfo::Line {
                    announcement: Some(announcement),
                    ..
                } = fragment
                    && announcement.length > MAX_RESPONSE
                {
                    return Err(BackendError::Protocol(format!(
                        "upstream announced a literal of {} bytes",
                        announcement.length
                    )));
                }
                let fragmentizer = self.framer.fragmentizer();
                if !fragmentizer.is_message_complete() {
                    continue;
                }
                if fragmentizer.is_max_message_size_exceeded() {
                    return Err(BackendError::Protocol(format!(
                        "upstream response longer than {MAX_RESPONSE} bytes"
                    )));
                }
                return syntax::tokenize(fragmentizer.message_bytes()).ok_or_else(|| {
                    BackendError::Protocol("malformed upstream response".to_owned())
                });
            }
            if !self.framer.fill(&mut self.io).await? {
                return Err(BackendError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "upstream closed the connection",
                )));
            }
        }
    }

    /// The stream, replaying anything the upstream sent after the last response.
    fn into_io(self) -> BoxedIo {
        replaying(self.framer.into_unparsed(), self.io)
    }
}

/// A capability line as `"NAME" "value"` from its words, or `None` if it is not one.
fn capability_line(response: &[Token]) -> Option<String> {
    match response {
        [Token::String(name)] => quote(name),
        [Token::String(name), Token::String(value)] => {
            Some(format!("{} {}", quote(name)?, quote(value)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(line: &str) -> Vec<Token> {
        syntax::tokenize(line.as_bytes()).unwrap()
    }

    #[test]
    fn classification() {
        assert!(matches!(
            classify(&tokens("NO \"Authentication failed.\"\r\n")),
            BackendError::Rejected(text) if text == "NO \"Authentication failed.\""
        ));
        assert!(matches!(
            classify(&tokens("NO (TRYLATER) \"Busy\"\r\n")),
            BackendError::Protocol(_)
        ));
        assert!(matches!(
            classify(&tokens("BYE \"Too many\"\r\n")),
            BackendError::Protocol(_)
        ));
    }

    #[test]
    fn mechanisms_and_capability_lines() {
        let lines = vec![
            "\"IMPLEMENTATION\" \"x\"".to_owned(),
            "\"sasl\" \"xoauth2 OAuthBearer\"".to_owned(),
        ];
        assert_eq!(sasl_mechanisms(&lines), ["XOAUTH2", "OAUTHBEARER"]);
        assert_eq!(
            capability_line(&tokens("\"SIEVE\" {8}\r\nfileinto\r\n")),
            Some("\"SIEVE\" \"fileinto\"".to_owned())
        );
        assert_eq!(capability_line(&tokens("OK\r\n")), None);
    }

    #[test]
    fn long_initial_responses_go_as_literals() {
        assert_eq!(string("abc"), "\"abc\"");
        let long = "A".repeat(MAX_QUOTED + 1);
        assert_eq!(string(&long), format!("{{1025+}}\r\n{long}"));
    }

    #[test]
    fn completion_is_requoted() {
        assert_eq!(
            completion(&tokens("OK (SASL \"eA==\") \"Logged in.\"\r\n")),
            "OK (SASL \"eA==\") \"Logged in.\""
        );
        assert_eq!(completion(&tokens("OK {2}\r\na\n\r\n")), "OK");
    }
}
