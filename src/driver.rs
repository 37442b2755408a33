//! The login driver, the same for every protocol: client credentials -> brute-force check ->
//! password check -> token -> upstream login (with one retry on a refused token) -> an
//! authenticated upstream.
//!
//! Front ends talk to it through [`Authenticator`], so their transcript tests can run over
//! in-memory streams with a stand-in.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::backends::{Backends, Lease, Pool, RouteError};
use crate::client_auth::throttle::Throttle;
use crate::client_auth::{Accepted, Attempt, ClientAuth};
use crate::forward::Origin;
use crate::frontend::{MailProtocol, OnBehalf};
use crate::login::{BackendError, LoginError, LoginRequest, Upstream, UpstreamAuth};
use crate::metrics::Metrics;
use crate::sanitize::Escaped;
use crate::token::cache::{Cached, TokenCache};
use crate::token::oauth2::OAuth2;
use crate::token::{TokenError, TokenKey};

/// How long the background probe of what an upstream advertises may take.
const CAPABILITY_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a failed probe the next session may start another.
const CAPABILITY_PROBE_RETRY: Duration = Duration::from_secs(60);

/// What every listener shares.
pub struct Shared {
    pub tokens: Arc<TokenCache>,
    /// mailgate's own OAuth2 accounts, when configured.
    pub oauth2: Option<Arc<OAuth2>>,
    pub client_auth: Arc<ClientAuth>,
    pub throttle: Arc<Throttle>,
    pub metrics: Arc<Metrics>,
    pub backends: Arc<Backends>,
}

/// The logins of one listener: its protocol and pool of servers, the shared token cache and
/// client check.
pub struct LoginDriver {
    pub listener: String,
    pub protocol: &'static dyn MailProtocol,
    pub pool: Arc<Pool>,
    login_timeout: Duration,
    tokens: Arc<TokenCache>,
    client_auth: Arc<ClientAuth>,
    throttle: Arc<Throttle>,
    metrics: Arc<Metrics>,
    /// Name mailgate gives in EHLO when probing an SMTP upstream.
    hostname: String,
    capabilities: Arc<Mutex<Probe>>,
}

/// What is known of what the upstream advertises (SMTP's EHLO extensions, ManageSieve's
/// capabilities).
enum Probe {
    Unknown,
    Running,
    Known(Vec<String>),
    Failed(Instant),
}

impl LoginDriver {
    /// For a protocol that relays what its upstream advertises, starts reading it in the
    /// background.
    pub fn new(
        listener: String,
        protocol: &'static dyn MailProtocol,
        pool: Arc<Pool>,
        login_timeout: Duration,
        shared: &Shared,
        hostname: String,
    ) -> Self {
        let driver = Self {
            listener,
            protocol,
            pool,
            login_timeout,
            tokens: shared.tokens.clone(),
            client_auth: shared.client_auth.clone(),
            throttle: shared.throttle.clone(),
            metrics: shared.metrics.clone(),
            hostname,
            capabilities: Arc::new(Mutex::new(Probe::Unknown)),
        };
        driver.upstream_capabilities();
        driver
    }

    /// Every step of a login but the bookkeeping around it: the throttle's wait, then the
    /// password check, token and upstream login within one `login_timeout`.
    async fn authenticate(&self, request: &LoginRequest) -> Result<Placed, LoginError> {
        let client = request.client.map(|address| address.ip());
        let wait = self
            .throttle
            .check(client, &request.credentials.account)
            .await
            .map_err(|scope| {
                tracing::warn!(
                    scope = scope.label(),
                    "login refused without a check: too many failed logins"
                );
                LoginError::Throttled
            })?;
        if !wait.is_zero() {
            self.metrics.failure_delay(wait);
            tokio::time::sleep(wait).await;
        }
        let deadline = Instant::now() + self.login_timeout;
        let accepted = tokio::time::timeout_at(deadline, self.check_client(request))
            .await
            .unwrap_or_else(|_| Err(self.timed_out(LoginError::CheckUnavailable)))?;
        tokio::time::timeout_at(deadline, self.token_and_upstream(request, accepted))
            .await
            .unwrap_or_else(|_| Err(self.timed_out(LoginError::UpstreamUnavailable)))
    }

    /// Logs a login that `login_timeout` ended; `error` names the step it was in.
    fn timed_out(&self, error: LoginError) -> LoginError {
        tracing::warn!(
            timeout_ms = u64::try_from(self.login_timeout.as_millis()).unwrap_or(u64::MAX),
            step = error.label(),
            "login did not finish within login_timeout"
        );
        error
    }

