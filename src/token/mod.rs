//! Where access tokens come from ([`auth_server`]) and how they are kept ([`cache`]).

pub mod auth_server;
pub mod cache;

use std::time::Duration;

use crate::config::Protocol;
use crate::proxy::UpstreamAuth;

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

/// Cache key: the same account may get different tokens per protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub account: String,
    pub protocol: Protocol,
}
