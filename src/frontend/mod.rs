//! The seam every mail protocol plugs into: [`MailProtocol`] (what a listener needs of its
//! protocol) and [`Dialogue`] (one session before login, without I/O), and [`serve`], the one
//! session loop that runs any dialogue: deadlines, goodbyes, STARTTLS, the login, the handoff.
//!
//! A protocol is one folder (`imap`, `smtp`, ...) implementing both; the server chooses it by
//! name once and knows nothing else of it.

use std::future::Future;
use std::pin::Pin;

use crate::config::Protocol;
use crate::forward::Origin;
use crate::frontend::settings::FrontendSettings;
use crate::login::{BackendError, Closing, Credentials, LoginError, Upstream, UpstreamAuth};
use crate::splice::Boundary;
use crate::upstream::Connector;

pub(crate) mod framer;
pub(crate) mod lines;
mod session;
pub mod settings;
pub use session::serve;

/// A boxed future, for the trait objects' async methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a listener needs of its protocol.
pub trait MailProtocol: Send + Sync {
    /// The protocol's name in the configuration, for token scopes and password checks.
    fn name(&self) -> Protocol;

    /// A new session's dialogue before login.
    fn dialogue(&self, settings: &FrontendSettings) -> Box<dyn Dialogue>;

    /// The untagged goodbye when mailgate ends a session outside its dialogue: a refusal at
    /// connect, or a stop at a response boundary after login (IMAP `* BYE`, SMTP `421`).
    fn goodbye(&self, why: Closing, hostname: &str) -> Vec<u8>;

    /// Follows the upstream's responses after login, to tell where a goodbye may go.
    fn boundary(&self) -> Box<dyn Boundary>;

    /// Connects to the upstream and logs in with `auth`.
    ///
    /// # Errors
    /// As the protocol's backend classifies them; no error carries the token or password.
    fn log_in_upstream<'a>(
        &'a self,
        connector: &'a Connector,
        auth: &'a UpstreamAuth,
        on_behalf: OnBehalf<'a>,
    ) -> BoxFuture<'a, Result<Upstream, BackendError>>;

    /// Reads what the upstream advertises that the dialogue relays (SMTP's EHLO extensions,
    /// ManageSieve's capabilities); `None` when the protocol relays nothing.
    fn probe<'a>(
        &'a self,
        connector: &'a Connector,
        hostname: &'a str,
    ) -> Option<BoxFuture<'a, Result<Vec<String>, BackendError>>>;

    /// The health check of one server of a pool: opens a session as a login would (connect,
    /// TLS, greeting, capabilities; SMTP's EHLO names `hostname`) without authenticating, and
    /// ends it politely (`LOGOUT`, `QUIT`) so that the server logs a clean disconnect.
    ///
    /// # Errors
    /// The server cannot be reached, its TLS fails, or its greeting is a refusal
    /// ([`BackendError::Protocol`], with the server's text made safe to log).
    fn check_health<'a>(
        &'a self,
        connector: &'a Connector,
        hostname: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// The ALPN id a listener accepts. A client offering ALPN ids without it is refused, so
    /// that a browser's `http/1.1` connection cannot be turned against a mail port (ALPACA, as
    /// nginx's mail proxy refuses since 1.21.0).
    fn alpn_id(&self) -> &'static [u8];
}

/// Whom an upstream login is for, as far as the upstream is told.
#[derive(Debug, Clone, Copy)]
pub struct OnBehalf<'a> {
    /// SMTP: the name to give in EHLO (the client's own, or mailgate's host name).
    pub helo: &'a str,
    /// The client's addresses, for `forward_client`.
    pub origin: Option<&'a Origin>,
}

/// One session before login, as a protocol speaks it: frames client bytes, answers commands,
/// and says when to start TLS or log in. Does no I/O, so it runs over any stream and in tests
/// as a plain state machine; [`serve`] does the I/O.
pub trait Dialogue: Send {
    /// What the client is sent on connect. `upstream` gives what the upstream advertises, as
    /// far as it is known, for protocols that relay it.
    fn greeting(&mut self, upstream: &dyn Fn() -> Vec<String>) -> Vec<u8>;

    /// Takes bytes read from the client.
    fn push(&mut self, bytes: &[u8]);

    /// Bytes taken but not yet acted on.
    fn buffered(&self) -> usize;

    /// The most a login may leave buffered from what the client pipelines meanwhile (one
    /// command's limit): past it, reading waits for the login.
    fn max_pending(&self) -> usize;

    /// The next step for what is buffered; `None` until a whole command (or SASL response)
    /// has arrived.
    fn next_step(&mut self, upstream: &dyn Fn() -> Vec<String>) -> Option<Step>;

    /// TLS started after [`Step::StartTls`]: whatever was buffered came in the clear and is
    /// dropped (the CVE-2011-0411 class of injection), and STARTTLS is no longer offered.
    fn tls_started(&mut self);

    /// The reply to the login of the last [`Step::LogIn`], from the upstream's `completion`.
    fn logged_in(&mut self, completion: &str) -> Vec<u8>;

    /// The reply to a failed login: [`Step::Reply`], or [`Step::Close`] when the session has
    /// failed too often.
    fn login_failed(&mut self, error: LoginError) -> Step;

    /// What the client is told when mailgate ends the session.
    fn goodbye(&self, why: Closing) -> Vec<u8>;

    /// What the client sent after the login command, replayed to the upstream.
    fn into_rest(self: Box<Self>) -> Vec<u8>;
}

/// What the session does next.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes (replies are batched until the next read).
    Reply(Vec<u8>),
    /// Send these bytes, then end the session.
    Close(Vec<u8>),
    /// Send these bytes, then run the TLS handshake; [`Dialogue::tls_started`] follows.
    StartTls(Vec<u8>),
    /// Log in; [`Dialogue::logged_in`] or [`Dialogue::login_failed`] follows.
    LogIn {
        credentials: Credentials,
        /// SMTP: the client's EHLO/HELO argument, repeated upstream.
        helo: Option<String>,
    },
}
