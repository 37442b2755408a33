//! Two in-process HTTP servers on 127.0.0.1: [`Introspection`] (the RFC 7662 token check that
//! Dovecot calls) and [`AuthServer`] (EmailEngine's authServer contract that mailgate calls
//! for tokens, and the password check of `client_auth.mode: auth_server`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A request, read completely, as the handlers see it.
struct SimpleRequest {
    method: String,
    path: String,
    query: Vec<(String, String)>,
    authorization: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// Status code and JSON body.
type Reply = (u16, String);
type Handler =
    Arc<dyn Fn(SimpleRequest) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// Aborts the accept loop (and with it every open connection) when dropped.
pub(super) struct ServerTask(pub(super) JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn start_server(handler: Handler) -> (SocketAddr, ServerTask) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind HTTP server on 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
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
                                let (status, body) = match read_request(req).await {
                                    Some(req) => handler(req).await,
                                    None => (400, r#"{"error":"unreadable request"}"#.to_owned()),
                                };
                                let response = Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("valid response");
                                Ok::<_, Infallible>(response)
                            }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    (addr, ServerTask(task))
}

async fn read_request(req: Request<Incoming>) -> Option<SimpleRequest> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.ok()?.to_bytes().to_vec();
    Some(SimpleRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
        authorization: parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    })
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A fresh random-looking opaque token (`mgt-` and 32 hex digits).
pub fn mint_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded randomly per process; hashing a counter gives unguessable values.
    let state = std::collections::hash_map::RandomState::new();
    let mut out = String::from("mgt-");
    for i in 0..2u64 {
        let mut h = state.build_hasher();
        h.write_u64(n);
        h.write_u64(i);
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    super::secrets::remember("minted token", &out);
    out
}

// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct IntrospectionState {
    /// token -> user
    tokens: Mutex<HashMap<String, String>>,
    requests: AtomicUsize,
    checked: Mutex<Vec<String>>,
}

/// RFC 7662-style token introspection: `POST /introspect` with the form `token=...` answers
/// `{"active": true, "email": USER}` for tokens registered with [`Introspection::add_token`],
/// else `{"active": false}`. Cheap to clone; the server stops when the last clone is dropped.
#[derive(Clone)]
pub struct Introspection {
    addr: SocketAddr,
    state: Arc<IntrospectionState>,
    _task: Arc<ServerTask>,
}

