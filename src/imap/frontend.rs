//! The IMAP client side before authentication: greeting, the commands of the not-authenticated
//! state (RFC 9051 6.1, 6.2), LOGIN and AUTHENTICATE PLAIN/LOGIN, then a handoff to the splice.

use std::borrow::Cow;
use std::io;

use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer, LiteralAnnouncement};
use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::imap_types::secret::Secret as CodecSecret;
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::framer::Framer;
use super::reply;
use crate::io::PrefixedIo;
use crate::proxy::{Authenticator, FrontendSettings, Handoff, LoginError, LoginRequest};
use crate::sasl::{self, Credentials, SaslError};
use crate::secret::Secret;

/// Largest message (command line plus literals) accepted before authentication. Dovecot takes
/// up to about 8 KiB of base64 in AUTHENTICATE; twice that leaves room and still bounds memory.
pub const MAX_MESSAGE_SIZE: u32 = 16 * 1024;

/// Consecutive `BAD` commands before `* BYE`: enough for a client probing extensions, few
/// enough to shed a peer that is not speaking IMAP at all.
pub const MAX_BAD_COMMANDS: u32 = 10;

/// Failed logins per connection before `* BYE`: a typo or two is forgiven, while password
/// guessing costs a reconnect every few tries.
pub const MAX_LOGIN_FAILURES: u32 = 3;

/// Runs the session until the client has logged in, logged out, closed, or idled too long.
///
/// Returns `Ok(Some(_))` after a successful login, with everything the client pipelined after
/// the login command replayed first from [`Handoff::client`]. Returns `Ok(None)` when the
/// session ended: the client sent LOGOUT, closed the stream, was idle for
/// `settings.pre_auth_timeout` (answered `* BYE`), or sent too many bad commands.
///
/// # Errors
/// Reading from or writing to the client failed.
pub async fn serve<S, A>(
    mut client: S,
    authenticator: &A,
    settings: &FrontendSettings,
) -> io::Result<Option<Handoff<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    A: Authenticator,
{
    send(&mut client, &reply::greeting(&settings.hostname)).await?;
    let mut framer = Framer::new(MAX_MESSAGE_SIZE);
    let mut session = Session::new();
    let mut deadline = Instant::now() + settings.pre_auth_timeout;
    loop {
        let Some(fragment) = framer.progress() else {
            match tokio::time::timeout_at(deadline, framer.fill(&mut client)).await {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => return Ok(None),
                Ok(Err(error)) => return Err(error),
                Err(_elapsed) => {
                    send(&mut client, &reply::bye(reply::BYE_IDLE)).await?;
                    return Ok(None);
                }
            }
        };
        let action = if let Some(announcement) = literal_announcement(fragment) {
            match accept_literal(&mut framer, announcement, &mut session) {
                Some(reply) => Action::Reply(reply),
                None => continue,
            }
        } else if framer.fragmentizer().is_message_complete() {
            session.on_message(framer.fragmentizer())
        } else {
            continue;
        };
        let reply = match action {
            Action::Reply(reply) => reply,
            Action::Login { tag, credentials } => {
                let account = credentials.account.clone();
                let request = LoginRequest {
                    credentials,
                    helo: None,
                };
                match authenticator.login(request).await {
                    Ok(upstream) => {
                        let completion = upstream.completion.trim_end_matches(['\r', '\n']);
                        send(&mut client, &format!("{tag} {completion}\r\n")).await?;
                        let client = PrefixedIo::new(framer.into_unparsed(), client);
                        return Ok(Some(Handoff {
                            client,
                            upstream,
                            account,
                        }));
                    }
                    Err(error) => session.on_login_failed(&tag, error),
                }
            }
        };
        send(&mut client, &reply.text).await?;
        if reply.close {
            return Ok(None);
        }
        deadline = Instant::now() + settings.pre_auth_timeout;
    }
}

async fn send<S: AsyncWrite + Unpin>(client: &mut S, text: &str) -> io::Result<()> {
    client.write_all(text.as_bytes()).await?;
    client.flush().await
}

fn literal_announcement(fragment: FragmentInfo) -> Option<LiteralAnnouncement> {
    match fragment {
        FragmentInfo::Line { announcement, .. } => announcement,
        FragmentInfo::Literal { .. } => None,
    }
}

