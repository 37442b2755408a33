//! The `tokens` section: where access tokens come from (an authentication server, mailgate's
//! own OAuth2 client) and how they are cached. Secrets are read from files or the
//! environment here, once, into fields that are never shown.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Problems, duration, read_secret_file, serialize_url, with_password};
use crate::jwt::{self, LoadedCertificate, ServiceAccount};
use crate::secret::Secret;

pub const DEFAULT_AUTH_SERVER_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CACHE_ENTRIES: u64 = 100_000;
/// Token requests in flight at once, over all accounts: logins of one account share one
/// request already; this bounds a burst of many accounts (after a restart, or an attacker
/// cycling through account names) so the token source is not flooded.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 64;
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Accounts used this recently get their tokens renewed before they expire.
pub const DEFAULT_REFRESH_WINDOW: Duration = Duration::from_secs(3600);
/// Identity providers answer in well under a second; a slow one must not hold logins long.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// The store key is 32 bytes, base64 (`head -c 32 /dev/urandom | base64`).
pub const STORE_KEY_BYTES: usize = 32;
/// Redis answers in well under a millisecond on a healthy network: a second means it is not.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// Accounts that no OAuth2 account matches go here; without it they are refused.
    #[serde(default)]
    pub auth_server: Option<AuthServerConfig>,
    #[serde(default)]
    pub oauth2: Option<OAuth2Config>,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Token requests in flight at once; more wait their turn (within the login's timeout).
    #[serde(default = "default_max_concurrent_fetches")]
    pub max_concurrent_fetches: usize,
    /// End an account's open sessions when its source refuses it for good.
    #[serde(default = "default_true")]
    pub end_sessions_on_revoke: bool,
    /// State shared by replicas: refresh tokens, refresh locks, access tokens, the
    /// throttle and revocations. Without it each process keeps its own.
    #[serde(default)]
    pub shared: Option<SharedConfig>,
}

/// `tokens.shared`: where replicas keep what they share.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    pub redis: RedisConfig,
    /// The key sealing access tokens in Redis when there is no `tokens.oauth2.store` key
    /// (32 random bytes, base64); with one, that key seals everything.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub key_env: Option<String>,
    /// The key read from `key_file`, `key_env` or the store's.
    #[serde(skip)]
    pub key: Option<Secret<Vec<u8>>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://HOST:PORT/DB` or `rediss://` (TLS); a password in the URL is never shown.
    #[serde(serialize_with = "serialize_url")]
    #[schemars(with = "String")]
    pub url: Secret<String>,
    /// TLS even with a `redis://` URL.
    #[serde(default)]
    pub tls: bool,
    /// A Redis Cluster, `url` one of its nodes (the others are found through it). Every key
    /// then carries the prefix as a hash tag: all in one slot.
    #[serde(default)]
    pub cluster: bool,
    /// The name Redis Sentinel knows the primary by; `url` then names a Sentinel, and the
    /// primary it names is asked for again after a failover. The password and TLS settings
    /// are the data nodes'.
    #[serde(default)]
    pub sentinel: Option<String>,
    /// The trust roots (PEM) for Redis's certificate, in place of the system's (a private
    /// CA); with TLS only.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// ACL user name (Redis 6+), overriding the URL's.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// The password read from `password_file` or `password_env`.
    #[serde(skip)]
    pub password: Option<Secret<String>>,
    /// Put before every key, so several deployments can share one Redis.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Every Redis call's deadline, connecting included.
    #[serde(default = "default_redis_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthServerConfig {
    /// `user:pass@` in the URL becomes HTTP basic auth.
    #[serde(serialize_with = "serialize_url")]
    #[schemars(with = "String")]
    pub url: Secret<String>,
    #[serde(default = "default_auth_server_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Basic-auth password from a file (a Kubernetes Secret), overriding the URL's.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Basic-auth password from this environment variable, overriding the URL's.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Extra trust roots (PEM) for an https auth server with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_entries: u64,
    /// Lifetime of a token when the source gives none.
    #[serde(with = "duration")]
    #[schemars(with = "String")]
    pub default_ttl: Duration,
    /// A token is never handed out closer than this to its expiry.
    #[serde(with = "duration")]
    #[schemars(with = "String")]
    pub refresh_margin: Duration,
    /// Tokens of accounts used this recently are renewed in the background before they
    /// expire, so that logins never wait for a token source.
    #[serde(with = "duration")]
    #[schemars(with = "String")]
    pub refresh_window: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_CACHE_ENTRIES,
            default_ttl: DEFAULT_TOKEN_TTL,
            refresh_margin: DEFAULT_REFRESH_MARGIN,
            refresh_window: DEFAULT_REFRESH_WINDOW,
        }
    }
}

