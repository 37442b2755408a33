//! The authentication-server token source (EmailEngine `authServer` contract):
//! `GET <url>?account=<id>&proto=imap|smtp` answers `{"user", "accessToken"}` (or `"pass"`),
//! optionally with `expiresIn` (seconds) or `expires` (RFC 3339), and with `host` and `port`
//! naming the account's backend. See docs/auth-server.md.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{
    BoxFuture, MAX_LIFETIME, ServerAddress, Token, TokenError, TokenKey, TokenSource,
    lifetime_from_secs,
};
use crate::config::AuthServerConfig;
use crate::health::Health;
use crate::http;
use crate::login::UpstreamAuth;
use crate::metrics::Metrics;
use crate::secret::Secret;

pub struct AuthServer {
    client: reqwest::Client,
    endpoint: http::Endpoint,
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
    host: Option<String>,
    /// Wider than a port, so that an out-of-range one is refused with a reason.
    port: Option<u64>,
}

impl AuthServer {
    /// # Errors
    /// The URL does not parse (already refused by config validation) or the HTTP client cannot be built.
    pub fn new(
        config: &AuthServerConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Self, String> {
        let endpoint = http::Endpoint::new(&config.url)
            .map_err(|reason| format!("tokens.auth_server.url: {reason}"))?;
        let client = http::client(config.timeout, config.ca_file.as_deref())?;
        Ok(Self {
            client,
            endpoint,
            metrics,
            health,
        })
    }

    /// Asks the authentication server for `key`'s credentials.
    ///
    /// # Errors
    /// `Refused` on 403/404; `Unavailable` on any other status, timeout, or unusable answer.
    async fn fetch_counted(&self, key: &TokenKey) -> Result<Token, TokenError> {
        let started = tokio::time::Instant::now();
        let result = self.request(key).await;
        self.metrics
            .token_fetch("auth_server", started.elapsed().as_secs_f64());
        let label = result.as_ref().map_or_else(TokenError::label, |_| "ok");
        self.metrics.token_request("auth_server", label);
        result
    }

    /// Checks that the server answers HTTP at all (for readiness); the status does not matter.
    async fn probe_once(&self) {
        // A request without an account: real servers answer 400 or 404, which proves they are
        // up; 401 or 403 says they refuse mailgate's own credentials.
        if let Ok(response) = self.get(self.endpoint.url.clone()).await
            && response.status() == StatusCode::FORBIDDEN
        {
            self.health.token_source_refused();
        }
    }

    /// Sends a GET; any answer counts for readiness, except 401 (wrong basic auth).
    async fn get(&self, url: url::Url) -> Result<reqwest::Response, TokenError> {
        let request = self.endpoint.authorize(self.client.get(url));
        let response = request.send().await.map_err(unavailable)?;
        if response.status() == StatusCode::UNAUTHORIZED {
            self.health.token_source_refused();
        } else {
            self.health.token_source_answered();
        }
        Ok(response)
    }

    async fn request(&self, key: &TokenKey) -> Result<Token, TokenError> {
        let mut url = self.endpoint.url.clone();
        url.query_pairs_mut().append_pair("account", &key.account);
        if let Some(protocol) = key.protocol {
            url.query_pairs_mut().append_pair("proto", protocol.name());
        }
        let response = self.get(url).await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => return Err(TokenError::Refused),
            status if status.is_redirection() => {
                return Err(TokenError::Unavailable(format!(
                    "HTTP status {status}: redirects are not followed; point tokens.auth_server.url at the final address"
                )));
            }
            status => return Err(TokenError::Unavailable(format!("HTTP status {status}"))),
        }
        let body = http::read_bounded(response)
            .await
            .map_err(|e| TokenError::Unavailable(e.to_string()))?;
        parse_answer(&body)
    }
}

impl TokenSource for AuthServer {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
        Box::pin(self.fetch_counted(key))
    }

    fn probe(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.probe_once())
    }
}

