//! The SMTP session with a client before authentication (RFC 5321, AUTH per RFC 4954,
//! pipelining per RFC 2920): greeting, EHLO, AUTH PLAIN/LOGIN, then a [`Handoff`].

use std::io;

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

use crate::io::PrefixedIo;
use crate::proxy::{Authenticator, FrontendSettings, Handoff, LoginError, LoginRequest};
use crate::sasl::{self, Credentials};
use crate::secret::Secret;
use crate::smtp::reply::{self, Failure};

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 4954 4 raises the limit to 12288 octets (CRLF included) for the AUTH command and the
/// client's SASL responses; that also bounds every buffered line, since the framer cannot
/// know the verb before the line ends.
pub const MAX_AUTH_LINE: usize = 12288;
/// Errors of any kind before authentication after which the session is closed. Counted in
/// total rather than consecutively, so that interleaving NOOPs does not reset the count.
pub const MAX_ERRORS: u32 = 10;
/// Failed logins after which the session is closed (RFC 4954 leaves the number to servers).
pub const MAX_AUTH_FAILURES: u32 = 3;
/// Bytes read from the client at once; the line buffer holds at most this plus one line.
const READ_CHUNK: usize = 4096;

/// RFC 4954 4 (AUTH LOGIN is not standardised, but every client expects these prompts).
const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// Extensions relayed from the upstream's EHLO. Anything else is dropped: AUTH and STARTTLS
/// describe the upstream hop, REQUIRETLS (RFC 8689) would promise TLS on a hop mailgate does
/// not encrypt, XCLIENT/XFORWARD would let clients spoof their origin, and unknown private
/// extensions cannot be vouched for.
const RELAYED_EXTENSIONS: &[&str] = &[
    "8BITMIME",
    "BINARYMIME",
    "BURL",
    "CHUNKING",
    "DELIVERBY",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "FUTURERELEASE",
    "LIMITS",
    "MT-PRIORITY",
    "MTRK",
    "NO-SOLICITING",
    "PIPELINING",
    "RRVS",
    "SIZE",
    "SMTPUTF8",
];

/// What mailgate offers clients itself, whatever the upstream says.
const AUTH_EXTENSION: &str = "AUTH PLAIN LOGIN";
const ENHANCED_STATUS_CODES: &str = "ENHANCEDSTATUSCODES";
/// Offered when the upstream's extensions are unknown: only what mailgate honours itself.
const FALLBACK_EXTENSIONS: &[&str] = &["PIPELINING", "8BITMIME", ENHANCED_STATUS_CODES];

/// Runs the client session until it authenticates, quits, or is closed.
///
/// Waits at most `settings.pre_auth_timeout` for each complete line. Bytes the client sent
/// after the last line of a successful AUTH exchange are replayed by the handoff's stream.
///
/// Returns `Ok(None)` on QUIT, when the client closes, after a timeout (having sent `421`),
/// and after too many errors or failed logins.
///
/// # Errors
/// Reading from or writing to the client fails, or a write does not finish before the deadline.
pub async fn serve<S, A>(
    mut client: S,
    authenticator: &A,
    settings: &FrontendSettings,
) -> io::Result<Option<Handoff<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: Authenticator,
{
    let hostname = settings.hostname.as_str();
    let mut session = Session::default();
    let mut lines = LineBuffer::default();
    let mut out = reply::greeting(hostname);
    let mut deadline = Instant::now() + settings.pre_auth_timeout;
    loop {
        let Some(line) = lines.next_line() else {
            send(&mut client, &mut out, deadline).await?;
            match read_more(&mut client, &mut lines, deadline).await? {
                Input::Data => continue,
                Input::Closed => return Ok(None),
                Input::TimedOut => {
                    out.extend(reply::failure(Failure::Timeout, hostname).to_bytes());
                    let grace = Instant::now() + settings.pre_auth_timeout;
                    send(&mut client, &mut out, grace).await?;
                    return Ok(None);
                }
            }
        };
        deadline = Instant::now() + settings.pre_auth_timeout;
        let mut step = match line {
            Line::Complete(line) => session.on_line(&line, hostname),
            Line::TooLong => session.on_too_long(hostname),
        };
        // A failed login yields a further step, so steps are dispatched until one settles.
        loop {
            match step {
                Step::Reply(bytes) => out.extend(bytes),
                Step::Ehlo => {
                    let upstream = authenticator.smtp_extensions().await;
                    out.extend(reply::ehlo(hostname, &advertised_extensions(&upstream)));
                }
                Step::DiscardChunk { bytes, reply } => {
                    lines.discard(bytes);
                    out.extend(reply);
                }
                Step::Close(bytes) => {
                    out.extend(bytes);
                    send(&mut client, &mut out, deadline).await?;
                    return Ok(None);
                }
                Step::Login(credentials) => {
                    send(&mut client, &mut out, deadline).await?;
                    let account = credentials.account.clone();
                    let request = LoginRequest {
                        credentials,
                        helo: session.helo_name(),
                    };
                    let result = authenticator.login(request).await;
                    deadline = Instant::now() + settings.pre_auth_timeout;
                    match result {
                        Ok(upstream) => {
                            out.extend(reply::authenticated().to_bytes());
                            send(&mut client, &mut out, deadline).await?;
                            tracing::info!(%account, "client authenticated");
                            return Ok(Some(Handoff {
                                client: PrefixedIo::new(lines.into_rest(), client),
                                upstream,
                                account,
                            }));
                        }
                        Err(error) => {
                            tracing::info!(%account, %error, "client login failed");
                            step = session.on_login_failed(error, hostname);
                            continue;
                        }
                    }
                }
            }
            break;
        }
    }
}

