//! The provider's books: registered clients, users and service accounts, every token, code and
//! device grant it issued, the request log, and the two shapes every endpoint shares: a parsed
//! form and an RFC 6749 section 5.2 error.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::super::http::Introspection;
use super::crypto::random_token;
use super::server::HttpReply;
use super::{ClientAuthMethod, TokenRequestRecord};

/// `access_token` lifetime unless a test sets another (`expires_in: 3600`, as Google and
/// Microsoft answer).
pub(super) const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Authorization codes are short-lived (RFC 6749 section 4.1.2 recommends at most 10 minutes);
/// Google and Microsoft use minutes, this provider one minute.
pub(super) const DEFAULT_CODE_LIFETIME: Duration = Duration::from_secs(60);
/// RFC 8628 section 3.2: `interval` defaults to 5 seconds; tests usually set 1.
pub(super) const DEFAULT_DEVICE_INTERVAL_SECS: u64 = 5;
/// Microsoft's device codes live 15 minutes.
pub(super) const DEFAULT_DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(900);

/// State shared by the server task, the handles and the hold guards.
pub(super) struct Shared {
    pub addr: SocketAddr,
    pub introspection: Introspection,
    pub state: Mutex<State>,
    /// How many hold guards are alive; token requests wait while it is above zero.
    pub holds: watch::Sender<usize>,
    /// How many token requests are waiting on a hold right now.
    pub held: AtomicUsize,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Mints an access token for `user`, valid here and at the [`Introspection`] until it
    /// expires or is revoked.
    pub fn issue_access(
        &self,
        st: &mut State,
        user: &str,
        client_id: &str,
        scope: Option<&str>,
        grant: u64,
    ) -> (String, u64) {
        let token = random_token("at-");
        super::super::secrets::remember("OAuth access token", &token);
        let lifetime = st.settings.access_lifetime;
        st.access_tokens.insert(
            token.clone(),
            AccessToken {
                user: user.to_owned(),
                client_id: client_id.to_owned(),
                scope: scope.map(str::to_owned),
                expires_at: Instant::now() + lifetime,
                issued_unix: super::crypto::unix_now(),
                lifetime,
                grant,
                revoked: false,
            },
        );
        st.issued.push((user.to_owned(), token.clone()));
        self.introspection.add_token(&token, user);
        (token, lifetime.as_secs())
    }

    /// Mints a refresh token in grant family `grant`.
    pub fn issue_refresh(
        &self,
        st: &mut State,
        user: &str,
        client_id: &str,
        scope: Option<&str>,
        grant: u64,
    ) -> String {
        let token = random_token("rt-");
        super::super::secrets::remember("OAuth refresh token", &token);
        st.seq += 1;
        let seq = st.seq;
        st.refresh_tokens.insert(
            token.clone(),
            RefreshToken {
                user: user.to_owned(),
                client_id: client_id.to_owned(),
                scope: scope.map(str::to_owned),
                status: RefreshStatus::Active,
                grant,
                seq,
            },
        );
        token
    }

    /// Revokes every access and refresh token of grant family `grant` (RFC 6749 section 4.1.2:
    /// a code used twice revokes what it produced).
    pub fn revoke_grant(&self, st: &mut State, grant: u64) {
        for (token, access) in st.access_tokens.iter_mut() {
            if access.grant == grant && !access.revoked {
                access.revoked = true;
                self.introspection.revoke(token);
            }
        }
        for refresh in st.refresh_tokens.values_mut() {
            if refresh.grant == grant && refresh.status == RefreshStatus::Active {
                refresh.status = RefreshStatus::Revoked;
            }
        }
    }

    /// Removes expired access tokens from the [`Introspection`] (this provider's own
    /// `/introspect` checks expiry itself). Called by the sweeper task.
    pub fn sweep_expired(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        for (token, access) in st.access_tokens.iter_mut() {
            if !access.revoked && access.expires_at <= now {
                access.revoked = true;
                self.introspection.revoke(token);
            }
        }
    }
}

