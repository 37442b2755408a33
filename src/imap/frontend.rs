//! The IMAP client side before authentication: greeting, the commands of the not-authenticated
//! state (RFC 9051 6.1, 6.2), STARTTLS, LOGIN and AUTHENTICATE PLAIN/LOGIN, then a handoff to
//! the splice.

use std::future::Future;
use std::io;

use imap_codec::fragmentizer::{Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{AuthenticateDataCodec, CommandCodec};

use super::reply;
use crate::frontend::framer::{ClientLimits, Framed, Framer};
use crate::frontend::settings::{FrontendSettings, TlsOffer};
use crate::frontend::{self, Dialogue, Step};
use crate::io::BoxedIo;
use crate::limits::{Strikes, Verdict};
use crate::login::{Authenticator, Closing, Credentials, Handoff, LoginError};
use crate::sasl::{self, SaslError, SaslServer, SaslStep, ServerMechanism};
use crate::secret::Secret;

/// Runs the session until the client has logged in, logged out, closed, or was closed; see
/// [`crate::frontend::serve`], which this runs with IMAP's [`ImapDialogue`]. Every goodbye is
/// a `* BYE`.
///
/// # Errors
/// Reading from or writing to the client failed, or a reply was not read in time.
pub async fn serve<A: Authenticator>(
    client: BoxedIo,
    authenticator: &A,
    settings: &FrontendSettings,
    stop: impl Future<Output = Closing>,
) -> io::Result<Option<Handoff<BoxedIo>>> {
    let dialogue = Box::new(ImapDialogue::new(settings));
    frontend::serve(client, authenticator, dialogue, settings, stop).await
}

/// An IMAP session before authentication: frames commands (lines plus literals), answers
/// them, and asks for STARTTLS and logins.
pub struct ImapDialogue {
    framer: Framer,
    session: Session,
    hostname: String,
    limits: ClientLimits,
    /// The tag of the login under way, for its completion.
    login_tag: String,
}

impl ImapDialogue {
    pub fn new(settings: &FrontendSettings) -> Self {
        Self {
            framer: Framer::for_client(settings.client_limits()),
            session: Session::new(settings.tls_offer()),
            hostname: settings.hostname.clone(),
            limits: settings.client_limits(),
            login_tag: String::new(),
        }
    }

    /// The next action for the fragments buffered, or `None` when a message is incomplete.
    fn next_action(&mut self) -> Option<Action> {
        loop {
            match self.framer.next_framed(self.limits)? {
                Framed::Literal { announcement, fits } => {
                    if let Some(reply) = self.accept_literal(announcement, fits) {
                        return Some(Action::Reply(reply));
                    }
                }
                Framed::Message { refused: true } => {
                    let tag = self.framer.fragmentizer().decode_tag();
                    let tag = tag.as_ref().map(AsRef::as_ref);
                    return Some(self.session.refuse(tag, "Command too long").into());
                }
                Framed::Message { refused: false } => {
                    return Some(self.session.on_message(self.framer.fragmentizer()));
                }
            }
        }
    }

    /// Decides on a literal announced at the end of a line: `Some(reply)` to send, `None` to
    /// read on. A synchronizing literal that would not fit (or follows a line too long) is
    /// refused before the client sends it (RFC 9051 7.5), so its bytes never arrive and the
    /// message can be skipped. A non-synchronizing one arrives anyway (RFC 7888 4): the message
    /// is marked, read to its end (the `Fragmentizer` keeps at most its size limit) and refused
    /// then.
    fn accept_literal(&mut self, announcement: LiteralAnnouncement, fits: bool) -> Option<Reply> {
        match (announcement.mode, fits) {
            (LiteralMode::NonSync, true) => return None,
            (LiteralMode::NonSync, false) => {
                self.framer.poison_message();
                return None;
            }
            (LiteralMode::Sync, true) => {
                return Some(Reply::more(reply::CONTINUE_LITERAL.to_owned()));
            }
            (LiteralMode::Sync, false) => {}
        }
        let tag = self.framer.fragmentizer().decode_tag();
        let tag = tag.as_ref().map(|tag| tag.as_ref().to_owned());
        self.framer.skip_message();
        Some(self.session.refuse(tag.as_deref(), "Literal too large"))
    }
}

impl Dialogue for ImapDialogue {
    fn greeting(&mut self, _upstream: &dyn Fn() -> Vec<String>) -> Vec<u8> {
        reply::greeting(&self.hostname, self.session.tls).into_bytes()
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

    fn next_step(&mut self, _upstream: &dyn Fn() -> Vec<String>) -> Option<Step> {
        Some(match self.next_action()? {
            Action::Reply(Reply { text, close: false }) => Step::Reply(text.into_bytes()),
            Action::Reply(Reply { text, close: true }) => Step::Close(text.into_bytes()),
            Action::StartTls { tag } => Step::StartTls(reply::begin_tls(&tag).into_bytes()),
            Action::Login { tag, credentials } => {
                self.login_tag = tag;
                Step::LogIn {
                    credentials,
                    helo: None,
                }
            }
        })
    }

    fn tls_started(&mut self) {
        self.framer = Framer::for_client(self.limits);
        self.session.tls = TlsOffer::None;
    }

    fn logged_in(&mut self, completion: &str) -> Vec<u8> {
        format!("{} {completion}\r\n", self.login_tag).into_bytes()
    }

    fn login_failed(&mut self, error: LoginError) -> Step {
        match self.session.on_login_failed(&self.login_tag, error) {
            Reply { text, close: false } => Step::Reply(text.into_bytes()),
            Reply { text, close: true } => Step::Close(text.into_bytes()),
        }
    }

    fn goodbye(&self, why: Closing) -> Vec<u8> {
        reply::closing(why).into_bytes()
    }

    fn into_rest(self: Box<Self>) -> Vec<u8> {
        self.framer.into_unparsed()
    }
}

/// What the session waits for next.
#[derive(Default)]
enum State {
    /// A command.
    #[default]
    Command,
    /// AUTHENTICATE sent a challenge: the next line is the client's response.
    Authenticating { tag: String, server: SaslServer },
}

/// What the I/O loop does next.
enum Action {
    Reply(Reply),
    /// Answer under `tag` and run the TLS handshake.
    StartTls {
        tag: String,
    },
    /// Log in with these credentials and answer under `tag`.
    Login {
        tag: String,
        credentials: Credentials,
    },
}

/// Text to send, and whether the session ends after it.
struct Reply {
    text: String,
    close: bool,
}

impl From<Reply> for Action {
    fn from(reply: Reply) -> Self {
        Action::Reply(reply)
    }
}

impl Reply {
    fn more(text: String) -> Self {
        Self { text, close: false }
    }
}

/// The session's state and counters; does no I/O.
#[derive(Default)]
struct Session {
    state: State,
    strikes: Strikes,
    /// STARTTLS on offer until the client takes it.
    tls: TlsOffer,
}

impl Session {
    fn new(tls: TlsOffer) -> Self {
        Self {
            tls,
            ..Self::default()
        }
    }

    /// Handles the complete message in `fragmentizer`, decoded as the state expects.
    fn on_message(&mut self, fragmentizer: &Fragmentizer) -> Action {
        match std::mem::take(&mut self.state) {
            State::Command => match fragmentizer.decode_message(&CommandCodec::new()) {
                Ok(command) => self.on_command(command),
                Err(_) => {
                    let tag = fragmentizer.decode_tag();
                    let tag = tag.as_ref().map(AsRef::as_ref);
                    self.refuse(tag, "Invalid command").into()
                }
            },
            State::Authenticating { tag, server } => {
                match fragmentizer.decode_message(&AuthenticateDataCodec::new()) {
                    Ok(AuthenticateData::Continue(response)) => {
                        let response = Secret::new(response.declassify().to_vec());
                        self.sasl(tag, server.step(response))
                    }
                    // RFC 9051 6.2.2: a cancelled exchange is answered with BAD.
                    Ok(AuthenticateData::Cancel) => {
                        Reply::more(reply::bad(Some(&tag), "AUTHENTICATE cancelled")).into()
                    }
                    Err(_) => self.refuse(Some(&tag), "Invalid SASL response").into(),
                }
            }
        }
    }

    fn on_command(&mut self, command: Command<'_>) -> Action {
        tracing::debug!(
            command = command.name(),
            "IMAP command before authentication"
        );
        let tag = command.tag.as_ref().to_owned();
        match command.body {
            CommandBody::Capability => Reply::more(reply::capability(&tag, self.tls)).into(),
            CommandBody::StartTLS if self.tls != TlsOffer::None => Action::StartTls { tag },
            CommandBody::StartTLS => self.refuse(Some(&tag), "STARTTLS not available").into(),
            CommandBody::Login { .. } | CommandBody::Authenticate { .. }
                if self.tls == TlsOffer::Required =>
            {
                self.strike_error(reply::privacy_required(&tag)).into()
            }
            CommandBody::Noop => Reply::more(reply::ok(&tag, "NOOP completed")).into(),
            CommandBody::Id { .. } => Reply::more(reply::id(&tag)).into(),
            CommandBody::Logout => {
                let text = reply::bye(reply::BYE_LOGOUT) + &reply::ok(&tag, "LOGOUT completed");
                Action::Reply(Reply { text, close: true })
            }
            CommandBody::Login { username, password } => {
                let password = password.declassify();
                let credentials = sasl::credentials(username.as_ref(), password.as_ref());
                self.credentials(tag, credentials)
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                let mechanism = match mechanism {
                    AuthMechanism::Plain => ServerMechanism::Plain,
                    AuthMechanism::Login => ServerMechanism::Login,
                    // RFC 9051 6.2.2: an unsupported mechanism SHOULD get NO.
                    _ => {
                        return Reply::more(reply::no(&tag, "[CANNOT] Unsupported mechanism"))
                            .into();
                    }
                };
                let initial_response =
                    initial_response.map(|response| Secret::new(response.declassify().to_vec()));
                self.sasl(tag, SaslServer::start(mechanism, initial_response))
            }
            // RFC 5161 3.1: ENABLE is valid only once authenticated.
            CommandBody::Enable { .. } => {
                self.refuse(Some(&tag), "ENABLE needs a login first").into()
            }
            // RFC 9051 3 leaves BAD or NO to the server for a command in the wrong state. BAD:
            // the client broke the state rules, the request itself could not have succeeded
            // (NO could read as "no such mailbox"), and it counts as an error.
            _ => self
                .refuse(Some(&tag), "Command not valid before login")
                .into(),
        }
    }

    /// Goes on with an AUTHENTICATE exchange.
    fn sasl(&mut self, tag: String, step: SaslStep) -> Action {
        match step {
            SaslStep::Challenge { server, challenge } => {
                self.state = State::Authenticating { tag, server };
                Reply::more(reply::challenge(challenge)).into()
            }
            SaslStep::Done(credentials) => self.credentials(tag, credentials),
        }
    }

    /// Turns decoded credentials into a login, or the reply refusing them.
    fn credentials(&mut self, tag: String, credentials: Result<Credentials, SaslError>) -> Action {
        match credentials {
            Ok(credentials) => Action::Login { tag, credentials },
            Err(error) if reply::is_malformed(error) => self
                .strike_error(reply::credentials_refused(&tag, error))
                .into(),
            Err(error) => self
                .strike_failure(reply::credentials_refused(&tag, error))
                .into(),
        }
    }

    fn on_login_failed(&mut self, tag: &str, error: LoginError) -> Reply {
        self.strike_failure(reply::login_failed(tag, error))
    }

    /// `BAD` for a malformed or misplaced command; counted.
    fn refuse(&mut self, tag: Option<&str>, text: &str) -> Reply {
        self.strike_error(reply::bad(tag, text))
    }

    fn strike_error(&mut self, text: String) -> Reply {
        let verdict = self.strikes.error();
        closing_if(text, verdict)
    }

    fn strike_failure(&mut self, text: String) -> Reply {
        let verdict = self.strikes.login_failed();
        closing_if(text, verdict)
    }
}

/// `text`, followed by `* BYE` and the end of the session when the strikes say so.
fn closing_if(text: String, verdict: Verdict) -> Reply {
    let bye = match verdict {
        Verdict::Continue => return Reply::more(text),
        Verdict::TooManyErrors => reply::BYE_TOO_MANY_ERRORS,
        Verdict::TooManyFailures => reply::BYE_TOO_MANY_FAILURES,
    };
    Reply {
        text: text + &reply::bye(bye),
        close: true,
    }
}
