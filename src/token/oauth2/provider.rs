//! One identity provider as mailgate talks to it: endpoints and scopes from its preset, how
//! mailgate authenticates as a client, and the token and device-authorization requests with
//! their answers validated (RFC 6749 5.1/5.2, RFC 8628 3.2).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;

use crate::config::{ClientAuthMethod, Grant, Preset, ProviderConfig};
use crate::http;
use crate::jwt::{self, LoadedCertificate, ServiceAccount};
use crate::sanitize;
use crate::secret::Secret;
use crate::token::auth_server::is_usable_token;
use crate::token::lifetime_from_secs;

const MICROSOFT_LOGIN: &str = "https://login.microsoftonline.com";
/// App-only (client credentials) access to Exchange Online's IMAP, POP3 and SMTP.
const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
/// Delegated access to one user's mailbox, with a refresh token. Exchange grants POP3 only
/// with its own scope; it has no ManageSieve.
const MICROSOFT_DELEGATED_SCOPE: &str = "https://outlook.office365.com/IMAP.AccessAsUser.All https://outlook.office365.com/POP.AccessAsUser.All https://outlook.office365.com/SMTP.Send offline_access";
const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
const GOOGLE_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
const GOOGLE_DEVICE_URL: &str = "https://oauth2.googleapis.com/device/code";
/// Gmail's one scope for IMAP, POP3 and SMTP.
const GOOGLE_MAIL_SCOPE: &str = "https://mail.google.com/";
/// Descriptions from providers are shown to operators; they are foreign text and may be long.
const MAX_DESCRIPTION: usize = 300;

pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
pub const GRANT_REFRESH_TOKEN: &str = "refresh_token";
pub const GRANT_AUTHORIZATION_CODE: &str = "authorization_code";
pub const GRANT_PASSWORD: &str = "password";
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const GRANT_DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";
const ASSERTION_TYPE_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How mailgate proves who it is at the token endpoint.
enum ClientCredential {
    /// A public client (PKCE and device flows): only `client_id`.
    None,
    Secret {
        secret: Secret<String>,
        method: ClientAuthMethod,
    },
    Certificate(LoadedCertificate),
}

pub struct Provider {
    pub name: String,
    pub preset: Preset,
    pub token_url: String,
    pub authorize_url: Option<String>,
    pub device_url: Option<String>,
    pub redirect_url: Option<String>,
    pub client_id: Option<String>,
    scope: Option<String>,
    credential: ClientCredential,
    service_account: Option<ServiceAccount>,
    http: reqwest::Client,
}

/// A successful token answer.
#[derive(Debug)]
pub struct TokenAnswer {
    pub access_token: Secret<String>,
    pub expires_in: Option<Duration>,
    /// A new refresh token: rotation, or the first one after a code or device grant.
    pub refresh_token: Option<Secret<String>>,
    pub refresh_expires_in: Option<Duration>,
}

/// Why a grant failed, as mailgate acts on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// `invalid_grant`: the refresh token (or code, or assertion) is no good, for good.
    #[error("{0}")]
    InvalidGrant(String),
    /// 5xx, a timeout, `temporarily_unavailable`: try again later.
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// Any other refusal (`invalid_client`, `unauthorized_client`, `invalid_scope`, ...): a
    /// configuration problem that retrying will not fix.
    #[error("refused: {0}")]
    Refused(String),
    /// Device flow: the user has not finished yet (RFC 8628 3.5).
    #[error("authorization_pending")]
    AuthorizationPending,
    #[error("slow_down")]
    SlowDown,
    #[error("expired_token: the device code expired")]
    ExpiredToken,
    #[error("access_denied: the user declined")]
    AccessDenied,
}

/// The device authorization answer (RFC 8628 3.2).
#[derive(Debug, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: Secret<String>,
    pub user_code: String,
    #[serde(alias = "verification_url")]
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

