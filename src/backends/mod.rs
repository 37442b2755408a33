//! Pools of backend servers, what Dovecot's director did: which server an account's login goes
//! to ([`pool`]), the servers' [`health`], and what is known across listeners and reloads
//! ([`Backends`]): where each account has sessions open, the operator's drains and moves.
//!
//! The rule that keeps an account on one backend: while an account has a session open on a
//! server of a pool, its new logins go there too; when that server cannot take them (down,
//! drained, or another was chosen for the account), its sessions there are ended first.
//! With the replicas' Redis, the account's server, drains and moves are [`shared`] with the
//! other replicas.

pub mod health;
pub mod pool;
pub mod ring;
pub mod shared;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::config::pool::{account_key, read_routes};
use crate::health::Health;
use crate::metrics::{BackendLabels, Metrics};
use crate::sanitize::Escaped;
use health::ServerHealth;
pub use pool::{Pool, RouteError, Server};
use shared::{SharedDrain, SharedState};

/// How long a drain waits for its sessions to end by themselves, unless told otherwise.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(60);

/// What every pool shares: open sessions by account, drains, moves, and the pools themselves.
pub struct Backends {
    state: Mutex<State>,
    /// Told whenever a session leaves, for logins waiting for an account's sessions to end.
    released: Notify,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The state shared with the other replicas, with `tokens.shared`.
    shared: Mutex<Option<Arc<SharedState>>>,
}

#[derive(Default)]
struct State {
    /// The sessions (and logins under way) of each account, by [`account_key`].
    open: HashMap<String, Vec<Open>>,
    /// Drained servers by name.
    drains: HashMap<String, Drain>,
    /// Routes set at runtime (`mailgate backends move`), by account key.
    moves: BTreeMap<String, String>,
    /// Every pool built, oldest first: a listener's newest live one is current (a failed
    /// reload drops its new pools, and the ones in use before are current again).
    pools: Vec<Weak<Pool>>,
    /// Every server health a pool has named, by (listener, server, host, port): kept while a
    /// pool names it, so that a reload keeps what the checks found.
    checks: HashMap<(String, String, String, u16), Weak<ServerHealth>>,
}

struct Open {
    id: u64,
    listener: String,
    server: String,
    end: Arc<End>,
}

struct Drain {
    id: u64,
    since: SystemTime,
    grace: Duration,
}

/// A session's end signal.
#[derive(Default)]
struct End {
    ended: AtomicBool,
    notify: Notify,
}

impl End {
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// A session's (or a login's) place on its server; leaves on drop.
pub struct Lease {
    backends: Arc<Backends>,
    account: String,
    id: u64,
    server: Arc<Server>,
    labels: BackendLabels,
    end: Arc<End>,
}

impl Lease {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Completes when the operator or the pool ends the session (kick, drain, move).
    pub async fn ended(&self) {
        if !self.was_ended() {
            self.end.notify.notified().await;
        }
    }

    pub fn was_ended(&self) -> bool {
        self.end.ended.load(Ordering::Acquire)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.backends.lock();
        if let Some(sessions) = state.open.get_mut(&self.account) {
            sessions.retain(|open| open.id != self.id);
            if sessions.is_empty() {
                state.open.remove(&self.account);
            }
        }
        drop(state);
        self.backends
            .metrics
            .backend_sessions
            .get_or_create(&self.labels)
            .dec();
        self.backends.released.notify_waiters();
    }
}

/// Why an operation on the backends was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperationError {
    #[error("no pool has a server named {0:?}")]
    NoSuchServer(String),
    #[error(
        "nowhere to keep the route: no pool with server {0:?} has a routes_file (or tokens.shared)"
    )]
    NowhereToKeep(String),
    #[error("cannot write the routes file {0}: {1}")]
    Unwritten(PathBuf, String),
    #[error("the other replicas cannot be told: {0}")]
    Unshared(crate::replicas::SharedError),
}