/// The EHLO keywords shown to clients: the upstream's relayable lines as sent (so parameters
/// such as `SIZE 35882577` survive), `ENHANCEDSTATUSCODES` because mailgate's own replies carry
/// them, and `AUTH PLAIN LOGIN` last.
pub fn advertised_extensions(upstream: &[String]) -> Vec<String> {
    let mut extensions: Vec<String> = if upstream.is_empty() {
        FALLBACK_EXTENSIONS
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        upstream
            .iter()
            .filter(|line| RELAYED_EXTENSIONS.contains(&keyword(line).as_str()))
            .cloned()
            .collect()
    };
    if !extensions
        .iter()
        .any(|line| keyword(line) == ENHANCED_STATUS_CODES)
    {
        extensions.push(ENHANCED_STATUS_CODES.to_owned());
    }
    extensions.push(AUTH_EXTENSION.to_owned());
    extensions
}

/// The upper-cased keyword of an EHLO line (RFC 5321 4.1.1.1: keywords are case-insensitive).
fn keyword(line: &str) -> String {
    line.split_ascii_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// Writes and clears `out`, giving up at `deadline` so a client that never reads cannot pin
/// the session.
async fn send<S: AsyncWrite + Unpin>(
    client: &mut S,
    out: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        client.write_all(out).await?;
        client.flush().await
    };
    timeout_at(deadline, write)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read replies"))??;
    out.clear();
    Ok(())
}

enum Input {
    Data,
    Closed,
    TimedOut,
}

async fn read_more<S: AsyncRead + Unpin>(
    client: &mut S,
    lines: &mut LineBuffer,
    deadline: Instant,
) -> io::Result<Input> {
    let mut chunk = [0u8; READ_CHUNK];
    match timeout_at(deadline, client.read(&mut chunk)).await {
        Err(_) => Ok(Input::TimedOut),
        Ok(Ok(0)) => Ok(Input::Closed),
        Ok(Ok(n)) => {
            lines.push(&chunk[..n]);
            Ok(Input::Data)
        }
        Ok(Err(error)) => Err(error),
    }
}

/// A framed client line.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// Up to and including the LF.
    Complete(Vec<u8>),
    /// A line longer than [`MAX_AUTH_LINE`], already discarded up to its LF.
    TooLong,
}

/// Frames client input into lines without I/O, holding at most [`MAX_AUTH_LINE`] bytes of an
/// unfinished line plus one read.
#[derive(Default)]
struct LineBuffer {
    buffer: Vec<u8>,
    /// Inside an oversized line: drop everything up to the next LF.
    overflowing: bool,
    /// Bytes of a refused BDAT chunk still to drop (RFC 3030 2).
    skip: usize,
}

