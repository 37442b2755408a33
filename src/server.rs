//! The running service: binds listeners, accepts connections (one task and tracing span each:
//! front end until login, then splice), reloads its configuration, and drains on shutdown.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::admin::{self, Admin, AdminRuntime};
use crate::client_auth::ClientAuth;
use crate::client_auth::throttle::Throttle;
use crate::client_tls::ClientTls;
use crate::config::{Config, ListenerConfig, TlsMode};
use crate::driver::{LoginDriver, Shared};
use crate::frontend_settings::FrontendSettings;
use crate::health::Health;
use crate::io::{BoxedIo, PrefixedIo, linger, write_all_by};
use crate::login::{
    Authenticator, Closing, GOODBYE_TIMEOUT, Handoff, LoginError, LoginRequest, Upstream,
};
use crate::metrics::{ListenerLabels, Metrics};
use crate::proxy_protocol::TrustedProxies;
use crate::replicas::Redis;
use crate::sanitize::Escaped;
use crate::sessions::SessionRegistry;
use crate::smtp::xclient_filter::XclientFilter;
use crate::splice::{Boundary, Counters, SpliceEnd, Stop, Transferred, splice};
use crate::token::cache::TokenCache;
use crate::token::oauth2::{GrantStates, OAuth2};
use crate::token::sources::Sources;
use crate::upstream::Connector;
use crate::{frontend, protocols};

mod slots;
use slots::{Admission, Full, LoginMark, Slot, Slots};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// How often the token source's reachability is checked for readiness, and how old its last
/// answer may be: a Kubernetes readiness probe runs every 10 s by default.
const TOKEN_SOURCE_CHECK_INTERVAL: Duration = Duration::from_secs(10);
const TOKEN_SOURCE_FRESHNESS: Duration = Duration::from_secs(30);
/// When a logged-in session is stopped, how long bytes already read may take to reach their
/// reader before the goodbye ([`GOODBYE_TIMEOUT`]) or the close.
const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// After the grace period, how long closing sessions get to flush and say goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Applies a new `log.level` to the running subscriber.
pub type LogLevelHook = Box<dyn Fn(&str) + Send + Sync>;

/// What the process asks of the running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Re-read the configuration file (SIGHUP).
    Reload,
    /// Stop accepting, drain, exit (SIGTERM, SIGINT).
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {name}: cannot listen on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: io::Error,
    },
    #[error("admin: cannot listen on {address}: {source}")]
    BindAdmin {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("admin TLS: {0}")]
    AdminTls(crate::tls::TlsError),
    #[error("admin: {0}")]
    Admin(String),
    #[error("listener {name}: upstream TLS: {reason}")]
    Upstream { name: String, reason: String },
    #[error("listener {name}: TLS towards clients: {reason}")]
    ClientTls { name: String, reason: String },
    #[error("token source: {0}")]
    TokenSource(String),
    #[error("client_auth: {0}")]
    ClientAuth(String),
}

/// What `check` would warn about in the running configuration (expiring certificates, ...).
fn log_warnings(config: &Config) {
    for warning in config.warnings(crate::config::Files::Read, std::time::SystemTime::now()) {
        tracing::warn!(key = warning.key, "{}", warning.reason);
    }
}

/// The configuration file and its text as it was loaded.
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
}

/// What the files a configuration reads held when it was applied: a hash of each file's
/// content (`None`: unreadable). Reading through the path follows symlinks, so Kubernetes'
/// swap of a Secret volume's `..data` link shows as a change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Fingerprints(Vec<(PathBuf, Option<u64>)>);

impl Fingerprints {
    async fn of(paths: Vec<PathBuf>) -> Self {
        let mut all = Vec::with_capacity(paths.len());
        for path in paths {
            let content = tokio::fs::read(&path).await.ok().map(|bytes| {
                use std::hash::BuildHasher as _;
                // A fixed-key hash: only compared within this process.
                std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default(
                )
                .hash_one(&bytes)
            });
            all.push((path, content));
        }
        Self(all)
    }
}

/// Runs mailgate with `config` until told to shut down, then drains.
///
/// `file` (where `config` came from) is re-read on [`Control::Reload`] and whenever its
/// content changes; a changed `log.level` goes to `log_level`, when the process lets
/// configuration decide it.
///
/// # Errors
/// A listener cannot be bound or an upstream's TLS set up at start; nothing keeps running then.
pub async fn run(
    config: Config,
    file: Option<ConfigFile>,
    mut control: mpsc::Receiver<Control>,
    log_level: Option<LogLevelHook>,
) -> Result<(), StartError> {
    let mut server = Server::start(config, file, log_level).await?;
    log_warnings(&server.config);
    let mut watch_tick = tokio::time::interval(
        server
            .config
            .config_watch_interval
            .max(Duration::from_millis(100)),
    );
    let mut health_tick = tokio::time::interval(TOKEN_SOURCE_CHECK_INTERVAL);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = control.recv() => match command {
                Some(Control::Reload) => server.reload().await,
                Some(Control::Shutdown) | None => break,
            },
            _ = watch_tick.tick(), if !server.config.config_watch_interval.is_zero() => {
                server.watch().await;
            }
            _ = health_tick.tick() => server.check_health(),
        }
    }
    server.drain().await;
    Ok(())
}

