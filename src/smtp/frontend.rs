//! The SMTP session with a client before authentication (RFC 5321, AUTH per RFC 4954,
//! pipelining per RFC 2920, STARTTLS per RFC 3207): greeting, EHLO, AUTH PLAIN/LOGIN, then a
//! [`Handoff`].

use std::future::Future;
use std::io;

use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, Request};

use crate::frontend::lines::{Line, LineBuffer};
use crate::frontend::settings::{FrontendSettings, TlsOffer};
use crate::frontend::{self, Dialogue, Step};
use crate::io::BoxedIo;
use crate::limits::{Strikes, Verdict};
use crate::login::{Authenticator, Closing, Credentials, Handoff, LoginError};
use crate::sasl::{self, SaslServer, SaslStep, ServerMechanism};
use crate::secret::Secret;
use crate::smtp::reply::{self, Failure};

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 4.5.3.1.2: a domain name is at most 255 octets.
const MAX_DOMAIN: usize = 255;

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

/// Runs the client session until it authenticates, quits, or is closed; see
/// [`crate::frontend::serve`], which this runs with SMTP's [`SmtpDialogue`]. Every goodbye is
/// a `421`.
///
/// # Errors
/// Reading from or writing to the client fails, or a write does not finish before the deadline.
pub async fn serve<A: Authenticator>(
    client: BoxedIo,
    authenticator: &A,
    settings: &FrontendSettings,
    stop: impl Future<Output = Closing>,
) -> io::Result<Option<Handoff<BoxedIo>>> {
    let dialogue = Box::new(SmtpDialogue::new(settings));
    frontend::serve(client, authenticator, dialogue, settings, stop).await
}

/// An SMTP session before authentication: frames lines, answers commands, and asks for
/// STARTTLS and logins.
pub struct SmtpDialogue {
    lines: LineBuffer,
    session: Session,
    hostname: String,
}

impl SmtpDialogue {
    pub fn new(settings: &FrontendSettings) -> Self {
        Self {
            lines: LineBuffer::new(settings.max_line_length),
            session: Session::new(settings.tls_offer()),
            hostname: settings.hostname.clone(),
        }
    }

    /// The session loop's step for what the session decided.
    fn settle(&mut self, action: Action, upstream: &dyn Fn() -> Vec<String>) -> Step {
        match action {
            Action::Reply(bytes) => Step::Reply(bytes),
            Action::Ehlo => {
                let extensions = advertised_extensions(&upstream(), self.session.tls);
                Step::Reply(reply::ehlo(&self.hostname, &extensions))
            }
            Action::StartTls => Step::StartTls(reply::ready_for_tls().to_bytes()),
            Action::DiscardChunk { bytes, reply } => {
                self.lines.discard(bytes);
                Step::Reply(reply)
            }
            Action::Login(credentials) => Step::LogIn {
                credentials,
                helo: self.session.helo_name(),
            },
            Action::Close(bytes) => Step::Close(bytes),
        }
    }
}

impl Dialogue for SmtpDialogue {
    fn greeting(&mut self, _upstream: &dyn Fn() -> Vec<String>) -> Vec<u8> {
        reply::greeting(&self.hostname)
    }

    fn push(&mut self, bytes: &[u8]) {
        self.lines.push(bytes);
    }

    fn buffered(&self) -> usize {
        self.lines.buffered()
    }

    fn max_pending(&self) -> usize {
        self.lines.max_line()
    }

    fn next_step(&mut self, upstream: &dyn Fn() -> Vec<String>) -> Option<Step> {
        let action = match self.lines.next_line()? {
            Line::Complete(line) => self.session.on_line(&line, &self.hostname),
            Line::TooLong => self.session.on_too_long(&self.hostname),
        };
        Some(self.settle(action, upstream))
    }

    fn tls_started(&mut self) {
        self.lines = LineBuffer::new(self.lines.max_line());
        self.session.tls_started();
    }

    fn logged_in(&mut self, completion: &str) -> Vec<u8> {
        format!("{completion}\r\n").into_bytes()
    }

    fn login_failed(&mut self, error: LoginError) -> Step {
        let action = self.session.on_login_failed(error, &self.hostname);
        self.settle(action, &Vec::new)
    }

    fn goodbye(&self, why: Closing) -> Vec<u8> {
        reply::failure(why.into(), &self.hostname).to_bytes()
    }