/// Decides on a literal announced at the end of a line: `Some(reply)` to send, `None` to read
/// on. A synchronizing literal that would not fit is refused before the client sends it
/// (RFC 9051 7.5), so its bytes never arrive and the message can be skipped. A non-synchronizing
/// one arrives anyway (RFC 7888 4): the `Fragmentizer` discards it and the message fails to decode.
fn accept_literal(
    framer: &mut Framer,
    announcement: LiteralAnnouncement,
    session: &mut Session,
) -> Option<Reply> {
    if announcement.mode == LiteralMode::NonSync {
        return None;
    }
    let size = framer
        .message_len()
        .saturating_add(announcement.length as usize);
    if size <= MAX_MESSAGE_SIZE as usize {
        return Some(Reply::more(reply::CONTINUE_LITERAL.to_owned()));
    }
    let tag = framer.fragmentizer().decode_tag();
    let tag = tag.as_ref().map(|tag| tag.as_ref().to_owned());
    framer.skip_message();
    Some(session.literal_too_large(tag))
}

/// What the session waits for next.
enum State {
    /// A command.
    Command,
    /// AUTHENTICATE PLAIN sent `+ `: the next line is the PLAIN message.
    PlainResponse { tag: String },
    /// AUTHENTICATE LOGIN asked for the user name.
    LoginUser { tag: String },
    /// AUTHENTICATE LOGIN asked for the password.
    LoginPassword { tag: String, user: Secret<Vec<u8>> },
}

/// What the I/O loop does next.
enum Action {
    Reply(Reply),
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

    fn close(text: String) -> Self {
        Self { text, close: true }
    }
}

/// The session's state and counters; does no I/O.
struct Session {
    state: State,
    bad_commands: u32,
    failed_logins: u32,
}

impl Session {
    fn new() -> Self {
        Self {
            state: State::Command,
            bad_commands: 0,
            failed_logins: 0,
        }
    }

    /// Handles the complete message in `fragmentizer`, decoded as the state expects.
    fn on_message(&mut self, fragmentizer: &Fragmentizer) -> Action {
        let state = std::mem::replace(&mut self.state, State::Command);
        let (next, action) = match state {
            State::Command => match fragmentizer.decode_message(&CommandCodec::new()) {
                Ok(command) => self.on_command(command),
                Err(_) => {
                    let tag = fragmentizer.decode_tag();
                    let tag = tag.as_ref().map(AsRef::as_ref);
                    (State::Command, self.refuse(tag, "Invalid command").into())
                }
            },
            State::PlainResponse { tag } => match auth_data(fragmentizer) {
                Some(AuthenticateData::Continue(message)) => {
                    let message = Secret::new(message.declassify().to_vec());
                    (
                        State::Command,
                        self.credentials(tag, sasl::decode_plain(&message)),
                    )
                }
                other => (State::Command, self.not_continued(&tag, other.is_some())),
            },
            State::LoginUser { tag } => match auth_data(fragmentizer) {
                Some(AuthenticateData::Continue(user)) => {
                    let user = Secret::new(user.declassify().to_vec());
                    (State::LoginPassword { tag, user }, self.prompt_password())
                }
                other => (State::Command, self.not_continued(&tag, other.is_some())),
            },
            State::LoginPassword { tag, user } => match auth_data(fragmentizer) {
                Some(AuthenticateData::Continue(password)) => {
                    let credentials = sasl::credentials(user.expose(), password.declassify());
                    (State::Command, self.credentials(tag, credentials))
                }
                other => (State::Command, self.not_continued(&tag, other.is_some())),
            },
        };
        self.state = next;
        action
    }

