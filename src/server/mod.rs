//! The running service: binds listeners, accepts connections (one task and tracing span each:
//! front end until login, then splice), reloads its configuration, and drains on shutdown.
//!
//! One job per file: [`reload`] (applying and watching the configuration), [`runtime`] (what
//! one listener's sessions share), [`accept`] (binding and the accept loop), [`slots`]
//! (connection limits and eviction), [`session`] (one connection's life).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::Admin;
use crate::backends::Backends;
use crate::client_auth::ClientAuth;
use crate::config::Config;
use crate::driver::Shared;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::sessions::SessionRegistry;
use crate::token::oauth2::GrantStates;

mod accept;
mod reload;
mod runtime;
mod session;
mod slots;

use accept::warn_if_descriptors_are_short;
use reload::{Fingerprints, log_warnings};
use runtime::{ListenerRuntime, throttle, token_state};
use session::Sessions;

/// How often the token source's reachability is checked for readiness, and how old its last
/// answer may be: a Kubernetes readiness probe runs every 10 s by default.
const TOKEN_SOURCE_CHECK_INTERVAL: Duration = Duration::from_secs(10);
const TOKEN_SOURCE_FRESHNESS: Duration = Duration::from_secs(30);

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

/// The configuration file and its text as it was loaded.
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
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
    /// Where accounts have sessions open, drains and moves.
    backends: Arc<Backends>,
}

impl Server {
    async fn start(
        config: Config,
        file: Option<ConfigFile>,
        log_level: Option<LogLevelHook>,
    ) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(TOKEN_SOURCE_FRESHNESS));
        let lasting_health = health.clone();
        let lasting = Lasting {
            admin: Arc::new(
                Admin::new(metrics.clone(), health.clone()).map_err(StartError::Admin)?,
            ),
            health,
            registry: Arc::new(SessionRegistry::new(metrics.clone())),
            grants: Arc::new(GrantStates::default()),
            backends: Arc::new(Backends::new(metrics.clone(), lasting_health.clone())),
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
            backends: lasting.backends.clone(),
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