    /// The client's password checked: accepted, and where the session's token comes from.
    async fn check_client(&self, request: &LoginRequest) -> Result<Accepted, LoginError> {
        let attempt = Attempt {
            credentials: &request.credentials,
            client: request.client.map(|address| address.ip()),
            protocol: self.protocol.name(),
        };
        self.client_auth
            .verify(&attempt, &self.throttle, &self.tokens)
            .await
            .map_err(|error| {
                let login_error = error.login_error();
                if login_error != LoginError::BadCredentials {
                    tracing::warn!(%error, "password not checked");
                }
                login_error
            })
    }

    /// Gets a token and logs in upstream; a refused token may have been revoked early, so it
    /// is dropped and the login is tried once more with a fresh one.
    async fn token_and_upstream(
        &self,
        request: &LoginRequest,
        accepted: Accepted,
    ) -> Result<Placed, LoginError> {
        let (key, token) = self.token(accepted.clone()).await?;
        match self.upstream_login(&key.account, &token, request).await {
            Ok(placed) => return Ok(placed),
            Err(Failure::Backend(error)) if error.is_rejection() => {
                tracing::info!(%error, "token refused upstream; fetching a new one");
                self.tokens.invalidate(&key, &token).await;
            }
            Err(failure) => return Err(failure.into_login_error()),
        }
        let accepted = match accepted {
            // Only the client's password gets another token: a fresh grant, checked again.
            Accepted::Granted(..) => self.check_client(request).await?,
            account @ Accepted::Account(_) => account,
        };
        let (key, token) = self.token(accepted).await?;
        match self.upstream_login(&key.account, &token, request).await {
            Ok(placed) => Ok(placed),
            Err(Failure::Backend(error)) if error.is_rejection() => {
                tracing::warn!(%error, "upstream login refused");
                self.tokens.invalidate(&key, &token).await;
                Err(LoginError::UpstreamRejected)
            }
            Err(failure) => Err(failure.into_login_error()),
        }
    }

    /// The session's token: the one the password grant got, or one from the token sources.
    async fn token(&self, accepted: Accepted) -> Result<(TokenKey, Arc<Cached>), LoginError> {
        let account = match accepted {
            Accepted::Granted(key, token) => return Ok((key, token)),
            Accepted::Account(account) => account,
        };
        self.tokens
            .get(&account, self.protocol.name())
            .await
            .map_err(|error| {
                tracing::warn!(account = %Escaped(&account), %error, "no token");
                match error {
                    TokenError::Refused => LoginError::BadCredentials,
                    TokenError::NeedsReauthorization => LoginError::NeedsReauthorization,
                    TokenError::Misconfigured(_) => LoginError::Misconfigured,
                    TokenError::Unavailable(_) => LoginError::TokenUnavailable,
                }
            })
    }

    /// Routes `account` to its server and logs in there; a server that cannot be reached
    /// counts against its health, and the login goes to the account's next choice once.
    async fn upstream_login(
        &self,
        account: &str,
        token: &Cached,
        request: &LoginRequest,
    ) -> Result<Placed, Failure> {
        let named = token.token.server.as_ref();
        let mut unreachable = Vec::new();
        loop {
            let avoid: Vec<&str> = unreachable.iter().map(String::as_str).collect();
            let lease = self
                .pool
                .route(account, named, &avoid)
                .await
                .map_err(Failure::Route)?;
            let server = lease.server().clone();
            let outcome = self
                .log_in_on(&server.connector, &token.token.auth, request)
                .await;
            self.metrics.backend_login(
                &self.listener,
                &server.name,
                match &outcome {
                    Ok(_) => "ok",
                    Err(error) if error.is_rejection() => LoginError::UpstreamRejected.label(),
                    Err(_) => LoginError::UpstreamUnavailable.label(),
                },
            );
            match outcome {
                Ok(upstream) => {
                    return Ok(Placed {
                        upstream,
                        account: account.to_owned(),
                        lease,
                    });
                }
                Err(BackendError::Io(error)) if self.pool.is_pool() && unreachable.is_empty() => {
                    tracing::warn!(server = %server.name, %error, "backend unreachable; trying the account's next choice");
                    self.pool.connect_failed(&server, &error);
                    unreachable.push(server.name.clone());
                }
                Err(error) => return Err(Failure::Backend(error)),
            }
        }
    }

