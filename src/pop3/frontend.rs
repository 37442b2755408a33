//! The POP3 session with a client before authentication, as a [`Dialogue`]: the
//! AUTHORIZATION state of RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595), USER/PASS and
//! AUTH PLAIN/LOGIN (RFC 5034).

use crate::frontend::lines::{Line, LineBuffer};
use crate::frontend::settings::{FrontendSettings, TlsOffer};
use crate::frontend::{Dialogue, Step};
use crate::limits::{Strikes, Verdict};
use crate::login::{Closing, LoginError};
use crate::pop3::reply::{self, Failure};
use crate::sasl::{self, SaslServer, SaslStep, ServerMechanism};
use crate::secret::Secret;

/// Where the session is in the AUTHORIZATION state.
#[derive(Default)]
enum State {
    /// Waiting for a command.
    #[default]
    Command,
    /// USER was accepted: RFC 1939 7 has PASS come right after it.
    User(Vec<u8>),
    /// AUTH sent a `+ ` challenge: the next line is the client's response.
    Authenticating(SaslServer),
}

/// One client's session before login. Every line the listener's `max_line_length` allows is
/// taken, commands and SASL responses alike: RFC 2449 4 keeps commands to 255 octets, but
/// holding a client to it gains nothing (the buffer is bounded either way) and would refuse
/// the long passwords and initial responses real clients send.
pub struct Pop3Dialogue {
    lines: LineBuffer,
    state: State,
    strikes: Strikes,
    /// STLS on offer until the client takes it.
    tls: TlsOffer,
    tls_active: bool,
    hostname: String,
}

impl Pop3Dialogue {
    pub fn new(settings: &FrontendSettings) -> Self {
        Self {
            lines: LineBuffer::new(settings.max_line_length),
            state: State::Command,
            strikes: Strikes::default(),
            tls: settings.tls_offer(),
            tls_active: false,
            hostname: settings.hostname.clone(),
        }
    }

    /// The one place where the state changes.
    fn on_line(&mut self, line: &[u8]) -> Step {
        let line = without_line_end(line);
        match std::mem::take(&mut self.state) {
            State::Authenticating(server) => match sasl_response(line) {
                Ok(response) => self.sasl(server.step(response)),
                Err(failure) => self.fail(failure),
            },
            State::User(user) => self.on_command(line, Some(user)),
            State::Command => self.on_command(line, None),
        }
    }

