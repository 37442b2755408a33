//! [`OAuthProvider`], a small local OAuth2 authorization server for the end-to-end tests, so
//! that mailgate's own OAuth2 client talks real HTTP to a real grant implementation and the
//! access tokens it gets are accepted by the test Dovecot (every one is registered at the
//! test's [`Introspection`]).
//!
//! Endpoints, on `http://127.0.0.1:PORT`:
//! - `POST /token` (RFC 6749 section 3.2): grants `client_credentials`, `refresh_token` (with
//!   rotation), `authorization_code` (PKCE S256 only, RFC 7636), `password`,
//!   `urn:ietf:params:oauth:grant-type:jwt-bearer` (RFC 7523 section 2.1, Google service
//!   accounts) and `urn:ietf:params:oauth:grant-type:device_code` (RFC 8628); client
//!   authentication `client_secret_post`, `client_secret_basic` or an RS256 client assertion
//!   (RFC 7523 section 2.2, Microsoft's certificate credentials).
//! - `GET|POST /authorize`: a plain HTML consent page (no JavaScript) and its form.
//! - `POST /devicecode` and `GET|POST /device`: RFC 8628 device authorization and its page.
//! - `POST /introspect`: RFC 7662, the same answer as [`Introspection`].
//!
//! # Layout
//! - `server`: accept loop and request/reply plumbing.
//! - `state`: the books (clients, tokens, codes, log), the form parser and the error shape.
//! - `token`: the token endpoint (hold, delay, failures, log, dispatch) and introspection.
//! - `client_auth`: secrets, client assertions and public clients.
//! - `grants`: every grant but the device grant.
//! - `authorize`: the authorization endpoint and consent page.
//! - `device`: device authorization and its verification page.
//! - `crypto`: RS256 JWTs, DER, thumbprints, PKCE, random tokens.
//! - `keys`: [`TestKeys`], RSA keys, certificates and service-account files made by openssl.

mod authorize;
mod client_auth;
mod crypto;
mod device;
mod grants;
mod keys;
mod server;
mod state;
mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::http::{Introspection, ServerTask};
use server::{HttpReply, HttpRequest};
use state::{Client, ClientKey, RefreshStatus, Shared, State};

pub use authorize::hidden_fields;
pub use crypto::{pkce_s256, sign_jwt_rs256, unix_now, x5t_s256};
pub use keys::{TestKeys, pem_to_der};

pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
pub const GRANT_REFRESH_TOKEN: &str = "refresh_token";
pub const GRANT_AUTHORIZATION_CODE: &str = "authorization_code";
pub const GRANT_PASSWORD: &str = "password";
/// RFC 7523 section 2.1.
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 8628 section 3.4.
pub const GRANT_DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 7523 section 2.2: the `client_assertion_type` of a JWT client assertion.
pub const CLIENT_ASSERTION_TYPE_JWT: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How often expired access tokens are removed from the [`Introspection`].
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCredential {
    /// `client_secret_post` or `client_secret_basic` with this secret.
    Secret(String),
    /// `private_key_jwt`: an RS256 client assertion signed by this certificate's RSA key,
    /// naming it in `x5t#S256`.
    Certificate { cert_der: Vec<u8> },
    /// A public client (RFC 6749 section 2.1): only `client_id`, no secret.
    Public,
}

/// What a token request presented to authenticate its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuthMethod {
    /// `client_id` and `client_secret` in the form.
    Post,
    /// `Authorization: Basic`.
    Basic,
    /// `client_assertion_type` and `client_assertion`.
    Assertion,
    /// Nothing but (perhaps) a `client_id`.
    None,
    /// More than one method at once (answered `invalid_request`).
    Several,
}

impl ClientAuthMethod {
    /// `post`, `basic`, `assertion`, `none` or `several`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMethod::Post => "post",
            ClientAuthMethod::Basic => "basic",
            ClientAuthMethod::Assertion => "assertion",
            ClientAuthMethod::None => "none",
            ClientAuthMethod::Several => "several",
        }
    }
}

