//! Getting a first refresh token for an account: the authorization-code flow with PKCE and
//! `state` (RFC 6749 4.1, RFC 7636 S256, RFC 9700 advice), its loopback redirect listener for
//! `mailgate authorize`, and the device flow (RFC 8628).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::provider::{
    DeviceAuthorization, GRANT_AUTHORIZATION_CODE, GRANT_DEVICE_CODE, GrantError, Provider,
    TokenAnswer,
};
use crate::config::Grant;
use crate::jwt;
use crate::sanitize;
use crate::secret::Secret;

/// RFC 8628 3.5: without an `interval`, clients poll every five seconds, and a `slow_down`
/// adds five more.
const DEFAULT_DEVICE_INTERVAL: Duration = Duration::from_secs(5);
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Bounds on what a provider's device authorization may ask for: codes live minutes
/// (Microsoft 15, Google 30) and polls are seconds apart; more would overflow the deadline or
/// leave the flow waiting for ever.
const MAX_DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(60 * 60);
const MAX_DEVICE_INTERVAL: Duration = Duration::from_secs(60);

/// An authorization request on its way: what to open in a browser and what to check after.
pub struct Pending {
    pub url: String,
    pub redirect_uri: String,
    state: Secret<String>,
    verifier: Secret<String>,
}

/// Why a flow did not end with a refresh token.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("{0}")]
    Setup(String),
    #[error("the provider refused: {0}")]
    Denied(String),
    #[error("no answer in time")]
    TimedOut,
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("the provider issued no refresh token (is offline access in the scope?)")]
    NoRefreshToken,
}

/// Builds the authorization request for a delegated account of `provider`.
///
/// # Errors
/// The provider has no authorize endpoint, no redirect URL, or no client id.
pub fn start(
    provider: &Provider,
    account_scope: Option<&str>,
    login_hint: Option<&str>,
    redirect_uri: Option<&str>,
) -> Result<Pending, FlowError> {
    let authorize = provider.authorize_url.as_deref().ok_or_else(|| {
        FlowError::Setup(format!("provider {} has no authorize_url", provider.name))
    })?;
    let redirect_uri = redirect_uri
        .or(provider.redirect_url.as_deref())
        .ok_or_else(|| {
            FlowError::Setup(format!("provider {} has no redirect_url", provider.name))
        })?;
    let client_id = provider
        .client_id
        .as_deref()
        .ok_or_else(|| FlowError::Setup(format!("provider {} has no client_id", provider.name)))?;
    let state = random().map_err(FlowError::Setup)?;
    let verifier = format!(
        "{}{}",
        random().map_err(FlowError::Setup)?,
        random().map_err(FlowError::Setup)?
    );
    let challenge = BASE64URL.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    let mut url = url::Url::parse(authorize)
        .map_err(|_| FlowError::Setup("authorize_url is not a URL".to_owned()))?;
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if let Some(scope) = provider.scope(account_scope, Grant::RefreshToken) {
            query.append_pair("scope", &scope);
        }
        if let Some(hint) = login_hint {
            query.append_pair("login_hint", hint);
        }
        for (name, value) in provider.authorize_extras() {
            query.append_pair(name, value);
        }
    }
    Ok(Pending {
        url: url.to_string(),
        redirect_uri: redirect_uri.to_owned(),
        state: Secret::new(state),
        verifier: Secret::new(verifier),
    })
}

impl Pending {
    /// Whether `state` is the one this request sent (compared in constant time).
    pub fn state_matches(&self, state: &str) -> bool {
        same_state(&self.state, state)
    }

    /// The `state` this request carries, for keeping pending requests by it.
    pub fn state(&self) -> &Secret<String> {
        &self.state
    }

    /// Exchanges the code from the redirect, sending the PKCE verifier.
    ///
    /// # Errors
    /// The provider refused the code, or answered without a refresh token.
    pub async fn finish(&self, provider: &Provider, code: &str) -> Result<TokenAnswer, FlowError> {
        let answer = provider
            .grant(
                GRANT_AUTHORIZATION_CODE,
                vec![
                    ("code", Secret::new(code.to_owned())),
                    ("redirect_uri", Secret::new(self.redirect_uri.clone())),
                    ("code_verifier", self.verifier.clone()),
                ],
            )
            .await?;
        if answer.refresh_token.is_none() {
            return Err(FlowError::NoRefreshToken);
        }
        Ok(answer)
    }
}

fn same_state(expected: &Secret<String>, state: &str) -> bool {
    bool::from(expected.expose().as_bytes().ct_eq(state.as_bytes()))
}

