//! What token sources answer over HTTP: the auth server's JSON and an identity provider's
//! token answer. Both cross a trust boundary before a token reaches an upstream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::login::UpstreamAuth;
use mailgate::token::auth_server::{self, is_usable_token, is_usable_user};
use mailgate::token::oauth2::provider;
use mailgate::token::{MAX_LIFETIME, ServerAddress};

fuzz_target!(|data: &[u8]| {
    let secrets = secrets_in(data);
    match auth_server::parse_answer(data) {
        Ok(token) => {
            assert!(
                token
                    .lifetime
                    .is_none_or(|lifetime| lifetime <= MAX_LIFETIME)
            );
            // A server named is already in canonical form.
            assert!(token.server.as_ref().is_none_or(|server| {
                ServerAddress::new(&server.host, server.port).as_ref() == Ok(server)
            }));
            match &token.auth {
                UpstreamAuth::Bearer { user, token } => {
                    assert!(is_usable_user(user) && is_usable_token(token.expose()));
                }
                UpstreamAuth::Password { user, .. } => assert!(is_usable_user(user)),
            }
        }
        Err(error) => assert_quiet(&error.to_string(), &secrets),
    }
    match provider::parse_answer(data) {
        Ok(answer) => {
            assert!(is_usable_token(answer.access_token.expose()));
            assert!(
                answer
                    .refresh_token
                    .is_none_or(|refresh| is_usable_token(refresh.expose()))
            );
            for lifetime in [answer.expires_in, answer.refresh_expires_in]
                .into_iter()
                .flatten()
            {
                assert!(lifetime <= MAX_LIFETIME);
            }
        }
        Err(error) => assert_quiet(&error.to_string(), &secrets),
    }
});

/// The string values of the fields that carry secrets, when the body is a JSON object; only
/// those that cannot be words of mailgate's own fixed messages (a digit, no space).
fn secrets_in(data: &[u8]) -> Vec<String> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(data) else {
        return Vec::new();
    };
    ["accessToken", "pass", "access_token", "refresh_token"]
        .iter()
        .filter_map(|name| fields.get(*name)?.as_str())
        .filter(|secret| {
            secret.len() >= 8
                && secret.bytes().any(|b| b.is_ascii_digit())
                && !secret.contains(char::is_whitespace)
        })
        .map(str::to_owned)
        .collect()
}

/// Errors get logged: none may carry a secret from the body.
fn assert_quiet(error: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !error.contains(secret.as_str()),
            "{error:?} holds {secret:?}"
        );
    }
}
