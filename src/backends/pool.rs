//! One listener's servers and how an account's login is routed to one of them: first to where
//! the account has sessions open (the director's rule), then the token source's choice (with
//! `routing: from_token_source`), a route (set in the configuration or by `move`), and last
//! the fallback (`routing: static`) or rendezvous hashing over the servers that take logins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::pool::account_key;
use crate::config::{Routing, UpstreamConfig};
use crate::frontend::MailProtocol;
use crate::metrics::{BackendLabels, Metrics};
use crate::tls::TlsError;
use crate::token::ServerAddress;
use crate::upstream::Connector;

use super::health::{self, Checked, HealthView, Outcome, ServerHealth};
use super::{Backends, Lease, State, ring};

/// How long a login waits for the account's sessions on another server to end (they are
/// told at once; a client that does not read holds its session until its goodbye times out).
const MOVE_WAIT: Duration = Duration::from_secs(5);

/// One server of a pool.
pub struct Server {
    pub name: String,
    pub weight: u32,
    pub connector: Connector,
    /// Its address as a token source's answer would name it (see [`ServerAddress::new`]).
    address: Option<ServerAddress>,
    /// `None` for a listener's only server: nothing to route around it.
    health: Option<Arc<ServerHealth>>,
}

impl Server {
    /// Whether its checks found it up (a lone server always is).
    pub fn is_up(&self) -> bool {
        self.health.as_ref().is_none_or(|health| health.is_up())
    }

    pub fn health_view(&self) -> HealthView {
        self.health.as_ref().map_or(
            HealthView {
                up: true,
                last_error: None,
                last_check: None,
            },
            |health| health.view(),
        )
    }
}

/// Why a login has no server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The token source named a server that is not in the pool.
    #[error("the token source named {0}, which is not a server of the pool")]
    OutsidePool(String),
    /// The account's server (its route, the token source's choice) cannot take logins now.
    #[error("the account's server {0} is down or drained")]
    ServerUnavailable(String),
    #[error("no server of the pool is up and undrained")]
    NoServer,
    /// The account's sessions on its former server did not end in time.
    #[error("the account's sessions on {0} did not end in time")]
    StillOpen(String),
}

/// A listener's servers, as the configuration of the moment names them.
pub struct Pool {
    listener: String,
    servers: Vec<Arc<Server>>,
    routing: Routing,
    routes: BTreeMap<String, String>,
    fallback: Option<String>,
    routes_file: Option<PathBuf>,
    is_pool: bool,
    backends: Arc<Backends>,
}

/// Where a login goes, decided under the backends' lock.
enum Decision {
    Go(Arc<Server>),
    /// The account's sessions on another server were told to end; wait for them.
    Wait(String),
}

impl Pool {
    /// The pool `config` names, its health checks started (or carried over from the pool
    /// this one replaces), made its listener's current pool.
    ///
    /// # Errors
    /// A server's TLS settings cannot be built.
    pub fn new(
        listener: &str,
        protocol: &'static dyn MailProtocol,
        config: &UpstreamConfig,
        hostname: &str,
        backends: &Arc<Backends>,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let is_pool = config.is_pool();
        let mut servers = Vec::new();
        for server in config.server_list() {
            let connector =
                Connector::new(&config.for_server(&server))?.with_metrics(metrics.clone());
            let health = is_pool.then(|| {
                let checked = Checked {
                    protocol,
                    connector: connector.clone(),
                    hostname: hostname.to_owned(),
                };
                backends.health_of(listener, &server, config, checked)
            });
            servers.push(Arc::new(Server {
                address: ServerAddress::new(&server.host, server.port).ok(),
                name: server.name,
                weight: server.weight,
                connector,
                health,
            }));
        }
        let pool = Arc::new(Self {
            listener: listener.to_owned(),
            servers,
            routing: config.routing,
            routes: config.routes.clone(),
            fallback: config.fallback.clone(),
            routes_file: config.routes_file.clone(),
            is_pool,
            backends: backends.clone(),
        });
        backends.adopt(&pool);
        Ok(pool)
    }