/// mailgate's own OAuth2 client.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// Where refresh tokens are kept; needed by `refresh_token` accounts.
    #[serde(default)]
    pub store: Option<StoreConfig>,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Account id (the user name clients log in with) -> how its tokens are obtained.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountConfig>,
    /// Each request to a provider's endpoints.
    #[serde(default = "default_provider_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Needed unless `tokens.shared.redis` keeps the records.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub key_env: Option<String>,
    /// The key read from `key_file` or `key_env`.
    #[serde(skip)]
    pub key: Option<Secret<Vec<u8>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Microsoft,
    Google,
    Custom,
}

/// How the client authenticates with a secret at the token endpoint (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMethod {
    #[default]
    Post,
    Basic,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The certificate registered with the provider (PEM).
    pub cert_file: PathBuf,
    /// Its RSA private key (PEM, PKCS#8 or PKCS#1).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub preset: Preset,
    /// Microsoft: the directory (tenant) id or domain.
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Authenticate with a signed assertion (RFC 7523) instead of a secret.
    #[serde(default)]
    pub client_certificate: Option<CertificateConfig>,
    /// Google: a service account's JSON key, for `jwt_bearer` accounts.
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    #[serde(default)]
    pub client_auth_method: ClientAuthMethod,
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub authorize_url: Option<String>,
    #[serde(default)]
    pub device_url: Option<String>,
    /// Where the provider sends the browser back after consent (`mailgate authorize`).
    #[serde(default)]
    pub redirect_url: Option<String>,
    /// Extra trust roots (PEM) for this provider's endpoints.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Scope requested for this provider's accounts, replacing the preset's.
    #[serde(default)]
    pub scope: Option<String>,
    /// The secret from `client_secret_file` or `client_secret_env`.
    #[serde(skip)]
    pub client_secret: Option<Secret<String>>,
    /// The certificate's SHA-256 thumbprint and its private key (DER), from `client_certificate`.
    #[serde(skip)]
    pub certificate: Option<LoadedCertificate>,
    /// The service account from `service_account_file`.
    #[serde(skip)]
    pub service_account: Option<ServiceAccount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    /// App-only tokens with the client's own credentials (RFC 6749 4.4).
    ClientCredentials,
    /// Delegated tokens from a stored refresh token (RFC 6749 6).
    RefreshToken,
    /// A service account acting for the mailbox (RFC 7523 2.1; Google domain-wide delegation).
    JwtBearer,
}

impl Grant {
    pub fn name(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::RefreshToken => "refresh_token",
            Grant::JwtBearer => "jwt_bearer",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub provider: String,
    pub grant: Grant,
    /// The mailbox to log in to upstream.
    pub user: String,
    /// Replaces the provider's scope for this account.
    #[serde(default)]
    pub scope: Option<String>,
}

impl TokensConfig {
    /// Loads secrets into place and checks every rule of the section.
    /// With `password_grants` (client_auth mode `oauth2_password`), tokens come from the
    /// clients' own grants, so no other source is needed.
    pub(super) fn resolve(&mut self, problems: &mut Problems, password_grants: bool) {
        self.check_cache(problems);
        if let Some(auth_server) = &mut self.auth_server {
            auth_server.resolve("tokens.auth_server", false, problems);
        }
        let shared = self.shared.is_some();
        if let Some(oauth2) = &mut self.oauth2 {
            oauth2.resolve(problems, shared);
        }
        if let Some(config) = &mut self.shared {
            let store_key = self
                .oauth2
                .as_ref()
                .and_then(|oauth2| oauth2.store.as_ref())
                .and_then(|store| store.key.clone());
            config.resolve(store_key, problems);
        }
        let has_accounts = self.oauth2.as_ref().is_some_and(|o| !o.accounts.is_empty());
        if self.auth_server.is_none() && !has_accounts && !password_grants {
            problems.add(
                "tokens",
                "no token source configured: add tokens.auth_server or tokens.oauth2.accounts",
            );
        }
    }

