//! The protocol-independent driver: client credentials -> account check -> token -> upstream
//! login (with one retry on a refused token) -> an authenticated upstream stream.
//!
//! Front ends talk to it through the [`Authenticator`] trait, so their transcript tests can
//! run over in-memory streams with a stand-in.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::client_auth::ClientAuth;
use crate::config::Protocol;
use crate::io::{BoxedIo, PrefixedIo};
use crate::metrics::Metrics;
use crate::sasl::Credentials;
use crate::secret::Secret;
use crate::token::cache::TokenCache;
use crate::token::{TokenError, TokenKey};
use crate::upstream::Connector;
use crate::{imap, smtp};

/// How long a refused client waits for its answer.
pub const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);

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

/// The [`Authenticator`] of one listener: its upstream, the shared token cache and client check.
pub struct ListenerProxy {
    pub listener: String,
    pub protocol: Protocol,
    pub connector: Connector,
    pub tokens: Arc<TokenCache>,
    pub client_auth: Arc<ClientAuth>,
    pub metrics: Arc<Metrics>,
    /// Name mailgate gives in EHLO when probing the upstream's extensions.
    pub hostname: String,
    smtp_extensions: tokio::sync::Mutex<Option<Vec<String>>>,
}

impl ListenerProxy {
    pub fn new(
        listener: String,
        protocol: Protocol,
        connector: Connector,
        shared: &Shared,
        hostname: String,
    ) -> Self {
        Self {
            listener,
            protocol,
            connector,
            tokens: shared.tokens.clone(),
            client_auth: shared.client_auth.clone(),
            metrics: shared.metrics.clone(),
            hostname,
            smtp_extensions: tokio::sync::Mutex::new(None),
        }
    }

    async fn authenticate(&self, request: &LoginRequest) -> Result<Upstream, LoginError> {
        if !self.client_auth.verify(&request.credentials).await {
            return Err(LoginError::BadCredentials);
        }
        let key = TokenKey {
            account: request.credentials.account.clone(),
            protocol: self.protocol,
        };
        // A refused token may have been revoked early: drop it, fetch once more, retry once.
        for attempt in 0..2 {
            let token = self.tokens.get(&key).await.map_err(|error| {
                tracing::warn!(%error, "no token");
                match error {
                    TokenError::Refused => LoginError::BadCredentials,
                    TokenError::Unavailable(_) => LoginError::TokenUnavailable,
                }
            })?;
            match self
                .upstream_login(&token.auth, request.helo.as_deref())
                .await
            {
                Ok(upstream) => return Ok(upstream),
                Err(error) if error.is_rejection() && attempt == 0 => {
                    tracing::info!(%error, "token refused upstream; fetching a new one");
                    self.tokens.invalidate(&key).await;
                }
                Err(error) if error.is_rejection() => {
                    tracing::warn!(%error, "upstream login refused");
                    return Err(LoginError::UpstreamRejected);
                }
                Err(error) => {
                    tracing::warn!(%error, "upstream login failed");
                    return Err(LoginError::UpstreamUnavailable);
                }
            }
        }
        Err(LoginError::UpstreamRejected)
    }

    async fn upstream_login(
        &self,
        auth: &UpstreamAuth,
        helo: Option<&str>,
    ) -> Result<Upstream, BackendError> {
        let started = tokio::time::Instant::now();
        let outcome = match self.protocol {
            Protocol::Imap => imap::backend::login(&self.connector, auth).await,
            Protocol::Smtp => {
                let helo = helo.unwrap_or(&self.hostname);
                smtp::backend::login(&self.connector, auth, helo).await
            }
        };
        self.metrics
            .upstream_auth_seconds
            .get_or_create(&self.connector.labels())
            .observe(started.elapsed().as_secs_f64());
        outcome
    }
}

impl Authenticator for ListenerProxy {
    async fn login(&self, request: LoginRequest) -> Result<Upstream, LoginError> {
        let result = self.authenticate(&request).await;
        let label = result.as_ref().map_or_else(|error| error.label(), |_| "ok");
        self.metrics.login(&self.listener, label);
        if result
            .as_ref()
            .is_err_and(|error| *error == LoginError::BadCredentials)
        {
            // Guessing passwords costs time; the front ends also close after a few failures.
            tokio::time::sleep(FAILED_LOGIN_DELAY).await;
        }
        result
    }

    async fn smtp_extensions(&self) -> Vec<String> {
        // Held across the probe so that concurrent first EHLOs cause one probe.
        let mut known = self.smtp_extensions.lock().await;
        if let Some(extensions) = known.as_ref() {
            return extensions.clone();
        }
        match smtp::backend::probe_extensions(&self.connector, &self.hostname).await {
            Ok(extensions) => known.insert(extensions).clone(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the upstream's SMTP extensions");
                Vec::new()
            }
        }
    }
}

/// What every listener shares.
pub struct Shared {
    pub tokens: Arc<TokenCache>,
    pub client_auth: Arc<ClientAuth>,
    pub metrics: Arc<Metrics>,
}
