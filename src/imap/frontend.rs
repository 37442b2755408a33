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
use tokio::io::AsyncRead;
use tokio::time::{Instant, timeout_at};

use super::framer::Framer;
use super::reply;
use crate::frontend_settings::{FrontendSettings, TlsOffer};
use crate::io::{BoxedIo, PrefixedIo, linger, write_all_by};
use crate::limits::{Strikes, Verdict};
use crate::login::{
    Authenticator, Closing, Credentials, GOODBYE_TIMEOUT, Handoff, LoginError, LoginRequest,
};
use crate::sanitize::Escaped;
use crate::sasl::{self, SaslError, SaslServer, SaslStep, ServerMechanism};
use crate::secret::Secret;

/// Runs the session until the client has logged in, logged out, closed, or was closed.
///
/// Returns `Ok(Some(_))` after a successful login, with everything the client pipelined after
/// the login command replayed first from [`Handoff::client`]. Returns `Ok(None)` when the
/// session ended: the client sent LOGOUT or closed the stream; it was silent for
/// `settings.pre_auth_timeout` or did not log in within `settings.pre_auth_lifetime`; it sent
/// too many bad commands or failed logins; or `stop` completed (mailgate is shutting down, or
/// closes the session to make room: the goodbye says which).
/// Each of those but the client's own close is answered with `* BYE`. A failed STARTTLS
/// handshake ends the session too.
///
/// # Errors
/// Reading from or writing to the client failed, or a reply was not read in time.
pub async fn serve<A: Authenticator>(
    client: BoxedIo,
    authenticator: &A,
    settings: &FrontendSettings,
    stop: impl Future<Output = Closing>,
) -> io::Result<Option<Handoff<BoxedIo>>> {
    tokio::pin!(stop);
    let mut conn = Conn {
        client,
        lifetime_end: settings.lifetime_end(),
        settings,
    };
    let mut session = Session::new(settings.tls_offer());
    conn.send(&reply::greeting(&settings.hostname, session.tls))
        .await?;
    let mut framer = new_framer(settings);
    loop {
        let Some(fragment) = framer.progress() else {
            // `timeout_at` fires only while a read waits: a client that always has the next
            // commands waiting would never meet its lifetime, so it is checked here too.
            if Instant::now() >= conn.lifetime_end {
                return conn.goodbye(&reply::bye(reply::BYE_LIFETIME)).await;
            }
            let deadline = conn.deadline();
            let filled = tokio::select! {
                filled = timeout_at(deadline, framer.fill(&mut conn.client)) => filled,
                why = &mut stop => return conn.goodbye(&reply::closing(why)).await,
            };
            match filled {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => return Ok(None),
                Ok(Err(error)) => return Err(error),
                Err(_elapsed) => return conn.goodbye(&conn.timed_out()).await,
            }
        };
        let line_too_long = matches!(fragment, FragmentInfo::Line { .. })
            && fragment.range().len() > settings.max_line_length;
        let action = if let Some(announcement) = literal_announcement(fragment) {
            match accept_literal(
                &mut framer,
                announcement,
                line_too_long,
                &mut session,
                settings,
            ) {
                Some(reply) => Action::Reply(reply),
                None => continue,
            }
        } else if framer.fragmentizer().is_message_complete() {
            let fragmentizer = framer.fragmentizer();
            if line_too_long
                || fragmentizer.is_message_poisoned()
                || fragmentizer.is_max_message_size_exceeded()
            {
                let tag = fragmentizer.decode_tag();
                session
                    .refuse(tag.as_ref().map(AsRef::as_ref), "Command too long")
                    .into()
            } else {
                session.on_message(framer.fragmentizer())
            }
        } else {
            continue;
        };
        let reply = match action {
            Action::Reply(reply) => reply,
            Action::StartTls { tag } => {
                conn.send(&reply::begin_tls(&tag)).await?;
                // Whatever came after STARTTLS was sent in the clear: it is never acted on
                // (the CVE-2011-0411 class of injection).
                framer = new_framer(settings);
                let Some(tls) = &settings.starttls else {
                    return Ok(None);
                };
                let deadline = conn.deadline();
                let Some(client) = tls.accept(conn.client, deadline).await else {
                    return Ok(None);
                };
                conn = Conn { client, ..conn };
                session.tls = TlsOffer::None;
                continue;
            }
            Action::Login { tag, credentials } => {
                let account = credentials.account.clone();
                let request = LoginRequest {
                    credentials,
                    helo: None,
                    client: settings.client,
                    local: settings.local,
                };
                let lifetime_end = conn.lifetime_end;
                let result = tokio::select! {
                    result = authenticator.login(request) => result,
                    why = &mut stop => return conn.goodbye(&reply::closing(why)).await,
                    () = tokio::time::sleep_until(lifetime_end) => {
                        return conn.goodbye(&reply::bye(reply::BYE_LIFETIME)).await;
                    }
                    () = hung_up(&mut conn.client, &mut framer, settings) => return Ok(None),
                };
                match result {
                    Ok(upstream) => {
                        conn.send(&format!("{tag} {}\r\n", upstream.completion))
                            .await?;
                        let client = PrefixedIo::new(framer.into_unparsed(), conn.client);
                        return Ok(Some(Handoff {
                            client,
                            upstream,
                            account,
                        }));
                    }
                    Err(error) => {
                        tracing::info!(account = %Escaped(&account), %error, "client login failed");
                        session.on_login_failed(&tag, error)
                    }
                }
            }
        };
        conn.send(&reply.text).await?;
        if reply.close {
            linger(&mut conn.client).await;
            return Ok(None);
        }
    }
}