/// One token request as the provider saw it, logged when it was answered or abandoned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequestRecord {
    /// The `grant_type` parameter (empty when missing).
    pub grant_type: String,
    /// The client id as presented (Basic user, form `client_id`, or the assertion's `iss`).
    pub client_id: Option<String>,
    pub client_auth: ClientAuthMethod,
    /// The `refresh_token` parameter, if any.
    pub refresh_token: Option<String>,
    /// The `scope` parameter, or for a JWT bearer grant the assertion's `scope` claim.
    pub scope: Option<String>,
    /// `ok`, the error code answered (e.g. `invalid_grant`, or an injected one), or
    /// `abandoned` when the client went away before the answer was produced.
    pub result: String,
    /// For whom an access token was issued (`ok` only).
    pub user: Option<String>,
    /// The access token issued (`ok` only).
    pub access_token: Option<String>,
}

/// While alive, token requests are accepted but not answered; see [`OAuthProvider::hold`].
#[must_use = "the hold ends when the guard is dropped"]
pub struct HoldGuard {
    shared: Arc<Shared>,
}

impl HoldGuard {
    /// Ends the hold (same as dropping the guard): waiting requests are answered now.
    pub fn release(self) {}
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        self.shared.holds.send_modify(|n| *n -= 1);
    }
}

/// A local OAuth2 provider on 127.0.0.1 (see the module doc). Cheap to clone; the server
/// stops when the last clone is dropped. Every wait inside it is bounded.
#[derive(Clone)]
pub struct OAuthProvider {
    shared: Arc<Shared>,
    _tasks: Arc<[ServerTask; 2]>,
}