    fn check_cache(&self, problems: &mut Problems) {
        if self.max_concurrent_fetches == 0 {
            problems.add("tokens.max_concurrent_fetches", "must be at least 1");
        }
        let cache = &self.cache;
        if cache.max_entries == 0 {
            problems.add("tokens.cache.max_entries", "must be at least 1");
        }
        if cache.default_ttl <= cache.refresh_margin {
            problems.add(
                "tokens.cache.default_ttl",
                "must be longer than tokens.cache.refresh_margin",
            );
        }
    }
}

impl AuthServerConfig {
    /// Checks the section at `key`; with `carries_passwords` (client passwords go in its
    /// requests) the URL must be https, except on loopback.
    pub(super) fn resolve(&mut self, key: &str, carries_passwords: bool, problems: &mut Problems) {
        if self.timeout.is_zero() {
            problems.add(format!("{key}.timeout"), "must be longer than 0s");
        }
        match url::Url::parse(self.url.expose()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                if carries_passwords && let Err(reason) = check_endpoint(self.url.expose()) {
                    problems.add(
                        format!("{key}.url"),
                        format!("{reason}: client passwords must not cross a network in clear"),
                    );
                }
            }
            // The URL may carry a password: never echo it.
            _ => problems.add(
                format!("{key}.url"),
                "must be an absolute http:// or https:// URL",
            ),
        }
        if let Some(password) = secret_from(
            self.password_file.as_ref(),
            self.password_env.as_deref(),
            &format!("{key}.password"),
            problems,
        ) {
            self.url = with_password(&self.url, password.expose());
        }
        check_ca_file(self.ca_file.as_ref(), &format!("{key}.ca_file"), problems);
    }
}

impl OAuth2Config {
    fn resolve(&mut self, problems: &mut Problems, shared: bool) {
        if self.timeout.is_zero() {
            problems.add("tokens.oauth2.timeout", "must be longer than 0s");
        }
        if let Some(store) = &mut self.store {
            store.resolve(problems, shared);
        }
        for (name, provider) in &mut self.providers {
            provider.resolve(&format!("tokens.oauth2.providers.{name}"), problems);
        }
        for (id, account) in &self.accounts {
            let key = format!("tokens.oauth2.accounts.{id}");
            self.check_account(id, account, &key, problems);
        }
    }

    fn check_account(&self, id: &str, account: &AccountConfig, key: &str, problems: &mut Problems) {
        if !is_usable_name(id) {
            problems.add(
                key,
                "account ids are what clients log in with: 1-320 characters, no spaces or control characters",
            );
        }
        if !is_usable_name(&account.user) {
            problems.add(
                format!("{key}.user"),
                "must be a mailbox: 1-320 characters, no spaces or control characters",
            );
        }
        let Some(provider) = self.providers.get(&account.provider) else {
            problems.add(
                format!("{key}.provider"),
                format!(
                    "no provider named {:?} in tokens.oauth2.providers",
                    account.provider
                ),
            );
            return;
        };
        let has_client_secret = provider.client_secret_file.is_some()
            || provider.client_secret_env.is_some()
            || provider.client_certificate.is_some();
        match account.grant {
            Grant::ClientCredentials if !has_client_secret => problems.add(
                format!("{key}.grant"),
                "client_credentials needs the provider's client_secret_file, client_secret_env or client_certificate",
            ),
            Grant::JwtBearer if provider.service_account_file.is_none() => problems.add(
                format!("{key}.grant"),
                "jwt_bearer needs the provider's service_account_file",
            ),
            Grant::RefreshToken if self.store.is_none() => problems.add(
                format!("{key}.grant"),
                "refresh_token accounts need tokens.oauth2.store",
            ),
            _ => {}
        }
        if matches!(
            account.grant,
            Grant::ClientCredentials | Grant::RefreshToken
        ) && provider.client_id.is_none()
        {
            problems.add(
                format!("tokens.oauth2.providers.{}.client_id", account.provider),
                format!("required by account {id}"),
            );
        }
    }
}

impl StoreConfig {
    /// With `shared`, records live in Redis and `dir` is not needed.
    fn resolve(&mut self, problems: &mut Problems, shared: bool) {
        if self.key_file.is_none() && self.key_env.is_none() {
            problems.add(
                "tokens.oauth2.store",
                "needs key_file or key_env (32 random bytes, base64); the key never goes in the YAML",
            );
        }
        self.key = read_key(
            self.key_file.as_ref(),
            self.key_env.as_deref(),
            "tokens.oauth2.store.key",
            problems,
        );
        match &self.dir {
            Some(dir) if dir.as_os_str().is_empty() => {
                problems.add("tokens.oauth2.store.dir", "must not be empty");
            }
            None if !shared => problems.add(
                "tokens.oauth2.store.dir",
                "required unless tokens.shared.redis keeps the refresh tokens",
            ),
            _ => {}
        }
    }
}

