//! The token service: this mailgate answers the authentication-server contract
//! (`GET /token?account=&proto=` with basic auth, docs/auth-server.md) from its own OAuth2
//! accounts, so that one instance holds the refresh tokens and sidecars never race each
//! other for a rotating one.

use std::collections::BTreeSet;
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::{Admin, AdminRequest, AdminRuntime, Reply, check_basic_auth, plain, reply};
use crate::config::{Protocol, TokenServiceConfig};
use crate::login::UpstreamAuth;
use crate::sanitize::Escaped;
use crate::secret::Secret;
use crate::token::{Token, TokenError};

const REALM: &str = "mailgate token service";

/// The clients that may ask, each for its own accounts.
pub struct Settings {
    clients: Vec<Client>,
}

/// A sidecar with its basic-auth login and the accounts it may fetch.
struct Client {
    user: String,
    password: Secret<String>,
    /// `None`: every account.
    accounts: Option<BTreeSet<String>>,
}

impl Settings {
    /// The configured `clients`, and `user` with the single password as one more client
    /// that may fetch every account (the form before per-client credentials).
    pub fn new(config: &TokenServiceConfig) -> Self {
        let single = config.password.as_ref().map(|password| Client {
            user: config.user.clone(),
            password: password.clone(),
            accounts: None,
        });
        let clients = config.clients.iter().filter_map(|(name, client)| {
            let password = client.password.clone()?;
            let all = client.accounts.iter().any(|account| account == "*");
            Some(Client {
                user: name.clone(),
                password,
                accounts: (!all).then(|| client.accounts.iter().cloned().collect()),
            })
        });
        Self {
            clients: single.into_iter().chain(clients).collect(),
        }
    }

    fn client(&self, user: &str) -> Option<&Client> {
        self.clients.iter().find(|client| client.user == user)
    }
}

impl Client {
    fn may_fetch(&self, account: &str) -> bool {
        self.accounts
            .as_ref()
            .is_none_or(|accounts| accounts.contains(account))
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
    let logins = settings
        .clients
        .iter()
        .map(|client| (client.user.as_str(), &client.password));
    let (client_name, client) =
        match check_basic_auth(request, logins, REALM, &admin.throttle).await {
            Ok(name) => (name, settings.client(name)),
            Err(refused) => {
                admin.metrics.token_service("unauthorized");
                return *refused;
            }
        };
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
    let protocol = match param("proto").map(Protocol::named) {
        None => Protocol::Imap,
        Some(Some(protocol)) => protocol,
        Some(None) => return plain(StatusCode::BAD_REQUEST, "proto names no protocol\n"),
    };
    if !client.is_some_and(|client| client.may_fetch(account)) {
        // As for an account that does not exist: a client learns nothing of the others'.
        return answer(
            admin,
            client_name,
            account,
            "forbidden",
            plain(StatusCode::NOT_FOUND, "no such account\n"),
        );
    }
    let (Some(oauth2), Some(tokens)) = (&runtime.oauth2, &runtime.tokens) else {
        return answer(
            admin,
            client_name,
            account,
            "refused",
            plain(StatusCode::NOT_FOUND, "no such account\n"),
        );
    };
    if oauth2.account(account).is_none() {
        return answer(
            admin,
            client_name,
            account,
            "refused",
            plain(StatusCode::NOT_FOUND, "no such account\n"),
        );
    }
    match tokens.get(account, protocol).await {
        Ok((_, cached)) => {
            let Some(body) = body(&cached.token, cached.remaining()) else {
                return answer(
                    admin,
                    client_name,
                    account,
                    "error",
                    plain(StatusCode::SERVICE_UNAVAILABLE, "no bearer token\n"),
                );
            };
            let mut ok = reply(StatusCode::OK, "application/json", body.to_string());
            ok.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            answer(admin, client_name, account, "ok", ok)
        }
        Err(
            TokenError::Refused | TokenError::NeedsReauthorization | TokenError::Misconfigured(_),
        ) => answer(
            admin,
            client_name,
            account,
            "refused",
            plain(
                StatusCode::FORBIDDEN,
                "account refused or needs re-authorization\n",
            ),
        ),
        Err(TokenError::Unavailable(_)) => answer(
            admin,
            client_name,
            account,
            "error",
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "token source unavailable\n",
            ),
        ),
    }
}

/// The answer for a bearer `token` valid for `remaining` (`None` for a password). The server
/// the token's source named goes along, so that a mailgate asking this one routes the account
/// to the same backend.
fn body(token: &Token, remaining: Option<Duration>) -> Option<serde_json::Value> {
    let UpstreamAuth::Bearer {
        user,
        token: secret,
    } = &token.auth
    else {
        return None;
    };
    let mut body = serde_json::json!({ "user": user, "accessToken": secret.expose() });
    if let Some(remaining) = remaining {
        body["expiresIn"] = remaining.as_secs().into();
    }
    if let Some(server) = &token.server {
        body["host"] = server.host.clone().into();
        body["port"] = server.port.into();
    }
    Some(body)
}

/// Counts and logs an answer, like a login.
fn answer(admin: &Admin, client: &str, account: &str, result: &'static str, reply: Reply) -> Reply {
    admin.metrics.token_service(result);
    tracing::info!(
        client = %Escaped(client),
        account = %Escaped(account),
        result,
        "token service request"
    );
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::ServerAddress;
    use crate::token::auth_server::parse_answer;

    fn bearer(server: Option<ServerAddress>) -> Token {
        Token {
            auth: UpstreamAuth::Bearer {
                user: "alice@example.test".to_owned(),
                token: Secret::new("at-1".to_owned()),
            },
            lifetime: Some(Duration::from_secs(3600)),
            server,
        }
    }

    /// A mailgate reading this answer gets the same token, lifetime and server.
    #[test]
    fn the_answer_carries_what_the_token_does() {
        let remaining = Some(Duration::from_secs(600));
        for server in [None, Some(ServerAddress::new("2001:db8::7", 993).unwrap())] {
            let answer = body(&bearer(server.clone()), remaining).unwrap();
            assert_eq!(answer.get("host").is_some(), server.is_some(), "{answer}");
            let read = parse_answer(answer.to_string().as_bytes()).unwrap();
            assert_eq!(read.server, server);
            assert_eq!(read.lifetime, remaining);
            assert!(
                matches!(&read.auth, UpstreamAuth::Bearer { user, token } if user == "alice@example.test" && token.expose() == "at-1")
            );
        }
    }

    #[test]
    fn a_password_is_not_handed_out() {
        let password = Token {
            auth: UpstreamAuth::Password {
                user: "alice".to_owned(),
                password: Secret::new("pw".to_owned()),
            },
            ..bearer(None)
        };
        assert!(body(&password, None).is_none());
    }
}