    fn into_rest(self: Box<Self>) -> Vec<u8> {
        self.lines.into_rest()
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

/// Where the session is in the dialogue.
#[derive(Default)]
enum State {
    /// Waiting for a command.
    #[default]
    Command,
    /// AUTH sent a `334` challenge: the next line is the client's response.
    Authenticating(SaslServer),
}

/// What the session decided after a line.
enum Action {
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
    fn on_line(&mut self, line: &[u8], hostname: &str) -> Action {
        match std::mem::take(&mut self.state) {
            State::Command => self.on_command(line, hostname),
            State::Authenticating(server) => match sasl_response(line) {
                Ok(response) => self.sasl(server.step(response), hostname),
                Err(failure) => self.fail(failure, hostname),
            },
        }
    }

    /// An oversized line also ends any SASL exchange in progress.
    fn on_too_long(&mut self, hostname: &str) -> Action {
        self.state = State::Command;
        self.fail(Failure::LineTooLong, hostname)
    }

    fn on_login_failed(&mut self, error: LoginError, hostname: &str) -> Action {
        self.refuse_login(Failure::Login(error), hostname)
    }

    fn on_command(&mut self, line: &[u8], hostname: &str) -> Action {
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
            Request::StartTls if self.tls != TlsOffer::None => Action::StartTls,
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
            Request::Noop { .. } | Request::Rset => Action::Reply(reply::ok().to_bytes()),
            Request::Help { .. } => Action::Reply(reply::help().to_bytes()),
            Request::Quit => Action::Close(reply::bye().to_bytes()),
            Request::Bdat { chunk_size, .. } => {
                let failure = if tls_first {
                    Failure::StartTlsRequired
                } else {
                    Failure::AuthRequired
                };
                match self.fail(failure, hostname) {
                    // RFC 3030 2: a refused chunk is still read and thrown away.
                    Action::Reply(reply) => Action::DiscardChunk {
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
    fn on_helo(&mut self, name: &str, extended: bool, hostname: &str) -> Action {
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
            Action::Ehlo
        } else {
            Action::Reply(reply::helo(hostname))
        }
    }

    fn on_auth(&mut self, mechanism: u64, initial_response: &[u8], hostname: &str) -> Action {
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
    fn sasl(&mut self, step: SaslStep, hostname: &str) -> Action {
        match step {
            SaslStep::Challenge { server, challenge } => {
                self.state = State::Authenticating(server);
                Action::Reply(reply::challenge(&sasl::encode_challenge(challenge)))
            }
            SaslStep::Done(Ok(credentials)) => Action::Login(credentials),
            // A message that does not decode is a protocol error; a refused identity is a
            // failed login (RFC 4954 6).
            SaslStep::Done(Err(error)) if reply::is_malformed(error) => {
                self.fail(Failure::Sasl(error), hostname)
            }
            SaslStep::Done(Err(error)) => self.refuse_login(Failure::Sasl(error), hostname),
        }
    }

    /// Counts a failed login; past the limit the reply is followed by `421` and the end.
    fn refuse_login(&mut self, failure: Failure, hostname: &str) -> Action {
        let refusal = reply::failure(failure, hostname).to_bytes();
        match self.strikes.login_failed() {
            Verdict::Continue => Action::Reply(refusal),
            _ => {
                let mut bytes = refusal;
                bytes.extend(reply::failure(Failure::TooManyAuthFailures, hostname).to_bytes());
                Action::Close(bytes)
            }
        }
    }

    /// Counts an error; past the limit the reply is `421` and the session ends
    /// (RFC 5321 3.8 lets a server send 421 in place of any reply).
    fn fail(&mut self, failure: Failure, hostname: &str) -> Action {
        match self.strikes.error() {
            Verdict::Continue => Action::Reply(reply::failure(failure, hostname).to_bytes()),
            _ => Action::Close(reply::failure(Failure::TooManyErrors, hostname).to_bytes()),
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

    fn reply_text(step: Action) -> String {
        match step {
            Action::Reply(bytes) | Action::Close(bytes) => String::from_utf8(bytes).unwrap(),
            Action::DiscardChunk { reply, .. } => String::from_utf8(reply).unwrap(),
            Action::Ehlo => "EHLO".to_owned(),
            Action::StartTls => "STARTTLS".to_owned(),
            Action::Login(credentials) => format!("LOGIN {}", credentials.account),
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
            Action::Close(bytes) => assert!(bytes.starts_with(b"421 4.7.0")),
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