    pub fn listener(&self) -> &str {
        &self.listener
    }

    pub fn is_pool(&self) -> bool {
        self.is_pool
    }

    pub fn servers(&self) -> &[Arc<Server>] {
        &self.servers
    }

    pub fn server(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|server| server.name == name)
    }

    pub fn routes_file(&self) -> Option<&Path> {
        self.routes_file.as_deref()
    }

    pub fn any_up(&self) -> bool {
        self.servers.iter().any(|server| server.is_up())
    }

    /// Some server to ask what the upstream advertises: the first that is up.
    pub fn any_connector(&self) -> &Connector {
        let up = self.servers.iter().find(|server| server.is_up());
        &up.unwrap_or(&self.servers[0]).connector
    }

    /// Has the checks find `name` up or down, as its next checks would.
    #[cfg(test)]
    pub fn set_up(&self, name: &str, up: bool) {
        let health = self.server(name).and_then(|server| server.health.clone());
        let health = health.expect("a server of the pool");
        while health.is_up() != up {
            let outcome = if up {
                Outcome::Passed
            } else {
                Outcome::Failed("told so".to_owned())
            };
            health.record(outcome);
        }
        self.backends.health_changed();
    }

    /// A login connect to `server` failed: it counts as a failed check.
    pub fn connect_failed(&self, server: &Server, error: &std::io::Error) {
        if let Some(health) = &server.health
            && health.record(Outcome::Failed(error.to_string())).is_some()
        {
            self.backends.health_changed();
        }
    }

    /// Chooses `account`'s server and takes a place there; `named` is the token source's
    /// choice, `avoid` the servers this login already failed to reach. With the replicas'
    /// Redis, the server it assigns the account to counts as the account's current one, and
    /// a server chosen here is assigned to it unless another replica was first.
    ///
    /// # Errors
    /// No server can take the login (see [`RouteError`]).
    pub async fn route(
        &self,
        account: &str,
        named: Option<&ServerAddress>,
        avoid: &[&str],
    ) -> Result<Lease, RouteError> {
        let key = account_key(account);
        // A listener's only server has nothing to agree on.
        let Some(shared) = self.backends.shared().filter(|_| self.is_pool) else {
            return self.route_here(&key, named, avoid, None).await;
        };
        let assigned = shared.assigned(&key).await;
        let lease = self
            .route_here(&key, named, avoid, assigned.as_deref())
            .await?;
        let chosen = lease.server().name.as_str();
        // An assignment to a server of this pool that the login did not go to was unusable
        // here: the account moves, on every replica.
        let overwrite = assigned
            .as_deref()
            .is_some_and(|name| name != chosen && self.server(name).is_some());
        match shared.claim(&key, chosen, overwrite).await {
            Some(winner) if winner != chosen && self.usable_now(&winner, avoid) => {
                drop(lease);
                self.route_here(&key, named, avoid, Some(&winner)).await
            }
            _ => Ok(lease),
        }
    }

    /// Whether the server named `name` is of this pool and can take a login now.
    fn usable_now(&self, name: &str, avoid: &[&str]) -> bool {
        let state = self.backends.lock();
        self.server(name)
            .is_some_and(|server| self.usable(&state, server, avoid))
    }

    fn usable(&self, state: &State, server: &Server, avoid: &[&str]) -> bool {
        server.is_up()
            && !self.backends.is_drained(state, &server.name)
            && !avoid.contains(&server.name.as_str())
    }

    /// [`Pool::route`] on what this replica knows, and `assigned`, the server the replicas'
    /// Redis has for the account.
    async fn route_here(
        &self,
        key: &str,
        named: Option<&ServerAddress>,
        avoid: &[&str],
        assigned: Option<&str>,
    ) -> Result<Lease, RouteError> {
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            let released = self.backends.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let elsewhere = {
                let mut state = self.backends.lock();
                match self.decide(&state, key, named, avoid, assigned)? {
                    Decision::Go(server) => {
                        return Ok(self.backends.open_lease(
                            &mut state,
                            key.to_owned(),
                            &self.listener,
                            server,
                        ));
                    }
                    Decision::Wait(elsewhere) => elsewhere,
                }
            };
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(RouteError::StillOpen(elsewhere));
            }
        }
    }

    fn decide(
        &self,
        state: &State,
        key: &str,
        named: Option<&ServerAddress>,
        avoid: &[&str],
        assigned: Option<&str>,
    ) -> Result<Decision, RouteError> {
        let usable = |server: &Arc<Server>| self.usable(state, server, avoid);
        let open_here: Vec<_> = state
            .open
            .get(key)
            .into_iter()
            .flatten()
            .filter(|open| self.server(&open.server).is_some())
            .collect();
        let chosen_by_source = match named {
            Some(named) if self.routing == Routing::FromTokenSource => {
                Some(self.named_by_source(named)?)
            }
            _ => None,
        };
        // The replicas' assignment first: another replica may have sessions open there. An
        // ended session still open (its goodbye under way) holds no account: the login waits
        // for it below instead.
        let current = assigned
            .and_then(|name| self.server(name))
            .filter(|server| usable(server))
            .or_else(|| {
                open_here
                    .iter()
                    .filter(|open| !open.end.ended.load(std::sync::atomic::Ordering::Acquire))
                    .find_map(|open| self.server(&open.server))
                    .filter(|server| usable(server))
            });
        let target = match (chosen_by_source, current) {
            (Some(server), _) if !usable(&server) => {
                return Err(RouteError::ServerUnavailable(server.name.clone()));
            }
            (Some(server), _) => server,
            (None, Some(server)) => server.clone(),
            (None, None) => self.choose(state, key, &usable)?,
        };
        let elsewhere: Vec<_> = open_here
            .iter()
            .filter(|open| open.server != target.name)
            .collect();
        if let Some(first) = elsewhere.first() {
            let former = first.server.clone();
            tracing::info!(from = %former, to = %target.name, sessions = elsewhere.len(),
                "ending the account's sessions on its former server before it moves");
            elsewhere.iter().for_each(|open| open.end.end());
            return Ok(Decision::Wait(former));
        }
        Ok(Decision::Go(target))
    }

    fn named_by_source(&self, named: &ServerAddress) -> Result<Arc<Server>, RouteError> {
        self.servers
            .iter()
            .find(|server| server.address.as_ref() == Some(named))
            .cloned()
            .ok_or_else(|| {
                RouteError::OutsidePool(format!(
                    "{}:{}",
                    crate::sanitize::Escaped(&named.host),
                    named.port
                ))
            })
    }

    /// A route (moved or configured), the fallback, or the best-scored usable server.
    fn choose(
        &self,
        state: &State,
        key: &str,
        usable: &impl Fn(&Arc<Server>) -> bool,
    ) -> Result<Arc<Server>, RouteError> {
        let routed = state
            .moves
            .get(key)
            .and_then(|name| self.server(name))
            .or_else(|| self.routes.get(key).and_then(|name| self.server(name)));
        let fixed = match (routed, self.routing, &self.fallback) {
            (Some(server), _, _) => Some(server),
            (None, Routing::Static, Some(fallback)) => self.server(fallback),
            _ => None,
        };
        if let Some(server) = fixed {
            return if usable(server) {
                Ok(server.clone())
            } else {
                Err(RouteError::ServerUnavailable(server.name.clone()))
            };
        }
        fn weighted(server: &Arc<Server>) -> (&str, u32) {
            (server.name.as_str(), server.weight)
        }
        let candidates: Vec<_> = self
            .servers
            .iter()
            .filter(|server| usable(server))
            .collect();
        let best = ring::best(key, candidates.iter().map(|server| weighted(server)))
            .map(|index| candidates[index].clone())
            .ok_or(RouteError::NoServer)?;
        if self.is_pool
            && let Some(preferred) = ring::best(key, self.servers.iter().map(weighted))
            && self.servers[preferred].name != best.name
        {
            let labels = BackendLabels {
                listener: self.listener.clone(),
                server: self.servers[preferred].name.clone(),
            };
            self.backends
                .metrics
                .backend_rerouted_logins
                .get_or_create(&labels)
                .inc();
        }
        Ok(best)
    }
}