impl SharedConfig {
    /// The sealing key is the store's when there is one; else `key_file` / `key_env`.
    fn resolve(&mut self, store_key: Option<Secret<Vec<u8>>>, problems: &mut Problems) {
        let own = self.key_file.is_some() || self.key_env.is_some();
        if own && store_key.is_some() {
            problems.add(
                "tokens.shared.key_file",
                "tokens.oauth2.store's key seals the shared state too: remove this one",
            );
        }
        self.key = match store_key {
            Some(key) => Some(key),
            None if own => read_key(
                self.key_file.as_ref(),
                self.key_env.as_deref(),
                "tokens.shared.key",
                problems,
            ),
            // Keys are not read without files (`check --no-files`): nothing to say then.
            None if !problems.reads_files() => None,
            None => {
                problems.add(
                    "tokens.shared",
                    "needs key_file or key_env (32 random bytes, base64) to seal the access tokens it shares, unless tokens.oauth2.store has a key",
                );
                None
            }
        };
        self.redis.resolve(problems);
    }
}

impl RedisConfig {
    fn resolve(&mut self, problems: &mut Problems) {
        let key = "tokens.shared.redis";
        match url::Url::parse(self.url.expose()) {
            Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.host().is_some() => {
                let database = url.path().trim_start_matches('/');
                if !database.is_empty() && database.parse::<u16>().is_err() {
                    problems.add(format!("{key}.url"), "the path must be a database number");
                }
                if self.cluster && !matches!(database, "" | "0") {
                    problems.add(format!("{key}.url"), "a cluster has only database 0");
                }
            }
            Ok(url) if url.scheme() == "redis+unix" && url.path().len() > 1 => {}
            // The URL may carry a password: never echo it.
            _ => problems.add(
                format!("{key}.url"),
                "must be redis://HOST:PORT/DB, rediss://HOST:PORT/DB or redis+unix:///PATH",
            ),
        }
        // Set on the connection, not in the URL: a Unix socket's URL has no place for it.
        self.password = secret_from(
            self.password_file.as_ref(),
            self.password_env.as_deref(),
            &format!("{key}.password"),
            problems,
        );
        self.check_tls(problems);
        if self
            .username
            .as_deref()
            .is_some_and(|name| !is_usable_name(name))
        {
            problems.add(format!("{key}.username"), "must be a plain name");
        }
        if self
            .key_prefix
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            problems.add(
                format!("{key}.key_prefix"),
                "must have no spaces or control characters",
            );
        }
        if self.timeout.is_zero() {
            problems.add(format!("{key}.timeout"), "must be longer than 0s");
        }
    }

    /// TLS is asked for by `rediss://` or `tls: true`, which a Unix socket cannot take; a CA
    /// file without TLS would be ignored.
    fn check_tls(&self, problems: &mut Problems) {
        let scheme = url::Url::parse(self.url.expose())
            .map(|url| url.scheme().to_owned())
            .unwrap_or_default();
        if self.tls && scheme == "redis+unix" {
            problems.add(
                "tokens.shared.redis.tls",
                "a Unix socket (redis+unix://) takes no TLS",
            );
        }
        if self.cluster && self.sentinel.is_some() {
            problems.add(
                "tokens.shared.redis.sentinel",
                "a cluster has no Sentinel: set cluster or sentinel, not both",
            );
        }
        if self
            .sentinel
            .as_deref()
            .is_some_and(|name| !is_usable_name(name))
        {
            problems.add("tokens.shared.redis.sentinel", "must be a plain name");
        }
        if self.sentinel.is_some() && scheme == "redis+unix" {
            problems.add(
                "tokens.shared.redis.sentinel",
                "Sentinel is reached over TCP: use the redis:// URL of one Sentinel",
            );
        }
        if self.cluster && scheme == "redis+unix" {
            problems.add(
                "tokens.shared.redis.cluster",
                "a cluster is reached over TCP: use a redis:// or rediss:// URL of one node",
            );
        }
        let ca_file = self.ca_file.as_ref();
        if self.tls || scheme == "rediss" {
            check_ca_file(ca_file, "tokens.shared.redis.ca_file", problems);
        } else if ca_file.is_some() {
            problems.add(
                "tokens.shared.redis.ca_file",
                "only used with TLS: use a rediss:// URL or tls: true",
            );
        }
    }
}

/// A 32-byte key from `file` or `env`, base64; `None` (with a problem) when unreadable.
fn read_key(
    file: Option<&PathBuf>,
    env: Option<&str>,
    key: &str,
    problems: &mut Problems,
) -> Option<Secret<Vec<u8>>> {
    let encoded = secret_from(file, env, key, problems)?;
    let decoded = decode_key(encoded.expose());
    if decoded.is_none() {
        problems.add(
            key,
            "must be 32 bytes in base64, e.g. from: head -c 32 /dev/urandom | base64",
        );
    }
    decoded
}

