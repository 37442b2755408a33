//! The SMTP session with a client before authentication (RFC 5321, AUTH per RFC 4954,
//! pipelining per RFC 2920, STARTTLS per RFC 3207): greeting, EHLO, AUTH PLAIN/LOGIN, then a
//! [`Handoff`].

use std::future::Future;
use std::io;

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Request};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Instant, timeout_at};

use crate::frontend_settings::{FrontendSettings, TlsOffer};
use crate::io::{BoxedIo, PrefixedIo, linger, write_all_by};
use crate::limits::{Strikes, Verdict};
use crate::login::{
    Authenticator, Closing, Credentials, GOODBYE_TIMEOUT, Handoff, LoginError, LoginRequest,
};
use crate::sanitize::Escaped;
use crate::sasl::{self, SaslServer, SaslStep, ServerMechanism};
use crate::secret::Secret;
use crate::smtp::reply::{self, Failure};

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 4.5.3.1.2: a domain name is at most 255 octets.
const MAX_DOMAIN: usize = 255;
/// Bytes read from the client at once; the line buffer holds at most this plus one line.
const READ_CHUNK: usize = 4096;

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
const STARTTLS_EXTENSION: &str = "STARTTLS";
const ENHANCED_STATUS_CODES: &str = "ENHANCEDSTATUSCODES";
/// Offered when the upstream's extensions are unknown: only what mailgate honours itself.
const FALLBACK_EXTENSIONS: &[&str] = &["PIPELINING", "8BITMIME", ENHANCED_STATUS_CODES];