impl Introspection {
    pub async fn start() -> Introspection {
        let state = Arc::new(IntrospectionState::default());
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let state = handler_state.clone();
            Box::pin(async move { state.handle(req) })
        });
        let (addr, task) = start_server(handler).await;
        Introspection {
            addr,
            state,
            _task: Arc::new(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/introspect`
    pub fn url(&self) -> String {
        format!("http://{}/introspect", self.addr)
    }

    /// Makes `token` valid for `user`.
    pub fn add_token(&self, token: &str, user: &str) {
        super::secrets::remember("introspection token", token);
        self.state
            .tokens
            .lock()
            .unwrap()
            .insert(token.to_owned(), user.to_owned());
    }

    /// Makes `token` invalid from now on; returns whether it was valid.
    pub fn revoke(&self, token: &str) -> bool {
        self.state.tokens.lock().unwrap().remove(token).is_some()
    }

    /// Revokes every token of `user`; returns how many there were.
    pub fn revoke_user(&self, user: &str) -> usize {
        let mut tokens = self.state.tokens.lock().unwrap();
        let before = tokens.len();
        tokens.retain(|_, u| u != user);
        before - tokens.len()
    }

    pub fn is_active(&self, token: &str) -> bool {
        self.state.tokens.lock().unwrap().contains_key(token)
    }

    /// How many introspection requests arrived (valid or not).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Every token asked about, in order.
    pub fn checked_tokens(&self) -> Vec<String> {
        self.state.checked.lock().unwrap().clone()
    }
}

impl IntrospectionState {
    fn handle(&self, req: SimpleRequest) -> Reply {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if req.method != "POST" || req.path != "/introspect" {
            return (404, r#"{"error":"not found"}"#.to_owned());
        }
        let form: Vec<(String, String)> = url::form_urlencoded::parse(&req.body)
            .into_owned()
            .collect();
        let Some(token) = param(&form, "token") else {
            return (400, r#"{"error":"invalid_request"}"#.to_owned());
        };
        self.checked.lock().unwrap().push(token.to_owned());
        match self.tokens.lock().unwrap().get(token) {
            Some(user) => (
                200,
                serde_json::json!({ "active": true, "email": user }).to_string(),
            ),
            None => (200, r#"{"active":false}"#.to_owned()),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// What the auth server answers for one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthAnswer {
    /// 200 `{"user": ..., "accessToken": ..., "expiresIn": ...}` (`expiresIn` left out when `None`).
    Token {
        user: String,
        access_token: String,
        expires_in: Option<u64>,
    },
    /// This status code with a small JSON error body.
    Status(u16),
    /// Exactly this status and body (for malformed answers).
    Raw { status: u16, body: String },
}

/// One request as the auth server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    pub account: Option<String>,
    pub proto: Option<String>,
    /// False when basic auth is required and the request did not carry the right credentials.
    pub authorized: bool,
}

struct AccountEntry {
    answer: AuthAnswer,
    delay: Option<Duration>,
}

/// One password check (`POST /check`) as the auth server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordCheck {
    pub method: String,
    pub content_type: Option<String>,
    /// Whether the URL carried a query (where a password must never go).
    pub has_query: bool,
    pub authorized: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    pub protocol: Option<String>,
    pub client: Option<String>,
    /// Whether the password was the user's (and the check was otherwise answered 200).
    pub accepted: bool,
}

/// A user of the password check: the password, and the account id answered (`None`: none).
struct PasswordEntry {
    password: String,
    account: Option<String>,
}

#[derive(Default)]
struct AuthState {
    accounts: Mutex<HashMap<String, AccountEntry>>,
    requests: Mutex<Vec<AuthRequest>>,
    /// The expected `Authorization` header value, when basic auth is on.
    expected_authorization: Option<String>,
    /// While true, token answers wait (see [`AuthServer::hold`]).
    held: tokio::sync::watch::Sender<bool>,
    /// Requests waiting because of a hold.
    waiting: AtomicUsize,
    passwords: Mutex<HashMap<String, PasswordEntry>>,
    checks: Mutex<Vec<PasswordCheck>>,
    /// When set, every password check is answered this status.
    check_status: Mutex<Option<u16>>,
}

/// Keeps the auth server's answers back until dropped.
pub struct AuthHold(Arc<AuthState>);

impl Drop for AuthHold {
    fn drop(&mut self) {
        self.0.held.send_replace(false);
    }
}

/// EmailEngine's authServer contract: `GET /token?account=ID&proto=imap|smtp` answers what the
/// test configured for the account (unknown accounts get 404). And mailgate's password check:
/// `POST /check` with `{"user", "password", "protocol", "client"}` answers 200 (with
/// `{"account": ...}` when one is set) for a user's password, else 403. Cheap to clone.
#[derive(Clone)]
pub struct AuthServer {
    addr: SocketAddr,
    state: Arc<AuthState>,
    basic: Option<(String, String)>,
    introspection: Option<Introspection>,
    _task: Arc<ServerTask>,
}

impl AuthServer {
    /// Starts without basic auth. With an [`Introspection`], [`AuthServer::grant`] registers
    /// the tokens it mints there.
    pub async fn start(introspection: Option<&Introspection>) -> AuthServer {
        Self::start_inner(introspection, None).await
    }

    /// Starts requiring HTTP basic auth `user:pass` (else 401).
    pub async fn start_with_basic_auth(
        introspection: Option<&Introspection>,
        user: &str,
        pass: &str,
    ) -> AuthServer {
        Self::start_inner(introspection, Some((user.to_owned(), pass.to_owned()))).await
    }

    async fn start_inner(
        introspection: Option<&Introspection>,
        basic: Option<(String, String)>,
    ) -> AuthServer {
        if let Some((_, pass)) = &basic {
            super::secrets::remember("auth-server basic-auth password", pass);
        }
        let expected_authorization = basic.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let state = Arc::new(AuthState {
            expected_authorization,
            ..AuthState::default()
        });
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let state = handler_state.clone();
            Box::pin(async move { state.handle(req).await })
        });
        let (addr, task) = start_server(handler).await;
        AuthServer {
            addr,
            state,
            basic,
            introspection: introspection.cloned(),
            _task: Arc::new(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/token` (without credentials).
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// `http://USER:PASS@127.0.0.1:PORT/token` when basic auth is on, else [`AuthServer::url`].
    pub fn url_with_credentials(&self) -> String {
        match &self.basic {
            Some((u, p)) => format!("http://{u}:{p}@{}/token", self.addr),
            None => self.url(),
        }
    }

    /// `http://127.0.0.1:PORT/check`: the password check (without credentials).
    pub fn check_url(&self) -> String {
        format!("http://{}/check", self.addr)
    }

    /// Accepts `password` for `user` in password checks, answering `account` when given.
    pub fn add_password(&self, user: &str, password: &str, account: Option<&str>) {
        self.state.passwords.lock().unwrap().insert(
            user.to_owned(),
            PasswordEntry {
                password: password.to_owned(),
                account: account.map(str::to_owned),
            },
        );
    }

    /// Answers every password check with `status` from now on (`None`: as configured).
    pub fn set_check_status(&self, status: Option<u16>) {
        *self.state.check_status.lock().unwrap() = status;
    }

    /// Every password check so far, in order.
    pub fn password_checks(&self) -> Vec<PasswordCheck> {
        self.state.checks.lock().unwrap().clone()
    }

    /// Mints a new token for `user`, makes it valid at the introspection server (if any) and
    /// answers it for `account` from now on (no `expiresIn`). Returns the token.
    pub fn grant(&self, account: &str, user: &str) -> String {
        self.grant_inner(account, user, None)
    }

    /// Like [`AuthServer::grant`], answering `expiresIn: expires_in` (seconds).
    pub fn grant_with_expiry(&self, account: &str, user: &str, expires_in: u64) -> String {
        self.grant_inner(account, user, Some(expires_in))
    }

    fn grant_inner(&self, account: &str, user: &str, expires_in: Option<u64>) -> String {
        let token = mint_token();
        if let Some(introspection) = &self.introspection {
            introspection.add_token(&token, user);
        }
        self.set_answer(
            account,
            AuthAnswer::Token {
                user: user.to_owned(),
                access_token: token.clone(),
                expires_in,
            },
        );
        token
    }

    /// Sets the answer for `account`, keeping any delay.
    pub fn set_answer(&self, account: &str, answer: AuthAnswer) {
        remember_answer(&answer);
        let mut accounts = self.state.accounts.lock().unwrap();
        match accounts.get_mut(account) {
            Some(entry) => entry.answer = answer,
            None => {
                accounts.insert(
                    account.to_owned(),
                    AccountEntry {
                        answer,
                        delay: None,
                    },
                );
            }
        }
    }

    /// Answers `status` (e.g. 403, 404, 500) for `account`.
    pub fn set_status(&self, account: &str, status: u16) {
        self.set_answer(account, AuthAnswer::Status(status));
    }

    /// Waits `delay` before answering for `account` (`None`: answer at once). An account with
    /// a delay but no answer yet gets 404 after the delay.
    pub fn set_delay(&self, account: &str, delay: Option<Duration>) {
        let mut accounts = self.state.accounts.lock().unwrap();
        accounts
            .entry(account.to_owned())
            .or_insert(AccountEntry {
                answer: AuthAnswer::Status(404),
                delay: None,
            })
            .delay = delay;
    }

    /// Forgets `account` (404 from now on).
    pub fn remove(&self, account: &str) {
        self.state.accounts.lock().unwrap().remove(account);
    }

    /// The token currently handed out for `account`, if its answer is a token.
    pub fn current_token(&self, account: &str) -> Option<String> {
        match &self.state.accounts.lock().unwrap().get(account)?.answer {
            AuthAnswer::Token { access_token, .. } => Some(access_token.clone()),
            _ => None,
        }
    }

    /// Requests that named `account` (authorized or not).
    pub fn requests(&self, account: &str) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.account.as_deref() == Some(account))
            .count()
    }

    pub fn total_requests(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Every request so far, in order.
    pub fn request_log(&self) -> Vec<AuthRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Holds every token answer back until the returned guard is dropped: a barrier for tests
    /// that need many logins waiting on one fetch at once.
    pub fn hold(&self) -> AuthHold {
        self.state.held.send_replace(true);
        AuthHold(self.state.clone())
    }

    /// Requests waiting on a [`AuthServer::hold`].
    pub fn waiting(&self) -> usize {
        self.state.waiting.load(Ordering::SeqCst)
    }

    pub fn introspection(&self) -> Option<&Introspection> {
        self.introspection.as_ref()
    }
}

