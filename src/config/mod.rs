//! Configuration: serde structs that refuse unknown keys, defaults as named constants, and
//! [`Config::load`], which reads secrets from files or the environment and checks everything
//! once, reporting each problem as `PATH: key.path: reason`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::secret::Secret;
pub use pool::{HealthConfig, Routing, ServerConfig};

mod admin;
pub mod pool;
mod schema;
pub mod tokens;
mod warnings;
pub use tokens::*;

/// RFC 9051 section 5.4 asks for an inactivity timer of at least 30 minutes once logged in.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(31 * 60);
/// Before authentication a client has no business idling: a short timer sheds stray sockets.
pub const DEFAULT_PRE_AUTH_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A burst of logins (clients reconnecting after a restart) opens at most this many upstream
/// connections at once per listener, so mailgate never floods its upstream with handshakes;
/// each connect takes milliseconds, so the queue drains fast.
pub const DEFAULT_MAX_CONCURRENT_CONNECTS: usize = 256;
pub const DEFAULT_HOSTNAME: &str = "mailgate";
/// Endpoint removal takes a few seconds to reach every kube-proxy and load balancer.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Kubernetes' default terminationGracePeriodSeconds is 30s: the drain delay, the grace, the
/// goodbyes (3 s) and a margin of 2 s fit inside it (give pods 35 s for 7 s of margin).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// However busy a client is before it logs in, this is as long as it may stay unauthenticated:
/// room for a human typing at a telnet prompt, not for a slot held forever with NOOPs.
pub const DEFAULT_PRE_AUTH_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// One deadline around a whole login (token, upstream connect, TLS, SASL, one retry): longer
/// than Dovecot's 15 s worst-case failure delay, shorter than a client's usual 60 s patience.
pub const DEFAULT_LOGIN_TIMEOUT: Duration = Duration::from_secs(45);
/// A password check waits this long for a free worker before the login fails as temporary.
pub const DEFAULT_HASH_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// A verified password is remembered this long (as a keyed hash): long enough for the burst of
/// connections a mail client opens, short enough that a changed password soon stops working.
pub const DEFAULT_REMEMBER: Duration = Duration::from_secs(5 * 60);
/// Checks sent to an auth server or identity provider at once: each waits on the network, not
/// a CPU, so more than the hash workers; few enough that a guessing flood cannot hammer it.
pub const DEFAULT_DELEGATED_CHECKS: usize = 16;
/// Enough for a mail client's few parallel connections (or a few behind one NAT), too few for
/// one address to take the whole pool, or to slip many guesses past a block being reached.
pub const DEFAULT_CHECKS_PER_ADDRESS: usize = 4;
/// After the first failed login of an address or account, its next login waits this long
/// before its check; each further failure doubles it, up to the maximum.
pub const DEFAULT_FAILURE_DELAY: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX_FAILURE_DELAY: Duration = Duration::from_secs(15);
/// Failures are forgotten this long after the last one; a block lasts as long.
pub const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// A client address that failed this often within the window is refused without a check.
pub const DEFAULT_BLOCK_ADDRESS_AFTER: u32 = 10;
/// Accounts are never blocked unless the operator opts in: a block would let strangers lock
/// the owner out (their failures make the account's logins wait instead).
pub const DEFAULT_BLOCK_ACCOUNT_AFTER: u32 = 0;
/// A network (IPv4 /24, IPv6 /48) that failed this often within the window is refused
/// without a check: ten addresses' worth, since it holds many clients.
pub const DEFAULT_BLOCK_NETWORK_AFTER: u32 = 100;
/// ConfigMap updates reach the pod within about a minute; a few seconds of polling is plenty.
pub const DEFAULT_CONFIG_WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// Per listener; each idle session costs a few KiB, so this bounds memory at tens of MiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// One client address may hold this share of a listener: far more than a mail client uses,
/// far less than all of it. Not on loopback listeners: see
/// [`ListenerConfig::max_connections_per_client`].
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 500;
/// RFC 4954 4: an SMTP AUTH line (and each SASL response) may be 12288 octets; the same bound
/// serves IMAP command lines before login, which hold at most a user name and a password.
pub const DEFAULT_MAX_LINE_LENGTH: usize = 12_288;
/// IMAP: a literal before login carries a user name or a password; 8 KiB is plenty and keeps
/// a pre-login command (line plus literals) near 20 KiB.
pub const DEFAULT_MAX_LITERAL_SIZE: usize = 8_192;
/// Bounds for both, so that a typo cannot make pre-login input unbounded.
const LINE_LENGTH_RANGE: std::ops::RangeInclusive<usize> = 512..=1_048_576;
const MAX_LITERAL_SIZE_LIMIT: usize = 1_048_576;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::with_aliases)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub tokens: TokensConfig,
    #[serde(default)]
    pub client_auth: ClientAuthConfig,
    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`); `metrics` is its older name.
    #[serde(default, alias = "metrics")]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub log: LogConfig,
    /// Name used in greetings towards clients.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// After SIGTERM: how long mailgate still accepts connections while it reports not ready,
    /// so that load balancers and Kubernetes endpoints stop sending clients first.
    #[serde(default = "default_drain_delay", with = "duration")]
    #[schemars(with = "String")]
    pub drain_delay: Duration,
    /// How long sessions may go on after the drain delay before they are closed.
    #[serde(default = "default_shutdown_grace", with = "duration")]
    #[schemars(with = "String")]
    pub shutdown_grace: Duration,
    /// How often the config file is checked for changes; `0s` turns watching off (SIGHUP still reloads).
    #[serde(default = "default_config_watch_interval", with = "duration")]
    #[schemars(with = "String")]
    pub config_watch_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Smtp,
    Pop3,
    Managesieve,
}

impl Protocol {
    /// Every protocol, in the order the documentation lists them.
    pub const ALL: [Protocol; 4] = [
        Protocol::Imap,
        Protocol::Smtp,
        Protocol::Pop3,
        Protocol::Managesieve,
    ];

    /// The name in the configuration, in metrics and towards auth servers (`proto=`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
            Protocol::Managesieve => "managesieve",
        }
    }

    /// The protocol called `name` in the configuration.
    pub fn named(name: &str) -> Option<Protocol> {
        Protocol::ALL
            .into_iter()
            .find(|protocol| protocol.name() == name)
    }

    /// Why an upstream of this protocol cannot be told the client's address with
    /// `forward_client`, if it cannot: IMAP has `ID`, SMTP `XCLIENT`, any upstream may take a
    /// PROXY v2 header. POP3 and ManageSieve have no command for it that Dovecot takes.
    fn refuses_forwarding(self, forward: ForwardClient) -> Option<&'static str> {
        match (self, forward) {
            (_, ForwardClient::None | ForwardClient::ProxyV2) => None,
            (Protocol::Imap, ForwardClient::Id) | (Protocol::Smtp, ForwardClient::Xclient) => None,
            (Protocol::Smtp, ForwardClient::Id) => {
                Some("id is for IMAP listeners; SMTP uses xclient (or proxy_v2)")
            }
            (Protocol::Imap, ForwardClient::Xclient) => {
                Some("xclient is for SMTP listeners; IMAP uses id (or proxy_v2)")
            }
            (Protocol::Pop3 | Protocol::Managesieve, _) => {
                Some("POP3 and ManageSieve upstreams learn the client's address only from proxy_v2")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Used in logs and metric labels.
    pub name: String,
    pub protocol: Protocol,
    #[serde(with = "listen_address")]
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    #[serde(default = "default_pre_auth_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub pre_auth_timeout: Duration,
    #[serde(default = "default_pre_auth_lifetime", with = "duration")]
    #[schemars(with = "String")]
    pub pre_auth_lifetime: Duration,
    #[serde(default = "default_login_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub login_timeout: Duration,
    #[serde(default = "default_idle_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
    /// Connections beyond this are greeted with a refusal and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections from one client address (IPv6: /64) beyond this are refused the same way.
    /// Unset: see [`ListenerConfig::max_connections_per_client`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<usize>,
    /// Longest command line before login, CRLF included (SMTP commands other than AUTH keep
    /// RFC 5321's 512). Longer ones get `BAD` / `500 5.5.2` and are discarded.
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// IMAP: longest literal before login; larger ones are refused before they are sent.
    #[serde(default = "default_max_literal_size")]
    pub max_literal_size: usize,
    /// TLS towards clients.
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
    /// Load balancers (CIDRs) whose PROXY protocol v2 header gives the real client address.
    /// From these addresses the header is required; from others it is refused.
    #[serde(default)]
    pub accept_proxy: Vec<String>,
}

impl ListenerConfig {
    /// The per-client limit in force. Unset, it guards against strangers on a network
    /// ([`DEFAULT_MAX_CONNECTIONS_PER_CLIENT`]); a loopback listener without load balancers
    /// has one client, the app beside mailgate (a sidecar), whose share is the whole listener.
    pub fn max_connections_per_client(&self) -> usize {
        let only_local_clients =
            self.listen.ip().to_canonical().is_loopback() && self.accept_proxy.is_empty();
        match self.max_connections_per_client {
            Some(limit) => limit,
            None if only_local_clients => self.max_connections,
            None => DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        }
    }
}

/// TLS towards the clients of one listener.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// `implicit`: TLS from the first byte (993, 465); `starttls`: plain, upgraded by the
    /// client's STARTTLS (143, 587); `none`: plain.
    pub mode: TlsMode,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// With `starttls`: no login before TLS (LOGINDISABLED / `530 5.7.0`).
    #[serde(default = "default_true")]
    pub require: bool,
}

/// How the upstream learns the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ForwardClient {
    #[default]
    None,
    /// IMAP `ID ("x-originating-ip" ...)` before the login (Dovecot, login_trusted_networks).
    Id,
    /// SMTP `XCLIENT ADDR= PORT=` before the login (Dovecot, Postfix).
    Xclient,
    /// A PROXY protocol v2 header at connect (Dovecot haproxy_trusted_networks, Postfix, nginx).
    ProxyV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Implicit,
    Starttls,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MechanismSetting {
    #[default]
    Auto,
    Xoauth2,
    Oauthbearer,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// One server. A pool names `servers` instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub port: u16,
    /// A pool: each account's logins go to one of these (docs/backends.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub routing: Routing,
    /// Account to server name; the account's logins go there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, String>,
    /// More routes, a YAML map of account to server name: watched, and where
    /// `mailgate backends move` keeps the routes it sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_file: Option<PathBuf>,
    /// With `routing: static`: the server of the accounts without a route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    #[serde(default)]
    pub health: HealthConfig,
    pub tls: TlsMode,
    /// Extra trust roots (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether the system's trust roots are used besides `ca_file`.
    #[serde(default = "default_true")]
    pub system_roots: bool,
    #[serde(default)]
    pub mechanism: MechanismSetting,
    #[serde(default = "default_connect_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Connects (TCP plus an implicit-TLS handshake) under way at once to this upstream;
    /// more wait, within `connect_timeout`.
    #[serde(default = "default_max_concurrent_connects")]
    pub max_concurrent_connects: usize,
    /// Tell the upstream the client's address (it must trust mailgate's address for that).
    #[serde(default)]
    pub forward_client: ForwardClient,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMode {
    /// The user name is the account id; the password is not checked.
    #[default]
    Any,
    /// Each account has an argon2 PHC hash.
    Static,
    /// An HTTP service checks user name and password (docs/auth-server.md).
    AuthServer,
    /// An OAuth2 password grant (RFC 6749 4.3) checks them and yields the session's token.
    #[serde(rename = "oauth2_password")]
    OAuth2Password,
}

impl ClientAuthMode {
    pub fn name(self) -> &'static str {
        match self {
            ClientAuthMode::Any => "any",
            ClientAuthMode::Static => "static",
            ClientAuthMode::AuthServer => "auth_server",
            ClientAuthMode::OAuth2Password => "oauth2_password",
        }
    }
}

/// Mode `oauth2_password`: which provider's token endpoint checks passwords.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordGrantConfig {
    /// A name in `tokens.oauth2.providers`.
    pub provider: String,
    /// Replaces the provider's scope for these grants.
    #[serde(default)]
    pub scope: Option<String>,
    /// The provider's settings, copied from `tokens.oauth2` once validated (so that a change
    /// there rebuilds the check on reload).
    #[serde(skip)]
    pub resolved: Option<ProviderConfig>,
    /// `tokens.oauth2.timeout`: each request to the provider.
    #[serde(skip)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    #[serde(default)]
    pub mode: ClientAuthMode,
    /// Password checks that run at once; by default one per CPU mailgate may use (cgroup
    /// quota included), at most four.
    #[serde(default)]
    pub hash_workers: Option<usize>,
    #[serde(default = "default_hash_queue_timeout", with = "duration")]
    #[schemars(with = "String")]
    pub hash_queue_timeout: Duration,
    /// Password checks one client address (IPv6: /64) may have waiting or running at once.
    #[serde(default = "default_checks_per_address")]
    pub checks_per_address: usize,
    #[serde(default)]
    pub throttle: ThrottleConfig,
    /// Allows `mode: any` on listeners that are not on loopback.
    #[serde(default)]
    pub allow_remote: bool,
    /// Account id -> argon2 PHC hash.
    #[serde(default)]
    pub accounts: BTreeMap<String, Secret<String>>,
    /// A YAML map of account id -> hash, merged into `accounts`.
    #[serde(default)]
    pub accounts_file: Option<PathBuf>,
    /// Mode `auth_server`: where user names and passwords are checked.
    #[serde(default)]
    pub auth_server: Option<AuthServerConfig>,
    /// Mode `oauth2_password`: the provider that checks them.
    #[serde(default)]
    pub oauth2_password: Option<PasswordGrantConfig>,
    /// Delegated modes: how long a verified password is remembered; `0s`: never.
    #[serde(default = "default_remember", with = "duration")]
    #[schemars(with = "String")]
    pub remember: Duration,
    /// Delegated modes: checks sent at once.
    #[serde(default = "default_delegated_checks")]
    pub delegated_checks: usize,
}

impl Default for ClientAuthConfig {
    fn default() -> Self {
        Self {
            mode: ClientAuthMode::default(),
            hash_workers: None,
            hash_queue_timeout: DEFAULT_HASH_QUEUE_TIMEOUT,
            checks_per_address: DEFAULT_CHECKS_PER_ADDRESS,
            throttle: ThrottleConfig::default(),
            allow_remote: false,
            accounts: BTreeMap::new(),
            accounts_file: None,
            auth_server: None,
            oauth2_password: None,
            remember: DEFAULT_REMEMBER,
            delegated_checks: DEFAULT_DELEGATED_CHECKS,
        }
    }
}

/// Most `hash_workers` by default. Each busy worker holds the hashes' `m` of memory (19 MiB
/// with the documented parameters), so a large machine must not multiply it; more checks at
/// once than this only serve an attacker faster.
pub const DEFAULT_MAX_HASH_WORKERS: usize = 4;

impl ClientAuthConfig {
    /// `hash_workers`, else the CPUs mailgate may use, at most [`DEFAULT_MAX_HASH_WORKERS`]:
    /// on Linux [`std::thread::available_parallelism`] counts the affinity mask and a cgroup
    /// CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`; rounded down, at least 1).
    pub fn hash_workers(&self) -> usize {
        self.hash_workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(DEFAULT_MAX_HASH_WORKERS)
        })
    }
}