/// The client stream with the session's deadlines.
struct Conn<'a> {
    client: BoxedIo,
    lifetime_end: Instant,
    settings: &'a FrontendSettings,
}

impl Conn<'_> {
    fn deadline(&self) -> Instant {
        self.settings.next_deadline(self.lifetime_end)
    }

    async fn send(&mut self, text: &str) -> io::Result<()> {
        let deadline = self.deadline();
        write_all_by(&mut self.client, text.as_bytes(), deadline).await
    }

    /// Says why the session ends, briefly: the client may be the reason it ends.
    async fn goodbye<T>(&mut self, text: &str) -> io::Result<Option<T>> {
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        write_all_by(&mut self.client, text.as_bytes(), deadline).await?;
        linger(&mut self.client).await;
        Ok(None)
    }

    fn timed_out(&self) -> String {
        if Instant::now() >= self.lifetime_end {
            reply::bye(reply::BYE_LIFETIME)
        } else {
            reply::bye(reply::BYE_IDLE)
        }
    }
}

/// Completes when the client hangs up while its login runs, so that the login (its password
/// check, its token fetch) is dropped instead of finishing for no one. What the client
/// pipelines meanwhile is kept for the upstream, up to one command's size; past that, reading
/// waits for the login.
async fn hung_up<S: AsyncRead + Unpin>(
    client: &mut S,
    framer: &mut Framer,
    settings: &FrontendSettings,
) {
    while framer.buffered() < settings.max_message_size() {
        if !matches!(framer.fill(client).await, Ok(true)) {
            return;
        }
    }
    std::future::pending().await
}

fn literal_announcement(fragment: FragmentInfo) -> Option<LiteralAnnouncement> {
    match fragment {
        FragmentInfo::Line { announcement, .. } => announcement,
        FragmentInfo::Literal { .. } => None,
    }
}

/// A framer bounded by the listener's limits; the limits are validated to fit in a `u32`.
fn new_framer(settings: &FrontendSettings) -> Framer {
    Framer::new(u32::try_from(settings.max_message_size()).unwrap_or(u32::MAX))
}

/// Decides on a literal announced at the end of a line: `Some(reply)` to send, `None` to read
/// on. A synchronizing literal that would not fit (or follows a line too long) is refused
/// before the client sends it (RFC 9051 7.5), so its bytes never arrive and the message can be
/// skipped. A non-synchronizing one arrives anyway (RFC 7888 4): the message is marked, read to
/// its end (the `Fragmentizer` keeps at most its size limit) and refused then.
fn accept_literal(
    framer: &mut Framer,
    announcement: LiteralAnnouncement,
    line_too_long: bool,
    session: &mut Session,
    settings: &FrontendSettings,
) -> Option<Reply> {
    let length = announcement.length as usize;
    let fits = !line_too_long
        && length <= settings.max_literal_size
        && framer.message_len().saturating_add(length) <= settings.max_message_size();
    match (announcement.mode, fits) {
        (LiteralMode::NonSync, true) => return None,
        (LiteralMode::NonSync, false) => {
            framer.poison_message();
            return None;
        }
        (LiteralMode::Sync, true) => {
            return Some(Reply::more(reply::CONTINUE_LITERAL.to_owned()));
        }
        (LiteralMode::Sync, false) => {}
    }
    let tag = framer.fragmentizer().decode_tag();
    let tag = tag.as_ref().map(|tag| tag.as_ref().to_owned());
    framer.skip_message();
    Some(session.refuse(tag.as_deref(), "Literal too large"))
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