#[derive(Deserialize)]
struct WireAnswer {
    access_token: Option<Secret<String>>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<Secret<String>>,
    #[serde(default)]
    refresh_token_expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct WireError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl Provider {
    /// # Errors
    /// The HTTP client cannot be built (an unreadable `ca_file`, already refused by `check`).
    pub fn new(name: &str, config: &ProviderConfig, timeout: Duration) -> Result<Self, String> {
        let tenant = config.tenant.as_deref().unwrap_or("common");
        let (token_url, authorize_url, device_url) = match config.preset {
            Preset::Microsoft => (
                Some(format!("{MICROSOFT_LOGIN}/{tenant}/oauth2/v2.0/token")),
                Some(format!("{MICROSOFT_LOGIN}/{tenant}/oauth2/v2.0/authorize")),
                Some(format!("{MICROSOFT_LOGIN}/{tenant}/oauth2/v2.0/devicecode")),
            ),
            Preset::Google => (
                Some(GOOGLE_TOKEN_URL.to_owned()),
                Some(GOOGLE_AUTHORIZE_URL.to_owned()),
                Some(GOOGLE_DEVICE_URL.to_owned()),
            ),
            Preset::Custom => (None, None, None),
        };
        let credential = match (&config.client_secret, &config.certificate) {
            (Some(secret), _) => ClientCredential::Secret {
                secret: secret.clone(),
                method: config.client_auth_method,
            },
            (None, Some(certificate)) => ClientCredential::Certificate(certificate.clone()),
            (None, None) => ClientCredential::None,
        };
        Ok(Self {
            name: name.to_owned(),
            preset: config.preset,
            token_url: config
                .token_url
                .clone()
                .or(token_url)
                .ok_or_else(|| format!("provider {name}: no token_url"))?,
            authorize_url: config.authorize_url.clone().or(authorize_url),
            device_url: config.device_url.clone().or(device_url),
            redirect_url: config.redirect_url.clone(),
            client_id: config.client_id.clone(),
            scope: config.scope.clone(),
            credential,
            service_account: config.service_account.clone(),
            http: http::client(timeout, config.ca_file.as_deref())?,
        })
    }

    /// The scope to ask for: the account's, else the provider's, else the preset's for the grant.
    pub fn scope(&self, account_scope: Option<&str>, grant: Grant) -> Option<String> {
        let preset = match (self.preset, grant) {
            (Preset::Microsoft, Grant::ClientCredentials) => Some(MICROSOFT_APP_SCOPE),
            (Preset::Microsoft, _) => Some(MICROSOFT_DELEGATED_SCOPE),
            (Preset::Google, _) => Some(GOOGLE_MAIL_SCOPE),
            (Preset::Custom, _) => None,
        };
        account_scope
            .or(self.scope.as_deref())
            .or(preset)
            .map(str::to_owned)
    }

    /// Extra authorization-request parameters the preset needs to hand out a refresh token.
    pub fn authorize_extras(&self) -> &'static [(&'static str, &'static str)] {
        match self.preset {
            // Google gives a refresh token only for offline access, and again only on consent.
            Preset::Google => &[("access_type", "offline"), ("prompt", "consent")],
            Preset::Microsoft | Preset::Custom => &[],
        }
    }

    /// A token for `mailbox` from the service account (RFC 7523 2.1).
    ///
    /// # Errors
    /// See [`GrantError`].
    pub async fn service_account_grant(
        &self,
        mailbox: &str,
        scope: &str,
    ) -> Result<TokenAnswer, GrantError> {
        let account = self
            .service_account
            .as_ref()
            .ok_or_else(|| GrantError::Refused("no service account configured".to_owned()))?;
        let assertion =
            jwt::service_account_assertion(account, mailbox, scope, &self.token_url, unix_now())
                .map_err(GrantError::Refused)?;
        let params = vec![
            ("grant_type", Secret::new(GRANT_JWT_BEARER.to_owned())),
            ("assertion", assertion),
        ];
        self.post_token(params, false).await
    }

