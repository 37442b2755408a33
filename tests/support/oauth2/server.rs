//! The provider's HTTP plumbing: an accept loop on 127.0.0.1:0, requests read whole with a size
//! cap, and replies that carry the headers OAuth needs (`Location`, `WWW-Authenticate`,
//! `Cache-Control`), which the JSON-only servers in [`super::super::http`] cannot send.

use std::convert::Infallible;
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::super::http::ServerTask;

/// Largest request body read. A token request with a 2048-bit RS256 assertion is about 2 KiB;
/// anything near this limit is a client bug, answered 413.
const MAX_BODY: usize = 64 * 1024;

/// How long a client may take to send its request head; keeps a silent peer from holding a
/// connection task forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request, read completely.
pub(super) struct HttpRequest {
    pub method: Method,
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the whole request had arrived (device polls are timed by arrival).
    pub arrived: Instant,
}

impl HttpRequest {
    /// A header as text, when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether the body is declared `application/x-www-form-urlencoded` (parameters such as
    /// `charset` allowed), as RFC 6749 section 3.2 and RFC 8628 section 3.1 require.
    pub fn is_form(&self) -> bool {
        self.header("content-type").is_some_and(|ct| {
            ct.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        })
    }
}

/// Status, extra headers and body of an answer.
pub(super) struct HttpReply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl HttpReply {
    /// A JSON answer.
    pub fn json(status: u16, body: &serde_json::Value) -> HttpReply {
        HttpReply {
            status,
            headers: vec![("content-type", "application/json;charset=UTF-8".to_owned())],
            body: body.to_string(),
        }
    }

    /// An HTML page, never cached (it may carry a one-time request id).
    pub fn html(status: u16, body: String) -> HttpReply {
        HttpReply {
            status,
            headers: vec![
                ("content-type", "text/html;charset=UTF-8".to_owned()),
                ("cache-control", "no-store".to_owned()),
            ],
            body,
        }
    }

    /// `302 Found` to `location`.
    pub fn redirect(location: String) -> HttpReply {
        HttpReply {
            status: 302,
            headers: vec![
                ("location", location),
                ("cache-control", "no-store".to_owned()),
            ],
            body: String::new(),
        }
    }

    /// A plain-text answer (404, 405, 413).
    pub fn text(status: u16, body: &str) -> HttpReply {
        HttpReply {
            status,
            headers: vec![("content-type", "text/plain;charset=UTF-8".to_owned())],
            body: body.to_owned(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> HttpReply {
        self.headers.push((name, value.into()));
        self
    }
}

pub(super) type Handler =
    Arc<dyn Fn(HttpRequest) -> Pin<Box<dyn Future<Output = HttpReply> + Send>> + Send + Sync>;

/// Binds 127.0.0.1:0 (bound before serving, so the provider knows its own URLs first).
pub(super) async fn bind() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind OAuth provider on 127.0.0.1:0")
}

/// Serves `handler` on `listener` until the returned task is dropped.
///
/// A handler future is dropped, unfinished, when its client closes the connection while the
/// handler still waits (hyper watches for EOF once the request body is read); the hold in
/// the token endpoint relies on this to abandon requests whose client went away.
pub(super) fn serve(listener: TcpListener, handler: Handler) -> ServerTask {
    let task = tokio::spawn(async move {
        // Connection tasks live in the JoinSet so that aborting this task drops them all.
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let handler = handler.clone();
                    conns.spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let handler = handler.clone();
                            async move {
                                let reply = match read_request(req).await {
                                    Ok(req) => handler(req).await,
                                    Err(reply) => reply,
                                };
                                Ok::<_, Infallible>(into_response(reply))
                            }
                        });
                        let _ = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    ServerTask(task)
}

async fn read_request(req: Request<Incoming>) -> Result<HttpRequest, HttpReply> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(HttpReply::text(413, "request body too large"));
        }
        Err(_) => return Err(HttpReply::text(400, "unreadable request body")),
    };
    Ok(HttpRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: parts.headers,
        body,
        arrived: Instant::now(),
    })
}

fn into_response(reply: HttpReply) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(reply.status);
    for (name, value) in reply.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from(reply.body)))
        .expect("valid response")
}