struct Server {
    config: Config,
    /// The file's path and its text when it was last loaded, to notice ConfigMap updates.
    file: Option<ConfigFile>,
    /// The files the running configuration reads, as they were when it was applied.
    fingerprints: Fingerprints,
    lasting: Lasting,
    log_level: Option<LogLevelHook>,
    shared: Shared,
    /// Keyed by address: the socket belongs to it, whatever the listener is called.
    listeners: HashMap<SocketAddr, RunningListener>,
    admin: Option<RunningAdmin>,
    sessions: Sessions,
}

/// A bound listener; dropping `stop_accepting` closes it for new connections.
struct RunningListener {
    runtime: Arc<RwLock<Arc<ListenerRuntime>>>,
    _stop_accepting: oneshot::Sender<()>,
}

struct RunningAdmin {
    address: SocketAddr,
    _stop: oneshot::Sender<()>,
}

/// Every session holds a clone of `open`; when all are gone, `all_closed` yields `None`.
struct Sessions {
    open: Option<mpsc::Sender<()>>,
    all_closed: mpsc::Receiver<()>,
    close_now: watch::Sender<bool>,
}

/// What a session needs to know about the server's life cycle.
#[derive(Clone)]
struct SessionHandle {
    _open: mpsc::Sender<()>,
    close_now: watch::Receiver<bool>,
    registry: Arc<SessionRegistry>,
}

impl SessionHandle {
    /// Completes when open sessions must end.
    async fn closing(mut self) {
        let _ = self.close_now.wait_for(|close| *close).await;
    }
}

/// One listener's fixed parts, shared by its sessions; replaced whole on reload.
struct ListenerRuntime {
    driver: LoginDriver,
    settings: FrontendSettings,
    /// TLS from the first byte (implicit TLS); STARTTLS is in `settings`.
    implicit_tls: Option<Arc<ClientTls>>,
    trusted_proxies: TrustedProxies,
    idle_timeout: Duration,
    max_connections: usize,
    max_connections_per_client: usize,
    labels: ListenerLabels,
}