/// The token or password an answer hands out.
fn remember_answer(answer: &AuthAnswer) {
    match answer {
        AuthAnswer::Token { access_token, .. } => {
            super::secrets::remember("auth-server token", access_token);
        }
        AuthAnswer::Raw { body, .. } => {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else {
                return;
            };
            for (field, kind) in [
                ("accessToken", "auth-server token"),
                ("pass", "auth-server password"),
            ] {
                if let Some(secret) = value.get(field).and_then(|v| v.as_str()) {
                    super::secrets::remember(kind, secret);
                }
            }
        }
        AuthAnswer::Status(_) => {}
    }
}

impl AuthState {
    async fn handle(&self, req: SimpleRequest) -> Reply {
        let account = param(&req.query, "account").map(str::to_owned);
        let proto = param(&req.query, "proto").map(str::to_owned);
        let authorized = match &self.expected_authorization {
            Some(expected) => req.authorization.as_deref() == Some(expected.as_str()),
            None => true,
        };
        if req.path == "/check" {
            return self.check_password(&req, authorized);
        }
        if req.path != "/token" {
            return (404, r#"{"error":"not found"}"#.to_owned());
        }
        self.requests.lock().unwrap().push(AuthRequest {
            account: account.clone(),
            proto,
            authorized,
        });
        if req.method != "GET" {
            return (405, r#"{"error":"method not allowed"}"#.to_owned());
        }
        if !authorized {
            return (401, r#"{"error":"unauthorized"}"#.to_owned());
        }
        let Some(account) = account else {
            return (400, r#"{"error":"account missing"}"#.to_owned());
        };
        let (answer, delay) = match self.accounts.lock().unwrap().get(&account) {
            Some(entry) => (entry.answer.clone(), entry.delay),
            None => (AuthAnswer::Status(404), None),
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut held = self.held.subscribe();
        if *held.borrow() {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _ = held.wait_for(|held| !*held).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        match answer {
            AuthAnswer::Token {
                user,
                access_token,
                expires_in,
            } => {
                let mut body = serde_json::json!({ "user": user, "accessToken": access_token });
                if let Some(secs) = expires_in {
                    body["expiresIn"] = secs.into();
                }
                (200, body.to_string())
            }
            AuthAnswer::Status(status) => (
                status,
                serde_json::json!({ "error": format!("status {status}") }).to_string(),
            ),
            AuthAnswer::Raw { status, body } => (status, body),
        }
    }

    /// `POST /check`: 200 for a known user's password (JSON body, no query, basic auth when
    /// required), 403 for any other, 401 without the right basic auth, 400 for a bad request.
    fn check_password(&self, req: &SimpleRequest, authorized: bool) -> Reply {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let field = |name: &str| body.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let mut check = PasswordCheck {
            method: req.method.clone(),
            content_type: req.content_type.clone(),
            has_query: !req.query.is_empty(),
            authorized,
            user: field("user"),
            password: field("password"),
            protocol: field("protocol"),
            client: field("client"),
            accepted: false,
        };
        let account = match (&check.user, &check.password) {
            (Some(user), Some(password)) => {
                let passwords = self.passwords.lock().unwrap();
                passwords
                    .get(user)
                    .filter(|entry| entry.password == *password)
                    .map(|entry| entry.account.clone())
            }
            _ => None,
        };
        let reply = if let Some(status) = *self.check_status.lock().unwrap() {
            (
                status,
                serde_json::json!({ "error": format!("status {status}") }).to_string(),
            )
        } else if !authorized {
            (401, r#"{"error":"unauthorized"}"#.to_owned())
        } else if req.method != "POST" || check.has_query || check.user.is_none() {
            (400, r#"{"error":"bad request"}"#.to_owned())
        } else if let Some(account) = account {
            check.accepted = true;
            let body = match account {
                Some(account) => serde_json::json!({ "account": account }),
                None => serde_json::json!({}),
            };
            (200, body.to_string())
        } else {
            (403, r#"{"error":"wrong password"}"#.to_owned())
        };
        self.checks.lock().unwrap().push(check);
        reply
    }
}
