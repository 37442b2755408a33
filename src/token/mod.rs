//! Where access tokens come from ([`auth_server`]) and how they are kept ([`cache`]).

pub mod auth_server;
pub mod cache;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::Protocol;
use crate::login::UpstreamAuth;

/// What a token source hands out for one account.
#[derive(Debug, Clone)]
pub struct Token {
    pub auth: UpstreamAuth,
    /// Remaining lifetime when fetched; `None` means the source did not say.
    pub lifetime: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The source refused this account for good (auth server 403/404).
    #[error("account refused by the token source")]
    Refused,
    /// The source could not answer now (unreachable, timeout, bad answer).
    #[error("token source unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so that sources can sit behind one `dyn TokenSource`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the credentials for an account come from. The cache in front of it provides single
/// flight, per-token expiry and invalidation for every source alike.
pub trait TokenSource: Send + Sync {
    /// Gets fresh credentials for `key`.
    fn fetch<'a>(&'a self, key: &'a TokenKey) -> BoxFuture<'a, Result<Token, TokenError>>;

    /// Checks, for readiness, that the source answers at all.
    fn probe(&self) -> BoxFuture<'_, ()>;
}

/// Cache key: the same account may get different tokens per protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub account: String,
    pub protocol: Protocol,
}
