//! Binding listeners and accepting connections: admission against the connection limits,
//! refusals with the protocol's goodbye, one task and tracing span per session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::config::{Config, ListenerConfig};
use crate::io::say_goodbye;
use crate::login::{Closing, GOODBYE_TIMEOUT};
use crate::metrics::Metrics;

use super::runtime::ListenerRuntime;
use super::session::{CurrentLogin, SessionHandle, run_session};
use super::slots::{Full, Slots};
use super::{RunningListener, Server, StartError};

/// Connections the kernel queues for a listener before mailgate accepts them. tokio's
/// default of 128 drops part of a burst of reconnecting clients without a word (the attack
/// tests lost up to half of 1,000 simultaneous connects); the kernel caps it at
/// `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

pub(super) async fn bind(listener: &ListenerConfig) -> Result<TcpListener, StartError> {
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

impl Server {
    pub(super) fn spawn_listener(
        &self,
        tcp: TcpListener,
        runtime: Arc<ListenerRuntime>,
    ) -> RunningListener {
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
}

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

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
            upstream = tracing::field::Empty,
            server = tracing::field::Empty,
            account = tracing::field::Empty,
        );
        if !behind_proxy {
            span.record("client", tracing::field::display(peer));
        }
        let live = CurrentLogin {
            listener: listener_handle.clone(),
            started_with: runtime.clone(),
            login: admission.slot.login_mark(),
            lease: std::sync::Mutex::new(None),
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
pub(super) fn refused(
    client: &SocketAddr,
    full: &Full,
    runtime: &ListenerRuntime,
    metrics: &Metrics,
) {
    if matches!(full, Full::Client) {
        tracing::debug!(%client, "client at max_connections_per_client");
    }
    metrics
        .connections_rejected
        .get_or_create(&runtime.labels)
        .inc();
}

/// Logs and counts a session before login evicted to make room for `client`.
pub(super) fn evicted_for(client: &SocketAddr, runtime: &ListenerRuntime, metrics: &Metrics) {
    tracing::debug!(%client, "listener full: a session before login leaves");
    metrics
        .connections_evicted
        .get_or_create(&runtime.labels)
        .inc();
}

/// Tells a client over the connection limit to come back later, then closes. An implicit-TLS
/// client could not read a plaintext goodbye, so it just sees the close.
pub(super) async fn refuse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    runtime: &ListenerRuntime,
) {
    if runtime.implicit_tls.is_some() {
        return;
    }
    let reply = runtime.goodbye(Closing::TooManyConnections);
    say_goodbye(&mut stream, &reply, GOODBYE_TIMEOUT).await;
}

/// Every session holds two descriptors (client and upstream): say so at start when the
/// listeners' limits ask for more than the process may open, before accept fails under load.
pub(super) fn warn_if_descriptors_are_short(config: &Config) {
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
