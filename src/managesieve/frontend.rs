//! The ManageSieve client side before authentication (RFC 5804): the capability greeting,
//! CAPABILITY, STARTTLS, AUTHENTICATE PLAIN/LOGIN with strings or literals, NOOP and LOGOUT.
//! A [`Dialogue`]: no I/O, [`crate::frontend::serve`] runs it.

use super::reply;
use super::syntax::{self, Token};
use crate::frontend::framer::{ClientLimits, Framed, Framer};
use crate::frontend::settings::{FrontendSettings, TlsOffer};
use crate::frontend::{Dialogue, Step};
use crate::limits::{Strikes, Verdict};
use crate::login::{Closing, Credentials, LoginError};
use crate::sanitize;
use crate::sasl::{self, SaslError, SaslServer, SaslStep, ServerMechanism};

/// RFC 5804 2.1: a client cancels an exchange with a string holding only `*`.
const CANCEL: &[u8] = b"*";

/// One client session before login.
pub struct ManageSieveDialogue {
    framer: Framer,
    state: State,
    strikes: Strikes,
    /// STARTTLS on offer until the client takes it.
    tls: TlsOffer,
    /// RFC 5804 2.2: after TLS the server sends its capabilities again, unasked.
    announce: bool,
    hostname: String,
    limits: ClientLimits,
}

/// What the session waits for next.
#[derive(Default)]
enum State {
    #[default]
    Command,
    /// AUTHENTICATE sent a challenge: the next message is the client's response.
    Authenticating(SaslServer),
}

impl ManageSieveDialogue {
    pub fn new(settings: &FrontendSettings) -> Self {
        Self {
            framer: Framer::for_client(settings.client_limits()),
            state: State::Command,
            strikes: Strikes::default(),
            tls: settings.tls_offer(),
            announce: false,
            hostname: settings.hostname.clone(),
            limits: settings.client_limits(),
        }
    }

    /// Frames the next complete message; `Some(None)` when it was too long or malformed.
    fn next_message(&mut self) -> Option<Option<Vec<Token>>> {
        loop {
            match self.framer.next_framed(self.limits)? {
                // RFC 5804 4: no continuation is sent for either `{n+}` or `{n}`; the client
                // sends the literal at once, so one too large is read to the end of its
                // message (the `Fragmentizer` keeps at most its limit) and refused then.
                Framed::Literal { fits: false, .. } => self.framer.poison_message(),
                Framed::Literal { fits: true, .. } => {}
                Framed::Message { refused: true } => return Some(None),
                Framed::Message { refused: false } => {
                    let message = self.framer.fragmentizer().message_bytes();
                    return Some(syntax::tokenize(message));
                }
            }
        }
    }

    fn on_message(&mut self, tokens: Vec<Token>, upstream: &dyn Fn() -> Vec<String>) -> Step {
        match std::mem::take(&mut self.state) {
            State::Command => self.on_command(tokens, upstream),
            State::Authenticating(server) => match tokens.as_slice() {
                [Token::String(cancel)] if cancel == CANCEL => {
                    Step::Reply(reply::no(None, "Authentication cancelled").into_bytes())
                }
                [Token::String(response)] => match sasl::decode_base64(response) {
                    Ok(response) => self.sasl(server.step(response)),
                    Err(error) => self.credentials(Err(error)),
                },
                _ => self.refuse("Invalid SASL response"),
            },
        }
    }