    fn on_command(&mut self, command: Command<'_>) -> (State, Action) {
        tracing::debug!(
            command = command.name(),
            "IMAP command before authentication"
        );
        let tag = command.tag.as_ref().to_owned();
        let action = match command.body {
            CommandBody::Capability => self.answer(reply::capability(&tag)).into(),
            CommandBody::Noop => self.answer(reply::ok(&tag, "NOOP completed")).into(),
            CommandBody::Id { .. } => self.answer(reply::id(&tag)).into(),
            CommandBody::Logout => {
                let text = reply::bye(reply::BYE_LOGOUT) + &reply::ok(&tag, "LOGOUT completed");
                Action::Reply(Reply::close(text))
            }
            CommandBody::Login { username, password } => {
                let password = password.declassify();
                let credentials = sasl::credentials(username.as_ref(), password.as_ref());
                self.credentials(tag, credentials)
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => return self.authenticate(tag, &mechanism, initial_response),
            // RFC 5161 3.1: ENABLE is valid only once authenticated.
            CommandBody::Enable { .. } => {
                self.refuse(Some(&tag), "ENABLE needs a login first").into()
            }
            // RFC 9051 3 leaves BAD or NO to the server for a command in the wrong state. BAD:
            // the client broke the state rules, the request itself could not have succeeded
            // (NO could read as "no such mailbox"), and it counts towards MAX_BAD_COMMANDS.
            _ => self
                .refuse(Some(&tag), "Command not valid before login")
                .into(),
        };
        (State::Command, action)
    }

    fn authenticate(
        &mut self,
        tag: String,
        mechanism: &AuthMechanism<'_>,
        initial_response: Option<CodecSecret<Cow<'_, [u8]>>>,
    ) -> (State, Action) {
        let initial_response =
            initial_response.map(|response| Secret::new(response.declassify().to_vec()));
        match (mechanism, initial_response) {
            (AuthMechanism::Plain, None) => (
                State::PlainResponse { tag },
                self.answer(reply::CONTINUE_EMPTY.to_owned()).into(),
            ),
            (AuthMechanism::Plain, Some(message)) => (
                State::Command,
                self.credentials(tag, sasl::decode_plain(&message)),
            ),
            (AuthMechanism::Login, None) => (
                State::LoginUser { tag },
                self.answer(reply::CONTINUE_USERNAME.to_owned()).into(),
            ),
            // Some clients send the user name as LOGIN's initial response (RFC 4959 allows it).
            (AuthMechanism::Login, Some(user)) => {
                (State::LoginPassword { tag, user }, self.prompt_password())
            }
            // RFC 9051 6.2.2: an unsupported mechanism SHOULD get NO.
            _ => (
                State::Command,
                self.answer(reply::no(&tag, "[CANNOT] Unsupported mechanism"))
                    .into(),
            ),
        }
    }

    fn prompt_password(&mut self) -> Action {
        self.answer(reply::CONTINUE_PASSWORD.to_owned()).into()
    }

    /// Turns decoded credentials into a login, or the reply refusing them.
    fn credentials(&mut self, tag: String, credentials: Result<Credentials, SaslError>) -> Action {
        match credentials {
            Ok(credentials) => {
                self.bad_commands = 0;
                Action::Login { tag, credentials }
            }
            Err(error) if reply::is_malformed(error) => self
                .count_bad(reply::credentials_refused(&tag, error))
                .into(),
            Err(error) => self
                .count_failure(reply::credentials_refused(&tag, error))
                .into(),
        }
    }

    /// An AUTHENTICATE exchange ended without a response: cancelled by `*` (RFC 9051 6.2.2
    /// requires BAD) or an undecodable line.
    fn not_continued(&mut self, tag: &str, cancelled: bool) -> Action {
        if cancelled {
            self.answer(reply::bad(Some(tag), "AUTHENTICATE cancelled"))
                .into()
        } else {
            self.refuse(Some(tag), "Invalid SASL response").into()
        }
    }

    fn on_login_failed(&mut self, tag: &str, error: LoginError) -> Reply {
        tracing::debug!(reason = error.label(), "IMAP login failed");
        self.count_failure(reply::login_failed(tag, error))
    }

    fn literal_too_large(&mut self, tag: Option<String>) -> Reply {
        self.refuse(tag.as_deref(), "Literal too large")
    }

    /// A reply to a well-formed command.
    fn answer(&mut self, text: String) -> Reply {
        self.bad_commands = 0;
        Reply::more(text)
    }

    /// `BAD` for a malformed or misplaced command; counted.
    fn refuse(&mut self, tag: Option<&str>, text: &str) -> Reply {
        self.count_bad(reply::bad(tag, text))
    }

    fn count_bad(&mut self, text: String) -> Reply {
        self.bad_commands += 1;
        if self.bad_commands >= MAX_BAD_COMMANDS {
            return Reply::close(text + &reply::bye(reply::BYE_TOO_MANY_ERRORS));
        }
        Reply::more(text)
    }

    fn count_failure(&mut self, text: String) -> Reply {
        self.bad_commands = 0;
        self.failed_logins += 1;
        if self.failed_logins >= MAX_LOGIN_FAILURES {
            return Reply::close(text + &reply::bye(reply::BYE_TOO_MANY_FAILURES));
        }
        Reply::more(text)
    }
}

/// Decodes an AUTHENTICATE response line; `None` when it is not valid (bad base64, too long).
fn auth_data(fragmentizer: &Fragmentizer) -> Option<AuthenticateData<'_>> {
    fragmentizer
        .decode_message(&AuthenticateDataCodec::new())
        .ok()
}
