//! The vocabulary of a login, shared by the front ends, the driver ([`crate::proxy`]), the
//! protocol backends and the token sources: what the client presented, how mailgate logs in
//! upstream, the authenticated upstream, and why a login failed.
//!
//! It sits below all of them so that none imports another's internals.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::io::{BoxedIo, PrefixedIo};
use crate::secret::Secret;

/// What a client presented: the account id and its password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub account: String,
    pub password: Secret<String>,
}

/// How mailgate logs in upstream for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuth {
    /// SASL XOAUTH2 / OAUTHBEARER with an access token.
    Bearer { user: String, token: Secret<String> },
    /// PLAIN (or IMAP LOGIN) with a password handed out by the auth server.
    Password {
        user: String,
        password: Secret<String>,
    },
}

/// An upstream connection that has authenticated and is ready to be spliced.
pub struct Upstream {
    pub io: BoxedIo,
    /// The upstream's answer to the login, to relay to the client, control characters removed.
    /// IMAP: the tagged completion after the tag, e.g. `OK [CAPABILITY ...] Logged in`.
    /// SMTP: the final reply, e.g. `235 2.7.0 Logged in.`.
    pub completion: String,
    /// The account whose token logged in, when the driver knows it: it differs from the
    /// user name the client gave when a password check maps one to the other.
    pub account: Option<String>,
    /// SMTP with `forward_client: xclient`: the upstream takes XCLIENT from mailgate, so the
    /// client's own must be kept from it for the rest of the session.
    pub xclient_guard: Option<XclientGuard>,
}

/// What the client-side filter of an `xclient` session needs to know of this session's
/// upstream, as its EHLO after mailgate's XCLIENT said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XclientGuard {
    /// The upstream offers CHUNKING: it reads a BDAT chunk as content, not commands.
    pub chunking: bool,
}

/// What the protocol backends report. Classified once in [`BackendError::is_rejection`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The upstream refused the credentials; the text is redacted for logging.
    #[error("upstream refused the credentials: {0}")]
    Rejected(String),
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    /// The upstream said something unexpected; the text is redacted for logging.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream offers no usable authentication mechanism")]
    NoMechanism,
}

impl BackendError {
    /// Whether a fresh token might help: only when the upstream refused the one it got.
    pub fn is_rejection(&self) -> bool {
        matches!(self, BackendError::Rejected(_))
    }

    /// The error with what mailgate sent (`sent`: the token or password, the SASL message)
    /// redacted: servers may quote the command they refuse, and a short token, or an echo
    /// split into short words, slips past the long-word redaction of
    /// [`crate::sanitize::for_log`]. The whole of a secret goes whatever its length; pieces as
    /// [`crate::sanitize::without_echoes`] finds them.
    pub fn without(self, sent: &[Secret<Vec<u8>>]) -> Self {
        let scrub = |mut text: String| {
            for secret in sent.iter().map(|secret| secret.expose()) {
                match std::str::from_utf8(secret) {
                    Ok(whole) if !whole.is_empty() => text = text.replace(whole, "[redacted]"),
                    _ => {}
                }
            }
            let sent: Vec<&[u8]> = sent
                .iter()
                .map(|secret| secret.expose().as_slice())
                .collect();
            crate::sanitize::without_echoes(&text, &sent)
        };
        match self {
            BackendError::Rejected(text) => BackendError::Rejected(scrub(text)),
            BackendError::Protocol(text) => BackendError::Protocol(scrub(text)),
            other => other,
        }
    }
}