/// The brute-force defence; see `client_auth::throttle`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    #[serde(default = "default_failure_delay", with = "duration")]
    #[schemars(with = "String")]
    pub failure_delay: Duration,
    #[serde(default = "default_max_failure_delay", with = "duration")]
    #[schemars(with = "String")]
    pub max_failure_delay: Duration,
    #[serde(default = "default_failure_window", with = "duration")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// `0` never blocks an address.
    #[serde(default = "default_block_address_after")]
    pub block_address_after: u32,
    /// `0` never blocks an account.
    #[serde(default = "default_block_account_after")]
    pub block_account_after: u32,
    /// `0` never blocks a network (IPv4 /24, IPv6 /48).
    #[serde(default = "default_block_network_after")]
    pub block_network_after: u32,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            failure_delay: DEFAULT_FAILURE_DELAY,
            max_failure_delay: DEFAULT_MAX_FAILURE_DELAY,
            window: DEFAULT_FAILURE_WINDOW,
            block_address_after: DEFAULT_BLOCK_ADDRESS_AFTER,
            block_account_after: DEFAULT_BLOCK_ACCOUNT_AFTER,
            block_network_after: DEFAULT_BLOCK_NETWORK_AFTER,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(with = "listen_address")]
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// Serve the admin endpoint over TLS (required for onboarding off loopback).
    #[serde(default)]
    pub tls: Option<CertificateFiles>,
    /// The onboarding page (`/accounts`), for authorizing OAuth2 accounts in a browser.
    #[serde(default)]
    pub onboarding: Option<OnboardingConfig>,
    /// The token service (`/token`): other mailgates use this one as their auth server.
    #[serde(default)]
    pub token_service: Option<TokenServiceConfig>,
    /// The backend operations (`/backends`, `mailgate backends`): status, drain, undrain,
    /// kick and move.
    #[serde(default)]
    pub backends: Option<BackendsAdminConfig>,
}

