//! The vocabulary of a login, shared by the front ends, the driver ([`crate::proxy`]), the
//! protocol backends and the token sources: what the client presented, how mailgate logs in
//! upstream, the authenticated upstream, and why a login failed.
//!
//! It sits below all of them so that none imports another's internals.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client_tls::ClientTls;
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

    /// The error with every occurrence of what mailgate sent (`sent`: the token or password,
    /// the SASL message as base64) replaced: servers may quote the command they refuse, and
    /// a short token slips past the long-word redaction of [`crate::sanitize::for_log`].
    pub fn without(self, sent: &[Secret<String>]) -> Self {
        let scrub = |mut text: String| {
            for secret in sent.iter().filter(|secret| !secret.expose().is_empty()) {
                text = text.replace(secret.expose().as_str(), "[redacted]");
            }
            text
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
            LoginError::Throttled => "throttled",
            LoginError::Overloaded => "overloaded",
            LoginError::CheckUnavailable => "check_unavailable",
            LoginError::TokenUnavailable => "token_unavailable",
            LoginError::UpstreamRejected => "upstream_rejected",
            LoginError::UpstreamUnavailable => "upstream_unavailable",
        }
    }

    /// Every label, for exporting each series from the start.
    pub const ALL: [LoginError; 8] = [
        LoginError::BadCredentials,
        LoginError::NeedsReauthorization,
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

    /// SMTP: the upstream's EHLO extension lines (`SIZE 35882577`, `8BITMIME`, ...) when known.
    /// Never waits on the upstream: empty while they are not known yet.
    fn smtp_extensions(&self) -> Vec<String>;
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
}

/// How long a goodbye (`* BYE`, `421`) may take to be written before the connection is just
/// closed: the peer may be the reason the session ends.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Names and limits a front end works with before authentication.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// Shown in greetings.
    pub hostname: String,
    /// How long the client may stay silent, and how long one reply may take to be read.
    pub pre_auth_timeout: Duration,
    /// How long a session may take from connect to a successful login, however busy.
    pub pre_auth_lifetime: Duration,
    /// The client's address, as the listener saw it.
    pub client: Option<SocketAddr>,
    /// TLS the client may start with STARTTLS; `None` when the listener has none or the
    /// session runs over TLS already.
    pub starttls: Option<Arc<ClientTls>>,
    /// Longest command line, CRLF included.
    pub max_line_length: usize,
    /// IMAP: longest literal.
    pub max_literal_size: usize,
    /// The listener's address the client connected to.
    pub local: Option<SocketAddr>,
}

impl FrontendSettings {
    /// IMAP: the most one command (line plus literals) may hold.
    pub fn max_message_size(&self) -> usize {
        self.max_line_length.saturating_add(self.max_literal_size)
    }

    /// What the session offers before the client starts TLS.
    pub fn tls_offer(&self) -> TlsOffer {
        match &self.starttls {
            None => TlsOffer::None,
            Some(tls) if tls.required => TlsOffer::Required,
            Some(_) => TlsOffer::Optional,
        }
    }

    /// When the session's lifetime before authentication runs out, for a session started now.
    pub fn lifetime_end(&self) -> Instant {
        Instant::now() + self.pre_auth_lifetime
    }

    /// The deadline for the next read or write: `pre_auth_timeout` from now, but never past
    /// `lifetime_end`.
    pub fn next_deadline(&self, lifetime_end: Instant) -> Instant {
        (Instant::now() + self.pre_auth_timeout).min(lifetime_end)
    }
}

/// Whether a front end offers STARTTLS, and whether logins wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsOffer {
    /// No STARTTLS: the listener has no TLS, or the session has it already.
    #[default]
    None,
    /// STARTTLS offered; logins allowed without it.
    Optional,
    /// STARTTLS offered; no login before it.
    Required,
}

/// A session that authenticated: the client stream (replaying whatever it pipelined after the
/// login command) and the upstream, ready to splice.
pub struct Handoff<S> {
    pub client: PrefixedIo<S>,
    pub upstream: Upstream,
    pub account: String,
}