/// Turns the JSON answer into a token; never echoes the body (it holds secrets). Public for
/// the fuzz targets.
///
/// # Errors
/// The body is not the expected JSON, or holds an unusable user, token or expiry.
pub fn parse_answer(body: &[u8]) -> Result<Token, TokenError> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| TokenError::Unavailable("answer is not the expected JSON".to_owned()))?;
    if !is_usable_user(&answer.user) {
        return Err(TokenError::Unavailable(
            "answer's user is empty, too long or has control characters".to_owned(),
        ));
    }
    let auth = match (answer.access_token, answer.pass) {
        (Some(token), _) if !token.expose().is_empty() => {
            if !is_usable_token(token.expose()) {
                return Err(TokenError::Unavailable(
                    "answer's accessToken has characters a bearer token cannot have".to_owned(),
                ));
            }
            UpstreamAuth::Bearer {
                user: answer.user,
                token,
            }
        }
        (_, Some(password)) => {
            if password.expose().chars().any(char::is_control) {
                return Err(TokenError::Unavailable(
                    "answer's pass has control characters".to_owned(),
                ));
            }
            UpstreamAuth::Password {
                user: answer.user,
                password,
            }
        }
        _ => {
            return Err(TokenError::Unavailable(
                "answer has neither accessToken nor pass".to_owned(),
            ));
        }
    };
    let lifetime = match (answer.expires_in, answer.expires) {
        (Some(seconds), _) => Some(lifetime_from_secs(seconds)),
        (None, Some(expires)) => Some(lifetime_until(&expires)?),
        (None, None) => None,
    };
    let server = server(answer.host.as_deref(), answer.port)?;
    Ok(Token {
        auth,
        lifetime,
        server,
    })
}

/// The backend an answer names: `host` and `port` together, or neither (like nginx's
/// `Auth-Server` and `Auth-Port`).
fn server(host: Option<&str>, port: Option<u64>) -> Result<Option<ServerAddress>, TokenError> {
    let unusable = |reason: &str| TokenError::Unavailable(format!("answer's {reason}"));
    match (host, port) {
        (None, None) => Ok(None),
        (Some(host), Some(port)) => {
            let port = u16::try_from(port).map_err(|_| unusable("port is above 65535"))?;
            ServerAddress::new(host, port).map(Some).map_err(unusable)
        }
        _ => Err(unusable("host and port come only together")),
    }
}

/// Longest user name accepted from a token source: RFC 5321 4.5.3.1 allows 64 + 1 + 255.
const MAX_USER_LENGTH: usize = 320;

/// A user name goes into SASL messages separated by control characters (XOAUTH2's `\x01`,
/// PLAIN's NUL): one inside it would add or shift fields.
pub fn is_usable_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LENGTH && !user.chars().any(char::is_control)
}

/// A bearer token is printable ASCII without spaces (RFC 6750 2.1 b64token is a subset).
pub fn is_usable_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

fn lifetime_until(expires: &str) -> Result<Duration, TokenError> {
    let at = OffsetDateTime::parse(expires, &Rfc3339)
        .map_err(|_| TokenError::Unavailable("expires is not RFC 3339".to_owned()))?;
    let remaining = at - OffsetDateTime::now_utc();
    Ok(Duration::try_from(remaining)
        .unwrap_or(Duration::ZERO)
        .min(MAX_LIFETIME))
}