    /// A token request with `grant_type` and `params`, the client authenticated as configured.
    ///
    /// # Errors
    /// See [`GrantError`].
    pub async fn grant(
        &self,
        grant_type: &str,
        params: Vec<(&'static str, Secret<String>)>,
    ) -> Result<TokenAnswer, GrantError> {
        let mut all = vec![("grant_type", Secret::new(grant_type.to_owned()))];
        all.extend(params);
        self.post_token(all, true).await
    }

    /// Starts the device flow (RFC 8628 3.1).
    ///
    /// # Errors
    /// No device endpoint, or the provider refused.
    pub async fn device_authorization(
        &self,
        scope: Option<&str>,
    ) -> Result<DeviceAuthorization, GrantError> {
        let url = self.device_url.as_deref().ok_or_else(|| {
            GrantError::Refused(format!("provider {} has no device_url", self.name))
        })?;
        let mut params = Vec::new();
        if let Some(scope) = scope {
            params.push(("scope", Secret::new(scope.to_owned())));
        }
        let body = self.post(url, params, true).await?;
        serde_json::from_slice(&body).map_err(|_| {
            GrantError::Temporary("device authorization answer is not the expected JSON".to_owned())
        })
    }

    async fn post_token(
        &self,
        params: Vec<(&'static str, Secret<String>)>,
        authenticate: bool,
    ) -> Result<TokenAnswer, GrantError> {
        let body = self.post(&self.token_url, params, authenticate).await?;
        parse_answer(&body)
    }

    /// POSTs a form to `url` and returns a 200 answer's body; maps error answers.
    async fn post(
        &self,
        url: &str,
        mut params: Vec<(&'static str, Secret<String>)>,
        authenticate: bool,
    ) -> Result<Vec<u8>, GrantError> {
        let mut basic = None;
        if authenticate {
            basic = self.authenticate(&mut params, url)?;
        }
        let form = Secret::new(form_body(&params));
        let mut request = self
            .http
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form.expose().clone());
        if let Some(header) = basic {
            request = request.header(reqwest::header::AUTHORIZATION, header.expose().as_str());
        }
        let response = request
            .send()
            .await
            .map_err(|e| GrantError::Temporary(http::classify(e).to_string()))?;
        let status = response.status();
        let body = http::read_bounded(response)
            .await
            .map_err(|e| GrantError::Temporary(e.to_string()))?;
        if status.is_success() {
            return Ok(body);
        }
        Err(error_answer(status, &body))
    }

    /// Adds the client's credentials to `params` or returns an `Authorization` header.
    fn authenticate(
        &self,
        params: &mut Vec<(&'static str, Secret<String>)>,
        audience: &str,
    ) -> Result<Option<Secret<String>>, GrantError> {
        let client_id = self.client_id.clone().ok_or_else(|| {
            GrantError::Refused(format!("provider {} has no client_id", self.name))
        })?;
        match &self.credential {
            ClientCredential::None => params.push(("client_id", Secret::new(client_id))),
            ClientCredential::Secret {
                secret,
                method: ClientAuthMethod::Post,
            } => {
                params.push(("client_id", Secret::new(client_id)));
                params.push(("client_secret", secret.clone()));
            }
            // RFC 6749 2.3.1: both parts form-encoded before base64.
            ClientCredential::Secret {
                secret,
                method: ClientAuthMethod::Basic,
            } => {
                let pair = format!(
                    "{}:{}",
                    form_encode(&client_id),
                    form_encode(secret.expose())
                );
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                return Ok(Some(Secret::new(format!("Basic {encoded}"))));
            }
            ClientCredential::Certificate(certificate) => {
                // Microsoft wants the token endpoint itself as the audience.
                let assertion =
                    jwt::client_assertion(certificate, &client_id, audience, unix_now())
                        .map_err(GrantError::Refused)?;
                params.push(("client_id", Secret::new(client_id)));
                params.push((
                    "client_assertion_type",
                    Secret::new(ASSERTION_TYPE_JWT.to_owned()),
                ));
                params.push(("client_assertion", assertion));
            }
        }
        Ok(None)
    }
}

/// The `application/x-www-form-urlencoded` body of `params`.
fn form_body(params: &[(&'static str, Secret<String>)]) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        form.append_pair(name, value.expose());
    }
    form.finish()
}

fn form_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A validated token answer; never echoes the body. Public for the fuzz targets.
///
/// # Errors
/// The body is not the expected JSON, or holds an unusable token or token type.
pub fn parse_answer(body: &[u8]) -> Result<TokenAnswer, GrantError> {
    let unusable = |what: &str| GrantError::Temporary(format!("token answer {what}"));
    let wire: WireAnswer =
        serde_json::from_slice(body).map_err(|_| unusable("is not the expected JSON"))?;
    let access_token = wire
        .access_token
        .ok_or_else(|| unusable("has no access_token"))?;
    if !is_usable_token(access_token.expose()) {
        return Err(unusable("has an access_token a bearer token cannot be"));
    }
    if let Some(kind) = &wire.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(unusable("is not a bearer token"));
    }
    if let Some(refresh) = &wire.refresh_token
        && !is_usable_token(refresh.expose())
    {
        return Err(unusable("has an unusable refresh_token"));
    }
    Ok(TokenAnswer {
        access_token,
        expires_in: seconds(wire.expires_in.as_ref()),
        refresh_token: wire.refresh_token,
        refresh_expires_in: seconds(wire.refresh_token_expires_in.as_ref()),
    })
}

/// `expires_in` as a number, or as a string of digits (some providers send that).
fn seconds(value: Option<&serde_json::Value>) -> Option<Duration> {
    let seconds = match value? {
        serde_json::Value::Number(n) => n.as_u64()?,
        serde_json::Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    Some(lifetime_from_secs(seconds))
}

/// Maps an error answer (RFC 6749 5.2, RFC 8628 3.5) to what mailgate does about it.
fn error_answer(status: reqwest::StatusCode, body: &[u8]) -> GrantError {
    // Only the provider's own OAuth2 error is a refusal of mailgate's settings: a page from
    // an egress proxy or a WAF (403, 407, 408, 404) says nothing about them.
    let Ok(wire) = serde_json::from_slice::<WireError>(body) else {
        let text = format!("HTTP status {status}");
        return if status.is_redirection() {
            GrantError::Temporary(format!(
                "{text}: redirects are not followed; configure the endpoint's final address"
            ))
        } else {
            GrantError::Temporary(format!("{text}, not an OAuth2 error answer"))
        };
    };
    let mut description = wire.error_description.unwrap_or_default();
    description.truncate(
        description
            .char_indices()
            .nth(MAX_DESCRIPTION)
            .map_or(description.len(), |(i, _)| i),
    );
    let detail = sanitize::for_log(&format!("{} {description}", wire.error));
    match wire.error.as_str() {
        "invalid_grant" => GrantError::InvalidGrant(detail),
        "authorization_pending" => GrantError::AuthorizationPending,
        "slow_down" => GrantError::SlowDown,
        "expired_token" => GrantError::ExpiredToken,
        "access_denied" => GrantError::AccessDenied,
        "temporarily_unavailable" => GrantError::Temporary(detail),
        _ if status.is_server_error() => GrantError::Temporary(detail),
        _ => GrantError::Refused(detail),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(preset: &str) -> Provider {
        let config: ProviderConfig = serde_saphyr::from_str(&format!(
            "{{ preset: {preset}, tenant: contoso.onmicrosoft.com, client_id: app }}"
        ))
        .unwrap();
        crate::tls::install_crypto_provider();
        Provider::new("p", &config, Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn presets_fill_endpoints_and_scopes() {
        let microsoft = provider("microsoft");
        assert_eq!(
            microsoft.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            microsoft.scope(None, Grant::ClientCredentials).unwrap(),
            "https://outlook.office365.com/.default"
        );
        assert!(
            microsoft
                .scope(None, Grant::RefreshToken)
                .unwrap()
                .contains("IMAP.AccessAsUser.All")
        );
        assert!(
            microsoft
                .scope(None, Grant::RefreshToken)
                .unwrap()
                .contains("https://outlook.office365.com/POP.AccessAsUser.All")
        );
        let google = provider("google");
        assert_eq!(google.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(
            google.scope(Some("custom"), Grant::RefreshToken).as_deref(),
            Some("custom")
        );
        assert_eq!(google.authorize_extras()[0], ("access_type", "offline"));
    }

    #[test]
    fn answers_are_validated() {
        let good = parse_answer(
            br#"{"access_token":"at-1","token_type":"Bearer","expires_in":"3599","refresh_token":"rt-2"}"#,
        )
        .unwrap();
        assert_eq!(good.expires_in, Some(Duration::from_secs(3599)));
        assert!(good.refresh_token.is_some());
        // Lifetimes no clock can add are capped (they overflowed the store's expiry times).
        let endless = format!(
            r#"{{"access_token":"at","expires_in":{0},"refresh_token_expires_in":"{0}"}}"#,
            u64::MAX
        );
        let capped = parse_answer(endless.as_bytes()).unwrap();
        assert_eq!(capped.expires_in, Some(crate::token::MAX_LIFETIME));
        assert_eq!(capped.refresh_expires_in, Some(crate::token::MAX_LIFETIME));
        for body in [
            &br#"{"token_type":"Bearer"}"#[..],
            br#"{"access_token":"a b","token_type":"Bearer"}"#,
            br#"{"access_token":"at","token_type":"mac"}"#,
            br#"{"access_token":"at","refresh_token":"r\u0001t"}"#,
            b"<html>",
        ] {
            assert!(
                matches!(parse_answer(body), Err(GrantError::Temporary(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn errors_are_classified() {
        let bad = reqwest::StatusCode::BAD_REQUEST;
        let answer = |error: &str| {
            format!(r#"{{"error":"{error}","error_description":"AADSTS70008: expired\u001b[31m"}}"#)
        };
        match error_answer(bad, answer("invalid_grant").as_bytes()) {
            GrantError::InvalidGrant(detail) => {
                assert!(
                    detail.contains("AADSTS70008") && !detail.contains('\u{1b}'),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            error_answer(bad, answer("slow_down").as_bytes()),
            GrantError::SlowDown
        );
        assert!(matches!(
            error_answer(bad, answer("invalid_client").as_bytes()),
            GrantError::Refused(_)
        ));
        assert!(matches!(
            error_answer(bad, answer("temporarily_unavailable").as_bytes()),
            GrantError::Temporary(_)
        ));
        assert!(matches!(
            error_answer(reqwest::StatusCode::BAD_GATEWAY, b"oops"),
            GrantError::Temporary(_)
        ));
        assert!(matches!(
            error_answer(reqwest::StatusCode::FOUND, b""),
            GrantError::Temporary(text) if text.contains("redirects")
        ));
    }

    /// A refusal is now the operator's permanent problem (`misconfigured`, `535 5.3.5`), so
    /// only the provider's own words may make one: a page that is not an OAuth2 error (an
    /// egress proxy's or a WAF's 403, a 408) says nothing about mailgate's settings.
    #[test]
    fn answers_that_are_not_oauth2_errors_are_not_refusals() {
        for status in [
            reqwest::StatusCode::REQUEST_TIMEOUT,
            reqwest::StatusCode::FORBIDDEN,
            reqwest::StatusCode::NOT_FOUND,
            reqwest::StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        ] {
            let error = error_answer(status, b"<html>Access denied by proxy</html>");
            assert!(
                matches!(error, GrantError::Temporary(_)),
                "{status}: {error:?}"
            );
        }
    }
}