/// One server of one listener's pool, as `mailgate backends` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerStatus {
    pub listener: String,
    pub server: String,
    pub address: String,
    pub weight: u32,
    /// `up`, `down` or `draining`.
    pub state: &'static str,
    pub sessions: usize,
    pub users: usize,
    #[serde(flatten)]
    pub health: health::HealthView,
    /// Seconds since the Unix epoch when the drain began, and its grace.
    pub drained_since: Option<u64>,
    pub drain_grace_seconds: Option<u64>,
}

impl Backends {
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Self {
            state: Mutex::default(),
            released: Notify::new(),
            next_id: AtomicU64::new(0),
            metrics,
            health,
            shared: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `pool` its listener's current one (at start and on reload) while it lives.
    pub fn adopt(&self, pool: &Arc<Pool>) {
        let mut state = self.lock();
        state.pools.retain(|pool| pool.strong_count() > 0);
        state.pools.push(Arc::downgrade(pool));
        state.checks.retain(|_, health| health.strong_count() > 0);
        drop(state);
        self.health_changed();
    }

    /// Readiness: not ready while a pool has no server up.
    fn health_changed(&self) {
        let pools = self.pools();
        let stranded = pools
            .iter()
            .filter(|pool| pool.is_pool() && !pool.any_up())
            .map(|pool| pool.listener().to_owned())
            .collect::<Vec<_>>();
        if !stranded.is_empty() {
            tracing::warn!(listeners = ?stranded, "no server of the pool is up");
        }
        self.health.set_no_backend_up(!stranded.is_empty());
    }

    /// The current pool of each listener.
    fn pools(&self) -> Vec<Arc<Pool>> {
        let mut current: BTreeMap<String, Arc<Pool>> = BTreeMap::new();
        for pool in self.lock().pools.iter().filter_map(Weak::upgrade) {
            current.insert(pool.listener().to_owned(), pool);
        }
        current.into_values().collect()
    }

    fn is_drained(&self, state: &State, server: &str) -> bool {
        state.drains.contains_key(server)
    }

    /// Records a session (or login) of `account` on `server`.
    fn open_lease(
        self: &Arc<Self>,
        state: &mut State,
        account: String,
        listener: &str,
        server: Arc<Server>,
    ) -> Lease {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let end = Arc::new(End::default());
        state.open.entry(account.clone()).or_default().push(Open {
            id,
            listener: listener.to_owned(),
            server: server.name.clone(),
            end: end.clone(),
        });
        let labels = BackendLabels {
            listener: listener.to_owned(),
            server: server.name.clone(),
        };
        self.metrics.backend_sessions.get_or_create(&labels).inc();
        Lease {
            backends: self.clone(),
            account,
            id,
            server,
            labels,
            end,
        }
    }

    /// Ends every session of `account`, here and (through the news) on the other replicas;
    /// returns how many there were here.
    pub async fn kick(&self, account: &str) -> usize {
        let sessions = self.end_sessions(account);
        if let Some(shared) = self.shared() {
            shared.kick(&account_key(account)).await;
        }
        sessions
    }

    /// Ends every session of `account` on this replica; returns how many there were.
    fn end_sessions(&self, account: &str) -> usize {
        let state = self.lock();
        let sessions = state.open.get(&account_key(account)).map_or(0, |sessions| {
            sessions.iter().for_each(|open| open.end.end());
            sessions.len()
        });
        tracing::info!(account = %Escaped(account), sessions, "sessions of the account ended");
        sessions
    }

    /// No new logins on `server`, on every replica; after `grace`, its sessions are ended.
    ///
    /// # Errors
    /// No pool has such a server, or the other replicas cannot be told.
    pub async fn drain(
        self: &Arc<Self>,
        server: &str,
        grace: Duration,
    ) -> Result<(), OperationError> {
        self.known_server(server)?;
        let drain = SharedDrain::new(SystemTime::now(), grace);
        if let Some(shared) = self.shared() {
            shared
                .set_drain(server, Some(drain))
                .await
                .map_err(OperationError::Unshared)?;
        }
        self.start_drain(server, drain);
        Ok(())
    }

    /// Drains `server` here, its grace counted from when the drain began (on any replica).
    fn start_drain(self: &Arc<Self>, server: &str, drain: SharedDrain) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (since, grace) = (drain.since(), drain.grace());
        self.lock()
            .drains
            .insert(server.to_owned(), Drain { id, since, grace });
        self.metrics.backend_draining(server, true);
        tracing::info!(server, grace = %humantime::format_duration(grace), "backend drained: no new logins");
        let left = drain
            .end()
            .and_then(|end| end.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        let backends = Arc::downgrade(self);
        let server = server.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(left).await;
            if let Some(backends) = backends.upgrade() {
                backends.end_drained(&server, id);
            }
        });
    }

    /// Makes `drains` (as Redis keeps them) the drains of this replica's servers.
    fn apply_drains(self: &Arc<Self>, drains: &HashMap<String, SharedDrain>) {
        let local: HashMap<String, SharedDrain> = self
            .lock()
            .drains
            .iter()
            .map(|(server, drain)| (server.clone(), SharedDrain::new(drain.since, drain.grace)))
            .collect();
        for (server, drain) in drains {
            if local.get(server) != Some(drain) && self.known_server(server).is_ok() {
                self.start_drain(server, *drain);
            }
        }
        for server in local.keys().filter(|server| !drains.contains_key(*server)) {
            self.stop_drain(server);
        }
    }

    /// Ends the sessions on `server` if the drain `id` is still in force.
    fn end_drained(&self, server: &str, id: u64) {
        let state = self.lock();
        if state.drains.get(server).is_none_or(|drain| drain.id != id) {
            return;
        }
        let ended = state
            .open
            .values()
            .flatten()
            .filter(|open| open.server == server)
            .inspect(|open| open.end.end())
            .count();
        tracing::info!(
            server,
            sessions = ended,
            "drain's grace over: sessions ended"
        );
    }

    /// Lets `server` take logins again, on every replica; returns whether it was drained
    /// here.
    ///
    /// # Errors
    /// No pool has such a server, or the other replicas cannot be told.
    pub async fn undrain(&self, server: &str) -> Result<bool, OperationError> {
        self.known_server(server)?;
        if let Some(shared) = self.shared() {
            shared
                .set_drain(server, None)
                .await
                .map_err(OperationError::Unshared)?;
        }
        Ok(self.stop_drain(server))
    }

    /// Lets `server` take logins again here; returns whether it was drained.
    fn stop_drain(&self, server: &str) -> bool {
        let was = self.lock().drains.remove(server).is_some();
        self.metrics.backend_draining(server, false);
        tracing::info!(server, was_drained = was, "backend undrained");
        was
    }

    /// Routes `account` to `server` from now on, kept in the routes files of the pools that
    /// have the server and in the replicas' Redis, and ends its sessions elsewhere (on every
    /// replica); returns how many were ended here.
    ///
    /// # Errors
    /// No pool has such a server, nothing keeps routes, a routes file cannot be written, or
    /// the other replicas cannot be told.
    pub async fn move_account(&self, account: &str, server: &str) -> Result<usize, OperationError> {
        let pools = self.pools_with(server)?;
        let files: std::collections::BTreeSet<PathBuf> = pools
            .iter()
            .filter_map(|pool| pool.routes_file().map(PathBuf::from))
            .collect();
        let shared = self.shared();
        if files.is_empty() && shared.is_none() {
            return Err(OperationError::NowhereToKeep(server.to_owned()));
        }
        let key = account_key(account);
        for file in &files {
            keep_route(file, &key, server)
                .map_err(|reason| OperationError::Unwritten(file.clone(), reason))?;
        }
        if let Some(shared) = shared {
            shared
                .set_move(&key, server)
                .await
                .map_err(OperationError::Unshared)?;
        }
        Ok(self.apply_move(&key, Some(server)))
    }

    /// Routes the account (by key) to `server` here (`None`: as configured) and ends its
    /// sessions elsewhere; returns how many were ended.
    fn apply_move(&self, key: &str, server: Option<&str>) -> usize {
        let Some(server) = server else {
            self.lock().moves.remove(key);
            return 0;
        };
        self.lock().moves.insert(key.to_owned(), server.to_owned());
        let ended = self.end_sessions_off(key, server);
        tracing::info!(account = %Escaped(key), server, sessions_ended = ended, "account moved");
        ended
    }

    /// Ends the account's (by key) sessions on other servers than `server`; returns how many.
    fn end_sessions_off(&self, key: &str, server: &str) -> usize {
        self.lock()
            .open
            .get(key)
            .into_iter()
            .flatten()
            .filter(|open| open.server != server)
            .inspect(|open| open.end.end())
            .count()
    }

    /// Each account with a session open here on a pool, and the server of its first.
    fn open_servers(&self) -> Vec<(String, String)> {
        let pooled: Vec<String> = self
            .pools()
            .iter()
            .filter(|pool| pool.is_pool())
            .map(|pool| pool.listener().to_owned())
            .collect();
        self.lock()
            .open
            .iter()
            .filter_map(|(key, sessions)| {
                let first = sessions
                    .iter()
                    .find(|open| pooled.contains(&open.listener))?;
                Some((key.clone(), first.server.clone()))
            })
            .collect()
    }

    /// Whether `server` is up, undrained and in the pool of one of the account's sessions.
    fn can_take(&self, key: &str, server: &str) -> bool {
        let pools = self.pools();
        let state = self.lock();
        state.open.get(key).into_iter().flatten().any(|open| {
            pools
                .iter()
                .filter(|pool| pool.listener() == open.listener)
                .filter_map(|pool| pool.server(server))
                .any(|found| found.is_up() && !self.is_drained(&state, server))
        })
    }

    fn known_server(&self, server: &str) -> Result<(), OperationError> {
        self.pools_with(server).map(drop)
    }

    fn pools_with(&self, server: &str) -> Result<Vec<Arc<Pool>>, OperationError> {
        let pools: Vec<_> = self
            .pools()
            .into_iter()
            .filter(|pool| pool.is_pool() && pool.server(server).is_some())
            .collect();
        if pools.is_empty() {
            return Err(OperationError::NoSuchServer(server.to_owned()));
        }
        Ok(pools)
    }

    /// Every server of every pool, for `mailgate backends`.
    pub fn status(&self) -> Vec<ServerStatus> {
        let pools = self.pools();
        let state = self.lock();
        let mut found = Vec::new();
        for pool in pools.iter().filter(|pool| pool.is_pool()) {
            for server in pool.servers() {
                let on_server =
                    |open: &&Open| open.server == server.name && open.listener == pool.listener();
                let sessions = state.open.values().flatten().filter(on_server).count();
                let users = state
                    .open
                    .values()
                    .filter(|sessions| sessions.iter().any(|open| on_server(&open)))
                    .count();
                let drain = state.drains.get(&server.name);
                let health = server.health_view();
                let server_state = match (drain, health.up) {
                    (Some(_), _) => "draining",
                    (None, true) => "up",
                    (None, false) => "down",
                };
                found.push(ServerStatus {
                    listener: pool.listener().to_owned(),
                    server: server.name.clone(),
                    address: format!("{}:{}", server.connector.host(), server.connector.port()),
                    weight: server.weight,
                    state: server_state,
                    sessions,
                    users,
                    health,
                    drained_since: drain.and_then(|drain| {
                        drain
                            .since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .ok()
                            .map(|since| since.as_secs())
                    }),
                    drain_grace_seconds: drain.map(|drain| drain.grace.as_secs()),
                });
            }
        }
        found
    }
}

/// Writes `account: server` into the routes file, keeping its other routes: to a temporary
/// file first, renamed over it, so that a reader never sees half a file.
fn keep_route(file: &std::path::Path, account: &str, server: &str) -> Result<(), String> {
    let mut routes = if file.exists() {
        read_routes(file)?
    } else {
        BTreeMap::new()
    };
    routes.insert(account.to_owned(), server.to_owned());
    let mut text = String::from("# Account: server. `mailgate backends move` writes here.\n");
    for (account, server) in &routes {
        // JSON strings are YAML strings: quoting and escaping solved once.
        let quote = |text: &str| serde_json::to_string(text).unwrap_or_default();
        text.push_str(&format!("{}: {}\n", quote(account), quote(server)));
    }
    let partial = file.with_extension("partial");
    std::fs::write(&partial, text).map_err(|e| e.to_string())?;
    std::fs::rename(&partial, file).map_err(|e| e.to_string())
}