impl LineBuffer {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    fn discard(&mut self, bytes: usize) {
        self.skip = self.skip.saturating_add(bytes);
    }

    fn next_line(&mut self) -> Option<Line> {
        if self.skip > 0 {
            let n = self.skip.min(self.buffer.len());
            self.buffer.drain(..n);
            self.skip -= n;
            if self.skip > 0 {
                return None;
            }
        }
        match self.buffer.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if std::mem::take(&mut self.overflowing) || line.len() > MAX_AUTH_LINE {
                    Some(Line::TooLong)
                } else {
                    Some(Line::Complete(line))
                }
            }
            None => {
                if self.overflowing || self.buffer.len() > MAX_AUTH_LINE {
                    self.overflowing = true;
                    self.buffer.clear();
                }
                None
            }
        }
    }

    /// What the client sent after the last framed line.
    fn into_rest(self) -> Vec<u8> {
        self.buffer
    }
}

/// Where the session is in the dialogue.
#[derive(Default)]
enum State {
    /// Waiting for a command.
    #[default]
    Command,
    /// `AUTH PLAIN` without an initial response: the next line is the PLAIN message.
    PlainResponse,
    /// `AUTH LOGIN`: the next line is the user name.
    LoginUser,
    /// `AUTH LOGIN`: the next line is the password.
    LoginPassword { user: Secret<Vec<u8>> },
}

/// What the I/O loop does after a line.
enum Step {
    Reply(Vec<u8>),
    /// Send the EHLO reply, which needs the upstream's extensions.
    Ehlo,
    /// Reply, then drop the next `bytes` bytes of input.
    DiscardChunk {
        bytes: usize,
        reply: Vec<u8>,
    },
    Login(Credentials),
    /// Send these bytes, then end the session.
    Close(Vec<u8>),
}

/// The name the client gave in EHLO or HELO.
struct Helo {
    name: String,
    extended: bool,
}

/// The session's protocol logic: no I/O, so every transition is testable on its own.
#[derive(Default)]
struct Session {
    state: State,
    helo: Option<Helo>,
    errors: u32,
    auth_failures: u32,
}

impl Session {
    fn helo_name(&self) -> Option<String> {
        self.helo.as_ref().map(|helo| helo.name.clone())
    }

    /// The one place where the state changes.
    fn on_line(&mut self, line: &[u8], hostname: &str) -> Step {
        match std::mem::take(&mut self.state) {
            State::Command => self.on_command(line, hostname),
            State::PlainResponse => match sasl_response(line) {
                Ok(message) => self.login(sasl::decode_plain(&message), hostname),
                Err(failure) => self.fail(failure, hostname),
            },
            State::LoginUser => match sasl_response(line) {
                Ok(user) => {
                    self.state = State::LoginPassword { user };
                    Step::Reply(reply::challenge(LOGIN_PASSWORD_PROMPT))
                }
                Err(failure) => self.fail(failure, hostname),
            },
            State::LoginPassword { user } => match sasl_response(line) {
                Ok(password) => {
                    let credentials = sasl::credentials(user.expose(), password.expose());
                    self.login(credentials, hostname)
                }
                Err(failure) => self.fail(failure, hostname),
            },
        }
    }

    /// An oversized line also ends any SASL exchange in progress.
    fn on_too_long(&mut self, hostname: &str) -> Step {
        self.state = State::Command;
        self.fail(Failure::LineTooLong, hostname)
    }

    fn on_login_failed(&mut self, error: LoginError, hostname: &str) -> Step {
        self.auth_failures += 1;
        if self.auth_failures >= MAX_AUTH_FAILURES {
            let mut bytes = reply::failure(Failure::Login(error), hostname).to_bytes();
            bytes.extend(reply::failure(Failure::TooManyAuthFailures, hostname).to_bytes());
            return Step::Close(bytes);
        }
        Step::Reply(reply::failure(Failure::Login(error), hostname).to_bytes())
    }