/// The login of the backend operations: HTTP basic auth with `user` and a password from a
/// file or the environment (`mailgate backends` reads it from the same place).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendsAdminConfig {
    #[serde(default = "default_onboarding_user")]
    pub user: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Read from `password_file` or `password_env`.
    #[serde(skip)]
    pub password: Option<Secret<String>>,
}

/// A certificate chain and its private key, PEM.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The onboarding page: HTTP basic auth with `user` and a password from a file or the
/// environment.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OnboardingConfig {
    #[serde(default = "default_onboarding_user")]
    pub user: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Read from `password_file` or `password_env`.
    #[serde(skip)]
    pub password: Option<Secret<String>>,
    /// Where providers send the browser back after consent: this endpoint's
    /// `/oauth/callback`, e.g. `https://mailgate.example:9443/oauth/callback`, as registered
    /// with the provider. Without it, only the device flow is offered.
    #[serde(default)]
    pub redirect_url: Option<String>,
}

/// The token service: HTTP basic auth, as the auth servers of other mailgates send it. Each
/// of `clients` has its own password and the accounts it may fetch; `user` with a password
/// from a file or the environment is one more client, which may fetch every account.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenServiceConfig {
    #[serde(default = "default_token_service_user")]
    pub user: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Read from `password_file` or `password_env`.
    #[serde(skip)]
    pub password: Option<Secret<String>>,
    /// Basic-auth user name -> its password and accounts.
    #[serde(default)]
    pub clients: BTreeMap<String, TokenServiceClient>,
}

/// One client of the token service (a sidecar): its password and the OAuth2 accounts it may
/// fetch tokens for (`*`: every account).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenServiceClient {
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Read from `password_file` or `password_env`.
    #[serde(skip)]
    pub password: Option<Secret<String>>,
    pub accounts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `mailgate=debug`; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