pub(super) struct Settings {
    pub access_lifetime: Duration,
    pub code_lifetime: Duration,
    pub rotation: bool,
    pub device_interval_secs: u64,
    pub device_lifetime: Duration,
    pub delay: Duration,
    /// Holds apply to answers already produced (the grant done, a rotation committed), as a
    /// real provider's answer in flight, instead of to requests not yet processed.
    pub hold_answers: bool,
    /// The next `.0` token requests answer status `.1` with error code `.2`.
    pub fail_next: Option<(usize, u16, String)>,
    /// A rotated refresh token presented again revokes its whole family (RFC 9700 section
    /// 4.14.2's reuse detection).
    pub reuse_detection: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            access_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
            code_lifetime: DEFAULT_CODE_LIFETIME,
            rotation: true,
            device_interval_secs: DEFAULT_DEVICE_INTERVAL_SECS,
            device_lifetime: DEFAULT_DEVICE_CODE_LIFETIME,
            delay: Duration::ZERO,
            hold_answers: false,
            fail_next: None,
            reuse_detection: false,
        }
    }
}

/// How a registered client proves who it is.
pub(super) enum ClientKey {
    Secret(String),
    Certificate {
        /// base64url(SHA-256(certificate DER)).
        thumbprint: String,
        /// PKCS#1 `RSAPublicKey` DER.
        public_key: Vec<u8>,
    },
    Public,
}

pub(super) struct Client {
    pub key: ClientKey,
    /// `None`: every grant type.
    pub allowed_grants: Option<Vec<String>>,
    pub mailbox: Option<String>,
    pub redirect_uris: Vec<String>,
}

pub(super) struct AccessToken {
    pub user: String,
    pub client_id: String,
    pub scope: Option<String>,
    pub expires_at: Instant,
    pub issued_unix: i64,
    pub lifetime: Duration,
    pub grant: u64,
    pub revoked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RefreshStatus {
    Active,
    /// Replaced by a newer one in a refresh-token grant.
    Rotated,
    Revoked,
}

pub(super) struct RefreshToken {
    pub user: String,
    pub client_id: String,
    pub scope: Option<String>,
    pub status: RefreshStatus,
    /// The consent it descends from; every token of one family shares it.
    pub grant: u64,
    /// Issue order, to find the newest.
    pub seq: u64,
}

/// An authorization request shown on the consent page, waiting for approve or deny.
pub(super) struct PendingAuthorization {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: Option<String>,
    pub state: Option<String>,
    pub code_challenge: String,
}

pub(super) struct AuthorizationCode {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: Option<String>,
    pub code_challenge: String,
    pub user: String,
    pub expires_at: Instant,
    pub used: bool,
    pub grant: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceDecision {
    Pending,
    Approved(String),
    Denied,
}

pub(super) struct DeviceGrant {
    pub client_id: String,
    /// Eight letters without the dash.
    pub user_code: String,
    pub scope: Option<String>,
    pub expires_at: Instant,
    pub interval: Duration,
    pub last_poll: Option<Instant>,
    pub decision: DeviceDecision,
    pub redeemed: bool,
}

#[derive(Default)]
pub(super) struct State {
    pub settings: Settings,
    pub clients: HashMap<String, Client>,
    /// Service-account email -> PKCS#1 `RSAPublicKey` DER.
    pub service_accounts: HashMap<String, Vec<u8>>,
    pub users: HashMap<String, String>,
    pub consenting_user: Option<String>,
    pub access_tokens: HashMap<String, AccessToken>,
    /// (user, access token) in issue order.
    pub issued: Vec<(String, String)>,
    pub refresh_tokens: HashMap<String, RefreshToken>,
    pub pending: HashMap<String, PendingAuthorization>,
    pub codes: HashMap<String, AuthorizationCode>,
    /// device_code -> grant.
    pub devices: HashMap<String, DeviceGrant>,
    /// (client_id, jti) of every accepted client assertion.
    pub used_jtis: HashSet<(String, String)>,
    pub records: Vec<TokenRequestRecord>,
    pub next_grant: u64,
    pub seq: u64,
    /// Rotated refresh tokens presented again.
    pub reuses_detected: usize,
}

impl State {
    /// A new grant family id (one per consent or app-only issue).
    pub fn new_grant(&mut self) -> u64 {
        self.next_grant += 1;
        self.next_grant
    }