impl Server {
    async fn start(
        config: Config,
        file: Option<ConfigFile>,
        log_level: Option<LogLevelHook>,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(TOKEN_SOURCE_FRESHNESS));
        let lasting = Lasting {
            admin: Arc::new(
                Admin::new(metrics.clone(), health.clone()).map_err(StartError::Admin)?,
            ),
            health,
            registry: Arc::new(SessionRegistry::new(metrics.clone())),
            grants: Arc::new(GrantStates::default()),
            metrics,
        };
        let (tokens, oauth2) = token_state(&config, &lasting).await?;
        let shared = Shared {
            oauth2,
            client_auth: Arc::new(
                ClientAuth::new(&config.client_auth, lasting.metrics.clone())
                    .map_err(StartError::ClientAuth)?,
            ),
            throttle: throttle(&config, &lasting.metrics, tokens.redis())?,
            tokens,
            metrics: lasting.metrics.clone(),
        };
        let (open, all_closed) = mpsc::channel(1);
        let (close_now, _) = watch::channel(false);
        let mut server = Server {
            config: config.clone(),
            fingerprints: Fingerprints::of(config.referenced_files()).await,
            file,
            lasting,
            log_level,
            shared,
            listeners: HashMap::new(),
            admin: None,
            sessions: Sessions {
                open: Some(open),
                all_closed,
                close_now,
            },
        };
        warn_if_descriptors_are_short(&config);
        server.apply(config).await?;
        server.lasting.health.set_listening();
        server.check_health();
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "mailgate started");
        Ok(server)
    }

    /// Re-reads the configuration (SIGHUP); an invalid or unbindable one changes nothing.
    async fn reload(&mut self) {
        let Some(file) = &self.file else {
            return;
        };
        match tokio::fs::read_to_string(&file.path).await {
            Ok(text) => self.reload_from(text, false).await,
            Err(error) => {
                tracing::error!(%error, "cannot read the configuration; keeping the running one");
                self.lasting.metrics.config_reload("invalid");
            }
        }
    }

    /// Reloads when the configuration file or a file it reads has changed.
    async fn watch(&mut self) {
        let Some(file) = &self.file else {
            return;
        };
        let Ok(text) = tokio::fs::read_to_string(&file.path).await else {
            return;
        };
        let files_changed =
            Fingerprints::of(self.config.referenced_files()).await != self.fingerprints;
        if files_changed || text != file.text {
            if files_changed {
                tracing::info!("a file the configuration reads has changed; reloading");
            }
            self.reload_from(text, files_changed).await;
        }
    }

    /// Applies the configuration file's new `text`; with `files_changed` even when the text
    /// is the same (the secrets, keys or CA files it names changed).
    async fn reload_from(&mut self, text: String, files_changed: bool) {
        let Some(file) = &self.file else {
            return;
        };
        let result = match Config::from_text(&file.path, &text) {
            Err(error) => {
                for line in error.to_string().lines() {
                    tracing::error!(
                        problem = line,
                        "configuration refused; keeping the running one"
                    );
                }
                "invalid"
            }
            Ok(config) if config == self.config && !files_changed => "unchanged",
            Ok(config) => match self.apply(config).await {
                Ok(()) => {
                    tracing::info!("configuration reloaded");
                    log_warnings(&self.config);
                    // New credentials for the token source show in readiness at once.
                    self.check_health();
                    "ok"
                }
                Err(error) => {
                    tracing::error!(%error, "configuration not applied; keeping the running one");
                    "failed"
                }
            },
        };
        if let Some(file) = &mut self.file {
            file.text = text;
        }
        // Noted whatever the outcome: a broken file is reported once, not on every tick.
        self.fingerprints = Fingerprints::of(self.config.referenced_files()).await;
        self.lasting.metrics.config_reload(result);
    }

    /// Makes `config` the running configuration: binds what is new first (all or nothing),
    /// then swaps listener runtimes and closes removed listeners. Open sessions keep theirs.
    async fn apply(&mut self, config: Config) -> Result<(), StartError> {
        let (tokens, oauth2) = if config.tokens == self.config.tokens {
            (self.shared.tokens.clone(), self.shared.oauth2.clone())
        } else {
            token_state(&config, &self.lasting).await?
        };
        let shared = Shared {
            oauth2,
            client_auth: self.client_auth_for(&config)?,
            throttle: self.throttle_for(&config, &tokens)?,
            tokens,
            metrics: self.lasting.metrics.clone(),
        };
        let mut prepared = Vec::new();
        for listener in &config.listeners {
            let runtime = Arc::new(listener_runtime(listener, &shared, &config)?);
            let tcp = if self.listeners.contains_key(&listener.listen) {
                None
            } else {
                Some(bind(listener).await?)
            };
            prepared.push((listener.listen, runtime, tcp));
        }
        let admin = self.prepare_admin(&config).await?;

        let mut running = std::mem::take(&mut self.listeners);
        for (address, runtime, tcp) in prepared {
            let entry = match (tcp, running.remove(&address)) {
                (Some(tcp), _) => self.spawn_listener(tcp, runtime),
                (None, Some(existing)) => {
                    *existing.runtime.write().unwrap_or_else(|e| e.into_inner()) = runtime;
                    existing
                }
                (None, None) => continue,
            };
            self.listeners.insert(address, entry);
        }
        for address in running.keys() {
            tracing::info!(%address, "listener closed");
        }
        if config.admin.is_none() {
            self.admin = None;
        } else if let Some(admin) = admin {
            self.admin = Some(admin);
        }
        if let Some(apply_level) = &self.log_level
            && config.log.level != self.config.log.level
        {
            apply_level(&config.log.level);
        }
        self.lasting
            .admin
            .update(admin_runtime(&config, &shared).map_err(StartError::AdminTls)?);
        if !Arc::ptr_eq(&self.shared.tokens, &shared.tokens) {
            self.shared.tokens.retire();
        }
        self.shared = shared;
        self.config = config;
        Ok(())
    }

    /// Keeps the password checks (and their workers' memory) unless their settings changed.
    fn client_auth_for(&self, config: &Config) -> Result<Arc<ClientAuth>, StartError> {
        if config.client_auth == self.config.client_auth {
            return Ok(self.shared.client_auth.clone());
        }
        ClientAuth::new(&config.client_auth, self.lasting.metrics.clone())
            .map(Arc::new)
            .map_err(StartError::ClientAuth)
    }

    /// Keeps the failure counts across a reload unless their rules, or where replicas share
    /// them, changed.
    fn throttle_for(
        &self,
        config: &Config,
        tokens: &TokenCache,
    ) -> Result<Arc<Throttle>, StartError> {
        if config.client_auth.throttle == self.config.client_auth.throttle
            && config.tokens.shared == self.config.tokens.shared
        {
            return Ok(self.shared.throttle.clone());
        }
        throttle(config, &self.lasting.metrics, tokens.redis())
    }

    fn spawn_listener(&self, tcp: TcpListener, runtime: Arc<ListenerRuntime>) -> RunningListener {
        let address = tcp
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        tracing::info!(listener = %runtime.labels.listener, %address, "listening");
        let runtime = Arc::new(RwLock::new(runtime));
        let (stop_accepting, stopped) = oneshot::channel();
        let handle = SessionHandle {
            _open: self
                .sessions
                .open
                .clone()
                .expect("sessions are open until drain"),
            close_now: self.sessions.close_now.subscribe(),
            registry: self.lasting.registry.clone(),
        };
        tokio::spawn(accept_loop(
            tcp,
            runtime.clone(),
            self.lasting.metrics.clone(),
            handle,
            stopped,
        ));
        RunningListener {
            runtime,
            _stop_accepting: stop_accepting,
        }
    }

    /// Binds the admin endpoint if it is new or moved; `None` means keep the current one.
    async fn prepare_admin(&self, config: &Config) -> Result<Option<RunningAdmin>, StartError> {
        let Some(admin_config) = &config.admin else {
            return Ok(None);
        };
        if self.admin.as_ref().map(|a| a.address) == Some(admin_config.listen) {
            return Ok(None);
        }
        let address = admin_config.listen;
        let tcp = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::BindAdmin { address, source })?;
        tracing::info!(%address, "admin endpoint listening (/metrics, /healthz, /readyz)");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(admin::serve(tcp, self.lasting.admin.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Some(RunningAdmin {
            address,
            _stop: stop,
        }))
    }

    /// Probes an idle token source, and logs readiness when it changes.
    /// Probes an idle token source in the background (a slow one must not hold up signals
    /// and reloads), and logs readiness when it changes.
    fn check_health(&self) {
        let health = &self.lasting.health;
        if health.token_source_needs_probe() && !health.probing.swap(true, Ordering::AcqRel) {
            let (tokens, health) = (self.shared.tokens.clone(), health.clone());
            tokio::spawn(async move {
                tokens.probe_source().await;
                health.probing.store(false, Ordering::Release);
                let _ = health.readiness();
            });
        }
        let _ = health.readiness();
    }

    /// Reports not ready at once, keeps accepting for the drain delay (while load balancers
    /// catch up), stops accepting, lets sessions finish within the grace period, then closes
    /// the rest.
    async fn drain(mut self) {
        self.lasting.health.set_draining();
        let _ = self.lasting.health.readiness();
        let delay = self.config.drain_delay;
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "not ready; still accepting during the drain delay"
            );
            tokio::time::sleep(delay).await;
        }
        self.listeners.clear();
        self.sessions.open = None;
        let grace = self.config.shutdown_grace;
        let grace_over = tokio::time::Instant::now() + grace;
        tracing::info!(grace_ms = grace.as_millis() as u64, "draining");
        if tokio::time::timeout(grace, self.sessions.all_closed.recv())
            .await
            .is_err()
        {
            tracing::info!("grace period over; closing the remaining sessions");
            let _ = self.sessions.close_now.send(true);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.sessions.all_closed.recv()).await;
        }
        // Last, so that tokens rotated by the sessions' logins and renewals are written too;
        // within the goodbye phase's end, as the stop budget counts it.
        if let Some(oauth2) = &self.shared.oauth2 {
            oauth2.settle(grace_over + CLOSE_TIMEOUT).await;
        }
        tracing::info!("stopped");
    }
}