    async fn log_in_on(
        &self,
        connector: &crate::upstream::Connector,
        auth: &UpstreamAuth,
        request: &LoginRequest,
    ) -> Result<Upstream, BackendError> {
        let started = Instant::now();
        let origin = Origin::new(request.client, request.local);
        let origin = origin.as_ref();
        let on_behalf = OnBehalf {
            helo: request.helo.as_deref().unwrap_or(&self.hostname),
            origin,
        };
        let outcome = self
            .protocol
            .log_in_upstream(connector, auth, on_behalf)
            .await;
        self.metrics
            .upstream_auth_seconds
            .get_or_create(&connector.labels())
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Starts a probe of what the upstream advertises in the background.
    fn start_probe(&self) {
        let protocol = self.protocol;
        let connector = self.pool.any_connector().clone();
        let hostname = self.hostname.clone();
        let capabilities = self.capabilities.clone();
        tokio::spawn(async move {
            let Some(probe) = protocol.probe(&connector, &hostname) else {
                // Nothing to relay: known to be nothing.
                *capabilities.lock().unwrap_or_else(|e| e.into_inner()) = Probe::Known(Vec::new());
                return;
            };
            let outcome = match tokio::time::timeout(CAPABILITY_PROBE_TIMEOUT, probe).await {
                Ok(Ok(found)) => Probe::Known(found),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "cannot read what the upstream advertises");
                    Probe::Failed(Instant::now())
                }
                Err(_) => {
                    tracing::warn!("what the upstream advertises did not arrive in time");
                    Probe::Failed(Instant::now())
                }
            };
            *capabilities.lock().unwrap_or_else(|e| e.into_inner()) = outcome;
        });
    }
}

/// Why an upstream login failed: at the server, or before one was found.
enum Failure {
    Backend(BackendError),
    Route(RouteError),
}

impl Failure {
    fn into_login_error(self) -> LoginError {
        match self {
            Failure::Backend(error) => {
                tracing::warn!(%error, "upstream login failed");
                LoginError::UpstreamUnavailable
            }
            Failure::Route(error @ RouteError::OutsidePool(_)) => {
                tracing::warn!(%error, "login refused: the token source may not send it there");
                LoginError::Misconfigured
            }
            Failure::Route(error) => {
                tracing::warn!(%error, "no server for the login");
                LoginError::UpstreamUnavailable
            }
        }
    }
}

/// A login done: the upstream, the account whose token logged in (it differs from the user
/// name the client gave when a password check maps one to the other), and its place on its
/// server, held for the session.
pub struct Placed {
    pub upstream: Upstream,
    pub account: String,
    pub lease: Lease,
}

impl LoginDriver {
    /// Logs `request` in, with the bookkeeping around it: metrics and the throttle's counts.
    ///
    /// # Errors
    /// The login failed; the front end answers the client as the error says.
    pub async fn login(&self, request: LoginRequest) -> Result<Placed, LoginError> {
        let result = self.authenticate(&request).await;
        let label = result.as_ref().map_or_else(|error| error.label(), |_| "ok");
        self.metrics.login(&self.listener, label);
        let client = request.client.map(|address| address.ip());
        let account = &request.credentials.account;
        match &result {
            Ok(_) => self.throttle.succeeded(client, account).await,
            // Guessing costs the next try its wait (see `authenticate`); other failures are
            // not the client's doing.
            Err(LoginError::BadCredentials) => {
                self.throttle
                    .wrong_password(client, &request.credentials)
                    .await;
            }
            Err(LoginError::Throttled) => {
                let delay = self.throttle.blocked_delay();
                tokio::time::sleep(delay).await;
            }
            Err(_) => {}
        }
        result
    }

    /// What the upstream advertises, as far as known yet: the first call starts a probe.
    pub fn upstream_capabilities(&self) -> Vec<String> {
        let mut probe = self.capabilities.lock().unwrap_or_else(|e| e.into_inner());
        match &*probe {
            Probe::Known(capabilities) => return capabilities.clone(),
            Probe::Running => return Vec::new(),
            Probe::Failed(at) if at.elapsed() < CAPABILITY_PROBE_RETRY => return Vec::new(),
            Probe::Unknown | Probe::Failed(_) => {}
        }
        *probe = Probe::Running;
        drop(probe);
        self.start_probe();
        Vec::new()
    }
}
