//! The authentication-server token source (EmailEngine `authServer` contract):
//! `GET <url>?account=<id>&proto=imap|smtp` answers `{"user", "accessToken"}` (or `"pass"`),
//! optionally with `expiresIn` (seconds) or `expires` (RFC 3339). See docs/auth-server.md.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Token, TokenError, TokenKey};
use crate::config::AuthServerConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::proxy::UpstreamAuth;
use crate::secret::Secret;

/// Answers larger than this are not tokens; refuse them instead of buffering.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

pub struct AuthServer {
    client: reqwest::Client,
    /// Without userinfo: credentials travel in the Authorization header only.
    url: url::Url,
    basic_auth: Option<(String, Secret<String>)>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    user: String,
    access_token: Option<Secret<String>>,
    pass: Option<Secret<String>>,
    expires_in: Option<u64>,
    expires: Option<String>,
}

impl AuthServer {
    /// # Errors
    /// The URL does not parse (already refused by config validation) or the HTTP client cannot be built.
    pub fn new(
        config: &AuthServerConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, String> {
        let mut url = url::Url::parse(config.url.expose())
            .map_err(|_| "tokens.auth_server.url: not a URL".to_owned())?;
        // A password alone (e.g. from password_file) still means basic auth, with an empty user.
        let basic_auth = (!url.username().is_empty() || url.password().is_some()).then(|| {
            let user = percent_decode(url.username());
            let password = Secret::new(url.password().map(percent_decode).unwrap_or_default());
            (user, password)
        });
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("mailgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            client,
            url,
            basic_auth,
            metrics,
            health,
        })
    }

    /// Asks the authentication server for `key`'s credentials.
    ///
    /// # Errors
    /// `Refused` on 403/404; `Unavailable` on any other status, timeout, or unusable answer.
    pub async fn fetch(&self, key: &TokenKey) -> Result<Token, TokenError> {
        let started = tokio::time::Instant::now();
        let result = self.request(key).await;
        self.metrics
            .token_fetch("auth_server", started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "ok",
            Err(TokenError::Refused) => "refused",
            Err(TokenError::Unavailable(_)) => "error",
        };
        self.metrics.token_request("auth_server", label);
        result
    }

    /// Checks that the server answers HTTP at all (for readiness); the status does not matter.
    pub async fn probe(&self) {
        // A request without an account: real servers answer 4xx, which proves they are up.
        let _ = self.get(self.url.clone()).await;
    }

    async fn get(&self, url: url::Url) -> Result<reqwest::Response, TokenError> {
        let mut request = self.client.get(url);
        if let Some((user, password)) = &self.basic_auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = request.send().await.map_err(describe)?;
        self.health.token_source_answered();
        Ok(response)
    }

    async fn request(&self, key: &TokenKey) -> Result<Token, TokenError> {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("account", &key.account)
            .append_pair("proto", key.protocol.name());
        let response = self.get(url).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => return Err(TokenError::Refused),
            status => return Err(TokenError::Unavailable(format!("HTTP status {status}"))),
        }
        let body = read_bounded(response).await?;
        parse_answer(&body)
    }
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, TokenError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(TokenError::Unavailable("answer too large".to_owned()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Turns the JSON answer into a token; never echoes the body (it holds secrets).
fn parse_answer(body: &[u8]) -> Result<Token, TokenError> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| TokenError::Unavailable("answer is not the expected JSON".to_owned()))?;
    let auth = match (answer.access_token, answer.pass) {
        (Some(token), _) if !token.expose().is_empty() => UpstreamAuth::Bearer {
            user: answer.user,
            token,
        },
        (_, Some(password)) => UpstreamAuth::Password {
            user: answer.user,
            password,
        },
        _ => {
            return Err(TokenError::Unavailable(
                "answer has neither accessToken nor pass".to_owned(),
            ));
        }
    };
    let lifetime = match (answer.expires_in, answer.expires) {
        (Some(seconds), _) => Some(Duration::from_secs(seconds)),
        (None, Some(expires)) => Some(lifetime_until(&expires)?),
        (None, None) => None,
    };
    Ok(Token { auth, lifetime })
}

fn lifetime_until(expires: &str) -> Result<Duration, TokenError> {
    let at = OffsetDateTime::parse(expires, &Rfc3339)
        .map_err(|_| TokenError::Unavailable("expires is not RFC 3339".to_owned()))?;
    let remaining = at - OffsetDateTime::now_utc();
    Ok(Duration::try_from(remaining).unwrap_or(Duration::ZERO))
}

/// Classifies a transport error without its URL or body.
fn describe(error: reqwest::Error) -> TokenError {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    TokenError::Unavailable(what.to_owned())
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_answer_with_expiry() {
        let token = parse_answer(br#"{"user":"a@b","accessToken":"t","expiresIn":300}"#).unwrap();
        assert_eq!(token.lifetime, Some(Duration::from_secs(300)));
        assert!(matches!(token.auth, UpstreamAuth::Bearer { ref user, .. } if user == "a@b"));
    }

    #[test]
    fn password_answer() {
        let token = parse_answer(br#"{"user":"a@b","pass":"pw"}"#).unwrap();
        assert!(matches!(token.auth, UpstreamAuth::Password { .. }));
        assert_eq!(token.lifetime, None);
    }

    #[test]
    fn expires_in_the_past_is_zero_lifetime() {
        let token =
            parse_answer(br#"{"user":"a","accessToken":"t","expires":"2001-01-01T00:00:00Z"}"#)
                .unwrap();
        assert_eq!(token.lifetime, Some(Duration::ZERO));
    }

    #[test]
    fn unusable_answers_are_temporary_and_quiet() {
        for body in [
            &b"{"[..],
            br#"{"user":"a"}"#,
            br#"{"accessToken":"secret-x"}"#,
        ] {
            let error = parse_answer(body).unwrap_err();
            assert!(matches!(error, TokenError::Unavailable(_)));
            assert!(!error.to_string().contains("secret-x"));
        }
    }

    #[test]
    fn userinfo_is_percent_decoded() {
        assert_eq!(percent_decode("p%40ss%3Aw"), "p@ss:w");
    }
}
