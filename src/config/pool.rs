//! A listener's pool of upstream servers (`upstream.servers`): how an account is routed to one
//! of them, and how their health is checked. Checks of the pool's settings, and its routes
//! file, read here so that a bad one is refused with its key.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Problems, UpstreamConfig, first_line, is_host_name, is_label_safe};

/// Most servers in one pool: every login scores each one, and each is a metric label.
pub const MAX_SERVERS: usize = 64;
/// Most routes a routes file may hold: it is read whole at every reload.
pub const MAX_ROUTES: usize = 1_000_000;

/// One backend of a pool.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// How logs, metrics, routes and `mailgate backends` name it. A backend that serves
    /// several listeners (IMAP, POP3, submission) has the same name in each, so that an
    /// account's sessions of every protocol stay on one backend.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// Its share of the accounts relative to the others (rendezvous hashing).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// How a pool chooses an account's server (after the account's open sessions, see
/// docs/backends.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Routes first, then highest-random-weight hashing of the account over the healthy
    /// servers: when a server leaves or joins, only its own accounts move.
    #[default]
    Rendezvous,
    /// Routes first; an account without one goes to `fallback`.
    Static,
    /// The token source's answer (`host`, `port`) first, checked against the pool; then as
    /// `rendezvous`.
    FromTokenSource,
}

/// The background health check of a pool's servers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_interval", with = "super::duration")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// One check (connect, TLS, greeting, capabilities) must finish within this.
    #[serde(default = "default_timeout", with = "super::duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Checks in a row that must pass before a down server takes logins again.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Checks in a row (or failed login connects) that take a server out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            timeout: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    2
}

/// The key accounts are routed, hashed and counted by: account ids differ in case only by
/// the client's whim.
pub fn account_key(account: &str) -> String {
    account.to_ascii_lowercase()
}

/// Reads a routes file: a YAML map of account to server name.
///
/// # Errors
/// The file cannot be read or is not such a map.
pub fn read_routes(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let routes: Option<BTreeMap<String, String>> = serde_saphyr::from_str(&text).map_err(|e| {
        format!(
            "not a map of account to server name: {}",
            first_line(&e.to_string())
        )
    })?;
    let routes = routes.unwrap_or_default();
    if routes.len() > MAX_ROUTES {
        return Err(format!("holds more than {MAX_ROUTES} routes"));
    }
    Ok(routes
        .into_iter()
        .map(|(account, server)| (account_key(&account), server))
        .collect())
}

impl UpstreamConfig {
    /// One server with every other setting at its default.
    pub fn new(host: String, port: u16, tls: super::TlsMode) -> Self {
        Self {
            host,
            port,
            servers: Vec::new(),
            routing: Routing::default(),
            routes: BTreeMap::new(),
            routes_file: None,
            fallback: None,
            health: HealthConfig::default(),
            tls,
            ca_file: None,
            system_roots: true,
            mechanism: super::MechanismSetting::default(),
            connect_timeout: super::default_connect_timeout(),
            max_concurrent_connects: super::DEFAULT_MAX_CONCURRENT_CONNECTS,
            forward_client: super::ForwardClient::default(),
        }
    }

    /// Whether this upstream is a pool of servers rather than one `host` and `port`.
    pub fn is_pool(&self) -> bool {
        !self.servers.is_empty()
    }

    /// The servers logins may go to: the pool's, or the one `host` and `port` (named after
    /// them).
    pub fn server_list(&self) -> Vec<ServerConfig> {
        if self.is_pool() {
            return self.servers.clone();
        }
        vec![ServerConfig {
            name: format!("{}:{}", self.host, self.port),
            host: self.host.clone(),
            port: self.port,
            weight: default_weight(),
        }]
    }

    /// These settings for one server of the pool.
    pub fn for_server(&self, server: &ServerConfig) -> UpstreamConfig {
        UpstreamConfig {
            host: server.host.clone(),
            port: server.port,
            servers: Vec::new(),
            routes: BTreeMap::new(),
            routes_file: None,
            fallback: None,
            ..self.clone()
        }
    }

