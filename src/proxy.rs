//! The protocol-independent driver: client credentials -> account check -> token -> upstream
//! login (with one retry on a refused token) -> an authenticated upstream stream.
//!
//! Front ends talk to it through the [`Authenticator`] trait, so their transcript tests can
//! run over in-memory streams with a stand-in.

use std::future::Future;
use std::io;
use std::time::Duration;

use crate::io::{BoxedIo, PrefixedIo};
use crate::sasl::Credentials;
use crate::secret::Secret;

/// An upstream connection that has authenticated and is ready to be spliced.
pub struct Upstream {
    pub io: BoxedIo,
    /// IMAP: the upstream's tagged completion after the tag, e.g. `OK [CAPABILITY ...] Logged in`,
    /// which the front end relays under the client's tag. SMTP: the upstream's final reply line.
    pub completion: String,
}

/// How mailgate logs in upstream for one account.
#[derive(Debug, Clone)]
pub enum UpstreamAuth {
    /// SASL XOAUTH2 / OAUTHBEARER with an access token.
    Bearer { user: String, token: Secret<String> },
    /// PLAIN (or IMAP LOGIN) with a password handed out by the auth server.
    Password {
        user: String,
        password: Secret<String>,
    },
}

/// What the protocol backends report. Classified once in [`BackendError::is_rejection`].
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("upstream refused the credentials: {0}")]
    Rejected(String),
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream offers no usable authentication mechanism")]
    NoMechanism,
}

impl BackendError {
    pub fn is_rejection(&self) -> bool {
        matches!(self, BackendError::Rejected(_))
    }
}

/// Why a login failed, as the client will be told. One reply per protocol for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("wrong credentials or account refused")]
    BadCredentials,
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
            LoginError::TokenUnavailable => "token_unavailable",
            LoginError::UpstreamRejected => "upstream_rejected",
            LoginError::UpstreamUnavailable => "upstream_unavailable",
        }
    }

    /// Whether the client should be told to try later rather than that it was refused.
    pub fn is_temporary(self) -> bool {
        matches!(
            self,
            LoginError::TokenUnavailable | LoginError::UpstreamUnavailable
        )
    }
}

/// A login as a front end hands it over.
#[derive(Debug)]
pub struct LoginRequest {
    pub credentials: Credentials,
    /// SMTP: the client's EHLO/HELO argument, repeated upstream. IMAP: `None`.
    pub helo: Option<String>,
}

/// The one thing front ends need from the rest of mailgate.
pub trait Authenticator: Send + Sync {
    /// Checks the client's credentials, obtains a token and logs in upstream.
    fn login(
        &self,
        request: LoginRequest,
    ) -> impl Future<Output = Result<Upstream, LoginError>> + Send;

    /// SMTP: the upstream's EHLO extension lines (`SIZE 35882577`, `8BITMIME`, ...) as last
    /// seen, probing the upstream if they are not known yet. Empty when unknown.
    fn smtp_extensions(&self) -> impl Future<Output = Vec<String>> + Send;
}

/// Limits and names a front end works with before authentication.
#[derive(Debug, Clone)]
pub struct FrontendSettings {
    /// Shown in greetings.
    pub hostname: String,
    /// Closes the session when the client sends nothing for this long before authenticating.
    pub pre_auth_timeout: Duration,
}

/// A session that authenticated: the client stream (replaying whatever it pipelined after the
/// login command) and the upstream, ready to splice.
pub struct Handoff<S> {
    pub client: PrefixedIo<S>,
    pub upstream: Upstream,
    pub account: String,
}
