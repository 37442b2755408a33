//! Mode `auth_server`: the client's user name and password go to an HTTP service in a JSON
//! POST body (never in the URL), and its answer decides: `200` with a JSON object accepts
//! (its optional `account` names the account id for the token), `401` or `403` refuses, and
//! anything else is a temporary failure. See docs/auth-server.md.

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde::Serialize;
use serde_json::Value;

use super::{Attempt, CheckError};
use crate::config::{AuthServerConfig, is_usable_name};
use crate::http;
use crate::sanitize;

pub struct AuthServerCheck {
    client: reqwest::Client,
    endpoint: http::Endpoint,
}

/// The request body.
#[derive(Serialize)]
struct Request<'a> {
    user: &'a str,
    password: &'a str,
    protocol: &'static str,
    /// The client's IP address, when known.
    client: Option<String>,
}

impl AuthServerCheck {
    /// # Errors
    /// The URL does not parse or the HTTP client cannot be built (both refused by `check`).
    pub fn new(config: &AuthServerConfig) -> Result<Self, String> {
        let endpoint = http::Endpoint::new(&config.url)
            .map_err(|reason| format!("client_auth.auth_server.url: {reason}"))?;
        let client = http::client(config.timeout, config.ca_file.as_deref())?;
        Ok(Self { client, endpoint })
    }

    /// The account id the server accepts `attempt`'s password for.
    ///
    /// # Errors
    /// [`CheckError::Refused`] on 401 or 403; [`CheckError::Unavailable`] on any other
    /// status, a timeout, or an unusable answer.
    pub async fn check(&self, attempt: &Attempt<'_>) -> Result<String, CheckError> {
        let credentials = attempt.credentials;
        let request = Request {
            user: &credentials.account,
            password: credentials.password.expose(),
            protocol: attempt.protocol.name(),
            client: attempt.client.map(|ip| ip.to_canonical().to_string()),
        };
        // Holds the password: moved into the request, never logged.
        let body = serde_json::to_vec(&request)
            .map_err(|_| CheckError::Unavailable("the request could not be encoded".to_owned()))?;
        let response = self
            .endpoint
            .authorize(self.client.post(self.endpoint.url.clone()))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|error| CheckError::Unavailable(http::classify(error).to_string()))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            tracing::info!(
                "auth server answered 401: a wrong password; if every login gets it, the server refuses mailgate's own basic auth"
            );
        }
        if status != StatusCode::OK {
            return Err(refusal(status));
        }
        let body = http::read_bounded(response)
            .await
            .map_err(|error| CheckError::Unavailable(error.to_string()))?;
        account(&body, &credentials.account)
    }
}

/// What a status other than 200 means.
fn refusal(status: StatusCode) -> CheckError {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CheckError::Refused,
        status if status.is_redirection() => CheckError::Unavailable(format!(
            "HTTP status {status}: redirects are not followed; point client_auth.auth_server.url at the final address"
        )),
        status => CheckError::Unavailable(format!("HTTP status {status}")),
    }
}

/// The account id a 200 answer names, else `user`; never echoes the body.
fn account(body: &[u8], user: &str) -> Result<String, CheckError> {
    let unusable = |why: &str| CheckError::Unavailable(format!("answer {why}"));
    let Ok(Value::Object(fields)) = serde_json::from_slice(body) else {
        return Err(unusable("is not a JSON object"));
    };
    match fields.get("account") {
        None | Some(Value::Null) => Ok(user.to_owned()),
        Some(Value::String(account)) if is_usable_account(account) => Ok(account.clone()),
        Some(_) => Err(unusable(
            "has an account that is not 1-320 characters without spaces, control or invisible characters",
        )),
    }
}

/// An account id as the configuration allows them, and as the front ends take user names.
fn is_usable_account(account: &str) -> bool {
    is_usable_name(account) && !account.chars().any(sanitize::is_hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_200_object_accepts_for_its_account_or_the_user() {
        assert_eq!(
            account(br#"{"account":"acct-7"}"#, "alice"),
            Ok("acct-7".into())
        );
        assert_eq!(account(b"{}", "alice"), Ok("alice".into()));
        assert_eq!(
            account(br#"{"account":null,"x":1}"#, "alice"),
            Ok("alice".into())
        );
    }

    #[test]
    fn unusable_answers_are_temporary_and_quiet() {
        for body in [
            &b""[..],
            b"OK",
            b"<html>secret-x</html>",
            br#"["acct"]"#,
            br#"{"account":7}"#,
            br#"{"account":""}"#,
            br#"{"account":"a b"}"#,
            br#"{"account":"a\u0000b"}"#,
            br#"{"account":"a\u200Bb"}"#,
            format!(r#"{{"account":"{}"}}"#, "a".repeat(321)).as_bytes(),
        ] {
            let error = account(body, "alice").unwrap_err();
            assert!(matches!(error, CheckError::Unavailable(_)), "{body:?}");
            assert!(!error.to_string().contains("secret-x"));
        }
    }

    #[test]
    fn only_401_and_403_refuse() {
        assert_eq!(refusal(StatusCode::FORBIDDEN), CheckError::Refused);
        assert_eq!(refusal(StatusCode::UNAUTHORIZED), CheckError::Refused);
        for status in [
            StatusCode::NOT_FOUND,
            StatusCode::BAD_REQUEST,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert!(matches!(refusal(status), CheckError::Unavailable(_)));
        }
        assert!(
            matches!(refusal(StatusCode::FOUND), CheckError::Unavailable(why) if why.contains("redirects"))
        );
    }
}