    /// Consumes one injected failure, if any is left.
    pub fn take_injected_failure(&mut self) -> Option<OAuthError> {
        let (left, status, code) = self.settings.fail_next.as_mut()?;
        let error = OAuthError::new(*status, code, "injected failure");
        *left -= 1;
        if *left == 0 {
            self.settings.fail_next = None;
        }
        Some(error)
    }

    /// The device grant whose user code is `user_code` (any case, dash and spaces ignored).
    pub fn device_by_user_code(&mut self, user_code: &str) -> Option<&mut DeviceGrant> {
        let wanted: String = user_code
            .chars()
            .filter(char::is_ascii_alphabetic)
            .map(|c| c.to_ascii_uppercase())
            .collect();
        self.devices
            .values_mut()
            .find(|d| d.user_code == wanted && !d.redeemed)
    }
}

/// Request parameters from a form body or a query string.
pub(super) struct Form(Vec<(String, String)>);

impl Form {
    /// Parses `application/x-www-form-urlencoded` bytes. Refuses a repeated parameter (RFC 6749
    /// section 3.1: "Request and response parameters MUST NOT be included more than once") and
    /// drops empty ones ("Parameters sent without a value MUST be treated as if they were
    /// omitted from the request").
    pub fn parse(bytes: &[u8]) -> Result<Form, OAuthError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (name, value) in url::form_urlencoded::parse(bytes).into_owned() {
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(OAuthError::invalid_request(&format!(
                    "parameter {} repeated",
                    printable(&name)
                )));
            }
            if !value.is_empty() {
                pairs.push((name, value));
            }
        }
        Ok(Form(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// `text` cut to 40 characters of the set RFC 6749 allows in `error_description`
/// (%x20-21 / %x23-5B / %x5D-7E), anything else replaced by `?`.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .take(40)
        .map(|c| match c {
            ' '..='~' if c != '"' && c != '\\' => c,
            _ => '?',
        })
        .collect()
}

/// An RFC 6749 section 5.2 error answer.
#[derive(Debug, Clone)]
pub(super) struct OAuthError {
    pub status: u16,
    pub code: String,
    pub description: String,
}

impl OAuthError {
    pub fn new(status: u16, code: &str, description: &str) -> OAuthError {
        OAuthError {
            status,
            code: code.to_owned(),
            description: description.to_owned(),
        }
    }

    pub fn invalid_request(description: &str) -> OAuthError {
        Self::new(400, "invalid_request", description)
    }

    /// 401, answered with `WWW-Authenticate` (RFC 6749 section 5.2).
    pub fn invalid_client(description: &str) -> OAuthError {
        Self::new(401, "invalid_client", description)
    }

    pub fn invalid_grant(description: &str) -> OAuthError {
        Self::new(400, "invalid_grant", description)
    }

    pub fn unauthorized_client(description: &str) -> OAuthError {
        Self::new(400, "unauthorized_client", description)
    }

    pub fn invalid_scope(description: &str) -> OAuthError {
        Self::new(400, "invalid_scope", description)
    }

    pub fn reply(&self) -> HttpReply {
        let reply = HttpReply::json(
            self.status,
            &serde_json::json!({ "error": self.code, "error_description": self.description }),
        )
        .with_header("cache-control", "no-store")
        .with_header("pragma", "no-cache");
        if self.status == 401 {
            reply.with_header(
                "www-authenticate",
                r#"Basic realm="mailgate-test-provider", charset="UTF-8""#,
            )
        } else {
            reply
        }
    }
}

/// What a token request presented to authenticate the client, before checking it.
pub(super) fn presented_auth(basic: bool, post: bool, assertion: bool) -> Option<ClientAuthMethod> {
    match (basic, post, assertion) {
        (false, false, false) => Some(ClientAuthMethod::None),
        (true, false, false) => Some(ClientAuthMethod::Basic),
        (false, true, false) => Some(ClientAuthMethod::Post),
        (false, false, true) => Some(ClientAuthMethod::Assertion),
        _ => None,
    }
}