/// Connections the kernel queues for a listener before mailgate accepts them. tokio's
/// default of 128 drops part of a burst of reconnecting clients without a word (the attack
/// tests lost up to half of 1,000 simultaneous connects); the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

async fn bind(listener: &ListenerConfig) -> Result<TcpListener, StartError> {
    let address = listener.listen;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(LISTEN_BACKLOG)
        })
        .map_err(|source| StartError::Bind {
            name: listener.name.clone(),
            address,
            source,
        })
}

/// What outlives configuration reloads.
struct Lasting {
    /// The admin endpoint's state (its flows under way), whatever its settings.
    admin: Arc<Admin>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Logged-in sessions by account.
    registry: Arc<SessionRegistry>,
    /// OAuth2 grant states by account.
    grants: Arc<GrantStates>,
}

/// The admin endpoint's settings for `config`: TLS, the onboarding page and the token
/// service over the shared OAuth2 accounts and token cache.
fn admin_runtime(config: &Config, shared: &Shared) -> Result<AdminRuntime, crate::tls::TlsError> {
    let Some(admin) = &config.admin else {
        return Ok(AdminRuntime::default());
    };
    let tls = match &admin.tls {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            &files.cert_file,
            &files.key_file,
            None,
        )?)),
        None => None,
    };
    let providers = shared
        .oauth2
        .as_ref()
        .map(|oauth2| oauth2.providers())
        .unwrap_or_default();
    Ok(AdminRuntime {
        tls,
        onboarding: admin
            .onboarding
            .as_ref()
            .map(|onboarding| admin::onboarding::Settings::new(onboarding, &providers)),
        token_service: admin
            .token_service
            .as_ref()
            .map(admin::token_service::Settings::new),
        oauth2: shared.oauth2.clone(),
        tokens: Some(shared.tokens.clone()),
    })
}

