//! The token source each account uses: its OAuth2 account when it has one, else the
//! authentication server, else none (the login is refused).

use std::sync::Arc;

use super::auth_server::AuthServer;
use super::oauth2::{GrantStates, OAuth2};
use super::{BoxFuture, Token, TokenError, TokenKey, TokenSource};
use crate::config::{Protocol, TokensConfig};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::replicas::Redis;

pub struct Sources {
    pub oauth2: Option<Arc<OAuth2>>,
    pub auth_server: Option<AuthServer>,
    health: Arc<Health>,
}

impl Sources {
    /// The sources `config` describes; refresh tokens live in `redis` when given.
    ///
    /// # Errors
    /// An HTTP client or the token store cannot be set up.
    pub async fn new(
        config: &TokensConfig,
        grants: &Arc<GrantStates>,
        metrics: &Arc<Metrics>,
        health: &Arc<Health>,
        redis: Option<Arc<Redis>>,
    ) -> Result<Self, String> {
        let auth_server = config
            .auth_server
            .as_ref()
            .map(|auth_server| AuthServer::new(auth_server, metrics.clone(), health.clone()))
            .transpose()?;
        let oauth2 = match &config.oauth2 {
            Some(oauth2) => Some(
                OAuth2::new(oauth2, grants, metrics.clone(), Some(health.clone()), redis).await?,
            ),
            None => None,
        };
        Ok(Self {
            oauth2,
            auth_server,
            health: health.clone(),
        })
    }

    fn oauth2_for(&self, account: &str) -> Option<&OAuth2> {
        self.oauth2.as_deref().filter(|oauth2| oauth2.has(account))
    }
}

impl TokenSource for Sources {
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>> {
        if let Some(oauth2) = self.oauth2_for(&key.account) {
            return oauth2.fetch(key);
        }
        match &self.auth_server {
            Some(auth_server) => auth_server.fetch(key),
            None => Box::pin(async { Err(TokenError::Refused) }),
        }
    }

    /// The authentication server is probed for readiness; identity providers are not (they
    /// are remote services probed by nobody else every ten seconds either).
    fn probe(&self) -> BoxFuture<'_, ()> {
        match &self.auth_server {
            Some(auth_server) => auth_server.probe(),
            None => {
                self.health.token_source_answered();
                Box::pin(async {})
            }
        }
    }

    fn key(&self, account: &str, protocol: Protocol) -> TokenKey {
        match self.oauth2_for(account) {
            Some(oauth2) => oauth2.key(account, protocol),
            None => TokenKey::shared(account, Some(protocol)),
        }
    }
}
