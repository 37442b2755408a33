//! The admin HTTP endpoint: `GET /metrics` (Prometheus text), `/healthz`, `/readyz`; with
//! `admin.onboarding`, the [`onboarding`] page; with `admin.token_service`, the
//! [`token_service`]; with `admin.backends`, the [`backends`] operations. Optionally over TLS, whose certificate a reload can replace.

mod admission;
pub mod backends;
mod backends_page;
pub mod onboarding;
pub mod throttle;
pub mod token_service;

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::backends::Backends;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::token::cache::TokenCache;
use crate::token::oauth2::OAuth2;
use admission::{Admission, Share};
use throttle::AdminThrottle;

/// A request's headers must arrive within this (a half-sent request holds nothing longer).
/// hyper starts the timer again while a kept-alive connection waits for its next request, so
/// this is the idle deadline too.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Probes and scrapers send their request at once; on the reserve, a connection that does not
/// gives its place back soon.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A request's body must arrive within this after its headers (a form is a few hundred bytes).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an admin connection lives, keep-alive included; clients reconnect. Room for a
/// token fetch that waits for a provider (10 s by default) and its retry.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Forms on the onboarding page are a few hundred bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;

pub type Reply = Response<Full<Bytes>>;

/// What the admin endpoint serves; lives as long as the process, its settings replaced on
/// reload ([`Admin::update`]).
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    current: RwLock<Arc<AdminRuntime>>,
    /// Authorizations and device flows under way, kept across reloads.
    flows: onboarding::Flows,
    /// Failed basic-auth logins by address, kept across reloads.
    throttle: AdminThrottle,
}

/// The parts of the admin endpoint that a reload replaces.
#[derive(Default)]
pub struct AdminRuntime {
    pub tls: Option<TlsAcceptor>,
    pub onboarding: Option<onboarding::Settings>,
    pub token_service: Option<token_service::Settings>,
    pub oauth2: Option<Arc<OAuth2>>,
    pub tokens: Option<Arc<TokenCache>>,
    /// The operator's login for `/backends`, and what it works on.
    pub backends: Option<(backends::Settings, Arc<Backends>)>,
}

impl Admin {
    /// # Errors
    /// No randomness for the onboarding page's CSRF token.
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Result<Self, String> {
        Ok(Self {
            throttle: AdminThrottle::new(metrics.clone()),
            metrics,
            health,
            current: RwLock::new(Arc::new(AdminRuntime::default())),
            flows: onboarding::Flows::new()?,
        })
    }

    /// Puts a reload's settings in place; requests under way finish with the old ones.
    pub fn update(&self, runtime: AdminRuntime) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(runtime);
    }

    fn runtime(&self) -> Arc<AdminRuntime> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Serves admin requests on `listener` until `stop` completes.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let admission = Arc::new(Admission::new(admin.metrics.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        // Refused connections are closed at once; the admission counts and warns.
        let Ok(slot) = admission.admit(peer.ip()) else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let serving = serve_connection(stream, peer, admin, slot.share());
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, serving).await;
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    admin: Arc<Admin>,
    share: Share,
) {
    let tls = admin.runtime().tls.clone();
    let service = hyper::service::service_fn(move |request| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(respond(request, peer.ip(), &admin, share).await) }
    });
    let builder = {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new());
        match share {
            Share::Any => builder.header_read_timeout(HEADER_TIMEOUT),
            // One request, then the place goes back to the reserve.
            Share::ProbesOnly => builder
                .header_read_timeout(PROBE_HEADER_TIMEOUT)
                .keep_alive(false),
        };
        builder
    };
    let result = match tls {
        Some(acceptor) => match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await
        {
            Ok(Ok(stream)) => {
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "admin TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "admin connection ended with an error");
    }
}

/// A request with its body read (bounded).
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub client: IpAddr,
}

async fn respond(request: Request<Incoming>, client: IpAddr, admin: &Admin, share: Share) -> Reply {
    let (parts, body) = request.into_parts();
    let probe = matches!(parts.uri.path(), "/metrics" | "/healthz" | "/readyz");
    if share == Share::ProbesOnly && !probe {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: only /healthz, /readyz and /metrics are served now\n",
        );
    }
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "request too large\n"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "request body too slow\n"),
    };
    let request = AdminRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers: parts.headers,
        body: body.to_bytes(),
        client,
    };
    let runtime = admin.runtime();
    match request.path.as_str() {
        "/metrics" | "/healthz" | "/readyz" => status_page(&request, admin),
        "/token" => match &runtime.token_service {
            Some(settings) => token_service::respond(&request, settings, &runtime, admin).await,
            None => not_found(),
        },
        path if path == "/backends" || path.starts_with("/backends/") => match &runtime.backends {
            Some((settings, backends)) => {
                backends::respond(&request, settings, backends, &admin.throttle, &admin.flows).await
            }
            None => not_found(),
        },
        _ => match &runtime.onboarding {
            Some(settings) => {
                onboarding::respond(&request, settings, &runtime, &admin.flows, &admin.throttle)
                    .await
            }
            None => not_found(),
        },
    }
}

fn status_page(request: &AdminRequest, admin: &Admin) -> Reply {
    if request.method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match request.path.as_str() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            admin.metrics.encode(),
        ),
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        _ => match admin.health.readiness() {
            Ok(()) => plain(StatusCode::OK, "ready\n"),
            Err(reason) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
    }
}

/// Which of `logins` (user name, password) the request carries in HTTP basic auth. Failures
/// count against the client's address in the admin endpoint's own throttle (growing delays,
/// then a block); a success exempts the address from blocks.
///
/// # Errors
/// The reply to send instead: 401 with a challenge, or 429 while the address is blocked.
pub async fn check_basic_auth<'a>(
    request: &AdminRequest,
    logins: impl IntoIterator<Item = (&'a str, &'a Secret<String>)>,
    realm: &str,
    throttle: &AdminThrottle,
) -> Result<&'a str, Box<Reply>> {
    if throttle.check(request.client).is_err() {
        return Err(Box::new(plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts; try later\n",
        )));
    }
    let presented = request
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Basic "))
        .and_then(|encoded| {
            base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .ok()
        })
        .map(Secret::new);
    if let Some(presented) = presented {
        // Every login is compared, so that the time taken does not tell which user exists.
        let mut matched = None;
        for (user, password) in logins {
            let expected = Secret::new(format!("{user}:{}", password.expose()));
            if bool::from(presented.expose().ct_eq(expected.expose().as_bytes())) {
                matched = Some(user);
            }
        }
        if let Some(user) = matched {
            throttle.succeeded(request.client);
            return Ok(user);
        }
    }
    if request.headers.contains_key(header::AUTHORIZATION) {
        tokio::time::sleep(throttle.failed(request.client)).await;
    }
    let mut refused = plain(StatusCode::UNAUTHORIZED, "authentication required\n");
    let challenge = format!("Basic realm=\"{realm}\", charset=\"UTF-8\"");
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        refused
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    Err(Box::new(refused))
}

pub fn reply(code: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn plain(code: StatusCode, text: &'static str) -> Reply {
    reply(code, "text/plain; charset=utf-8", text.to_owned())
}

pub fn not_found() -> Reply {
    plain(StatusCode::NOT_FOUND, "not found\n")
}
