//! The IMAP client side before authentication: greeting, the commands of the not-authenticated
//! state (RFC 9051 6.1, 6.2), STARTTLS, LOGIN and AUTHENTICATE PLAIN/LOGIN, then a handoff to
//! the splice.

use std::future::Future;
use std::io;

use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::{AuthenticateDataCodec, CommandCodec};

use super::reply;
use crate::frontend::framer::Framer;
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
    max_line_length: usize,
    max_literal_size: usize,
    /// The tag of the login under way, for its completion.
    login_tag: String,
}

impl ImapDialogue {
    pub fn new(settings: &FrontendSettings) -> Self {
        Self {
            framer: new_framer(settings.max_message_size()),
            session: Session::new(settings.tls_offer()),
            hostname: settings.hostname.clone(),
            max_line_length: settings.max_line_length,
            max_literal_size: settings.max_literal_size,
            login_tag: String::new(),
        }
    }

    fn max_message_size(&self) -> usize {
        self.max_line_length.saturating_add(self.max_literal_size)
    }

    /// The next action for the fragments buffered, or `None` when a message is incomplete.
    fn next_action(&mut self) -> Option<Action> {
        loop {
            let fragment = self.framer.progress()?;
            let line_too_long = matches!(fragment, FragmentInfo::Line { .. })
                && fragment.range().len() > self.max_line_length;
            if let Some(announcement) = literal_announcement(fragment) {
                if let Some(reply) = self.accept_literal(announcement, line_too_long) {
                    return Some(Action::Reply(reply));
                }
            } else if self.framer.fragmentizer().is_message_complete() {
                let fragmentizer = self.framer.fragmentizer();
                if line_too_long
                    || fragmentizer.is_message_poisoned()
                    || fragmentizer.is_max_message_size_exceeded()
                {
                    let tag = fragmentizer.decode_tag();
                    let tag = tag.as_ref().map(AsRef::as_ref);
                    return Some(self.session.refuse(tag, "Command too long").into());
                }
                return Some(self.session.on_message(fragmentizer));
            }
        }
    }

    /// Decides on a literal announced at the end of a line: `Some(reply)` to send, `None` to
    /// read on. A synchronizing literal that would not fit (or follows a line too long) is
    /// refused before the client sends it (RFC 9051 7.5), so its bytes never arrive and the
    /// message can be skipped. A non-synchronizing one arrives anyway (RFC 7888 4): the message
    /// is marked, read to its end (the `Fragmentizer` keeps at most its size limit) and refused
    /// then.
    fn accept_literal(
        &mut self,
        announcement: LiteralAnnouncement,
        line_too_long: bool,
    ) -> Option<Reply> {
        let length = announcement.length as usize;
        let fits = !line_too_long
            && length <= self.max_literal_size
            && self.framer.message_len().saturating_add(length) <= self.max_message_size();
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
        self.max_message_size()
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
        self.framer = new_framer(self.max_message_size());
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

fn literal_announcement(fragment: FragmentInfo) -> Option<LiteralAnnouncement> {
    match fragment {
        FragmentInfo::Line { announcement, .. } => announcement,
        FragmentInfo::Literal { .. } => None,
    }
}

/// A framer bounded by the listener's limits; the limits are validated to fit in a `u32`.
fn new_framer(max_message_size: usize) -> Framer {
    Framer::new(u32::try_from(max_message_size).unwrap_or(u32::MAX))
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
