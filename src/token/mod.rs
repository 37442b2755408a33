//! Where access tokens come from (an [`auth_server`], mailgate's own [`oauth2`] client, one
//! per account as [`sources`] decides) and how they are kept ([`cache`]).

pub mod auth_server;
pub mod cache;
pub mod oauth2;
pub mod shared;
pub mod sources;

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::time::Duration;

use crate::config::Protocol;
use crate::login::UpstreamAuth;

/// The longest lifetime a token source may claim; a longer claim counts as this. No access
/// token lives near a year, and `u64::MAX` seconds would overflow every deadline computed
/// from it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// A lifetime in seconds as a source sent it, at most [`MAX_LIFETIME`].
pub fn lifetime_from_secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds).min(MAX_LIFETIME)
}

/// What a token source hands out for one account.
#[derive(Debug, Clone)]
pub struct Token {
    pub auth: UpstreamAuth,
    /// Remaining lifetime when fetched; `None` means the source did not say.
    pub lifetime: Option<Duration>,
    /// The backend the token source chose for this account, if it named one.
    pub server: Option<ServerAddress>,
}

/// A backend as a token source names it, in canonical form so that equal servers compare
/// equal: a DNS name in lower case, or an IP address in its standard text form (IPv6 without
/// brackets, as `upstream.host` writes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: String,
    pub port: u16,
}

/// Longest host name: RFC 1035 2.3.4 allows 255 octets on the wire, 253 in text.
const MAX_HOST_LENGTH: usize = 253;
/// Longest label of a host name (RFC 1035 2.3.4).
const MAX_LABEL_LENGTH: usize = 63;

impl ServerAddress {
    /// `host` and `port` checked and made canonical. `host` is a DNS name or an IP address;
    /// an IPv6 address may be in brackets (`[::1]`, as in a URL).
    ///
    /// # Errors
    /// Port 0, or a host that is neither (the reason names no part of it).
    pub fn new(host: &str, port: u16) -> Result<Self, &'static str> {
        if port == 0 {
            return Err("port 0 names no server");
        }
        let host = canonical_host(host).ok_or("host is neither a DNS name nor an IP address")?;
        Ok(Self { host, port })
    }
}

fn canonical_host(host: &str) -> Option<String> {
    if !(1..=MAX_HOST_LENGTH).contains(&host.len()) {
        return None;
    }
    let ip = match host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        Some(inner) => Some(IpAddr::V6(inner.parse::<Ipv6Addr>().ok()?)),
        None => host.parse::<IpAddr>().ok(),
    };
    match ip {
        // Neither "any address" nor a group is one server.
        Some(ip) if ip.is_unspecified() || ip.is_multicast() => None,
        Some(ip) => Some(ip.to_string()),
        None => is_dns_name(host).then(|| host.to_ascii_lowercase()),
    }
}

/// Labels of letters, digits, `-` (not at either end) and `_` (found in internal names),
/// the last starting with a letter: RFC 1123 2.1 keeps a name from looking like a number,
/// and the resolver would read `127.1` or `0x7f000001` as an IPv4 address.
fn is_dns_name(host: &str) -> bool {
    let labels_fit = host.split('.').all(|label| {
        (1..=MAX_LABEL_LENGTH).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last = host.rsplit('.').next().unwrap_or_default();
    labels_fit && last.starts_with(|c: char| c.is_ascii_alphabetic())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The source refused this account for good (auth server 403/404, no such account).
    #[error("account refused by the token source")]
    Refused,
    /// The account's refresh token was refused (`invalid_grant`): someone must authorize it
    /// again; until then its logins fail at once.
    #[error("account needs re-authorization")]
    NeedsReauthorization,
    /// The provider refuses mailgate's own OAuth2 settings for the account: an operator must
    /// fix the configuration; until then its logins fail at once.
    /// Carries the provider's error code and text, escaped.
    #[error("account misconfigured at its identity provider: {0}")]
    Misconfigured(String),
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

    /// The cache key for `account` logging in over `protocol`: by default one token per
    /// protocol; a source whose tokens serve both says `protocol: None`.
    fn key(&self, account: &str, protocol: Protocol) -> TokenKey {
        TokenKey::shared(account, Some(protocol))
    }
}

/// Cache key: the same account may get different tokens per protocol, and a token got with a
/// client's password is kept apart for that password.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    pub account: String,
    /// `None` when one token serves every protocol.
    pub protocol: Option<Protocol>,
    /// Set for a token a client's own password got (an OAuth2 password grant): only a login
    /// with the same password finds it.
    pub proof: Option<Proof>,
}

impl TokenKey {
    /// The key of a token from the configured sources, which any verified login may use.
    pub fn shared(account: &str, protocol: Option<Protocol>) -> Self {
        Self {
            account: account.to_owned(),
            protocol,
            proof: None,
        }
    }

    /// Every key a configured source may keep `account`'s tokens under: one for all
    /// protocols, or one per protocol.
    pub fn every_shared(account: &str) -> Vec<Self> {
        let every = std::iter::once(None).chain(Protocol::ALL.map(Some));
        every
            .map(|protocol| Self::shared(account, protocol))
            .collect()
    }
}

/// A keyed hash standing for a verified password (never the password itself): the key is
/// random per process, so the value means nothing outside it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Proof(pub [u8; 32]);

impl fmt::Debug for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Proof([keyed hash])")
    }
}

impl TokenError {
    /// Whether the account is refused for good, so its open sessions may be ended.
    pub fn is_revocation(&self) -> bool {
        matches!(self, TokenError::Refused | TokenError::NeedsReauthorization)
    }

    /// The `result` label of `mailgate_token_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Refused => "refused",
            TokenError::NeedsReauthorization => "invalid_grant",
            TokenError::Misconfigured(_) => "misconfigured",
            TokenError::Unavailable(_) => "error",
        }
    }
}
