//! Listeners: bind, accept, and run one task with its own tracing span per connection:
//! front end until login, then splice until either side is done.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::Instrument;

use crate::admin::{self, Status};
use crate::client_auth::ClientAuth;
use crate::config::{Config, ListenerConfig, Protocol};
use crate::metrics::{ListenerLabels, Metrics};
use crate::proxy::{FrontendSettings, Handoff, ListenerProxy, Shared};
use crate::splice::{Counters, splice};
use crate::token::auth_server::AuthServer;
use crate::token::cache::TokenCache;
use crate::upstream::Connector;
use crate::{imap, smtp};

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {name}: cannot listen on {address}: {source}")]
    Bind {
        name: String,
        address: SocketAddr,
        source: io::Error,
    },
    #[error("metrics: cannot listen on {address}: {source}")]
    BindMetrics {
        address: SocketAddr,
        source: io::Error,
    },
    #[error("listener {name}: upstream TLS: {reason}")]
    Upstream { name: String, reason: String },
    #[error("token source: {0}")]
    TokenSource(String),
}

/// One listener's fixed parts, shared by its sessions.
struct ListenerRuntime {
    proxy: ListenerProxy,
    settings: FrontendSettings,
    idle_timeout: Duration,
    labels: ListenerLabels,
}

/// Binds everything in `config`, serves until `shutdown` completes, then stops accepting
/// and ends the open sessions.
///
/// # Errors
/// A listener cannot be bound or an upstream's TLS set up; nothing is left running then.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let shared = shared_state(&config, &metrics)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listeners = Vec::new();
    for listener in &config.listeners {
        let tcp = TcpListener::bind(listener.listen)
            .await
            .map_err(|source| StartError::Bind {
                name: listener.name.clone(),
                address: listener.listen,
                source,
            })?;
        listeners.push((tcp, listener_runtime(listener, &shared, &config)?));
    }
    let status = Arc::new(Status {
        metrics: metrics.clone(),
        ready: AtomicBool::new(false),
    });
    if let Some(admin_config) = &config.metrics {
        let tcp = TcpListener::bind(admin_config.listen)
            .await
            .map_err(|source| StartError::BindMetrics {
                address: admin_config.listen,
                source,
            })?;
        tokio::spawn(admin::serve(tcp, status.clone(), stopped(stop_rx.clone())));
    }
    for (tcp, runtime) in listeners {
        tracing::info!(listener = %runtime.labels.listener, address = %tcp.local_addr().map_or(String::new(), |a| a.to_string()), "listening");
        tokio::spawn(accept_loop(
            tcp,
            Arc::new(runtime),
            metrics.clone(),
            stop_rx.clone(),
        ));
    }
    status.ready.store(true, Ordering::Relaxed);
    shutdown.await;
    tracing::info!("shutting down");
    status.ready.store(false, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    Ok(())
}

fn shared_state(config: &Config, metrics: &Arc<Metrics>) -> Result<Shared, StartError> {
    let auth_server_config = config
        .tokens
        .auth_server
        .as_ref()
        .ok_or_else(|| StartError::TokenSource("no token source configured".to_owned()))?;
    let source =
        AuthServer::new(auth_server_config, metrics.clone()).map_err(StartError::TokenSource)?;
    Ok(Shared {
        tokens: Arc::new(TokenCache::new(
            &config.tokens.cache,
            source,
            metrics.clone(),
        )),
        client_auth: Arc::new(ClientAuth::new(&config.client_auth)),
        metrics: metrics.clone(),
    })
}

fn listener_runtime(
    listener: &ListenerConfig,
    shared: &Shared,
    config: &Config,
) -> Result<ListenerRuntime, StartError> {
    let connector = Connector::new(&listener.upstream).map_err(|error| StartError::Upstream {
        name: listener.name.clone(),
        reason: error.to_string(),
    })?;
    Ok(ListenerRuntime {
        proxy: ListenerProxy::new(
            listener.name.clone(),
            listener.protocol,
            connector,
            shared,
            config.hostname.clone(),
        ),
        settings: FrontendSettings {
            hostname: config.hostname.clone(),
            pre_auth_timeout: listener.pre_auth_timeout,
        },
        idle_timeout: listener.idle_timeout,
        labels: ListenerLabels {
            listener: listener.name.clone(),
        },
    })
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn accept_loop(
    tcp: TcpListener,
    runtime: Arc<ListenerRuntime>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
    let stop_accepting = stopped(stop.clone());
    tokio::pin!(stop_accepting);
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
            () = &mut stop_accepting => return,
        };
        let _ = stream.set_nodelay(true);
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "session",
            id,
            listener = %runtime.labels.listener,
            client = %peer,
            account = tracing::field::Empty,
        );
        let session = run_session(stream, runtime.clone(), metrics.clone(), stop.clone());
        tokio::spawn(session.instrument(span));
    }
}

/// Decrements the active-connection gauge however the session ends.
struct ActiveGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn run_session(
    stream: TcpStream,
    runtime: Arc<ListenerRuntime>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    metrics.connections.get_or_create(&runtime.labels).inc();
    let active = metrics
        .connections_active
        .get_or_create(&runtime.labels)
        .clone();
    active.inc();
    let _guard = ActiveGuard(active);
    let started = tokio::time::Instant::now();
    // Boxed so the front end's state is freed before the long splice, not kept in this task.
    let handoff = match runtime.proxy.protocol {
        Protocol::Imap => {
            Box::pin(imap::frontend::serve(
                stream,
                &runtime.proxy,
                &runtime.settings,
            ))
            .await
        }
        Protocol::Smtp => {
            Box::pin(smtp::frontend::serve(
                stream,
                &runtime.proxy,
                &runtime.settings,
            ))
            .await
        }
    };
    match handoff {
        Ok(Some(handoff)) => relay(handoff, &runtime, &metrics, stop, started).await,
        Ok(None) => tracing::info!(outcome = "closed_before_login", "session closed"),
        Err(error) => tracing::info!(outcome = "error_before_login", %error, "session closed"),
    }
}

async fn relay(
    mut handoff: Handoff<TcpStream>,
    runtime: &ListenerRuntime,
    metrics: &Metrics,
    stop: watch::Receiver<bool>,
    started: tokio::time::Instant,
) {
    tracing::Span::current().record("account", handoff.account.as_str());
    tracing::info!("logged in");
    let listener = &runtime.labels.listener;
    let counters = Counters {
        client_to_upstream: metrics.bytes_counter(listener, "client_to_upstream"),
        upstream_to_client: metrics.bytes_counter(listener, "upstream_to_client"),
    };
    let (end, moved) = splice(
        &mut handoff.client,
        &mut handoff.upstream.io,
        runtime.idle_timeout,
        &counters,
        stopped(stop),
    )
    .await;
    let outcome = match &end {
        Ok(end) => format!("{end:?}").to_lowercase(),
        Err(_) => "io_error".to_owned(),
    };
    tracing::info!(
        outcome,
        error = end.as_ref().err().map(tracing::field::display),
        bytes_client_to_upstream = moved.client_to_upstream,
        bytes_upstream_to_client = moved.upstream_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "session closed"
    );
}