/// Runs the client session until it authenticates, quits, or is closed.
///
/// Waits at most `settings.pre_auth_timeout` for each line and for each reply to be read, and
/// ends the session when `settings.pre_auth_lifetime` passes or `stop` completes (mailgate is
/// shutting down, or closes the session to make room), with a `421` saying why. Bytes the client sent after the last line of a
/// successful AUTH exchange are replayed by the handoff's stream.
///
/// Returns `Ok(None)` on QUIT, when the client closes, after a timeout, a stop, after too
/// many errors or failed logins, and after a failed STARTTLS handshake.
///
/// # Errors
/// Reading from or writing to the client fails, or a write does not finish before the deadline.
pub async fn serve<A: Authenticator>(
    client: BoxedIo,
    authenticator: &A,
    settings: &FrontendSettings,
    stop: impl Future<Output = Closing>,
) -> io::Result<Option<Handoff<BoxedIo>>> {
    tokio::pin!(stop);
    let hostname = settings.hostname.as_str();
    let mut conn = Conn {
        client,
        out: reply::greeting(hostname),
        lifetime_end: settings.lifetime_end(),
        settings,
    };
    let mut session = Session::new(settings.tls_offer());
    let mut lines = LineBuffer::new(settings.max_line_length);
    loop {
        let Some(line) = lines.next_line() else {
            // `timeout_at` fires only while a read waits: a client that always has the next
            // commands waiting would never meet its lifetime, so it is checked here too.
            if Instant::now() >= conn.lifetime_end {
                return conn.goodbye(Failure::LifetimeOver).await;
            }
            conn.flush().await?;
            let deadline = conn.deadline();
            let read = tokio::select! {
                read = read_more(&mut conn.client, &mut lines, deadline) => read?,
                why = &mut stop => return conn.goodbye(why.into()).await,
            };
            match read {
                Input::Data => continue,
                Input::Closed => return Ok(None),
                Input::TimedOut => return conn.goodbye(Failure::Timeout).await,
            }
        };
        let mut step = match line {
            Line::Complete(line) => session.on_line(&line, hostname),
            Line::TooLong => session.on_too_long(hostname),
        };
        // A failed login yields a further step, so steps are dispatched until one settles.
        loop {
            match step {
                Step::Reply(bytes) => conn.out.extend(bytes),
                Step::Ehlo => {
                    let upstream = authenticator.upstream_capabilities();
                    let extensions = advertised_extensions(&upstream, session.tls);
                    conn.out.extend(reply::ehlo(hostname, &extensions));
                }
                Step::StartTls => {
                    conn.out.extend(reply::ready_for_tls().to_bytes());
                    conn.flush().await?;
                    // Whatever came after STARTTLS was sent in the clear: it is never acted
                    // on (the CVE-2011-0411 class of injection).
                    lines = LineBuffer::new(settings.max_line_length);
                    let Some(tls) = &settings.starttls else {
                        return Ok(None);
                    };
                    let deadline = conn.deadline();
                    let Some(client) = tls.accept(conn.client, deadline).await else {
                        return Ok(None);
                    };
                    conn = Conn { client, ..conn };
                    session.tls_started();
                }
                Step::DiscardChunk { bytes, reply } => {
                    lines.discard(bytes);
                    conn.out.extend(reply);
                }
                Step::Close(bytes) => {
                    conn.out.extend(bytes);
                    conn.flush().await?;
                    linger(&mut conn.client).await;
                    return Ok(None);
                }
                Step::Login(credentials) => {
                    conn.flush().await?;
                    let account = credentials.account.clone();
                    let request = LoginRequest {
                        credentials,
                        helo: session.helo_name(),
                        client: settings.client,
                        local: settings.local,
                    };
                    let lifetime_end = conn.lifetime_end;
                    let result = tokio::select! {
                        result = authenticator.login(request) => result,
                        why = &mut stop => return conn.goodbye(why.into()).await,
                        () = tokio::time::sleep_until(lifetime_end) => {
                            return conn.goodbye(Failure::LifetimeOver).await;
                        }
                        () = hung_up(&mut conn.client, &mut lines) => return Ok(None),
                    };
                    match result {
                        Ok(upstream) => {
                            conn.out
                                .extend(format!("{}\r\n", upstream.completion).into_bytes());
                            conn.flush().await?;
                            tracing::info!(account = %Escaped(&account), "client authenticated");
                            return Ok(Some(Handoff {
                                client: PrefixedIo::new(lines.into_rest(), conn.client),
                                upstream,
                                account,
                            }));
                        }
                        Err(error) => {
                            tracing::info!(account = %Escaped(&account), %error, "client login failed");
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

/// The client stream, the replies not yet sent, and the session's deadlines.
struct Conn<'a> {
    client: BoxedIo,
    out: Vec<u8>,
    lifetime_end: Instant,
    settings: &'a FrontendSettings,
}

impl Conn<'_> {
    fn deadline(&self) -> Instant {
        self.settings.next_deadline(self.lifetime_end)
    }

    /// Sends the pending replies, giving up at the deadline so a client that never reads
    /// cannot pin the session.
    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let deadline = self.deadline();
            write_all_by(&mut self.client, &self.out, deadline).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends the pending replies and a `421` saying why the session ends, briefly.
    async fn goodbye<T>(&mut self, failure: Failure) -> io::Result<Option<T>> {
        let failure = match failure {
            Failure::Timeout if Instant::now() >= self.lifetime_end => Failure::LifetimeOver,
            failure => failure,
        };
        self.out
            .extend(reply::failure(failure, &self.settings.hostname).to_bytes());
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        write_all_by(&mut self.client, &self.out, deadline).await?;
        linger(&mut self.client).await;
        Ok(None)
    }
}

/// The EHLO keywords shown to clients: the upstream's relayable lines as sent (so parameters
/// such as `SIZE 35882577` survive), `ENHANCEDSTATUSCODES` because mailgate's own replies carry
/// them, `STARTTLS` before TLS, and `AUTH PLAIN LOGIN` last unless a login must wait for TLS.
pub fn advertised_extensions(upstream: &[String], tls: TlsOffer) -> Vec<String> {
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
    if tls != TlsOffer::None {
        extensions.push(STARTTLS_EXTENSION.to_owned());
    }
    if tls != TlsOffer::Required {
        extensions.push(AUTH_EXTENSION.to_owned());
    }
    extensions
}

/// The upper-cased keyword of an EHLO line (RFC 5321 4.1.1.1: keywords are case-insensitive).
fn keyword(line: &str) -> String {
    line.split_ascii_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// Completes when the client hangs up while its login runs, so that the login is dropped
/// instead of finishing for no one. What the client pipelines meanwhile is kept for the
/// upstream, up to one line's limit; past that, reading waits for the login.
async fn hung_up<S: AsyncRead + Unpin>(client: &mut S, lines: &mut LineBuffer) {
    let mut chunk = [0u8; READ_CHUNK];
    while lines.buffered() < lines.max_line {
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => lines.push(&chunk[..n]),
        }
    }
    std::future::pending().await
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
    /// A line longer than the limit, already discarded up to its LF.
    TooLong,
}

/// Frames client input into lines without I/O, holding at most `max_line` bytes of an
/// unfinished line plus one read. The limit bounds every line (RFC 4954 4 lets AUTH lines and
/// SASL responses be longer than other commands), since the framer cannot know the verb
/// before the line ends.
struct LineBuffer {
    max_line: usize,
    buffer: Vec<u8>,
    /// Inside an oversized line: drop everything up to the next LF.
    overflowing: bool,
    /// Bytes of a refused BDAT chunk still to drop (RFC 3030 2).
    skip: usize,
}

impl LineBuffer {
    fn new(max_line: usize) -> Self {
        Self {
            max_line,
            buffer: Vec::new(),
            overflowing: false,
            skip: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    fn buffered(&self) -> usize {
        self.buffer.len()
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
                if std::mem::take(&mut self.overflowing) || line.len() > self.max_line {
                    Some(Line::TooLong)
                } else {
                    Some(Line::Complete(line))
                }
            }
            None => {
                if self.overflowing || self.buffer.len() > self.max_line {
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
    /// AUTH sent a `334` challenge: the next line is the client's response.
    Authenticating(SaslServer),
}

/// What the I/O loop does after a line.
enum Step {
    Reply(Vec<u8>),
    /// Send the EHLO reply, which needs the upstream's extensions.
    Ehlo,
    /// Send `220`, then run the TLS handshake.
    StartTls,
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
    strikes: Strikes,
    /// STARTTLS on offer until the client takes it.
    tls: TlsOffer,
    tls_active: bool,
}

impl Session {
    fn new(tls: TlsOffer) -> Self {
        Self {
            tls,
            ..Self::default()
        }
    }

    /// RFC 3207 4.2: after the handshake the client starts over with EHLO.
    fn tls_started(&mut self) {
        self.state = State::Command;
        self.helo = None;
        self.tls = TlsOffer::None;
        self.tls_active = true;
    }

    fn helo_name(&self) -> Option<String> {
        self.helo.as_ref().map(|helo| helo.name.clone())
    }

    /// The one place where the state changes.
    fn on_line(&mut self, line: &[u8], hostname: &str) -> Step {
        match std::mem::take(&mut self.state) {
            State::Command => self.on_command(line, hostname),
            State::Authenticating(server) => match sasl_response(line) {
                Ok(response) => self.sasl(server.step(response), hostname),
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
        self.refuse_login(Failure::Login(error), hostname)
    }

    fn on_command(&mut self, line: &[u8], hostname: &str) -> Step {
        // RFC 5321 2.3.8: no bare CR or other control characters in a command line.
        if line
            .strip_suffix(b"\n")
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .unwrap_or(line)
            .iter()
            .any(|&b| b.is_ascii_control() && b != b'\t')
        {
            return self.fail(Failure::ControlCharacters, hostname);
        }
        let request = Request::parse(&mut line.iter());
        // RFC 4954 4 allows longer AUTH lines; every other command gets 512.
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
        let tls_first = self.tls == TlsOffer::Required;
        match request {
            Request::Ehlo { host } => self.on_helo(&host, true, hostname),
            Request::StartTls if self.tls != TlsOffer::None => Step::StartTls,
            Request::StartTls if self.tls_active => self.fail(Failure::TlsActive, hostname),
            // RFC 3207 4: with TLS required, only NOOP, EHLO, STARTTLS and QUIT come first.
            Request::Auth { .. }
            | Request::Mail { .. }
            | Request::Rcpt { .. }
            | Request::Data
            | Request::Burl { .. }
                if tls_first =>
            {
                self.fail(Failure::StartTlsRequired, hostname)
            }
            Request::Helo { host } => self.on_helo(&host, false, hostname),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.on_auth(mechanism, initial_response.as_bytes(), hostname),
            Request::Noop { .. } | Request::Rset => Step::Reply(reply::ok().to_bytes()),
            Request::Help { .. } => Step::Reply(reply::help().to_bytes()),
            Request::Quit => Step::Close(reply::bye().to_bytes()),
            Request::Bdat { chunk_size, .. } => {
                let failure = if tls_first {
                    Failure::StartTlsRequired
                } else {
                    Failure::AuthRequired
                };
                match self.fail(failure, hostname) {
                    // RFC 3030 2: a refused chunk is still read and thrown away.
                    Step::Reply(reply) => Step::DiscardChunk {
                        bytes: chunk_size,
                        reply,
                    },
                    other => other,
                }
            }
            Request::Mail { .. } | Request::Rcpt { .. } | Request::Data | Request::Burl { .. } => {
                self.fail(Failure::AuthRequired, hostname)
            }
            // Not advertised: no TLS on this listener, and no address verification.
            Request::StartTls
            | Request::Vrfy { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. } => self.fail(Failure::NotImplemented, hostname),
            Request::Lhlo { .. } => self.fail(Failure::UnknownCommand, hostname),
        }
    }

    /// EHLO and HELO: the name is repeated upstream, so it must be one (RFC 5321 4.1.1.1: a
    /// domain or an address literal, never empty or with spaces).
    fn on_helo(&mut self, name: &str, extended: bool, hostname: &str) -> Step {
        if name.is_empty()
            || name.len() > MAX_DOMAIN
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return self.fail(Failure::BadDomain, hostname);
        }
        self.helo = Some(Helo {
            name: name.to_owned(),
            extended,
        });
        if extended {
            Step::Ehlo
        } else {
            Step::Reply(reply::helo(hostname))
        }
    }

    fn on_auth(&mut self, mechanism: u64, initial_response: &[u8], hostname: &str) -> Step {
        // RFC 4954 4: AUTH is an ESMTP command, so it needs a prior EHLO.
        if !self.helo.as_ref().is_some_and(|helo| helo.extended) {
            return self.fail(Failure::BadSequence, hostname);
        }
        let mechanism = match mechanism {
            AUTH_PLAIN => ServerMechanism::Plain,
            AUTH_LOGIN => ServerMechanism::Login,
            _ => return self.fail(Failure::UnsupportedMechanism, hostname),
        };
        let initial_response = if initial_response.is_empty() {
            None
        } else {
            match sasl_response(initial_response) {
                Ok(response) => Some(response),
                Err(failure) => return self.fail(failure, hostname),
            }
        };
        self.sasl(SaslServer::start(mechanism, initial_response), hostname)
    }

    /// Goes on with an AUTH exchange: a challenge, a login, or a refusal.
    fn sasl(&mut self, step: SaslStep, hostname: &str) -> Step {
        match step {
            SaslStep::Challenge { server, challenge } => {
                self.state = State::Authenticating(server);
                Step::Reply(reply::challenge(&sasl::encode_challenge(challenge)))
            }
            SaslStep::Done(Ok(credentials)) => Step::Login(credentials),
            // A message that does not decode is a protocol error; a refused identity is a
            // failed login (RFC 4954 6).
            SaslStep::Done(Err(error)) if reply::is_malformed(error) => {
                self.fail(Failure::Sasl(error), hostname)
            }
            SaslStep::Done(Err(error)) => self.refuse_login(Failure::Sasl(error), hostname),
        }
    }

    /// Counts a failed login; past the limit the reply is followed by `421` and the end.
    fn refuse_login(&mut self, failure: Failure, hostname: &str) -> Step {
        let refusal = reply::failure(failure, hostname).to_bytes();
        match self.strikes.login_failed() {
            Verdict::Continue => Step::Reply(refusal),
            _ => {
                let mut bytes = refusal;
                bytes.extend(reply::failure(Failure::TooManyAuthFailures, hostname).to_bytes());
                Step::Close(bytes)
            }
        }
    }

    /// Counts an error; past the limit the reply is `421` and the session ends
    /// (RFC 5321 3.8 lets a server send 421 in place of any reply).
    fn fail(&mut self, failure: Failure, hostname: &str) -> Step {
        match self.strikes.error() {
            Verdict::Continue => Step::Reply(reply::failure(failure, hostname).to_bytes()),
            _ => Step::Close(reply::failure(Failure::TooManyErrors, hostname).to_bytes()),
        }
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
            Step::StartTls => "STARTTLS".to_owned(),
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
        let mut lines = LineBuffer::new(crate::config::DEFAULT_MAX_LINE_LENGTH);
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
        let mut lines = LineBuffer::new(crate::config::DEFAULT_MAX_LINE_LENGTH);
        lines.push(&vec![b'x'; crate::config::DEFAULT_MAX_LINE_LENGTH + 1]);
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
        let mut lines = LineBuffer::new(crate::config::DEFAULT_MAX_LINE_LENGTH);
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
        for _ in 1..crate::limits::MAX_ERRORS {
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
            advertised_extensions(&upstream, TlsOffer::None),
            ["SIZE 1000", "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN"]
        );
        assert_eq!(
            advertised_extensions(&upstream, TlsOffer::Required),
            ["SIZE 1000", "ENHANCEDSTATUSCODES", "STARTTLS"]
        );
        assert_eq!(
            advertised_extensions(&[], TlsOffer::None),
            [
                "PIPELINING",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "AUTH PLAIN LOGIN"
            ]
        );
    }
}