/// Every session holds two descriptors (client and upstream): say so at start when the
/// listeners' limits ask for more than the process may open, before accept fails under load.
fn warn_if_descriptors_are_short(config: &Config) {
    let Some(limit) = open_file_limit() else {
        return;
    };
    let wanted: usize = config
        .listeners
        .iter()
        .map(|listener| listener.max_connections.saturating_mul(2))
        .sum();
    if wanted > limit {
        tracing::warn!(
            open_file_limit = limit,
            needed = wanted,
            "the listeners' max_connections need more descriptors than the process may open: raise the limit (ulimit -n, LimitNOFILE=) or lower max_connections"
        );
    }
}

/// The soft limit on open files, from /proc (Linux).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The throttle `config` sets, counting with the other replicas through `redis` if shared.
fn throttle(
    config: &Config,
    metrics: &Arc<Metrics>,
    redis: Option<&Arc<Redis>>,
) -> Result<Arc<Throttle>, StartError> {
    let throttle = Throttle::new(&config.client_auth.throttle, metrics.clone())
        .map_err(StartError::ClientAuth)?;
    match redis {
        Some(redis) => throttle.shared_through(redis.clone()),
        None => Ok(throttle),
    }
    .map(Arc::new)
    .map_err(StartError::ClientAuth)
}

/// The token cache in front of the sources `config` names, and its OAuth2 accounts; with
/// `tokens.shared`, both backed by the replicas' Redis.
async fn token_state(
    config: &Config,
    lasting: &Lasting,
) -> Result<(Arc<TokenCache>, Option<Arc<OAuth2>>), StartError> {
    let metrics = &lasting.metrics;
    let redis = config
        .tokens
        .shared
        .as_ref()
        .map(|shared| Redis::new(shared, metrics.clone(), Some(lasting.health.clone())))
        .transpose()
        .map_err(StartError::TokenSource)?;
    let sources = Sources::new(
        &config.tokens,
        &lasting.grants,
        metrics,
        &lasting.health,
        redis.clone(),
    )
    .await
    .map_err(StartError::TokenSource)?;
    metrics.export_sources(sources.auth_server.is_some(), sources.oauth2.is_some());
    let oauth2 = sources.oauth2.clone();
    let end_sessions = config
        .tokens
        .end_sessions_on_revoke
        .then(|| lasting.registry.clone());
    let mut tokens = TokenCache::new(
        &config.tokens.cache,
        Arc::new(sources),
        metrics.clone(),
        end_sessions,
    )
    .with_max_concurrent_fetches(config.tokens.max_concurrent_fetches);
    if let (Some(redis), Some(shared)) = (&redis, &config.tokens.shared) {
        let key = shared.key.as_ref().ok_or_else(|| {
            StartError::TokenSource("tokens.shared has no key to seal with".to_owned())
        })?;
        tokens = tokens
            .shared_through(redis.clone(), key)
            .map_err(StartError::TokenSource)?;
    }
    let tokens = Arc::new(tokens);
    if let Some(redis) = &redis {
        tokens.follow_the_news(redis);
    }
    Ok((tokens, oauth2))
}

fn listener_runtime(
    listener: &ListenerConfig,
    shared: &Shared,
    config: &Config,
) -> Result<ListenerRuntime, StartError> {
    let connector = Connector::new(&listener.upstream)
        .map_err(|error| StartError::Upstream {
            name: listener.name.clone(),
            reason: error.to_string(),
        })?
        .with_metrics(shared.metrics.clone());
    shared.metrics.export_listener(&listener.name);
    let client_tls = client_tls(listener, &shared.metrics)?;
    let (implicit_tls, starttls) = match listener.tls.as_ref().map(|tls| tls.mode) {
        Some(TlsMode::Implicit) => (client_tls, None),
        Some(TlsMode::Starttls) => (None, client_tls),
        Some(TlsMode::None) | None => (None, None),
    };
    let trusted_proxies = TrustedProxies::new(&listener.accept_proxy);
    if !listener.accept_proxy.is_empty() {
        for result in crate::proxy_protocol::RESULTS {
            shared.metrics.proxy_header(&listener.name, result, 0);
        }
    }
    Ok(ListenerRuntime {
        driver: LoginDriver::new(
            listener.name.clone(),
            protocols::named(listener.protocol),
            connector,
            listener.login_timeout,
            shared,
            config.hostname.clone(),
        ),
        settings: FrontendSettings {
            hostname: config.hostname.clone(),
            pre_auth_timeout: listener.pre_auth_timeout,
            pre_auth_lifetime: listener.pre_auth_lifetime,
            client: None,
            starttls,
            max_line_length: listener.max_line_length,
            max_literal_size: listener.max_literal_size,
            local: None,
        },
        implicit_tls,
        trusted_proxies,
        idle_timeout: listener.idle_timeout,
        max_connections: listener.max_connections,
        max_connections_per_client: listener.max_connections_per_client(),
        labels: ListenerLabels {
            listener: listener.name.clone(),
        },
    })
}