/// Why a login failed, as the client will be told. One reply per protocol for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("wrong credentials or account refused")]
    BadCredentials,
    /// The account's refresh token was refused (`invalid_grant`): someone must authorize it again.
    #[error("account needs re-authorization")]
    NeedsReauthorization,
    /// The identity provider refuses mailgate's settings for the account: for the operator.
    #[error("account misconfigured at its identity provider")]
    Misconfigured,
    /// The client or its address failed too often and is blocked for a while.
    #[error("too many failed logins")]
    Throttled,
    /// Password checks are all busy: try again shortly.
    #[error("password checks overloaded")]
    Overloaded,
    /// The auth server or identity provider that checks passwords gave no usable answer.
    #[error("password check unavailable")]
    CheckUnavailable,
    #[error("token source unavailable")]
    TokenUnavailable,
    #[error("upstream refused the token")]
    UpstreamRejected,
    #[error("upstream unavailable")]
    UpstreamUnavailable,
}

impl LoginError {
    /// Label value for `mailgate_logins_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            LoginError::BadCredentials => "bad_credentials",
            LoginError::NeedsReauthorization => "needs_reauthorization",
            LoginError::Misconfigured => "misconfigured",
            LoginError::Throttled => "throttled",
            LoginError::Overloaded => "overloaded",
            LoginError::CheckUnavailable => "check_unavailable",
            LoginError::TokenUnavailable => "token_unavailable",
            LoginError::UpstreamRejected => "upstream_rejected",
            LoginError::UpstreamUnavailable => "upstream_unavailable",
        }
    }

    /// Every label, for exporting each series from the start.
    pub const ALL: [LoginError; 9] = [
        LoginError::BadCredentials,
        LoginError::NeedsReauthorization,
        LoginError::Misconfigured,
        LoginError::Throttled,
        LoginError::Overloaded,
        LoginError::CheckUnavailable,
        LoginError::TokenUnavailable,
        LoginError::UpstreamRejected,
        LoginError::UpstreamUnavailable,
    ];
}

/// A login as a front end hands it over.
#[derive(Debug)]
pub struct LoginRequest {
    pub credentials: Credentials,
    /// SMTP: the client's EHLO/HELO argument, repeated upstream. IMAP: `None`.
    pub helo: Option<String>,
    /// The client's address, for per-address failure counting; `None` over in-memory streams.
    pub client: Option<SocketAddr>,
    /// The address of mailgate the client connected to, for `forward_client`; `None` over
    /// in-memory streams.
    pub local: Option<SocketAddr>,
}

/// The one thing front ends need from the rest of mailgate.
pub trait Authenticator: Send + Sync {
    /// Checks the client's credentials, obtains a token and logs in upstream.
    fn login(
        &self,
        request: LoginRequest,
    ) -> impl Future<Output = Result<Upstream, LoginError>> + Send;

    /// What the upstream advertises for the front end to relay, when known (SMTP: its EHLO
    /// extension lines such as `SIZE 35882577`; ManageSieve: its capabilities). Never waits
    /// on the upstream: empty while they are not known yet.
    fn upstream_capabilities(&self) -> Vec<String>;
}

/// Why mailgate itself ends a session; each protocol has its goodbye for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// The listener is full: a refusal at connect, or a session before login closed to make
    /// room for a newer one.
    TooManyConnections,
    ShuttingDown,
    /// The account's token source refused it for good.
    Revoked,
    /// The operator ended the session on its backend (drain, kick, move): a new login goes
    /// where the account is routed now.
    Moved,
    /// Before login: the client was silent for `pre_auth_timeout`.
    IdleTimeout,
    /// Before login: `pre_auth_lifetime` passed without a login.
    LifetimeOver,
}

/// The goodbye's text for [`Closing::Moved`], the same in every protocol.
pub const MOVED: &str =
    "Session ended by the operator (server drained or account moved); log in again";

/// How long a goodbye (`* BYE`, `421`) may take to be written before the connection is just
/// closed: the peer may be the reason the session ends.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// A session that authenticated: the client stream (replaying whatever it pipelined after the
/// login command) and the upstream, ready to splice.
pub struct Handoff<S> {
    pub client: PrefixedIo<S>,
    pub upstream: Upstream,
    pub account: String,
}