/// What came back to the redirect URL.
#[derive(Debug)]
enum Callback {
    /// RFC 6749 4.1.2 and 4.1.2.1: both answers carry the request's `state`; one without is
    /// refused like one with another.
    Code {
        code: Secret<String>,
        state: Option<String>,
    },
    Error {
        error: String,
        state: Option<String>,
    },
}

impl Callback {
    fn state(&self) -> Option<&str> {
        match self {
            Callback::Code { state, .. } | Callback::Error { state, .. } => state.as_deref(),
        }
    }
}

/// Listens on the redirect URL (loopback only), waits for the provider's redirect with this
/// request's `state` and returns the code. Redirects with another state (forged, or of an
/// earlier run) get 400 and the wait goes on: anyone on the host can reach the listener.
///
/// # Errors
/// A redirect URL that is not loopback http, a port in use, an error answer, or nothing
/// within `timeout`.
pub async fn wait_for_code(
    pending: &Pending,
    timeout: Duration,
) -> Result<Secret<String>, FlowError> {
    let url = url::Url::parse(&pending.redirect_uri)
        .map_err(|_| FlowError::Setup("redirect_url is not a URL".to_owned()))?;
    let address = loopback_address(&url)?;
    let listener = TcpListener::bind(address).await.map_err(|e| {
        FlowError::Setup(format!("cannot listen on {address} for the redirect: {e}"))
    })?;
    let path = url.path().to_owned();
    let (sender, mut received) = mpsc::channel(1);
    let server = tokio::spawn(serve_callback(
        listener,
        path,
        pending.state.clone(),
        sender,
    ));
    let callback = tokio::time::timeout(timeout, received.recv()).await;
    server.abort();
    match callback {
        Err(_) | Ok(None) => Err(FlowError::TimedOut),
        Ok(Some(Callback::Error { error, .. })) => Err(FlowError::Denied(error)),
        Ok(Some(Callback::Code { code, .. })) => Ok(code),
    }
}

fn loopback_address(url: &url::Url) -> Result<SocketAddr, FlowError> {
    let not_loopback = || {
        FlowError::Setup(
            "mailgate authorize listens on the redirect_url itself, so it must be http://localhost:PORT/... or http://127.0.0.1:PORT/...; use --device otherwise".to_owned(),
        )
    };
    if url.scheme() != "http" {
        return Err(not_loopback());
    }
    let port = url.port().ok_or_else(not_loopback)?;
    match url.host() {
        Some(url::Host::Domain("localhost")) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        Some(url::Host::Ipv4(ip)) if ip.is_loopback() => Ok(SocketAddr::from((ip, port))),
        Some(url::Host::Ipv6(ip)) if ip.is_loopback() => Ok(SocketAddr::from((ip, port))),
        _ => Err(not_loopback()),
    }
}