/// The listener's TLS towards clients, with the certificate as its files hold it now (a
/// reload builds a new one: new handshakes get the new certificate, open sessions keep theirs).
fn client_tls(
    listener: &ListenerConfig,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<ClientTls>>, StartError> {
    let Some(tls) = &listener.tls else {
        return Ok(None);
    };
    let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    if tls.mode == TlsMode::None {
        return Ok(None);
    }
    let alpn = protocols::named(listener.protocol).alpn_id();
    let config = crate::tls::server_config(cert_file, key_file, Some(alpn)).map_err(|error| {
        StartError::ClientTls {
            name: listener.name.clone(),
            reason: error.to_string(),
        }
    })?;
    Ok(Some(Arc::new(ClientTls::new(
        config,
        tls.require,
        &listener.name,
        metrics.clone(),
    ))))
}

async fn accept_loop(
    tcp: TcpListener,
    listener_handle: Arc<RwLock<Arc<ListenerRuntime>>>,
    metrics: Arc<Metrics>,
    sessions: SessionHandle,
    mut stop: oneshot::Receiver<()>,
) {
    static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
    let slots = Arc::new(Slots::default());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        let runtime = listener_handle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let active = metrics
            .connections_active
            .get_or_create(&runtime.labels)
            .clone();
        // A load balancer's connections count against the client its header names.
        let behind_proxy = runtime.trusted_proxies.trusts(peer.ip());
        let client = (!behind_proxy).then_some(peer.ip());
        let limits = (runtime.max_connections, runtime.max_connections_per_client);
        let admission = match slots.try_take(limits, client, active) {
            Ok(admission) => admission,
            Err(full) => {
                refused(&peer, &full, &runtime, &metrics);
                tokio::spawn(async move { refuse(stream, &runtime).await });
                continue;
            }
        };
        if admission.made_room {
            evicted_for(&peer, &runtime, &metrics);
        }
        let _ = stream.set_nodelay(true);
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "session",
            id,
            listener = %runtime.labels.listener,
            client = tracing::field::Empty,
            upstream = %runtime.driver.connector.labels().upstream,
            account = tracing::field::Empty,
        );
        if !behind_proxy {
            span.record("client", tracing::field::display(peer));
        }
        let live = CurrentLogin {
            listener: listener_handle.clone(),
            started_with: runtime.clone(),
            login: admission.slot.login_mark(),
        };
        let session = run_session(
            stream,
            peer,
            runtime,
            live,
            metrics.clone(),
            sessions.clone(),
            admission,
        );
        tokio::spawn(session.instrument(span));
    }
}

/// Logs and counts a connection refused for want of a slot.
fn refused(client: &SocketAddr, full: &Full, runtime: &ListenerRuntime, metrics: &Metrics) {
    if matches!(full, Full::Client) {
        tracing::debug!(%client, "client at max_connections_per_client");
    }
    metrics
        .connections_rejected
        .get_or_create(&runtime.labels)
        .inc();
}

/// Logs and counts a session before login evicted to make room for `client`.
fn evicted_for(client: &SocketAddr, runtime: &ListenerRuntime, metrics: &Metrics) {
    tracing::debug!(%client, "listener full: a session before login leaves");
    metrics
        .connections_evicted
        .get_or_create(&runtime.labels)
        .inc();
}

/// A logged-in session's splice and its end: the goodbye at a boundary, the lingering close.
struct Spliced<'a> {
    runtime: &'a ListenerRuntime,
    counters: &'a Counters,
    revoked: &'a crate::sessions::Registration,
}

impl Spliced<'_> {
    async fn run<C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized>(
        self,
        client: &mut C,
        upstream: &mut BoxedIo,
        boundary: &mut dyn Boundary,
        stop: Stop<impl std::future::Future<Output = ()>>,
    ) -> (io::Result<SpliceEnd>, Transferred) {
        let (end, moved) = splice(
            client,
            upstream,
            self.runtime.idle_timeout,
            self.counters,
            boundary,
            stop,
        )
        .await;
        if let Ok(SpliceEnd::Stopped { at_boundary }) = end {
            // A goodbye inside a response would corrupt it: then the close says it all.
            if at_boundary {
                let why = if self.revoked.was_revoked() {
                    Closing::Revoked
                } else {
                    Closing::ShuttingDown
                };
                let goodbye = closing_reply(self.runtime, why);
                let deadline = Instant::now() + GOODBYE_TIMEOUT;
                let _ = write_all_by(client, &goodbye, deadline).await;
            }
            linger(client).await;
        }
        (end, moved)
    }
}