    /// `user`: the name of a USER just before, which only PASS may use.
    fn on_command(&mut self, line: &[u8], user: Option<Vec<u8>>) -> Step {
        if line.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
            return self.fail(Failure::ControlCharacters);
        }
        // RFC 1939 3: a keyword, then arguments separated by single spaces.
        let (keyword, argument) = match line.iter().position(|&b| b == b' ') {
            Some(space) => (&line[..space], Some(&line[space + 1..])),
            None => (line, None),
        };
        let keyword = keyword.to_ascii_uppercase();
        let login_allowed = self.tls != TlsOffer::Required;
        match (keyword.as_slice(), argument) {
            (b"CAPA", None) => Step::Reply(reply::capabilities(self.tls)),
            (b"QUIT", None) => Step::Close(reply::signing_off(&self.hostname)),
            (b"STLS", None) if self.tls != TlsOffer::None => Step::StartTls(reply::begin_tls()),
            (b"STLS", None) if self.tls_active => self.fail(Failure::TlsActive),
            (b"STLS", None) => self.fail(Failure::StlsNotOffered),
            (b"USER" | b"PASS" | b"AUTH", _) if !login_allowed => self.fail(Failure::StlsRequired),
            (b"USER", Some(name)) if !name.is_empty() => {
                self.state = State::User(name.to_vec());
                Step::Reply(reply::user_accepted())
            }
            // RFC 1939 7: the password is the rest of the line, spaces and all.
            (b"PASS", Some(password)) => match user {
                Some(user) => match sasl::credentials(&user, password) {
                    Ok(credentials) => Step::LogIn {
                        credentials,
                        helo: None,
                    },
                    Err(error) => self.refuse_login(Failure::Sasl(error)),
                },
                None => self.fail(Failure::PassWithoutUser),
            },
            (b"AUTH", None) => Step::Reply(reply::mechanisms()),
            (b"AUTH", Some(arguments)) => self.on_auth(arguments),
            // No timestamp in the greeting, so no APOP (see `reply::greeting`).
            (b"APOP", _) => self.fail(Failure::ApopRefused),
            // RFC 1939 5 and 7: valid, but only in the TRANSACTION state.
            (b"STAT" | b"LIST" | b"RETR" | b"DELE" | b"NOOP" | b"RSET" | b"TOP" | b"UIDL", _) => {
                self.fail(Failure::NotAuthorized)
            }
            (b"CAPA" | b"QUIT" | b"STLS" | b"USER" | b"PASS", _) => self.fail(Failure::Syntax),
            _ => self.fail(Failure::UnknownCommand),
        }
    }

    /// RFC 5034 4: `AUTH mechanism [initial-response]`, `=` being an empty initial response.
    fn on_auth(&mut self, arguments: &[u8]) -> Step {
        let mut words = arguments.split(|&b| b == b' ');
        let (Some(mechanism), initial_response, None) = (words.next(), words.next(), words.next())
        else {
            return self.fail(Failure::Syntax);
        };
        let mechanism = match mechanism.to_ascii_uppercase().as_slice() {
            b"PLAIN" => ServerMechanism::Plain,
            b"LOGIN" => ServerMechanism::Login,
            _ => return self.fail(Failure::UnsupportedMechanism),
        };
        let initial_response = match initial_response.map(sasl_response).transpose() {
            Ok(response) => response,
            Err(failure) => return self.fail(failure),
        };
        self.sasl(SaslServer::start(mechanism, initial_response))
    }

    /// Goes on with an AUTH exchange: a challenge, a login, or a refusal.
    fn sasl(&mut self, step: SaslStep) -> Step {
        match step {
            SaslStep::Challenge { server, challenge } => {
                self.state = State::Authenticating(server);
                Step::Reply(reply::challenge(&sasl::encode_challenge(challenge)))
            }
            SaslStep::Done(Ok(credentials)) => Step::LogIn {
                credentials,
                helo: None,
            },
            // A message that does not decode is a protocol error; a refused identity a
            // failed login.
            SaslStep::Done(Err(
                error @ (sasl::SaslError::Base64
                | sasl::SaslError::MalformedPlain
                | sasl::SaslError::NotUtf8),
            )) => self.fail(Failure::Sasl(error)),
            SaslStep::Done(Err(error)) => self.refuse_login(Failure::Sasl(error)),
        }
    }

    /// Counts a failed login; the last one allowed is answered, then the session ends.
    fn refuse_login(&mut self, failure: Failure) -> Step {
        let refusal = reply::failure(failure);
        match self.strikes.login_failed() {
            Verdict::Continue => Step::Reply(refusal),
            _ => Step::Close(refusal),
        }
    }

    /// Counts an error; past the limit the session ends with a last `-ERR` saying why.
    fn fail(&mut self, failure: Failure) -> Step {
        match self.strikes.error() {
            Verdict::Continue => Step::Reply(reply::failure(failure)),
            _ => Step::Close(reply::failure(Failure::TooManyErrors)),
        }
    }
}

impl Dialogue for Pop3Dialogue {
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

    fn next_step(&mut self, _upstream: &dyn Fn() -> Vec<String>) -> Option<Step> {
        Some(match self.lines.next_line()? {
            Line::Complete(line) => self.on_line(&line),
            // An oversized line also ends an exchange in progress, and a USER before it.
            Line::TooLong => {
                self.state = State::Command;
                self.fail(Failure::LineTooLong)
            }
        })
    }

    /// RFC 2595 4: the session starts over in the AUTHORIZATION state; whatever came in the
    /// clear after STLS is dropped.
    fn tls_started(&mut self) {
        self.lines = LineBuffer::new(self.lines.max_line());
        self.state = State::Command;
        self.tls = TlsOffer::None;
        self.tls_active = true;
    }

    fn logged_in(&mut self, completion: &str) -> Vec<u8> {
        format!("{completion}\r\n").into_bytes()
    }

    fn login_failed(&mut self, error: LoginError) -> Step {
        self.refuse_login(Failure::Login(error))
    }

    fn goodbye(&self, why: Closing) -> Vec<u8> {
        reply::goodbye(why, &self.hostname)
    }

    fn into_rest(self: Box<Self>) -> Vec<u8> {
        self.lines.into_rest()
    }
}

/// The line without its CRLF (or bare LF, which RFC 1939 does not allow but clients send).
fn without_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Decodes one SASL response; `*` cancels the exchange (RFC 5034 4).
fn sasl_response(line: &[u8]) -> Result<Secret<Vec<u8>>, Failure> {
    if line == b"*" {
        return Err(Failure::AuthCancelled);
    }
    sasl::decode_base64(line).map_err(Failure::Sasl)
}