/// One reason a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}: {}: {}",
                self.path.display(),
                problem.key,
                problem.reason
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses, resolves secret files and validates `path`.
    ///
    /// # Errors
    /// Every problem found, each with its key path; nothing is half-applied.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            problems: vec![Problem {
                key: "(file)".to_owned(),
                reason: e.to_string(),
            }],
        })?;
        Config::from_text(path, &text)
    }

    /// Like [`Config::load`] for text already read from `path` (named in the problems).
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn from_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::from_text_with(path, text, Files::Read)
    }

    /// Like [`Config::from_text`]; with [`Files::Skip`], files and environment variables the
    /// configuration refers to (secrets, CA files, keys) are not read or checked, so that an
    /// example can be checked away from its production secrets (`check --no-files`).
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn from_text_with(path: &Path, text: &str, files: Files) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            path: path.to_owned(),
            problems,
        };
        let mut config = Config::parse(text).map_err(|problem| fail(vec![problem]))?;
        let problems = config.resolve_and_validate(files);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Every file this configuration reads besides itself (secrets, keys, certificates, CA
    /// files), so that a change to one (a rotated Kubernetes Secret) can be noticed.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = Vec::new();
        let mut add = |path: &Option<PathBuf>| files.extend(path.iter().cloned());
        for listener in &self.listeners {
            add(&listener.upstream.ca_file);
            add(&listener.upstream.routes_file);
            if let Some(tls) = &listener.tls {
                add(&tls.cert_file);
                add(&tls.key_file);
            }
        }
        add(&self.client_auth.accounts_file);
        if let Some(auth_server) = &self.client_auth.auth_server {
            add(&auth_server.password_file);
            add(&auth_server.ca_file);
        }
        if let Some(admin) = &self.admin {
            if let Some(tls) = &admin.tls {
                add(&Some(tls.cert_file.clone()));
                add(&Some(tls.key_file.clone()));
            }
            if let Some(onboarding) = &admin.onboarding {
                add(&onboarding.password_file);
            }
            if let Some(backends) = &admin.backends {
                add(&backends.password_file);
            }
            if let Some(service) = &admin.token_service {
                add(&service.password_file);
                for client in service.clients.values() {
                    add(&client.password_file);
                }
            }
        }
        if let Some(auth_server) = &self.tokens.auth_server {
            add(&auth_server.password_file);
            add(&auth_server.ca_file);
        }
        if let Some(oauth2) = &self.tokens.oauth2 {
            if let Some(store) = &oauth2.store {
                add(&store.key_file);
            }
            for provider in oauth2.providers.values() {
                add(&provider.client_secret_file);
                add(&provider.service_account_file);
                add(&provider.ca_file);
                if let Some(certificate) = &provider.client_certificate {
                    add(&Some(certificate.cert_file.clone()));
                    add(&Some(certificate.key_file.clone()));
                }
            }
        }
        if let Some(shared) = &self.tokens.shared {
            add(&shared.key_file);
            add(&shared.redis.password_file);
            add(&shared.redis.ca_file);
        }
        files
    }

    /// Parses YAML text; unknown keys and wrong types are reported with their key path.
    pub fn parse(text: &str) -> Result<Config, Problem> {
        // The path is kept aside: the deserializer must see the error to stop cleanly.
        let mut failed_at = None;
        serde_saphyr::with_deserializer_from_str(text, |deserializer| {
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                failed_at = Some(error.path().to_string());
                error.into_inner()
            })
        })
        .map_err(|error| Problem {
            key: failed_at.map_or_else(|| "(yaml)".to_owned(), key_or_root),
            reason: first_line(&error.to_string()),
        })
    }

    /// Loads `*_file` / `*_env` secrets into place and checks every rule; returns all problems.
    fn resolve_and_validate(&mut self, files: Files) -> Vec<Problem> {
        let mut problems = Problems {
            found: Vec::new(),
            files,
        };
        if !is_host_name(&self.hostname) {
            problems.add(
                "hostname",
                "must be a host name: 1-253 characters of a-z, A-Z, 0-9, '.' and '-'",
            );
        }
        for (i, listener) in self.listeners.iter_mut().enumerate() {
            let key = format!("listeners[{i}].upstream");
            listener.upstream.resolve_pool(&key, &mut problems);
        }
        self.validate_listeners(&mut problems);
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.add(
                "log.level",
                "not a level or filter such as info or mailgate=debug",
            );
        }
        let password_grants = self.client_auth.mode == ClientAuthMode::OAuth2Password;
        self.tokens.resolve(&mut problems, password_grants);
        if let Some(admin) = &mut self.admin {
            admin.resolve(self.tokens.oauth2.as_ref(), &mut problems);
        }
        self.resolve_client_auth(&mut problems);
        problems.found
    }

    fn validate_listeners(&self, problems: &mut Problems) {
        if self.listeners.is_empty() {
            problems.add("listeners", "at least one listener is required");
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            if !is_label_safe(&listener.name) {
                problems.add(
                    format!("{key}.name"),
                    "must be 1-64 characters of a-z, 0-9, '-' or '_'",
                );
            }
            if self.listeners[..i].iter().any(|l| l.name == listener.name) {
                problems.add(format!("{key}.name"), "duplicate listener name");
            }
            if self.listeners[..i]
                .iter()
                .any(|l| l.listen == listener.listen)
            {
                problems.add(format!("{key}.listen"), "address used by another listener");
            }
            if self.admin.as_ref().map(|m| m.listen) == Some(listener.listen) {
                problems.add(format!("{key}.listen"), "address used by admin.listen");
            }
            if !LINE_LENGTH_RANGE.contains(&listener.max_line_length) {
                problems.add(
                    format!("{key}.max_line_length"),
                    format!(
                        "must be between {} and {} bytes",
                        LINE_LENGTH_RANGE.start(),
                        LINE_LENGTH_RANGE.end()
                    ),
                );
            }
            if listener.max_literal_size > MAX_LITERAL_SIZE_LIMIT {
                problems.add(
                    format!("{key}.max_literal_size"),
                    format!("must be at most {MAX_LITERAL_SIZE_LIMIT} bytes"),
                );
            }
            if listener.max_connections == 0 {
                problems.add(format!("{key}.max_connections"), "must be at least 1");
            }
            if listener.max_connections_per_client == Some(0) {
                problems.add(
                    format!("{key}.max_connections_per_client"),
                    "must be at least 1",
                );
            }
            for (name, value) in [
                ("pre_auth_timeout", listener.pre_auth_timeout),
                ("pre_auth_lifetime", listener.pre_auth_lifetime),
                ("login_timeout", listener.login_timeout),
                ("idle_timeout", listener.idle_timeout),
                (
                    "upstream.connect_timeout",
                    listener.upstream.connect_timeout,
                ),
            ] {
                if value.is_zero() {
                    problems.add(format!("{key}.{name}"), "must be longer than 0s");
                }
            }
            let upstream = &listener.upstream;
            if upstream.max_concurrent_connects == 0 {
                problems.add(
                    format!("{key}.upstream.max_concurrent_connects"),
                    "must be at least 1",
                );
            }
            if let Some(reason) = listener
                .protocol
                .refuses_forwarding(upstream.forward_client)
            {
                problems.add(format!("{key}.upstream.forward_client"), reason);
            }
            for (j, network) in listener.accept_proxy.iter().enumerate() {
                if network.parse::<ipnet::IpNet>().is_err()
                    && network.parse::<std::net::IpAddr>().is_err()
                {
                    problems.add(
                        format!("{key}.accept_proxy[{j}]"),
                        "not an address or a network in CIDR form (10.0.0.0/8, 2001:db8::/32)",
                    );
                }
            }
            if let Some(tls) = &listener.tls {
                match (tls.mode, &tls.cert_file, &tls.key_file) {
                    (TlsMode::None, _, _) => {}
                    (_, Some(cert_file), Some(key_file)) => admin::check_certificate(
                        &CertificateFiles {
                            cert_file: cert_file.clone(),
                            key_file: key_file.clone(),
                        },
                        &format!("{key}.tls"),
                        problems,
                    ),
                    _ => problems.add(
                        format!("{key}.tls"),
                        "implicit and starttls need cert_file and key_file",
                    ),
                }
            }
            if upstream.tls != TlsMode::None
                && problems.reads_files()
                && let Err(error) =
                    crate::tls::client_config(upstream.ca_file.as_deref(), upstream.system_roots)
            {
                problems.add(format!("{key}.upstream.ca_file"), error.to_string());
            }
        }
    }

    fn resolve_client_auth(&mut self, problems: &mut Problems) {
        let client_auth = &mut self.client_auth;
        if client_auth.hash_workers == Some(0) {
            problems.add("client_auth.hash_workers", "must be at least 1");
        }
        if client_auth.checks_per_address == 0 {
            problems.add("client_auth.checks_per_address", "must be at least 1");
        }
        let throttle = &client_auth.throttle;
        for (name, value) in [
            ("hash_queue_timeout", client_auth.hash_queue_timeout),
            ("throttle.window", throttle.window),
        ] {
            if value.is_zero() {
                problems.add(format!("client_auth.{name}"), "must be longer than 0s");
            }
        }
        if throttle.max_failure_delay < throttle.failure_delay {
            problems.add(
                "client_auth.throttle.max_failure_delay",
                "must not be shorter than client_auth.throttle.failure_delay",
            );
        }
        if throttle.block_network_after != 0
            && throttle.block_network_after < throttle.block_address_after
        {
            problems.add(
                "client_auth.throttle.block_network_after",
                "must not be lower than client_auth.throttle.block_address_after: a network holds many addresses",
            );
        }
        if let Some(path) = client_auth
            .accounts_file
            .as_ref()
            .filter(|_| problems.reads_files())
        {
            match read_secret_file(path).and_then(|text| {
                serde_saphyr::from_str::<BTreeMap<String, Secret<String>>>(&text).map_err(|e| {
                    format!(
                        "not a map of account to hash: {}",
                        first_line(&e.to_string())
                    )
                })
            }) {
                Ok(accounts) => client_auth.accounts.extend(accounts),
                Err(reason) => problems.add("client_auth.accounts_file", reason),
            }
        }
        for (account, hash) in &client_auth.accounts {
            let is_argon2 = argon2::PasswordHash::new(hash.expose())
                .is_ok_and(|parsed| parsed.algorithm.as_str().starts_with("argon2"));
            if !is_argon2 {
                problems.add(
                    format!("client_auth.accounts.{account}"),
                    "not an argon2 PHC string ($argon2id$...)",
                );
            }
        }
        self.resolve_delegated(problems);
        let client_auth = &self.client_auth;
        match client_auth.mode {
            ClientAuthMode::Static
                if client_auth.accounts.is_empty()
                    && (problems.reads_files() || client_auth.accounts_file.is_none()) =>
            {
                problems.add(
                    "client_auth.accounts",
                    "mode static needs at least one account",
                );
            }
            ClientAuthMode::Any if !client_auth.allow_remote => {
                for (i, listener) in self.listeners.iter().enumerate() {
                    if !listener.listen.ip().is_loopback() {
                        problems.add(
                            format!("listeners[{i}].listen"),
                            "client_auth.mode any accepts every password: listen on loopback, or set client_auth.allow_remote: true",
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

impl Config {
    /// The sections of the delegated modes: the one the mode needs, resolved; a section of
    /// another mode is refused, since leaving out `mode` would silently accept every password.
    fn resolve_delegated(&mut self, problems: &mut Problems) {
        let client_auth = &mut self.client_auth;
        let mode = client_auth.mode;
        if client_auth.delegated_checks == 0 {
            problems.add("client_auth.delegated_checks", "must be at least 1");
        }
        let unused = |section: &str| {
            format!(
                "used only by mode {section}, but client_auth.mode is {}",
                mode.name()
            )
        };
        match (&mut client_auth.auth_server, mode) {
            (Some(auth_server), ClientAuthMode::AuthServer) => {
                auth_server.resolve("client_auth.auth_server", true, problems);
            }
            (None, ClientAuthMode::AuthServer) => problems.add(
                "client_auth.auth_server",
                "mode auth_server needs it: the url that checks user names and passwords",
            ),
            (Some(_), _) => problems.add("client_auth.auth_server", unused("auth_server")),
            (None, _) => {}
        }
        match (&mut client_auth.oauth2_password, mode) {
            (Some(grant), ClientAuthMode::OAuth2Password) => {
                grant.resolve(self.tokens.oauth2.as_ref(), problems);
            }
            (None, ClientAuthMode::OAuth2Password) => problems.add(
                "client_auth.oauth2_password",
                "mode oauth2_password needs it: the provider in tokens.oauth2.providers that checks passwords",
            ),
            (Some(_), _) => {
                problems.add("client_auth.oauth2_password", unused("oauth2_password"));
            }
            (None, _) => {}
        }
    }
}

impl PasswordGrantConfig {
    /// Copies the named provider's settings from `tokens.oauth2`, already resolved.
    fn resolve(&mut self, oauth2: Option<&OAuth2Config>, problems: &mut Problems) {
        let provider = oauth2.and_then(|oauth2| oauth2.providers.get(&self.provider));
        let (Some(oauth2), Some(provider)) = (oauth2, provider) else {
            problems.add(
                "client_auth.oauth2_password.provider",
                format!(
                    "no provider named {:?} in tokens.oauth2.providers",
                    self.provider
                ),
            );
            return;
        };
        if provider.client_id.is_none() {
            problems.add(
                format!("tokens.oauth2.providers.{}.client_id", self.provider),
                "required by client_auth.oauth2_password",
            );
        }
        self.resolved = Some(provider.clone());
        self.timeout = oauth2.timeout;
    }
}

/// Whether checking a configuration reads the files and environment variables it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    Read,
    Skip,
}

/// The problems found so far, and how to look for more.
pub(crate) struct Problems {
    found: Vec<Problem>,
    files: Files,
}

impl Problems {
    pub(crate) fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.found.push(Problem {
            key: key.into(),
            reason: reason.into(),
        });
    }

    pub(crate) fn reads_files(&self) -> bool {
        self.files == Files::Read
    }
}

pub(crate) fn read_secret_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Puts `password` into the URL's userinfo; an unparsable URL is reported elsewhere.
pub(crate) fn with_password(url: &Secret<String>, password: &str) -> Secret<String> {
    match url::Url::parse(url.expose()) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(Some(password));
            Secret::new(parsed.to_string())
        }
        Err(_) => url.clone(),
    }
}

fn is_host_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// Whether `port` is unset (serde's `skip_serializing_if`).
fn is_zero(port: &u16) -> bool {
    *port == 0
}

fn is_label_safe(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn key_or_root(path: String) -> String {
    if path == "." || path.is_empty() {
        "(root)".to_owned()
    } else {
        path
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

pub const DEFAULT_LOG_LEVEL: &str = "info";

fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.to_owned()
}
fn default_hostname() -> String {
    DEFAULT_HOSTNAME.to_owned()
}
fn default_drain_delay() -> Duration {
    DEFAULT_DRAIN_DELAY
}
fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}
fn default_config_watch_interval() -> Duration {
    DEFAULT_CONFIG_WATCH_INTERVAL
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_line_length() -> usize {
    DEFAULT_MAX_LINE_LENGTH
}
fn default_max_literal_size() -> usize {
    DEFAULT_MAX_LITERAL_SIZE
}
fn default_onboarding_user() -> String {
    "admin".to_owned()
}
fn default_token_service_user() -> String {
    "mailgate".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_pre_auth_timeout() -> Duration {
    DEFAULT_PRE_AUTH_TIMEOUT
}
fn default_pre_auth_lifetime() -> Duration {
    DEFAULT_PRE_AUTH_LIFETIME
}
fn default_login_timeout() -> Duration {
    DEFAULT_LOGIN_TIMEOUT
}
fn default_remember() -> Duration {
    DEFAULT_REMEMBER
}
fn default_delegated_checks() -> usize {
    DEFAULT_DELEGATED_CHECKS
}
fn default_checks_per_address() -> usize {
    DEFAULT_CHECKS_PER_ADDRESS
}
fn default_hash_queue_timeout() -> Duration {
    DEFAULT_HASH_QUEUE_TIMEOUT
}
fn default_failure_delay() -> Duration {
    DEFAULT_FAILURE_DELAY
}
fn default_max_failure_delay() -> Duration {
    DEFAULT_MAX_FAILURE_DELAY
}
fn default_failure_window() -> Duration {
    DEFAULT_FAILURE_WINDOW
}
fn default_block_address_after() -> u32 {
    DEFAULT_BLOCK_ADDRESS_AFTER
}
fn default_block_account_after() -> u32 {
    DEFAULT_BLOCK_ACCOUNT_AFTER
}
fn default_block_network_after() -> u32 {
    DEFAULT_BLOCK_NETWORK_AFTER
}
fn default_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_max_concurrent_connects() -> usize {
    DEFAULT_MAX_CONCURRENT_CONNECTS
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret::new)
    }
}

/// A secret is written in the file as its value is.
impl<T: JsonSchema> JsonSchema for Secret<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        T::json_schema(generator)
    }
}

/// Secrets print as `[redacted]` when a configuration is shown.
impl<T> Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

/// Shows the URL with its password and every query value masked (either may be a secret),
/// so `check --print` stays useful.
pub(crate) fn serialize_url<S: serde::Serializer>(
    url: &Secret<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url::Url::parse(url.expose()) {
        Ok(parsed) => serializer.serialize_str(&redacted_url(&parsed)),
        Err(_) => url.serialize(serializer),
    }
}

fn redacted_url(url: &url::Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if !url.username().is_empty() || url.password().is_some() {
        shown.push_str(url.username());
        if url.password().is_some() {
            shown.push_str(":[redacted]");
        }
        shown.push('@');
    }
    shown.push_str(url.host_str().unwrap_or_default());
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    if let Some(query) = url.query() {
        let keys: Vec<String> = query
            .split('&')
            .map(|pair| {
                let key = pair.split('=').next().unwrap_or_default();
                format!("{key}=[redacted]")
            })
            .collect();
        shown.push('?');
        shown.push_str(&keys.join("&"));
    }
    shown
}

/// Listen addresses: `IP:port`, explained when they are not.
mod listen_address {
    use std::net::{IpAddr, SocketAddr};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(value: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        value.to_string().serialize(serializer)
    }

    fn parse(text: &str) -> Result<SocketAddr, String> {
        if let Ok(address) = text.parse() {
            return Ok(address);
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!(
                "{text:?} has no port: write IP:port, e.g. 127.0.0.1:1587"
            ));
        };
        if port.parse::<u16>().is_err() {
            return Err(format!("port {port:?} is not a number from 1 to 65535"));
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.parse::<IpAddr>().is_err() {
            return Err(format!(
                "{host:?} is not an IP address: listen addresses are not resolved; write 127.0.0.1:{port} (or [::1]:{port}, 0.0.0.0:{port})"
            ));
        }
        Err(format!(
            "{text:?} is not IP:port; IPv6 addresses go in brackets: [::1]:{port}"
        ))
    }
}

/// Durations written as `5s`, `5m`, `1h`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Longer than any setting needs; deadlines are this far from now at most, so adding
    /// one to a clock never overflows (a `pre_auth_lifetime` of `300000000000y` panicked every
    /// session).
    const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. 5s, 5m, 1h"
            ))
        })?;
        if duration > MAX {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is over 100 years"
            )));
        }
        Ok(duration)
    }

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
listeners:
  - name: imap
    protocol: imap
    listen: "127.0.0.1:1143"
    upstream: { host: mail.example, port: 143, tls: none }