/// The protocol's untagged goodbye: IMAP `* BYE`, SMTP `421`.
fn closing_reply(runtime: &ListenerRuntime, closing: Closing) -> Vec<u8> {
    let hostname = &runtime.settings.hostname;
    runtime.driver.protocol.goodbye(closing, hostname)
}

/// Tells a client over the connection limit to come back later, then closes. An implicit-TLS
/// client could not read a plaintext goodbye, so it just sees the close.
async fn refuse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    runtime: &ListenerRuntime,
) {
    if runtime.implicit_tls.is_some() {
        return;
    }
    let reply = closing_reply(runtime, Closing::TooManyConnections);
    let deadline = Instant::now() + GOODBYE_TIMEOUT;
    if write_all_by(&mut stream, &reply, deadline).await.is_ok() {
        linger(&mut stream).await;
    }
}

/// Logs in with the listener's configuration as it is at the moment of the login, so that a
/// session opened before a reload (a rotated auth-server password, a new upstream) logs in
/// with the new settings; the front end keeps the limits it started with.
struct CurrentLogin {
    listener: Arc<RwLock<Arc<ListenerRuntime>>>,
    started_with: Arc<ListenerRuntime>,
    /// Keeps the session from being evicted while its login is under way.
    login: LoginMark,
}

impl CurrentLogin {
    fn current(&self) -> Arc<ListenerRuntime> {
        let current = self
            .listener
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // A reload may have given the address another protocol: keep the session's own.
        if current.driver.protocol.name() == self.started_with.driver.protocol.name() {
            current
        } else {
            self.started_with.clone()
        }
    }
}

impl Authenticator for CurrentLogin {
    async fn login(&self, request: LoginRequest) -> Result<Upstream, LoginError> {
        self.login.set(true);
        let upstream = self.current().driver.login(request).await;
        // A failed login leaves the session where it was: waiting, so evictable.
        if upstream.is_err() {
            self.login.set(false);
        }
        upstream
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        self.current().driver.upstream_capabilities()
    }
}