    /// Checks the servers and routes (`key` is `listeners[i].upstream`); reads the routes
    /// file into `routes`, whose own accounts win.
    pub(super) fn resolve_pool(&mut self, key: &str, problems: &mut Problems) {
        if !self.is_pool() {
            self.check_single(key, problems);
            return;
        }
        if !self.host.is_empty() || self.port != 0 {
            problems.add(
                format!("{key}.servers"),
                "a pool names its servers here; host and port are for one server",
            );
        }
        if self.servers.len() > MAX_SERVERS {
            problems.add(
                format!("{key}.servers"),
                format!("at most {MAX_SERVERS} servers"),
            );
        }
        self.check_servers(key, problems);
        self.check_health(key, problems);
        if let Some(path) = self.routes_file.clone().filter(|_| problems.reads_files()) {
            match read_routes(&path) {
                Ok(from_file) => {
                    for (account, server) in from_file {
                        self.routes.entry(account).or_insert(server);
                    }
                }
                Err(reason) => problems.add(format!("{key}.routes_file"), reason),
            }
        }
        self.routes = std::mem::take(&mut self.routes)
            .into_iter()
            .map(|(account, server)| (account_key(&account), server))
            .collect();
        self.check_routes(key, problems);
    }

    fn check_single(&self, key: &str, problems: &mut Problems) {
        if self.host.trim().is_empty() {
            problems.add(format!("{key}.host"), "must not be empty");
        }
        if self.port == 0 {
            problems.add(format!("{key}.port"), "must not be 0");
        }
        let pool_only = [
            ("routing", self.routing != Routing::Rendezvous),
            ("routes", !self.routes.is_empty()),
            ("routes_file", self.routes_file.is_some()),
            ("fallback", self.fallback.is_some()),
        ];
        for (name, set) in pool_only {
            if set {
                problems.add(format!("{key}.{name}"), "only a pool (servers) routes");
            }
        }
    }

    fn check_servers(&self, key: &str, problems: &mut Problems) {
        let mut names = std::collections::BTreeSet::new();
        let mut addresses = std::collections::BTreeSet::new();
        for (index, server) in self.servers.iter().enumerate() {
            let key = format!("{key}.servers[{index}]");
            if !is_label_safe(&server.name) {
                problems.add(
                    format!("{key}.name"),
                    "1 to 64 letters, digits, '.', '-' or '_' (it is a metric label)",
                );
            } else if !names.insert(server.name.as_str()) {
                problems.add(format!("{key}.name"), "another server has this name");
            }
            if !is_host_name(&server.host) && server.host.parse::<std::net::IpAddr>().is_err() {
                problems.add(format!("{key}.host"), "not a host name or an IP address");
            }
            if server.port == 0 {
                problems.add(format!("{key}.port"), "must not be 0");
            }
            if server.weight == 0 {
                problems.add(format!("{key}.weight"), "must be at least 1");
            }
            let address = (server.host.to_ascii_lowercase(), server.port);
            if !addresses.insert(address) {
                problems.add(
                    format!("{key}.host"),
                    "another server has this host and port",
                );
            }
        }
    }

    fn check_health(&self, key: &str, problems: &mut Problems) {
        let health = &self.health;
        if health.interval.is_zero() {
            problems.add(format!("{key}.health.interval"), "must be longer than 0s");
        }
        if health.timeout.is_zero() {
            problems.add(format!("{key}.health.timeout"), "must be longer than 0s");
        }
        if health.rise == 0 {
            problems.add(format!("{key}.health.rise"), "must be at least 1");
        }
        if health.fall == 0 {
            problems.add(format!("{key}.health.fall"), "must be at least 1");
        }
    }

    fn check_routes(&self, key: &str, problems: &mut Problems) {
        let known = |name: &str| self.servers.iter().any(|server| server.name == name);
        for (account, server) in &self.routes {
            if !known(server) {
                problems.add(
                    format!("{key}.routes.{account}"),
                    format!("no server of the pool is named {server:?}"),
                );
            }
        }
        match (&self.fallback, self.routing) {
            (Some(fallback), _) if !known(fallback) => problems.add(
                format!("{key}.fallback"),
                format!("no server of the pool is named {fallback:?}"),
            ),
            (Some(_), Routing::Rendezvous | Routing::FromTokenSource) => problems.add(
                format!("{key}.fallback"),
                "only routing: static has a fallback; the others hash accounts without a route",
            ),
            (None, Routing::Static) => problems.add(
                format!("{key}.fallback"),
                "routing: static needs the server of accounts without a route",
            ),
            _ => {}
        }
    }
}
