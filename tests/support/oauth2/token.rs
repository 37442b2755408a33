//! The token endpoint (RFC 6749 section 3.2): parsing, hold, delay and injected failures, the
//! request log, dispatch to the grants (in `grants` and `device`), the answer shape (section
//! 5.1); and RFC 7662 introspection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::client_auth::{authenticate, parse_basic};
use super::crypto::peek_claims;
use super::server::{HttpReply, HttpRequest};
use super::state::{AccessToken, Form, OAuthError, Shared, State, presented_auth};
use super::{
    ClientAuthMethod, GRANT_AUTHORIZATION_CODE, GRANT_CLIENT_CREDENTIALS, GRANT_DEVICE_CODE,
    GRANT_JWT_BEARER, GRANT_PASSWORD, GRANT_REFRESH_TOKEN, TokenRequestRecord, device, grants,
};

/// Longest a token request waits on a hold before it is answered 503; far above any test's
/// own timeout, so it only ends holds a test forgot.
const MAX_HOLD: Duration = Duration::from_secs(120);

/// A successful token answer (RFC 6749 section 5.1).
pub(super) struct Answer {
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: Option<String>,
    pub scope: Option<String>,
    pub user: String,
}

impl Answer {
    pub fn reply(&self) -> HttpReply {
        let mut body = serde_json::json!({
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        });
        if let Some(refresh) = &self.refresh_token {
            body["refresh_token"] = refresh.as_str().into();
        }
        if let Some(scope) = &self.scope {
            body["scope"] = scope.as_str().into();
        }
        // RFC 6749 section 5.1: token answers must not be cached.
        HttpReply::json(200, &body)
            .with_header("cache-control", "no-store")
            .with_header("pragma", "no-cache")
    }
}

/// Logs the request when finished, or as `abandoned` when dropped unfinished (the client went
/// away and hyper dropped the handler).
struct RecordGuard {
    shared: Arc<Shared>,
    record: Option<TokenRequestRecord>,
}

impl RecordGuard {
    fn finish(mut self, st: &mut State, outcome: Result<&Answer, &OAuthError>) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        match outcome {
            Ok(answer) => {
                record.result = "ok".to_owned();
                record.user = Some(answer.user.clone());
                record.access_token = Some(answer.access_token.clone());
                if record.scope.is_none() {
                    record.scope.clone_from(&answer.scope);
                }
            }
            Err(error) => record.result.clone_from(&error.code),
        }
        st.records.push(record);
    }
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.result = "abandoned".to_owned();
            self.shared.lock().records.push(record);
        }
    }
}

/// Counts a request as held for as long as it lives.
struct HeldCount<'a>(&'a AtomicUsize);