tokens:
  auth_server: { url: "http://127.0.0.1:8080/token" }
"#;

    fn check(text: &str) -> Result<Config, Vec<Problem>> {
        let mut config = Config::parse(text).map_err(|p| vec![p])?;
        let problems = config.resolve_and_validate(Files::Read);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// The keys of every problem in a config that must be refused.
    fn problem_keys(text: &str) -> Vec<String> {
        check(text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = check(MINIMAL).unwrap();
        let listener = &config.listeners[0];
        assert_eq!(listener.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(listener.upstream.mechanism, MechanismSetting::Auto);
        assert_eq!(config.tokens.cache.refresh_margin, DEFAULT_REFRESH_MARGIN);
        assert_eq!(config.client_auth.mode, ClientAuthMode::Any);
    }

    #[test]
    fn the_per_client_limit_is_the_whole_listener_on_loopback_unless_set() {
        let limit = |text: &str| check(text).unwrap().listeners[0].max_connections_per_client();
        assert_eq!(limit(MINIMAL), DEFAULT_MAX_CONNECTIONS);
        let remote = MINIMAL.replace("127.0.0.1:1143", "0.0.0.0:1143")
            + "client_auth: { allow_remote: true }\n";
        assert_eq!(limit(&remote), DEFAULT_MAX_CONNECTIONS_PER_CLIENT);
        let listener = "    upstream: { host: mail.example, port: 143, tls: none }\n";
        let balanced = MINIMAL.replace(
            listener,
            &format!("{listener}    accept_proxy: [\"127.0.0.1/32\"]\n"),
        );
        assert_eq!(limit(&balanced), DEFAULT_MAX_CONNECTIONS_PER_CLIENT);
        let set = MINIMAL.replace(
            listener,
            &format!("{listener}    max_connections_per_client: 7\n"),
        );
        assert_eq!(limit(&set), 7);
    }

    #[test]
    fn unknown_key_is_refused_with_its_path() {
        let text = MINIMAL.replace("tls: none", "tls: none, colour: blue");
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "listeners[0].upstream.colour");
        assert!(problems[0].reason.contains("unknown field"), "{problems:?}");
    }

    #[test]
    fn bad_duration_names_the_key() {
        let text = MINIMAL.replace("url: \"http", "timeout: soon, url: \"http");
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "tokens.auth_server.timeout");
    }

    #[test]
    fn durations_over_a_hundred_years_are_refused() {
        let text = MINIMAL.replace(
            "tls: none }",
            "tls: none }\n    pre_auth_lifetime: 300000000000y",
        );
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "listeners[0].pre_auth_lifetime");
        assert!(
            problems[0].reason.contains("over 100 years"),
            "{problems:?}"
        );
        let text = MINIMAL.replace("tls: none }", "tls: none }\n    pre_auth_lifetime: 99y");
        assert!(check(&text).is_ok());
    }

    #[test]
    fn any_mode_refuses_remote_listeners() {
        let text = MINIMAL.replace("127.0.0.1:1143", "0.0.0.0:1143");
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "listeners[0].listen");
        let allowed = format!("{text}client_auth: {{ allow_remote: true }}\n");
        assert!(check(&allowed).is_ok());
    }

    #[test]
    fn every_problem_is_reported() {
        let text = MINIMAL
            .replace("port: 143", "port: 0")
            .replace("http://127.0.0.1:8080/token", "ftp://x");
        let keys = problem_keys(&text);
        assert_eq!(
            keys,
            ["listeners[0].upstream.port", "tokens.auth_server.url"]
        );
    }

    #[test]
    fn url_password_never_in_errors_or_output() {
        let text = MINIMAL.replace("http://127.0.0.1:8080/token", "nope://u:s3cret@");
        let problems = check(&text).unwrap_err();
        assert!(!format!("{problems:?}").contains("s3cret"));
        let config = Config::parse(&MINIMAL.replace("http://", "http://u:s3cret@")).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn printed_urls_mask_the_password_and_query_values() {
        let url = url::Url::parse("https://u:s3cret@auth.example:8443/token?key=k3y&x").unwrap();
        assert_eq!(
            redacted_url(&url),
            "https://u:[redacted]@auth.example:8443/token?key=[redacted]&x=[redacted]"
        );
        let config = Config::parse(&MINIMAL.replace("/token", "/token?key=k3y")).unwrap();
        let printed = serde_saphyr::to_string(&config).unwrap();
        assert!(!printed.contains("k3y"), "{printed}");
        assert!(printed.contains("level: info"), "{printed}");
    }

    #[test]
    fn zero_timeouts_and_shared_addresses_are_refused() {
        let text = MINIMAL.replace("tls: none", "tls: none, connect_timeout: 0s")
            + "metrics: { listen: \"127.0.0.1:1143\" }\n";
        let keys = problem_keys(&text);
        assert_eq!(
            keys,
            [
                "listeners[0].listen",
                "listeners[0].upstream.connect_timeout"
            ]
        );
    }

    #[test]
    fn client_facing_settings_are_checked() {
        let listener = "    upstream: { host: mail.example, port: 143, tls: none }\n";
        let extra = "    max_line_length: 100\n    max_literal_size: 2000000\n    \
                     accept_proxy: [\"10.0.0.0/8\", \"lb.example\"]\n    \
                     tls: { mode: starttls }\n";
        let text = MINIMAL
            .replace(listener, &format!("{listener}{extra}"))
            .replace("tls: none }", "tls: none, forward_client: xclient }");
        assert_eq!(
            problem_keys(&text),
            [
                "listeners[0].max_line_length",
                "listeners[0].max_literal_size",
                "listeners[0].upstream.forward_client",
                "listeners[0].accept_proxy[1]",
                "listeners[0].tls",
            ]
        );
    }

    #[test]
    fn pop3_and_managesieve_upstreams_learn_the_client_only_from_proxy_v2() {
        for protocol in ["pop3", "managesieve"] {
            let listener = MINIMAL.replace("protocol: imap", &format!("protocol: {protocol}"));
            for refused in ["id", "xclient"] {
                let text = listener.replace(
                    "tls: none }",
                    &format!("tls: none, forward_client: {refused} }}"),
                );
                assert_eq!(
                    problem_keys(&text),
                    ["listeners[0].upstream.forward_client"],
                    "{protocol} with {refused}"
                );
            }
            let text = listener.replace("tls: none }", "tls: none, forward_client: proxy_v2 }");
            assert!(check(&text).is_ok(), "{protocol} with proxy_v2");
        }
    }

    #[test]
    fn log_level_must_be_a_filter() {
        let problems = check(&format!("{MINIMAL}log: {{ level: \"=nonsense[\" }}\n")).unwrap_err();
        assert_eq!(problems[0].key, "log.level");
        assert!(
            check(&format!(
                "{MINIMAL}log: {{ level: \"mailgate=debug,info\" }}\n"
            ))
            .is_ok()
        );
    }

    /// A config with only OAuth2 accounts, the `oauth2` section given as YAML lines.
    fn oauth2_config(oauth2: &str) -> String {
        let listeners = MINIMAL.split("tokens:").next().unwrap();
        format!("{listeners}tokens:\n  oauth2:\n{oauth2}")
    }

    #[test]
    fn oauth2_problems_name_their_keys() {
        let text = oauth2_config(
            r#"    providers:
      m365: { preset: microsoft, client_id: app }
      idp: { preset: custom, token_url: "http://idp.example/token" }
    accounts:
      printer: { provider: m365, grant: client_credentials, user: "scanner@contoso.com" }
      alice: { provider: idp, grant: refresh_token, user: "alice@example.com" }
      "bad id": { provider: nowhere, grant: jwt_bearer, user: "x" }
"#,
        );
        let keys = problem_keys(&text);
        for expected in [
            "tokens.oauth2.providers.idp.token_url",
            "tokens.oauth2.providers.m365.tenant",
            "tokens.oauth2.accounts.printer.grant",
            "tokens.oauth2.accounts.alice.grant",
            "tokens.oauth2.providers.idp.client_id",
            "tokens.oauth2.accounts.bad id",
            "tokens.oauth2.accounts.bad id.provider",
        ] {
            assert!(
                keys.iter().any(|key| key == expected),
                "{expected} missing from {keys:?}"
            );
        }
    }

    #[test]
    fn a_store_needs_a_key_of_32_bytes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "c2hvcnQ=\n").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "QUFB".repeat(10) + "QUE=")).unwrap();
        let with_key = |key: &str| {
            oauth2_config(&format!(
                "    store: {{ dir: /tmp/x{key} }}\n    providers:\n      p: {{ preset: google, client_id: c }}\n    accounts:\n      a: {{ provider: p, grant: refresh_token, user: a@b }}\n"
            ))
        };
        assert_eq!(problem_keys(&with_key("")), ["tokens.oauth2.store"]);
        let text = with_key(&format!(", key_file: \"{}\"", short.display()));
        assert_eq!(problem_keys(&text), ["tokens.oauth2.store.key"]);
        let text = with_key(&format!(", key_file: \"{}\"", good.display()));
        let config = check(&text).unwrap();
        let printed = serde_saphyr::to_string(&config).unwrap();
        assert!(!printed.contains("QUFB"), "{printed}");
    }

    #[test]
    fn the_shared_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, format!("{}\n", "QUFB".repeat(10) + "QUE=")).unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "redis-pass-5x1\n").unwrap();
        let with_shared = |shared: &str| format!("{MINIMAL}  shared:\n{shared}");
        let key = key.display();
        let good = with_shared(&format!(
            "    key_file: \"{key}\"\n    redis: {{ url: \"redis+unix:///run/redis.sock\", password_file: \"{}\" }}\n",
            password.display()
        ));
        let config = check(&good).unwrap();
        let redis = &config.tokens.shared.as_ref().unwrap().redis;
        // The password goes to the connection: a socket's URL has no place for it.
        assert_eq!(redis.url.expose(), "redis+unix:///run/redis.sock");
        assert_eq!(
            redis.password.as_ref().map(|p| p.expose().as_str()),
            Some("redis-pass-5x1")
        );
        assert_eq!(
            problem_keys(&with_shared("    redis: { url: \"redis://r:6379/0\" }\n")),
            ["tokens.shared"]
        );
        let cases = [
            (
                "redis: { url: \"http://r:6379\" }",
                "tokens.shared.redis.url",
            ),
            (
                "redis: { url: \"redis://r:6379/x\" }",
                "tokens.shared.redis.url",
            ),
            (
                "redis: { url: \"redis+unix:///s\", tls: true }",
                "tokens.shared.redis.tls",
            ),
            (
                "redis: { url: \"redis://r:6379/0\", ca_file: /etc/ssl/ca.pem }",
                "tokens.shared.redis.ca_file",
            ),
            (
                "redis: { url: \"redis://r:6379/0\", timeout: 0s }",
                "tokens.shared.redis.timeout",
            ),
            (
                "redis: { url: \"redis+unix:///s\", cluster: true }",
                "tokens.shared.redis.cluster",
            ),
            (
                "redis: { url: \"redis://r:6379/2\", cluster: true }",
                "tokens.shared.redis.url",
            ),
            (
                "redis: { url: \"redis://r:26379/0\", cluster: true, sentinel: primary }",
                "tokens.shared.redis.sentinel",
            ),
            (
                "redis: { url: \"redis+unix:///s\", sentinel: primary }",
                "tokens.shared.redis.sentinel",
            ),
        ];
        for (redis, problem) in cases {
            let text = with_shared(&format!("    key_file: \"{key}\"\n    {redis}\n"));
            assert_eq!(problem_keys(&text), [problem], "{redis}");
        }
        // Without files (`check --no-files`) no key is read, so none is missing.
        let store = oauth2_config(&format!(
            "    store: {{ key_file: \"{key}\" }}\n    providers:\n      p: {{ preset: google, client_id: c }}\n    accounts:\n      a: {{ provider: p, grant: refresh_token, user: a@b }}\n  shared:\n    redis: {{ url: \"redis://r:6379/0\" }}\n"
        ));
        let mut config = Config::parse(&store).unwrap();
        assert!(config.resolve_and_validate(Files::Skip).is_empty());
        assert!(
            check(&store).is_ok(),
            "the store's key seals the shared state"
        );
    }

    #[test]
    fn provider_endpoints_must_be_https_except_on_loopback() {
        assert!(tokens::check_endpoint("https://login.example/token").is_ok());
        assert!(tokens::check_endpoint("http://127.0.0.1:8080/token").is_ok());
        assert!(tokens::check_endpoint("http://localhost/token").is_ok());
        assert!(tokens::check_endpoint("http://idp.example/token").is_err());
        assert!(tokens::check_endpoint("ftp://idp.example/token").is_err());
    }

    #[test]
    fn onboarding_needs_a_password_and_tls_off_loopback() {
        let text = format!(
            "{MINIMAL}admin:\n  listen: \"0.0.0.0:9090\"\n  onboarding: {{ redirect_url: \"https://mx.example/callback\" }}\n  token_service: {{}}\n"
        );
        let keys = problem_keys(&text);
        assert_eq!(
            keys,
            [
                "admin.onboarding",
                "admin.onboarding.redirect_url",
                "admin.token_service",
                "admin.tls"
            ]
        );
        let text = format!(
            "{MINIMAL}metrics:\n  listen: \"127.0.0.1:9090\"\n  onboarding: {{ password_env: MAILGATE_TEST_NO_SUCH_VARIABLE }}\n"
        );
        assert_eq!(problem_keys(&text), ["admin.onboarding.password_env"]);
    }

    #[test]
    fn backend_operations_need_a_login_and_tls_off_loopback() {
        let text = format!(
            "{MINIMAL}admin:\n  listen: \"0.0.0.0:9090\"\n  backends: {{ user: \"a:b\" }}\n"
        );
        assert_eq!(
            problem_keys(&text),
            ["admin.backends.user", "admin.backends", "admin.tls"]
        );
    }

    #[test]
    fn listen_addresses_say_what_the_rule_is() {
        let reason = |listen: &str| {
            check(&MINIMAL.replace("127.0.0.1:1143", listen)).unwrap_err()[0]
                .reason
                .clone()
        };
        assert!(reason("localhost:1587").contains("not resolved; write 127.0.0.1:1587"));
        assert!(reason("127.0.0.1:70000").contains("from 1 to 65535"));
        assert!(reason("127.0.0.1").contains("has no port"));
        assert!(check(&MINIMAL.replace("127.0.0.1:1143", "[::1]:1143")).is_ok());
    }

    #[test]
    fn static_mode_refuses_other_hash_algorithms() {
        let text = format!(
            "{MINIMAL}client_auth:\n  mode: static\n  accounts:\n    alice: \"$pbkdf2-sha256$i=1000$c2FsdA$aGFzaA\"\n"
        );
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "client_auth.accounts.alice");
    }

    /// The minimal config with these `client_auth` lines (indented two spaces).
    fn with_client_auth(lines: &str) -> String {
        format!("{MINIMAL}client_auth:\n{lines}")
    }

    #[test]
    fn a_network_tier_below_the_address_tier_is_refused() {
        let config = check(&with_client_auth("  mode: any\n")).unwrap();
        let throttle = &config.client_auth.throttle;
        assert_eq!(throttle.block_network_after, DEFAULT_BLOCK_NETWORK_AFTER);
        assert_eq!(throttle.block_account_after, 0);
        let text =
            with_client_auth("  throttle: { block_address_after: 20, block_network_after: 10 }\n");
        assert_eq!(
            problem_keys(&text),
            ["client_auth.throttle.block_network_after"]
        );
        let text =
            with_client_auth("  throttle: { block_address_after: 20, block_network_after: 0 }\n");
        assert!(check(&text).is_ok());
    }

    #[test]
    fn auth_server_mode_checks_its_section() {
        let text = with_client_auth("  mode: auth_server\n");
        assert_eq!(problem_keys(&text), ["client_auth.auth_server"]);
        let text = with_client_auth(
            "  mode: auth_server\n  delegated_checks: 0\n  auth_server:\n    url: \"http://u:s3cret@auth.example/check\"\n    timeout: 0s\n    password_file: /nonexistent/mailgate-password\n",
        );
        let problems = check(&text).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "client_auth.delegated_checks",
                "client_auth.auth_server.timeout",
                "client_auth.auth_server.url",
                "client_auth.auth_server.password_file",
            ]
        );
        assert!(problems[2].reason.contains("https"), "{problems:?}");
        assert!(!format!("{problems:?}").contains("s3cret"));
        let text = with_client_auth(
            "  mode: auth_server\n  remember: 0s\n  auth_server: { url: \"http://mailgate:pw@127.0.0.1:8080/check\" }\n",
        );
        let config = check(&text).unwrap();
        assert_eq!(config.client_auth.remember, Duration::ZERO);
        let printed = serde_saphyr::to_string(&config).unwrap();
        assert!(!printed.contains("pw@"), "{printed}");
    }

    #[test]
    fn a_delegated_section_without_its_mode_is_refused() {
        // Left as `any`, every password would be accepted.
        let text = with_client_auth("  auth_server: { url: \"https://auth.example/check\" }\n");
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "client_auth.auth_server");
        assert!(problems[0].reason.contains("mode is any"), "{problems:?}");
        let text = with_client_auth(
            "  mode: static\n  oauth2_password: { provider: idp }\n  accounts_file: /nonexistent\n",
        );
        assert!(problem_keys(&text).contains(&"client_auth.oauth2_password".to_owned()));
    }

    #[test]
    fn oauth2_password_mode_needs_a_provider_with_a_client_id() {
        let listeners = MINIMAL.split("tokens:").next().unwrap();
        let config = |provider: &str, grant: &str| {
            format!(
                "{listeners}tokens:\n  oauth2:\n    providers:\n      idp: {{ preset: custom, token_url: \"https://idp.example/token\"{provider} }}\nclient_auth:\n  mode: oauth2_password\n  oauth2_password: {{ {grant} }}\n"
            )
        };
        // The clients' own grants are the token source: no other is needed.
        let good = check(&config(
            ", client_id: mailgate",
            "provider: idp, scope: mail",
        ))
        .unwrap();
        let grant = good.client_auth.oauth2_password.unwrap();
        assert_eq!(
            grant.resolved.unwrap().client_id.as_deref(),
            Some("mailgate")
        );
        assert_eq!(grant.timeout, DEFAULT_PROVIDER_TIMEOUT);
        assert_eq!(
            problem_keys(&config("", "provider: idp")),
            ["tokens.oauth2.providers.idp.client_id"]
        );
        assert_eq!(
            problem_keys(&config(", client_id: mailgate", "provider: nowhere")),
            ["client_auth.oauth2_password.provider"]
        );
        let text = with_client_auth("  mode: oauth2_password\n");
        assert_eq!(problem_keys(&text), ["client_auth.oauth2_password"]);
    }

    #[test]
    fn static_mode_needs_valid_hashes() {
        let text =
            format!("{MINIMAL}client_auth:\n  mode: static\n  accounts:\n    alice: not-a-hash\n");
        let problems = check(&text).unwrap_err();
        assert_eq!(problems[0].key, "client_auth.accounts.alice");
    }
}
