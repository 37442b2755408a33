//! The token service: this mailgate answers the authentication-server contract
//! (`GET /token?account=&proto=` with basic auth, docs/auth-server.md) from its own OAuth2
//! accounts, so that one instance holds the refresh tokens and sidecars never race each
//! other for a rotating one.

use hyper::{Method, StatusCode};

use super::{Admin, AdminRequest, AdminRuntime, Reply, check_basic_auth, plain, reply};
use crate::config::{Protocol, TokenServiceConfig};
use crate::login::UpstreamAuth;
use crate::sanitize::Escaped;
use crate::secret::Secret;
use crate::token::TokenError;

const REALM: &str = "mailgate token service";

/// Who may ask.
pub struct Settings {
    user: String,
    password: Option<Secret<String>>,
}

impl Settings {
    pub fn new(config: &TokenServiceConfig) -> Self {
        Self {
            user: config.user.clone(),
            password: config.password.clone(),
        }
    }
}

pub async fn respond(
    request: &AdminRequest,
    settings: &Settings,
    runtime: &AdminRuntime,
    admin: &Admin,
) -> Reply {
    if request.method != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let throttle = runtime.throttle.as_deref();
    if let Err(refused) = check_basic_auth(
        request,
        &settings.user,
        settings.password.as_ref(),
        REALM,
        throttle,
    )
    .await
    {
        admin.metrics.token_service("unauthorized");
        return *refused;
    }
    let query: Vec<(String, String)> = url::form_urlencoded::parse(request.query.as_bytes())
        .into_owned()
        .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(account) = param("account") else {
        // What an auth server says to a readiness probe: up, but no account asked for.
        return plain(StatusCode::BAD_REQUEST, "account missing\n");
    };
    let protocol = match param("proto") {
        None | Some("imap") => Protocol::Imap,
        Some("smtp") => Protocol::Smtp,
        Some(_) => return plain(StatusCode::BAD_REQUEST, "proto must be imap or smtp\n"),
    };
    let (Some(oauth2), Some(tokens)) = (&runtime.oauth2, &runtime.tokens) else {
        return answer(
            admin,
            account,
            "refused",
            plain(StatusCode::NOT_FOUND, "no such account\n"),
        );
    };
    if oauth2.account(account).is_none() {
        return answer(
            admin,
            account,
            "refused",
            plain(StatusCode::NOT_FOUND, "no such account\n"),
        );
    }
    match tokens.get(account, protocol).await {
        Ok((_, cached)) => {
            let UpstreamAuth::Bearer { user, token } = &cached.token.auth else {
                return answer(
                    admin,
                    account,
                    "error",
                    plain(StatusCode::SERVICE_UNAVAILABLE, "no bearer token\n"),
                );
            };
            let mut body = serde_json::json!({ "user": user, "accessToken": token.expose() });
            if let Some(remaining) = cached.remaining() {
                body["expiresIn"] = remaining.as_secs().into();
            }
            let mut ok = reply(StatusCode::OK, "application/json", body.to_string());
            ok.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            answer(admin, account, "ok", ok)
        }
        Err(
            TokenError::Refused | TokenError::NeedsReauthorization | TokenError::Misconfigured(_),
        ) => answer(
            admin,
            account,
            "refused",
            plain(
                StatusCode::FORBIDDEN,
                "account refused or needs re-authorization\n",
            ),
        ),
        Err(TokenError::Unavailable(_)) => answer(
            admin,
            account,
            "error",
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "token source unavailable\n",
            ),
        ),
    }
}

/// Counts and logs an answer, like a login.
fn answer(admin: &Admin, account: &str, result: &'static str, reply: Reply) -> Reply {
    admin.metrics.token_service(result);
    tracing::info!(account = %Escaped(account), result, "token service request");
    reply
}