    fn on_command(&mut self, line: &[u8], hostname: &str) -> Step {
        let request = Request::parse(&mut line.iter());
        // RFC 4954 4 allows AUTH lines up to MAX_AUTH_LINE; every other command gets 512.
        if line.len() > MAX_COMMAND_LINE && !matches!(request, Ok(Request::Auth { .. })) {
            return self.fail(Failure::LineTooLong, hostname);
        }
        let request = match request {
            Ok(request) => request,
            Err(smtp_proto::Error::UnknownCommand | smtp_proto::Error::NeedsMoreData { .. }) => {
                return self.fail(Failure::UnknownCommand, hostname);
            }
            Err(_) => return self.fail(Failure::Syntax, hostname),
        };
        match request {
            Request::Ehlo { host } => {
                self.helo = Some(Helo {
                    name: host.into_owned(),
                    extended: true,
                });
                Step::Ehlo
            }
            Request::Helo { host } => {
                self.helo = Some(Helo {
                    name: host.into_owned(),
                    extended: false,
                });
                Step::Reply(reply::helo(hostname))
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.on_auth(mechanism, initial_response.as_bytes(), hostname),
            Request::Noop { .. } | Request::Rset => Step::Reply(reply::ok().to_bytes()),
            Request::Help { .. } => Step::Reply(reply::help().to_bytes()),
            Request::Quit => Step::Close(reply::bye().to_bytes()),
            Request::Bdat { chunk_size, .. } => match self.fail(Failure::AuthRequired, hostname) {
                // RFC 3030 2: a refused chunk is still read and thrown away.
                Step::Reply(reply) => Step::DiscardChunk {
                    bytes: chunk_size,
                    reply,
                },
                other => other,
            },
            Request::Mail { .. } | Request::Rcpt { .. } | Request::Data | Request::Burl { .. } => {
                self.fail(Failure::AuthRequired, hostname)
            }
            // Not advertised: mailgate offers no TLS itself and no address verification.
            Request::StartTls
            | Request::Vrfy { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. } => self.fail(Failure::NotImplemented, hostname),
            Request::Lhlo { .. } => self.fail(Failure::UnknownCommand, hostname),
        }
    }

    fn on_auth(&mut self, mechanism: u64, initial_response: &[u8], hostname: &str) -> Step {
        // RFC 4954 4: AUTH is an ESMTP command, so it needs a prior EHLO.
        if !self.helo.as_ref().is_some_and(|helo| helo.extended) {
            return self.fail(Failure::BadSequence, hostname);
        }
        match (mechanism, initial_response.is_empty()) {
            (AUTH_PLAIN, true) => {
                self.state = State::PlainResponse;
                Step::Reply(reply::challenge(""))
            }
            (AUTH_PLAIN, false) => match sasl_response(initial_response) {
                Ok(message) => self.login(sasl::decode_plain(&message), hostname),
                Err(failure) => self.fail(failure, hostname),
            },
            (AUTH_LOGIN, true) => {
                self.state = State::LoginUser;
                Step::Reply(reply::challenge(LOGIN_USERNAME_PROMPT))
            }
            // An initial response to LOGIN carries the user name.
            (AUTH_LOGIN, false) => match sasl_response(initial_response) {
                Ok(user) => {
                    self.state = State::LoginPassword { user };
                    Step::Reply(reply::challenge(LOGIN_PASSWORD_PROMPT))
                }
                Err(failure) => self.fail(failure, hostname),
            },
            _ => self.fail(Failure::UnsupportedMechanism, hostname),
        }
    }

    fn login(&mut self, credentials: Result<Credentials, sasl::SaslError>, hostname: &str) -> Step {
        match credentials {
            Ok(credentials) => Step::Login(credentials),
            Err(error) => self.fail(Failure::Sasl(error), hostname),
        }
    }

    /// Counts an error; past [`MAX_ERRORS`] the reply is `421` and the session ends
    /// (RFC 5321 3.8 lets a server send 421 in place of any reply).
    fn fail(&mut self, failure: Failure, hostname: &str) -> Step {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            return Step::Close(reply::failure(Failure::TooManyErrors, hostname).to_bytes());
        }
        Step::Reply(reply::failure(failure, hostname).to_bytes())
    }
}

