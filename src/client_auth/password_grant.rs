//! Mode `oauth2_password`: the client's user name and password go to an identity provider's
//! token endpoint as a resource owner password credentials grant (RFC 6749 4.3), the client
//! authenticated as the provider is configured. The access token that comes back proves the
//! password and is the session's token; `invalid_grant` means the password is wrong.

use super::CheckError;
use crate::config::{Grant, PasswordGrantConfig};
use crate::login::{Credentials, UpstreamAuth};
use crate::secret::Secret;
use crate::token::Token;
use crate::token::oauth2::provider::{GRANT_PASSWORD, GrantError, Provider};

pub struct PasswordGrant {
    provider: Provider,
    scope: Option<String>,
}

impl PasswordGrant {
    /// # Errors
    /// The provider's HTTP client cannot be built (refused by `check` first).
    pub fn new(config: &PasswordGrantConfig) -> Result<Self, String> {
        let settings = config
            .resolved
            .as_ref()
            .ok_or("client_auth.oauth2_password: the provider was not resolved")?;
        let provider = Provider::new(&config.provider, settings, config.timeout)?;
        // Delegated access to the user's own mailbox, as the refresh-token flows ask for.
        let scope = provider.scope(config.scope.as_deref(), Grant::RefreshToken);
        Ok(Self { provider, scope })
    }

    /// The access token `credentials` get, for their user name upstream.
    ///
    /// # Errors
    /// [`CheckError::Refused`] on `invalid_grant`; [`CheckError::Unavailable`] on anything
    /// else (other refusals are the configuration's fault, not the client's).
    pub async fn grant(&self, credentials: &Credentials) -> Result<Token, CheckError> {
        let mut params = vec![
            ("username", Secret::new(credentials.account.clone())),
            ("password", credentials.password.clone()),
        ];
        if let Some(scope) = &self.scope {
            params.push(("scope", Secret::new(scope.clone())));
        }
        match self.provider.grant(GRANT_PASSWORD, params).await {
            Ok(answer) => Ok(Token {
                auth: UpstreamAuth::Bearer {
                    user: credentials.account.clone(),
                    token: answer.access_token,
                },
                lifetime: answer.expires_in,
                server: None,
            }),
            Err(GrantError::InvalidGrant(_)) => Err(CheckError::Refused),
            Err(error) => Err(CheckError::Unavailable(without(
                &error.to_string(),
                credentials.password.expose(),
            ))),
        }
    }
}

/// `text` from the provider with the password replaced, should an error description quote it.
fn without(text: &str, password: &str) -> String {
    if password.is_empty() {
        return text.to_owned();
    }
    text.replace(password, "[redacted]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_password_is_redacted() {
        assert_eq!(
            without("invalid_request bad password hunter2", "hunter2"),
            "invalid_request bad password [redacted]"
        );
        assert_eq!(
            without("temporarily_unavailable", ""),
            "temporarily_unavailable"
        );
    }
}
