//! One connection's life: the PROXY header and TLS handshake, the front end until login, then
//! the splice, and the goodbye when mailgate ends it.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backends::Lease;
use crate::frontend;
use crate::frontend::settings::FrontendSettings;
use crate::io::{BoxedIo, PrefixedIo, linger, say_goodbye, write_all_by};
use crate::login::{
    Authenticator, Closing, GOODBYE_TIMEOUT, Handoff, LoginError, LoginRequest, Upstream,
};
use crate::metrics::Metrics;
use crate::sanitize::Escaped;
use crate::sessions::SessionRegistry;
use crate::smtp::xclient_filter::XclientFilter;
use crate::splice::{Boundary, Counters, SpliceEnd, Stop, Transferred, splice};

use super::accept::{evicted_for, refuse, refused};
use super::runtime::ListenerRuntime;
use super::slots::{Admission, LoginMark, Slot};

/// When a logged-in session is stopped, how long bytes already read may take to reach their
/// reader before the goodbye ([`GOODBYE_TIMEOUT`]) or the close.
const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Every session holds a clone of `open`; when all are gone, `all_closed` yields `None`.
pub(super) struct Sessions {
    pub(super) open: Option<mpsc::Sender<()>>,
    pub(super) all_closed: mpsc::Receiver<()>,
    pub(super) close_now: watch::Sender<bool>,
}

/// What a session needs to know about the server's life cycle.
#[derive(Clone)]
pub(super) struct SessionHandle {
    pub(super) _open: mpsc::Sender<()>,
    pub(super) close_now: watch::Receiver<bool>,
    pub(super) registry: Arc<SessionRegistry>,
}

impl SessionHandle {
    /// Completes when open sessions must end.
    async fn closing(mut self) {
        let _ = self.close_now.wait_for(|close| *close).await;
    }
}

/// A logged-in session's splice and its end: the goodbye at a boundary, the lingering close.
struct Spliced<'a> {
    runtime: &'a ListenerRuntime,
    counters: &'a Counters,
    revoked: &'a crate::sessions::Registration,
    lease: &'a Lease,
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
                } else if self.lease.was_ended() {
                    Closing::Moved
                } else {
                    Closing::ShuttingDown
                };
                let goodbye = self.runtime.goodbye(why);
                let deadline = Instant::now() + GOODBYE_TIMEOUT;
                let _ = write_all_by(client, &goodbye, deadline).await;
            }
            linger(client).await;
        }
        (end, moved)
    }
}

/// Logs in with the listener's configuration as it is at the moment of the login, so that a
/// session opened before a reload (a rotated auth-server password, a new upstream) logs in
/// with the new settings; the front end keeps the limits it started with.
pub(super) struct CurrentLogin {
    pub(super) listener: Arc<RwLock<Arc<ListenerRuntime>>>,
    pub(super) started_with: Arc<ListenerRuntime>,
    /// Keeps the session from being evicted while its login is under way.
    pub(super) login: LoginMark,
    /// The logged-in session's place on its server, for the splice to hold.
    pub(super) lease: std::sync::Mutex<Option<Lease>>,
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
        let placed = self.current().driver.login(request).await;
        // A failed login leaves the session where it was: waiting, so evictable.
        if placed.is_err() {
            self.login.set(false);
        }
        let placed = placed?;
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(placed.lease);
        Ok(Upstream {
            account: Some(placed.account),
            ..placed.upstream
        })
    }

    fn upstream_capabilities(&self) -> Vec<String> {
        self.current().driver.upstream_capabilities()
    }
}

pub(super) async fn run_session(
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
    let lease = live.lease.into_inner().unwrap_or_else(|e| e.into_inner());
    drop(settings);
    match handoff {
        Ok(Some(mut handoff)) if !slot.mark_logged_in() => {
            // Evicted while its login finished: the room is gone.
            let goodbye = runtime.goodbye(Closing::TooManyConnections);
            say_goodbye(&mut handoff.client, &goodbye, GOODBYE_TIMEOUT).await;
            tracing::info!(outcome = "evicted", "session closed");
        }
        Ok(Some(handoff)) => {
            let Some(lease) = lease else {
                tracing::error!("logged in without a place on a server");
                return;
            };
            relay(handoff, lease, &runtime, &metrics, sessions, started).await;
        }
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
    pub(super) io: BoxedIo,
    /// The client's address, as its load balancer named it when there is one.
    pub(super) client: SocketAddr,
    /// The address the client connected to, likewise.
    pub(super) local: Option<SocketAddr>,
}

async fn relay(
    mut handoff: Handoff<BoxedIo>,
    lease: Lease,
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
    let span = tracing::Span::current();
    span.record("account", tracing::field::display(Escaped(&account)));
    let server = lease.server();
    span.record("server", tracing::field::display(&server.name));
    span.record(
        "upstream",
        tracing::field::display(server.connector.labels().upstream),
    );
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
                () = lease.ended() => {}
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
            lease: &lease,
        };
        session
            .run(&mut client, upstream, boundary.as_mut(), stop)
            .await
    } else {
        let session = Spliced {
            runtime,
            counters: &counters,
            revoked: &registration,
            lease: &lease,
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
        Ok(_) if lease.was_ended() => "moved",
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