/// Decodes one SASL response line; `*` cancels the exchange (RFC 4954 4).
fn sasl_response(line: &[u8]) -> Result<Secret<Vec<u8>>, Failure> {
    let trimmed = line.trim_ascii();
    if trimmed == b"*" {
        return Err(Failure::AuthCancelled);
    }
    sasl::decode_base64(trimmed).map_err(Failure::Sasl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_text(step: Step) -> String {
        match step {
            Step::Reply(bytes) | Step::Close(bytes) => String::from_utf8(bytes).unwrap(),
            Step::DiscardChunk { reply, .. } => String::from_utf8(reply).unwrap(),
            Step::Ehlo => "EHLO".to_owned(),
            Step::Login(credentials) => format!("LOGIN {}", credentials.account),
        }
    }

    fn greeted() -> Session {
        let mut session = Session::default();
        assert_eq!(
            reply_text(session.on_line(b"EHLO client\r\n", "mx")),
            "EHLO"
        );
        session
    }

    #[test]
    fn frames_lines_and_keeps_the_rest() {
        let mut lines = LineBuffer::default();
        lines.push(b"NOOP\r\nMAIL FROM:<a>\r\nRCPT");
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"MAIL FROM:<a>\r\n".to_vec()))
        );
        assert_eq!(lines.next_line(), None);
        assert_eq!(lines.into_rest(), b"RCPT");
    }

    #[test]
    fn oversized_line_is_dropped_to_its_end() {
        let mut lines = LineBuffer::default();
        lines.push(&vec![b'x'; MAX_AUTH_LINE + 1]);
        assert_eq!(lines.next_line(), None);
        assert!(lines.buffer.is_empty());
        lines.push(b"xxxx\r\nNOOP\r\n");
        assert_eq!(lines.next_line(), Some(Line::TooLong));
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
    }

    #[test]
    fn discards_a_refused_chunk() {
        let mut lines = LineBuffer::default();
        lines.discard(5);
        lines.push(b"ab");
        assert_eq!(lines.next_line(), None);
        lines.push(b"cdeNOOP\r\n");
        assert_eq!(
            lines.next_line(),
            Some(Line::Complete(b"NOOP\r\n".to_vec()))
        );
    }

    #[test]
    fn command_lines_over_512_are_refused_but_auth_lines_are_not() {
        let mut session = greeted();
        let long_noop = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE));
        assert!(reply_text(session.on_line(long_noop.as_bytes(), "mx")).starts_with("500 5.5.2"));
        let long_auth = format!("AUTH PLAIN {}\r\n", "QUFB".repeat(200));
        assert!(reply_text(session.on_line(long_auth.as_bytes(), "mx")).starts_with("501 5.5.4"));
    }

    #[test]
    fn auth_login_with_initial_user() {
        let mut session = greeted();
        let step = session.on_line(b"AUTH LOGIN YWxpY2U=\r\n", "mx");
        assert_eq!(reply_text(step), "334 UGFzc3dvcmQ6\r\n");
        let step = session.on_line(b"cHc=\r\n", "mx");
        assert_eq!(reply_text(step), "LOGIN alice");
    }

    #[test]
    fn auth_needs_ehlo_not_helo() {
        let mut session = Session::default();
        session.on_line(b"HELO client\r\n", "mx");
        let step = session.on_line(b"AUTH PLAIN\r\n", "mx");
        assert!(reply_text(step).starts_with("503 5.5.1"));
    }

    #[test]
    fn too_many_errors_close() {
        let mut session = Session::default();
        for _ in 1..MAX_ERRORS {
            assert!(reply_text(session.on_line(b"BOGUS\r\n", "mx")).starts_with("500 5.5.2"));
        }
        match session.on_line(b"BOGUS\r\n", "mx") {
            Step::Close(bytes) => assert!(bytes.starts_with(b"421 4.7.0")),
            _ => panic!("expected close"),
        }
    }

    #[test]
    fn extensions_are_filtered_and_completed() {
        let upstream: Vec<String> = ["SIZE 1000", "auth XOAUTH2", "STARTTLS", "XCLIENT NAME"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            advertised_extensions(&upstream),
            ["SIZE 1000", "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN"]
        );
        assert_eq!(
            advertised_extensions(&[]),
            [
                "PIPELINING",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "AUTH PLAIN LOGIN"
            ]
        );
    }
}