impl<'a> HeldCount<'a> {
    fn new(counter: &'a AtomicUsize) -> HeldCount<'a> {
        counter.fetch_add(1, Ordering::SeqCst);
        HeldCount(counter)
    }
}

impl Drop for HeldCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `POST /token`. Nothing is issued, rotated or consumed before the hold and the delay are
/// over, and then the answer is produced without another wait: a client that disconnects
/// while held or delayed changes nothing.
pub(super) async fn endpoint(shared: &Arc<Shared>, req: HttpRequest) -> HttpReply {
    let parsed = parse_request(&req);
    remember_presented(&req, parsed.as_ref().ok());
    let record = RecordGuard {
        shared: shared.clone(),
        record: Some(initial_record(&req, parsed.as_ref().ok())),
    };
    let hold_answers = shared.lock().settings.hold_answers;
    if !hold_answers && !wait_while_held(shared).await {
        let error = OAuthError::new(503, "temporarily_unavailable", "held too long");
        record.finish(&mut shared.lock(), Err(&error));
        return error.reply();
    }
    let delay = shared.lock().settings.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let reply = {
        let mut st = shared.lock();
        let outcome = match st.take_injected_failure() {
            Some(error) => Err(error),
            None => parsed.and_then(|form| grant(shared, &mut st, &req, &form)),
        };
        match outcome {
            Ok(answer) => {
                record.finish(&mut st, Ok(&answer));
                answer.reply()
            }
            Err(error) => {
                record.finish(&mut st, Err(&error));
                error.reply()
            }
        }
    };
    // An answer in flight: whatever happens to the client, the provider has committed it.
    if hold_answers {
        wait_while_held(shared).await;
    }
    reply
}

/// Waits while a hold is in place; false when it lasted longer than [`MAX_HOLD`].
async fn wait_while_held(shared: &Shared) -> bool {
    let mut holds = shared.holds.subscribe();
    if *holds.borrow_and_update() == 0 {
        return true;
    }
    let _held = HeldCount::new(&shared.held);
    matches!(
        tokio::time::timeout(MAX_HOLD, holds.wait_for(|n| *n == 0)).await,
        Ok(Ok(_))
    )
}

fn parse_request(req: &HttpRequest) -> Result<Form, OAuthError> {
    // RFC 6749 section 2.3.1: credentials "MUST NOT be included in the request URI"; this
    // endpoint's URI has no query, so a client adding one puts parameters where they leak.
    if !req.query.is_empty() {
        return Err(OAuthError::invalid_request(
            "parameters belong in the body, not the URI",
        ));
    }
    if !req.is_form() {
        return Err(OAuthError::invalid_request(
            "body must be application/x-www-form-urlencoded",
        ));
    }
    Form::parse(&req.body)
}

/// Credentials a client presented are secrets its logs must not show, right or wrong.
fn remember_presented(req: &HttpRequest, form: Option<&Form>) {
    use super::super::secrets::remember;
    if let Some((_, secret)) = req.header("authorization").and_then(parse_basic) {
        remember("OAuth client secret (presented)", &secret);
    }
    let Some(form) = form else {
        return;
    };
    for (name, kind) in [
        ("client_secret", "OAuth client secret (presented)"),
        ("client_assertion", "OAuth client assertion"),
        ("assertion", "OAuth JWT bearer assertion"),
        ("code_verifier", "PKCE code verifier"),
        ("code", "OAuth authorization code"),
        ("device_code", "OAuth device code"),
        ("refresh_token", "OAuth refresh token"),
    ] {
        if let Some(value) = form.get(name) {
            remember(kind, value);
        }
    }
}

fn initial_record(req: &HttpRequest, form: Option<&Form>) -> TokenRequestRecord {
    let get = |name: &str| form.and_then(|f| f.get(name)).map(str::to_owned);
    let peek_iss = |name: &str| {
        form.and_then(|f| f.get(name))
            .and_then(|jwt| peek_claims(jwt).ok())
            .and_then(|claims| claims.get("iss")?.as_str().map(str::to_owned))
    };
    let basic_id = req
        .header("authorization")
        .and_then(parse_basic)
        .map(|(id, _)| id);
    let grant_type = get("grant_type").unwrap_or_default();
    let client_id = basic_id
        .or_else(|| get("client_id"))
        .or_else(|| peek_iss("client_assertion"))
        .or_else(|| {
            (grant_type == GRANT_JWT_BEARER)
                .then(|| peek_iss("assertion"))
                .flatten()
        });
    let client_auth = presented_auth(
        req.headers.contains_key("authorization"),
        get("client_secret").is_some(),
        get("client_assertion").is_some() || get("client_assertion_type").is_some(),
    )
    .unwrap_or(ClientAuthMethod::Several);
    TokenRequestRecord {
        grant_type,
        client_id,
        client_auth,
        refresh_token: get("refresh_token"),
        scope: get("scope"),
        result: String::new(),
        user: None,
        access_token: None,
    }
}

fn grant(
    shared: &Shared,
    st: &mut State,
    req: &HttpRequest,
    form: &Form,
) -> Result<Answer, OAuthError> {
    let grant_type = form
        .get("grant_type")
        .ok_or_else(|| OAuthError::invalid_request("grant_type missing"))?;
    if grant_type == GRANT_JWT_BEARER {
        // The signed assertion is the authentication (RFC 7523 section 3: client
        // authentication is optional for this grant; Google's service accounts send none).
        return grants::service_account(shared, st, form);
    }
    let known = [
        GRANT_CLIENT_CREDENTIALS,
        GRANT_REFRESH_TOKEN,
        GRANT_AUTHORIZATION_CODE,
        GRANT_PASSWORD,
        GRANT_DEVICE_CODE,
    ];
    if !known.contains(&grant_type) {
        return Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            "grant type not supported",
        ));
    }
    let client = authenticate(shared, st, req, form)?;
    let registered = &st.clients[&client.id];
    if let Some(allowed) = &registered.allowed_grants
        && !allowed.iter().any(|g| g == grant_type)
    {
        return Err(OAuthError::unauthorized_client(
            "grant type not allowed for this client",
        ));
    }
    match grant_type {
        GRANT_CLIENT_CREDENTIALS => grants::client_credentials(shared, st, &client, form),
        GRANT_REFRESH_TOKEN => grants::refresh(shared, st, &client, form),
        GRANT_AUTHORIZATION_CODE => grants::code(shared, st, &client, form),
        GRANT_PASSWORD => grants::password(shared, st, &client, form),
        _ => device::poll(shared, st, &client.id, form, req.arrived),
    }
}

// --- introspection --------------------------------------------------------------------------

/// The access token `token` when it is unexpired and unrevoked.
pub(super) fn active_access<'a>(st: &'a State, token: &str) -> Option<&'a AccessToken> {
    st.access_tokens
        .get(token)
        .filter(|a| !a.revoked && Instant::now() < a.expires_at)
}

/// `POST /introspect` (RFC 7662 section 2): `{"active": true, "email": USER, ...}` for an
/// active access token of this provider, else `{"active": false}`.
pub(super) fn introspect(shared: &Shared, req: &HttpRequest) -> HttpReply {
    if !req.is_form() {
        return OAuthError::invalid_request("body must be application/x-www-form-urlencoded")
            .reply();
    }
    let form = match Form::parse(&req.body) {
        Ok(form) => form,
        Err(error) => return error.reply(),
    };
    let Some(token) = form.get("token") else {
        return OAuthError::invalid_request("token missing").reply();
    };
    let st = shared.lock();
    let body = match active_access(&st, token) {
        Some(access) => serde_json::json!({
            "active": true,
            "email": access.user,
            "username": access.user,
            "sub": access.user,
            "client_id": access.client_id,
            "scope": access.scope.as_deref().unwrap_or(""),
            "token_type": "Bearer",
            "iat": access.issued_unix,
            "exp": access.issued_unix + access.lifetime.as_secs() as i64,
        }),
        None => serde_json::json!({ "active": false }),
    };
    HttpReply::json(200, &body)
}