impl OAuthProvider {
    /// Starts the provider. Access tokens it issues are registered at `introspection` (and
    /// removed there when they expire or are revoked).
    pub async fn start(introspection: &Introspection) -> OAuthProvider {
        let listener = server::bind().await;
        let shared = Arc::new(Shared {
            addr: listener.local_addr().expect("local_addr"),
            introspection: introspection.clone(),
            state: std::sync::Mutex::new(State::default()),
            holds: watch::Sender::new(0),
            held: AtomicUsize::new(0),
        });
        let handler_shared = shared.clone();
        let handler: server::Handler = Arc::new(move |req| {
            let shared = handler_shared.clone();
            Box::pin(async move { route(shared, req).await })
        });
        let server = server::serve(listener, handler);
        let sweeper_shared = shared.clone();
        let sweeper = ServerTask(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                sweeper_shared.sweep_expired();
            }
        }));
        OAuthProvider {
            shared,
            _tasks: Arc::new([server, sweeper]),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// `http://127.0.0.1:PORT/token`: the token endpoint, and the `aud` assertions must name.
    pub fn token_url(&self) -> String {
        self.shared.token_url()
    }

    /// `http://127.0.0.1:PORT/authorize`
    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.base_url())
    }

    /// `http://127.0.0.1:PORT/devicecode`: the device authorization endpoint a client posts to.
    pub fn device_url(&self) -> String {
        format!("{}/devicecode", self.base_url())
    }

    /// `http://127.0.0.1:PORT/device`: the `verification_uri` a user opens.
    pub fn verification_url(&self) -> String {
        format!("{}/device", self.base_url())
    }

    /// `http://127.0.0.1:PORT/introspect` (RFC 7662; a Dovecot may point here directly).
    pub fn introspection_url(&self) -> String {
        format!("{}/introspect", self.base_url())
    }

    pub fn introspection(&self) -> &Introspection {
        &self.shared.introspection
    }

    // --- registration -----------------------------------------------------------------------

    /// Registers (or replaces) client `id`; every grant type allowed, no mailbox, no redirect
    /// URIs.
    ///
    /// # Panics
    /// When a certificate is not an X.509 certificate with an RSA key.
    pub fn add_client(&self, id: &str, credential: ClientCredential) {
        let key = match credential {
            ClientCredential::Secret(secret) => {
                super::secrets::remember("OAuth client secret", &secret);
                ClientKey::Secret(secret)
            }
            ClientCredential::Certificate { cert_der } => ClientKey::Certificate {
                thumbprint: x5t_s256(&cert_der),
                public_key: crypto::rsa_public_key(&cert_der)
                    .unwrap_or_else(|e| panic!("client {id}: certificate: {e}")),
            },
            ClientCredential::Public => ClientKey::Public,
        };
        self.shared.lock().clients.insert(
            id.to_owned(),
            Client {
                key,
                allowed_grants: None,
                mailbox: None,
                redirect_uris: Vec::new(),
            },
        );
    }

    /// Limits client `id` to these grant types (others: `unauthorized_client`).
    pub fn set_allowed_grants(&self, id: &str, grants: &[&str]) {
        self.with_client(id, |c| {
            c.allowed_grants = Some(grants.iter().map(|g| (*g).to_owned()).collect());
        });
    }

    /// The user an app-only (`client_credentials`) token of client `id` is for; without one
    /// such tokens are for the client id itself.
    pub fn set_mailbox(&self, id: &str, mailbox: &str) {
        self.with_client(id, |c| c.mailbox = Some(mailbox.to_owned()));
    }

    /// Registers a redirect URI for client `id` (compared exactly, RFC 6749 section 3.1.2).
    ///
    /// # Panics
    /// When `uri` is not absolute or has a fragment (RFC 6749 section 3.1.2 forbids both).
    pub fn add_redirect_uri(&self, id: &str, uri: &str) {
        let parsed = url::Url::parse(uri).unwrap_or_else(|e| panic!("redirect URI {uri}: {e}"));
        assert!(
            parsed.fragment().is_none(),
            "redirect URI {uri} has a fragment"
        );
        self.with_client(id, |c| c.redirect_uris.push(uri.to_owned()));
    }

    /// Registers a Google-style service account `email` (the assertions' `iss`) with its
    /// public key, as SubjectPublicKeyInfo DER or certificate DER.
    ///
    /// # Panics
    /// When the key is not an RSA key in either form.
    pub fn add_service_account(&self, email: &str, public_key_der: &[u8]) {
        let key = crypto::rsa_public_key(public_key_der)
            .unwrap_or_else(|e| panic!("service account {email}: public key: {e}"));
        self.shared
            .lock()
            .service_accounts
            .insert(email.to_owned(), key);
    }

    /// Registers a user for the password grant and the login form on the consent pages.
    pub fn add_user(&self, user: &str, password: &str) {
        super::secrets::remember("OAuth user password", password);
        self.shared
            .lock()
            .users
            .insert(user.to_owned(), password.to_owned());
    }

    /// Consent pages act as signed in as `user` (no login form); approving grants for `user`.
    pub fn set_consenting_user(&self, user: &str) {
        self.shared.lock().consenting_user = Some(user.to_owned());
    }

    fn with_client(&self, id: &str, change: impl FnOnce(&mut Client)) {
        let mut st = self.shared.lock();
        let client = st
            .clients
            .get_mut(id)
            .unwrap_or_else(|| panic!("client {id} is not registered"));
        change(client);
    }

    // --- controls ---------------------------------------------------------------------------

    /// Lifetime of access tokens issued from now on (`expires_in`, whole seconds; default
    /// 3600 s). They stop working here and at the [`Introspection`] when it ends.
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.shared.lock().settings.access_lifetime = lifetime;
    }

    /// Lifetime of authorization codes issued from now on (default 60 s).
    pub fn set_code_lifetime(&self, lifetime: Duration) {
        self.shared.lock().settings.code_lifetime = lifetime;
    }

    /// Whether a refresh-token grant issues a new refresh token and invalidates the presented
    /// one (default true). Without rotation the answer carries no `refresh_token` and the
    /// presented one stays valid.
    pub fn set_rotation(&self, rotation: bool) {
        self.shared.lock().settings.rotation = rotation;
    }

    /// The `interval` of device codes issued from now on, in seconds (default 5).
    pub fn set_device_interval(&self, secs: u64) {
        self.shared.lock().settings.device_interval_secs = secs;
    }

    /// The lifetime (`expires_in`, whole seconds) of device codes issued from now on
    /// (default 900 s).
    pub fn set_device_code_lifetime(&self, lifetime: Duration) {
        self.shared.lock().settings.device_lifetime = lifetime;
    }

    /// Seeds a refresh token as if `user` had consented to `client_id` earlier.
    ///
    /// # Panics
    /// When the client is not registered.
    pub fn issue_refresh_token(&self, client_id: &str, user: &str, scope: &str) -> String {
        let mut st = self.shared.lock();
        assert!(
            st.clients.contains_key(client_id),
            "client {client_id} is not registered"
        );
        let grant = st.new_grant();
        let scope = Some(scope).filter(|s| !s.is_empty());
        self.shared
            .issue_refresh(&mut st, user, client_id, scope, grant)
    }

    /// Revokes every refresh token of `user` (later grants: `invalid_grant`); how many were
    /// valid.
    pub fn revoke_refresh_tokens(&self, user: &str) -> usize {
        let mut st = self.shared.lock();
        let mut n = 0;
        for refresh in st.refresh_tokens.values_mut() {
            if refresh.user == user && refresh.status == RefreshStatus::Active {
                refresh.status = RefreshStatus::Revoked;
                n += 1;
            }
        }
        n
    }

    /// Revokes every access token issued to `user` (here and at the [`Introspection`]);
    /// refresh tokens stay valid. How many were valid.
    pub fn revoke_user(&self, user: &str) -> usize {
        let mut st = self.shared.lock();
        let mut n = 0;
        for (token, access) in st.access_tokens.iter_mut() {
            if access.user == user && !access.revoked {
                access.revoked = true;
                self.shared.introspection.revoke(token);
                n += 1;
            }
        }
        n
    }

    /// Revokes one access or refresh token; whether it was valid.
    pub fn revoke_token(&self, token: &str) -> bool {
        let mut st = self.shared.lock();
        if let Some(access) = st.access_tokens.get_mut(token) {
            let was = !access.revoked;
            access.revoked = true;
            self.shared.introspection.revoke(token);
            return was;
        }
        match st.refresh_tokens.get_mut(token) {
            Some(refresh) if refresh.status == RefreshStatus::Active => {
                refresh.status = RefreshStatus::Revoked;
                true
            }
            _ => false,
        }
    }

    /// The next `n` token requests answer `status` with `{"error": error_code}` and change
    /// nothing (e.g. `(1, 500, "server_error")`, `(2, 400, "temporarily_unavailable")`).
    pub fn fail_next(&self, n: usize, status: u16, error_code: &str) {
        self.shared.lock().settings.fail_next = (n > 0).then(|| (n, status, error_code.to_owned()));
    }

    /// Every token request waits `delay` before it is processed (`Duration::ZERO`: none).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().settings.delay = delay;
    }

    /// Makes a rotated refresh token presented again revoke its whole family, as RFC 9700
    /// section 4.14.2 asks of providers that rotate.
    pub fn set_reuse_detection(&self, on: bool) {
        self.shared.lock().settings.reuse_detection = on;
    }

    /// How many times a rotated refresh token was presented again.
    pub fn reuses_detected(&self) -> usize {
        self.shared.lock().reuses_detected
    }

    /// Holds token requests until the guard is dropped: they are read but neither processed
    /// nor answered. A held request whose client disconnects is abandoned: nothing is issued,
    /// rotated or consumed, and it is logged with result `abandoned`. A request held longer
    /// than two minutes is answered 503 `temporarily_unavailable`.
    pub fn hold(&self) -> HoldGuard {
        self.shared.holds.send_modify(|n| *n += 1);
        HoldGuard {
            shared: self.shared.clone(),
        }
    }

    /// Like [`OAuthProvider::hold`], but the requests are processed first: tokens are issued,
    /// rotated and consumed, the request is logged, and only the answer waits. A client that
    /// disconnects meanwhile has lost what the provider committed, as with a real provider
    /// whose answer never arrived.
    pub fn hold_answers(&self) -> HoldGuard {
        self.shared.lock().settings.hold_answers = true;
        self.hold()
    }

    /// How many token requests are waiting on a hold right now.
    pub fn held_requests(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Approves the pending device grant with `user_code` (any case, dash optional) for
    /// `user`; whether there was one.
    pub fn approve_device(&self, user_code: &str, user: &str) -> bool {
        device::decide_for(&self.shared, user_code, Some(user))
    }

    /// Denies the pending device grant with `user_code`; whether there was one.
    pub fn deny_device(&self, user_code: &str) -> bool {
        device::decide_for(&self.shared, user_code, None)
    }

    /// User codes (`XXXX-XXXX`) of unexpired device grants not yet approved or denied (in no
    /// particular order); for tests that cannot read the code from the client.
    pub fn pending_user_codes(&self) -> Vec<String> {
        device::pending_user_codes(&self.shared)
    }

    // --- inspection -------------------------------------------------------------------------

    /// Device codes handed out by `POST /devicecode` so far.
    pub fn device_codes_issued(&self) -> usize {
        self.shared.lock().devices.len()
    }

    /// Device codes polled at the token endpoint since `since`: the clients still polling.
    pub fn device_codes_polled_since(&self, since: tokio::time::Instant) -> usize {
        self.shared
            .lock()
            .devices
            .values()
            .filter(|device| device.last_poll.is_some_and(|last| last >= since))
            .count()
    }

    /// Every token request answered or abandoned so far, in that order.
    pub fn token_requests(&self) -> Vec<TokenRequestRecord> {
        self.shared.lock().records.clone()
    }

    /// How many token requests with this `grant_type` were logged (whatever their result).
    pub fn count(&self, grant_type: &str) -> usize {
        self.shared
            .lock()
            .records
            .iter()
            .filter(|r| r.grant_type == grant_type)
            .count()
    }

    /// How many token requests with this `grant_type` were answered with tokens.
    pub fn count_ok(&self, grant_type: &str) -> usize {
        self.shared
            .lock()
            .records
            .iter()
            .filter(|r| r.grant_type == grant_type && r.result == "ok")
            .count()
    }

    /// The newest valid refresh token of `user` at `client_id`.
    pub fn current_refresh_token(&self, user: &str, client_id: &str) -> Option<String> {
        let st = self.shared.lock();
        st.refresh_tokens
            .iter()
            .filter(|(_, r)| {
                r.user == user && r.client_id == client_id && r.status == RefreshStatus::Active
            })
            .max_by_key(|(_, r)| r.seq)
            .map(|(token, _)| token.clone())
    }

    /// Every refresh token issued to `user` (rotated and revoked included).
    pub fn refresh_tokens_issued(&self, user: &str) -> Vec<String> {
        let st = self.shared.lock();
        st.refresh_tokens
            .iter()
            .filter(|(_, r)| r.user == user)
            .map(|(token, _)| token.clone())
            .collect()
    }

    /// Revokes the grant family `token` (a refresh token, rotated or not) belongs to: every
    /// token that descends from the same consent. Whether there was one.
    pub fn revoke_family(&self, token: &str) -> bool {
        let mut st = self.shared.lock();
        let Some(grant) = st.refresh_tokens.get(token).map(|r| r.grant) else {
            return false;
        };
        self.shared.revoke_grant(&mut st, grant);
        true
    }

    /// Every access token issued to `user`, in issue order (expired and revoked included).
    pub fn access_tokens_issued(&self, user: &str) -> Vec<String> {
        self.shared
            .lock()
            .issued
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Whether `token` is an unexpired, unrevoked access token of this provider.
    pub fn is_active(&self, token: &str) -> bool {
        token::active_access(&self.shared.lock(), token).is_some()
    }
}

async fn route(shared: Arc<Shared>, req: HttpRequest) -> HttpReply {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/token") => token::endpoint(&shared, req).await,
        ("POST", "/introspect") => token::introspect(&shared, &req),
        ("GET", "/authorize") => authorize::show(&shared, &req),
        ("POST", "/authorize") => authorize::decide(&shared, &req),
        ("POST", "/devicecode") => device::authorize(&shared, &req),
        ("GET", "/device") => device::show(&shared, &req),
        ("POST", "/device") => device::decide(&shared, &req),
        (_, "/token" | "/introspect" | "/devicecode") => {
            HttpReply::text(405, "method not allowed").with_header("allow", "POST")
        }
        (_, "/authorize" | "/device") => {
            HttpReply::text(405, "method not allowed").with_header("allow", "GET, POST")
        }
        _ => HttpReply::text(404, "not found"),
    }
}