impl ProviderConfig {
    fn resolve(&mut self, key: &str, problems: &mut Problems) {
        match self.preset {
            Preset::Microsoft if self.tenant.is_none() => {
                problems.add(format!("{key}.tenant"), "required for preset microsoft");
            }
            Preset::Custom if self.token_url.is_none() => {
                problems.add(format!("{key}.token_url"), "required for preset custom");
            }
            _ => {}
        }
        if let Some(tenant) = &self.tenant
            && !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c))
        {
            problems.add(
                format!("{key}.tenant"),
                "a tenant id or domain: letters, digits, '.' and '-'",
            );
        }
        for (name, url) in [
            ("token_url", &self.token_url),
            ("authorize_url", &self.authorize_url),
            ("device_url", &self.device_url),
            ("redirect_url", &self.redirect_url),
        ] {
            if let Some(url) = url
                && let Err(reason) = check_endpoint(url)
            {
                problems.add(format!("{key}.{name}"), reason);
            }
        }
        self.client_secret = secret_from(
            self.client_secret_file.as_ref(),
            self.client_secret_env.as_deref(),
            &format!("{key}.client_secret"),
            problems,
        );
        if let Some(certificate) = self
            .client_certificate
            .as_ref()
            .filter(|_| problems.reads_files())
        {
            match jwt::load_certificate(&certificate.cert_file, &certificate.key_file) {
                Ok(loaded) => self.certificate = Some(loaded),
                Err(reason) => problems.add(format!("{key}.client_certificate"), reason),
            }
        }
        let gives_secret = self.client_secret_file.is_some() || self.client_secret_env.is_some();
        if gives_secret && self.client_certificate.is_some() {
            problems.add(
                format!("{key}.client_certificate"),
                "give either a client secret or a client certificate, not both",
            );
        }
        if let Some(path) = self
            .service_account_file
            .as_ref()
            .filter(|_| problems.reads_files())
        {
            match read_secret_file(path).and_then(|text| jwt::load_service_account(&text)) {
                Ok(account) => self.service_account = Some(account),
                Err(reason) => problems.add(format!("{key}.service_account_file"), reason),
            }
        }
        check_ca_file(self.ca_file.as_ref(), &format!("{key}.ca_file"), problems);
    }
}

/// Provider endpoints must be https, except on loopback (tests, local identity providers).
pub fn check_endpoint(text: &str) -> Result<(), String> {
    let url = url::Url::parse(text).map_err(|_| "not a URL".to_owned())?;
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("must have a host".to_owned()),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("must be https:// (http:// only on loopback)".to_owned()),
    }
}

/// A secret from a file or an environment variable (the variable wins when both are given).
pub(crate) fn secret_from(
    file: Option<&PathBuf>,
    env: Option<&str>,
    key: &str,
    problems: &mut Problems,
) -> Option<Secret<String>> {
    if !problems.reads_files() {
        return None;
    }
    let mut secret = None;
    if let Some(path) = file {
        match read_secret_file(path) {
            Ok(text) => secret = Some(Secret::new(text)),
            Err(reason) => problems.add(format!("{key}_file"), reason),
        }
    }
    if let Some(name) = env {
        match std::env::var(name) {
            Ok(text) => secret = Some(Secret::new(text)),
            Err(_) => problems.add(
                format!("{key}_env"),
                format!("environment variable {name} is not set"),
            ),
        }
    }
    secret
}

pub(crate) fn check_ca_file(path: Option<&PathBuf>, key: &str, problems: &mut Problems) {
    if path.is_some()
        && problems.reads_files()
        && let Err(error) = crate::tls::client_config(path.map(PathBuf::as_path), true)
    {
        problems.add(key, error.to_string());
    }
}

fn decode_key(encoded: &str) -> Option<Secret<Vec<u8>>> {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    (key.len() == STORE_KEY_BYTES).then(|| Secret::new(key))
}

/// Account ids and mailboxes: what a client types as its user name, and what goes into SASL.
pub fn is_usable_name(name: &str) -> bool {
    (1..=320).contains(&name.len()) && !name.chars().any(|c| c.is_control() || c.is_whitespace())
}

fn default_max_concurrent_fetches() -> usize {
    DEFAULT_MAX_CONCURRENT_FETCHES
}

fn default_key_prefix() -> String {
    "mailgate:".to_owned()
}
fn default_redis_timeout() -> Duration {
    DEFAULT_REDIS_TIMEOUT
}
fn default_true() -> bool {
    true
}
fn default_auth_server_timeout() -> Duration {
    DEFAULT_AUTH_SERVER_TIMEOUT
}
fn default_provider_timeout() -> Duration {
    DEFAULT_PROVIDER_TIMEOUT
}