fn unavailable(error: reqwest::Error) -> TokenError {
    TokenError::Unavailable(http::classify(error).to_string())
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
    fn lifetimes_beyond_a_year_count_as_a_year() {
        let endless = format!(
            r#"{{"user":"a","accessToken":"t","expiresIn":{}}}"#,
            u64::MAX
        );
        let far = br#"{"user":"a","accessToken":"t","expires":"9999-12-31T23:59:59Z"}"#;
        for body in [endless.as_bytes(), far] {
            assert_eq!(parse_answer(body).unwrap().lifetime, Some(MAX_LIFETIME));
        }
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
    fn control_characters_make_an_answer_unusable() {
        for body in [
            &br#"{"user":"a\u0001auth=Bearer evil","accessToken":"t"}"#[..],
            br#"{"user":"a","accessToken":"t\u0001x"}"#,
            br#"{"user":"a","accessToken":"t x"}"#,
            br#"{"user":"a\u0000b","pass":"pw"}"#,
            br#"{"user":"a","pass":"p\u0000w"}"#,
            br#"{"user":"","accessToken":"t"}"#,
        ] {
            let error = parse_answer(body).unwrap_err();
            assert!(matches!(error, TokenError::Unavailable(_)), "{body:?}");
        }
    }

    fn server_of(fields: &str) -> Result<Option<ServerAddress>, TokenError> {
        parse_answer(format!(r#"{{"user":"a","accessToken":"secret-x",{fields}}}"#).as_bytes())
            .map(|token| token.server)
    }

    #[test]
    fn an_answer_may_name_its_server() {
        let named = |host: &str, port| Ok(Some(ServerAddress::new(host, port).unwrap()));
        assert_eq!(
            parse_answer(br#"{"user":"a","pass":"p"}"#).unwrap().server,
            None
        );
        assert_eq!(server_of(r#""host":null,"port":null"#), Ok(None));
        for (fields, host, port) in [
            (
                r#""host":"imap2.example.test","port":143"#,
                "imap2.example.test",
                143,
            ),
            (
                r#""host":"IMAP2.Example.TEST","port":993"#,
                "imap2.example.test",
                993,
            ),
            (r#""host":"dovecot-0","port":65535"#, "dovecot-0", 65535),
            (
                r#""host":"mail_backend_1.internal","port":1"#,
                "mail_backend_1.internal",
                1,
            ),
            (r#""host":"127.0.0.1","port":143"#, "127.0.0.1", 143),
            (r#""host":"::1","port":143"#, "::1", 143),
            (r#""host":"[::1]","port":143"#, "::1", 143),
            (
                r#""host":"[2001:DB8:0:0::7]","port":143"#,
                "2001:db8::7",
                143,
            ),
        ] {
            assert_eq!(server_of(fields), named(host, port), "{fields}");
            assert_eq!(named(host, port).unwrap().unwrap().host, host, "canonical");
        }
    }

    #[test]
    fn a_server_that_cannot_be_one_makes_the_answer_unusable() {
        let long_label = "a".repeat(64);
        let long_name = ["abcdefghij"; 24].join(".");
        let hostile = [
            r#""host":"imap.example.test""#.to_owned(),
            r#""port":143"#.to_owned(),
            r#""host":"imap.example.test","port":null"#.to_owned(),
            r#""host":"imap.example.test","port":0"#.to_owned(),
            r#""host":"imap.example.test","port":65536"#.to_owned(),
            r#""host":"imap.example.test","port":18446744073709551616"#.to_owned(),
            r#""host":"imap.example.test","port":-1"#.to_owned(),
            r#""host":"imap.example.test","port":143.5"#.to_owned(),
            r#""host":"imap.example.test","port":"143""#.to_owned(),
            r#""host":143,"port":143"#.to_owned(),
            format!(r#""host":"{long_label}.example","port":143"#),
            format!(r#""host":"{long_name}","port":143"#),
        ];
        let hosts = [
            "",
            " ",
            "imap.example.test ",
            r"imap\u0000.example",
            r"imap.example.test\r\nX-Evil: 1",
            r"imap.example.test\u0001secret-x",
            "evil.example/path",
            "user@evil.example",
            "evil.example:25",
            "[evil.example]",
            "[127.0.0.1]",
            "[::1",
            "::1]",
            "fe80::1%eth0",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "127.1",
            "0x7f000001",
            "010.0.0.1",
            "imap.example.test.",
            ".example",
            "imap..example",
            "-imap.example",
            "imap-.example",
            "imäp.example",
            r"imap\u200b.example",
        ];
        let hostile = hostile.into_iter().chain(
            hosts
                .iter()
                .map(|host| format!(r#""host":"{host}","port":143"#)),
        );
        for fields in hostile {
            let error = server_of(&fields).unwrap_err();
            assert!(matches!(error, TokenError::Unavailable(_)), "{fields}");
            assert!(!error.to_string().contains("secret-x"), "{error}");
            assert!(!error.to_string().contains("evil"), "{error}");
        }
    }

    /// A redirect to another host is neither followed nor sent a Referer, and the login
    /// fails as temporary with a reason that says why.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        crate::tls::install_crypto_provider();
        let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let elsewhere_addr = elsewhere.local_addr().unwrap();
        let redirecting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", redirecting.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut stream, _) = redirecting.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            let answer = format!(
                "HTTP/1.1 302 Found\r\nLocation: http://{elsewhere_addr}/token?account=acct\r\nContent-Length: 0\r\n\r\n"
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        let config = AuthServerConfig {
            url: Secret::new(url),
            timeout: Duration::from_secs(5),
            password_file: None,
            password_env: None,
            ca_file: None,
        };
        let source = AuthServer::new(
            &config,
            Arc::new(Metrics::new()),
            Arc::new(Health::new(Duration::from_secs(30))),
        )
        .unwrap();
        let key = TokenKey::shared("acct", Some(crate::config::Protocol::Imap));
        let error = source.fetch(&key).await.unwrap_err();
        assert!(
            matches!(&error, TokenError::Unavailable(reason) if reason.contains("redirects are not followed")),
            "{error}"
        );
        server.await.unwrap();
        let followed = tokio::time::timeout(Duration::from_millis(300), elsewhere.accept()).await;
        assert!(followed.is_err(), "the redirect was followed");
    }
}