async fn run_session(
    stream: TcpStream,
    peer: SocketAddr,
    runtime: Arc<ListenerRuntime>,
    live: CurrentLogin,
    metrics: Arc<Metrics>,
    sessions: SessionHandle,
    admission: Admission,
) {
    metrics.connections.get_or_create(&runtime.labels).inc();
    let started = Instant::now();
    let Admission {
        mut slot, evicted, ..
    } = admission;
    // A dropped sender means the session logged in or ended: no eviction then.
    let evicted = async {
        if evicted.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(evicted);
    let opened = tokio::select! {
        // A connection that opens at once gets its front end's goodbye when evicted.
        biased;
        opened = open(stream, peer, &runtime, &metrics, &mut slot) => opened,
        () = sessions.clone().closing() => None,
        () = &mut evicted => None,
    };
    let Some(Opened {
        io: stream,
        client,
        local,
    }) = opened
    else {
        tracing::info!(outcome = "closed_before_login", "session closed");
        return;
    };
    let settings = FrontendSettings {
        client: Some(client),
        local,
        ..runtime.settings.clone()
    };
    let shutdown = sessions.clone().closing();
    let closing = async {
        tokio::select! {
            () = shutdown => Closing::ShuttingDown,
            () = &mut evicted => Closing::TooManyConnections,
        }
    };
    // Boxed so the front end's state is freed before the long splice, not kept in this task.
    let dialogue = runtime.driver.protocol.dialogue(&settings);
    let handoff = Box::pin(frontend::serve(stream, &live, dialogue, &settings, closing)).await;
    drop((settings, live));
    match handoff {
        Ok(Some(mut handoff)) if !slot.log_in() => {
            // Evicted while its login finished: the room is gone.
            let goodbye = closing_reply(&runtime, Closing::TooManyConnections);
            let deadline = Instant::now() + GOODBYE_TIMEOUT;
            if write_all_by(&mut handoff.client, &goodbye, deadline)
                .await
                .is_ok()
            {
                linger(&mut handoff.client).await;
            }
            tracing::info!(outcome = "evicted", "session closed");
        }
        Ok(Some(handoff)) => relay(handoff, &runtime, &metrics, sessions, started).await,
        Ok(None) if slot.is_evicted() => tracing::info!(outcome = "evicted", "session closed"),
        Ok(None) => tracing::info!(outcome = "closed_before_login", "session closed"),
        Err(error) => tracing::info!(outcome = "error_before_login", %error, "session closed"),
    }
}

/// What comes before the front end: a load balancer's PROXY header (from trusted addresses),
/// then the TLS handshake of an implicit-TLS listener. `None` when the session ends here
/// (counted and logged).
async fn open(
    stream: TcpStream,
    peer: SocketAddr,
    runtime: &ListenerRuntime,
    metrics: &Metrics,
    slot: &mut Slot,
) -> Option<Opened> {
    let deadline = Instant::now() + runtime.settings.pre_auth_timeout;
    let mut client = peer;
    let mut local = stream.local_addr().ok();
    let mut io: BoxedIo = Box::new(stream);
    if runtime.trusted_proxies.trusts(peer.ip()) {
        let listener = &runtime.labels.listener;
        let header = match crate::proxy_protocol::read_header(&mut io, deadline).await {
            Ok(header) => header,
            Err(error) => {
                metrics.proxy_header(listener, error.label(), 1);
                tracing::info!(balancer = %peer, %error, "PROXY header refused");
                return None;
            }
        };
        let result = match header.addresses {
            Some((source, destination)) => {
                client = source;
                local = Some(destination);
                "ok"
            }
            None => "local",
        };
        metrics.proxy_header(listener, result, 1);
        tracing::Span::current().record("client", tracing::field::display(client));
        match slot.charge_client(client.ip(), runtime.max_connections_per_client) {
            Ok(made_room) => {
                if made_room {
                    evicted_for(&client, runtime, metrics);
                }
            }
            Err(full) => {
                refused(&client, &full, runtime, metrics);
                refuse(io, runtime).await;
                return None;
            }
        }
        if !header.rest.is_empty() {
            io = Box::new(PrefixedIo::new(header.rest, io));
        }
    }
    if let Some(tls) = &runtime.implicit_tls {
        io = tls.accept(io, deadline).await?;
    }
    Some(Opened { io, client, local })
}

/// A connection ready for its front end.
struct Opened {
    io: BoxedIo,
    /// The client's address, as its load balancer named it when there is one.
    client: SocketAddr,
    /// The address the client connected to, likewise.
    local: Option<SocketAddr>,
}

async fn relay(
    mut handoff: Handoff<BoxedIo>,
    runtime: &ListenerRuntime,
    metrics: &Metrics,
    sessions: SessionHandle,
    started: Instant,
) {
    // Registered (and logged) under the account whose token logged in: a password check may
    // have mapped the client's user name to it, and revocation names that account.
    let account = handoff
        .upstream
        .account
        .take()
        .unwrap_or_else(|| handoff.account.clone());
    tracing::Span::current().record("account", tracing::field::display(Escaped(&account)));
    if account != handoff.account {
        tracing::info!(user = %Escaped(&handoff.account), "logged in");
    } else {
        tracing::info!("logged in");
    }
    let listener = &runtime.labels.listener;
    let counters = Counters {
        client_to_upstream: metrics.bytes_counter(listener, "client_to_upstream"),
        upstream_to_client: metrics.bytes_counter(listener, "upstream_to_client"),
    };
    let mut boundary = runtime.driver.protocol.boundary();
    let registration = sessions.registry.clone().register(&account);
    let closing = sessions.closing();
    let stop = Stop {
        signal: async {
            tokio::select! {
                () = closing => {}
                () = registration.revoked() => {}
            }
        },
        flush_timeout: STOP_FLUSH_TIMEOUT,
    };
    let upstream = &mut handoff.upstream.io;
    // Decided by the login itself: the configuration it ran with (a reload may have changed
    // the listener's since) and this session's upstream EHLO after XCLIENT.
    let (end, moved) = if let Some(guard) = handoff.upstream.xclient_guard {
        let mut client = XclientFilter::new(&mut handoff.client, guard.chunking);
        let session = Spliced {
            runtime,
            counters: &counters,
            revoked: &registration,
        };
        session
            .run(&mut client, upstream, boundary.as_mut(), stop)
            .await
    } else {
        let session = Spliced {
            runtime,
            counters: &counters,
            revoked: &registration,
        };
        session
            .run(&mut handoff.client, upstream, boundary.as_mut(), stop)
            .await
    };
    let duration = started.elapsed();
    metrics
        .session_duration_seconds
        .get_or_create(&runtime.labels)
        .observe(duration.as_secs_f64());
    let outcome = match &end {
        Ok(_) if registration.was_revoked() => "revoked",
        Ok(end) => end.label(),
        Err(_) => "io_error",
    };
    tracing::info!(
        outcome,
        error = end.as_ref().err().map(tracing::field::display),
        bytes_client_to_upstream = moved.client_to_upstream,
        bytes_upstream_to_client = moved.upstream_to_client,
        duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        "session closed"
    );
}