impl Backends {
    /// The health of `server` of `listener`'s pool: the one a former pool had at the same
    /// address, reconfigured, or a new one with its checks started.
    fn health_of(
        self: &Arc<Self>,
        listener: &str,
        server: &crate::config::ServerConfig,
        config: &UpstreamConfig,
        checked: Checked,
    ) -> Arc<ServerHealth> {
        let key = (
            listener.to_owned(),
            server.name.clone(),
            server.host.to_ascii_lowercase(),
            server.port,
        );
        let mut state = self.lock();
        if let Some(health) = state.checks.get(&key).and_then(std::sync::Weak::upgrade) {
            health.configure(config.health.clone(), checked);
            return health;
        }
        let labels = BackendLabels {
            listener: listener.to_owned(),
            server: server.name.clone(),
        };
        let health = Arc::new(ServerHealth::new(
            labels,
            config.health.clone(),
            checked,
            self.metrics.clone(),
        ));
        state.checks.insert(key, Arc::downgrade(&health));
        drop(state);
        let backends = Arc::downgrade(self);
        health::watch(&health, move || {
            if let Some(backends) = backends.upgrade() {
                backends.health_changed();
            }
        });
        health
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{ServerConfig, TlsMode};
    use crate::health::Health;

    /// A pool of servers nobody listens on. Checks run at once, then hourly: one failure
    /// each, short of `fall`, so their health is as the test records it.
    fn pool_of(names: &[&str], adjust: impl FnOnce(&mut UpstreamConfig)) -> Arc<Pool> {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        let backends = Arc::new(Backends::new(metrics.clone(), health));
        pool_in(&backends, names, adjust)
    }

    fn pool_in(
        backends: &Arc<Backends>,
        names: &[&str],
        adjust: impl FnOnce(&mut UpstreamConfig),
    ) -> Arc<Pool> {
        let mut config = UpstreamConfig::new(String::new(), 0, TlsMode::None);
        config.servers = names
            .iter()
            .enumerate()
            .map(|(index, name)| ServerConfig {
                name: (*name).to_owned(),
                host: "127.0.0.1".to_owned(),
                port: 9 + u16::try_from(index).unwrap(),
                weight: 1,
            })
            .collect();
        config.health.interval = Duration::from_secs(3600);
        config.health.fall = 3;
        adjust(&mut config);
        let protocol = crate::protocols::named(crate::config::Protocol::Imap);
        let metrics = backends.metrics.clone();
        Pool::new(
            "imap",
            protocol,
            &config,
            "mailgate.test",
            backends,
            &metrics,
        )
        .unwrap()
    }

    fn preferred(pool: &Pool, account: &str) -> String {
        let servers = pool.servers.iter().map(|s| (s.name.as_str(), s.weight));
        pool.servers[ring::best(account, servers).unwrap()]
            .name
            .clone()
    }

    #[tokio::test]
    async fn an_account_stays_where_its_sessions_are_until_they_end() {
        let pool = pool_of(&["a", "b", "c"], |_| {});
        let first = preferred(&pool, "alice");
        // Its first choice could not be reached: it opened elsewhere.
        let elsewhere = pool.route("alice", None, &[&first]).await.unwrap();
        assert_ne!(elsewhere.server().name, first);
        let again = pool.route("ALICE", None, &[]).await.unwrap();
        assert_eq!(again.server().name, elsewhere.server().name);
        drop((elsewhere, again));
        let back = pool.route("alice", None, &[]).await.unwrap();
        assert_eq!(back.server().name, first);
    }

    #[tokio::test]
    async fn a_drained_servers_sessions_end_before_the_account_moves() {
        let pool = pool_of(&["a", "b", "c"], |_| {});
        let first = preferred(&pool, "bob");
        let open = pool.route("bob", None, &[]).await.unwrap();
        pool.backends
            .drain(&first, Duration::from_secs(3600))
            .await
            .unwrap();
        let moving = pool.route("bob", None, &[]);
        tokio::pin!(moving);
        tokio::select! {
            _ = &mut moving => panic!("moved while a session was open on the drained server"),
            () = open.ended() => {}
        }
        drop(open);
        let moved = moving.await.unwrap();
        assert_ne!(moved.server().name, first);
        assert_eq!(pool.backends.undrain(&first).await, Ok(true));
    }

    #[tokio::test]
    async fn an_ended_session_still_open_does_not_hold_its_account() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("routes.yaml");
        let pool = pool_of(&["a", "b", "c"], |config| {
            config.routes_file = Some(file.clone());
        });
        let first = preferred(&pool, "hal");
        let target = ["a", "b", "c"]
            .into_iter()
            .find(|name| *name != first)
            .unwrap();
        let open = pool.route("hal", None, &[]).await.unwrap();
        pool.backends.move_account("hal", target).await.unwrap();
        let moving = pool.route("hal", None, &[]);
        tokio::pin!(moving);
        tokio::select! {
            _ = &mut moving => panic!("logged in before the ended session closed"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        drop(open);
        assert_eq!(moving.await.unwrap().server().name, target);
    }

    #[tokio::test]
    async fn a_down_server_leaves_the_ring_and_only_its_accounts_move() {
        let pool = pool_of(&["a", "b", "c"], |_| {});
        let down = pool.server("b").unwrap().clone();
        for _ in 0..3 {
            pool.connect_failed(&down, &std::io::Error::other("refused"));
        }
        assert!(!down.is_up());
        for n in 0..200 {
            let account = format!("user{n}");
            let lease = pool.route(&account, None, &[]).await.unwrap();
            let first = preferred(&pool, &account);
            if first == "b" {
                assert_ne!(lease.server().name, "b");
            } else {
                assert_eq!(lease.server().name, first);
            }
        }
    }

    #[tokio::test]
    async fn a_token_source_may_only_name_a_server_of_the_pool() {
        let pool = pool_of(&["a", "b"], |config| {
            config.routing = Routing::FromTokenSource;
        });
        let b = ServerAddress::new("127.0.0.1", 10).unwrap();
        let lease = pool.route("carol", Some(&b), &[]).await.unwrap();
        assert_eq!(lease.server().name, "b");
        let outside = ServerAddress::new("mail.elsewhere.example", 143).unwrap();
        assert!(matches!(
            pool.route("dave", Some(&outside), &[]).await,
            Err(RouteError::OutsidePool(_))
        ));
    }

    #[tokio::test]
    async fn static_routes_win_and_the_rest_go_to_the_fallback() {
        let pool = pool_of(&["a", "b", "c"], |config| {
            config.routing = Routing::Static;
            config.routes.insert("erin".to_owned(), "c".to_owned());
            config.fallback = Some("a".to_owned());
        });
        assert_eq!(
            pool.route("erin", None, &[]).await.unwrap().server().name,
            "c"
        );
        assert_eq!(
            pool.route("frank", None, &[]).await.unwrap().server().name,
            "a"
        );
    }

    #[tokio::test]
    async fn a_move_is_kept_in_the_routes_file_and_ends_sessions_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("routes.yaml");
        let pool = pool_of(&["a", "b", "c"], |config| {
            config.routes_file = Some(file.clone());
        });
        let first = preferred(&pool, "gina");
        let target = ["a", "b", "c"]
            .into_iter()
            .find(|name| *name != first)
            .unwrap();
        let open = pool.route("gina", None, &[]).await.unwrap();
        assert_eq!(pool.backends.move_account("Gina", target).await, Ok(1));
        assert!(open.was_ended());
        drop(open);
        let moved = pool.route("gina", None, &[]).await.unwrap();
        assert_eq!(moved.server().name, target);
        let kept = crate::config::pool::read_routes(&file).unwrap();
        assert_eq!(kept.get("gina").map(String::as_str), Some(target));
        assert!(matches!(
            pool.backends.move_account("gina", "nowhere").await,
            Err(crate::backends::OperationError::NoSuchServer(_))
        ));
    }
}