    fn on_command(&mut self, tokens: Vec<Token>, upstream: &dyn Fn() -> Vec<String>) -> Step {
        let Some((name, arguments)) = command(&tokens) else {
            return self.refuse("Invalid command");
        };
        let logged = sanitize::for_log(&name);
        tracing::debug!(command = %logged, "ManageSieve command before authentication");
        match (name.as_str(), arguments.as_slice()) {
            ("CAPABILITY", []) => Step::Reply(reply::capability(&upstream(), self.tls).into()),
            ("STARTTLS", []) if self.tls != TlsOffer::None => {
                Step::StartTls(reply::begin_tls().into_bytes())
            }
            ("STARTTLS", []) => self.refuse("STARTTLS not available"),
            ("AUTHENTICATE", [_] | [_, _]) if self.tls == TlsOffer::Required => {
                self.strike_error(reply::encrypt_needed())
            }
            ("AUTHENTICATE", [mechanism, initial @ ..]) => {
                let mechanism = if mechanism.eq_ignore_ascii_case(b"PLAIN") {
                    ServerMechanism::Plain
                } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
                    ServerMechanism::Login
                } else {
                    return Step::Reply(reply::no(None, "Unsupported mechanism").into_bytes());
                };
                match initial.first().map(|initial| sasl::decode_base64(initial)) {
                    Some(Err(error)) => self.credentials(Err(error)),
                    Some(Ok(initial)) => self.sasl(SaslServer::start(mechanism, Some(initial))),
                    None => self.sasl(SaslServer::start(mechanism, None)),
                }
            }
            ("NOOP", [] | [_]) => match reply::noop(arguments.first().copied()) {
                Some(text) => Step::Reply(text.into_bytes()),
                None => self.refuse("Invalid NOOP tag"),
            },
            // RFC 5804 2.3: OK, then the server closes the connection.
            ("LOGOUT", []) => Step::Close(reply::ok("Logout completed").into_bytes()),
            ("CAPABILITY" | "STARTTLS" | "AUTHENTICATE" | "NOOP" | "LOGOUT", _) => {
                self.refuse("Invalid arguments")
            }
            (
                "HAVESPACE" | "PUTSCRIPT" | "LISTSCRIPTS" | "SETACTIVE" | "GETSCRIPT"
                | "DELETESCRIPT" | "RENAMESCRIPT" | "CHECKSCRIPT" | "UNAUTHENTICATE",
                _,
            ) => self.refuse("Authenticate first"),
            _ => self.refuse("Unknown command"),
        }
    }

    /// Goes on with an AUTHENTICATE exchange.
    fn sasl(&mut self, step: SaslStep) -> Step {
        match step {
            SaslStep::Challenge { server, challenge } => {
                self.state = State::Authenticating(server);
                Step::Reply(reply::challenge(challenge).into_bytes())
            }
            SaslStep::Done(credentials) => self.credentials(credentials),
        }
    }

    /// Turns decoded credentials into a login, or the reply refusing them.
    fn credentials(&mut self, credentials: Result<Credentials, SaslError>) -> Step {
        match credentials {
            Ok(credentials) => Step::LogIn {
                credentials,
                helo: None,
            },
            Err(error) if reply::is_malformed(error) => {
                self.strike_error(reply::credentials_refused(error))
            }
            Err(error) => self.strike_failure(reply::credentials_refused(error)),
        }
    }

    /// `NO` for a malformed, misplaced or unknown command (RFC 5804 has no `BAD`); counted.
    fn refuse(&mut self, text: &str) -> Step {
        self.strike_error(reply::no(None, text))
    }

    fn strike_error(&mut self, text: String) -> Step {
        let verdict = self.strikes.error();
        closing_if(text, verdict)
    }

    fn strike_failure(&mut self, text: String) -> Step {
        let verdict = self.strikes.login_failed();
        closing_if(text, verdict)
    }
}

impl Dialogue for ManageSieveDialogue {
    fn greeting(&mut self, upstream: &dyn Fn() -> Vec<String>) -> Vec<u8> {
        reply::greeting(&upstream(), self.tls, &self.hostname).into_bytes()
    }

    fn push(&mut self, bytes: &[u8]) {
        self.framer.enqueue(bytes);
    }

    fn buffered(&self) -> usize {
        self.framer.buffered()
    }

    fn max_pending(&self) -> usize {
        self.limits.max_message()
    }

    fn next_step(&mut self, upstream: &dyn Fn() -> Vec<String>) -> Option<Step> {
        if std::mem::take(&mut self.announce) {
            return Some(Step::Reply(
                reply::capability(&upstream(), self.tls).into_bytes(),
            ));
        }
        match self.next_message()? {
            Some(tokens) => Some(self.on_message(tokens, upstream)),
            None => {
                // A broken message ends a SASL exchange as well.
                self.state = State::Command;
                Some(self.refuse("Command too long or malformed"))
            }
        }
    }

    fn tls_started(&mut self) {
        // Whatever came after STARTTLS was sent in the clear: it is never acted on.
        self.framer = Framer::for_client(self.limits);
        self.state = State::Command;
        self.tls = TlsOffer::None;
        self.announce = true;
    }

    fn logged_in(&mut self, completion: &str) -> Vec<u8> {
        format!("{completion}\r\n").into_bytes()
    }

    fn login_failed(&mut self, error: LoginError) -> Step {
        self.strike_failure(reply::login_failed(error))
    }

    fn goodbye(&self, why: Closing) -> Vec<u8> {
        reply::closing(why).into_bytes()
    }

    fn into_rest(self: Box<Self>) -> Vec<u8> {
        self.framer.into_unparsed()
    }
}

/// The upper-cased command name and its arguments, which are all strings before login.
fn command(tokens: &[Token]) -> Option<(String, Vec<&[u8]>)> {
    let (Token::Atom(name), arguments) = tokens.split_first()? else {
        return None;
    };
    let arguments = arguments
        .iter()
        .map(|token| match token {
            Token::String(bytes) => Some(bytes.as_slice()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some((name.to_ascii_uppercase(), arguments))
}

/// `text`, followed by `BYE` and the end of the session when the strikes say so.
fn closing_if(text: String, verdict: Verdict) -> Step {
    let bye = match verdict {
        Verdict::Continue => return Step::Reply(text.into_bytes()),
        Verdict::TooManyErrors => reply::BYE_TOO_MANY_ERRORS,
        Verdict::TooManyFailures => reply::BYE_TOO_MANY_FAILURES,
    };
    Step::Close((text + &reply::bye(None, bye)).into_bytes())
}

#[cfg(test)]
mod tests;
