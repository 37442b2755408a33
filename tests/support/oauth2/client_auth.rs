//! Client authentication at the token and device authorization endpoints: RFC 6749 section
//! 2.3.1 (`client_secret_basic`, `client_secret_post`), RFC 7523 section 2.2 client assertions
//! checked the way Microsoft identity platform checks certificate credentials, and public
//! clients that only name themselves.

use base64::Engine as _;

use super::crypto::{self, peek_claims, unix_now};
use super::server::HttpRequest;
use super::state::{ClientKey, Form, OAuthError, Shared, State, presented_auth};
use super::{CLIENT_ASSERTION_TYPE_JWT, ClientAuthMethod};

/// Longest a client assertion may still be valid; Microsoft refuses assertions that expire
/// more than 10 minutes ahead.
const MAX_CLIENT_ASSERTION_SECS: i64 = 600;

/// A client that proved its identity (or, if public, named itself).
pub(super) struct AuthedClient {
    pub id: String,
    pub public: bool,
}

/// Authenticates the client of a token or device authorization request.
pub(super) fn authenticate(
    shared: &Shared,
    st: &mut State,
    req: &HttpRequest,
    form: &Form,
) -> Result<AuthedClient, OAuthError> {
    let authorization = req.header("authorization");
    let method = presented_auth(
        req.headers.contains_key("authorization"),
        form.has("client_secret"),
        form.has("client_assertion") || form.has("client_assertion_type"),
    )
    // RFC 6749 section 2.3: "The client MUST NOT use more than one authentication method in
    // each request."
    .ok_or_else(|| OAuthError::invalid_request("more than one client authentication method"))?;
    let confidential = |id: String| AuthedClient { id, public: false };
    match method {
        ClientAuthMethod::Basic => {
            let (id, secret) = authorization
                .and_then(parse_basic)
                .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
            if form.get("client_id").is_some_and(|form_id| form_id != id) {
                return Err(OAuthError::invalid_request(
                    "client_id differs from the Basic user",
                ));
            }
            check_secret(st, &id, &secret)?;
            Ok(confidential(id))
        }
        ClientAuthMethod::Post => {
            let id = form
                .get("client_id")
                .ok_or_else(|| OAuthError::invalid_request("client_id missing"))?;
            check_secret(st, id, form.get("client_secret").unwrap_or_default())?;
            Ok(confidential(id.to_owned()))
        }
        ClientAuthMethod::Assertion => {
            let (Some(kind), Some(assertion)) = (
                form.get("client_assertion_type"),
                form.get("client_assertion"),
            ) else {
                return Err(OAuthError::invalid_request(
                    "client_assertion_type and client_assertion go together",
                ));
            };
            if kind != CLIENT_ASSERTION_TYPE_JWT {
                return Err(OAuthError::invalid_client(
                    "unsupported client_assertion_type",
                ));
            }
            let id = verify_client_assertion(shared, st, assertion, form.get("client_id"))?;
            Ok(confidential(id))
        }
        _ => {
            let id = form
                .get("client_id")
                .ok_or_else(|| OAuthError::invalid_client("no client authentication"))?;
            match st.clients.get(id).map(|c| &c.key) {
                Some(ClientKey::Public) => Ok(AuthedClient {
                    id: id.to_owned(),
                    public: true,
                }),
                Some(_) => Err(OAuthError::invalid_client("client authentication required")),
                None => Err(OAuthError::invalid_client("unknown client")),
            }
        }
    }
}

fn check_secret(st: &State, id: &str, secret: &str) -> Result<(), OAuthError> {
    match st.clients.get(id).map(|c| &c.key) {
        Some(ClientKey::Secret(expected)) if expected == secret => Ok(()),
        _ => Err(OAuthError::invalid_client("unknown client or wrong secret")),
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 section 2.3.1) decoded.
pub(super) fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, credentials) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// Undoes `application/x-www-form-urlencoded` encoding: `+` is a space, `%XX` a byte.
fn form_decode(text: &str) -> Option<String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// Checks an RFC 7523 client assertion the way Microsoft identity platform checks certificate
/// credentials; the client id on success. Every failure is `invalid_client`.
fn verify_client_assertion(
    shared: &Shared,
    st: &mut State,
    assertion: &str,
    form_client_id: Option<&str>,
) -> Result<String, OAuthError> {
    let bad = OAuthError::invalid_client;
    // Only to find the key; nothing unverified is trusted.
    let unverified = peek_claims(assertion).map_err(bad)?;
    let id = form_client_id
        .or_else(|| unverified.get("iss").and_then(|v| v.as_str()))
        .ok_or_else(|| bad("assertion names no client"))?
        .to_owned();
    let Some(ClientKey::Certificate {
        thumbprint,
        public_key,
    }) = st.clients.get(&id).map(|c| &c.key)
    else {
        return Err(bad("unknown client or no certificate registered"));
    };
    let jwt = crypto::verify_rs256(assertion, public_key).map_err(bad)?;
    if !jwt
        .header_str("typ")
        .is_some_and(|t| t.eq_ignore_ascii_case("JWT"))
    {
        return Err(bad("typ is not JWT"));
    }
    if jwt.header_str("x5t#S256") != Some(thumbprint.as_str()) {
        return Err(bad("x5t#S256 does not name the registered certificate"));
    }
    // RFC 7523 section 3: iss and sub are the client id, aud the token endpoint.
    if jwt.claim_str("iss") != Some(id.as_str()) || jwt.claim_str("sub") != Some(id.as_str()) {
        return Err(bad("iss and sub must be the client id"));
    }
    if !jwt.audience_is(&shared.token_url()) {
        return Err(bad("aud is not the token endpoint"));
    }
    let now = unix_now();
    jwt.check_times(now, MAX_CLIENT_ASSERTION_SECS)
        .map_err(bad)?;
    let Some(jti) = jwt.claim_str("jti").filter(|j| !j.is_empty()) else {
        return Err(bad("jti missing"));
    };
    if !st.used_jtis.insert((id.clone(), jti.to_owned())) {
        return Err(bad("jti already used"));
    }
    Ok(id)
}