/// Answers requests on the redirect listener until one reaches `path` with a code or an
/// error and the expected `state`; other paths (a browser's favicon) get 404, other states 400.
async fn serve_callback(
    listener: TcpListener,
    path: String,
    expected: Secret<String>,
    found: mpsc::Sender<Callback>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (path, expected, found) = (path.clone(), expected.clone(), found.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                let callback = (request.uri().path() == path)
                    .then(|| parse_callback(request.uri().query().unwrap_or("")))
                    .flatten();
                let (status, text, callback) = judge(callback, &expected);
                let found = found.clone();
                async move {
                    if let Some(callback) = callback {
                        let _ = found.send(callback).await;
                    }
                    let response = hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; charset=utf-8")
                        .header("cache-control", "no-store")
                        .body(Full::new(Bytes::from(text)))
                        .expect("a valid response");
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The status and text for a request to the redirect listener, and the callback to act on:
/// only one with this authorization's `state`.
fn judge(
    callback: Option<Callback>,
    expected: &Secret<String>,
) -> (u16, &'static str, Option<Callback>) {
    match callback {
        None => (404, "Not found", None),
        Some(callback)
            if !callback
                .state()
                .is_some_and(|state| same_state(expected, state)) =>
        {
            tracing::warn!(
                "a redirect without this authorization's state was refused; still waiting"
            );
            (
                400,
                "This answer does not belong to the authorization mailgate is waiting for.",
                None,
            )
        }
        Some(callback @ Callback::Code { .. }) => (
            200,
            "mailgate received the authorization; you can close this window.",
            Some(callback),
        ),
        Some(callback @ Callback::Error { .. }) => (
            200,
            "The provider did not authorize mailgate; see the terminal.",
            Some(callback),
        ),
    }
}

fn parse_callback(query: &str) -> Option<Callback> {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "code" => code = Some(Secret::new(value.into_owned())),
            "state" => state = Some(value.into_owned()),
            "error" => error = Some(value.into_owned()),
            "error_description" => {
                error = Some(format!("{} {value}", error.unwrap_or_default()));
            }
            _ => {}
        }
    }
    match (code, state, error) {
        (_, state, Some(error)) => Some(Callback::Error {
            error: sanitize::for_log(&error),
            state,
        }),
        (Some(code), state, None) => Some(Callback::Code { code, state }),
        _ => None,
    }
}

/// Runs the device flow: starts it, shows the code with `show`, then polls the token endpoint
/// as RFC 8628 3.5 says until the user finishes, declines, or the code expires.
///
/// # Errors
/// The provider refused, the user declined, or the code expired.
pub async fn device(
    provider: &Provider,
    account_scope: Option<&str>,
    show: impl FnOnce(&DeviceAuthorization),
) -> Result<TokenAnswer, FlowError> {
    let scope = provider.scope(account_scope, Grant::RefreshToken);
    let authorization = provider.device_authorization(scope.as_deref()).await?;
    show(&authorization);
    let mut interval = authorization
        .interval
        .map_or(DEFAULT_DEVICE_INTERVAL, |seconds| {
            Duration::from_secs(seconds).min(MAX_DEVICE_INTERVAL)
        });
    let lifetime = Duration::from_secs(authorization.expires_in).min(MAX_DEVICE_CODE_LIFETIME);
    let deadline = tokio::time::Instant::now() + lifetime;
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(FlowError::Grant(GrantError::ExpiredToken));
        }
        let polled = provider
            .grant(
                GRANT_DEVICE_CODE,
                vec![("device_code", authorization.device_code.clone())],
            )
            .await;
        match polled {
            Ok(answer) if answer.refresh_token.is_some() => return Ok(answer),
            Ok(_) => return Err(FlowError::NoRefreshToken),
            Err(GrantError::AuthorizationPending) => {}
            Err(GrantError::SlowDown) => {
                interval = (interval + SLOW_DOWN_STEP).min(MAX_DEVICE_INTERVAL);
            }
            Err(GrantError::Temporary(reason)) => {
                tracing::warn!(reason, "polling the token endpoint failed; trying again");
            }
            Err(other) => return Err(FlowError::Grant(other)),
        }
    }
}

fn random() -> Result<String, String> {
    jwt::random_id()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_are_read_from_the_query() {
        match parse_callback("code=abc&state=xyz&session_state=1") {
            Some(Callback::Code { code, state }) => {
                assert_eq!(code.expose(), "abc");
                assert_eq!(state.as_deref(), Some("xyz"));
            }
            other => panic!("{other:?}"),
        }
        match parse_callback("error=access_denied&error_description=User%20said%20no%1b&state=x") {
            Some(Callback::Error { error, state }) => {
                assert_eq!(error, "access_denied User said no\\u{1b}");
                assert_eq!(state.as_deref(), Some("x"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_callback("foo=bar").is_none());
    }

    /// Issue 13 item 16: a redirect with another state, or none, used to end the wait.
    #[test]
    fn only_the_expected_state_is_acted_on() {
        let expected = Secret::new("right".to_owned());
        for query in [
            "code=abc&state=wrong",
            "code=abc",
            "error=access_denied&state=wrong",
            "error=access_denied",
        ] {
            let (status, _, callback) = judge(parse_callback(query), &expected);
            assert_eq!((status, callback.is_none()), (400, true), "{query}");
        }
        let (status, _, callback) = judge(parse_callback("code=abc&state=right"), &expected);
        assert!(status == 200 && matches!(callback, Some(Callback::Code { .. })));
        let (status, _, callback) = judge(parse_callback("foo=bar"), &expected);
        assert!(status == 404 && callback.is_none());
    }

    #[test]
    fn only_loopback_redirects_are_listened_on() {
        let parse = |text: &str| url::Url::parse(text).unwrap();
        assert!(loopback_address(&parse("http://localhost:8400/callback")).is_ok());
        assert!(loopback_address(&parse("http://127.0.0.1:8400/cb")).is_ok());
        assert!(loopback_address(&parse("https://mailgate.example/cb")).is_err());
        assert!(loopback_address(&parse("http://10.0.0.1:8400/cb")).is_err());
    }
}
